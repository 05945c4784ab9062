// z = tanh(γ y) over an array, for the SOM Gram's inner loops (torch-free).
//
// float where AVX2+FMA runs (16 lanes where AVX-512F does: common/cpu_features.hpp): tanh(x) = x·P(x²)/Q(x²) on x
// clamped to ±7.905 (a degree-13/6 rational, Eigen's float tanh fit), the division as the hardware reciprocal estimate
// (12 bits, 14 on AVX-512) refined by one Newton step (the expm1 form below waits on vdivps), and ±1 exactly from |x| = 9.0109 on, where float's tanh rounds to 1 (so 1 − z² is 0 there; exact_ones): at
// most ~6 ulp relative error, beside the float32 rounding of the Gram's own sums.
// double, and float elsewhere: −sign(x)·m/(2 + m) with m = expm1(−2|x|) (common/fast_exp.hpp), ~3 ulp.
// Both keep relative accuracy near 0 (the odd numerator; expm1 instead of (1 − e)/(1 + e), which cancels), which Θ's
// column normalization needs: a column of γy ~ 1e-9 keeps its digits. NaN stays NaN, ±inf gives ±1.
#pragma once

#include <cstdint>

namespace kexue {
namespace ortho {

// exact_ones = false: the float AVX2 form may return ±(1 − 1.8e-7) where tanh rounds to ±1 (from |γy| = 7.905 on),
// 3 ulp off: enough for the forward's Gram, not for the backward's 1 − z² (which must be 0 there).
// also (optional): a second copy of z, stored past the caches where AVX-512 runs and `also` is 64-byte aligned (Z kept
// for a later pass, which the current one must not evict its working set for).
void scaled_tanh(const float* y, float gamma, float* z, std::int64_t count, bool exact_ones = true,
                 float* also = nullptr);
void scaled_tanh(const double* y, double gamma, double* z, std::int64_t count, bool exact_ones = true,
                 double* also = nullptr);

}  // namespace ortho
}  // namespace kexue
