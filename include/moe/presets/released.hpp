#pragma once
// The routers of released MoE models (docs/routers.md, Released models), each as Hugging Face
// transformers runs that model's gate, so a checkpoint's router (moe/io/released_models.hpp)
// routes here as it does there. Each preset is an alias of moe::Router plus a make_ function whose
// defaults are the released checkpoint's config values. Common to all: the gate runs in the
// router's scalar (HF upcasts the logits to float32), padding tokens are routed like any token
// and left out of the balance loss (HF's attention-mask form), and ties go to the lower expert
// index (torch.topk promises no order).
#include <optional>

#include "moe/gates/rank_by_logits.hpp"
#include "moe/gates/sigmoid.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/losses/load_balance.hpp"
#include "moe/losses/normalized_balance.hpp"
#include "moe/router.hpp"
#include "moe/scorers/linear.hpp"
#include "moe/selectors/group_limited.hpp"
#include "moe/selectors/top_k.hpp"

namespace moe {

// The router shape most released models share: a bias-free linear map, softmax over all E
// experts, top-k of the probabilities, and HF's load-balancing loss (load_balancing_loss_func:
// E sum_e f_e P_e, f over all k choices, not divided by k).
template <scalar S>
using SoftmaxTopKRouter = Router<LinearScorer<S>, SoftmaxGate<S>, TopKSelector<S>, LoadBalanceLoss<S>>;

// Mixtral (Jiang et al. 2024; HF MixtralSparseMoeBlock): top-2 of 8, the two probabilities
// renormalised to sum 1 (always; no epsilon), router_aux_loss_coef 0.001.
template <scalar S>
using MixtralRouter = SoftmaxTopKRouter<S>;

// Qwen1.5-MoE / Qwen2-MoE (HF Qwen2MoeSparseMoeBlock): top-4 of 60, renormalised only when the
// config's norm_topk_prob says so (False in the released models). Its sigmoid-gated shared
// expert is the layer's: SigmoidGatedExpert.
template <scalar S>
using Qwen2MoERouter = SoftmaxTopKRouter<S>;

// Qwen3-MoE (HF Qwen3MoeSparseMoeBlock): Qwen2's gate without a shared expert; top-8 of 128,
// norm_topk_prob True in the released models.
template <scalar S>
using Qwen3MoERouter = SoftmaxTopKRouter<S>;

// OLMoE (Muennighoff et al. 2024; HF OlmoeSparseMoeBlock): top-8 of 64, norm_topk_prob False,
// router_aux_loss_coef 0.01.
template <scalar S>
using OLMoERouter = SoftmaxTopKRouter<S>;

// DBRX (Databricks 2024; HF DbrxRouter): top-4 of 16, the k probabilities divided by their
// p-norm, p = moe_normalize_expert_weights (1 in the released model; none: raw), moe_loss_weight
// 0.01.
template <scalar S>
using DbrxRouter = SoftmaxTopKRouter<S>;

// DeepSeek-V2 (DeepSeek-AI, arXiv 2405.04434; its hub code's MoEGate): softmax, then either
// `greedy` top-k (V2-Lite) or `group_limited_greedy`: the E experts form n_group groups, a group
// scores its largest probability, each token keeps its topk_group best groups and takes its top-k
// among their experts. Weights are the probabilities times routed_scaling_factor (16 for V2, 1 for
// V2-Lite), not renormalised. The sequence-wise balance loss (seq_aux, alpha 0.003) counts the
// choices made (group limit included), as that code's loss reads topk_idx.
template <scalar S>
using DeepSeekV2Router = Router<LinearScorer<S>, SoftmaxGate<S>, GroupLimitedTopKSelector<S>, NormalizedBalanceLoss<S>>;
enum class DeepSeekV2TopK { greedy, group_limited_greedy };

// gpt-oss (OpenAI 2025; HF GptOssTopKRouter): a linear map WITH bias, top-4 of the logits
// (32 experts in gpt-oss-20b, 128 in -120b), softmax over the four chosen logits,
// router_aux_loss_coef 0.9 (on the softmax of all E logits).
template <scalar S>
using GptOssRouter = Router<LinearScorer<S>, RankByLogits<SoftmaxGate<S>>, TopKSelector<S>, LoadBalanceLoss<S>>;

// Llama 4 (Meta 2025; HF Llama4Router): top-1 of the logits (16 experts in Scout, 128 in
// Maverick), weight sigmoid(chosen logit), unnormalised, no auxiliary loss. The weight multiplies
// the expert's input, not its output: MoELayer::set_weighted_at(WeightedAt::input); the shared
// expert is a plain always-on expert.
template <scalar S>
using Llama4Router = Router<LinearScorer<S>, RankByLogits<SigmoidGate<S>>, TopKSelector<S>>;

namespace detail {
template <scalar S>
SoftmaxTopKRouter<S> softmax_top_k_router(Index dim, Index experts, Index k, typename TopKSelector<S>::Options weights,
                                           double aux_coefficient, std::uint64_t seed) {
  weights.padding = Padding::megatron;
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), SoftmaxGate<S>{},
          TopKSelector<S>(k, weights),
          LoadBalanceLoss<S>(BalanceNorm::flaxformer, S(aux_coefficient), Padding::megatron)};
}
// norm_topk_prob: w /= sum of the k probabilities (HF divides without a floor; a sum of k
// softmax probabilities is never below float epsilon unless E is in the millions).
template <scalar S>
typename TopKSelector<S>::Options norm_topk(bool norm_topk_prob) {
  return {.weighting = norm_topk_prob ? Weighting::renormalize_before_drop : Weighting::raw};
}
}  // namespace detail

template <scalar S>
MixtralRouter<S> make_mixtral_router(Index dim, Index experts = 8, Index k = 2, std::uint64_t seed = 0) {
  return detail::softmax_top_k_router<S>(dim, experts, k, detail::norm_topk<S>(true), 1e-3, seed);
}

template <scalar S>
Qwen2MoERouter<S> make_qwen2_moe_router(Index dim, Index experts = 60, Index k = 4, bool norm_topk_prob = false,
                                        std::uint64_t seed = 0) {
  return detail::softmax_top_k_router<S>(dim, experts, k, detail::norm_topk<S>(norm_topk_prob), 1e-3, seed);
}

template <scalar S>
Qwen3MoERouter<S> make_qwen3_moe_router(Index dim, Index experts = 128, Index k = 8, bool norm_topk_prob = true,
                                        std::uint64_t seed = 0) {
  return detail::softmax_top_k_router<S>(dim, experts, k, detail::norm_topk<S>(norm_topk_prob), 1e-3, seed);
}

template <scalar S>
OLMoERouter<S> make_olmoe_router(Index dim, Index experts = 64, Index k = 8, bool norm_topk_prob = false,
                                 std::uint64_t seed = 0) {
  return detail::softmax_top_k_router<S>(dim, experts, k, detail::norm_topk<S>(norm_topk_prob), 1e-2, seed);
}

// normalize_p: DBRX's moe_normalize_expert_weights (std::nullopt: the raw probabilities).
template <scalar S>
DbrxRouter<S> make_dbrx_router(Index dim, Index experts = 16, Index k = 4, std::optional<double> normalize_p = 1.0,
                               std::uint64_t seed = 0) {
  typename TopKSelector<S>::Options weights{.weighting = normalize_p ? Weighting::p_norm : Weighting::raw};
  if (normalize_p) weights.norm_p = *normalize_p;
  return detail::softmax_top_k_router<S>(dim, experts, k, weights, 1e-2, seed);
}

// greedy is one group holding every expert.
template <scalar S>
DeepSeekV2Router<S> make_deepseek_v2_router(Index dim, Index experts = 160, Index k = 6, Index groups = 8,
                                            Index groups_kept = 3, double routed_scaling_factor = 16.0,
                                            DeepSeekV2TopK method = DeepSeekV2TopK::group_limited_greedy,
                                            std::uint64_t seed = 0) {
  const bool grouped = method == DeepSeekV2TopK::group_limited_greedy;
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), SoftmaxGate<S>{},
          GroupLimitedTopKSelector<S>(k, {.count = grouped ? groups : 1, .keep = grouped ? groups_kept : 1, .top = 1},
                                      {.weighting = Weighting::raw, .scale = routed_scaling_factor,
                                       .padding = Padding::megatron}),
          NormalizedBalanceLoss<S>(S(3e-3), {.scope = BalanceScope::sequence, .count = BalanceCount::routing})};
}

template <scalar S>
GptOssRouter<S> make_gpt_oss_router(Index dim, Index experts = 32, Index k = 4, std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = true, .seed = seed}), RankByLogits<SoftmaxGate<S>>{},
          TopKSelector<S>(k, {.weighting = Weighting::softmax_of_kept_logits, .padding = Padding::megatron}),
          LoadBalanceLoss<S>(BalanceNorm::flaxformer, S(0.9), Padding::megatron)};
}

template <scalar S>
Llama4Router<S> make_llama4_router(Index dim, Index experts = 16, Index k = 1, std::uint64_t seed = 0) {
  return {LinearScorer<S>(dim, experts, {.bias = false, .seed = seed}), RankByLogits<SigmoidGate<S>>{},
          TopKSelector<S>(k, {.weighting = Weighting::raw, .padding = Padding::megatron})};
}

}  // namespace moe
