#pragma once
// Top-p of one row (docs/selectors.md, TopPSelector): the entries in descending order, ties to
// the lowest index, until their running sum passes the mass p: after each pick the row stops if
// the sum is > p (or >= p with `reaches`), or when every entry is taken. A partial selection, not
// a sort: each pick is one pass of (row maximum, first index holding it, knock it out), the row
// held in registers (up to 16 of them). The running sum is taken in the row's type, in
// pick order. scalar::top_p_row is the twin.
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
// Writes the picks to out (expert indices) and picked (their values); returns how many.
template <class S>
Index top_p_row(const S* v, Index n, S mass, bool reaches, std::int32_t* out, S* picked) {
  S sum = 0;
  for (Index count = 0; count < n;) {
    // the best entry after the previous pick in (value desc, index asc) order
    const bool first = count == 0;
    const S pv = first ? S(0) : picked[count - 1];
    const Index pi = first ? -1 : out[count - 1];
    Index at = -1;
    S best = S(0);
    for (Index e = 0; e < n; ++e) {
      const bool after = first || v[e] < pv || (v[e] == pv && e > pi);
      if (after && (at < 0 || v[e] > best)) at = e, best = v[e];
    }
    out[count] = std::int32_t(at);
    picked[count++] = best;
    sum += best;
    if (reaches ? sum >= mass : sum > mass) return count;
  }
  return n;
}
}  // namespace scalar

namespace detail {
// A row of exactly Chunks full batches, in registers. Each pick's index comes from one 64-bit
// mask of the whole row (up to 64 entries, branch-free) or, for wider rows (E = 128 or 256 under
// AVX-512), from the first register holding the maximum. Returns -1 when the row holds -inf (the
// knock-out marker would be ambiguous): the caller then takes the twin.
template <class B, int Chunks>
Index top_p_row_registers(const float* v, float mass, bool reaches, std::int32_t* out, float* picked) {
  constexpr Index w = Index(B::size), n = Chunks * w;
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  const B knocked(lowest);
  B chunk[Chunks];
  MOE_UNROLL
  for (int c = 0; c < Chunks; ++c) chunk[c] = B::load_unaligned(v + c * w);
  float sum = 0;
  for (Index count = 0; count < n;) {
    B best = chunk[0];
    MOE_UNROLL
    for (int c = 1; c < Chunks; ++c) best = xsimd::max(best, chunk[c]);
    const B top = broadcast_max(best);
    const float value = top.get(0);
    if (value == lowest) return -1;
    // `bits`: the lanes holding the maximum, of the whole row (n <= 64) or of register `reg`
    std::uint64_t bits = 0;
    int reg = 0;
    if constexpr (n <= 64) {
      MOE_UNROLL
      for (int c = 0; c < Chunks; ++c) bits |= mask_bits(chunk[c] == top) << (c * w);
    } else {
      for (; reg < Chunks; ++reg)
        if ((bits = mask_bits(chunk[reg] == top)) != 0) break;
    }
    const std::uint64_t pick = bits & (~bits + 1);  // the lowest set bit: ties to the lowest index
    out[count] = std::int32_t(Index(reg) * w + std::countr_zero(bits));
    picked[count++] = value;
    sum += value;
    if (reaches ? sum >= mass : sum > mass) return count;
    MOE_UNROLL
    for (int c = 0; c < Chunks; ++c) {
      if constexpr (n <= 64) chunk[c] = xsimd::select(lane_mask<B>(pick >> (c * w)), knocked, chunk[c]);
      else chunk[c] = xsimd::select(lane_mask<B>(c == reg ? pick : 0), knocked, chunk[c]);
    }
  }
  return n;
}

template <class B>
Index top_p_row(const float* v, Index n, float mass, bool reaches, std::int32_t* out, float* picked) {
  constexpr Index w = Index(B::size);
  Index count = -1;
  switch (n % w == 0 && n <= 16 * w ? n / w : 0) {
    case 1: count = top_p_row_registers<B, 1>(v, mass, reaches, out, picked); break;
    case 2: count = top_p_row_registers<B, 2>(v, mass, reaches, out, picked); break;
    case 4: count = top_p_row_registers<B, 4>(v, mass, reaches, out, picked); break;
    case 8: count = top_p_row_registers<B, 8>(v, mass, reaches, out, picked); break;
    case 16: count = top_p_row_registers<B, 16>(v, mass, reaches, out, picked); break;
    default: break;
  }
  return count >= 0 ? count : scalar::top_p_row(v, n, mass, reaches, out, picked);
}
}  // namespace detail

// SIMD for float rows that fill 1, 2, 4, 8 or 16 whole registers (E = 16 to 256 with AVX-512,
// narrower batches below 16); the twin serves every other row and double.
template <class S>
Index top_p_row(const S* v, Index n, S mass, bool reaches, std::int32_t* out, S* picked) {
  if constexpr (std::is_same_v<S, float>) {
    if (n >= Index(width<float>)) return detail::top_p_row<Batch<float>>(v, n, mass, reaches, out, picked);
    if (n >= 8) return detail::top_p_row<NarrowBatch<float, 8>>(v, n, mass, reaches, out, picked);
    return detail::top_p_row<NarrowBatch<float, 4>>(v, n, mass, reaches, out, picked);
  } else {
    return scalar::top_p_row(v, n, mass, reaches, out, picked);
  }
}

}  // namespace moe::kernels
