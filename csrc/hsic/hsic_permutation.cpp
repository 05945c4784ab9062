#include <algorithm>
#include <vector>

#include "common/parallel.hpp"
#include "common/simd.hpp"
#include "hsic/hsic_stats.hpp"
#include "hsic/kernel_row.hpp"

namespace kexue::hsic {
namespace {

constexpr std::int64_t kBlock = 128;

// Σ_{j ≥ start} k[j] l[j] in double.
template <typename C>
KEXUE_SIMD_CLONES double weighted_sum(const C* k, const C* l, std::int64_t start, std::int64_t w) {
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (std::int64_t j = start; j < w; ++j) acc += static_cast<double>(k[j]) * static_cast<double>(l[j]);
  return acc;
}

// Rows perm[j0..j1) of y, transposed to [dy][padded width] like transpose_block.
template <typename C>
void gather_transposed(const C* y, std::int64_t dy, const std::int64_t* perm, std::int64_t j0, std::int64_t j1,
                       std::vector<C>& out) {
  const std::int64_t w = j1 - j0, wp = padded_width(w);
  out.assign(static_cast<std::size_t>(dy * wp), C(0));
  for (std::int64_t j = 0; j < w; ++j)
    for (std::int64_t c = 0; c < dy; ++c) out[c * wp + j] = y[perm[j0 + j] * dy + c];
}

template <typename C>
KEXUE_SIMD_CLONES void k_tile(const C* x, std::int64_t dx, std::int64_t i0, std::int64_t i1, const C* xt,
                              std::int64_t wp, KernelParams kx, C* tile) {
  const C scale = kernel_scale<C>(kx);
  for (std::int64_t i = i0; i < i1; ++i) kernel_row(x + i * dx, xt, dx, wp, kx.kind, scale, tile + (i - i0) * wp);
}

template <typename C>
KEXUE_SIMD_CLONES void l_rows(const C* y, std::int64_t dy, const std::int64_t* perm, std::int64_t i0,
                              std::int64_t i1, const C* yt, std::int64_t wp, KernelParams ky, C* lrow) {
  const C scale = kernel_scale<C>(ky);
  for (std::int64_t i = i0; i < i1; ++i)
    kernel_row(y + perm[i] * dy, yt, dy, wp, ky.kind, scale, lrow + (i - i0) * wp);
}

template <typename C>
void run(const C* x, std::int64_t dx, const C* y, std::int64_t dy, std::int64_t n, KernelParams kx, KernelParams ky,
         const std::int64_t* perms, std::int64_t n_perms, const std::vector<std::pair<std::int64_t, std::int64_t>>& pairs,
         std::size_t first, std::size_t stride, std::vector<double>& out) {
  out.assign(static_cast<std::size_t>(n_perms), 0.0);
  const std::size_t wp_max = static_cast<std::size_t>(padded_width(kBlock));
  std::vector<C> xt, yt, tile(static_cast<std::size_t>(kBlock) * wp_max), ltile(tile.size());
  for (std::size_t q = first; q < pairs.size(); q += stride) {
    const std::int64_t i0 = pairs[q].first, j0 = pairs[q].second;
    const std::int64_t i1 = std::min(i0 + kBlock, n), j1 = std::min(j0 + kBlock, n), w = j1 - j0;
    const std::int64_t wp = padded_width(w);
    transpose_block<C>(x, dx, j0, j1, xt);
    k_tile(x, dx, i0, i1, xt.data(), wp, kx, tile.data());
    for (std::int64_t p = 0; p < n_perms; ++p) {
      const std::int64_t* perm = perms + p * n;
      gather_transposed(y, dy, perm, j0, j1, yt);
      l_rows(y, dy, perm, i0, i1, yt.data(), wp, ky, ltile.data());
      double acc = 0;
      for (std::int64_t i = i0; i < i1; ++i) {
        const std::int64_t start = (i0 == j0) ? (i - j0 + 1) : 0;  // pairs i < j only
        acc += weighted_sum(tile.data() + (i - i0) * wp, ltile.data() + (i - i0) * wp, start, w);
      }
      out[static_cast<std::size_t>(p)] += 2 * acc;  // each unordered pair stands for (i, j) and (j, i)
    }
  }
}

}  // namespace

template <typename T>
void permuted_cross_sums(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                         KernelParams ky, const std::int64_t* perms, std::int64_t n_perms, double* out,
                         int n_threads) {
  const auto pairs = upper_block_pairs(n, kBlock);
  const int threads = worker_count(n_threads, pairs.size());
  std::vector<std::vector<double>> parts(static_cast<std::size_t>(threads));
  auto work = [&](int t) {
    run(x, dx, y, dy, n, kx, ky, perms, n_perms, pairs, static_cast<std::size_t>(t),
        static_cast<std::size_t>(threads), parts[static_cast<std::size_t>(t)]);
  };
  run_workers(threads, work);
  std::fill(out, out + n_perms, 0.0);
  for (const auto& part : parts)  // fixed order: deterministic for a given thread count
    for (std::int64_t p = 0; p < n_perms; ++p) out[p] += part[static_cast<std::size_t>(p)];
}

template void permuted_cross_sums<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                         KernelParams, KernelParams, const std::int64_t*, std::int64_t, double*, int);
template void permuted_cross_sums<double>(const double*, std::int64_t, const double*, std::int64_t, std::int64_t,
                                          KernelParams, KernelParams, const std::int64_t*, std::int64_t, double*,
                                          int);

}  // namespace kexue::hsic
