#pragma once
// Build-time switches. MOE_ASSERT guards invariants inside hot loops: active in debug builds,
// compiled out with NDEBUG, and overridable by defining it before the first moe include.
#include <cassert>

#ifndef MOE_ASSERT
#  define MOE_ASSERT(cond) assert(cond)
#endif
