// Threads over a fixed task split (torch-free, header-only): each worker t takes tasks t, t + T, t + 2T, ..., so the
// per-worker partial results, added in worker order, are deterministic for a given thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <utility>
#include <vector>

namespace kexue {

// requested > 0, else the hardware's thread count; never more than there are tasks (and at least 1).
inline int worker_count(int requested, std::size_t tasks) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int wanted = requested > 0 ? requested : hw;
  return static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(static_cast<std::size_t>(wanted), tasks)));
}

// work(t) for t in [0, threads): on the calling thread when threads == 1.
template <typename Work>
void run_workers(int threads, Work&& work) {
  if (threads <= 1) {
    work(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) pool.emplace_back(work, t);
  for (auto& th : pool) th.join();
}

// The block pairs (i0, j0), j0 ≥ i0, of the upper triangle of an n × n matrix in blocks of `block` rows.
inline std::vector<std::pair<std::int64_t, std::int64_t>> upper_block_pairs(std::int64_t n, std::int64_t block) {
  std::vector<std::pair<std::int64_t, std::int64_t>> pairs;
  for (std::int64_t i0 = 0; i0 < n; i0 += block)
    for (std::int64_t j0 = i0; j0 < n; j0 += block) pairs.emplace_back(i0, j0);
  return pairs;
}

}  // namespace kexue
