#pragma once
// Expert-choice selector (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing";
// docs/selectors.md, ExpertChoiceSelector): each expert takes the C real tokens with the largest
// rank values in its column (ties to the lower token), so every expert is exactly full and a
// token is taken by anywhere from 0 to E experts. The combine weight of a slot is the gate's
// score of that (token, expert) pair. With a gate that ranks by a transport plan (Sinkhorn,
// k-sparse) this is the expert-choice half of "Routers in Vision MoE".
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/column_top_c.hpp"
#include "moe/selectors/capacity.hpp"

namespace moe {

template <scalar S>
class ExpertChoiceSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  struct Options {
    ExpertCapacity capacity{};
    // priority: an expert's slots by descending rank value (vmoe's top_k order); token: by token
    SlotOrder slot_order = SlotOrder::priority;
  };

  explicit ExpertChoiceSelector(Options opt = {}) : opt_(opt) { opt_.capacity.validate("ExpertChoiceSelector"); }

  const Options& options() const { return opt_; }
  // Not causal: an expert's top C ranks every token of the batch, so a later token can take an
  // earlier one's slot.
  constexpr bool causal() const { return false; }

  // C for a batch of `tokens` real tokens over `experts` experts: what each expert takes (all the
  // real tokens when there are fewer than C).
  Index capacity(Index tokens, Index experts) const {
    return opt_.capacity.slots_for(tokens, experts, "ExpertChoiceSelector");
  }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    const Index T = in.logits.rows(), E = in.logits.cols();
    detail::check_shape("ExpertChoiceSelector", "scores", in.scores, T, E);
    detail::check_shape("ExpertChoiceSelector", "rank", in.rank, T, E);
    detail::check_tokens("ExpertChoiceSelector", in.tokens, T, E);
    const std::span<const std::uint8_t> valid = in.tokens.valid;
    const Index real = count_valid(valid, T);
    const Index C = capacity(real, E);  // throws before anything is written
    const Index taken = std::min(C, real);

    fit(slot_token_, E * taken);
    kernels::top_c_per_column<S>(in.rank, taken, valid, real, slot_token_, scratch_,
                                 opt_.slot_order == SlotOrder::token);

    r.reset(T, E);
    r.num_valid_tokens = real;
    r.capacity = C;
    r.slot_token.swap(slot_token_);
    fit(r.slot_weight, E * taken);
    for (Index e = 0; e < E; ++e) {
      r.expert_offsets[e + 1] = (e + 1) * taken;
      r.expert_count[e] = taken;
      for (Index s = e * taken; s < (e + 1) * taken; ++s) r.slot_weight[s] = in.scores(r.slot_token[s], e);
    }
    // the inverse index: each token's choices in expert order (a counting sort by token)
    for (Index s = 0; s < E * taken; ++s) ++r.token_offsets[r.slot_token[s] + 1];
    for (Index t = 0; t < T; ++t) r.token_offsets[t + 1] += r.token_offsets[t];
    fit(r.choice_expert, E * taken);
    fit(r.choice_slot, E * taken);
    fit(cursor_, T);
    std::copy_n(r.token_offsets.begin(), T, cursor_.begin());
    for (Index e = 0; e < E; ++e)
      for (Index s = e * taken; s < (e + 1) * taken; ++s) {
        const Index c = cursor_[r.slot_token[s]]++;
        r.choice_expert[c] = std::int32_t(e);
        r.choice_slot[c] = std::int32_t(s);
      }
  }

  // A slot's weight is the score itself.
  void backward(const SelectorInput<S>&, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S>) {
    for (Index e = 0; e < r.num_experts; ++e)
      for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s) dscores(r.slot_token[s], e) += dslot_weight[s];
  }

private:
  Options opt_;
  std::vector<std::int32_t> slot_token_;  // the next routing's slots (swapped in)
  std::vector<Index> cursor_;
  kernels::TopCScratch<S> scratch_;
};

}  // namespace moe
