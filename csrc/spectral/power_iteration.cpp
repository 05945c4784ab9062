#include "spectral/power_iteration.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

#include "common/simd.hpp"

namespace kexue::spectral {
namespace {

// Norms are O(m + n) next to the O(mn) pass, so they accumulate in double: float32 results then carry no more
// rounding than torch's own (pairwise) reductions.
template <typename T>
T norm2(const T* x, std::int64_t n) {
  double acc = 0;
  for (std::int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
  return static_cast<T>(std::sqrt(acc));
}

// One fused pass over W: t = W v (written to t) and w = W^T t (accumulated into w, zeroed here).
// Rows go four at a time so each load of v and each load/store of w serves four rows.
template <typename T>
KEXUE_SIMD_CLONES void fused_pass(const T* __restrict W, std::int64_t m, std::int64_t n, const T* __restrict v,
                                  T* __restrict t, T* __restrict w) {
  for (std::int64_t j = 0; j < n; ++j) w[j] = 0;
  std::int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const T* r0 = W + i * n;
    const T* r1 = r0 + n;
    const T* r2 = r1 + n;
    const T* r3 = r2 + n;
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (std::int64_t j = 0; j < n; ++j) {
      a0 += r0[j] * v[j];
      a1 += r1[j] * v[j];
      a2 += r2[j] * v[j];
      a3 += r3[j] * v[j];
    }
    t[i] = a0;
    t[i + 1] = a1;
    t[i + 2] = a2;
    t[i + 3] = a3;
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) w[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
  }
  for (; i < m; ++i) {
    const T* r = W + i * n;
    T a = 0;
#pragma omp simd reduction(+ : a)
    for (std::int64_t j = 0; j < n; ++j) a += r[j] * v[j];
    t[i] = a;
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) w[j] += a * r[j];
  }
}

template <typename T>
int solve_one(const PowerIterationProblem<T>& p, const PowerIterationOptions& o, T* sigma_out, std::vector<T>& w,
              std::vector<T>& saved) {
  const std::int64_t m = p.rows, n = p.cols;
  const T eps = static_cast<T>(o.eps);
  w.resize(static_cast<std::size_t>(n));
  // u and v as they came (O(m + n) next to the O(mn) passes): put back if sigma ends NaN or Inf (a NaN weight, or
  // float squares that overflow), so a failed call leaves the caller's vectors as the torch path leaves them
  saved.assign(p.u, p.u + m);
  saved.insert(saved.end(), p.v, p.v + n);
  // The caller's start vector may have any norm: normalize it once (later iterates are unit already).
  {
    const T inv = T(1) / std::max(norm2(p.v, n), eps);
    for (std::int64_t j = 0; j < n; ++j) p.v[j] *= inv;
  }
  T sigma = 0, previous = 0;
  int it = 0;
  while (it < o.n_iters) {
    fused_pass<T>(p.weight, m, n, p.v, p.u, w.data());
    const T norm_u = norm2(p.u, m);
    if (norm_u == T(0)) {  // W v = 0 (a zero weight): sigma = 0, u = 0 and v kept, as in the torch reference; a
      sigma = 0;           // zeroed v would stay 0 for good, and sigma with it, whatever the weight becomes
      ++it;
      break;
    }
    const T inv_t = T(1) / std::max(norm_u, eps);
    for (std::int64_t i = 0; i < m; ++i) p.u[i] *= inv_t;
    for (std::int64_t j = 0; j < n; ++j) w[j] *= inv_t;  // w = W^T u
    sigma = norm2(w.data(), n);
    const T inv_s = T(1) / std::max(sigma, eps);
    for (std::int64_t j = 0; j < n; ++j) p.v[j] = w[j] * inv_s;
    ++it;
    if (o.tol > 0 && it > 1 && std::abs(sigma - previous) <= static_cast<T>(o.tol) * sigma) break;
    previous = sigma;
  }
  if (!std::isfinite(sigma)) {
    std::copy(saved.begin(), saved.begin() + m, p.u);
    std::copy(saved.begin() + m, saved.end(), p.v);
  }
  *sigma_out = sigma;
  return it;
}

}  // namespace

template <typename T>
std::vector<int> power_iteration_batch(const std::vector<PowerIterationProblem<T>>& problems,
                                       const PowerIterationOptions& options, T* sigma) {
  const std::size_t count = problems.size();
  std::vector<int> iterations(count, 0);
  if (count == 0) return iterations;

  // Threads only pay off once there is real work: ~256K multiply-adds per thread per iteration.
  std::int64_t work = 0;
  for (const auto& p : problems) work += p.rows * p.cols;
  work *= std::max(options.n_iters, 1);
  int threads = options.n_threads;
  if (threads <= 0) {
    const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = static_cast<int>(std::min<std::int64_t>(hw, std::max<std::int64_t>(1, work / (1 << 18))));
  }
  threads = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(threads), count));

  // Largest problems first, handed out dynamically, so that one big matrix does not finish last.
  std::vector<std::size_t> order(count);
  for (std::size_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return problems[a].rows * problems[a].cols > problems[b].rows * problems[b].cols;
  });
  std::atomic<std::size_t> next{0};
  auto worker = [&]() {
    std::vector<T> scratch, saved;
    for (std::size_t k = next++; k < count; k = next++) {
      const std::size_t i = order[k];
      iterations[i] = solve_one(problems[i], options, sigma + i, scratch, saved);
    }
  };
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(threads - 1));
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
  }
  return iterations;
}

template std::vector<int> power_iteration_batch<float>(const std::vector<PowerIterationProblem<float>>&,
                                                       const PowerIterationOptions&, float*);
template std::vector<int> power_iteration_batch<double>(const std::vector<PowerIterationProblem<double>>&,
                                                        const PowerIterationOptions&, double*);

}  // namespace kexue::spectral
