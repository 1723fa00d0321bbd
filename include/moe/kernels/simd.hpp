#pragma once
// SIMD building blocks shared by the kernels (docs/architecture.md, Layout): xsimd batches for the
// architecture the compiler targets (as Eigen does), a float exp accurate to ~1 ulp and cheaper
// than the library one, horizontal reductions and lane masks. Every kernel built on these has a
// scalar twin (in the kernel's own `scalar` namespace) that the tests compare it with.
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include <xsimd/xsimd.hpp>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"

#if defined(__SSE2__)
#  include <immintrin.h>
#endif

namespace moe {
// The instruction set the kernels were compiled for in this translation unit, as xsimd names it
// ("avx512bw", "fma3+avx2", "sse2", ...). It follows the compiler flags (-march, MOE_ARCH), not
// the processor the program runs on.
inline const char* simd_target() noexcept { return xsimd::default_arch::name(); }
}  // namespace moe

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
// NonPositive: the caller guarantees x <= 0 or NaN (softmax's x - max), so no upper clamp.
template <bool NonPositive = false, class S, class A>
MOE_INLINE xsimd::batch<S, A> exp_approx(xsimd::batch<S, A> x) {
  using B = xsimd::batch<S, A>;
  if constexpr (std::is_same_v<S, double>) {
    return xsimd::exp(x);  // double paths are for accuracy, not speed
  } else {
    // Clamping keeps n finite for +-inf; max(lo, x) and min(hi, .) return x when it is NaN.
    const B low = xsimd::max(B(-104.0f), x);
    const B xc = NonPositive ? low : xsimd::min(B(89.0f), low);
    const B n = xsimd::nearbyint(xc * B(1.44269504088896341f));
    // x - n ln2 as fma(n, -c, x): xsimd's fnma would negate n first, an extra instruction
    B r = xsimd::fma(n, B(-0.693359375f), xc);
    r = xsimd::fma(n, B(2.12194440e-4f), r);
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

// Stores v at p past the caches (a non-temporal store) when p is aligned to the register: the
// line is written whole, so nothing is read for ownership, and an output larger than the caches
// does not evict what is still to be read. An ordinary store otherwise. A kernel that streams
// ends with stream_fence(), which orders these stores before any later one (another thread's
// reads after the parallel loop's barrier see them).
template <class B>
MOE_INLINE void stream_store(B v, typename B::value_type* p) {
  using S = typename B::value_type;
  using R = typename B::register_type;
  [[maybe_unused]] const bool aligned = reinterpret_cast<std::uintptr_t>(p) % sizeof(R) == 0;
#if defined(__AVX512F__)
  if constexpr (sizeof(R) == 64) {
    if (aligned) {
      if constexpr (std::is_same_v<S, float>) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
      return;
    }
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(R) == 32 && std::is_floating_point_v<S>) {
    if (aligned) {
      if constexpr (std::is_same_v<S, float>) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
      return;
    }
  }
#endif
#if defined(__SSE2__)
  if constexpr (sizeof(R) == 16 && std::is_floating_point_v<S>) {
    if (aligned) {
      if constexpr (std::is_same_v<S, float>) _mm_stream_ps(p, v); else _mm_stream_pd(p, v);
      return;
    }
  }
#endif
  v.store_unaligned(p);
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Hints for every 64-byte line of the `bytes` from `offset` past p: to read, or (Write) to be
// written, fetched for ownership into L2. The range may lie past the end of p's array: the
// addresses are formed as integers, and a prefetch never faults.
template <bool Write = false>
MOE_INLINE void prefetch_lines(const void* p, std::ptrdiff_t offset, std::ptrdiff_t bytes) {
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(offset);
  for (std::ptrdiff_t b = 0; b < bytes; b += 64) {
    const void* line = reinterpret_cast<const void*>(first + std::uintptr_t(b));
    if constexpr (Write) __builtin_prefetch(line, 1, 2);
    else __builtin_prefetch(line, 0, 3);
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

namespace detail {
// The in-register transpose of 16 rows of N floats (N = 2^b, b <= 4) into N registers of 16
// lanes: b stages of two-source permutes. Stage s pairs the registers that differ in bit s and
// swaps that bit with lane bit s (the column bit s); the last stage also puts the lanes in row
// order. The index vectors come from following every element's position through the stages.
template <int N>
struct TransposePlan {
  static constexpr int lanes = 16, bits = std::countr_zero(unsigned(N));
  using Layout = std::array<std::array<int, lanes>, N>;  // flat element index per register, lane
  std::array<std::array<std::array<std::int32_t, lanes>, N>, bits> to_columns{}, to_rows{};

  static constexpr Layout layout(int stage) {  // after `stage` stages
    Layout l{};
    for (int r = 0; r < N; ++r)
      for (int i = 0; i < lanes; ++i) {
        int p = r * lanes + i;
        if (stage == bits) {
          p = i * N + r;  // register r is column r, lane i is row i
        } else {
          for (int s = 0; s < stage; ++s)  // swap register bit s (position bit 4+s) with lane bit s
            if (((p >> s) & 1) != ((p >> (4 + s)) & 1)) p ^= (1 << s) | (1 << (4 + s));
        }
        l[r][i] = p;
      }
    return l;
  }
  // Index vectors that turn layout `from` into `to`, taking register r from the pair (r without,
  // r with bit s): lane j of the first source is index j, of the second 16 + j.
  // (Through where each element sits in `from`: a search per lane takes clang's constexpr
  // evaluation past its step limit at N = 16.)
  static constexpr void plan(const Layout& from, const Layout& to, int s,
                             std::array<std::array<std::int32_t, lanes>, N>& idx) {
    std::array<int, N * lanes> where{};  // element -> register * lanes + lane in `from`
    for (int r = 0; r < N; ++r)
      for (int j = 0; j < lanes; ++j) where[std::size_t(from[r][j])] = r * lanes + j;
    for (int r = 0; r < N; ++r)
      for (int i = 0; i < lanes; ++i) {
        const int at = where[std::size_t(to[r][i])], reg = at / lanes;
        MOE_ASSERT((reg | (1 << s)) == (r | (1 << s)));  // one of the pair
        idx[r][i] = std::int32_t((reg == (r | (1 << s)) ? lanes : 0) + at % lanes);
      }
  }
  constexpr TransposePlan() {
    for (int s = 0; s < bits; ++s) {
      plan(layout(s), layout(s + 1), s, to_columns[s]);
      plan(layout(s + 1), layout(s), s, to_rows[s]);
    }
  }
};
}  // namespace detail

// A block of `width` consecutive rows of N values (row stride `stride`) seen as N batches, one
// per column: lane i of column e is row i's entry e. Kernels for rows shorter than a register
// work across rows this way. Contiguous rows of 1, 2, 4, 8 or 16 floats under AVX-512 are
// transposed in registers (N log2 N permutes each way); any other block goes through gathers and
// scatters.
template <class B, int N>
class RowBlock {
  using S = typename B::value_type;
  using I = xsimd::batch<xsimd::as_integer_t<S>, typename B::arch_type>;

public:
  explicit RowBlock(Index stride) : usable_(stride * Index(B::size) <= std::numeric_limits<xsimd::as_integer_t<S>>::max()) {
    alignas(64) xsimd::as_integer_t<S> offsets[B::size];
    for (std::size_t i = 0; i < B::size; ++i) offsets[i] = xsimd::as_integer_t<S>(usable_ ? Index(i) * stride : 0);
    offsets_ = I::load_aligned(offsets);
#if defined(__AVX512F__)
    transpose_ = transposable && stride == N;
#endif
  }
  // False when the lane offsets overflow the index type: the caller takes a row-by-row path.
  bool usable() const { return usable_; }

  MOE_INLINE void load(const S* first, B (&col)[N]) const {
#if defined(__AVX512F__)
    if constexpr (transposable) {
      if (transpose_) {
        __m512 z[N];
        MOE_UNROLL
        for (int r = 0; r < N; ++r) z[r] = _mm512_loadu_ps(first + 16 * r);
        permute(z, plan_.to_columns);
        MOE_UNROLL
        for (int r = 0; r < N; ++r) col[r] = B(z[r]);
        return;
      }
    }
#endif
    MOE_UNROLL
    for (int e = 0; e < N; ++e) col[e] = column(first, e);
  }

  MOE_INLINE void store(const B (&col)[N], S* first) const {
#if defined(__AVX512F__)
    if constexpr (transposable) {
      if (transpose_) {
        __m512 z[N];
        MOE_UNROLL
        for (int r = 0; r < N; ++r) z[r] = col[r];
        permute<true>(z, plan_.to_rows);
        MOE_UNROLL
        for (int r = 0; r < N; ++r) _mm512_storeu_ps(first + 16 * r, z[r]);
        return;
      }
    }
#endif
    MOE_UNROLL
    for (int e = 0; e < N; ++e) scatter(col[e], first + e, offsets_);
  }

  // One column of the block (a gather).
  MOE_INLINE B column(const S* first, Index e) const { return gather<B>(first + e, offsets_); }

private:
#if defined(__AVX512F__)
  static constexpr bool transposable = std::is_same_v<S, float> && B::size == 16 && N <= 16 && (N & (N - 1)) == 0;
  static constexpr detail::TransposePlan<transposable ? N : 1> plan_{};
  // Runs the stages in order (to columns) or in reverse (back to rows).
  template <bool Reverse = false, class Plan>
  MOE_INLINE static void permute(__m512 (&z)[N], const Plan& idx) {
    constexpr int bits = int(std::tuple_size_v<Plan>);
    MOE_UNROLL
    for (int k = 0; k < bits; ++k) {
      const int s = Reverse ? bits - 1 - k : k;
      __m512 y[N];
      MOE_UNROLL
      for (int r = 0; r < N; ++r)
        y[r] = _mm512_permutex2var_ps(z[r & ~(1 << s)], _mm512_loadu_si512(idx[s][r].data()), z[r | (1 << s)]);
      MOE_UNROLL
      for (int r = 0; r < N; ++r) z[r] = y[r];
    }
  }
#endif
  bool usable_;
  bool transpose_ = false;
  I offsets_;
};

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
