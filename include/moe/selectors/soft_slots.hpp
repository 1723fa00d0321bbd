#pragma once
// Soft-slots selector of Soft MoE (Puigcerver et al., "From Sparse to Soft Mixtures of Experts",
// ICLR 2024; docs/selectors.md, SoftSlotsSelector): reads [T, E p] slot logits (one column per
// slot, expert e's p slots contiguous) and writes a SoftRouting:
// - dispatch[s, :] = softmax over the real tokens of column s (each slot a convex combination of
//   the tokens; padding tokens weigh 0 and take no part in the normalisation);
// - combine[t, :] = softmax of row t over all E p slots (each real token a convex combination of
//   the slots' outputs); a padding token's row is 0.
// Nothing is discrete, so backward is the two softmaxes' Jacobians.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "moe/concepts.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe {

// Slots per expert from a capacity factor as the reference computes them for a group of
// `tokens` tokens: round(tokens cf / E) (ties to even, as Python's round), no multiple-of
// rounding; a config_error when that is below 1.
inline Index soft_moe_slots_per_expert(Index tokens, Index experts, double capacity_factor) {
  constexpr std::string_view where = "soft_moe_slots_per_expert";
  detail::require<config_error>(experts >= 1, where, "experts", experts, "experts >= 1");
  detail::require<config_error>(tokens >= 1, where, "tokens", tokens, "tokens >= 1 (the group size)");
  detail::require<config_error>(std::isfinite(capacity_factor) && capacity_factor > 0, where, "capacity_factor",
                                capacity_factor, "capacity_factor > 0 and finite");
  const double p = std::nearbyint(double(tokens) * capacity_factor / double(experts));  // ties to even
  detail::require<config_error>(p >= 1, where, "capacity_factor", capacity_factor,
                                "round(tokens * capacity_factor / experts) >= 1 slot per expert (tokens = " +
                                    std::to_string(tokens) + ", experts = " + std::to_string(experts) + ")");
  return Index(p);
}

template <scalar S>
class SoftSlotsSelector {
public:
  using scalar_type = S;
  using routing_type = SoftRouting<S>;

  explicit SoftSlotsSelector(Index slots_per_expert = 1) : slots_per_expert_(slots_per_expert) {
    detail::require<config_error>(slots_per_expert >= 1, "SoftSlotsSelector", "slots_per_expert", slots_per_expert,
                                  "slots_per_expert >= 1");
  }

  Index slots_per_expert() const { return slots_per_expert_; }
  // Not causal: every slot mixes every token of the batch.
  constexpr bool causal() const { return false; }

  // The router's check that the scorer's logit columns are this selector's slots.
  void check_slots(Index experts, Index columns) const {
    detail::require<shape_error>(columns == experts * slots_per_expert_, "SoftSlotsSelector", "logit columns", columns,
                                 "num_experts * slots_per_expert = " + std::to_string(experts) + " * " +
                                     std::to_string(slots_per_expert_) + " (one logit per slot)");
  }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    constexpr std::string_view where = "SoftSlotsSelector";
    const Index T = in.scores.rows(), N = in.scores.cols();
    if (N % slots_per_expert_ != 0 || N < slots_per_expert_)  // the message only on failure: no allocation
      detail::fail<shape_error>(where, "scores.cols", N,
                                "a positive multiple of slots_per_expert (" + std::to_string(slots_per_expert_) + ")");
    detail::check_shape(where, "logits", in.logits, T, N);
    detail::check_tokens(where, in.tokens, T, N);
    detail::check_finite<S>(where, "scores", in.scores);
    const std::span<const std::uint8_t> valid = in.tokens.valid;
    // the real tokens, in order: the columns of the dispatch softmax
    fit(real_, T);
    Index real = 0;
    for (Index t = 0; t < T; ++t)
      if (in.tokens.is_valid(t)) real_[std::size_t(real++)] = t;
    const bool masked = real < T;

    r.reset(T, N / slots_per_expert_, slots_per_expert_);
    r.num_valid_tokens = real;
    // combine: softmax over the slots of each real token's row, 0 for padding
    parallel_for(T, row_block, [&](Index t, Index end) {
      kernels::softmax_rows<S>(in.scores.middleRows(t, end - t), r.combine.middleRows(t, end - t));
      if (masked)
        for (Index i = t; i < end; ++i)
          if (!valid[std::size_t(i)]) r.combine.row(i).setZero();
    });
    // dispatch: each slot's column over the real tokens, transposed into a row, softmax in place
    if (real == 0) {
      r.dispatch.setZero();
      return;
    }
    // with padding: packed over the real tokens first, in a buffer sized [S, T] so that batches
    // with other padding reuse it
    if (masked) fit(packed_, N, T);
    auto& full = masked ? packed_ : r.dispatch;
    MatrixOut<S> rows = full.leftCols(real);
    parallel_for(N, slot_block, [&](Index s, Index end) {
      transpose_real(in.scores, s, end - s, real, rows);
      kernels::softmax_rows<S>(rows.middleRows(s, end - s), rows.middleRows(s, end - s));
      if (masked) {
        auto out = r.dispatch.middleRows(s, end - s);
        out.setZero();
        for (Index s1 = 0; s1 < end - s; ++s1)
          for (Index j = 0; j < real; ++j) out(s1, real_[std::size_t(j)]) = rows(s + s1, j);
      }
    });
  }

  // dscores[t, s] += C[t, s] (dC[t, s] - <C[t, :], dC[t, :]>) + D[s, t] (dD[s, t] - <D[s, :], dD[s, :]>)
  void backward(const SelectorInput<S>&, const routing_type& r, MatrixIn<S> ddispatch, MatrixIn<S> dcombine,
                MatrixOut<S> dscores, MatrixOut<S>) {
    const Index T = r.num_tokens, N = r.num_slots();
    fit(grad_t_, N, T);  // the dispatch term, slot-major
    parallel_for(N, slot_block, [&](Index s, Index end) {
      for (Index i = s; i < end; ++i) {
        const S inner = r.dispatch.row(i).dot(ddispatch.row(i));
        grad_t_.row(i).array() = r.dispatch.row(i).array() * (ddispatch.row(i).array() - inner);
      }
    });
    parallel_for(T, row_block, [&](Index t, Index end) {
      for (Index i = t; i < end; ++i) {
        const S inner = r.combine.row(i).dot(dcombine.row(i));
        dscores.row(i).array() += r.combine.row(i).array() * (dcombine.row(i).array() - inner);
      }
      for (Index s0 = 0; s0 < N; s0 += tile)  // add the transposed dispatch term, by tiles
        for (Index i = t; i < end; ++i)
          for (Index s1 = s0; s1 < std::min(N, s0 + tile); ++s1) dscores(i, s1) += grad_t_(s1, i);
    });
  }

private:
  static constexpr Index row_block = 256, slot_block = 16, tile = 64;

  // out(s + i, j) = scores(real_[j], s + i) for i < n (n <= slot_block) and every real token j:
  // 16 tokens at a time through a small tile in registers or L1, so each token's row segment is
  // read once, contiguously, and each slot's row is written contiguously.
  void transpose_real(MatrixIn<S> scores, Index s, Index n, Index real, MatrixOut<S> out) const {
    constexpr Index w = slot_block;
    S buf[w][w];
    Index j = 0;
    for (; j + w <= real; j += w) {
      for (Index a = 0; a < w; ++a) {
        const S* src = scores.row(real_[std::size_t(j + a)]).data() + s;
        for (Index i = 0; i < n; ++i) buf[i][a] = src[i];
      }
      for (Index i = 0; i < n; ++i) {
        S* dst = out.row(s + i).data() + j;
        for (Index a = 0; a < w; ++a) dst[a] = buf[i][a];
      }
    }
    for (; j < real; ++j) {
      const S* src = scores.row(real_[std::size_t(j)]).data() + s;
      for (Index i = 0; i < n; ++i) out(s + i, j) = src[i];
    }
  }
  Index slots_per_expert_;
  std::vector<Index> real_;
  Matrix<S> packed_;  // [E p, T] when some tokens are padding: the real tokens' columns first
  Matrix<S> grad_t_;
};

}  // namespace moe
