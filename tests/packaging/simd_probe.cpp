// Prints the SIMD target this build compiles the library for; the packaging tests check that a
// consumer given the same MOE_ARCH gets the same one.
#include <moe/kernels/simd.hpp>

#include <cstdio>

int main() { std::puts(moe::simd_target()); }
