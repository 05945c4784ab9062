// Batched power iteration for the largest singular value of many dense matrices (torch-free C++17).
//
// For each row-major matrix W (m x n) with start vector v, one iteration is
//     t = W v,  u = t / max(|t|, eps),  w = W^T u,  sigma = |w|,  v = w / max(sigma, eps)
// which is exactly torch.nn.utils.parametrizations.spectral_norm's update. Both products are done in ONE pass over W
// (row i gives t_i = W_i . v, then w += t_i W_i while W_i is still in cache), so W is read once per iteration.
#pragma once

#include <cstdint>
#include <vector>

namespace kexue::spectral {

template <typename T>
struct PowerIterationProblem {
  const T* weight;  // m x n, row-major, contiguous
  std::int64_t rows;
  std::int64_t cols;
  T* u;  // out: m
  T* v;  // in: start vector (any non-zero norm); out: n, unit norm
};

struct PowerIterationOptions {
  int n_iters = 1;
  double tol = -1.0;  // <= 0: run exactly n_iters; else stop once |sigma_k - sigma_{k-1}| <= tol * sigma_k
  double eps = 1e-12;
  int n_threads = 0;  // 0: choose from the problem size
};

// Runs the iteration on every problem; writes sigma[i] and returns the number of iterations each one ran.
template <typename T>
std::vector<int> power_iteration_batch(const std::vector<PowerIterationProblem<T>>& problems,
                                       const PowerIterationOptions& options, T* sigma);

extern template std::vector<int> power_iteration_batch<float>(const std::vector<PowerIterationProblem<float>>&,
                                                              const PowerIterationOptions&, float*);
extern template std::vector<int> power_iteration_batch<double>(const std::vector<PowerIterationProblem<double>>&,
                                                               const PowerIterationOptions&, double*);

}  // namespace kexue::spectral
