#pragma once
// The routing of a depth router (docs/selectors.md, Depth routing): one expert, the block, whose
// slots are the tokens that run it, in token order. A token that does not run the block has no
// choice; the layer's skip path carries it (y = x).
#include <cstdint>
#include <span>

#include "moe/routing.hpp"

namespace moe::detail {

// `run` (ascending tokens) and their combine weights -> r; `capacity` is what the routing reports.
template <class S>
void block_routing(SparseRouting<S>& r, Index tokens, Index real, std::span<const std::int32_t> run,
                   std::span<const S> weight, Index capacity) {
  const Index n = Index(run.size());
  r.reset(tokens, 1);
  r.num_valid_tokens = real;
  r.capacity = capacity;
  r.slot_token.assign(run.begin(), run.end());
  r.slot_weight.assign(weight.begin(), weight.end());
  r.expert_offsets[1] = n;
  r.expert_count[0] = n;
  r.choice_expert.assign(std::size_t(n), 0);
  fit(r.choice_slot, n);
  for (Index s = 0; s < n; ++s) {
    r.choice_slot[s] = std::int32_t(s);
    r.token_offsets[run[std::size_t(s)] + 1] = 1;
  }
  for (Index t = 0; t < tokens; ++t) r.token_offsets[t + 1] += r.token_offsets[t];
}

// A slot's weight is the block's score itself (Mixture-of-Depths) or stands in for it on the way
// back (MindSkip's straight-through 0/1 decision): either way d(score) += d(weight).
template <class S>
void block_backward(const SparseRouting<S>& r, std::span<const S> dslot_weight, MatrixOut<S> dscores) {
  for (Index s = 0; s < r.num_slots(); ++s) dscores(r.slot_token[s], 0) += dslot_weight[s];
}

}  // namespace moe::detail
