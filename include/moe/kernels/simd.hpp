#pragma once
// SIMD building blocks shared by the kernels (DESIGN.md §5): xsimd batches for the architecture
// the compiler targets (as Eigen does), a float exp accurate to ~1 ulp and cheaper than the
// library one, horizontal reductions and lane masks. Every kernel built on these has a scalar
// twin in kernels/scalar.hpp that the tests compare it with.
#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#include "moe/config.hpp"

#if defined(__SSE2__)
#  include <immintrin.h>
#endif

namespace moe::kernels {

template <class S>
using Batch = xsimd::batch<S>;
template <class S>
inline constexpr std::size_t width = Batch<S>::size;

// The widest native batch of S with at most n lanes (rows shorter than a full register, e.g.
// E = 8 under AVX-512, still run as one vector).
template <class S, std::size_t N>
using NarrowBatch = std::conditional_t<
    (Batch<S>::size <= N), Batch<S>,
    std::conditional_t<!std::is_void_v<xsimd::make_sized_batch_t<S, N>>, xsimd::make_sized_batch_t<S, N>,
                       xsimd::batch<S, xsimd::generic>>>;

// exp(x) for float lanes: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then Cephes' degree-6
// minimax polynomial for e^r (relative error ~1 ulp), scaled by 2^n through the exponent bits.
// Inputs below -87.3 (results under FLT_MIN) give 0, above 88.72 (past FLT_MAX) give +inf.
template <class S, class A>
MOE_INLINE xsimd::batch<S, A> exp_approx(xsimd::batch<S, A> x) {
  using B = xsimd::batch<S, A>;
  if constexpr (std::is_same_v<S, double>) {
    return xsimd::exp(x);  // double paths are for accuracy, not speed
  } else {
    using I = xsimd::batch<std::int32_t, A>;
    const B hi(88.72283f), lo(-87.33654f);
    const B xc = xsimd::min(xsimd::max(x, lo), hi);
    const B n = xsimd::nearbyint(xc * B(1.44269504088896341f));
    B r = xsimd::fnma(n, B(0.693359375f), xc);
    r = xsimd::fnma(n, B(-2.12194440e-4f), r);
    B p(1.9875691500e-4f);
    p = xsimd::fma(p, r, B(1.3981999507e-3f));
    p = xsimd::fma(p, r, B(8.3334519073e-3f));
    p = xsimd::fma(p, r, B(4.1665795894e-2f));
    p = xsimd::fma(p, r, B(1.6666665459e-1f));
    p = xsimd::fma(p, r, B(5.0000001201e-1f));
    p = xsimd::fma(p, r * r, r + B(1.0f));
    // 2^n with n <= 127 in the exponent field, times 2 for the one n = 128 near FLT_MAX
    const B n_low = xsimd::min(n, B(127.0f));
    const I bits = (xsimd::batch_cast<std::int32_t>(n_low) + I(127)) << 23;
    const B scaled = p * xsimd::bitwise_cast<B>(bits) * (B(1.0f) + (n - n_low));
    return xsimd::select(x < lo, B(0.0f), xsimd::select(x > hi, B(std::numeric_limits<float>::infinity()), scaled));
  }
}

// The same function on one value: the vector code on a broadcast, so that row tails agree with
// the vector body bit for bit.
template <std::floating_point S>
MOE_INLINE S exp_approx(S x) {
  if constexpr (std::is_same_v<S, double>) {
    return std::exp(x);
  } else {
    return exp_approx(xsimd::batch<float>(x)).get(0);
  }
}

// Largest lane.
template <class B>
MOE_INLINE typename B::value_type reduce_max(B v) {
  using S = typename B::value_type;
#if defined(__AVX512F__)
  if constexpr (sizeof(typename B::register_type) == 64) {
    if constexpr (std::is_same_v<S, float>) return _mm512_reduce_max_ps(v);
    else return _mm512_reduce_max_pd(v);
  }
#endif
  alignas(64) S lanes[B::size];
  v.store_aligned(lanes);
  S m = lanes[0];
  for (std::size_t i = 1; i < B::size; ++i) m = m < lanes[i] ? lanes[i] : m;
  return m;
}

// Bit i set iff lane i is true.
template <class T, class A>
MOE_INLINE std::uint64_t mask_bits(xsimd::batch_bool<T, A> m) {
  using R = typename xsimd::batch_bool<T, A>::register_type;
  if constexpr (sizeof(R) <= 8) {  // an AVX-512 mask register (an integer)
    return static_cast<std::uint64_t>(static_cast<R>(m));  // AVX-512 mask register
  }
#if defined(__AVX__)
  else if constexpr (sizeof(R) == 32 && std::is_same_v<T, float>) {
    return static_cast<std::uint32_t>(_mm256_movemask_ps(static_cast<R>(m)));
  } else if constexpr (sizeof(R) == 32 && std::is_same_v<T, double>) {
    return static_cast<std::uint32_t>(_mm256_movemask_pd(static_cast<R>(m)));
  }
#endif
#if defined(__SSE2__)
  else if constexpr (sizeof(R) == 16 && std::is_same_v<T, float>) {
    return static_cast<std::uint32_t>(_mm_movemask_ps(static_cast<R>(m)));
  } else if constexpr (sizeof(R) == 16 && std::is_same_v<T, double>) {
    return static_cast<std::uint32_t>(_mm_movemask_pd(static_cast<R>(m)));
  }
#endif
  else {
    bool lanes[xsimd::batch_bool<T, A>::size];
    m.store_unaligned(lanes);
    std::uint64_t bits = 0;
    for (std::size_t i = 0; i < xsimd::batch_bool<T, A>::size; ++i) bits |= std::uint64_t(lanes[i]) << i;
    return bits;
  }
}

}  // namespace moe::kernels
