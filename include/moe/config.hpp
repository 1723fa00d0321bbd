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
