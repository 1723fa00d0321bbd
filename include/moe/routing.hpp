#pragma once
// The routing result (docs/architecture.md, The routing contract): who goes to which expert slot
// with which combine weight, in the sparse index form every sparse router produces, plus
// conversions to the other common forms and the routing statistics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"

namespace moe {

template <class S>
struct SparseRouting {
  using scalar_type = S;

  Index num_tokens = 0;
  Index num_experts = 0;
  Index num_valid_tokens = 0;  // tokens not masked out
  Index capacity = -1;         // slots per expert, -1 when unlimited (dropless)

  // Slots grouped by expert (CSR): expert e owns slots [expert_offsets[e], expert_offsets[e+1]).
  // These are exactly the group sizes of a grouped GEMM or the counts of an MPI_Alltoallv.
  std::vector<Index> expert_offsets;
  std::vector<std::int32_t> slot_token;  // token in each slot; -1 for a padding slot
  std::vector<S> slot_weight;            // combine weight of each slot; 0 for a padding slot
  std::vector<Index> expert_count;       // real (non-padding) tokens per expert

  // The inverse index by token: token t's choices, in rank order, are
  // [token_offsets[t], token_offsets[t+1]); each names its expert and its slot, or -1 when the
  // choice was dropped by capacity. Combine is then a race-free per-token gather, and backward
  // knows which score fed which weight.
  std::vector<Index> token_offsets;
  std::vector<std::int32_t> choice_expert;
  std::vector<std::int32_t> choice_slot;

  Index num_slots() const { return static_cast<Index>(slot_token.size()); }
  Index num_choices() const { return static_cast<Index>(choice_expert.size()); }
  Index slots_of(Index e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
  Index num_dropped() const {
    return static_cast<Index>(std::count(choice_slot.begin(), choice_slot.end(), -1));
  }

  // Resets to an empty routing of the given shape without giving memory back.
  void reset(Index tokens, Index experts) {
    num_tokens = tokens;
    num_experts = experts;
    num_valid_tokens = 0;
    capacity = -1;
    fit(expert_offsets, experts + 1);
    fit(expert_count, experts);
    fit(token_offsets, tokens + 1);
    std::fill(expert_offsets.begin(), expert_offsets.end(), 0);
    std::fill(expert_count.begin(), expert_count.end(), 0);
    std::fill(token_offsets.begin(), token_offsets.end(), 0);
    slot_token.clear();
    slot_weight.clear();
    choice_expert.clear();
    choice_slot.clear();
  }
};

// The dense routing of Soft MoE (docs/architecture.md, The routing contract): every slot takes a
// convex combination of the real tokens, every real token a convex combination of every slot's
// output. Slots are grouped by expert: expert e owns the p contiguous slots
// [expert_offsets[e], expert_offsets[e+1]) = [e p, (e+1) p), so experts run on slot blocks exactly
// as they run on the token blocks of a SparseRouting.
template <class S>
struct SoftRouting {
  using scalar_type = S;

  Index num_tokens = 0;
  Index num_experts = 0;
  Index num_valid_tokens = 0;  // tokens not masked out
  Index slots_per_expert = 0;  // p

  std::vector<Index> expert_offsets;  // E + 1 entries, e p
  // dispatch[s, t]: weight of token t in slot s; each row sums to 1 over the real tokens (a
  // softmax over them) and is 0 at padding tokens (all 0 when no token is real).
  Matrix<S> dispatch;  // [E p, T]
  // combine[t, s]: weight of slot s's output in token t's; each real token's row sums to 1 (a
  // softmax over all slots); a padding token's row is 0, so its output is 0.
  Matrix<S> combine;  // [T, E p]

  Index num_slots() const { return num_experts * slots_per_expert; }
  Index slots_of(Index) const { return slots_per_expert; }

  void reset(Index tokens, Index experts, Index slots_per) {
    num_tokens = tokens;
    num_experts = experts;
    num_valid_tokens = 0;
    slots_per_expert = slots_per;
    fit(expert_offsets, experts + 1);
    for (Index e = 0; e <= experts; ++e) expert_offsets[static_cast<std::size_t>(e)] = e * slots_per;
    fit(dispatch, experts * slots_per, tokens);
    fit(combine, tokens, experts * slots_per);
  }
};

// Whether a routing type is the dense (soft) form.
template <class R>
inline constexpr bool is_soft_routing = false;
template <class S>
inline constexpr bool is_soft_routing<SoftRouting<S>> = true;

using IndexMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ---- conversions ------------------------------------------------------------------------------

// Largest number of choices of any token (the k of the dense [T, k] form).
template <class S>
Index max_choices(const SparseRouting<S>& r) {
  Index k = 0;
  for (Index t = 0; t < r.num_tokens; ++t) k = std::max(k, r.token_offsets[t + 1] - r.token_offsets[t]);
  return k;
}

// Dense [T, k] form (DeepSpeed/fairseq style): experts[t, j] is the j-th choice of token t in
// rank order and weights[t, j] its combine weight, 0 when the choice was dropped by capacity.
// Entries past a token's last choice (masked tokens, dynamic k) hold expert -1 and weight 0.
template <class S>
void to_topk_form(const SparseRouting<S>& r, IndexMatrix& experts, Matrix<S>& weights) {
  const Index k = max_choices(r);
  experts.setConstant(r.num_tokens, k, -1);
  weights.setZero(r.num_tokens, k);
  for (Index t = 0; t < r.num_tokens; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      const Index j = c - r.token_offsets[t];
      experts(t, j) = r.choice_expert[c];
      if (r.choice_slot[c] >= 0) weights(t, j) = r.slot_weight[r.choice_slot[c]];
    }
}

// Megatron form: routing_map[t, e] = 1 iff token t occupies a slot of expert e, probs[t, e] its
// combine weight (0 off the map).
template <class S>
void to_routing_map(const SparseRouting<S>& r, IndexMatrix& routing_map, Matrix<S>& probs) {
  routing_map.setZero(r.num_tokens, r.num_experts);
  probs.setZero(r.num_tokens, r.num_experts);
  for (Index t = 0; t < r.num_tokens; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      if (const auto s = r.choice_slot[c]; s >= 0) {
        routing_map(t, r.choice_expert[c]) = 1;
        probs(t, r.choice_expert[c]) = r.slot_weight[s];
      }
}

// Slots of the fullest expert: the C of the dense [T, E, C] tensors.
template <class S>
Index dense_capacity(const SparseRouting<S>& r) {
  Index c = 0;
  for (Index e = 0; e < r.num_experts; ++e) c = std::max(c, r.slots_of(e));
  return c;
}

// The full dispatch and combine tensors (docs/architecture.md, The routing contract), [T, E, C]
// flattened to [T, E*C] (column e*C + c is slot c of expert e). Meant for small tests and for
// interop.
template <class S>
void to_dispatch_combine(const SparseRouting<S>& r, Matrix<S>& dispatch, Matrix<S>& combine) {
  const Index cap = dense_capacity(r);
  dispatch.setZero(r.num_tokens, r.num_experts * cap);
  combine.setZero(r.num_tokens, r.num_experts * cap);
  for (Index e = 0; e < r.num_experts; ++e)
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
      if (const auto t = r.slot_token[s]; t >= 0) {
        const Index col = e * cap + (s - r.expert_offsets[e]);
        dispatch(t, col) = S(1);
        combine(t, col) = r.slot_weight[s];
      }
}

// ---- statistics -------------------------------------------------------------------------------

// Fraction of the (token, choice) pairs dropped by capacity.
template <class S>
double drop_fraction(const SparseRouting<S>& r) {
  return r.num_choices() == 0 ? 0.0 : double(r.num_dropped()) / double(r.num_choices());
}

// Coefficient of variation (population std / mean) of the per-expert token counts.
template <class S>
double load_cv(const SparseRouting<S>& r) {
  if (r.num_experts == 0) return 0.0;
  double mean = 0, sq = 0;
  for (const Index c : r.expert_count) mean += double(c);
  mean /= double(r.num_experts);
  if (mean == 0) return 0.0;
  for (const Index c : r.expert_count) sq += (double(c) - mean) * (double(c) - mean);
  return std::sqrt(sq / double(r.num_experts)) / mean;
}

// Load of the busiest expert over the mean load (1 = perfect balance).
template <class S>
double max_mean_load(const SparseRouting<S>& r) {
  if (r.num_experts == 0) return 0.0;
  double total = 0, most = 0;
  for (const Index c : r.expert_count) total += double(c), most = std::max(most, double(c));
  return total == 0 ? 0.0 : most / (total / double(r.num_experts));
}

// Mean number of experts that process a real token.
template <class S>
double experts_per_token(const SparseRouting<S>& r) {
  if (r.num_valid_tokens == 0) return 0.0;
  return double(r.num_choices() - r.num_dropped()) / double(r.num_valid_tokens);
}

// How many experts process each token, as a histogram of E + 1 bins: bin n counts the tokens
// with n kept choices (bin 0: no expert processed the token: masked, or every choice dropped).
// Over the tokens `valid` marks real (all tokens when it is empty); dynamic-k routers fill
// several bins, top-k routers without drops only bin k.
template <class S>
std::vector<Index> experts_per_token_histogram(const SparseRouting<S>& r, std::span<const std::uint8_t> valid = {}) {
  detail::require<shape_error>(valid.empty() || Index(valid.size()) == r.num_tokens, "experts_per_token_histogram",
                               "valid", valid.size(), "length 0 (absent) or the number of tokens");
  std::vector<Index> bins(static_cast<std::size_t>(r.num_experts + 1), 0);
  for (Index t = 0; t < r.num_tokens; ++t) {
    if (!valid.empty() && !valid[static_cast<std::size_t>(t)]) continue;
    Index kept = 0;
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) kept += r.choice_slot[c] >= 0;
    ++bins[static_cast<std::size_t>(std::min(kept, r.num_experts))];
  }
  return bins;
}

// How two routings of the same batch agree, token by token (the Omni-router's cross-layer
// statistic): over the tokens that kept a choice in both, the share whose first kept expert is the
// same (top1) and the mean Jaccard index of their kept expert sets (jaccard).
struct RoutingAgreement {
  double top1 = 0, jaccard = 0;
  Index tokens = 0;  // the tokens compared
};

template <class S>
RoutingAgreement routing_agreement(const SparseRouting<S>& a, const SparseRouting<S>& b) {
  detail::require<shape_error>(a.num_tokens == b.num_tokens && a.num_experts == b.num_experts, "routing_agreement",
                               "b.num_tokens", b.num_tokens,
                               "the shape of a: " + std::to_string(a.num_tokens) + " tokens over " +
                                   std::to_string(a.num_experts) + " experts");
  RoutingAgreement out;
  const auto first_kept = [](const SparseRouting<S>& r, Index t) -> std::int32_t {
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      if (r.choice_slot[c] >= 0) return r.choice_expert[c];
    return -1;
  };
  const auto kept = [](const SparseRouting<S>& r, Index t, std::int32_t e) {
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      if (r.choice_slot[c] >= 0 && r.choice_expert[c] == e) return true;
    return false;
  };
  for (Index t = 0; t < a.num_tokens; ++t) {
    const std::int32_t fa = first_kept(a, t), fb = first_kept(b, t);
    if (fa < 0 || fb < 0) continue;
    ++out.tokens;
    out.top1 += fa == fb;
    Index both = 0, either = 0;
    for (std::int32_t e = 0; e < a.num_experts; ++e) {
      const bool in_a = kept(a, t, e), in_b = kept(b, t, e);
      both += in_a && in_b;
      either += in_a || in_b;
    }
    out.jaccard += double(both) / double(either);
  }
  if (out.tokens > 0) out.top1 /= double(out.tokens), out.jaccard /= double(out.tokens);
  return out;
}

// Mean entropy (nats) of the router's per-token distributions over the valid tokens.
template <class S>
double router_entropy(MatrixIn<S> probs, std::span<const std::uint8_t> valid = {}) {
  detail::require<shape_error>(valid.empty() || Index(valid.size()) == probs.rows(), "router_entropy",
                               "valid", valid.size(), "length 0 (absent) or the number of rows");
  double sum = 0;
  Index n = 0;
  for (Index t = 0; t < probs.rows(); ++t) {
    if (!valid.empty() && !valid[static_cast<std::size_t>(t)]) continue;
    for (Index e = 0; e < probs.cols(); ++e)
      if (probs(t, e) > 0) sum -= double(probs(t, e)) * std::log(double(probs(t, e)));
    ++n;
  }
  return n == 0 ? 0.0 : sum / double(n);
}

}  // namespace moe
