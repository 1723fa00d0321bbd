#pragma once
// The papers' routers (docs/routers.md): each preset is an alias of moe::Router plus a make_
// function that fills in the reference's defaults, its padding convention included (the last
// argument picks another). Nothing here is a new class.
#include <optional>
#include <vector>

#include "moe/gates/expert_bias.hpp"
#include "moe/gates/identity.hpp"
#include "moe/gates/gumbel.hpp"
#include "moe/gates/sinkhorn.hpp"
#include "moe/gates/sigmoid.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/gates/straight_through.hpp"
#include "moe/losses/depth_predictor.hpp"
#include "moe/losses/entropy.hpp"
#include "moe/losses/importance.hpp"
#include "moe/losses/load_balance.hpp"
#include "moe/losses/normalized_balance.hpp"
#include "moe/losses/noisy_load.hpp"
#include "moe/losses/skip_capacity.hpp"
#include "moe/losses/z_loss.hpp"
#include "moe/router.hpp"
#include "moe/scorers/attention.hpp"
#include "moe/scorers/cosine.hpp"
#include "moe/scorers/depth.hpp"
#include "moe/scorers/glider.hpp"
#include "moe/scorers/hyper.hpp"
#include "moe/scorers/linear.hpp"
#include "moe/scorers/noisy_linear.hpp"
#include "moe/scorers/normalized_slots.hpp"
#include "moe/scorers/shared.hpp"
#include "moe/scorers/task.hpp"
#include "moe/scorers/vq.hpp"
#include "moe/selectors/depth_threshold.hpp"
#include "moe/selectors/depth_top_c.hpp"
#include "moe/selectors/dynamic_k.hpp"
#include "moe/selectors/expert_choice.hpp"
#include "moe/selectors/group_limited.hpp"
#include "moe/selectors/k_schedule.hpp"
#include "moe/selectors/nearest_code.hpp"
#include "moe/selectors/soft_slots.hpp"
#include "moe/selectors/sparsity_constrained.hpp"
#include "moe/selectors/top_k.hpp"
#include "moe/selectors/top_p.hpp"

namespace moe {

// Switch Transformer (Fedus et al. 2021): top-1, raw softmax weight, capacity ceil(cf T/E),
// first-come slots, Switch load-balancing loss (alpha 1e-2), router init scale 0.1. Padding as
// DeepSpeed's top1gating masks it (used_token): not routed, but counted in C and the loss's means.
template <scalar S>
using SwitchRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S, 1>, LoadBalanceLoss<S>>;

// GShard (Lepikhin et al. 2020) top-2 with the deterministic second expert (fairseq policy
// 'all'): capacity ceil(2 cf T/E), all first choices before any second one, weights
// renormalised over the surviving choices (fairseq default), loss from first choices, padding as
// fairseq counts it (not routed; C and the loss's means over all T).
template <scalar S>
using GShardRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S, 2>, LoadBalanceLoss<S>>;

// Generic dropless top-k as in Mixtral: softmax over the k kept logits, Megatron-normalised
// load-balancing loss (1e-2) and router z-loss (1e-3, ST-MoE); padding routed as Megatron-Core
// and Hugging Face Mixtral route it, and left out of the losses.
template <scalar S>
using TopKRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>, LoadBalanceLoss<S>, ZLoss<S>>;

// DeepSpeed's TopKGate (Rajbhandari et al. 2022), which picks its gating function by k:
// - k = 1, `top1gating`: capacity max(ceil(cf T/E), 8), random token selection (use_rts, at
//   evaluation too) with token-order slots, the raw weight, loss E sum f P from the choices
//   before dropping; padding as its used_token mask counts it (fairseq);
// - k = 2, `top2gating`: capacity max(ceil(2 cf T/E), 8), the second expert Gumbel-sampled
//   (top2_2nd_expert_sampling, at evaluation too), first choices before second ones with slots
//   in that order, weights renormalised after dropping, the same loss;
// - k > 2, `topkgating`: capacity max(ceil(k cf T/E), 8), its 'probs' drop order (per expert,
//   the top C of the logits of the choices against 0 for every other token: by_masked_logit),
//   token-order slots, weights renormalised after dropping, loss (E/k) sum f P over all choices.
// Its noisy_gate_policy (none by default) is DeepSpeedNoise's.
template <scalar S>
using DeepSpeedTopKRouter = Router<LinearScorer<S>, GumbelGate<SoftmaxGate<S>>, TopKSelector<S>, LoadBalanceLoss<S>>;

// DeepSpeed's noise options; every draw is keyed by `seed` (docs/architecture.md, Randomness).
enum class NoisyGatePolicy {
  none,
  jitter,   // "Jitter": the router's input times U(1 - 1e-2, 1 + 1e-2), in training
  rsample,  // "RSample": k = 1 picks argmax(logits + Gumbel noise), in training
};
struct DeepSpeedNoise {
  NoisyGatePolicy noisy_gate_policy = NoisyGatePolicy::none;
  bool use_rts = true;                   // k = 1: random token selection
  bool top2_2nd_expert_sampling = true;  // k = 2: the Gumbel-sampled second expert
  std::uint64_t seed = 0;
};

// X-MoE (Chi et al. 2022) as torchscale's Top1Gate / Top2Gate with use_xmoe: cosine scorer on a
// 16-dimensional projection, fairseq top-1 (raw weight, capacity cf ceil(T/E)) or top-2
// (deterministic second expert, 2 ceil(T/E) slots, weights renormalised after dropping),
// balance loss from first choices (1e-2).
template <scalar S>
using XMoERouter = Router<CosineScorer<S>, SoftmaxGate<S>, TopKSelector<S>, LoadBalanceLoss<S>>;

// DeepSeek-V3 (DeepSeek-AI, arXiv 2412.19437): sigmoid scores, a selection-only expert bias
// (auxiliary-loss-free balancing, update rate 1e-3, stepped by the caller), group-limited top-k
// (k = 8 among 4 of 8 groups, a group scored by its top 2), weights s / sum of the chosen s times
// 2.5, no dropping, sequence-wise balance loss 1e-4 on the renormalised scores.
template <scalar S>
using DeepSeekV3Router = Router<LinearScorer<S>, ExpertBiasGate<SigmoidGate<S>>, GroupLimitedTopKSelector<S>,
                                NormalizedBalanceLoss<S>>;

// Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538) as tensor2tensor's
// noisy_top_k_gating and the PyTorch port davidmrau/mixture-of-experts: learned noise
// softplus(x W_noise^T) + 1e-2 in training, both matrices starting at 0, softmax over the k kept
// noisy logits, dropless, importance (of those weights) + load (through the normal CDF), one
// coefficient 1e-2 on each; CV² as tensor2tensor writes it unless `cv` says otherwise.
template <scalar S>
using NoisyTopKRouter = Router<NoisyLinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>, ImportanceLoss<S>, NoisyLoadLoss<S>>;

// V-MoE (Riquelme et al. 2021, arXiv 2106.05974) as vmoe's NoisyTopExpertsPerItemRouter: noise
// N(0, (1/E)^2) on the logits in training, softmax of the noisy logits, top-k with the raw
// weights, capacity ceil(k cf T / E) rounded up to a multiple of 4 (cf 1.05, vmoe_paper), batch
// priority routing (the paper's training configs turn it off: batch_priority = false), importance
// of the clean softmax + load, 0.005 each, CV² = (std / mean)².
template <scalar S>
using VMoERouter = Router<NoisyLinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>, ImportanceLoss<S>, NoisyLoadLoss<S>>;

// Batch prioritized routing alone: vmoe's router with noise_std = 0, which then has the
// importance loss only (gshard_loss_weight defaults to 0): no noise, softmax, raw top-k weights,
// V-MoE capacity, tokens ranked by their top score.
template <scalar S>
using BPRRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>, ImportanceLoss<S>>;

namespace detail {
// Switch's top-1: raw weight, capacity ceil(cf T / E), slots in the order won.
template <scalar S>
TopKSelector<S, 1> switch_selector(double capacity_factor, Padding padding) {
  return TopKSelector<S, 1>({.weighting = Weighting::raw,
                             .capacity = {.factor = capacity_factor,
                                          .overflow = OverflowOrder::rank_major,
                                          .slot_order = SlotOrder::priority},
                             .padding = padding});
}
}  // namespace detail

template <scalar S>
SwitchRouter<S> make_switch_router(Index dim, Index experts, double capacity_factor = 1.25,
                                   std::uint64_t seed = 0, Padding padding = Padding::fairseq) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .init_scale = 0.1, .seed = seed}), SoftmaxGate<S>{},
          detail::switch_selector<S>(capacity_factor, padding), LoadBalanceLoss<S>(BalanceNorm::switch_top1, S(1e-2), padding)};
}

template <scalar S>
GShardRouter<S> make_gshard_router(Index dim, Index experts, double capacity_factor = 1.0,
                                   std::uint64_t seed = 0, Padding padding = Padding::fairseq) {
  return {LinearScorer<S>(dim, experts, {.seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S, 2>({.weighting = Weighting::renormalize_after_drop,
                              .capacity = {.factor = capacity_factor,
                                           .overflow = OverflowOrder::rank_major,
                                           .slot_order = SlotOrder::priority},
                              .padding = padding}),
          LoadBalanceLoss<S>(BalanceNorm::switch_top1, S(1e-2), padding)};
}

template <scalar S>
TopKRouter<S> make_topk_router(Index dim, Index experts, Index k = 2, std::uint64_t seed = 0,
                               Padding padding = Padding::megatron) {
  return {LinearScorer<S>(dim, experts, {.seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::softmax_of_kept_logits, .padding = padding}),
          LoadBalanceLoss<S>(BalanceNorm::megatron, S(1e-2), padding), ZLoss<S>(S(1e-3))};
}

template <scalar S>
DeepSpeedTopKRouter<S> make_deepspeed_topk_router(Index dim, Index experts, Index k = 2,
                                                  double capacity_factor = 1.0,
                                                  Index min_capacity = 8, std::uint64_t seed = 0,
                                                  std::optional<Padding> padding = std::nullopt,
                                                  DeepSpeedNoise noise = {}) {
  // Only top1gating takes a padding mask (used_token, counted as fairseq does); the others take
  // none, so the library's convention stands in.
  const Padding pad = padding.value_or(k == 1 ? Padding::fairseq : Padding::excluded);
  const Draws in_training{.seed = noise.seed}, always{.seed = noise.seed, .at_evaluation = true};
  const Sampled sampled = k == 1 && noise.noisy_gate_policy == NoisyGatePolicy::rsample ? Sampled::all
                          : k == 2 && noise.top2_2nd_expert_sampling                    ? Sampled::after_first
                                                                                        : Sampled::none;
  const OverflowOrder overflow = k == 1 ? (noise.use_rts ? OverflowOrder::random : OverflowOrder::rank_major)
                                 : k == 2 ? OverflowOrder::rank_major
                                          : OverflowOrder::by_masked_logit;
  return {LinearScorer<S>(dim, experts, {.seed = seed,
                                         .jitter = noise.noisy_gate_policy == NoisyGatePolicy::jitter ? 1e-2 : 0.0,
                                         .jitter_draws = in_training}),
          GumbelGate<SoftmaxGate<S>>({.sampled = sampled, .draws = sampled == Sampled::all ? in_training : always}),
          TopKSelector<S>(k, {.weighting = k == 1 ? Weighting::raw : Weighting::renormalize_after_drop,
                              .capacity = {.factor = capacity_factor,
                                           .minimum = min_capacity,
                                           .overflow = overflow,
                                           .slot_order = k == 2 ? SlotOrder::priority : SlotOrder::token},
                              .padding = pad,
                              .draws = always}),
          LoadBalanceLoss<S>(k <= 2 ? BalanceNorm::switch_top1 : BalanceNorm::topk_mean, S(1e-2), pad)};
}

// k = 1 is torchscale's Top1Gate, k = 2 its Top2Gate (the reference has no other k).
// `form` picks the torchscale code's scorer (default) or the paper's (docs/routers.md, XMoERouter).
template <scalar S>
XMoERouter<S> make_xmoe_router(Index dim, Index experts, Index k = 2, double capacity_factor = 1.0,
                               std::uint64_t seed = 0, CosineForm form = CosineForm::torchscale,
                               Padding padding = Padding::fairseq) {
  detail::require<config_error>(k == 1 || k == 2, "make_xmoe_router", "k", k,
                                "k = 1 (Top1Gate) or k = 2 (Top2Gate)");
  // k = 1: C = ceil(cf T / E) (the reference: int(cf ceil(T / E)), the same at cf = 1);
  // k = 2: C = ceil(2 cf T / E) rounded up to even, which is 2 ceil(T / E) at cf = 1.
  return {CosineScorer<S>(dim, experts, {.form = form, .seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = k == 1 ? Weighting::raw : Weighting::renormalize_after_drop,
                              .capacity = {.factor = capacity_factor,
                                           .multiple_of = k,
                                           .overflow = OverflowOrder::rank_major,
                                           .slot_order = SlotOrder::priority},
                              .padding = padding}),
          LoadBalanceLoss<S>(BalanceNorm::switch_top1, S(1e-2), padding)};
}

template <scalar S>
DeepSeekV3Router<S> make_deepseek_v3_router(Index dim, Index experts = 256, Index k = 8, Index groups = 8,
                                            Index groups_kept = 4, std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}),
          ExpertBiasGate<SigmoidGate<S>>(experts, {.update_rate = 1e-3}),
          GroupLimitedTopKSelector<S>(k, {.count = groups, .keep = groups_kept},
                                      {.weighting = Weighting::renormalize_before_drop, .scale = 2.5}),
          NormalizedBalanceLoss<S>(S(1e-4), {.scope = BalanceScope::sequence, .count = BalanceCount::plain_top_k})};
}

// k = 2 as tensor2tensor's default (the PyTorch port's is 4); `cv` = CVSquared::pytorch_port
// reproduces the port's unbiased variance.
template <scalar S>
NoisyTopKRouter<S> make_noisy_topk_router(Index dim, Index experts, Index k = 2,
                                          CVSquared cv = CVSquared::tensor2tensor, std::uint64_t seed = 0) {
  return {NoisyLinearScorer<S>(dim, experts, {.scale = NoiseScale::learned, .seed = seed, .draws = {.seed = seed}}),
          SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::softmax_of_kept_logits}),
          ImportanceLoss<S>(S(1e-2), {.source = ImportanceSource::kept_softmax, .cv = cv}),
          NoisyLoadLoss<S>(k, S(1e-2), {.threshold = LoadThreshold::shazeer, .cv = cv})};
}

namespace detail {
// vmoe get_top_experts_per_item_dispatcher: ceil(k cf T / E) up to a multiple of 4, all first
// choices before second ones, slots in the order they are won.
inline Capacity vmoe_capacity(double capacity_factor, bool batch_priority) {
  return {.factor = capacity_factor,
          .multiple_of = 4,
          .overflow = batch_priority ? OverflowOrder::batch_priority : OverflowOrder::rank_major,
          .slot_order = SlotOrder::priority};
}
}  // namespace detail

// E = 32 and k = 2 are the paper's V-MoE models; batch_priority = false is vmoe_paper's
// training configuration.
template <scalar S>
VMoERouter<S> make_vmoe_router(Index dim, Index experts = 32, Index k = 2, double capacity_factor = 1.05,
                               bool batch_priority = true, double noise_std = 1.0, std::uint64_t seed = 0) {
  return {NoisyLinearScorer<S>(dim, experts, {.scale = NoiseScale::fixed, .noise_std = noise_std, .seed = seed,
                                              .draws = {.seed = seed}}),
          SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::raw, .capacity = detail::vmoe_capacity(capacity_factor, batch_priority)}),
          ImportanceLoss<S>(S(0.005), {.source = ImportanceSource::clean_softmax, .cv = CVSquared::vmoe}),
          NoisyLoadLoss<S>(k, S(0.005), {.threshold = LoadThreshold::vmoe, .cv = CVSquared::vmoe})};
}

template <scalar S>
BPRRouter<S> make_bpr_router(Index dim, Index experts = 32, Index k = 2, double capacity_factor = 1.05,
                             std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::raw, .capacity = detail::vmoe_capacity(capacity_factor, true)}),
          ImportanceLoss<S>(S(0.005), {.source = ImportanceSource::clean_softmax, .cv = CVSquared::vmoe})};
}


// Expert choice (Zhou et al. 2022, arXiv 2202.09368) as vmoe's NoisyTopItemsPerExpertRouter:
// noise N(0, (1/E)^2) on the logits in training, softmax of the noisy logits, each expert takes
// its top C = ceil(cf T / E) tokens, rounded up to a multiple of 4, ties to the lower token, slots
// by descending score, the score as the combine weight, no auxiliary loss.
template <scalar S>
using ExpertChoiceRouter = Router<NoisyLinearScorer<S>, SoftmaxGate<S>, ExpertChoiceSelector<S>>;

// Which side chooses: tokens their top k experts, or experts their top C tokens.
enum class Choice { token, expert };

// Sinkhorn routing ("Routers in Vision MoE", Liu et al. 2024, arXiv 2401.15969), as vmoe's
// KLProjectionNoisyTopExpertsPerItemRouter (Choice::token) and
// KLProjectionNoisyTopItemsPerExpertRouter (Choice::expert): the noisy logits of V-MoE, a
// balanced plan by 20 Sinkhorn rounds (ott-jax, epsilon 1), the top k experts per token
// (capacity as V-MoE's, first choices first) or the top C tokens per expert of the plan, the
// softmax as combine weights, no auxiliary loss. make_sbase_router gives Megatron's S-BASE.
template <scalar S, Choice mode = Choice::token>
using SinkhornRouter = Router<NoisyLinearScorer<S>, SinkhornGate<S>,
                              std::conditional_t<mode == Choice::token, TopKSelector<S>, ExpertChoiceSelector<S>>>;

// Sparsity-constrained expert choice ("Routers in Vision MoE") as vmoe's
// KSparseProjectionTransportTopItemsPerExpertRouter: softmax scores (no noise), each expert takes
// its top C tokens of the C-sparse transport plan of the scores (C = ceil(cf T / E) up to a
// multiple of 4), the softmax as combine weights, no auxiliary loss.
template <scalar S>
using SparsityConstrainedECRouter = Router<LinearScorer<S>, SoftmaxGate<S>, SparsityConstrainedECSelector<S>>;

// cf is vmoe's capacity_factor of expert choice, the paper's c (EC-CF2: 2).
template <scalar S>
ExpertChoiceRouter<S> make_expert_choice_router(Index dim, Index experts, double capacity_factor = 2.0,
                                                double noise_std = 1.0, std::uint64_t seed = 0) {
  return {NoisyLinearScorer<S>(dim, experts, {.scale = NoiseScale::fixed, .noise_std = noise_std, .seed = seed,
                                              .draws = {.seed = seed}}),
          SoftmaxGate<S>{}, ExpertChoiceSelector<S>({.capacity = {.factor = capacity_factor}})};
}

// Both modes take the same k and cf: token choice has C = ceil(k cf T / E) slots per expert as
// V-MoE, and expert choice the same C (vmoe's expert-choice capacity_factor k cf), so the two
// compare at equal compute as in the paper.
template <scalar S, Choice mode = Choice::token>
SinkhornRouter<S, mode> make_sinkhorn_router(Index dim, Index experts = 32, Index k = 2, double capacity_factor = 1.05,
                                             double noise_std = 1.0, std::uint64_t seed = 0) {
  NoisyLinearScorer<S> scorer(dim, experts, {.scale = NoiseScale::fixed, .noise_std = noise_std, .seed = seed,
                                             .draws = {.seed = seed}});
  if constexpr (mode == Choice::token) {
    return {std::move(scorer), SinkhornGate<S>{},
            TopKSelector<S>(k, {.weighting = Weighting::raw, .capacity = detail::vmoe_capacity(capacity_factor, false)})};
  } else {
    detail::require<config_error>(k >= 1, "make_sinkhorn_router", "k", k, "k >= 1");
    return {std::move(scorer), SinkhornGate<S>{},
            ExpertChoiceSelector<S>({.capacity = {.factor = double(k) * capacity_factor}})};
  }
}

// S-BASE (Clark et al. 2022, arXiv 2202.01169) as Megatron-Core's load_balancing_type "sinkhorn":
// in training the top k experts of its Sinkhorn plan (run until the column scaling changes by at
// most 1e-4 on average), in evaluation of the scores; weights the sigmoid (k = 1) or the softmax
// of the logits, not renormalised; dropless; no auxiliary loss (Megatron requires its
// coefficient to be 0); padding routed, and planned, as Megatron does it.
template <scalar S>
SinkhornRouter<S, Choice::token> make_sbase_router(Index dim, Index experts, Index k = 2, std::uint64_t seed = 0,
                                                  Padding padding = Padding::megatron) {
  return {NoisyLinearScorer<S>(dim, experts, {.scale = NoiseScale::fixed, .noise_std = 0.0, .seed = seed}),
          SinkhornGate<S>({.form = SinkhornForm::megatron,
                           .scores = k == 1 ? SinkhornScores::sigmoid : SinkhornScores::softmax,
                           .plan_padding = padding == Padding::megatron}),
          TopKSelector<S>(k, {.weighting = Weighting::raw, .padding = padding})};
}

// cf is vmoe's capacity_factor: C = ceil(cf T / E) up to a multiple of 4, also the plan's
// non-zeros per expert.
template <scalar S>
SparsityConstrainedECRouter<S> make_sparsity_constrained_ec_router(Index dim, Index experts, double capacity_factor = 2.0,
                                                                   std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .init_scale = 1.0, .seed = seed}), SoftmaxGate<S>{},
          SparsityConstrainedECSelector<S>({.capacity = {.factor = capacity_factor}})};
}

// ---- dynamic k (docs/routers.md, TopPRouter, XMoEThresholdRouter, DynamicKRouter) -------------

// Top-p routing (Huang et al., "Harder Tasks Need More Experts", ACL 2024) as ZhenweiAn/Dynamic_MoE
// routes: softmax, experts by descending probability until the cumulative probability exceeds
// p = 0.4 (the crossing expert included), weight = the raw probability, dropless; the paper's
// training losses: a Switch-style balance loss over the dynamic assignments (1e-2) and the
// entropy ("dynamic") loss (1e-4).
template <scalar S>
using TopPRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopPSelector<S>, LoadBalanceLoss<S>, EntropyLoss<S>>;

// XMoE's threshold gating (Yang et al., "XMoE: Sparse Models with Fine-grained and Adaptive
// Expert Selection", 2024) as ysngki/XMoE's main_thresholdGating: an expert is taken while the
// mass before it is below the threshold 0.9, capacity max(ceil(cf T / E), min_capacity) (cf 8,
// minimum 4 in its run script), first choices before second ones and, within a rank, higher
// probability first; raw weights; balance loss from first choices (0.01).
template <scalar S>
using XMoEThresholdRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopPSelector<S>, LoadBalanceLoss<S>>;

// Per-token k (DA-MoE, Aghdam, Jin, Wu 2024): token t takes its top k_t experts, k_t =
// clamp(ceil(k_max I_t / max I), 1, k_max) from the importance in TokenInputs::importance; Switch
// conventions otherwise: raw weights, capacity ceil(cf sum_t k_t / E), first choices first,
// balance loss normalised by the mean k.
template <scalar S>
using DynamicKRouter = Router<LinearScorer<S>, SoftmaxGate<S>, DynamicKSelector<S>, LoadBalanceLoss<S>>;

template <scalar S>
TopPRouter<S> make_top_p_router(Index dim, Index experts, double p = 0.4, std::uint64_t seed = 0,
                                Padding padding = Padding::excluded) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), SoftmaxGate<S>{},
          TopPSelector<S>({.p = p, .boundary = TopPBoundary::exceeds, .weighting = Weighting::raw, .padding = padding}),
          LoadBalanceLoss<S>(BalanceNorm::flaxformer, S(1e-2), padding), EntropyLoss<S>(S(1e-4))};
}

template <scalar S>
XMoEThresholdRouter<S> make_xmoe_threshold_router(Index dim, Index experts, double threshold = 0.9,
                                                  double capacity_factor = 8.0, Index min_capacity = 4,
                                                  std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), SoftmaxGate<S>{},
          TopPSelector<S>({.p = threshold,
                           .boundary = TopPBoundary::reaches,
                           .weighting = Weighting::raw,
                           .capacity = {.factor = capacity_factor,
                                        .times_k = false,
                                        .minimum = min_capacity,
                                        .overflow = OverflowOrder::rank_major_by_score,
                                        .slot_order = SlotOrder::priority}}),
          LoadBalanceLoss<S>(BalanceNorm::switch_top1, S(1e-2))};
}

// capacity_factor = std::nullopt: dropless.
template <scalar S>
DynamicKRouter<S> make_dynamic_k_router(Index dim, Index experts, Index k_max = 4,
                                        std::optional<double> capacity_factor = 1.25, std::uint64_t seed = 0,
                                        Padding padding = Padding::excluded) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), SoftmaxGate<S>{},
          DynamicKSelector<S>(k_max, {.weighting = Weighting::raw,
                                      .capacity = {.factor = capacity_factor,
                                                   .overflow = OverflowOrder::rank_major,
                                                   .slot_order = SlotOrder::priority},
                                      .padding = padding}),
          LoadBalanceLoss<S>(BalanceNorm::megatron, S(1e-2), padding)};
}

// ---- soft routing (docs/routers.md, SoftMoERouter) --------------------------------------------

// Soft MoE (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", ICLR 2024) as vmoe's
// SoftRouter: logits = scale <x_hat, phi_hat_s> over E p slots (both sides L2-normalised, phi
// LeCun-normal, scale 1), dispatch = softmax over the tokens of each slot, combine = softmax over
// all slots of each token; p = 1 slot per expert (the paper's configs), no noise, no auxiliary
// loss. Not causal: every slot mixes every token of the group.
template <scalar S>
using SoftMoERouter = Router<NormalizedSlotsScorer<S>, IdentityGate<S>, SoftSlotsSelector<S>>;

// slots_per_expert is vmoe's num_slots; soft_moe_slots_per_expert(group size, experts, cf) gives
// it from a capacity factor as vmoe does when num_slots is not set.
template <scalar S>
SoftMoERouter<S> make_soft_moe_router(Index dim, Index experts, Index slots_per_expert = 1, std::uint64_t seed = 0) {
  return {NormalizedSlotsScorer<S>(dim, experts, slots_per_expert, {.scale = 1.0, .seed = seed}), IdentityGate<S>{},
          SoftSlotsSelector<S>(slots_per_expert)};
}

// ---- learned routers (docs/routers.md, AttentionRouter, GliderRouter, TaskRouter, HyperRouter) -

// Yuan 2.0-M32's attention router (IEIT-Yuan, "Yuan 2.0-M32: Mixture of Experts with Attention
// Router", 2024) as its Hugging Face model code routes: per token q, k, v = W x in R^E (one
// fused [3E, D] weight, no bias), logits = softmax(q k^T) v (no scaling), then softmax, top-2 and
// the two probabilities renormalised; dropless, no auxiliary loss (the released scripts' load
// balancing type "none"). E = 32 in Yuan 2.0-M32. `chunk` > 1 is the training operator's head of
// several tokens (not causal).
template <scalar S>
using AttentionRouter = Router<AttentionScorer<S>, SoftmaxGate<S>, TopKSelector<S>>;

template <scalar S>
AttentionRouter<S> make_attention_router(Index dim, Index experts = 32, Index k = 2, Index chunk = 1,
                                         std::uint64_t seed = 0) {
  return {AttentionScorer<S>(dim, experts, {.chunk = chunk, .seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::renormalize_before_drop})};
}

// GLIDER (Li et al., "Glider: Global and Local Instruction-Driven Expert Router", EMNLP 2025) as
// UNITES-Lab/glider's MoLoRALinearLayer routes: logits = V LN(x) / sqrt(D) + alpha cos(u, q)
// (the segment's instruction embedding q against each expert's u; alpha = 100, the paper's T0
// held-in runs), softmax, top-2, weights p / (sum + 1e-6); dropless, no loss. Set the embeddings
// with scorer().set_expert_embeddings and scorer().set_instructions.
template <scalar S>
using GliderRouter = Router<GliderScorer<S>, SoftmaxGate<S>, TopKSelector<S>>;

template <scalar S>
GliderRouter<S> make_glider_router(Index dim, Index experts, Index k = 2, double alpha = 100.0, std::uint64_t seed = 0) {
  return {GliderScorer<S>(dim, experts, {.alpha = alpha, .seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::renormalize_before_drop, .renormalize_epsilon = 1e-6})};
}

// Task-level MoE (Ye, Zha, Ren, "Eliciting and Understanding Cross-Task Skills with Task-Level
// Mixture-of-Experts", Findings of EMNLP 2022) as INK-USC/CrossTaskMoE routes one layer: the
// segment's task embedding through a GELU MLP (hidden 64) to one logit per block, a Gumbel draw
// per (segment, block), also at evaluation, then gumbel_softmax(tau, hard=True) (tau 5 until
// set: gumbel_temperature(step) is the reference's schedule). The reference's blocks are whole
// layers, 3 by default. TaskForm::dense is its training form: every block runs on every token
// (k = E, the scores as weights: the chosen block's (1 - p) + p, the others 0, which still carry
// the router's gradient); TaskForm::sparse is its use_sparse inference: only the chosen block.
// Dropless, no loss.
enum class TaskForm { dense, sparse };

template <scalar S>
using TaskRouter = Router<TaskScorer<S>, StraightThroughGate<S>, TopKSelector<S>>;

template <scalar S>
TaskRouter<S> make_task_router(Index dim, Index experts, Index tasks, Index task_dim, Index hidden = 64,
                               TaskForm form = TaskForm::dense, std::uint64_t seed = 0) {
  return {TaskScorer<S>(dim, experts, tasks, task_dim,
                        {.hidden = hidden, .draws = {.seed = seed, .at_evaluation = true}, .seed = seed}),
          StraightThroughGate<S>{}, TopKSelector<S>(form == TaskForm::dense ? experts : 1, {.weighting = Weighting::raw})};
}

// HyperRouter (Do et al., "HyperRouter: Towards Efficient Training and Inference of Sparse
// Mixture of Experts", EMNLP 2023) as giangdip2410/HyperRouter's HyperRouterGate routes: the
// router's weight and bias generated by a frozen random hypernetwork (hidden 256) from a trainable
// embedding, the top k of the logits, a softmax over those k; dropless, no loss. k is a runtime
// value: moe::scheduled_k gives the reference's schedules for TopKSelector::set_k.
template <scalar S>
using HyperRouter = Router<HyperScorer<S>, SoftmaxGate<S>, TopKSelector<S>>;

template <scalar S>
HyperRouter<S> make_hyper_router(Index dim, Index experts, Index k = 2, Index hidden = 256, std::uint64_t seed = 0) {
  return {HyperScorer<S>(dim, experts, {.hidden = hidden, .seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::softmax_of_kept_logits})};
}

// SMoE-Dropout (Chen et al., "Sparse MoE as the New Dropout", ICLR 2023), HyperRouter's baseline
// as its code runs it (CustomNaiveGate with --freeze_gate): a random linear router with bias,
// frozen (N(0, 0.02) weights and a zero bias: Transformer-XL's weights_init, applied before
// freezing), the top k of the logits and a softmax over them; the same k schedules.
template <scalar S>
using SMoEDropoutRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>>;

template <scalar S>
SMoEDropoutRouter<S> make_smoe_dropout_router(Index dim, Index experts, Index k = 2, std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = true, .init_scale = 4e-4 * double(dim), .seed = seed, .frozen = true}),
          SoftmaxGate<S>{},
          TopKSelector<S>(k, {.weighting = Weighting::softmax_of_kept_logits})};
}

// Omni-router (Gu, Likhomanenko, Jaitly, "Omni-Router: Sharing Routing Decisions in Sparse
// Mixture-of-Experts for Speech Recognition", 2025): one router weight shared by every MoE layer
// (Shared<LinearScorer>), each layer routing its own hidden states Switch-style (the Switch
// preset's top-1, capacity and balance loss; the paper's code was not available). The first
// router owns the shared weight for the optimizer.
template <scalar S>
using OmniRouter = Router<Shared<LinearScorer<S>>, SoftmaxGate<S>, TopKSelector<S, 1>, LoadBalanceLoss<S>>;

template <scalar S>
std::vector<OmniRouter<S>> make_omni_routers(Index dim, Index experts, Index layers, double capacity_factor = 1.25,
                                             std::uint64_t seed = 0, Padding padding = Padding::fairseq) {
  detail::require<config_error>(layers >= 1, "make_omni_routers", "layers", layers, "layers >= 1");
  Shared<LinearScorer<S>> owner(LinearScorer<S>(dim, experts, {.bias = false, .init_scale = 0.1, .seed = seed}));
  std::vector<OmniRouter<S>> routers;
  routers.reserve(std::size_t(layers));
  for (Index l = 0; l < layers; ++l)
    routers.push_back({l == 0 ? std::move(owner) : Shared<LinearScorer<S>>(routers.front().scorer()), SoftmaxGate<S>{},
                       detail::switch_selector<S>(capacity_factor, padding),
                       LoadBalanceLoss<S>(BalanceNorm::switch_top1, S(1e-2), padding)});
  return routers;
}

// VQMoE's discrete router (Do, Pham, Le, Tran, "On the Role of Discrete Representation in Sparse
// Mixture of Experts", TMLR 2025) as giangdip2410/VQMoE's VectorQuantizer routes: K codes
// (U(-1/K, 1/K)), each token to its nearest code by squared distance (ties to the lower code),
// code j -> expert j mod E, weight 1; the quantiser's loss |q - sg(x)|^2 + 0.25 |sg(q) - x|^2
// (mean over elements) scaled by the scripts' beta_vq = 0.08. The scripts use K = E = 16.
// VQMoELayer mixes it with a continuous router over the same experts.
template <scalar S>
using VQRouter = Router<VQScorer<S>, IdentityGate<S>, NearestCodeSelector<S>>;

template <scalar S>
VQRouter<S> make_vq_router(Index dim, Index experts, Index codes, double commitment = 0.25, double coefficient = 0.08,
                           std::uint64_t seed = 0) {
  return {VQScorer<S>(dim, experts, codes,
                      {.commitment = commitment, .coefficient = coefficient, .seed = seed}),
          IdentityGate<S>{}, NearestCodeSelector<S>{}};
}

// ---- depth routing (docs/routers.md, DepthRouter, MindSkipRouter) -----------------------------

// Mixture-of-Depths (Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in
// transformer-based language models", 2024), from the paper (it has no official code): r_t =
// w^T x_t (no bias), the top C = 12.5% of each segment's real tokens run the block (ceil), y =
// x + r f(x) for them and x for the rest. An auxiliary MLP predictor (hidden D/2, SiLU, on the
// stop-gradient input) learns by binary cross-entropy which tokens the top C takes;
// DepthInference::predictor makes evaluation route by it, the causal form for a decoder.
template <scalar S>
using DepthRouter = Router<DepthScorer<S>, IdentityGate<S>, DepthTopCSelector<S>, DepthPredictorLoss<S>>;

template <scalar S>
DepthRouter<S> make_depth_router(Index dim, double capacity = 0.125, DepthInference inference = DepthInference::top_c,
                                 std::uint64_t seed = 0) {
  return {DepthScorer<S>(dim, {.predictor_hidden = std::max<Index>(dim / 2, 1), .router = {.seed = seed}}),
          IdentityGate<S>{},
          DepthTopCSelector<S>({.capacity = {.factor = capacity, .multiple_of = 1}, .inference = inference}),
          DepthPredictorLoss<S>(S(1))};
}

// MindSkip (He et al., "Router-Tuning: A Simple and Effective Approach for Enabling Dynamic-Depth
// in Transformers", EMNLP 2025) as its maintained code routes: r = sigmoid(w^T mean of x over
// the sequence, padding rows included) by default, or per token; the block runs when r >= 0.5
// (y = x + m f(x)), with a straight-through backward; in training every token runs the block and
// its output is multiplied by m (SkipForm::masked). Capacity loss: relu(mean m - target) with a
// target, mean m (the original code) without, weight `coefficient` (gradient_scale, 0 by default).
template <scalar S>
using MindSkipRouter = Router<DepthScorer<S>, SigmoidGate<S>, DepthThresholdSelector<S>, SkipCapacityLoss<S>>;

template <scalar S>
MindSkipRouter<S> make_mindskip_router(Index dim, DepthPooling pooling = DepthPooling::segment_mean,
                                       double coefficient = 0.0, std::optional<double> target = std::nullopt,
                                       std::uint64_t seed = 0, Padding pool_padding = Padding::fairseq) {
  return {DepthScorer<S>(dim, {.pooling = pooling, .pool_padding = pool_padding, .router = {.seed = seed}}),
          SigmoidGate<S>{}, DepthThresholdSelector<S>({.threshold = 0.5, .form = SkipForm::masked}),
          SkipCapacityLoss<S>(S(coefficient), {.target = target, .per_segment = pooling == DepthPooling::segment_mean})};
}

}  // namespace moe
