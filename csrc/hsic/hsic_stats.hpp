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

}  // namespace kexue::hsic
