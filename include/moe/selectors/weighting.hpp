#pragma once
// Combine weights of the token-choice selectors (docs/selectors.md, Weighting): the rules, and
// the parts every token-choice selector shares whatever the number of choices of a token (fixed
// k, top-p, per-token k): the renormalisation of a token's survivors after capacity dropped some
// of its choices, and the gradient of the score-based rules.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>

#include "moe/core/tensor.hpp"
#include "moe/routing.hpp"

namespace moe {

enum class Weighting {
  raw,                      // the gate score itself (Switch, DeepSpeed top-1, flaxformer, vmoe)
  renormalize_before_drop,  // over the k choices, then zeroed if dropped (GShard paper, Megatron)
  renormalize_after_drop,   // over the surviving choices (fairseq/DeepSpeed top-2, DeepSpeed top-k)
  softmax_of_kept_logits,   // softmax over the k chosen logits (Shazeer KeepTopK, Mixtral)
  p_norm,                   // p / ||p of the k choices||_q, q = Options::norm_p, then zeroed if
                            // dropped (DBRX moe_normalize_expert_weights)
};

namespace detail {

// fairseq/DeepSpeed clamp the renormalisation denominator at float epsilon (for double too).
template <class S>
constexpr S weight_floor() {
  return S(std::numeric_limits<float>::epsilon());
}

// The denominator of a renormalisation from the sum of the scores: clamped below at float epsilon
// (fairseq, DeepSpeed: the default), or, when `added` > 0, that much added to it (PHATGOOSE and
// GLIDER divide by sum + 1e-6).
template <class S>
struct Renormalizer {
  S added = 0;
  S operator()(S sum) const { return added > 0 ? sum + added : std::max(sum, weight_floor<S>()); }
  bool clamped(S sum) const { return added <= 0 && sum < weight_floor<S>(); }
};

// Weighting::renormalize_after_drop once the slots are known: a token that lost some but not all
// of its choices gives its survivors scale * p / (sum of the survivors' p) again. choice_score
// holds each choice's gate score, in the routing's choice order.
// A token's pre-drop weights from the scores of its n choices: scale * p, or renormalised,
// scale * (p / z) with z = max(sum p, floor), so equal scores keep equal weights.
template <class S>
void pre_drop_weights(const S* score, Index n, bool renormalize, S scale, S* weight) {
  if (!renormalize) {
    for (Index j = 0; j < n; ++j) weight[j] = scale * score[j];
    return;
  }
  S z = 0;
  for (Index j = 0; j < n; ++j) z += score[j];
  z = std::max(z, weight_floor<S>());
  for (Index j = 0; j < n; ++j) weight[j] = scale * (score[j] / z);
}

template <class S>
void renormalize_survivors(SparseRouting<S>& r, std::span<const std::int32_t> choice_token,
                           std::span<const S> choice_score, S scale, Renormalizer<S> denominator = {}) {
  for (Index c = 0; c < r.num_choices(); ++c) {
    if (r.choice_slot[c] >= 0) continue;
    const Index t = choice_token[c], lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
    S kept = 0;
    for (Index i = lo; i < hi; ++i)
      if (r.choice_slot[i] >= 0) kept += choice_score[i];
    const S z = denominator(kept);
    for (Index i = lo; i < hi; ++i)
      if (const auto s = r.choice_slot[i]; s >= 0) r.slot_weight[s] = scale * (choice_score[i] / z);
  }
}

// d(slot weights) -> d(scores) for the weightings that are functions of the scores (raw and the
// two renormalisations), any number of choices per token; accumulated into dscores.
template <class S>
void add_weighting_gradient(Weighting weighting, S scale, MatrixIn<S> scores, const SparseRouting<S>& r,
                            std::span<const S> dslot_weight, MatrixOut<S> dscores, Renormalizer<S> denominator = {}) {
  MOE_ASSERT(weighting != Weighting::softmax_of_kept_logits);
  const bool after = weighting == Weighting::renormalize_after_drop;
  for (Index t = 0; t < r.num_tokens; ++t) {
    const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
    const auto dw = [&](Index c) { return r.choice_slot[c] >= 0 ? dslot_weight[r.choice_slot[c]] : S(0); };
    if (weighting == Weighting::raw) {
      for (Index c = lo; c < hi; ++c) dscores(t, r.choice_expert[c]) += scale * dw(c);
      continue;
    }
    S z = 0, inner = 0;  // w_c = scale p_c / denominator(z) for the kept c
    for (Index c = lo; c < hi; ++c) {
      const S p = scores(t, r.choice_expert[c]);
      if (!after || r.choice_slot[c] >= 0) z += p;
      inner += dw(c) * p;
    }
    const bool clamped = denominator.clamped(z);
    const S zc = denominator(z);
    for (Index c = lo; c < hi; ++c) {
      S g = dw(c) / zc;
      if (!clamped && (!after || r.choice_slot[c] >= 0)) g -= inner / (zc * zc);
      dscores(t, r.choice_expert[c]) += scale * g;
    }
  }
}

}  // namespace detail
}  // namespace moe
