#pragma once
// Per-token choice lists of varying length, and their capacity pass (docs/selectors.md, Dynamic
// number of choices): the shared machinery of the selectors whose tokens hold 0..E choices
// (TopPSelector, DynamicKSelector). A selector's select_rows packs each block's picks at the
// block's own place in the scratch (so disjoint blocks run in parallel); finish compacts them
// into the routing in token order, computes C from the number of choices (Capacity), builds the
// priority sequence over the varying ranks, and hands it to kernels::assign_slots.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/slot_assignment.hpp"
#include "moe/routing.hpp"
#include "moe/selectors/capacity.hpp"
#include "moe/selectors/weighting.hpp"

namespace moe::detail {

// The overflow orders that have a meaning for choice lists of varying length; the others
// (batch_priority, by_masked_logit, random) are TopKSelector's only.
inline void check_variable_overflow(std::string_view where, const Capacity& capacity) {
  const auto o = capacity.overflow;
  const bool ok = o == OverflowOrder::rank_major || o == OverflowOrder::token_major || o == OverflowOrder::by_weight ||
                  o == OverflowOrder::by_score || o == OverflowOrder::rank_major_by_score;
  const char* name = o == OverflowOrder::batch_priority ? "batch_priority" : o == OverflowOrder::by_masked_logit ? "by_masked_logit" : "random";
  if (!ok)
    fail<config_error>(where, "capacity.overflow", name,
                       "rank_major, token_major, by_weight, by_score or rank_major_by_score (orders for choice lists of varying length)");
}

// The weightings the choice-list selectors offer (functions of the gate scores).
inline void check_variable_weighting(std::string_view where, Weighting w) {
  require<config_error>(w != Weighting::softmax_of_kept_logits && w != Weighting::p_norm, where, "weighting",
                        w == Weighting::p_norm ? "p_norm" : "softmax_of_kept_logits",
                        "raw, renormalize_before_drop or renormalize_after_drop (with a softmax gate, "
                        "renormalize_before_drop is the softmax of the kept logits; p_norm is TopKSelector's)");
}

template <class S>
class ChoiceLists {
public:
  // Which tokens take choices (all, or the real ones), and scratch for at most `stride` choices
  // per token. Reads only the mask.
  void prepare(const TokenInputs<S>& tokens_in, Index tokens, Index stride, Padding padding) {
    stride_ = stride;
    route_all_ = tokens_in.valid.empty() || padding == Padding::megatron;
    real_ = count_valid(tokens_in.valid, tokens);
    fit(count_, tokens);
    fit(source_, tokens);
    fit(expert_, tokens * stride);
    fit(score_, tokens * stride);
    fit(weight_, tokens * stride);
  }

  Index real_tokens() const { return real_; }
  bool routes(const TokenInputs<S>& block, Index i) const { return route_all_ || block.is_valid(i); }

  // The picks of the tokens of the block starting at row `begin` go from `begin * stride` on,
  // packed: a token records where its run starts and how long it is.
  Index block_start(Index begin) const { return begin * stride_; }
  std::int32_t* experts(Index at) { return expert_.data() + at; }
  S* scores(Index at) { return score_.data() + at; }
  S* weights(Index at) { return weight_.data() + at; }
  void record(Index t, Index at, Index count) {
    source_[t] = at;
    count_[t] = count;
  }

  // The routing from the recorded runs: C from the choices, slots by the capacity's priority.
  // Throws (config_error from Capacity) before the routing is touched.
  void finish(Index tokens, Index experts, const Capacity& capacity, Padding padding, Weighting weighting, S scale,
              std::string_view where, SparseRouting<S>& r) {
    Index choices = 0, deepest = 0;
    for (Index t = 0; t < tokens; ++t) choices += count_[t], deepest = std::max(deepest, count_[t]);
    const Index C = capacity.slots_for_choices(padding == Padding::excluded ? real_ : tokens, choices, experts, where);
    r.num_tokens = tokens;
    r.num_experts = experts;
    r.num_valid_tokens = real_;
    r.capacity = C;
    fit(r.token_offsets, tokens + 1);
    fit(r.choice_expert, choices);
    fit(r.choice_slot, choices);
    fit(r.expert_offsets, experts + 1);
    fit(r.expert_count, experts);
    fit(choice_token_, choices);
    fit(choice_score_, choices);
    fit(pre_weight_, choices);
    // compact the runs in token order (each block's runs are contiguous: a streaming copy)
    Index at = 0;
    for (Index t = 0; t < tokens; ++t) {
      r.token_offsets[t] = at;
      const Index n = count_[t], from = source_[t];
      for (Index j = 0; j < n; ++j, ++at) {
        r.choice_expert[at] = expert_[from + j];
        choice_token_[at] = std::int32_t(t);
        choice_score_[at] = score_[from + j];
        pre_weight_[at] = weight_[from + j];
      }
    }
    r.token_offsets[tokens] = at;
    priority_sequence(r, C, capacity.overflow, deepest);
    kernels::assign_slots<S>({.choice_token = choice_token_, .order = order_, .ranks = 1, .weight = pre_weight_,
                              .capacity = C, .pad = capacity.pad,
                              .token_order = capacity.slot_order == SlotOrder::token},
                             r, cursor_);
    if (weighting == Weighting::renormalize_after_drop && C >= 0)
      renormalize_survivors<S>(r, choice_token_, choice_score_, scale);
  }

private:
  // order_ = the priority sequence, or empty for choice (= token) order.
  void priority_sequence(const SparseRouting<S>& r, Index C, OverflowOrder overflow, Index deepest) {
    const Index choices = r.num_choices();
    order_.clear();
    // dropless, or one choice per token at most: every rank-major order is token order
    if (C < 0 || overflow == OverflowOrder::token_major || (overflow == OverflowOrder::rank_major && deepest <= 1))
      return;
    fit(order_, choices);
    if (overflow == OverflowOrder::by_weight || overflow == OverflowOrder::by_score) {
      const std::vector<S>& key = overflow == OverflowOrder::by_weight ? pre_weight_ : choice_score_;
      std::iota(order_.begin(), order_.end(), 0);
      std::sort(order_.begin(), order_.end(), [&](auto a, auto b) { return key[a] != key[b] ? key[a] > key[b] : a < b; });
      return;
    }
    // rank-major: a counting sort of the choices by rank, token order inside a rank
    fit(rank_start_, deepest + 1);
    std::fill(rank_start_.begin(), rank_start_.end(), Index(0));
    for (Index t = 0; t < r.num_tokens; ++t)
      for (Index j = 0; j < r.token_offsets[t + 1] - r.token_offsets[t]; ++j) ++rank_start_[j + 1];
    for (Index j = 0; j < deepest; ++j) rank_start_[j + 1] += rank_start_[j];
    for (Index t = 0; t < r.num_tokens; ++t)
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        order_[rank_start_[c - r.token_offsets[t]]++] = std::int32_t(c);
    if (overflow != OverflowOrder::rank_major_by_score) return;
    // each rank by decreasing score, ties to the lower choice (= lower token)
    for (Index j = 0, begin = 0; j < deepest; ++j) {
      const Index end = rank_start_[j];  // rank_start_[j] now holds the end of rank j
      std::sort(order_.begin() + begin, order_.begin() + end, [&](auto a, auto b) {
        return choice_score_[a] != choice_score_[b] ? choice_score_[a] > choice_score_[b] : a < b;
      });
      begin = end;
    }
  }

  Index stride_ = 0, real_ = 0;
  bool route_all_ = true;
  std::vector<Index> count_, source_;
  std::vector<std::int32_t> expert_;
  std::vector<S> score_, weight_;
  // finish's scratch
  std::vector<std::int32_t> choice_token_, order_;
  std::vector<S> choice_score_, pre_weight_;
  std::vector<Index> rank_start_, cursor_;
};

}  // namespace moe::detail
