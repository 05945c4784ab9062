// See scaled_tanh.hpp.
#include "ortho/scaled_tanh.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_features.hpp"
#include "common/fast_exp.hpp"
#include "common/simd.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define KEXUE_TANH_AVX2 1
#endif

namespace kexue {
namespace ortho {
namespace {

#ifdef KEXUE_TANH_AVX2
// tanh(x) = x·P(x²)/Q(x²) for |x| ≤ kClamp, held at its value there (1 − 1.8e-7) beyond it, or (kOnes) up to kOne,
// from which float's tanh is ±1 exactly: without that, 1 − z² in the backward was 3.6e-7 for every saturated unit
// where it is 0, a false gradient (tests/test_self_orthogonality.py::test_cpp_float32_gradient_of_saturated_units_is_
// zero). The forward's Gram takes the held value (3 ulp from 1) and saves the five operations.
constexpr float kClamp = 7.90531110763549805f;
constexpr float kOne = 9.010914f;  // the least float x with tanh(x) rounding to 1 in float
constexpr float kP[7] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f, 5.12229709037114e-08f,
                         1.48572235717979e-05f,  6.37261928875436e-04f, 4.89352455891786e-03f};
constexpr float kQ[4] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f, 4.89352518554385e-03f};

template <bool kOnes>
__attribute__((target("avx2,fma"))) inline __m256 tanh8(const __m256 x0) {
  // max(−c, x) then min(c, ·): vmaxps/vminps return their second operand when one is NaN, so NaN passes through
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(kClamp), _mm256_max_ps(_mm256_set1_ps(-kClamp), x0));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kP[i]));
  __m256 q = _mm256_set1_ps(kQ[0]);
  for (int i = 1; i < 4; ++i) q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kQ[i]));
  __m256 r = _mm256_rcp_ps(q);                                        // 12 bits
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(q, r, _mm256_set1_ps(2.0f)));  // one Newton step: ~23 bits
  const __m256 z = _mm256_mul_ps(x, _mm256_mul_ps(p, r));  // p·r ≈ 1 first: x·p would lose digits for subnormal x
  if constexpr (kOnes) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    // |x| ≥ kOne (±inf too; a NaN compares false and stays NaN)
    const __m256 one = _mm256_cmp_ps(_mm256_andnot_ps(sign_bit, x0), _mm256_set1_ps(kOne), _CMP_GE_OQ);
    const __m256 unit = _mm256_or_ps(_mm256_and_ps(sign_bit, x0), _mm256_set1_ps(1.0f));  // ±1 with x's sign
    return _mm256_blendv_ps(z, unit, one);
  }
  return z;
}

template <bool kOnes>
__attribute__((target("avx2,fma"))) void tanh_avx2(const float* y, float gamma, float* z, std::int64_t count) {
  const __m256 g = _mm256_set1_ps(gamma);
  std::int64_t e = 0;
  for (; e + 8 <= count; e += 8) _mm256_storeu_ps(z + e, tanh8<kOnes>(_mm256_mul_ps(g, _mm256_loadu_ps(y + e))));
  if (e < count) {  // the tail through masked loads and stores: the same formula for every element
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count - e)), lane);
    _mm256_maskstore_ps(z + e, mask, tanh8<kOnes>(_mm256_mul_ps(g, _mm256_maskload_ps(y + e, mask))));
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// The same rational on 16 lanes; the reciprocal estimate has 14 bits (rcp14), ~28 after the Newton step; the exact ±1
// by a ternary-logic sign copy and a masked move. (vrangeps would clamp in one operation, but returns the constant for
// a NaN x.)
template <bool kOnes>
__attribute__((target("avx512f"))) inline __m512 tanh16(const __m512 x0) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(kClamp), _mm512_max_ps(_mm512_set1_ps(-kClamp), x0));  // NaN kept
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(kP[i]));
  __m512 q = _mm512_set1_ps(kQ[0]);
  for (int i = 1; i < 4; ++i) q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(kQ[i]));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  const __m512 z = _mm512_mul_ps(x, _mm512_mul_ps(p, r));
  if constexpr (kOnes) {
    const __mmask16 one = _mm512_cmp_ps_mask(_mm512_abs_ps(x0), _mm512_set1_ps(kOne), _CMP_GE_OQ);
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i unit = _mm512_ternarylogic_epi32(_mm512_castps_si512(x0), sign,
                                                   _mm512_castps_si512(_mm512_set1_ps(1.0f)), 0xEA);  // (x0 & sign) | 1
    return _mm512_mask_mov_ps(z, one, _mm512_castsi512_ps(unit));
  }
  return z;
}

// kAlso: each vector also to `also` (kStream: by non-temporal stores, `also` being 64-byte aligned).
template <bool kOnes, bool kAlso = false, bool kStream = false>
__attribute__((target("avx512f"))) void tanh_avx512(const float* y, float gamma, float* z, std::int64_t count,
                                                    float* also = nullptr) {
  const __m512 g = _mm512_set1_ps(gamma);
  std::int64_t e = 0;
  for (; e + 16 <= count; e += 16) {
    const __m512 v = tanh16<kOnes>(_mm512_mul_ps(g, _mm512_loadu_ps(y + e)));
    _mm512_storeu_ps(z + e, v);
    if constexpr (kAlso && kStream) _mm512_stream_ps(also + e, v);
    if constexpr (kAlso && !kStream) _mm512_storeu_ps(also + e, v);
  }
  if (e < count) {  // the tail through masked loads and stores: the same formula for every element
    const __mmask16 mask = static_cast<__mmask16>((1u << (count - e)) - 1u);
    const __m512 v = tanh16<kOnes>(_mm512_mul_ps(g, _mm512_maskz_loadu_ps(mask, y + e)));
    _mm512_mask_storeu_ps(z + e, mask, v);
    if constexpr (kAlso) _mm512_mask_storeu_ps(also + e, mask, v);
  }
}
#endif

// tanh(t) = −sign(t) m/(2 + m), m = expm1(−2|t|) ∈ (−1, 0]: vectorizes (no libm call) and keeps relative accuracy
// near 0, where (1 − e)/(1 + e) with e = exp(−2|t|) would cancel.
template <typename T>
KEXUE_SIMD_CLONES void tanh_expm1(const T* y, T gamma, T* z, std::int64_t count) {
#pragma omp simd
  for (std::int64_t e = 0; e < count; ++e) {
    const T t = gamma * y[e];
    const T m = expm1_nonpositive(T(-2) * std::fabs(t));
    const T r = -m / (T(2) + m);
    z[e] = t < T(0) ? -r : r;
  }
}

}  // namespace

void scaled_tanh(const float* y, float gamma, float* z, std::int64_t count, bool exact_ones, float* also) {
#ifdef KEXUE_TANH_AVX2
  if (use_avx512()) {
    if (also == nullptr)
      return exact_ones ? tanh_avx512<true>(y, gamma, z, count) : tanh_avx512<false>(y, gamma, z, count);
    if (reinterpret_cast<std::uintptr_t>(also) % 64 == 0)
      return exact_ones ? tanh_avx512<true, true, true>(y, gamma, z, count, also)
                        : tanh_avx512<false, true, true>(y, gamma, z, count, also);
    return exact_ones ? tanh_avx512<true, true>(y, gamma, z, count, also)
                      : tanh_avx512<false, true>(y, gamma, z, count, also);
  }
  if (has_avx2()) {
    exact_ones ? tanh_avx2<true>(y, gamma, z, count) : tanh_avx2<false>(y, gamma, z, count);
    if (also != nullptr) std::memcpy(also, z, static_cast<std::size_t>(count) * sizeof(float));
    return;
  }
#else
  (void)exact_ones;
#endif
  tanh_expm1(y, gamma, z, count);
  if (also != nullptr) std::memcpy(also, z, static_cast<std::size_t>(count) * sizeof(float));
}

void scaled_tanh(const double* y, double gamma, double* z, std::int64_t count, bool, double* also) {
  tanh_expm1(y, gamma, z, count);
  if (also != nullptr) std::memcpy(also, z, static_cast<std::size_t>(count) * sizeof(double));
}

}  // namespace ortho
}  // namespace kexue
