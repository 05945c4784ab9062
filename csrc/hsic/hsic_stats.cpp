#include "hsic/hsic_stats.hpp"

#include <algorithm>
#include <cmath>

#include "common/parallel.hpp"
#include "common/simd.hpp"
#include "hsic/kernel_row.hpp"

namespace kexue::hsic {
namespace {

constexpr std::int64_t kBlock = 128;

struct Partial {
  double s_kl = 0, s_kk = 0, s_ll = 0;
  std::vector<double> rk, rl;
};

// The pairs of the row block [i0, i1) against the column block [j0, j1) (i < j only on a diagonal block).
template <typename C>
KEXUE_SIMD_CLONES void block_pair(const C* x, std::int64_t dx, const C* y, std::int64_t dy, std::int64_t i0,
                                  std::int64_t i1, std::int64_t j0, const C* xt, const C* yt, std::int64_t w,
                                  KernelParams kx, KernelParams ky, C* krow, C* lrow, Partial& out) {
  const C sx = kernel_scale<C>(kx), sy = kernel_scale<C>(ky);
  double* __restrict rkj = out.rk.data() + j0;
  double* __restrict rlj = out.rl.data() + j0;
  const std::int64_t wp = padded_width(w);
  for (std::int64_t i = i0; i < i1; ++i) {
    kernel_row(x + i * dx, xt, dx, wp, kx.kind, sx, krow);
    kernel_row(y + i * dy, yt, dy, wp, ky.kind, sy, lrow);
    const std::int64_t start = (i0 == j0) ? (i - j0 + 1) : 0;  // pairs i < j only
    double s_kl = 0, s_kk = 0, s_ll = 0, ri_k = 0, ri_l = 0;
#pragma omp simd reduction(+ : s_kl, s_kk, s_ll, ri_k, ri_l)
    for (std::int64_t j = start; j < w; ++j) {
      const double k = krow[j], l = lrow[j];
      s_kl += k * l;
      s_kk += k * k;
      s_ll += l * l;
      ri_k += k;
      ri_l += l;
      rkj[j] += k;
      rlj[j] += l;
    }
    out.s_kl += 2 * s_kl;  // each unordered pair stands for (i, j) and (j, i)
    out.s_kk += 2 * s_kk;
    out.s_ll += 2 * s_ll;
    out.rk[i] += ri_k;
    out.rl[i] += ri_l;
  }
}

template <typename C>
void run_blocks(const C* x, std::int64_t dx, const C* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                KernelParams ky, const std::vector<std::pair<std::int64_t, std::int64_t>>& pairs, std::size_t first,
                std::size_t stride, Partial& out) {
  out.rk.assign(static_cast<std::size_t>(n), 0.0);
  out.rl.assign(static_cast<std::size_t>(n), 0.0);
  std::vector<C> xt, yt, krow(static_cast<std::size_t>(padded_width(kBlock))), lrow(krow.size());
  for (std::size_t q = first; q < pairs.size(); q += stride) {
    const std::int64_t i0 = pairs[q].first, j0 = pairs[q].second;
    const std::int64_t i1 = std::min(i0 + kBlock, n), j1 = std::min(j0 + kBlock, n);
    transpose_block<C>(x, dx, j0, j1, xt);
    transpose_block<C>(y, dy, j0, j1, yt);
    block_pair(x, dx, y, dy, i0, i1, j0, xt.data(), yt.data(), j1 - j0, kx, ky, krow.data(), lrow.data(), out);
  }
}

}  // namespace

template <typename T>
Stats streaming_stats(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                      KernelParams ky, int n_threads) {
  const auto pairs = upper_block_pairs(n, kBlock);
  const int threads = worker_count(n_threads, pairs.size());
  std::vector<Partial> partials(static_cast<std::size_t>(threads));
  run_workers(threads, [&](int t) {
    run_blocks(x, dx, y, dy, n, kx, ky, pairs, static_cast<std::size_t>(t), static_cast<std::size_t>(threads),
               partials[static_cast<std::size_t>(t)]);
  });
  Stats out;
  out.rk.assign(static_cast<std::size_t>(n), 0.0);
  out.rl.assign(static_cast<std::size_t>(n), 0.0);
  for (const Partial& p : partials) {  // fixed order: deterministic for a given thread count
    out.s_kl += p.s_kl;
    out.s_kk += p.s_kk;
    out.s_ll += p.s_ll;
    for (std::int64_t i = 0; i < n; ++i) {
      out.rk[i] += p.rk[i];
      out.rl[i] += p.rl[i];
    }
  }
  return out;
}

template Stats streaming_stats<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                      KernelParams, KernelParams, int);
template Stats streaming_stats<double>(const double*, std::int64_t, const double*, std::int64_t, std::int64_t,
                                       KernelParams, KernelParams, int);

}  // namespace kexue::hsic
