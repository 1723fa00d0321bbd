#pragma once
// Row softmax, max-subtracted so that logits near +-1e3 neither overflow nor vanish, accumulated
// in the scalar type (fp32 for float). The SIMD kernel runs each row in the widest batch that
// fits it; scalar::softmax_rows is its twin.
#include <algorithm>
#include <cmath>

#include "moe/core/tensor.hpp"
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
template <class B, class S>
void softmax_row(const S* in, S* out, Index n) {
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
  for (e = 0; e + w <= n; e += w) (B::load_unaligned(out + e) * B(inv)).store_unaligned(out + e);
  for (; e < n; ++e) out[e] *= inv;
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

// log(sum(exp(row))) of one row, max-subtracted.
template <class S>
S log_sum_exp(const S* row, Index n) {
  const S top = *std::max_element(row, row + n);
  S sum = 0;
  for (Index e = 0; e < n; ++e) sum += std::exp(row[e] - top);
  return top + std::log(sum);
}

}  // namespace moe::kernels
