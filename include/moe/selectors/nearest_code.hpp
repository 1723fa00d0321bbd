#pragma once
// Vector-quantised routing's selector (VQMoE; docs/selectors.md, NearestCodeSelector): each real
// token goes to the expert of its nearest code, code j -> expert j mod E (the reference's hash of
// codes to experts; the identity when K = E), with weight 1. The logits are a VQScorer's negative
// distances: the nearest code is the largest logit, ties to the lower code. Dropless, one slot
// per real token, slots in token order within each expert. The choice is discrete: no gradient
// flows through it (the codebook learns from VQScorer's loss).
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>

#include "moe/concepts.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/top_k.hpp"
#include "moe/routing.hpp"

namespace moe {

template <scalar S>
class NearestCodeSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  constexpr bool causal() const { return true; }  // per token, no capacity

  // The router's check of the scorer's columns (the codes) against the experts.
  void check_slots(Index experts, Index columns) {
    detail::require<shape_error>(columns >= 1, "NearestCodeSelector", "logit columns", columns, ">= 1 (one per code)");
    experts_ = experts;
  }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    const Index T = in.rank.rows(), K = in.rank.cols();
    fit(code_, T);
    for (Index t = 0; t < T; ++t) {
      if (!in.tokens.is_valid(t)) {
        code_[t] = -1;
        continue;
      }
      kernels::top_k_row(in.rank.data() + t * in.rank.outerStride(), K, 1, &code_[t]);  // ties to the lower code
    }
    // counting sort by expert: slots in token order within each expert
    r.reset(T, experts_);
    for (Index t = 0; t < T; ++t)
      if (code_[t] >= 0) ++r.expert_count[code_[t] % experts_];
    for (Index e = 0; e < experts_; ++e) r.expert_offsets[e + 1] = r.expert_offsets[e] + r.expert_count[e];
    const Index slots = r.expert_offsets[experts_];
    r.num_valid_tokens = slots;
    r.slot_token.resize(std::size_t(slots));
    r.slot_weight.assign(std::size_t(slots), S(1));
    r.choice_expert.resize(std::size_t(slots));
    r.choice_slot.resize(std::size_t(slots));
    fit(next_, experts_);
    std::copy_n(r.expert_offsets.begin(), experts_, next_.begin());
    Index choice = 0;
    for (Index t = 0; t < T; ++t) {
      r.token_offsets[t] = choice;
      if (code_[t] < 0) continue;
      const Index e = code_[t] % experts_, s = next_[e]++;
      r.slot_token[s] = std::int32_t(t);
      r.choice_expert[choice] = std::int32_t(e);
      r.choice_slot[choice] = std::int32_t(s);
      ++choice;
    }
    r.token_offsets[T] = choice;
  }

  // The weight is a constant 1: nothing flows back.
  void backward(const SelectorInput<S>&, const routing_type&, std::span<const S>, MatrixOut<S>, MatrixOut<S>) {}

  // Each token's code in the last forward (-1 for padding).
  std::span<const std::int32_t> codes() const { return code_; }

private:
  Index experts_ = 1;
  std::vector<std::int32_t> code_;
  std::vector<Index> next_;
};

}  // namespace moe
