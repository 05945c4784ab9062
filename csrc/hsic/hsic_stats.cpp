#include "hsic/hsic_stats.hpp"

#include <algorithm>
#include <cmath>
#include <thread>

namespace kexue::hsic {
namespace {

constexpr std::int64_t kBlock = 128;

// A block of rows transposed to [d][j] so that the inner loop over j is contiguous (vectorizable).
template <typename T>
void transpose_block(const T* a, std::int64_t d, std::int64_t j0, std::int64_t j1, std::vector<double>& out) {
  const std::int64_t w = j1 - j0;
  out.resize(static_cast<std::size_t>(d * w));
  for (std::int64_t j = 0; j < w; ++j)
    for (std::int64_t c = 0; c < d; ++c) out[c * w + j] = static_cast<double>(a[(j0 + j) * d + c]);
}

// k(a_i, b_j) for one row a_i against the block b (transposed), into out[0..w).
inline void kernel_row(const double* ai, const std::vector<double>& bt, std::int64_t d, std::int64_t w,
                       KernelParams p, double* out) {
  if (p.kind == Kernel::Delta) {
    for (std::int64_t j = 0; j < w; ++j) out[j] = (bt[j] == ai[0]) ? 1.0 : 0.0;
    return;
  }
  if (p.kind == Kernel::Linear) {
    for (std::int64_t j = 0; j < w; ++j) out[j] = 0;
    for (std::int64_t c = 0; c < d; ++c) {
      const double a = ai[c];
      const double* col = bt.data() + c * w;
#pragma omp simd
      for (std::int64_t j = 0; j < w; ++j) out[j] += a * col[j];
    }
    return;
  }
  for (std::int64_t j = 0; j < w; ++j) out[j] = 0;
  for (std::int64_t c = 0; c < d; ++c) {
    const double a = ai[c];
    const double* col = bt.data() + c * w;
#pragma omp simd
    for (std::int64_t j = 0; j < w; ++j) {
      const double diff = a - col[j];
      out[j] += diff * diff;
    }
  }
  const double s = p.sigma;
  if (p.kind == Kernel::Gaussian) {
    const double scale = -0.5 / (s * s);
#pragma omp simd
    for (std::int64_t j = 0; j < w; ++j) out[j] = std::exp(out[j] * scale);
  } else if (p.kind == Kernel::Laplace) {
    const double inv = 1.0 / s;
#pragma omp simd
    for (std::int64_t j = 0; j < w; ++j) out[j] = std::exp(-std::sqrt(out[j]) * inv);
  } else {
    const double inv2 = 1.0 / (s * s);
#pragma omp simd
    for (std::int64_t j = 0; j < w; ++j) out[j] = 1.0 / std::sqrt(1.0 + out[j] * inv2);
  }
}

struct Partial {
  double s_kl = 0, s_kk = 0, s_ll = 0;
  std::vector<double> rk, rl;
};

template <typename T>
void run_blocks(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                KernelParams ky, const std::vector<std::pair<std::int64_t, std::int64_t>>& pairs, std::size_t first,
                std::size_t stride, Partial& out) {
  out.rk.assign(static_cast<std::size_t>(n), 0.0);
  out.rl.assign(static_cast<std::size_t>(n), 0.0);
  std::vector<double> xt, yt, krow(kBlock), lrow(kBlock), xi(static_cast<std::size_t>(dx)), yi(static_cast<std::size_t>(dy));
  for (std::size_t q = first; q < pairs.size(); q += stride) {
    const std::int64_t i0 = pairs[q].first, j0 = pairs[q].second;
    const std::int64_t i1 = std::min(i0 + kBlock, n), j1 = std::min(j0 + kBlock, n);
    transpose_block(x, dx, j0, j1, xt);
    transpose_block(y, dy, j0, j1, yt);
    const std::int64_t w = j1 - j0;
    for (std::int64_t i = i0; i < i1; ++i) {
      for (std::int64_t c = 0; c < dx; ++c) xi[c] = static_cast<double>(x[i * dx + c]);
      for (std::int64_t c = 0; c < dy; ++c) yi[c] = static_cast<double>(y[i * dy + c]);
      kernel_row(xi.data(), xt, dx, w, kx, krow.data());
      kernel_row(yi.data(), yt, dy, w, ky, lrow.data());
      const std::int64_t start = (i0 == j0) ? (i - j0 + 1) : 0;  // pairs i < j only
      double s_kl = 0, s_kk = 0, s_ll = 0, ri_k = 0, ri_l = 0;
      double* rkj = out.rk.data() + j0;
      double* rlj = out.rl.data() + j0;
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
}

}  // namespace

template <typename T>
Stats streaming_stats(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                      KernelParams ky, int n_threads) {
  std::vector<std::pair<std::int64_t, std::int64_t>> pairs;
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock)
    for (std::int64_t j0 = i0; j0 < n; j0 += kBlock) pairs.emplace_back(i0, j0);
  int threads = n_threads > 0 ? n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(threads), std::max<std::size_t>(1, pairs.size())));
  std::vector<Partial> partials(static_cast<std::size_t>(threads));
  if (threads == 1) {
    run_blocks(x, dx, y, dy, n, kx, ky, pairs, 0, 1, partials[0]);
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] { run_blocks(x, dx, y, dy, n, kx, ky, pairs, t, threads, partials[t]); });
    for (auto& th : pool) th.join();
  }
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
