// Exact HSIC sufficient statistics in one pass over the pairs i < j (torch-free C++17).
//
// For Gram matrices K_ij = k(x_i, x_j), L_ij = l(y_i, y_j) it returns, without storing either matrix,
//   S_kl = Σ_{i≠j} K_ij L_ij,  S_kk = Σ_{i≠j} K_ij²,  S_ll = Σ_{i≠j} L_ij²,  r^K_i = Σ_{j≠i} K_ij,  r^L_i,
// accumulated in double. Pairs are visited by blocks of rows; threads take fixed block pairs and their partial sums
// are added in thread order, so the result is deterministic for a given thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace kexue::hsic {

enum class Kernel : int { Gaussian = 0, Laplace = 1, Imq = 2, Linear = 3, Delta = 4 };

struct KernelParams {
  Kernel kind;
  double sigma;  // unused by Linear / Delta
};

struct Stats {
  double s_kl = 0, s_kk = 0, s_ll = 0;
  std::vector<double> rk, rl;
};

// x: n × dx row-major, y: n × dy row-major (Delta: dy == 1, integer labels stored as T, exact below 2^24 for float).
// Kernel values are computed in T (float32 inputs like torch's own float32 Gram tiles) with a vectorized exp; every
// sum is accumulated in double.
template <typename T>
Stats streaming_stats(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                      KernelParams ky, int n_threads);

extern template Stats streaming_stats<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                             KernelParams, KernelParams, int);
extern template Stats streaming_stats<double>(const double*, std::int64_t, const double*, std::int64_t, std::int64_t,
                                              KernelParams, KernelParams, int);

// The backward of any estimator of the statistics above, by recomputing the Gram rows (flash-attention style).
// With a = ∂out/∂S_kl, b_k = ∂out/∂S_kk, u^K = ∂out/∂r^K (and b_l, u^L for L), each unordered pair i ≠ j carries
//   m^K_ij = 2a L_ij + 4 b_k K_ij + u^K_i + u^K_j,   and   ∂out/∂x_i += m^K_ij ∂K_ij/∂x_i
// (radial: ∂K_ij/∂x_i = φ_ij (x_i − x_j) with φ = −K/σ² gaussian, −K³/σ² imq, −K/(σ d) laplace (0 at d = 0);
// linear: ∂K_ij/∂x_i = x_j; delta: no gradient). The diagonal terms (∂/∂K_ii) are left to the caller. Sums in double,
// per-thread partial gradients added in thread order (deterministic for a given thread count).
struct GradCoefficients {
  double a = 0, b_k = 0, b_l = 0;
  const double* u_k = nullptr;  // [n]
  const double* u_l = nullptr;  // [n]
};

template <typename T>
void streaming_grad(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                    KernelParams ky, const GradCoefficients& g, double* grad_x, double* grad_y, int n_threads);

extern template void streaming_grad<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                           KernelParams, KernelParams, const GradCoefficients&, double*, double*, int);
extern template void streaming_grad<double>(const double*, std::int64_t, const double*, std::int64_t, std::int64_t,
                                            KernelParams, KernelParams, const GradCoefficients&, double*, double*,
                                            int);

// S_kl under permutations of y, for the permutation test: out[p] = Σ_{i≠j} K_ij L_{π_p(i) π_p(j)} for perms
// [P × n] (each row a permutation of 0..n−1). Each K tile is computed once and shared by every permutation; sums in
// double, per-thread partials added in thread order.
template <typename T>
void permuted_cross_sums(const T* x, std::int64_t dx, const T* y, std::int64_t dy, std::int64_t n, KernelParams kx,
                         KernelParams ky, const std::int64_t* perms, std::int64_t n_perms, double* out,
                         int n_threads);

extern template void permuted_cross_sums<float>(const float*, std::int64_t, const float*, std::int64_t, std::int64_t,
                                                KernelParams, KernelParams, const std::int64_t*, std::int64_t,
                                                double*, int);
extern template void permuted_cross_sums<double>(const double*, std::int64_t, const double*, std::int64_t,
                                                 std::int64_t, KernelParams, KernelParams, const std::int64_t*,
                                                 std::int64_t, double*, int);

}  // namespace kexue::hsic
