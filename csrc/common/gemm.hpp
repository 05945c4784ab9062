// Small register-tiled matrix products for the torch-free cores (header-only).
//
// Written for the shapes of one layer's rows at a time ([rows ≤ a few hundred, k ≤ a few thousand] × [k, n]), where
// calling a BLAS is not an option (no dependency) and packing would cost more than it saves. Always inlined, so a
// caller compiled with KEXUE_SIMD_CLONES gets them in its clone's instruction set (AVX2+FMA, AVX-512).
#pragma once

#include <cstdint>

#define KEXUE_INLINE inline __attribute__((always_inline))

namespace kexue {
namespace gemm {

// GCC's generic vectors: one 64-byte vector is one zmm register, two ymm or four xmm, whichever clone runs; a plain
// array accumulator was neither kept in registers nor vectorized (4.7 against 111 GFLOP/s for [256, 32] × [32, 128]).
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};

// C[MR, NR] (+)= A[MR, k] · M[k, NR] for one register tile: A read with strides (rs, cs) (broadcast scalars, so a
// transposed A costs the same), M and C row-major, NR = one vector of columns held in registers across the k loop.
template <typename T, int MR>
KEXUE_INLINE void tile(std::int64_t k, const T* a, std::int64_t rs, std::int64_t cs, const T* m, std::int64_t ldm,
                       T* c, std::int64_t ldc, bool accumulate) {
  typedef typename VecOf<T>::type V;
  V acc[MR];
  for (int i = 0; i < MR; ++i) {
    if (accumulate)
      __builtin_memcpy(&acc[i], c + i * ldc, sizeof(V));
    else
      acc[i] = V{};
  }
  for (std::int64_t kk = 0; kk < k; ++kk) {
    V row;
    __builtin_memcpy(&row, m + kk * ldm, sizeof(V));
    for (int i = 0; i < MR; ++i) acc[i] += a[i * rs + kk * cs] * row;
  }
  for (int i = 0; i < MR; ++i) __builtin_memcpy(c + i * ldc, &acc[i], sizeof(V));
}

// The columns past the last full tile (n % NR of them: all of them for D < NR).
template <typename T>
KEXUE_INLINE void tail(std::int64_t rows, std::int64_t k, std::int64_t n, const T* a, std::int64_t rs,
                       std::int64_t cs, const T* m, std::int64_t ldm, T* c, std::int64_t ldc, bool accumulate) {
  for (std::int64_t i = 0; i < rows; ++i) {
    T* ci = c + i * ldc;
    if (!accumulate)
      for (std::int64_t j = 0; j < n; ++j) ci[j] = T(0);
    for (std::int64_t kk = 0; kk < k; ++kk) {
      const T s = a[i * rs + kk * cs];
      const T* row = m + kk * ldm;
      for (std::int64_t j = 0; j < n; ++j) ci[j] += s * row[j];
    }
  }
}

// C[rows, n] (+)= A[rows, k] · M[k, n]; A strided (rs, cs), M and C row-major with leading dimensions ldm, ldc.
template <typename T>
KEXUE_INLINE void gemm(std::int64_t rows, std::int64_t k, std::int64_t n, const T* a, std::int64_t rs,
                       std::int64_t cs, const T* m, std::int64_t ldm, T* c, std::int64_t ldc, bool accumulate) {
  constexpr int NR = 64 / sizeof(T);  // one vector of columns
  constexpr int MR = 6;
  std::int64_t j0 = 0;
  for (; j0 + NR <= n; j0 += NR) {
    std::int64_t i0 = 0;
    for (; i0 + MR <= rows; i0 += MR)
      tile<T, MR>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
    for (; i0 < rows; ++i0) tile<T, 1>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
  }
  if (j0 < n) tail<T>(rows, k, n - j0, a, rs, cs, m + j0, ldm, c + j0, ldc, accumulate);
}

// C[rows, n] (+)= A[rows, k] · M[k, n] for a row-major A (lda), given M [k, n] and its transpose mt [n, k], both
// row-major: full vectors of columns by register tiles, the columns past them (all of them when n is narrower than a
// vector, e.g. D = 2) as dot products along k, which vectorize where the tile's tail would run scalar.
template <typename T>
KEXUE_INLINE void product(std::int64_t rows, std::int64_t k, std::int64_t n, const T* a, std::int64_t lda, const T* m,
                          const T* mt, T* c, std::int64_t ldc, bool accumulate) {
  constexpr int NR = 64 / sizeof(T);
  const std::int64_t full = n / NR * NR;
  if (full > 0) gemm<T>(rows, k, full, a, lda, 1, m, n, c, ldc, accumulate);
  for (std::int64_t i = 0; i < rows; ++i) {
    const T* ai = a + i * lda;
    for (std::int64_t j = full; j < n; ++j) {
      const T* mj = mt + j * k;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t kk = 0; kk < k; ++kk) sum += ai[kk] * mj[kk];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;
    }
  }
}

}  // namespace gemm
}  // namespace kexue
