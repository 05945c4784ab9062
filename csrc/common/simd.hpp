// Function multiversioning for the hot loops (torch-free, header-only).
//
// x86 wheels are built for the baseline ISA; clones let the loader pick AVX2+FMA or AVX-512 code on CPUs that have
// it. Inline helpers called from a cloned function are compiled once per clone, with that clone's instructions.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#if __GNUC__ >= 12
#define KEXUE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KEXUE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define KEXUE_SIMD_CLONES
#endif
