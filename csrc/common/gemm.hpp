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

// GCC's generic vectors: a tile row is 64 bytes of columns (NR), held as one 64-byte vector (one zmm register) where
// the CPU has AVX-512 and as two 32-byte vectors (two ymm) elsewhere. A plain array accumulator was neither kept in
// registers nor vectorized (4.7 against 111 GFLOP/s for [256, 32] × [32, 128]), and GCC lowered one 64-byte vector
// on an AVX2 CPU through the stack (GPRs and stores between the FMAs in the disassembly).
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};

// Whether the register tiles use 64-byte vectors: where the AVX-512 clone of KEXUE_SIMD_CLONES (common/simd.hpp) runs,
// and where no clones are built (the compiler maps the vector to its registers); read once.
inline bool wide_vectors() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12
  static const bool wide = __builtin_cpu_supports("x86-64-v4");
#else
  static const bool wide = __builtin_cpu_supports("avx512f");
#endif
  return wide;
#else
  return true;
#endif
}

// C[MR, NR] (+)= A[MR, k] · M[k, NR] for one register tile: A read with strides (rs, cs) (broadcast scalars, so a
// transposed A costs the same), M and C row-major, NR = 64 bytes of columns held in registers across the k loop (NV
// vectors of VB bytes).
template <typename T, int MR, int VB>
KEXUE_INLINE void tile(std::int64_t k, const T* a, std::int64_t rs, std::int64_t cs, const T* m, std::int64_t ldm,
                       T* c, std::int64_t ldc, bool accumulate) {
  typedef typename VecOf<T, VB>::type V;
  constexpr int NV = 64 / VB;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        __builtin_memcpy(&acc[i][v], c + i * ldc + v * W, sizeof(V));
      else
        acc[i][v] = V{};
    }
  for (std::int64_t kk = 0; kk < k; ++kk) {
    V row[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&row[v], m + kk * ldm + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const T s = a[i * rs + kk * cs];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += s * row[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(c + i * ldc + v * W, &acc[i][v], sizeof(V));
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

template <typename T, int VB>
KEXUE_INLINE void full_tiles(std::int64_t rows, std::int64_t k, std::int64_t n, const T* a, std::int64_t rs,
                             std::int64_t cs, const T* m, std::int64_t ldm, T* c, std::int64_t ldc, bool accumulate) {
  constexpr int NR = 64 / sizeof(T);
  constexpr int MR = 6;
  for (std::int64_t j0 = 0; j0 + NR <= n; j0 += NR) {
    std::int64_t i0 = 0;
    // One register of columns (AVX-512): 12 accumulators cover the FMAs' latency, where 6 do not. The SOM Gram's
    // rows-layout forward took 4.34 / 3.62 ms against 5.13 / 4.09 for [16384, 128], 0.262 / 0.260 against 0.294 / 0.289
    // for [4096, 64] (python -m kexue_fast.benchmarks.som_profile --device cpu --cpp-layers --shapes 16384x128x1
    // 4096x64x1 --compare-cores <an 831f62f build>, two runs); the flows block's steps moved within noise.
    if constexpr (VB == 64)
      for (; i0 + 12 <= rows; i0 += 12)
        tile<T, 12, VB>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + MR <= rows; i0 += MR)
      tile<T, MR, VB>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 4 <= rows; i0 += 4)
      tile<T, 4, VB>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
    for (; i0 + 2 <= rows; i0 += 2)
      tile<T, 2, VB>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
    for (; i0 < rows; ++i0) tile<T, 1, VB>(k, a + i0 * rs, rs, cs, m + j0, ldm, c + i0 * ldc + j0, ldc, accumulate);
  }
}

// C[rows, n] (+)= A[rows, k] · M[k, n]; A strided (rs, cs), M and C row-major with leading dimensions ldm, ldc.
template <typename T>
KEXUE_INLINE void gemm(std::int64_t rows, std::int64_t k, std::int64_t n, const T* a, std::int64_t rs,
                       std::int64_t cs, const T* m, std::int64_t ldm, T* c, std::int64_t ldc, bool accumulate) {
  constexpr int NR = 64 / sizeof(T);  // 64 bytes of columns
  if (wide_vectors())
    full_tiles<T, 64>(rows, k, n, a, rs, cs, m, ldm, c, ldc, accumulate);
  else
    full_tiles<T, 32>(rows, k, n, a, rs, cs, m, ldm, c, ldc, accumulate);
  const std::int64_t j0 = n / NR * NR;
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
