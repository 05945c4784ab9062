// The SOM Gram and its backward on the CPU: see som_gram.hpp.
#include "ortho/som_gram.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_features.hpp"
#include "common/gemm.hpp"
#include "common/omp_team.hpp"
#include "common/parallel.hpp"
#include "common/simd.hpp"
#include "ortho/scaled_tanh.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define KEXUE_SOM_AVX2 1
#endif

namespace kexue {
namespace ortho {
namespace {

constexpr std::int64_t kRows = 128;       // rows per block when s = 1, positions per chunk in the backward
constexpr std::int64_t kPositions = 1024;  // positions per chunk of the forward at most (float sums, then double per
                                           // chunk; chunk_positions below)
// Samples with fewer positions than kFewPositions (7 × 7 maps and smaller) go through the backward several side by
// side, Z copied into a scratch and W out of it: its tiles otherwise ran a column block per sample, one masked vector
// for s ≤ 16. The forward's tanh takes one call per sample below kTanhPerSample, where a call per channel cost more
// than its s positions of work (its Gram already takes samples side by side). Backward of a float [4096, 64, 4]
// 6.57 / 4.19 ms against 13.7 / 11.7 before, [512, 512, 4] 17.2 / 16.8 against 81.7 / 84.7, [128, 512, 16] 14.6 /
// 15.8 against 24.4 / 24.3, [128, 256, 49] 12.4 / 10.4 against 15.9 / 12.4; forward of the [4096, 64, 4] 3.30 / 2.25
// against 5.98 / 3.69 ms; the CNN's [32, 64, 256] and [32, 32, 1024] unchanged (python -m
// kexue_fast.benchmarks.som_profile --device cpu --cpp-layers --shapes ... --compare-cores <a 7b9b7b4 build>, two runs
// at c98845b, one thread, 2-core AVX-512 Xeon VM). The forward's per-sample call at s = 49 too: [128, 256, 49]
// 10.56-10.61 ms against 10.04-10.33 in three runs, so not there ([512, 64, 25]: 1.24-1.77 against 1.51-2.01).
constexpr std::int64_t kFewPositions = 64;
constexpr std::int64_t kTanhPerSample = 32;
constexpr std::int64_t kSpanBytes = 256 << 10;  // the backward's Z scratch: up to a whole sample's, within L2
constexpr std::int64_t kStreamBytes = 1 << 20;  // ∂R/∂Y from this size up is written past the caches

// out[e] = w[e] (1 − z[e]²) for e < count, with non-temporal stores where AVX2 runs and `stream`: ∂R/∂Y as large as
// a layer's output is read again only by autograd's sum, after the backward of every later layer, so a store through
// the caches costs a read of each line first and evicts what the next chunks need. With the whole-sample spans below,
// the C++ backward in benchmarks/ortho.py's CPU step took 6.0 ms against 8.0 before both (python -m
// kexue_fast.benchmarks.som_profile --device cpu --batch 32 --steps 40 --cpp-split --compare-cores <a c647be5
// build>, interleaved step by step on a 2-core Zen 3 VM).
#ifdef KEXUE_SOM_AVX2
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// 32-byte AVX2 vectors of T, for the finishing pass below and the forward's dot tiles.
template <typename T>
struct Avx2;
template <>
struct Avx2<float> {
  typedef __m256 V;
  static constexpr int W = 8;
  __attribute__((target("avx2,fma"))) static V load(const float* p) { return _mm256_loadu_ps(p); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  __attribute__((target("avx2,fma"))) static V one_minus_square(V z) {
    return _mm256_fnmadd_ps(z, z, _mm256_set1_ps(1.0f));
  }
  __attribute__((target("avx2,fma"))) static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  __attribute__((target("avx2,fma"))) static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
};
template <>
struct Avx2<double> {
  typedef __m256d V;
  static constexpr int W = 4;
  __attribute__((target("avx2,fma"))) static V load(const double* p) { return _mm256_loadu_pd(p); }
  __attribute__((target("avx2,fma"))) static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  __attribute__((target("avx2,fma"))) static V one_minus_square(V z) {
    return _mm256_fnmadd_pd(z, z, _mm256_set1_pd(1.0));
  }
  __attribute__((target("avx2,fma"))) static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  __attribute__((target("avx2,fma"))) static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
};

template <typename T>
__attribute__((target("avx2,fma"))) void finish_stream(const T* w, const T* z, T* out, std::int64_t count) {
  typedef Avx2<T> A;
  std::int64_t e = 0;
  for (; e < count && reinterpret_cast<std::uintptr_t>(out + e) % 32 != 0; ++e) out[e] = w[e] * (T(1) - z[e] * z[e]);
  for (; e + A::W <= count; e += A::W) A::stream(out + e, A::mul(A::load(w + e), A::one_minus_square(A::load(z + e))));
  for (; e < count; ++e) out[e] = w[e] * (T(1) - z[e] * z[e]);
}
#endif

template <typename T>
KEXUE_INLINE void finish_rows(const T* w, const T* z, T* out, std::int64_t count, bool stream, bool add) {
  if (add) {
#pragma omp simd
    for (std::int64_t e = 0; e < count; ++e) out[e] += w[e] * (T(1) - z[e] * z[e]);
    return;
  }
#ifdef KEXUE_SOM_AVX2
  if (stream && has_avx2()) return finish_stream(w, z, out, count);
#else
  (void)stream;
#endif
#pragma omp simd
  for (std::int64_t e = 0; e < count; ++e) out[e] = w[e] * (T(1) - z[e] * z[e]);
}

// `count` Ts of `v` from a 64-byte boundary: each 64-byte row load of the AVX-512 tiles then touches one cache line.
// A vector's heap block (malloc's) starts 16 bytes past one wherever the allocation is mmap-sized, and then every such
// load of the forward's Gram tiles was split across two lines. Forward of a float [32, 32, 1024] read from memory:
// 0.797 ms against 0.908 before (python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --cpp-layers
// --cold --compare-cores <a de2fede build>; [32, 64, 256]: 0.664 against 0.659, no change).
template <typename T>
T* aligned_scratch(std::vector<T>& v, std::int64_t count) {
  constexpr std::int64_t pad = 64 / static_cast<std::int64_t>(sizeof(T));
  v.resize(static_cast<std::size_t>(count + pad));
  const auto at = reinterpret_cast<std::uintptr_t>(v.data());
  return reinterpret_cast<T*>((at + 63) & ~static_cast<std::uintptr_t>(63));
}

template <typename T>
std::int64_t odd_lines(std::int64_t n) {  // n rounded up to an odd number of 64-byte lines of T
  constexpr std::int64_t line = 64 / static_cast<std::int64_t>(sizeof(T));
  return (n + 2 * line - 1) / (2 * line) * (2 * line) + line;
}

// The leading dimension of a [rows, c] scratch of T read down its columns (the s = 1 layout's tiles step row by row):
// c where a row is at most 4 lines, else c rounded up to an odd number of 64-byte lines, so that consecutive rows
// fall in different L1 sets. Rows 2^k lines long map a column's rows to a few sets (c = 128 floats: 8 of 64), which
// the tiles' 128-row blocks overflowed.
template <typename T>
std::int64_t padded_rows(std::int64_t c) {
  return c <= 4 * (64 / static_cast<std::int64_t>(sizeof(T))) ? c : odd_lines<T>(c);
}

// Positions per chunk of the forward's dot tiles: kPositions, fewer where c rows of them would pass kChunkBytes (float
// c > 256, double c > 128), at least 128. Each 4-row tile pass re-reads the chunk's later rows, from L3 where the chunk
// outgrew L2 (c = 512 float: 2 MiB). Forward of a float [128, 512, 16] 10.6 / 14.7 ms against 12.8 / 15.7 with
// 1024-position chunks, [8, 512, 256] 9.5 / 13.5 against 11.5 / 14.5, [2, 512, 1024] 10.5 / 14.5 against 12.6 / 14.9
// (som_profile --cpp-layers --compare-cores <a c98845b build>, two runs at 1150f0f); float64 forward + backward of
// those layers on the C++ route 57.9, 37.4 and 39.5 ms against 65.3, 64.0 and 60.5, which had made it slower than the
// torch path (python -m kexue_fast.benchmarks.som_routes --dtype float64 at 1150f0f against 8e1a0b4, one run each).
constexpr std::int64_t kChunkBytes = 1 << 20;

template <typename T>
std::int64_t chunk_positions(std::int64_t c) {
  const std::int64_t fit = kChunkBytes / (c * static_cast<std::int64_t>(sizeof(T))) / 16 * 16;
  return std::min<std::int64_t>(kPositions, std::max<std::int64_t>(kRows, fit));
}

// Orders the non-temporal stores before the caller's later reads (another thread's, once joined).
void stream_fence(bool stream) {
#ifdef KEXUE_SOM_AVX2
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// Lines of the next chunk's input (Y, and the model's gradient where ∂R/∂Y is added into it) requested into L2 one at
// a time from inside the current chunk's tile loops: a chunk's tanh pass is the only reader of Y, so without this the
// memory sat idle while the tiles computed and each chunk's tanh pass waited for Y's lines. The forward of a float
// [32, 32, 1024] read from memory (som_profile --cpp-layers --cold, as in a training step after the model's other
// layers) took 1.18-1.20 ms without this against 0.93-0.96 with it (two runs at 6ca9130, against a 8e9bddf build;
// 0.75 ms from the caches). In the CNN step of benchmarks/ortho.py the C++ calls took 2.91 ms forward and 3.83
// backward per step against 3.43 and 4.25 (som_profile --cpp-split --compare-cores <8e9bddf build>).
// Up to two ranges, each `rows` rows of `row_bytes` bytes `stride` bytes apart. (The forward of the rows layout, s = 1,
// runs through gemm::gemm, without it.)
class Prefetch {
 public:
  void add(const void* base, std::int64_t row_bytes, std::int64_t stride, std::int64_t rows) {
    if (count_ == 2 || row_bytes <= 0 || rows <= 0) return;
    if (stride == row_bytes) {  // rows back to back: one row
      row_bytes *= rows;
      rows = 1;
    }
    range_[count_++] = {static_cast<const char*>(base), row_bytes, stride, rows};
    if (count_ == 1) start_row();
  }
  // Up to n lines of the current row, for a tile loop of n steps to request one a step without a branch of
  // bookkeeping per step (from the caches the backward of the CNN's layers took 3-9% less so; in the step no change:
  // README, "SOM in a CNN training step"); past the ranges' end `idle` (a line the caller reads anyway) stands in.
  struct Run {
    const char* at;
    std::int64_t last;
    KEXUE_INLINE void request(std::int64_t i) const {
#ifdef KEXUE_SOM_AVX2
      _mm_prefetch(at + 64 * std::min(i, last), _MM_HINT_T1);
#else
      (void)i;
#endif
    }
  };
  KEXUE_INLINE Run take(std::int64_t n, const void* idle) {
    if (n <= 0) return {static_cast<const char*>(idle), 0};
    if (cur_ >= end_) {
      if (index_ < count_) next_row();
      if (cur_ >= end_) return {static_cast<const char*>(idle), 0};
    }
    const std::int64_t lines = std::min<std::int64_t>(n, (end_ - cur_ + 63) / 64);
    const Run run{cur_, lines - 1};
    cur_ += 64 * lines;
    return run;
  }

 private:
  struct Range {
    const char* base;
    std::int64_t row_bytes, stride, rows;
  };
  void start_row() {
    const Range& r = range_[index_];
    cur_ = r.base + row_ * r.stride;
    end_ = cur_ + r.row_bytes;
  }
  __attribute__((noinline)) void next_row() {  // off the tile loops' path: rows are ≥ a few hundred lines
    if (++row_ == range_[index_].rows) {
      row_ = 0;
      if (++index_ == count_) return;
    }
    start_row();
  }
  Range range_[2] = {};
  int count_ = 0, index_ = 0;
  std::int64_t row_ = 0;
  const char* cur_ = nullptr;
  const char* end_ = nullptr;
};

#ifdef KEXUE_SOM_AVX2
// The forward's dot tiles in intrinsics, M × M: M·M accumulators and 2M operands held in registers (AVX2, M = 3: 15
// of 16; AVX-512, M = 4: 24 of 32, 64-byte rows; where torch's own convolutions run AVX-512 kernels, the AVX2 tiles made
// the SOM a larger share of a CNN step: benchmarks/results/ortho-cpu.md). GCC compiled the generic-vector 4 × 2 tiles
// below with the row loads folded into the FMAs as memory operands (a load per FMA, so the loads bound the loop); in
// the CNN step the C++ forward took 4.5 ms against 5.6 with them (the --cpp-split --compare-cores run above, against a
// 41004de build). The bodies are written once over the vector traits A (Avx2<T>, Avx512<T>) and inlined into the
// target-specific entry points upper_gram_avx2 / upper_gram_avx512, where A's intrinsics compile.
template <typename T>
struct Avx512;
template <>
struct Avx512<float> {
  typedef __m512 V;
  typedef __mmask16 M;
  static constexpr int W = 16;
  __attribute__((target("avx512f"))) static V load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  __attribute__((target("avx512f"))) static V set1(float x) { return _mm512_set1_ps(x); }
  __attribute__((target("avx512f"))) static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  __attribute__((target("avx512f"))) static void store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  __attribute__((target("avx512f"))) static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  __attribute__((target("avx512f"))) static V add(V a, V b) { return _mm512_add_ps(a, b); }
  __attribute__((target("avx512f"))) static V one_minus_square_times(V z, V w) {
    return _mm512_mul_ps(w, _mm512_fnmadd_ps(z, z, _mm512_set1_ps(1.0f)));
  }
};
template <>
struct Avx512<double> {
  typedef __m512d V;
  typedef __mmask8 M;
  static constexpr int W = 8;
  __attribute__((target("avx512f"))) static V load(const double* p) { return _mm512_loadu_pd(p); }
  __attribute__((target("avx512f"))) static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  __attribute__((target("avx512f"))) static V set1(double x) { return _mm512_set1_pd(x); }
  __attribute__((target("avx512f"))) static V load(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  __attribute__((target("avx512f"))) static void store(double* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  __attribute__((target("avx512f"))) static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  __attribute__((target("avx512f"))) static V add(V a, V b) { return _mm512_add_pd(a, b); }
  __attribute__((target("avx512f"))) static V one_minus_square_times(V z, V w) {
    return _mm512_mul_pd(w, _mm512_fnmadd_pd(z, z, _mm512_set1_pd(1.0)));
  }
};

// out[j] = the sum of v[j]'s 16 lanes, for 16 vectors: a transposing tree of 15 adds and 30 shuffles
// (pairs within 128-bit blocks, then blocks), where summing each vector's lanes one by one took 16 × 16 scalar adds.
// The forward of a float [32, 32, 1024] took 0.742 ms against 0.803, of a [32, 64, 256] 0.419 against 0.476 (python
// -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --cpp-layers --compare-cores <a 3fc4eee build>, 2-core
// AVX-512 Xeon VM; 256-position chunks in L1 instead of 1024-position ones were no faster, and slower at 64 channels).
__attribute__((target("avx512f"))) inline void sum16(const __m512* v, float* out) {
  __m512 u[8], w[4];
  for (int i = 0; i < 8; ++i)  // per block: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of a = v[2i], b = v[2i + 1]
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: the block's sums of v[4i], ..., v[4i + 3]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD)));
}

// out[i][j] = Σ_k a_i[k] b_j[k] for MI rows a_i and MJ rows b_j of length p (row stride ld); lanes summed in order
// (AVX-512 float 4 × 4 tiles: by sum16's tree), then the tail past the last full vector.
template <class A, typename T, int MI, int MJ>
__attribute__((always_inline)) inline void dot_tile_simd(std::int64_t p, const T* a, const T* b, std::int64_t ld, T* out,
                                                         std::int64_t ldo, Prefetch& pf) {
  typename A::V acc[MI][MJ];
#pragma GCC unroll 4
  for (int i = 0; i < MI; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < MJ; ++j) acc[i][j] = typename A::V{};
  const Prefetch::Run run = pf.take(p / A::W, b);
  std::int64_t k = 0;
  for (; k + A::W <= p; k += A::W) {
    run.request(k / A::W);
    typename A::V bv[MJ];
#pragma GCC unroll 4
    for (int j = 0; j < MJ; ++j) bv[j] = A::load(b + j * ld + k);
#pragma GCC unroll 4
    for (int i = 0; i < MI; ++i) {
      const typename A::V av = A::load(a + i * ld + k);
#pragma GCC unroll 4
      for (int j = 0; j < MJ; ++j) acc[i][j] = A::fma(av, bv[j], acc[i][j]);
    }
  }
  if constexpr (std::is_same<A, Avx512<float>>::value && MI == 4 && MJ == 4) {
    alignas(64) float sums[16];
    sum16(&acc[0][0], sums);
    for (int i = 0; i < MI; ++i)
      for (int j = 0; j < MJ; ++j) {
        T sum = sums[i * 4 + j];
        for (std::int64_t kk = k; kk < p; ++kk) sum += a[i * ld + kk] * b[j * ld + kk];
        out[i * ldo + j] = sum;
      }
    return;
  }
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < MJ; ++j) {
      alignas(sizeof(typename A::V)) T lanes[A::W];
      std::memcpy(lanes, &acc[i][j], sizeof(lanes));
      T sum = 0;
      for (int l = 0; l < A::W; ++l) sum += lanes[l];
      for (std::int64_t kk = k; kk < p; ++kk) sum += a[i * ld + kk] * b[j * ld + kk];
      out[i * ldo + j] = sum;
    }
}

// The tile of MI rows against mj ≤ M columns (the last column tile may be narrower).
template <class A, typename T, int M, int MI>
__attribute__((always_inline)) inline void dot_row_simd(int mj, std::int64_t p, const T* a, const T* b,
                                                        std::int64_t ld, T* out, std::int64_t ldo, Prefetch& pf) {
  if constexpr (M >= 4)
    if (mj == 4) return dot_tile_simd<A, T, MI, 4>(p, a, b, ld, out, ldo, pf);
  if (mj == 3) return dot_tile_simd<A, T, MI, 3>(p, a, b, ld, out, ldo, pf);
  if (mj == 2) return dot_tile_simd<A, T, MI, 2>(p, a, b, ld, out, ldo, pf);
  dot_tile_simd<A, T, MI, 1>(p, a, b, ld, out, ldo, pf);
}

// out [c, c] (upper triangle and the lower half of the diagonal tiles) = Z Zᵀ for Z [c, p], rows ld apart.
template <class A, typename T, int M>
__attribute__((always_inline)) inline void upper_gram_simd(const T* z, std::int64_t c, std::int64_t p, std::int64_t ld,
                                                           T* out, Prefetch& pf) {
  for (std::int64_t i0 = 0; i0 < c; i0 += M) {
    const int mi = static_cast<int>(std::min<std::int64_t>(M, c - i0));
    for (std::int64_t j0 = i0; j0 < c; j0 += M) {
      const int mj = static_cast<int>(std::min<std::int64_t>(M, c - j0));
      const T* a = z + i0 * ld;
      const T* b = z + j0 * ld;
      T* o = out + i0 * c + j0;
      if constexpr (M >= 4)
        if (mi == 4) {
          dot_row_simd<A, T, M, 4>(mj, p, a, b, ld, o, c, pf);
          continue;
        }
      if (mi == 3)
        dot_row_simd<A, T, M, 3>(mj, p, a, b, ld, o, c, pf);
      else if (mi == 2)
        dot_row_simd<A, T, M, 2>(mj, p, a, b, ld, o, c, pf);
      else
        dot_row_simd<A, T, M, 1>(mj, p, a, b, ld, o, c, pf);
    }
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void upper_gram_avx2(const T* z, std::int64_t c, std::int64_t p, std::int64_t ld,
                                                         T* out, Prefetch& pf) {
  upper_gram_simd<Avx2<T>, T, 3>(z, c, p, ld, out, pf);
}

template <typename T>
__attribute__((target("avx512f"))) void upper_gram_avx512(const T* z, std::int64_t c, std::int64_t p, std::int64_t ld,
                                                          T* out, Prefetch& pf) {
  upper_gram_simd<Avx512<T>, T, 4>(z, c, p, ld, out, pf);
}

// acc = 0 for a register tile of MR × NV vectors.
template <class A, int MR, int NV>
__attribute__((always_inline)) inline void zero_tile(typename A::V (&acc)[MR][NV]) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[i][v] = typename A::V{};
}

// The s = 1 layout's forward, AVX-512: out [c, c] (the upper triangle's tiles) = Zᵀ Z for Z [depth, c] (rows ld
// apart) by broadcast tiles, MR rows of out (Z's columns i, broadcast) × NV vectors of its columns (Z's columns j, the
// last vector's lanes masked by `last`), summed over Z's rows in order. MR = 8, NV = 3: 24 accumulators, 3 loads and
// 8 broadcasts a row for 24 FMAs, where gemm::gemm's 12 × 1-vector tiles took a load a FMA and ran its columns past the
// last full vector as scalars. Forward of a float [16384, 128] 5.50 / 4.74 ms against 7.69 / 7.43 before, [4096, 256]
// 5.05 / 5.11 against 7.68 / 7.90, [2048, 512] 11.7 / 11.4 against 19.3 / 18.8, [4096, 100] 0.95 / 1.20 against
// 2.64 / 3.68, [4096, 64] 0.37 / 0.51 against 0.42 / 0.54; the backward (A's rows padded) within −12% to +4% (two runs of
// python -m kexue_fast.benchmarks.som_profile --device cpu --cpp-layers --shapes 16384x128x1 4096x256x1 2048x512x1
// 4096x100x1 4096x64x1 --compare-cores <a ca90e97 build> at 7b9b7b4, one thread, 2-core AVX-512 Xeon VM). Neither a
// prefetch of the next block's rows from these tiles nor blocks of up to 1024 rows moved the forward; Zᵀ built by
// 16 × 16 transposes for the NCHW layout's wide layers (c ≥ 64) made their forward slower than its dot tiles (ad hoc
// builds, no figure claimed).
template <class A, typename T, int MR, int NV, bool kMasked>
__attribute__((always_inline)) inline void syrk_tile_simd(std::int64_t depth, const T* a, const T* b, std::int64_t ld,
                                                          T* out, std::int64_t ldo, typename A::M last) {
  typedef typename A::M M;
  typename A::V acc[MR][NV];
  zero_tile<A>(acc);
  for (std::int64_t k = 0; k < depth; ++k) {
    typename A::V bv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      bv[v] = kMasked && v + 1 == NV ? A::load(last, b + k * ld + v * A::W) : A::load(b + k * ld + v * A::W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const typename A::V av = A::set1(a[k * ld + i]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[i][v] = A::fma(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      A::store(out + i * ldo + v * A::W, kMasked && v + 1 == NV ? last : static_cast<M>(~M(0)), acc[i][v]);
}

// One column block j0 (NV vectors wide) against out's rows 0 .. rows − 1: tiles of 8 rows, then 4, 2, 1.
template <class A, typename T, int NV, bool kMasked>
__attribute__((always_inline)) inline void syrk_column_simd(std::int64_t depth, const T* z, std::int64_t ld,
                                                            std::int64_t j0, std::int64_t rows, T* out, std::int64_t c,
                                                            typename A::M last) {
  std::int64_t i = 0;
  for (; i + 8 <= rows; i += 8)
    syrk_tile_simd<A, T, 8, NV, kMasked>(depth, z + i, z + j0, ld, out + i * c + j0, c, last);
  if (i + 4 <= rows) {
    syrk_tile_simd<A, T, 4, NV, kMasked>(depth, z + i, z + j0, ld, out + i * c + j0, c, last);
    i += 4;
  }
  if (i + 2 <= rows) {
    syrk_tile_simd<A, T, 2, NV, kMasked>(depth, z + i, z + j0, ld, out + i * c + j0, c, last);
    i += 2;
  }
  if (i < rows) syrk_tile_simd<A, T, 1, NV, kMasked>(depth, z + i, z + j0, ld, out + i * c + j0, c, last);
}

// out [c, c]: its upper triangle (and some entries below it, in the tiles that cross the diagonal) = Zᵀ Z.
template <typename T>
__attribute__((target("avx512f"))) void upper_syrk_avx512(const T* z, std::int64_t depth, std::int64_t c,
                                                          std::int64_t ld, T* out) {
  typedef Avx512<T> A;
  typedef typename A::M M;
  constexpr std::int64_t w = 3 * A::W;
  const M all = static_cast<M>(~M(0));
  std::int64_t j0 = 0;
  for (; j0 + w <= c; j0 += w) syrk_column_simd<A, T, 3, false>(depth, z, ld, j0, j0 + w, out, c, all);
  const std::int64_t left = c - j0;
  if (left == 0) return;
  const M last = left % A::W == 0 ? all : static_cast<M>((1u << (left % A::W)) - 1);
  if (left > 2 * A::W)
    syrk_column_simd<A, T, 3, true>(depth, z, ld, j0, c, out, c, last);
  else if (left > A::W)
    syrk_column_simd<A, T, 2, true>(depth, z, ld, j0, c, out, c, last);
  else
    syrk_column_simd<A, T, 1, true>(depth, z, ld, j0, c, out, c, last);
}

// The backward's product and finishing pass in one, AVX-512: out[r][j] = (Σ_k l[r][k] v[k][j]) (1 − e[r][j]²). With
// Y read as [n, c, s]: l = A, v = e = Z_i [c, s] (r a channel, j a position); with s = 1 (rows [b, c]): l = e = a block
// of Z's rows, v = A (r a row, j a channel).
template <typename T>
struct FusedProduct {
  std::int64_t depth;  // k's range
  const T* l;
  std::int64_t ldl;
  const T* v;
  std::int64_t ldv;
  const T* e;
  std::int64_t lde;
  T* out;
  std::int64_t ldo;
  bool stream;  // non-temporal stores where whole aligned lines
  bool add;     // out += the product instead of out = it

  FusedProduct at(std::int64_t r, std::int64_t j) const {
    return {depth, l + r * ldl, ldl, v + j, ldv, e + r * lde + j, lde, out + r * ldo + j, ldo, stream, add};
  }
};

// MR rows × NV vectors of columns, the last vector's lanes masked by `last`: MR·NV accumulators held across the k
// loop (8 × 3: 24 of 32 registers), ∂R/∂Y stored from them (no W scratch written and read back). Each sum runs over
// k in order, as gemm::tile's does.
template <class A, typename T, int MR, int NV>
__attribute__((always_inline)) inline void backward_tile_simd(const FusedProduct<T>& f, typename A::M last,
                                                              Prefetch& pf) {
  typedef typename A::M M;
  typename A::V acc[MR][NV];
  zero_tile<A>(acc);
  const Prefetch::Run run = pf.take(f.depth, f.v);
  for (std::int64_t k = 0; k < f.depth; ++k) {
    run.request(k);
    typename A::V vv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v)
      vv[v] = v + 1 < NV ? A::load(f.v + k * f.ldv + v * A::W) : A::load(last, f.v + k * f.ldv + v * A::W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const typename A::V lv = A::set1(f.l[i * f.ldl + k]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[i][v] = A::fma(lv, vv[v], acc[i][v]);
    }
  }
  const bool whole = last == static_cast<M>(~M(0));
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      const M m = v + 1 < NV ? static_cast<M>(~M(0)) : last;
      T* out = f.out + i * f.ldo + v * A::W;
      typename A::V r = A::one_minus_square_times(A::load(m, f.e + i * f.lde + v * A::W), acc[i][v]);
      if (f.add) r = A::add(r, A::load(m, out));
      if (f.stream && (v + 1 < NV || whole))
        A::stream(out, r);
      else
        A::store(out, m, r);
    }
}

// Every row of one column block: tiles of 8 rows, then 4, 2, 1.
template <class A, typename T, int NV>
__attribute__((always_inline)) inline void backward_column_simd(const FusedProduct<T>& f, std::int64_t rows,
                                                                typename A::M last, Prefetch& pf) {
  std::int64_t r = 0;
  for (; r + 8 <= rows; r += 8) backward_tile_simd<A, T, 8, NV>(f.at(r, 0), last, pf);
  if (r + 4 <= rows) {
    backward_tile_simd<A, T, 4, NV>(f.at(r, 0), last, pf);
    r += 4;
  }
  if (r + 2 <= rows) {
    backward_tile_simd<A, T, 2, NV>(f.at(r, 0), last, pf);
    r += 2;
  }
  if (r < rows) backward_tile_simd<A, T, 1, NV>(f.at(r, 0), last, pf);
}

// The product over rows × columns, in column blocks of 3W (v's block of depth × 3W values, in L1 for every row tile;
// from the caches the backward of benchmarks/ortho.py's layers took 3-12% less than with 2W, in the step no change:
// README, "SOM in a CNN training step").
template <typename T>
__attribute__((target("avx512f"))) void fused_product_avx512(const FusedProduct<T>& f, std::int64_t rows,
                                                             std::int64_t columns, Prefetch& pf) {
  typedef Avx512<T> A;
  typedef typename A::M M;
  const M all = static_cast<M>(~M(0));
  std::int64_t j = 0;
  for (; j + 3 * A::W <= columns; j += 3 * A::W) backward_column_simd<A, T, 3>(f.at(0, j), rows, all, pf);
  const std::int64_t left = columns - j;
  if (left > 2 * A::W)
    backward_column_simd<A, T, 3>(f.at(0, j), rows, static_cast<M>((1u << (left - 2 * A::W)) - 1), pf);
  else if (left == 2 * A::W)
    backward_column_simd<A, T, 2>(f.at(0, j), rows, all, pf);
  else if (left > A::W)
    backward_column_simd<A, T, 2>(f.at(0, j), rows, static_cast<M>((1u << (left - A::W)) - 1), pf);
  else if (left == A::W)
    backward_column_simd<A, T, 1>(f.at(0, j), rows, all, pf);
  else if (left > 0)
    backward_column_simd<A, T, 1>(f.at(0, j), rows, static_cast<M>((1u << left) - 1), pf);
}
#endif

// 32-byte vectors for the dot tiles: MI·MJ accumulators and MI + MJ operands fit AVX2's 16 registers.
template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
};

// out[i][j] = Σ_k a_i[k] b_j[k] for MI rows a_i and MJ rows b_j of length p (row stride ld): the reduction runs along
// the rows in vectors, each accumulator summed across its lanes at the end.
template <typename T, int MI, int MJ>
KEXUE_INLINE void dot_tile(std::int64_t p, const T* a, const T* b, std::int64_t ld, T* out, std::int64_t ldo) {
  typedef typename Vec32<T>::type V;
  constexpr int W = 32 / sizeof(T);
  V acc[MI][MJ];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < MJ; ++j) acc[i][j] = V{};
  std::int64_t k = 0;
  for (; k + W <= p; k += W) {
    V av[MI], bv[MJ];
#pragma GCC unroll 16
    for (int i = 0; i < MI; ++i) std::memcpy(&av[i], a + i * ld + k, sizeof(V));
#pragma GCC unroll 16
    for (int j = 0; j < MJ; ++j) std::memcpy(&bv[j], b + j * ld + k, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MI; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < MJ; ++j) acc[i][j] += av[i] * bv[j];
  }
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < MJ; ++j) {
      T sum = 0;
      for (int l = 0; l < W; ++l) sum += acc[i][j][l];
      for (std::int64_t kk = k; kk < p; ++kk) sum += a[i * ld + kk] * b[j * ld + kk];
      out[i * ldo + j] = sum;
    }
}

// out [c, c] (upper triangle and a little more) = Z Zᵀ for Z [c, p], rows ld apart.
template <typename T>
KEXUE_INLINE void upper_gram_rows(const T* z, std::int64_t c, std::int64_t p, std::int64_t ld, T* out,
                                  Prefetch& pf) {
#ifdef KEXUE_SOM_AVX2
  if (use_avx512()) return upper_gram_avx512(z, c, p, ld, out, pf);
  if (has_avx2()) return upper_gram_avx2(z, c, p, ld, out, pf);
#else
  (void)pf;
#endif
  constexpr int MI = 4, MJ = 2;
  for (std::int64_t i0 = 0; i0 < c; i0 += MI) {
    const int mi = static_cast<int>(std::min<std::int64_t>(MI, c - i0));
    for (std::int64_t j0 = i0 / MJ * MJ; j0 < c; j0 += MJ) {
      const int mj = static_cast<int>(std::min<std::int64_t>(MJ, c - j0));
      const T* a = z + i0 * ld;
      const T* b = z + j0 * ld;
      T* o = out + i0 * c + j0;
      if (mi == MI && mj == MJ)
        dot_tile<T, MI, MJ>(p, a, b, ld, o, c);
      else
        for (int i = 0; i < mi; ++i)
          for (int j = 0; j < mj; ++j) dot_tile<T, 1, 1>(p, a + i * ld, b + j * ld, ld, o + i * c + j, c);
    }
  }
}

template <typename T>
KEXUE_SIMD_CLONES void gram_rows(const T* y, std::int64_t c, std::int64_t s, T gamma, std::int64_t i0, std::int64_t i1,
                                 std::vector<double>& gram, std::vector<T>& scratch, T* z_out) {
  // z_out: Z also stored there ([n, c, zs], rows padded: z_stride), with float's exact ±1 (the backward's 1 − Z² is 0
  // there)
  const bool exact = z_out != nullptr;
  const std::int64_t zs = z_stride(s, static_cast<std::int64_t>(sizeof(T)));  // Z's row r, position p: at r·zs + p
  auto out_at = [&](std::int64_t row, std::int64_t p) { return z_out == nullptr ? nullptr : z_out + row * zs + p; };
  const std::int64_t positions = chunk_positions<T>(c);
  const std::int64_t stride = positions + 64 / static_cast<std::int64_t>(sizeof(T));  // not a power of two
  const std::int64_t block = s == 1 ? kRows * padded_rows<T>(c) : c * stride;
  const std::int64_t bytes = static_cast<std::int64_t>(sizeof(T));
  const bool few = s > 1 && s < kTanhPerSample;
  T* z = aligned_scratch(scratch, block + c * c + (few ? c * s : 0));
  T* tile = z + block;
  T* sample = tile + c * c;  // few: one sample's Z [c, s]
  auto add_upper = [&]() {
    for (std::int64_t a = 0; a < c; ++a)
      for (std::int64_t b = a; b < c; ++b) gram[a * c + b] += tile[a * c + b];
  };
  if (s == 1) {  // rows [r, c]: G += Zᵀ Z by broadcast tiles (A = Zᵀ read with strides (1, ldz))
    constexpr std::int64_t band = 64 / static_cast<std::int64_t>(sizeof(T));  // the tiles' width of columns
    const std::int64_t ldz = padded_rows<T>(c);
    for (std::int64_t r0 = i0; r0 < i1; r0 += kRows) {
      const std::int64_t rows = std::min(kRows, i1 - r0);
      if (ldz == c)
        scaled_tanh(y + r0 * c, gamma, z, rows * c, exact, out_at(r0 * c, 0));  // s = 1: zs = 1
      else
        for (std::int64_t r = 0; r < rows; ++r)
          scaled_tanh(y + (r0 + r) * c, gamma, z + r * ldz, c, exact, out_at((r0 + r) * c, 0));
#ifdef KEXUE_SOM_AVX2
      if (use_avx512()) {
        upper_syrk_avx512<T>(z, rows, c, ldz, tile);
        add_upper();
        continue;
      }
#endif
      for (std::int64_t a0 = 0; a0 < c; a0 += band) {  // bands of G's rows from their diagonal block on: the upper
        const std::int64_t m = std::min(band, c - a0);  // triangle and the diagonal blocks, about half of Zᵀ Z
        gemm::gemm<T>(m, rows, c - a0, z + a0, 1, ldz, z + a0, ldz, tile + a0 * c + a0, c, false);
      }
      add_upper();
    }
    return;
  }
  if (s < positions) {  // several samples side by side per chunk: longer dot products, fewer lane sums and tile setups
    const std::int64_t per = positions / s;
    for (std::int64_t i = i0; i < i1; i += per) {
      const std::int64_t m = std::min(per, i1 - i);
      for (std::int64_t k = 0; k < m; ++k) {  // each sample's [c, s] block read in memory order: one stream
        if (few) {  // one call for the sample (its kept Z is [c, s] too: zs = s), then its rows put side by side
          scaled_tanh(y + (i + k) * c * s, gamma, sample, c * s, exact, out_at((i + k) * c, 0));
          for (std::int64_t ch = 0; ch < c; ++ch)
            std::memcpy(z + ch * stride + k * s, sample + ch * s, static_cast<std::size_t>(s) * sizeof(T));
          continue;
        }
        for (std::int64_t ch = 0; ch < c; ++ch)
          scaled_tanh(y + ((i + k) * c + ch) * s, gamma, z + ch * stride + k * s, s, exact,
                      out_at((i + k) * c + ch, 0));
      }
      Prefetch next;  // the next chunk's samples
      next.add(y + (i + m) * c * s, std::min(per, i1 - i - m) * c * s * bytes, 0, 1);
      upper_gram_rows(z, c, m * s, stride, tile, next);
      add_upper();
    }
    return;
  }
  for (std::int64_t i = i0; i < i1; ++i)  // G += Z_i Z_iᵀ, Z_i [c, s] in chunks of `positions` positions
    for (std::int64_t p0 = 0; p0 < s; p0 += positions) {
      const std::int64_t p = std::min(positions, s - p0);
      for (std::int64_t ch = 0; ch < c; ++ch)
        scaled_tanh(y + (i * c + ch) * s + p0, gamma, z + ch * stride, p, exact, out_at(i * c + ch, p0));
      Prefetch next;  // the next chunk's rows: this sample's next positions, else the next sample's first
      if (p0 + p < s)
        next.add(y + i * c * s + p0 + p, std::min(positions, s - p0 - p) * bytes, s * bytes, c);
      else if (i + 1 < i1)
        next.add(y + (i + 1) * c * s, std::min(positions, s) * bytes, s * bytes, c);
      upper_gram_rows(z, c, p, stride, tile, next);
      add_upper();
    }
}

template <typename T>
KEXUE_SIMD_CLONES void backward_rows(const T* y, std::int64_t c, std::int64_t s, T gamma, const T* a,
                                     std::int64_t lda, T* dy, std::int64_t i0, std::int64_t i1,
                                     std::vector<T>& scratch, bool stream, bool add, bool from_z) {
  const std::int64_t bytes = static_cast<std::int64_t>(sizeof(T));
  auto z_of = [&](const T* src, T* dst, std::int64_t count) {  // from_z: y holds Z (the forward's, exact ±1)
    if (from_z)
      std::memcpy(dst, src, static_cast<std::size_t>(count) * sizeof(T));
    else
      scaled_tanh(src, gamma, dst, count);
  };
  if (s == 1) {  // dy rows = (Z A) ⊙ (1 − Z²) (A symmetric)
    T* z = aligned_scratch(scratch, kRows * c * (add ? 2 : 1));
    for (std::int64_t r0 = i0; r0 < i1; r0 += kRows) {
      const std::int64_t rows = std::min(kRows, i1 - r0);
      T* out = dy + r0 * c;
#ifdef KEXUE_SOM_AVX2
      if (use_avx512()) {  // l = e = Z's rows, v = A: out[r][j] = (Σ_k Z[r][k] A[k][j]) (1 − Z[r][j]²)
        const T* zr = from_z ? y + r0 * c : z;  // the forward's Z read where it lies
        if (!from_z) scaled_tanh(y + r0 * c, gamma, z, rows * c);
        const std::int64_t next = std::min(kRows, i1 - r0 - rows) * c * bytes;  // the next block's rows of Y, ∂Y
        Prefetch pf;
        pf.add(y + (r0 + rows) * c, next, 0, 1);
        if (add) pf.add(dy + (r0 + rows) * c, next, 0, 1);
        fused_product_avx512<T>(FusedProduct<T>{c, zr, c, a, lda, zr, c, out, c, false, add}, rows, c, pf);
        continue;
      }
#endif
      z_of(y + r0 * c, z, rows * c);
      if (add) {  // W into the scratch's second half, then added
        T* w = z + kRows * c;
        gemm::gemm<T>(rows, c, c, z, c, 1, a, lda, w, c, false);
#pragma omp simd
        for (std::int64_t e = 0; e < rows * c; ++e) out[e] += w[e] * (T(1) - z[e] * z[e]);
        continue;
      }
      gemm::gemm<T>(rows, c, c, z, c, 1, a, lda, out, c, false);
#pragma omp simd
      for (std::int64_t e = 0; e < rows * c; ++e) out[e] *= T(1) - z[e] * z[e];
    }
    return;
  }
  // s > 1: Z_i = tanh(γY_i) [c, s] in spans of positions, the whole sample where it fits kSpanBytes (Y_i's block read
  // in memory order: one stream for the prefetcher, where chunk-sized pieces of every channel were c streams); then,
  // under AVX-512, dy = (A Z) ⊙ (1 − Z²) in one pass of register tiles (fused_product_avx512), elsewhere A Z by chunks
  // of kRows positions into a scratch w and one pass dy = w ⊙ (1 − Z²). Rows of both scratches are a non-power-of-two
  // apart (a stride such as H·W = 1024 would map the product's rows to one L1 set). from_z under AVX-512: the tiles
  // read the forward's Z in place, its rows z_stride(s) apart (padded as the scratches are), instead of a copy into
  // the padded scratch (in benchmarks/ortho.py's CPU step, H·W = 1024 and 256, an ad-hoc comparison found the copy
  // slower; no figure claimed).
  const std::int64_t pad = 64 / static_cast<std::int64_t>(sizeof(T));
  const std::int64_t ys = from_z ? z_stride(s, bytes) : s;  // y's rows: Z's kept layout, or Y's
  const std::int64_t fit = kSpanBytes / static_cast<std::int64_t>(sizeof(T)) / c;
  const std::int64_t span = s <= fit ? s : std::max<std::int64_t>(kRows, fit / kRows * kRows);
  const std::int64_t ldz = odd_lines<T>(span);
  const std::int64_t ldw = kRows + pad;
#ifdef KEXUE_SOM_AVX2
  if (s < kFewPositions && use_avx512()) {  // few positions: the samples' Z side by side, W = (A Z) ⊙ (1 − Z²) there
    const std::int64_t per = std::max<std::int64_t>(1, fit / s);
    const std::int64_t ldg = odd_lines<T>(per * s);
    T* zg = aligned_scratch(scratch, 2 * c * ldg + c * s);
    T* wg = zg + c * ldg;
    T* sample = wg + c * ldg;
    for (std::int64_t i = i0; i < i1; i += per) {
      const std::int64_t m = std::min(per, i1 - i);
      for (std::int64_t k = 0; k < m; ++k) {
        const T* zi = y + (i + k) * c * s;  // from_z: the kept Z, [c, s] (ys = s for so few positions)
        if (!from_z) {
          scaled_tanh(zi, gamma, sample, c * s);
          zi = sample;
        }
        for (std::int64_t ch = 0; ch < c; ++ch)
          std::memcpy(zg + ch * ldg + k * s, zi + ch * s, static_cast<std::size_t>(s) * sizeof(T));
      }
      Prefetch none;
      fused_product_avx512<T>(FusedProduct<T>{c, a, lda, zg, ldg, zg, ldg, wg, ldg, false, false}, c, m * s, none);
      for (std::int64_t k = 0; k < m; ++k)
        for (std::int64_t ch = 0; ch < c; ++ch) {
          T* out = dy + ((i + k) * c + ch) * s;
          const T* w = wg + ch * ldg + k * s;
          if (add)
            for (std::int64_t q = 0; q < s; ++q) out[q] += w[q];
          else
            std::memcpy(out, w, static_cast<std::size_t>(s) * sizeof(T));
        }
    }
    return;
  }
#endif
  const bool direct = from_z && use_avx512();  // the forward's Z read where it lies (rows ys apart), no copy
  T* z = direct ? nullptr : aligned_scratch(scratch, c * (ldz + ldw));  // no scratch where the tiles read Z in place
  T* w = direct ? nullptr : z + c * ldz;
  for (std::int64_t i = i0; i < i1; ++i)
    for (std::int64_t q0 = 0; q0 < s; q0 += span) {
      const std::int64_t q = std::min(span, s - q0);
      if (!direct)
        for (std::int64_t ch = 0; ch < c; ++ch) z_of(y + (i * c + ch) * ys + q0, z + ch * ldz, q);
#ifdef KEXUE_SOM_AVX2
      if (use_avx512()) {
        const T* zi = direct ? y + i * c * ys + q0 : z;
        const std::int64_t ld = direct ? ys : ldz;
        Prefetch pf;  // the next span's rows of Y (and of ∂Y where added into): this sample's, else the next sample's
        const std::int64_t next_i = q0 + q < s ? i : i + 1, next_q = q0 + q < s ? q0 + q : 0;
        if (next_i < i1) {
          const std::int64_t row = std::min(span, s - next_q) * bytes;
          pf.add(y + next_i * c * ys + next_q, row, ys * bytes, c);
          if (add) pf.add(dy + next_i * c * s + next_q, row, s * bytes, c);
        }
        const FusedProduct<T> f{c, a, lda, zi, ld, zi, ld, dy + i * c * s + q0, s, stream, add};
        fused_product_avx512<T>(f, c, q, pf);
        continue;
      }
#endif
      for (std::int64_t p0 = 0; p0 < q; p0 += kRows) {
        const std::int64_t p = std::min(kRows, q - p0);
        gemm::gemm<T>(c, c, p, a, lda, 1, z + p0, ldz, w, ldw, false);
        for (std::int64_t ch = 0; ch < c; ++ch)
          finish_rows<T>(w + ch * ldw, z + ch * ldz + p0, dy + (i * c + ch) * s + q0 + p0, p, stream, add);
      }
    }
  stream_fence(stream);
}

// The calling thread's scratch for the forward (kSlot 0) or the backward (1), kept for its next call up to
// kKeptScratchBytes (release_large frees a larger one after its call): a fresh vector each call was allocated and
// zero-filled anew, up to 266 KB a call in benchmarks/ortho.py's step. Layers of that step, read from memory: forward
// of a float [32, 64, 256] 0.626 / 0.632 ms against 0.651 / 0.661 with fresh vectors, [32, 32, 1024] 0.803 / 0.790
// against 0.805 / 0.816 (two runs of python -m kexue_fast.benchmarks.som_profile --device cpu --batch 32 --cpp-layers
// --cold --compare-cores <a 071b494 build>).
constexpr std::size_t kKeptScratchBytes = 4 << 20;

template <typename T, int kSlot>
std::vector<T>& kept_scratch() {
  thread_local std::vector<T> scratch;
  return scratch;
}

template <typename T>
void release_large(std::vector<T>& scratch) {
  if (scratch.capacity() * sizeof(T) > kKeptScratchBytes) std::vector<T>().swap(scratch);
}

// Threads over samples (rows when s = 1), each with at least ~64K elements of work: a thread costs its start-up.
int workers_for(std::int64_t n, std::int64_t c, std::int64_t s, int n_threads) {
  const std::int64_t tasks = std::max<std::int64_t>(1, std::min(n, n * c * s / (1 << 16)));
  return worker_count(n_threads, static_cast<std::size_t>(tasks));
}

}  // namespace

// In benchmarks/ortho.py's CPU step (rows of 1024 and 256 floats, both padded) the C++ backward took 2.77 / 2.75 ms
// per step against 2.84 / 2.83 with Z in Y's layout (python -m kexue_fast.benchmarks.som_profile --device cpu
// --batch 32 --steps 30 --cpp-split --compare-cores <a c527d82 build> --compare-keep-z, two runs at 774ba9b).
std::int64_t z_stride(std::int64_t s, std::int64_t elem_bytes) {
  return s > 1 && (s * elem_bytes) % 1024 == 0 ? s + 64 / elem_bytes : s;
}

template <typename T>
void som_gram(const T* y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, double* gram, int n_threads,
              T* z_out) {
  const int threads = workers_for(n, c, s, n_threads);
  std::vector<std::vector<double>> partial(static_cast<std::size_t>(threads),
                                           std::vector<double>(static_cast<std::size_t>(c * c), 0.0));
  run_team(threads, [&](int t) {
    std::vector<T>& scratch = kept_scratch<T, 0>();
    gram_rows<T>(y, c, s, static_cast<T>(gamma), n * t / threads, n * (t + 1) / threads, partial[t], scratch, z_out);
    release_large(scratch);
    stream_fence(z_out != nullptr);  // Z's non-temporal stores ordered before the backward's reads
  });
  for (std::int64_t a = 0; a < c; ++a)
    for (std::int64_t b = a; b < c; ++b) {
      double sum = 0;
      for (const auto& part : partial) sum += part[a * c + b];
      gram[a * c + b] = sum;
      gram[b * c + a] = sum;
    }
}

template <typename T>
void som_gram_backward(const T* y, std::int64_t n, std::int64_t c, std::int64_t s, double gamma, const T* a, T* dy,
                       int n_threads, bool add, bool from_z) {
  const int threads = workers_for(n, c, s, n_threads);
  // Streamed only where each row of ∂Y is whole 64-byte lines from an aligned start (so are the 128-position chunks):
  // partial lines through the write-combining buffers, c rows apart, were slower than cached stores. Backward of a
  // float [32, 16, 9001]: 7.6 ms so, 17.2 streamed, 8.4 before the spans; [128, 64, 49]: 3.2, 5.5 and 3.4 (python -m
  // kexue_fast.benchmarks.som_profile --device cpu --cpp-layers --shapes ... --compare-cores <5fa86fa and c647be5
  // builds> at 07c8f0d).
  const std::int64_t row_bytes = s * static_cast<std::int64_t>(sizeof(T));
  const bool stream = !add && n * c * row_bytes >= kStreamBytes && row_bytes % 64 == 0 &&
                      reinterpret_cast<std::uintptr_t>(dy) % 64 == 0;
  // A's rows padded where s = 1: there the tiles read A down its columns, row by row (padded_rows)
  const std::int64_t lda = s == 1 ? padded_rows<T>(c) : c;
  std::vector<T> padded;
  const T* ap = a;
  if (lda != c) {
    T* p = aligned_scratch(padded, c * lda);
    for (std::int64_t r = 0; r < c; ++r) std::memcpy(p + r * lda, a + r * c, static_cast<std::size_t>(c) * sizeof(T));
    ap = p;
  }
  run_team(threads, [&](int t) {
    std::vector<T>& scratch = kept_scratch<T, 1>();
    backward_rows<T>(y, c, s, static_cast<T>(gamma), ap, lda, dy, n * t / threads, n * (t + 1) / threads, scratch,
                     stream, add, from_z);
    release_large(scratch);
  });
}

double som_penalty(const double* gram, std::int64_t c, double gamma, double lambda1, double lambda2, double eps,
                   double* a) {
  std::vector<double> inv(static_cast<std::size_t>(c));
  for (std::int64_t i = 0; i < c; ++i) inv[i] = 1.0 / std::sqrt(std::max(gram[i * c + i], eps * eps));
  double s1 = 0, s2 = 0;
  for (std::int64_t i = 0; i < c; ++i)
    for (std::int64_t j = 0; j < c; ++j) {
      if (i == j) continue;
      const double theta = gram[i * c + j] * inv[i] * inv[j];
      s1 += theta;
      s2 += theta * theta;
    }
  if (a != nullptr) {
    // Ḡ_ij = M_ij d_i d_j off the diagonal, M_ij = 2λ₁s₁ + 2λ₂Θ_ij; Ḡ_ii = −d_i² Σ_j M_ij Θ_ij where G_ii ≥ eps²
    // (clamp_min's gradient is 0 below); A = γ(Ḡ + Ḡᵀ) = 2γḠ (G symmetric).
    for (std::int64_t i = 0; i < c; ++i) {
      double diag = 0;
      for (std::int64_t j = 0; j < c; ++j) {
        if (i == j) continue;
        const double theta = gram[i * c + j] * inv[i] * inv[j];
        const double m = 2 * lambda1 * s1 + 2 * lambda2 * theta;
        a[i * c + j] = 2 * gamma * m * inv[i] * inv[j];
        diag += m * theta;
      }
      a[i * c + i] = gram[i * c + i] >= eps * eps ? -2 * gamma * inv[i] * inv[i] * diag : 0.0;
    }
  }
  return lambda1 * s1 * s1 + lambda2 * s2;
}

template void som_gram<float>(const float*, std::int64_t, std::int64_t, std::int64_t, double, double*, int, float*);
template void som_gram<double>(const double*, std::int64_t, std::int64_t, std::int64_t, double, double*, int,
                               double*);
template void som_gram_backward<float>(const float*, std::int64_t, std::int64_t, std::int64_t, double, const float*,
                                       float*, int, bool, bool);
template void som_gram_backward<double>(const double*, std::int64_t, std::int64_t, std::int64_t, double,
                                        const double*, double*, int, bool, bool);

}  // namespace ortho
}  // namespace kexue
