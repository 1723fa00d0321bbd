#pragma once
// Deterministic counting-sort slot assignment (ROUTERS.md §1.4): walk a priority sequence of
// (token, choice) pairs, let each expert keep its first `capacity` of them, then lay the kept
// pairs out grouped by expert, in token order or in priority order. Two linear passes and a
// prefix sum; no comparison sort, no atomics. scalar::assign_slots is the twin.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/routing.hpp"

namespace moe::kernels {

struct SlotRequest {
  std::span<const std::int32_t> choice_token;  // token of each choice
  std::span<const std::int32_t> order;         // the priority sequence: a permutation of the
                                               // choice ids, or empty for their own order
  Index capacity = -1;                         // slots per expert, -1 = unlimited
  bool pad = false;                            // every expert gets exactly `capacity` slots
  bool token_order = true;                     // slots by token (else by priority)
};

// Fills r.choice_slot, r.expert_count, r.expert_offsets and r.slot_token from r.choice_expert;
// r.slot_weight is sized and zeroed for the caller to fill. `cursor` is scratch.
template <class S>
void assign_slots(const SlotRequest& q, SparseRouting<S>& r, std::vector<Index>& cursor) {
  const Index experts = r.num_experts, choices = r.num_choices();
  fit(cursor, experts);
  std::fill(cursor.begin(), cursor.end(), 0);
  const auto keep_first = [&](Index c) {  // keep: the first C of each expert in priority order
    auto& n = cursor[r.choice_expert[c]];
    const bool keep = q.capacity < 0 || n < q.capacity;
    r.choice_slot[c] = keep ? 0 : -1;
    n += keep;
  };
  if (q.order.empty())
    for (Index c = 0; c < choices; ++c) keep_first(c);
  else
    for (const auto c : q.order) keep_first(c);
  r.expert_offsets[0] = 0;
  for (Index e = 0; e < experts; ++e) {
    r.expert_count[e] = cursor[e];
    r.expert_offsets[e + 1] = r.expert_offsets[e] + (q.pad ? q.capacity : cursor[e]);
  }
  const Index slots = r.expert_offsets[experts];
  r.slot_token.assign(std::size_t(slots), -1);
  r.slot_weight.assign(std::size_t(slots), S(0));
  std::copy_n(r.expert_offsets.begin(), experts, cursor.begin());  // now write cursors
  const auto place = [&](Index c) {
    if (r.choice_slot[c] < 0) return;
    const auto slot = cursor[r.choice_expert[c]]++;
    r.choice_slot[c] = std::int32_t(slot);
    r.slot_token[slot] = q.choice_token[c];
  };
  if (q.token_order || q.order.empty())
    for (Index c = 0; c < choices; ++c) place(c);  // choices are stored in token order
  else
    for (const auto c : q.order) place(c);
}

namespace scalar {
// The twin, by the definition: per expert, its candidates in priority order, the first C kept,
// then sorted by token when slots follow token order.
template <class S>
void assign_slots(const SlotRequest& q, SparseRouting<S>& r) {
  const Index experts = r.num_experts;
  std::vector<std::int32_t> order(q.order.begin(), q.order.end());
  if (order.empty())
    for (Index c = 0; c < r.num_choices(); ++c) order.push_back(std::int32_t(c));
  std::fill(r.choice_slot.begin(), r.choice_slot.end(), -1);
  r.slot_token.clear();
  r.expert_offsets.assign(std::size_t(experts + 1), 0);
  for (Index e = 0; e < experts; ++e) {
    std::vector<std::int32_t> kept;
    for (const auto c : order)
      if (r.choice_expert[c] == e && (q.capacity < 0 || Index(kept.size()) < q.capacity)) kept.push_back(c);
    if (q.token_order) std::sort(kept.begin(), kept.end());  // choice ids ascend with the token
    r.expert_count[e] = Index(kept.size());
    for (const auto c : kept) {
      r.choice_slot[c] = std::int32_t(r.slot_token.size());
      r.slot_token.push_back(q.choice_token[c]);
    }
    if (q.pad) r.slot_token.resize(r.slot_token.size() + std::size_t(q.capacity - Index(kept.size())), -1);
    r.expert_offsets[e + 1] = Index(r.slot_token.size());
  }
  r.slot_weight.assign(r.slot_token.size(), S(0));
}
}  // namespace scalar

}  // namespace moe::kernels
