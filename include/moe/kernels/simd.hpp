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
#include <utility>

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
// minimax polynomial for e^r (relative error ~1 ulp), scaled by 2^n. Results past FLT_MAX are
// +inf, results under the smallest denormal 0, NaN stays NaN.
template <class S, class A>
MOE_INLINE xsimd::batch<S, A> exp_approx(xsimd::batch<S, A> x) {
  using B = xsimd::batch<S, A>;
  if constexpr (std::is_same_v<S, double>) {
    return xsimd::exp(x);  // double paths are for accuracy, not speed
  } else {
    // Clamping keeps n finite for +-inf; max(lo, x) and min(hi, .) return x when it is NaN.
    const B xc = xsimd::min(B(89.0f), xsimd::max(B(-104.0f), x));
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
#if defined(__AVX512F__)
    // vscalefps: p * 2^n in one instruction, rounding into the denormals and to +inf itself
    if constexpr (sizeof(typename B::register_type) == 64) return B(_mm512_scalef_ps(p, n));
#endif
    // 2^n through the exponent bits, split in two factors so n from -150 to 128 stays exact
    using I = xsimd::batch<std::int32_t, A>;
    const B half = xsimd::nearbyint(n * B(0.5f));
    const auto pow2 = [](B e) { return xsimd::bitwise_cast<B>((xsimd::batch_cast<std::int32_t>(e) + I(127)) << 23); };
    return p * pow2(half) * pow2(n - half);
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

// The largest lane in every lane (stays in a register: no round trip through a scalar).
template <class B>
MOE_INLINE B broadcast_max(B v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(typename B::register_type) == 64 && std::is_same_v<typename B::value_type, float>) {
    __m512 m = v;
    m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm512_max_ps(m, _mm512_permute_ps(m, _MM_SHUFFLE(1, 0, 3, 2)));
    return B(_mm512_max_ps(m, _mm512_permute_ps(m, _MM_SHUFFLE(2, 3, 0, 1))));
  }
#endif
  return B(reduce_max(v));
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

// Lanes base[offsets[i]]: one vgatherdps under AVX-512 (xsimd 8.1 gathers lane by lane there).
template <class B, class I>
MOE_INLINE B gather(const typename B::value_type* base, I offsets) {
#if defined(__AVX512F__)
  if constexpr (sizeof(typename B::register_type) == 64 && std::is_same_v<typename B::value_type, float>)
    return B(_mm512_i32gather_ps(offsets, base, 4));
#endif
  return B::gather(base, offsets);
}

// Stores lanes to base[offsets[i]]: one vscatterdps under AVX-512 (xsimd 8.1 goes lane by lane).
template <class B, class I>
MOE_INLINE void scatter(B v, typename B::value_type* base, I offsets) {
#if defined(__AVX512F__)
  if constexpr (sizeof(typename B::register_type) == 64 && std::is_same_v<typename B::value_type, float>) {
    _mm512_i32scatter_ps(base, offsets, v, 4);
    return;
  }
#endif
  v.scatter(base, offsets);
}

// Calls f(std::integral_constant<int, n>{}) for n in [1, Max]: a run-time count becomes a
// compile-time one, so per-lane arrays of that length stay in registers. False if n is outside.
template <int Max, class F>
MOE_INLINE bool with_static_count(Index n, F&& f) {
  return [&]<int... N>(std::integer_sequence<int, N...>) {
    return ((n == N + 1 ? (f(std::integral_constant<int, N + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

// The inverse of mask_bits: lane i is true iff bit i is set.
template <class B>
MOE_INLINE auto lane_mask(std::uint64_t bits) {
  using M = xsimd::batch_bool<typename B::value_type, typename B::arch_type>;
  using R = typename M::register_type;
  if constexpr (sizeof(R) <= 8) {  // an AVX-512 mask register
    return M(static_cast<R>(bits));
  } else {  // lane i tests bit i of the (low bits of the) mask, in registers
    using V = typename B::value_type;
    using I = xsimd::batch<xsimd::as_integer_t<V>, typename B::arch_type>;
    alignas(64) xsimd::as_integer_t<V> lane_bit[B::size];
    for (std::size_t i = 0; i < B::size; ++i) lane_bit[i] = xsimd::as_integer_t<V>(1) << i;
    const I lane = I::load_aligned(lane_bit);
    return xsimd::bool_cast((I(xsimd::as_integer_t<V>(bits & ((std::uint64_t(1) << B::size) - 1))) & lane) == lane);
  }
}

}  // namespace moe::kernels
