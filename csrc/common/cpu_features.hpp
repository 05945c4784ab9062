// Run-time choice of hand-written AVX-512 paths (torch-free, header-only).
#pragma once

#include "common/env.hpp"

namespace kexue {

// Whether the intrinsics paths written for AVX-512 (the SOM core's tanh and Gram tiles) run: where the CPU has AVX-512F
// and KEXUE_FAST_AVX512 is not "0" (or "off", "false", "no") in the environment when first asked (their AVX2 paths
// stay testable on AVX-512 machines so). Compiler-cloned loops (common/simd.hpp) pick their clone by the CPU alone.
inline bool use_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx512f") && !env_says_off("KEXUE_FAST_AVX512");
  return yes;
#else
  return false;
#endif
}

}  // namespace kexue
