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
    detail::check_shape("SoftSlotsSelector", "logits", in.logits, in.scores.rows(), in.scores.cols());
    prepare(in.scores, in.tokens);
    detail::check_finite<S>("SoftSlotsSelector", "scores", in.scores);
    select_rows(in, 0);
    finish(in.logits, in.tokens, r);
  }

  // The staged form of forward (moe::staged_selector): the router runs select_rows on each block
  // of scores while it is in cache, so the [T, E p] scores are read once and never stored whole.
  // prepare validates the shapes and the mask and sizes the scratch.
  void prepare(MatrixIn<S> logits, const TokenInputs<S>& tokens) {
    constexpr std::string_view where = "SoftSlotsSelector";
    const Index T = logits.rows(), N = logits.cols();
    if (N % slots_per_expert_ != 0 || N < slots_per_expert_)  // the message only on failure: no allocation
      detail::fail<shape_error>(where, "scores.cols", N,
                                "a positive multiple of slots_per_expert (" + std::to_string(slots_per_expert_) + ")");
    detail::check_tokens(where, tokens, T, N);
    real_ = T - Index(std::count(tokens.valid.begin(), tokens.valid.end(), std::uint8_t(0)));
    fit(combine_, T, N);
    fit(dispatch_, N, T);
    fit(top_, (T + group - 1) / group, N);
    fit(sum_, top_.rows(), N);
    rows_.reserve();
  }

  // Rows [begin, begin + rows) (begin a multiple of the group): their combine rows, and their
  // pass of the dispatch's column softmax (kernels::column_softmax_groups); scratch only.
  void select_rows(const SelectorInput<S>& block, Index begin) {
    const Index n = block.scores.rows();
    if (n == 0) return;
    MOE_ASSERT(begin % group == 0);
    const std::uint8_t* valid = block.tokens.valid.empty() ? nullptr : block.tokens.valid.data();
    parallel_for(n, row_block, [&](Index t, Index end) {  // in parallel when called outside the router's loop
      const auto rows = block.scores.middleRows(t, end - t);
      auto combine = combine_.middleRows(begin + t, end - t);
      // the logits the router gates next, requested meanwhile (its copy of them would wait on memory)
      const Index next = std::min(end - t, combine_.rows() - begin - end);
      kernels::softmax_rows_streamed<S>(rows, combine, rows_.local(),
                                        block.logits.data() + end * block.logits.outerStride(), next);
      if (valid)
        for (Index i = t; i < end; ++i)
          if (!valid[i]) combine.row(i - t).setZero();
      const Index g0 = (begin + t) / group, gn = (end - t + group - 1) / group;
      kernels::column_softmax_groups<S>(rows, valid ? valid + t : nullptr, top_.middleRows(g0, gn),
                                        sum_.middleRows(g0, gn), dispatch_.middleCols(begin + t, end - t));
    });
  }

  // The dispatch's second pass (the groups' factors), then the routing takes the scratch.
  void finish(MatrixIn<S> logits, const TokenInputs<S>&, routing_type& r) {
    const Index T = logits.rows(), N = logits.cols();
    if (real_ == 0) dispatch_.setZero();
    else
      parallel_for(N, slot_block, [&](Index s, Index end) {
        kernels::column_softmax_scale<S>(top_.middleCols(s, end - s), sum_.middleCols(s, end - s),
                                         dispatch_.middleRows(s, end - s));
      });
    r.reset(T, N / slots_per_expert_, slots_per_expert_);
    r.num_valid_tokens = real_;
    r.dispatch.swap(dispatch_);  // the last routing's matrices become the next call's scratch
    r.combine.swap(combine_);
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

  // Whole groups of kernels::column_softmax_groups per router block.
  static constexpr Index min_block_rows = kernels::column_group<S>;

private:
  // row_block: a multiple of the group
  static constexpr Index group = kernels::column_group<S>, row_block = 256, slot_block = 16, tile = 64;

  Index slots_per_expert_;
  Index real_ = 0;
  Matrix<S> combine_, dispatch_;  // the routing being written, swapped in by finish
  Matrix<S> top_, sum_;           // [groups, E p]: kernels::column_softmax_groups' statistics
  PerThread<std::vector<S>> rows_;  // kernels::softmax_rows_streamed's scratch
  Matrix<S> grad_t_;
};

}  // namespace moe
