// One row of a Gram matrix: k(a_i, b_j) against a transposed block of points (torch-free, header-only).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/fast_exp.hpp"
#include "hsic/distance_row.hpp"
#include "hsic/hsic_stats.hpp"

namespace kexue::hsic {

// The one constant each kernel needs: −1/(2σ²) gaussian, −1/σ laplace, 1/σ² imq.
template <typename C>
C kernel_scale(KernelParams p) {
  const double s = p.sigma;
  switch (p.kind) {
    case Kernel::Gaussian: return static_cast<C>(-0.5 / (s * s));
    case Kernel::Laplace: return static_cast<C>(-1.0 / s);
    case Kernel::Imq: return static_cast<C>(1.0 / (s * s));
    default: return C(0);
  }
}

// out[j] = k(d²_j) for squared distances sq[0..wp) (radial kernels; out may alias sq).
template <typename C>
inline void radial_kernel(const C* sq, std::int64_t wp, Kernel kind, C scale, C* out) {
  if (kind == Kernel::Gaussian) {
#pragma omp simd
    for (std::int64_t j = 0; j < wp; ++j) out[j] = exp_nonpositive(sq[j] * scale);
  } else if (kind == Kernel::Laplace) {
#pragma omp simd
    for (std::int64_t j = 0; j < wp; ++j) out[j] = exp_nonpositive(std::sqrt(sq[j]) * scale);
  } else {  // imq
#pragma omp simd
    for (std::int64_t j = 0; j < wp; ++j) out[j] = C(1) / std::sqrt(C(1) + sq[j] * scale);
  }
}

// k(a_i, b_j) for one row a_i against the block b (transposed, padded width wp), into out[0..wp).
template <typename C>
inline void kernel_row(const C* ai, const C* bt, std::int64_t d, std::int64_t wp, Kernel kind, C scale, C* out) {
  if (kind == Kernel::Delta) {
#pragma omp simd
    for (std::int64_t j = 0; j < wp; ++j) out[j] = (bt[j] == ai[0]) ? C(1) : C(0);
  } else if (kind == Kernel::Linear) {
    dot_products(ai, bt, d, wp, out);
  } else {
    squared_distances(ai, bt, d, wp, out);
    radial_kernel(out, wp, kind, scale, out);
  }
}

}  // namespace kexue::hsic
