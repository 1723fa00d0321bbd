#pragma once
// Row softmax, max-subtracted so that logits near +-1e3 neither overflow nor vanish, accumulated
// in the scalar type (fp32 for float). The SIMD kernel runs each row in the widest batch that
// fits it; scalar::softmax_rows is its twin.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void softmax_rows(MatrixIn<S> logits, MatrixOut<S> probs) {
  const Index cols = logits.cols();
  for (Index t = 0; t < logits.rows(); ++t) {
    const S* in = logits.row(t).data();
    S* out = probs.row(t).data();
    const S top = *std::max_element(in, in + cols);
    S sum = 0;
    for (Index e = 0; e < cols; ++e) sum += (out[e] = std::exp(in[e] - top));
    const S inv = S(1) / sum;
    for (Index e = 0; e < cols; ++e) out[e] *= inv;
  }
}
}  // namespace scalar

namespace detail {
// The exps wait in `out`; with `streamed`, the normalised row goes there instead, past the caches.
template <class B, class S>
void softmax_row(const S* in, S* out, Index n, S* streamed = nullptr) {
  constexpr Index w = Index(B::size);
  Index e = 0;
  B m(-std::numeric_limits<S>::infinity());
  for (; e + w <= n; e += w) m = xsimd::max(m, B::load_unaligned(in + e));
  S top = reduce_max(m);
  for (; e < n; ++e) top = std::max(top, in[e]);
  B acc(S(0));
  for (e = 0; e + w <= n; e += w) {
    const B v = exp_approx<true>(B::load_unaligned(in + e) - B(top));
    v.store_unaligned(out + e);
    acc += v;
  }
  S sum = xsimd::hadd(acc);
  for (; e < n; ++e) sum += (out[e] = exp_approx(in[e] - top));
  const S inv = S(1) / sum;
  S* const dst = streamed ? streamed : out;
  for (e = 0; e + w <= n; e += w) {
    const B v = B::load_unaligned(out + e) * B(inv);
    if (streamed) stream_store(v, dst + e);
    else v.store_unaligned(dst + e);
  }
  for (; e < n; ++e) dst[e] = out[e] * inv;
}
// Rows of exactly Chunks full batches, held in registers: one load and one store per element.
// Rows at a time, so that one row's reductions overlap the other's exps (a single row is a
// chain of dependent steps).
template <class B, int Chunks, int Rows, class S>
MOE_INLINE void softmax_rows_registers(const S* in, Index in_stride, S* out, Index out_stride) {
  constexpr Index w = Index(B::size);
  B v[Rows][Chunks], top[Rows], acc[Rows];
  MOE_UNROLL
  for (int r = 0; r < Rows; ++r)
    MOE_UNROLL
    for (int c = 0; c < Chunks; ++c) v[r][c] = B::load_unaligned(in + r * in_stride + c * w);
  MOE_UNROLL
  for (int r = 0; r < Rows; ++r) {
    B m = v[r][0];
    MOE_UNROLL
    for (int c = 1; c < Chunks; ++c) m = xsimd::max(m, v[r][c]);
    top[r] = B(reduce_max(m));
  }
  MOE_UNROLL
  for (int r = 0; r < Rows; ++r) {
    acc[r] = B(S(0));
    MOE_UNROLL
    for (int c = 0; c < Chunks; ++c) acc[r] += (v[r][c] = exp_approx<true>(v[r][c] - top[r]));
  }
  MOE_UNROLL
  for (int r = 0; r < Rows; ++r) {
    const B inv(S(1) / xsimd::hadd(acc[r]));
    MOE_UNROLL
    for (int c = 0; c < Chunks; ++c) (v[r][c] * inv).store_unaligned(out + r * out_stride + c * w);
  }
}

template <class B, int Chunks, class S>
void softmax_rows_registers(MatrixIn<S> logits, MatrixOut<S> probs) {
  const Index T = logits.rows(), is = logits.outerStride(), os = probs.outerStride();
  constexpr int pair = Chunks <= 8 ? 2 : 1;  // two rows of 16 batches would not fit the registers
  // The rows `ahead` further on are requested meanwhile: the hardware prefetcher alone leaves
  // these compute-bound rows waiting on their loads (14-18% of top-k routing at E = 64).
  constexpr Index ahead = 8, row_bytes = Chunks * Index(B::size) * Index(sizeof(S));
  Index t = 0;
  for (; t + pair <= T; t += pair) {
    for (int r = 0; r < pair; ++r) prefetch_lines(logits.row(t).data(), (r + ahead) * is * Index(sizeof(S)), row_bytes);
    softmax_rows_registers<B, Chunks, pair>(logits.row(t).data(), is, probs.row(t).data(), os);
  }
  if (t < T) softmax_rows_registers<B, Chunks, 1>(logits.row(t).data(), is, probs.row(t).data(), os);
}

template <class B, class S>
void softmax_rows(MatrixIn<S> logits, MatrixOut<S> probs) {
  constexpr Index w = Index(B::size);
  const Index n = logits.cols();
  switch (n % w == 0 ? n / w : 0) {
    case 1: return softmax_rows_registers<B, 1>(logits, probs);
    case 2: return softmax_rows_registers<B, 2>(logits, probs);
    case 4: return softmax_rows_registers<B, 4>(logits, probs);
    case 8: return softmax_rows_registers<B, 8>(logits, probs);
    case 16: return softmax_rows_registers<B, 16>(logits, probs);
    default:
      for (Index t = 0; t < logits.rows(); ++t) softmax_row<B>(logits.row(t).data(), probs.row(t).data(), n);
  }
}
}  // namespace detail

// Token-parallel layout for rows shorter than a register (E <= 16 floats): lane i holds token
// t + i, each batch is one column of the block (kernels::RowBlock), and max, exp, sum and scale
// run across tokens instead of inside one short row.
template <class S>
void softmax_rows_token_parallel(MatrixIn<S> logits, MatrixOut<S> probs) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size), max_experts = 16;
  const Index T = logits.rows(), E = logits.cols();
  MOE_ASSERT(E <= max_experts);
  Index t = 0;
  if (logits.outerStride() == probs.outerStride()) {
    // the expert count fixed at compile time keeps the E columns in registers
    with_static_count<max_experts>(E, [&](auto experts) {
      constexpr int n = decltype(experts)::value;
      const RowBlock<B, n> block(logits.outerStride());
      if (!block.usable()) return;
      constexpr Index ahead = 8 * w, block_bytes = w * n * Index(sizeof(S));  // eight blocks on (2-3%)
      for (; t + w <= T; t += w) {
        prefetch_lines(logits.row(t).data(), ahead * logits.outerStride() * Index(sizeof(S)), block_bytes);
        B v[n];
        block.load(logits.row(t).data(), v);
        B top = v[0];
        MOE_UNROLL
        for (int e = 1; e < n; ++e) top = xsimd::max(top, v[e]);
        B sum(S(0));
        MOE_UNROLL
        for (int e = 0; e < n; ++e) sum += (v[e] = exp_approx<true>(v[e] - top));
        const B inv = B(S(1)) / sum;
        MOE_UNROLL
        for (int e = 0; e < n; ++e) v[e] *= inv;
        block.store(v, probs.row(t).data());
      }
    });
  }
  if (t < T) detail::softmax_rows<NarrowBatch<S, 4>, S>(logits.middleRows(t, T - t), probs.middleRows(t, T - t));
}

template <class S>
void softmax_rows(MatrixIn<S> logits, MatrixOut<S> probs) {
  const Index n = logits.cols();
  const auto rows = [&](auto batch) { detail::softmax_rows<decltype(batch), S>(logits, probs); };
  if (n >= Index(width<S>)) rows(Batch<S>{});
  else softmax_rows_token_parallel<S>(logits, probs);
}

// Column softmax into the transpose, streamed by rows: out_t[s, t] = softmax over the valid rows
// t of column s of x [T, N], 0 at invalid rows (Soft MoE's dispatch). The rows go by once, in
// groups of column_group<S> rows: per group and column the max over its valid rows (top, -inf
// when none) and sum(exp(x - top)), and out_t gets exp(x - top) through w x w in-register
// transposes (w = width<S>). column_softmax_scale then rescales by each group's
// exp(top - max) / total: two passes over rows of the [N, T] output instead of a column-wise
// (strided, latency-bound) read of x. Group g holds rows [g G, (g + 1) G); x may be a block of
// rows starting at a group boundary, with top and sum the matching rows of the [groups, N]
// statistics and out_t the matching columns.
// Four batches: each output row gets a group's entries as one run of 4 registers (256 bytes in
// float under AVX-512); runs of one 64-byte line, scattered over the rows, wrote 3x slower.
template <class S>
inline constexpr Index column_group = 4 * Index(width<S>);

namespace scalar {
template <class S>
void column_softmax_transposed(MatrixIn<S> x, const std::uint8_t* valid, MatrixOut<S> out_t) {
  for (Index s = 0; s < x.cols(); ++s) {
    S top = -std::numeric_limits<S>::infinity(), sum = 0;
    for (Index t = 0; t < x.rows(); ++t)
      if (!valid || valid[t]) top = std::max(top, x(t, s));
    for (Index t = 0; t < x.rows(); ++t) sum += (out_t(s, t) = !valid || valid[t] ? std::exp(x(t, s) - top) : S(0));
    for (Index t = 0; t < x.rows(); ++t) out_t(s, t) = sum > 0 ? out_t(s, t) / sum : S(0);
  }
}
}  // namespace scalar

// valid: one flag per row of x, or null for all valid.
template <class S>
void column_softmax_groups(MatrixIn<S> x, const std::uint8_t* valid, MatrixOut<S> top, MatrixOut<S> sum,
                           MatrixOut<S> out_t) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size), G = column_group<S>;
  constexpr S lowest = -std::numeric_limits<S>::infinity();
  const Index T = x.rows(), N = x.cols(), xs = x.outerStride(), os = out_t.outerStride();
  MOE_ASSERT(top.rows() == (T + G - 1) / G && top.cols() == N && out_t.rows() == N && out_t.cols() == T);
  const S* const xp = x.data();
  S* const op = out_t.data();
  alignas(64) S tile[w * w];
  const RowBlock<B, int(w)> transpose(w);
  const auto live_rows = [&](Index t0) {  // bit i: row t0 + i is there and valid (w <= 16)
    const Index n = std::min(w, T - t0);
    std::uint32_t live = (1u << n) - 1;
    if (valid)
      for (Index i = 0; i < n; ++i)
        if (!valid[t0 + i]) live &= ~(1u << i);
    return live;
  };
  // Column batches outer, groups inner: each output row gets a group's G entries as one run.
  Index s = 0;
  for (; s + w <= N; s += w)
    for (Index g = 0; g * G < T; ++g) {
      const Index g0 = g * G, g1 = std::min(T, g0 + G);
      B m(lowest), acc(S(0));
      for (Index t = g0; t < g1; ++t)
        if (!valid || valid[t]) m = xsimd::max(m, B::load_unaligned(xp + t * xs + s));
      m.store_unaligned(top.row(g).data() + s);
      m = xsimd::select(m == B(lowest), B(S(0)), m);  // no valid row: every entry is 0
      for (Index t0 = g0; t0 < g1; t0 += w) {
        const Index n = std::min(w, g1 - t0);
        const S* const rows = xp + t0 * xs + s;
        const std::uint32_t live = live_rows(t0);
        B v[w];
        if (live == (1u << w) - 1) {  // the common case, unrolled: w independent exps in flight
          MOE_UNROLL
          for (Index i = 0; i < w; ++i) acc += (v[i] = exp_approx<true>(B::load_unaligned(rows + i * xs) - m));
        } else {
          for (Index i = 0; i < w; ++i)
            acc += (v[i] = live >> i & 1 ? exp_approx<true>(B::load_unaligned(rows + i * xs) - m) : B(S(0)));
        }
        MOE_UNROLL
        for (Index i = 0; i < w; ++i) v[i].store_aligned(tile + i * w);
        transpose.load(tile, v);  // v[j]: column s + j over the rows t0..
        MOE_UNROLL
        for (Index j = 0; j < w; ++j) {
          S* dst = op + (s + j) * os + t0;
          if (n == w) stream_store(v[j], dst);  // written once, read back only by the second pass
          else {
            v[j].store_aligned(tile);
            std::copy_n(tile, n, dst);
          }
        }
      }
      acc.store_unaligned(sum.row(g).data() + s);
    }
  for (; s < N; ++s)  // columns past the last full batch, one by one through the same exp
    for (Index g = 0; g * G < T; ++g) {
      const Index g0 = g * G, g1 = std::min(T, g0 + G);
      S m = lowest, z = 0;
      for (Index t = g0; t < g1; ++t)
        if (!valid || valid[t]) m = std::max(m, xp[t * xs + s]);
      for (Index t = g0; t < g1; ++t)
        z += (op[s * os + t] = !valid || valid[t] ? exp_approx(xp[t * xs + s] - m) : S(0));
      top(g, s) = m;
      sum(g, s) = z;
    }
  stream_fence();
}

// The second pass: out_t[s, group g] *= exp(top[g, s] - max_g top[., s]) / total, total the sum
// of the groups' sums so rescaled, in group order (any thread count); 0 where no row is valid.
// `top` is overwritten by these factors. Runs on any range of columns (top.middleCols(s, n),
// sum.middleCols(s, n), out_t.middleRows(s, n)).
template <class S>
void column_softmax_scale(MatrixOut<S> top, MatrixIn<S> sum, MatrixOut<S> out_t) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size), G = column_group<S>;
  constexpr S lowest = -std::numeric_limits<S>::infinity();
  const Index groups = top.rows(), N = top.cols(), T = out_t.cols();
  Index s = 0;
  for (; s + w <= N; s += w) {  // the factors of w columns at a time
    B m(lowest), z(S(0));
    for (Index g = 0; g < groups; ++g) m = xsimd::max(m, B::load_unaligned(&top(g, s)));
    m = xsimd::select(m == B(lowest), B(S(0)), m);  // no valid row: all factors 0
    for (Index g = 0; g < groups; ++g) {
      const B f = exp_approx<true>(B::load_unaligned(&top(g, s)) - m);
      z += B::load_unaligned(sum.row(g).data() + s) * f;
      f.store_unaligned(&top(g, s));
    }
    const B inv = xsimd::select(z > B(S(0)), B(S(1)) / z, B(S(0)));
    for (Index g = 0; g < groups; ++g) (B::load_unaligned(&top(g, s)) * inv).store_unaligned(&top(g, s));
  }
  for (; s < N; ++s) {  // the rest one by one, through the same exp
    S m = lowest, z = 0;
    for (Index g = 0; g < groups; ++g) m = std::max(m, top(g, s));
    if (m == lowest) m = 0;
    for (Index g = 0; g < groups; ++g) z += sum(g, s) * (top(g, s) = exp_approx(top(g, s) - m));
    const S inv = z > 0 ? S(1) / z : S(0);
    for (Index g = 0; g < groups; ++g) top(g, s) *= inv;
  }
  for (s = 0; s < N; ++s) {
    S* row = out_t.row(s).data();
    for (Index g = 0; g < groups; ++g) {
      const B f(top(g, s));
      const Index end = std::min(T, (g + 1) * G);
      Index t = g * G;
      for (; t + w <= end; t += w) {
        prefetch_lines<true>(row + t, 2048, 1);  // the loads wait on memory without it (28% more time)
        (B::load_unaligned(row + t) * f).store_unaligned(row + t);
      }
      for (; t < end; ++t) row[t] *= top(g, s);
    }
  }
}

// softmax_rows for an output larger than the caches that is read again only much later: each
// row's exps wait in `scratch` (cache-resident) and the normalised row goes to probs with
// non-temporal stores, which spares reading each output line for ownership. Rows short enough
// for the in-register kernels (under 16 batches) take softmax_rows as they are.
// next, next_rows: rows (at the stride of logits) the caller reads after these, requested into
// the cache one per row done, so that their loads overlap this compute-bound loop.
template <class S>
void softmax_rows_streamed(MatrixIn<S> logits, MatrixOut<S> probs, std::vector<S>& scratch,
                           const S* next = nullptr, Index next_rows = 0) {
  using B = Batch<S>;
  const Index N = logits.cols(), bytes = N * Index(sizeof(S));
  if (N < 16 * Index(B::size)) {
    for (Index t = 0; t < next_rows; ++t) prefetch_lines(next, t * logits.outerStride() * Index(sizeof(S)), bytes);
    return softmax_rows<S>(logits, probs);
  }
  fit(scratch, N);
  for (Index t = 0; t < logits.rows(); ++t) {
    if (t < next_rows) prefetch_lines(next, t * logits.outerStride() * Index(sizeof(S)), bytes);
    detail::softmax_row<B>(logits.row(t).data(), scratch.data(), N, probs.row(t).data());
  }
  stream_fence();
}

// log(sum(exp(row))) of one row, max-subtracted.
template <class S>
S log_sum_exp(const S* row, Index n) {
  const S top = *std::max_element(row, row + n);
  S sum = 0;
  for (Index e = 0; e < n; ++e) sum += std::exp(row[e] - top);
  return top + std::log(sum);
}

}  // namespace moe::kernels
