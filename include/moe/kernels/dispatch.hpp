#pragma once
// Dispatch and combine: move whole token rows between the batch and the expert blocks.
// Destinations larger than the caches are written with streaming stores (no read-for-ownership
// of lines that are fully overwritten), and the next source row is prefetched, since a gather
// in token order jumps through memory. scalar::gather_rows / scalar::combine_rows are the twins.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <span>

#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"
#include "moe/routing.hpp"

namespace moe::kernels {

namespace scalar {
// out[s] = x[slot_token[s]] (times scale[s] when given); padding slots (token -1) get zeros.
template <class S>
void gather_rows(MatrixIn<S> x, std::span<const std::int32_t> slot_token, MatrixOut<S> out,
                 std::span<const S> scale = {}) {
  for (std::size_t s = 0; s < slot_token.size(); ++s)
    for (Index j = 0; j < x.cols(); ++j)
      out(Index(s), j) = slot_token[s] < 0 ? S(0) : (scale.empty() ? S(1) : scale[s]) * x(slot_token[s], j);
}

// y[t] (+)= sum over token t's kept choices of weight[slot] * rows[slot] (weight 1 when the span
// is empty).
template <class S>
void combine_rows(const SparseRouting<S>& r, std::span<const S> weight, MatrixIn<S> rows,
                  MatrixOut<S> y, bool accumulate) {
  for (Index t = 0; t < r.num_tokens; ++t)
    for (Index j = 0; j < rows.cols(); ++j) {
      S sum = accumulate ? y(t, j) : S(0);
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        if (const auto s = r.choice_slot[c]; s >= 0) sum += (weight.empty() ? S(1) : weight[s]) * rows(s, j);
      y(t, j) = sum;
    }
}
}  // namespace scalar

namespace detail {
// Streaming stores pay off once the destination no longer fits in the last-level cache share
// of one core; below that the written lines are read again soon and should stay cached.
inline constexpr std::size_t streaming_threshold_bytes = std::size_t(32) << 20;

template <class S>
MOE_INLINE void store_row(S* dst, Batch<S> v, bool streaming) {
#if defined(__AVX512F__)
  if constexpr (width<S> * sizeof(S) == 64) {
    if (streaming && reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
      if constexpr (std::is_same_v<S, float>) _mm512_stream_ps(dst, v);
      else _mm512_stream_pd(dst, v);
      return;
    }
  }
#endif
  (void)streaming;
  v.store_unaligned(dst);
}

// dst[0, d) = a * src (or zeros when src is null), SIMD body and scalar tail.
template <class S>
MOE_INLINE void scaled_copy(S* dst, const S* src, S a, Index d, bool streaming) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size);
  Index j = 0;
  if (!src) {
    for (; j + w <= d; j += w) store_row(dst + j, B(S(0)), streaming);
    for (; j < d; ++j) dst[j] = S(0);
  } else {
    for (; j + w <= d; j += w) store_row(dst + j, B::load_unaligned(src + j) * B(a), streaming);
    for (; j < d; ++j) dst[j] = a * src[j];
  }
}
}  // namespace detail

template <class S>
void gather_rows(MatrixIn<S> x, std::span<const std::int32_t> slot_token, MatrixOut<S> out,
                 std::span<const S> scale = {}) {
  const Index d = x.cols(), slots = Index(slot_token.size());
  const bool streaming = std::size_t(slots * d) * sizeof(S) > detail::streaming_threshold_bytes;
  parallel_for(slots, 256, [&](Index begin, Index end) {
  for (Index s = begin; s < end; ++s) {
    if (s + 2 < end && slot_token[s + 2] >= 0)  // the source rows jump: fetch ahead
      prefetch_lines(x.row(slot_token[s + 2]).data(), 0, d * Index(sizeof(S)));
    const auto t = slot_token[s];
    detail::scaled_copy(out.row(s).data(), t < 0 ? nullptr : x.row(t).data(),
                        scale.empty() ? S(1) : scale[s], d, streaming);
  }
  });
  if (streaming) std::atomic_thread_fence(std::memory_order_seq_cst);  // order the streamed lines
}

// y[t] (+)= sum over token t's kept choices of weight[slot] * rows[slot], per token so that no
// two threads ever write one row and the summation order is fixed.
template <class S>
void combine_rows(const SparseRouting<S>& r, std::span<const S> weight, MatrixIn<S> rows,
                  MatrixOut<S> y, bool accumulate) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size);
  const Index d = rows.cols();
  const bool streaming = !accumulate && std::size_t(r.num_tokens * d) * sizeof(S) > detail::streaming_threshold_bytes;
  parallel_for(r.num_tokens, 256, [&](Index begin, Index end) {
  for (Index t = begin; t < end; ++t) {
    S* dst = y.row(t).data();
    const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
    if (t + 1 < end)  // the next token's expert rows are scattered: fetch ahead
      for (Index c = hi; c < r.token_offsets[t + 2]; ++c)
        if (const auto s = r.choice_slot[c]; s >= 0) prefetch_lines(rows.row(s).data(), 0, d * Index(sizeof(S)));
    Index j = 0;
    for (; j + w <= d; j += w) {
      B sum = accumulate ? B::load_unaligned(dst + j) : B(S(0));
      for (Index c = lo; c < hi; ++c)
        if (const auto s = r.choice_slot[c]; s >= 0)
          sum = xsimd::fma(B(weight.empty() ? S(1) : weight[s]), B::load_unaligned(rows.row(s).data() + j), sum);
      detail::store_row(dst + j, sum, streaming);
    }
    for (; j < d; ++j) {
      S sum = accumulate ? dst[j] : S(0);
      for (Index c = lo; c < hi; ++c)
        if (const auto s = r.choice_slot[c]; s >= 0) sum += (weight.empty() ? S(1) : weight[s]) * rows(s, j);
      dst[j] = sum;
    }
  }
  });
  if (streaming) std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace moe::kernels
