#pragma once
// Build-time switches. MOE_ASSERT guards invariants inside hot loops: active in debug builds,
// compiled out with NDEBUG, and overridable by defining it before the first moe include.
#include <cassert>

#ifndef MOE_ASSERT
#  define MOE_ASSERT(cond) assert(cond)
#endif

// Forces inlining of the small SIMD helpers the hot loops are built from.
#if defined(__GNUC__) || defined(__clang__)
#  define MOE_INLINE inline __attribute__((always_inline))
#else
#  define MOE_INLINE inline
#endif

// Fully unrolls a loop of compile-time length over an array of SIMD registers, so the array
// stays in registers (GCC otherwise keeps it on the stack).
#if defined(__clang__)
#  define MOE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#  define MOE_UNROLL _Pragma("GCC unroll 16")
#else
#  define MOE_UNROLL
#endif

// GCC 12's AVX-512 intrinsics start from a self-initialised "undefined" register, and once they
// are inlined at -O2/-O3 GCC reports it as -Wmaybe-uninitialized (GCC bug 105593, fixed in
// GCC 13) hundreds of times in Eigen's and our kernels, failing a user's -Werror build. The
// warnings are located in the intrinsics header, so including it first with the warning off
// silences exactly those lines and nothing in anyone's own code.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13 && defined(__AVX512F__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#  pragma GCC diagnostic ignored "-Wuninitialized"
#  include <immintrin.h>
#  pragma GCC diagnostic pop
#endif
