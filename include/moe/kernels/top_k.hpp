#pragma once
// Top-k of one row: indices of the k largest values in descending order, ties broken to the
// lowest index (docs/architecture.md, Determinism). The SIMD kernel takes k vectorised passes
// (maximum, first index holding it, knock it out); scalar::top_k_row, an insertion into a sorted
// run of k, is its twin.
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

// Rows of exactly Chunks full batches and at most 64 values stay in registers: k passes of
// (row maximum in every lane, lowest index holding it as a bit mask, knock it out with -inf), no
// memory traffic and no branch on the data. Rows at a time, so that their dependent chains of
// reductions overlap. A pick of -inf means the row holds -inf itself (the knock-out marker is
// then ambiguous): such rows are redone by the scalar twin after the passes.
template <class B, int Chunks, int Rows>
MOE_INLINE void top_k_rows_registers(const float* v, Index stride, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  static_assert(Chunks * w <= 64, "one 64-bit mask per row");
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  const B knocked(lowest);
  B chunk[Rows][Chunks];
  MOE_UNROLL
  for (int r = 0; r < Rows; ++r)
    MOE_UNROLL
    for (int c = 0; c < Chunks; ++c) chunk[r][c] = B::load_unaligned(v + r * stride + c * w);
  bool met_inf = false;
  for (Index j = 0; j < k; ++j) {
    std::uint64_t pick[Rows];
    MOE_UNROLL
    for (int r = 0; r < Rows; ++r) {
      B best = chunk[r][0];
      MOE_UNROLL
      for (int c = 1; c < Chunks; ++c) best = xsimd::max(best, chunk[r][c]);
      const B top = broadcast_max(best);
      met_inf |= top.get(0) == lowest;
      std::uint64_t bits = 0;
      MOE_UNROLL
      for (int c = 0; c < Chunks; ++c) bits |= mask_bits(chunk[r][c] == top) << (c * w);
      pick[r] = bits & (~bits + 1);  // the lowest set bit: ties go to the lowest index
      out[r * k + j] = std::int32_t(std::countr_zero(bits));
    }
    if (j + 1 == k) break;  // the last pick needs no knock-out
    MOE_UNROLL
    for (int r = 0; r < Rows; ++r)
      MOE_UNROLL
      for (int c = 0; c < Chunks; ++c) chunk[r][c] = xsimd::select(lane_mask<B>(pick[r] >> (c * w)), knocked, chunk[r][c]);
  }
  if (met_inf)
    MOE_UNROLL
    for (int r = 0; r < Rows; ++r) scalar::top_k_row(v + r * stride, Index(Chunks) * w, k, out + r * k);
}

// Longer rows of full batches: the same passes, the lowest index found chunk by chunk.
template <class B, int Chunks>
void top_k_row_registers(const float* v, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  const B knocked(-std::numeric_limits<float>::infinity());
  const B lanes = lane_index<B>();
  B chunk[Chunks];
  bool holds_inf = false;
  for (int c = 0; c < Chunks; ++c) {
    chunk[c] = B::load_unaligned(v + c * w);
    holds_inf |= xsimd::any(chunk[c] == knocked);
  }
  if (holds_inf) return scalar::top_k_row(v, Index(Chunks) * w, k, out);
  for (Index j = 0; j < k; ++j) {
    B best = chunk[0];
    for (int c = 1; c < Chunks; ++c) best = xsimd::max(best, chunk[c]);
    const B top = broadcast_max(best);
    Index at = -1;
    for (int c = 0; c < Chunks && at < 0; ++c)
      if (const auto bits = mask_bits(chunk[c] == top)) at = c * w + std::countr_zero(bits);
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
    case 1: return top_k_rows_registers<B, 1, 1>(v, 0, k, out);
    case 2: return top_k_rows_registers<B, 2, 1>(v, 0, k, out);
    case 4: return top_k_rows_registers<B, 4, 1>(v, 0, k, out);
    case 8: return top_k_row_registers<B, 8>(v, k, out);
    case 16: return top_k_row_registers<B, 16>(v, k, out);
    default: return top_k_row_passes<B>(v, n, k, out);
  }
}

// Rows [0, T) of a matrix, out[t * k + j]: rows that fit one 64-bit mask go two at a time.
template <class B>
void top_k_rows(const float* v, Index stride, Index T, Index n, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size);
  const auto pairs = [&](auto kernel) {
    Index t = 0;
    for (; t + 2 <= T; t += 2) kernel(std::integral_constant<int, 2>{}, v + t * stride, out + t * k);
    if (t < T) kernel(std::integral_constant<int, 1>{}, v + t * stride, out + t * k);
  };
  const auto rows_of = [&](auto chunks) {
    pairs([&](auto rows, const float* in, std::int32_t* o) {
      top_k_rows_registers<B, decltype(chunks)::value, decltype(rows)::value>(in, stride, k, o);
    });
  };
  switch (n % w == 0 && n <= 64 ? n / w : 0) {
    case 1: return rows_of(std::integral_constant<int, 1>{});
    case 2: return rows_of(std::integral_constant<int, 2>{});
    case 4: return rows_of(std::integral_constant<int, 4>{});
    default: break;
  }
  for (Index t = 0; t < T; ++t) top_k_row<B>(v + t * stride, n, k, out + t * k);
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

// Token-parallel top-k for rows shorter than a register (n <= 16): lane i follows row t + i,
// the columns of a block of rows arrive one batch each (kernels::RowBlock), and each lane keeps
// its best k (value, index) pairs sorted by insertion. Columns arrive in ascending index and only
// a strictly larger value moves an entry, so ties go to the lowest index. N is the column count
// when fixed at compile time (the block is then transposed in registers), else 0. Returns the
// rows done (whole groups of width without -inf); the caller finishes the rest.
template <class B, int N = 0>
Index top_k_rows_token_parallel(const float* v, Index stride, Index T, Index n, Index k, std::int32_t* out) {
  constexpr Index w = Index(B::size), max_k = N > 0 ? N : 16;
  const RowBlock<B, (N > 0 ? N : 1)> block(stride);
  if (n > max_k || !block.usable()) return 0;  // k <= n
  const float lowest = -std::numeric_limits<float>::infinity();
  alignas(64) std::int32_t picked[max_k][B::size];
  Index t = 0;
  with_static_count<max_k>(k, [&](auto kk) {  // k fixed at compile time: the lists stay in registers
    constexpr int K = decltype(kk)::value;
    for (; t + w <= T; t += w) {
      B val[K], idx[K];
      MOE_UNROLL
      for (int j = 0; j < K; ++j) val[j] = B(lowest), idx[j] = B(-1.0f);
      const auto insert = [&](B x, Index e) {
        B xv = x, xi = B(float(e));
        MOE_UNROLL
        for (int j = 0; j < K; ++j) {
          // where x beats entry j it takes that slot, and from there on every entry moves down
          // one (compared by x, not by the carried entry, which may equal the next)
          const auto up = x > val[j];
          const B nv = xsimd::select(up, xv, val[j]), ni = xsimd::select(up, xi, idx[j]);
          xv = xsimd::select(up, val[j], xv);
          xi = xsimd::select(up, idx[j], xi);
          val[j] = nv;
          idx[j] = ni;
        }
      };
      if constexpr (N > 0) {
        B columns[N];
        block.load(v + t * stride, columns);
        MOE_UNROLL
        for (int e = 0; e < N; ++e) insert(columns[e], e);
      } else {
        for (Index e = 0; e < n; ++e) insert(block.column(v + t * stride, e), e);
      }
      if (xsimd::any(idx[K - 1] < B(0.0f))) break;  // a row with -inf entries: the caller's path
      if constexpr (K == 1) {
        xsimd::batch_cast<std::int32_t>(idx[0]).store_unaligned(out + t);
      } else {
        MOE_UNROLL
        for (int j = 0; j < K; ++j) xsimd::batch_cast<std::int32_t>(idx[j]).store_aligned(picked[j]);
        for (Index i = 0; i < w; ++i)
          MOE_UNROLL
          for (int j = 0; j < K; ++j) out[(t + i) * K + j] = picked[j][i];
      }
    }
  });
  return t;
}

// Every row of a matrix: row t's top-k into out[t * k, t * k + k).
template <class S>
void top_k_rows(MatrixIn<S> values, Index k, std::int32_t* out) {
  const Index T = values.rows(), n = values.cols();
  MOE_ASSERT(k <= n);
  if constexpr (std::is_same_v<S, float>) {
    // short rows: token-parallel for whole groups of rows, row by row for the rest
    // contiguous rows of 2, 4 or 8 are transposed in registers, other short rows gathered
    const auto token_parallel = [&]<int N>() {
      return top_k_rows_token_parallel<Batch<float>, N>(values.data(), values.outerStride(), T, n, k, out);
    };
    const bool packed = values.outerStride() == n;
    const Index done = n >= Index(width<float>) ? 0
                       : packed && n == 8   ? token_parallel.template operator()<8>()
                       : packed && n == 4   ? token_parallel.template operator()<4>()
                       : packed && n == 2   ? token_parallel.template operator()<2>()
                                            : token_parallel.template operator()<0>();
    const auto rows = [&](auto batch) {
      detail::top_k_rows<decltype(batch)>(values.data() + done * values.outerStride(), values.outerStride(),
                                          T - done, n, k, out + done * k);
    };
    if (n >= Index(width<float>)) rows(Batch<float>{});
    else if (n >= 8) rows(NarrowBatch<float, 8>{});
    else rows(NarrowBatch<float, 4>{});
  } else {
    for (Index t = 0; t < T; ++t) scalar::top_k_row(values.row(t).data(), n, k, out + t * k);
  }
}

}  // namespace moe::kernels
