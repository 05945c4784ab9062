// Squared Euclidean distances of one point against a block of points (torch-free, header-only).
#pragma once

#include <cstdint>
#include <vector>

namespace kexue::hsic {

// Columns per register tile: the running sums over coordinates of 16 distances stay in registers (two AVX-512 or
// four AVX2 vectors) instead of being stored and reloaded once per coordinate.
constexpr std::int64_t kLanes = 16;

inline std::int64_t padded_width(std::int64_t w) { return (w + kLanes - 1) / kLanes * kLanes; }

// Rows [j0, j1) of a (n × d, row-major) transposed to [d][padded_width(j1 − j0)] in C, the padding zero.
template <typename C, typename T>
void transpose_block(const T* a, std::int64_t d, std::int64_t j0, std::int64_t j1, std::vector<C>& out) {
  const std::int64_t w = j1 - j0, wp = padded_width(w);
  out.assign(static_cast<std::size_t>(d * wp), C(0));
  for (std::int64_t j = 0; j < w; ++j)
    for (std::int64_t c = 0; c < d; ++c) out[c * wp + j] = static_cast<C>(a[(j0 + j) * d + c]);
}

// out[j] = Σ_c (a_c − bt[c][j])² (kSquared) or Σ_c a_c · bt[c][j] for j < wp (a multiple of kLanes; entries past
// the block's width are padding).
template <bool kSquared, typename C>
inline void row_against_block(const C* a, const C* bt, std::int64_t d, std::int64_t wp, C* out) {
  for (std::int64_t jb = 0; jb < wp; jb += kLanes) {
    C acc[kLanes] = {};
    for (std::int64_t c = 0; c < d; ++c) {
      const C ac = a[c];
      const C* col = bt + c * wp + jb;
#pragma omp simd
      for (std::int64_t l = 0; l < kLanes; ++l) {
        if constexpr (kSquared) {
          const C diff = ac - col[l];
          acc[l] += diff * diff;
        } else {
          acc[l] += ac * col[l];
        }
      }
    }
#pragma omp simd
    for (std::int64_t l = 0; l < kLanes; ++l) out[jb + l] = acc[l];
  }
}

template <typename C>
inline void squared_distances(const C* a, const C* bt, std::int64_t d, std::int64_t wp, C* out) {
  row_against_block<true>(a, bt, d, wp, out);
}

// The linear kernel's row, same layout.
template <typename C>
inline void dot_products(const C* a, const C* bt, std::int64_t d, std::int64_t wp, C* out) {
  row_against_block<false>(a, bt, d, wp, out);
}

}  // namespace kexue::hsic
