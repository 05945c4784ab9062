#include <algorithm>
#include <cmath>
#include <vector>

#include "common/parallel.hpp"
#include "common/simd.hpp"
#include "hsic/hsic_stats.hpp"
#include "hsic/kernel_row.hpp"

namespace kexue::hsic {
namespace {

constexpr std::int64_t kBlock = 128;

// One side's weights w_ij = m_ij · φ_ij (radial) or m_ij (linear) for a row i against the block.
struct Side {
  const double* u;  // ∂out/∂(row sums of this side's Gram matrix)
  double b;         // ∂out/∂(Σ of its squares)
  Kernel kind;
  double sigma;
};

template <typename C>
inline void side_weights(const Side& s, double a, const C* own, const C* other, const C* sq, double u_i,
                         const double* u_j, std::int64_t start, std::int64_t w, double* out) {
  const double inv_s2 = (s.kind == Kernel::Linear || s.kind == Kernel::Delta) ? 0.0 : 1.0 / (s.sigma * s.sigma);
  const double inv_s = (s.kind == Kernel::Linear || s.kind == Kernel::Delta) ? 0.0 : 1.0 / s.sigma;
  const double two_a = 2 * a, four_b = 4 * s.b;
#pragma omp simd
  for (std::int64_t j = start; j < w; ++j) {
    const double k = own[j];
    const double m = two_a * static_cast<double>(other[j]) + four_b * k + u_i + u_j[j];
    double phi;
    if (s.kind == Kernel::Gaussian) {
      phi = -k * inv_s2;
    } else if (s.kind == Kernel::Imq) {
      phi = -k * k * k * inv_s2;
    } else if (s.kind == Kernel::Laplace) {
      const double d = std::sqrt(static_cast<double>(sq[j]));
      phi = d > 0 ? -k * inv_s / d : 0.0;
    } else {
      phi = 1.0;  // linear: ∂K_ij/∂x_i = x_j
    }
    out[j] = m * phi;
  }
}

// grad_i += Σ_j w_j (z_i − z_j) (radial) or Σ_j w_j z_j (linear); the column side into gcol[c][j].
inline void scatter(bool radial, const double* wts, const double* zi, const double* zt, std::int64_t d,
                    std::int64_t wp, std::int64_t start, std::int64_t w, double* gi, double* gcol) {
  double wsum = 0;
#pragma omp simd reduction(+ : wsum)
  for (std::int64_t j = start; j < w; ++j) wsum += wts[j];
  for (std::int64_t c = 0; c < d; ++c) {
    const double* col = zt + c * wp;
    double* gc = gcol + c * wp;
    const double zic = zi[c];
    double acc = 0;
    if (radial) {
#pragma omp simd reduction(+ : acc)
      for (std::int64_t j = start; j < w; ++j) {
        acc += wts[j] * col[j];
        gc[j] += wts[j] * (col[j] - zic);
      }
      gi[c] += wsum * zic - acc;
    } else {
#pragma omp simd reduction(+ : acc)
      for (std::int64_t j = start; j < w; ++j) {
        acc += wts[j] * col[j];
        gc[j] += wts[j] * zic;
      }
      gi[c] += acc;
    }
  }
}

struct Scratch {
  std::vector<double> xt_d, yt_d, gxcol, gycol, wx, wy, xi, yi;
};

template <typename C>
KEXUE_SIMD_CLONES void grad_block_pair(const C* x, std::int64_t dx, const C* y, std::int64_t dy, std::int64_t i0,
                                       std::int64_t i1, std::int64_t j0, std::int64_t w, const std::vector<C>& xt,
                                       const std::vector<C>& yt, KernelParams kx, KernelParams ky, const Side& sx,
                                       const Side& sy, double a, C* krow, C* lrow, C* sqx, C* sqy, Scratch& s,
                                       double* gx, double* gy) {
  const std::int64_t wp = padded_width(w);
  const C scx = kernel_scale<C>(kx), scy = kernel_scale<C>(ky);
  const bool want_x = gx != nullptr, want_y = gy != nullptr;
  for (std::int64_t i = i0; i < i1; ++i) {
    const C* xi = x + i * dx;
    const C* yi = y + i * dy;
    if (kx.kind == Kernel::Delta || kx.kind == Kernel::Linear) {
      kernel_row(xi, xt.data(), dx, wp, kx.kind, scx, krow);
    } else {
      squared_distances(xi, xt.data(), dx, wp, sqx);
      radial_kernel(sqx, wp, kx.kind, scx, krow);
    }
    if (ky.kind == Kernel::Delta || ky.kind == Kernel::Linear) {
      kernel_row(yi, yt.data(), dy, wp, ky.kind, scy, lrow);
    } else {
      squared_distances(yi, yt.data(), dy, wp, sqy);
      radial_kernel(sqy, wp, ky.kind, scy, lrow);
    }
    const std::int64_t start = (i0 == j0) ? (i - j0 + 1) : 0;
    if (want_x) {
      side_weights(sx, a, krow, lrow, sqx, sx.u[i], sx.u + j0, start, w, s.wx.data());
      for (std::int64_t c = 0; c < dx; ++c) s.xi[c] = static_cast<double>(xi[c]);
      scatter(kx.kind != Kernel::Linear, s.wx.data(), s.xi.data(), s.xt_d.data(), dx, wp, start, w, gx + i * dx,
              s.gxcol.data());
    }
    if (want_y) {
      side_weights(sy, a, lrow, krow, sqy, sy.u[i], sy.u + j0, start, w, s.wy.data());
      for (std::int64_t c = 0; c < dy; ++c) s.yi[c] = static_cast<double>(yi[c]);
      scatter(ky.kind != Kernel::Linear, s.wy.data(), s.yi.data(), s.yt_d.data(), dy, wp, start, w, gy + i * dy,
              s.gycol.data());
    }
  }
}

template <typename C>
void grad_blocks(const C* x, std::int64_t dx, const C* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                 KernelParams ky, const Side& sx, const Side& sy, double a,
                 const std::vector<std::pair<std::int64_t, std::int64_t>>& pairs, std::size_t first,
                 std::size_t stride, std::vector<double>* gx, std::vector<double>* gy) {
  if (gx) gx->assign(static_cast<std::size_t>(n * dx), 0.0);
  if (gy) gy->assign(static_cast<std::size_t>(n * dy), 0.0);
  const std::size_t wp = static_cast<std::size_t>(padded_width(kBlock));
  std::vector<C> xt, yt, krow(wp), lrow(wp), sqx(wp), sqy(wp);
  Scratch s;
  s.wx.resize(wp);
  s.wy.resize(wp);
  s.xi.resize(static_cast<std::size_t>(dx));
  s.yi.resize(static_cast<std::size_t>(dy));
  for (std::size_t q = first; q < pairs.size(); q += stride) {
    const std::int64_t i0 = pairs[q].first, j0 = pairs[q].second;
    const std::int64_t i1 = std::min(i0 + kBlock, n), j1 = std::min(j0 + kBlock, n), w = j1 - j0;
    const std::int64_t bw = padded_width(w);
    transpose_block<C>(x, dx, j0, j1, xt);
    transpose_block<C>(y, dy, j0, j1, yt);
    if (gx) {
      transpose_block<double>(x, dx, j0, j1, s.xt_d);
      s.gxcol.assign(static_cast<std::size_t>(dx * bw), 0.0);
    }
    if (gy) {
      transpose_block<double>(y, dy, j0, j1, s.yt_d);
      s.gycol.assign(static_cast<std::size_t>(dy * bw), 0.0);
    }
    grad_block_pair(x, dx, y, dy, i0, i1, j0, w, xt, yt, kx, ky, sx, sy, a, krow.data(), lrow.data(), sqx.data(),
                    sqy.data(), s, gx ? gx->data() : nullptr, gy ? gy->data() : nullptr);
    for (std::int64_t j = 0; j < w; ++j) {  // the column side of the block, back to rows
      if (gx)
        for (std::int64_t c = 0; c < dx; ++c) (*gx)[(j0 + j) * dx + c] += s.gxcol[c * bw + j];
      if (gy)
        for (std::int64_t c = 0; c < dy; ++c) (*gy)[(j0 + j) * dy + c] += s.gycol[c * bw + j];
    }
  }
}

}  // namespace

template <typename T>
void streaming_grad(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                    KernelParams ky, const GradCoefficients& g, double* grad_x, double* grad_y, int n_threads) {
  const auto pairs = upper_block_pairs(n, kBlock);
  const int threads = worker_count(n_threads, pairs.size());
  const bool want_x = grad_x != nullptr && kx.kind != Kernel::Delta;
  const bool want_y = grad_y != nullptr && ky.kind != Kernel::Delta;
  const Side sx{g.u_k, g.b_k, kx.kind, kx.sigma}, sy{g.u_l, g.b_l, ky.kind, ky.sigma};
  std::vector<std::vector<double>> gxs(static_cast<std::size_t>(threads)), gys(gxs.size());
  auto work = [&](int t) {
    grad_blocks(x, dx, y, dy, n, kx, ky, sx, sy, g.a, pairs, static_cast<std::size_t>(t),
                static_cast<std::size_t>(threads), want_x ? &gxs[t] : nullptr, want_y ? &gys[t] : nullptr);
  };
  run_workers(threads, work);
  if (grad_x) std::fill(grad_x, grad_x + n * dx, 0.0);
  if (grad_y) std::fill(grad_y, grad_y + n * dy, 0.0);
  for (int t = 0; t < threads; ++t) {  // fixed order: deterministic for a given thread count
    if (want_x)
      for (std::int64_t q = 0; q < n * dx; ++q) grad_x[q] += gxs[t][q];
    if (want_y)
      for (std::int64_t q = 0; q < n * dy; ++q) grad_y[q] += gys[t][q];
  }
}

template void streaming_grad<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                    KernelParams, KernelParams, const GradCoefficients&, double*, double*, int);
template void streaming_grad<double>(const double*, std::int64_t, const double*, std::int64_t, std::int64_t,
                                     KernelParams, KernelParams, const GradCoefficients&, double*, double*, int);

}  // namespace kexue::hsic
