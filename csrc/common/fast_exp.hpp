// exp(x) for x <= 0 without a libm call or a branch, so `omp simd` loops vectorize it (torch-free, header-only).
//
// exp(x) = 2^k · e^r with k = round(x / ln 2) and r = x − k·ln 2 (Cody–Waite: ln 2 split in a high part whose
// products with |k| < 2^20 are exact and a low part), |r| ≤ ln(2)/2. e^r is its Taylor polynomial to r^13
// (remainder < 2e-16 relative) for double and Cephes' degree-7 minimax fit for float; 2^k is built in the exponent
// bits. Gram-matrix entries exp(−d²/2σ²) only need x ≤ 0; below the smallest normal result (x < −708.39 for double,
// x < −87.33 for float) the value is flushed to 0, an absolute change < 2.3e-308 (1.2e-38 for float).
#pragma once

#include <cstdint>
#include <cstring>

namespace kexue {
namespace detail {

template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

// p · 2^k from the shifted t (k in its low bits), its bits ANDed with keep (all ones, or 0 on underflow).
template <typename F, typename I, typename U, int kMantissa, int kBias>
inline F scale_and_mask(F p, F t, U keep) {
  const auto k_bits = bit_cast<I>(t);
  // the add in unsigned: a NaN's payload bits can be the signed maximum (k_bits + kBias overflowed: undefined)
  const F scale = bit_cast<F>(static_cast<U>((static_cast<U>(k_bits) + static_cast<U>(kBias)) << kMantissa));
  return bit_cast<F>(static_cast<U>(bit_cast<U>(p * scale) & keep));
}

}  // namespace detail

namespace detail {

// x = k·ln 2 + r (Cody–Waite), |r| ≤ ln(2)/2: returns e^r − 1 (the polynomial without its constant term), with t
// holding k in its low bits for scale_and_mask.
inline double reduced_expm1(double x, double& t) {
  constexpr double kShifter = 6755399441055744.0;  // 1.5·2^52: adding it rounds to an integer in the low bits
  t = x * 1.4426950408889634 + kShifter;
  const double k = t - kShifter;
  const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r;
}

inline float reduced_expm1(float x, float& t) {
  constexpr float kShifter = 12582912.0f;  // 1.5·2^23
  t = x * 1.44269504088896341f + kShifter;
  const float k = t - kShifter;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r;
}

}  // namespace detail

inline double exp_nonpositive(double x) {
  // All ones unless exp(x) < DBL_MIN. The result's bits are masked (an arithmetic AND, not a select, so AVX2 loops
  // vectorize too), which also zeroes whatever the reduction made of a huge negative x.
  const std::uint64_t keep = static_cast<std::uint64_t>(x < -708.39) - 1;
  double t;
  const double q = detail::reduced_expm1(x, t);
  return detail::scale_and_mask<double, std::int64_t, std::uint64_t, 52, 1023>(q + 1.0, t, keep);
}

inline float exp_nonpositive(float x) {
  const std::uint32_t keep = static_cast<std::uint32_t>(x < -87.33f) - 1;
  float t;
  const float q = detail::reduced_expm1(x, t);
  return detail::scale_and_mask<float, std::int32_t, std::uint32_t, 23, 127>(q + 1.0f, t, keep);
}

// expm1(x) = exp(x) − 1 for x <= 0, accurate relative to the result near 0 too (where exp(x) − 1 cancels): the
// same reduction and polynomial as exp_nonpositive without the constant term, q = e^r − 1, then 2^k·q + (2^k − 1),
// exact in the scaling for k = 0 (|x| ≤ ln(2)/2). Below the smallest normal exp, −1 (q masked too: for x = −inf the
// reduction gives NaN); NaN stays NaN.
inline double expm1_nonpositive(double x) {
  const std::uint64_t keep = static_cast<std::uint64_t>(x < -708.39) - 1;
  double t;
  const double q = detail::bit_cast<double>(detail::bit_cast<std::uint64_t>(detail::reduced_expm1(x, t)) & keep);
  const double scale = detail::scale_and_mask<double, std::int64_t, std::uint64_t, 52, 1023>(1.0, t, keep);
  return scale * q + (scale - 1.0);
}

inline float expm1_nonpositive(float x) {
  const std::uint32_t keep = static_cast<std::uint32_t>(x < -87.33f) - 1;
  float t;
  const float q = detail::bit_cast<float>(detail::bit_cast<std::uint32_t>(detail::reduced_expm1(x, t)) & keep);
  const float scale = detail::scale_and_mask<float, std::int32_t, std::uint32_t, 23, 127>(1.0f, t, keep);
  return scale * q + (scale - 1.0f);
}

}  // namespace kexue
