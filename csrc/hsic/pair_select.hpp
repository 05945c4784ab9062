// The k-th smallest squared Euclidean distance over the pairs i < j of n points, exactly, without storing the
// n(n−1)/2 values (torch-free C++17). Used for the median-distance bandwidth.
//
// Selection by narrowing a bracket [lo, hi] of float64 bit patterns (for non-negative doubles they order like the
// values). A seeded sample of pairs (with replacement, so the count of sample values below the k-th is exactly
// Binomial) gives a bracket that holds rank k with probability 1 − 2e-9 and, up to n ≈ 100,000, few enough values
// to keep them all; each pass over all pairs then counts the
// values below lo, histograms those inside into 2^16 bins and keeps them while they fit a buffer, and narrows the
// bracket to the bin holding rank k. Typically one pass (buffer large enough) or two. A bracket that misses rank k
// (or a sample-free start) is simply widened: the result is exact either way, only the pass count changes.
#pragma once

#include <cstdint>
#include <vector>

namespace kexue::hsic {

struct PairSelectOptions {
  std::int64_t sample = 1 << 24;          // most pairs drawn for the initial bracket (0: start from the full range)
  std::int64_t buffer = 1 << 23;          // values kept in memory per pass (all threads together, 64 MB)
  std::uint64_t seed = 0x9E3779B97F4A7C15;  // the sample's seed (the result does not depend on it)
  int n_threads = 0;                      // 0: hardware concurrency
};

struct PairSelectResult {
  double value;  // the k-th smallest (0-based) squared distance
  double next;   // the (k+1)-th (== value when it repeats; +inf when k is the last rank)
  int passes;    // full passes over the pairs that were needed
};

// x: n × d row-major, n ≥ 2, 0 ≤ k < n(n−1)/2. Distances are Σ_c (x_ic − x_jc)² in double.
template <typename T>
PairSelectResult kth_pair_sq_distance(const T* x, std::int64_t n, std::int64_t d, std::int64_t k,
                                      const PairSelectOptions& options);

extern template PairSelectResult kth_pair_sq_distance<float>(const float*, std::int64_t, std::int64_t, std::int64_t,
                                                             const PairSelectOptions&);
extern template PairSelectResult kth_pair_sq_distance<double>(const double*, std::int64_t, std::int64_t,
                                                              std::int64_t, const PairSelectOptions&);

}  // namespace kexue::hsic
