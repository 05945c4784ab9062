// Work split over the process's own OpenMP team, where one is loaded (torch-free, header-only).
//
// torch's CPU builds run their parallel ops on an OpenMP team (libgomp, loaded with torch), whose workers spin for a
// while after each op before they sleep. Threads of our own started beside them contend with those spinning workers
// for the cores (python -m kexue_fast.benchmarks.cpp_threads at c1c75d0 on a 2-core AVX2 VM: a CNN step with the C++
// SOM on two std::threads +26.7%, on one +20.0%). Run on that team instead (GOMP_parallel, looked up at run time in the
// objects already loaded: nothing is linked or loaded here), a split gets the cores torch's own ops use, the spinning
// worker taking its share at once (the same benchmark at d9c578d on a 2-core AVX-512 VM: +17.0% on the team's two
// threads, +27.3% on one; benchmarks/results/cpp-threads-cpu.md).
// Where no OpenMP runtime is loaded (the core used without torch), the split runs on std::threads (run_workers).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <type_traits>

#include "common/env.hpp"
#include "common/parallel.hpp"

#if defined(__linux__) && defined(__GLIBC__)
#include <dlfcn.h>
#include <link.h>
#define KEXUE_OMP_TEAM 1
#endif

namespace kexue {

#ifdef KEXUE_OMP_TEAM
namespace omp_team_detail {

// GOMP_parallel (libgomp's ABI since GCC 4.9, also exported by LLVM's and Intel's runtimes): fn(data) on each member
// of a team of num_threads (0: the runtime's default), the caller being member 0; flags 0.
typedef void (*GompParallel)(void (*)(void*), void*, unsigned, unsigned);

struct Found {
  GompParallel parallel = nullptr;
};

inline int find_in_object(dl_phdr_info* info, std::size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || (std::strstr(name, "gomp") == nullptr && std::strstr(name, "iomp") == nullptr &&
                          std::strstr(name, "libomp") == nullptr))
    return 0;
  void* handle = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);  // a reference to the loaded object, never a new load
  if (handle == nullptr) return 0;
  void* parallel = dlsym(handle, "GOMP_parallel");
  dlclose(handle);  // the object stays loaded: its loader holds it
  if (parallel == nullptr) return 0;
  static_cast<Found*>(out)->parallel = reinterpret_cast<GompParallel>(parallel);
  return 1;
}

// The loaded runtime's GOMP_parallel, or nullptr; looked up again on each call until found (torch may be imported
// after this module), then kept. KEXUE_FAST_OMP_TEAM=0 (or off, false, no) in the environment: never (std::threads).
inline GompParallel gomp_parallel() {
  static std::atomic<GompParallel> found{nullptr};
  static const bool off = env_says_off("KEXUE_FAST_OMP_TEAM");
  if (off) return nullptr;
  GompParallel parallel = found.load(std::memory_order_acquire);
  if (parallel != nullptr) return parallel;
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  Found result;
  dl_iterate_phdr(find_in_object, &result);
  if (result.parallel != nullptr) found.store(result.parallel, std::memory_order_release);
  return result.parallel;
}

template <typename Work>
struct Split {
  Work* work;
  int tasks;
  std::atomic<int> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;

  // Each member takes tasks until none is left: every task runs once whatever size of team the runtime gives (a
  // nested call gets a team of one), and task t does the same work on whichever thread takes it.
  static void run(void* data) {
    auto* split = static_cast<Split*>(data);
    for (int t = split->next.fetch_add(1); t < split->tasks; t = split->next.fetch_add(1)) {
      if (split->failed.load(std::memory_order_relaxed)) continue;
      try {
        (*split->work)(t);
      } catch (...) {
        std::lock_guard<std::mutex> guard(split->error_lock);
        if (!split->error) split->error = std::current_exception();
        split->failed.store(true);
      }
    }
  }
};

}  // namespace omp_team_detail

// True where run_team runs on a loaded OpenMP runtime's team.
inline bool has_omp_team() { return omp_team_detail::gomp_parallel() != nullptr; }

// work(t) for t in [0, tasks): on the loaded OpenMP runtime's team of `tasks` threads where there is one, else on
// std::threads (run_workers); on the calling thread alone when tasks == 1. Exceptions reach the caller.
template <typename Work>
void run_team(int tasks, Work&& work) {
  if (tasks <= 1) {
    if (tasks == 1) work(0);
    return;
  }
  auto parallel = omp_team_detail::gomp_parallel();
  if (parallel == nullptr) {
    run_workers(tasks, work);
    return;
  }
  typedef typename std::remove_reference<Work>::type W;
  omp_team_detail::Split<W> split;
  split.work = &work;
  split.tasks = tasks;
  parallel(&omp_team_detail::Split<W>::run, &split, static_cast<unsigned>(tasks), 0);
  if (split.error) std::rethrow_exception(split.error);
}
#else
inline bool has_omp_team() { return false; }

template <typename Work>
void run_team(int tasks, Work&& work) {
  run_workers(tasks, work);
}
#endif

}  // namespace kexue
