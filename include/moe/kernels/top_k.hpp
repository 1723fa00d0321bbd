#pragma once
// Top-k of one row: indices of the k largest values in descending order, ties broken to the
// lowest index (DESIGN.md §6). The SIMD kernel takes k vectorised passes (maximum, first index
// holding it, knock it out); scalar::top_k_row, an insertion into a sorted run of k, is its twin.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void top_k_row(const S* values, Index n, Index k, std::int32_t* out) {
  MOE_ASSERT(k <= n);
  if (k <= 0) return;  // a token that chooses nothing (dynamic k)
  Index filled = 0;
  for (Index e = 0; e < n; ++e) {
    const S v = values[e];
    if (filled == k && !(v > values[out[k - 1]])) continue;  // strict: an equal later index loses
    Index pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > values[out[pos - 1]]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<std::int32_t>(e);
  }
}
}  // namespace scalar

namespace detail {
// Lane indices 0, 1, ..., size-1 as floats (exact far beyond any expert count).
template <class B>
MOE_INLINE B lane_index() {
  alignas(64) float lanes[B::size];
  for (std::size_t i = 0; i < B::size; ++i) lanes[i] = float(i);
  return B::load_aligned(lanes);
}

// Rows of exactly Chunks full batches stay in registers: k passes of (row maximum, lowest index
// holding it, knock it out with -inf), no memory traffic and no branch on the data. A row that
// holds -inf itself takes the scalar twin (the knock-out marker would be ambiguous).
template <class B, int Chunks>
void top_k_row_registers(const float* v, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  const B knocked(-std::numeric_limits<float>::infinity());
  const B lanes = lane_index<B>();
  B chunk[Chunks];
  for (int c = 0; c < Chunks; ++c) chunk[c] = B::load_unaligned(v + c * w);
  for (Index j = 0; j < k; ++j) {
    B best = chunk[0];
    for (int c = 1; c < Chunks; ++c) best = xsimd::max(best, chunk[c]);
    const float top = reduce_max(best);
    if (top == -std::numeric_limits<float>::infinity()) return scalar::top_k_row(v, Index(Chunks) * w, k, out);
    Index at = -1;
    if constexpr (Chunks * w <= 64) {
      std::uint64_t bits = 0;
      for (int c = 0; c < Chunks; ++c) bits |= mask_bits(chunk[c] == B(top)) << (c * w);
      at = std::countr_zero(bits);
    } else {
      for (int c = 0; c < Chunks && at < 0; ++c)
        if (const auto bits = mask_bits(chunk[c] == B(top))) at = c * w + std::countr_zero(bits);
    }
    out[j] = std::int32_t(at);
    for (int c = 0; c < Chunks; ++c) chunk[c] = xsimd::select(lanes + B(float(c * w)) == B(float(at)), knocked, chunk[c]);
  }
}

// Any other row: each pass takes the best entry ranking after the previous pick in
// (value desc, index asc) order, so nothing is written between passes.
template <class B>
void top_k_row_passes(const float* v, Index n, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  const float lowest = -std::numeric_limits<float>::infinity();
  const B lanes = lane_index<B>();
  for (Index j = 0; j < k; ++j) {
    const bool first = j == 0;
    const float pv = first ? 0.0f : v[out[j - 1]];
    const Index pi = first ? 0 : out[j - 1];
    const auto after = [&](B x, Index e) {
      return (x < B(pv)) | ((x == B(pv)) & (lanes + B(float(e)) > B(float(pi)))) |
             xsimd::batch_bool<float, typename B::arch_type>(first);
    };
    const auto after_one = [&](float x, Index e) { return first || x < pv || (x == pv && e > pi); };
    B best(lowest);
    Index e = 0;
    for (; e + w <= n; e += w) {
      const B x = B::load_unaligned(v + e);
      best = xsimd::max(best, xsimd::select(after(x, e), x, B(lowest)));
    }
    float top = reduce_max(best);
    for (; e < n; ++e)
      if (after_one(v[e], e) && v[e] > top) top = v[e];
    Index at = -1;
    for (e = 0; at < 0 && e + w <= n; e += w) {
      const B x = B::load_unaligned(v + e);
      if (const auto bits = mask_bits((x == B(top)) & after(x, e))) at = e + std::countr_zero(bits);
    }
    for (; at < 0 && e < n; ++e)
      if (v[e] == top && after_one(v[e], e)) at = e;
    out[j] = std::int32_t(at);
  }
}

template <class B>
void top_k_row(const float* v, Index n, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  switch (n % w == 0 ? n / w : 0) {
    case 1: return top_k_row_registers<B, 1>(v, k, out);
    case 2: return top_k_row_registers<B, 2>(v, k, out);
    case 4: return top_k_row_registers<B, 4>(v, k, out);
    case 8: return top_k_row_registers<B, 8>(v, k, out);
    case 16: return top_k_row_registers<B, 16>(v, k, out);
    default: return top_k_row_passes<B>(v, n, k, out);
  }
}
}  // namespace detail

// SIMD for float rows (k <= 8 is the routing case; any k works); the scalar twin serves double.
template <class S>
void top_k_row(const S* values, Index n, Index k, std::int32_t* out) {
  MOE_ASSERT(k <= n);
  if constexpr (std::is_same_v<S, float>) {
    if (n >= Index(width<float>)) detail::top_k_row<Batch<float>>(values, n, k, out);
    else if (n >= 8) detail::top_k_row<NarrowBatch<float, 8>>(values, n, k, out);
    else detail::top_k_row<NarrowBatch<float, 4>>(values, n, k, out);
  } else {
    scalar::top_k_row(values, n, k, out);
  }
}

}  // namespace moe::kernels
