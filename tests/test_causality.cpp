// Causality (docs/routers.md, Causality: what a decoder can use). In evaluation, a layer that
// declares itself causal must route the earlier half of a batch bit for bit as before, and give
// it the same outputs up to rounding, when only the later half changes; a layer that declares
// otherwise must leak, earlier outputs moving. Each row of the table below is one preset (or one
// configuration that flips the answer) with the declaration it must make, so a change of any
// policy's declaration is caught.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::Capacity;
using moe::OverflowOrder;

namespace {

using S = float;  // what a decoder runs
constexpr Index T = 24, D = 8, E = 8, H = 16;
constexpr Index earlier = T / 2;     // rows [0, T/2) are kept, [T/2, T) perturbed
constexpr std::uint64_t step = 7;    // both forwards draw at the same step
constexpr std::uint64_t seeds = 6;   // batches tried per row

// A batch: x and the per-token importance (read by DynamicKSelector, checked by every router).
struct Batch {
  Matrix<S> x;
  std::vector<S> importance;
};

Batch batch(std::uint64_t seed) {
  Batch b{random_matrix<S>(T, D, seed), std::vector<S>(std::size_t(T))};
  const Matrix<S> u = random_matrix<S>(T, 1, seed + 1000);
  for (Index t = 0; t < T; ++t) b.importance[std::size_t(t)] = std::abs(u(t, 0));
  return b;
}

// The same batch with every later token replaced: new x three times as large (peakier scores,
// other experts) and an importance above every earlier one.
Batch perturbed(const Batch& b, std::uint64_t seed) {
  Batch p = b;
  const Matrix<S> x = random_matrix<S>(T, D, seed + 2000, 3.0), u = random_matrix<S>(T, 1, seed + 3000);
  for (Index t = earlier; t < T; ++t) {
    p.x.row(t) = x.row(t);
    p.importance[std::size_t(t)] = 10 + std::abs(u(t, 0));
  }
  return p;
}

// Token t's part of a routing, as numbers: its choices in rank order (expert, kept, weight) for
// a sparse routing; its combine row and dispatch column for a soft one.
template <class R>
std::vector<double> token_routing(const R& r, Index t) {
  std::vector<double> v;
  if constexpr (moe::is_soft_routing<R>) {
    for (Index s = 0; s < r.num_slots(); ++s) v.insert(v.end(), {double(r.combine(t, s)), double(r.dispatch(s, t))});
  } else {
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      const Index slot = r.choice_slot[c];
      v.insert(v.end(), {double(r.choice_expert[c]), double(slot >= 0), slot >= 0 ? double(r.slot_weight[slot]) : 0.0});
    }
  }
  return v;
}

struct Leak {
  bool declared;        // the layer's causal()
  bool routing_moved;   // some earlier token's routing changed, in any bit
  S change, rounding;   // the largest change of an earlier row of y, and what rounding explains
  bool output_moved() const { return change > rounding; }
};

// Two fresh layers (a layer may keep state between calls: the torchscale cosine scorer rescales
// its embeddings), one per batch, in evaluation and inference mode at the same step.
// The outputs are compared up to rounding: the experts' GEMM (Eigen's, at these widths) may round
// a row differently when its expert's block holds more or fewer rows. The routing is exact.
template <class Make>
Leak leak(const Make& make, std::uint64_t seed) {
  const Batch a = batch(seed), b = perturbed(a, seed);
  struct Run {
    bool declared;
    Matrix<S> y;
    std::vector<std::vector<double>> routing;  // of the earlier tokens
  };
  const auto run = [&](const Batch& in) {
    auto layer = make();
    layer.router().set_training(false);
    layer.router().set_step(step);
    layer.set_grad_enabled(false);
    Run out{layer.causal(), Matrix<S>(T, D), {}};
    layer.forward(in.x, out.y, {.importance = in.importance});
    for (Index t = 0; t < earlier; ++t) out.routing.push_back(token_routing(layer.routing(), t));
    return out;
  };
  const Run ra = run(a), rb = run(b);
  REQUIRE(ra.declared == rb.declared);
  REQUIRE(ra.y.bottomRows(T - earlier) != rb.y.bottomRows(T - earlier));  // the perturbation reached y
  return {ra.declared, ra.routing != rb.routing,
          (ra.y.topRows(earlier) - rb.y.topRows(earlier)).cwiseAbs().maxCoeff(),
          64 * std::numeric_limits<S>::epsilon() * (1 + ra.y.cwiseAbs().maxCoeff())};
}

struct Row {
  std::string name;
  bool causal;  // the declaration the layer must make
  std::function<Leak(std::uint64_t)> run;
};

template <class Make>
Row row(std::string name, bool causal, Make make) {
  return {std::move(name), causal, [make](std::uint64_t seed) { return leak(make, seed); }};
}

template <class Router>
auto layer(Router router) {
  return moe::MoELayer(std::move(router), moe::FFNExperts<S>(E, D, H, moe::Activation::gelu, 3));
}

// A router of the policies of the presets around the given selector and gate.
template <class Selector, class Gate = moe::SoftmaxGate<S>>
auto custom(Selector selector, Gate gate = {}) {
  return layer(moe::Router(moe::LinearScorer<S>(D, E, {.seed = 5}), std::move(gate), std::move(selector)));
}

// Every preset of moe/presets.hpp, then the configurations that flip the answer. Capacity
// factors are tight (0.5, minimum 1) so that capacity decides something at T = 24.
std::vector<Row> rows() {
  using moe::Choice;
  using moe::CosineForm;
  using moe::TopKSelector;
  std::vector<Row> r;
  // ---- the presets
  r.push_back(row("SwitchRouter (top-1, rank-major)", true, [] { return layer(moe::make_switch_router<S>(D, E, 0.5, 1)); }));
  r.push_back(row("GShardRouter (top-2, rank-major)", false, [] { return layer(moe::make_gshard_router<S>(D, E, 0.5, 2)); }));
  r.push_back(row("TopKRouter (dropless)", true, [] { return layer(moe::make_topk_router<S>(D, E, 2, 3)); }));
  r.push_back(row("DeepSpeedTopKRouter k=1 (random token selection at evaluation)", false,
                  [] { return layer(moe::make_deepspeed_topk_router<S>(D, E, 1, 0.5, 1, 4)); }));
  r.push_back(row("DeepSpeedTopKRouter k=1 without use_rts (rank-major)", true, [] {
    return layer(moe::make_deepspeed_topk_router<S>(D, E, 1, 0.5, 1, 4, std::nullopt, {.use_rts = false}));
  }));
  r.push_back(row("DeepSpeedTopKRouter k=2 (rank-major, sampled second expert)", false,
                  [] { return layer(moe::make_deepspeed_topk_router<S>(D, E, 2, 0.5, 1, 5)); }));
  r.push_back(row("DeepSpeedTopKRouter k=3 (by masked logit)", false,
                  [] { return layer(moe::make_deepspeed_topk_router<S>(D, E, 3, 0.5, 1, 6)); }));
  r.push_back(row("XMoERouter k=1 torchscale (rank-major)", true, [] { return layer(moe::make_xmoe_router<S>(D, E, 1, 0.5, 7)); }));
  r.push_back(row("XMoERouter k=1 paper form", true,
                  [] { return layer(moe::make_xmoe_router<S>(D, E, 1, 0.5, 7, CosineForm::paper)); }));
  r.push_back(row("XMoERouter k=2 (rank-major)", false, [] { return layer(moe::make_xmoe_router<S>(D, E, 2, 0.5, 8)); }));
  r.push_back(row("DeepSeekV3Router (dropless, expert bias)", true, [] {
    auto router = moe::make_deepseek_v3_router<S>(D, E, 2, 4, 2, 9);
    router.gate().bias() = random_matrix<S>(1, E, 10, 0.5);
    return layer(std::move(router));
  }));
  r.push_back(row("NoisyTopKRouter (dropless)", true, [] {
    auto router = moe::make_noisy_topk_router<S>(D, E, 2);
    router.scorer().weight() = random_matrix<S>(E, D, 11);  // W_g starts at 0, as the reference's
    return layer(std::move(router));
  }));
  r.push_back(row("VMoERouter (top-2, batch priority)", false, [] { return layer(moe::make_vmoe_router<S>(D, E, 2, 0.5, true, 1.0, 12)); }));
  r.push_back(row("VMoERouter top-1 without batch priority", true,
                  [] { return layer(moe::make_vmoe_router<S>(D, E, 1, 0.5, false, 1.0, 12)); }));
  r.push_back(row("BPRRouter", false, [] { return layer(moe::make_bpr_router<S>(D, E, 2, 0.5, 13)); }));
  r.push_back(row("ExpertChoiceRouter", false, [] { return layer(moe::make_expert_choice_router<S>(D, E, 2.0, 1.0, 14)); }));
  r.push_back(row("SinkhornRouter token choice (ott)", false,
                  [] { return layer(moe::make_sinkhorn_router<S, Choice::token>(D, E, 2, 0.5, 1.0, 15)); }));
  r.push_back(row("SinkhornRouter expert choice (ott)", false,
                  [] { return layer(moe::make_sinkhorn_router<S, Choice::expert>(D, E, 2, 0.5, 1.0, 16)); }));
  r.push_back(row("S-BASE k=2 (Megatron form, dropless)", true, [] { return layer(moe::make_sbase_router<S>(D, E, 2, 17)); }));
  r.push_back(row("S-BASE k=1 (sigmoid scores)", true, [] { return layer(moe::make_sbase_router<S>(D, E, 1, 18)); }));
  r.push_back(row("SparsityConstrainedECRouter", false,
                  [] { return layer(moe::make_sparsity_constrained_ec_router<S>(D, E, 2.0, 19)); }));
  r.push_back(row("TopPRouter (dropless)", true, [] { return layer(moe::make_top_p_router<S>(D, E, 0.4, 20)); }));
  r.push_back(row("XMoEThresholdRouter (rank-major by score)", false,
                  [] { return layer(moe::make_xmoe_threshold_router<S>(D, E, 0.9, 0.5, 1, 21)); }));
  r.push_back(row("DynamicKRouter (capacity)", false, [] { return layer(moe::make_dynamic_k_router<S>(D, E, 4, 0.5, 22)); }));
  r.push_back(row("DynamicKRouter dropless (k_t scaled by the batch's largest importance)", false,
                  [] { return layer(moe::make_dynamic_k_router<S>(D, E, 4, std::nullopt, 22)); }));
  r.push_back(row("SoftMoERouter", false, [] { return layer(moe::make_soft_moe_router<S>(D, E, 1, 23)); }));
  r.push_back(row("AttentionRouter (one token a head)", true, [] { return layer(moe::make_attention_router<S>(D, E, 2, 1, 28)); }));
  r.push_back(row("AttentionRouter, heads of 8 tokens (one across the cut)", false, [] { return layer(moe::make_attention_router<S>(D, E, 2, 8, 28)); }));
  r.push_back(row("GliderRouter (the segment's instruction bias is an input)", true, [] {
    auto router = moe::make_glider_router<S>(D, E, 2, 3.0, 29);
    router.scorer().set_expert_embeddings(random_matrix<S>(E, 4, 30));
    router.scorer().set_instructions(random_matrix<S>(1, 4, 31));
    return layer(std::move(router));
  }));
  r.push_back(row("TaskRouter (the segment's task and its draw, also at evaluation; every block runs)", true,
                  [] { return layer(moe::make_task_router<S>(D, E, 2, 6, 16, moe::TaskForm::dense, 35)); }));
  r.push_back(row("TaskRouter, sparse (the chosen block alone)", true,
                  [] { return layer(moe::make_task_router<S>(D, E, 2, 6, 16, moe::TaskForm::sparse, 36)); }));
  r.push_back(row("HyperRouter (dropless top-2)", true, [] { return layer(moe::make_hyper_router<S>(D, E, 2, 16, 32)); }));
  r.push_back(row("SMoEDropoutRouter (dropless top-2)", true, [] { return layer(moe::make_smoe_dropout_router<S>(D, E, 2, 33)); }));
  r.push_back(row("OmniRouter (layer 1 of 2: Switch's top-1)", true,
                  [] { return layer(std::move(moe::make_omni_routers<S>(D, E, 2, 0.5, 34).front())); }));
  r.push_back(row("VQRouter (the nearest code, per token)", true, [] { return layer(moe::make_vq_router<S>(D, E, 2 * E, 0.25, 0.08, 35)); }));
  const auto block = [](auto router) { return moe::MoELayer(std::move(router), moe::FFNExperts<S>(1, D, H, moe::Activation::gelu, 3)); };
  r.push_back(row("DepthRouter (the top C of the sequence)", false, [block] { return block(moe::make_depth_router<S>(D, 0.25)); }));
  r.push_back(row("DepthRouter, evaluation by its predictor", true,
                  [block] { return block(moe::make_depth_router<S>(D, 0.25, moe::DepthInference::predictor, 26)); }));
  r.push_back(row("MindSkipRouter (one decision per sequence)", false, [block] { return block(moe::make_mindskip_router<S>(D)); }));
  r.push_back(row("MindSkipRouter per token", true,
                  [block] { return block(moe::make_mindskip_router<S>(D, moe::DepthPooling::token, 0.0, std::nullopt, 27)); }));
  // ---- configurations that flip the answer
  r.push_back(row("top-2, rank-major capacity", false, [] {
    return custom(TopKSelector<S>(2, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::rank_major}}));
  }));
  r.push_back(row("top-2, token-major capacity", true, [] {
    return custom(TopKSelector<S>(2, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::token_major}}));
  }));
  r.push_back(row("top-2, dropless", true, [] { return custom(TopKSelector<S>(2)); }));
  r.push_back(row("top-2, by-weight capacity", false, [] {
    return custom(TopKSelector<S>(2, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::by_weight}}));
  }));
  r.push_back(row("top-1, random overflow drawn in training only (rank-major at evaluation)", true, [] {
    return custom(TopKSelector<S>(1, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::random}}));
  }));
  r.push_back(row("top-1, by-score capacity", false, [] {
    return custom(TopKSelector<S>(1, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::by_score}}));
  }));
  r.push_back(row("top-2 token-major, second expert Gumbel-sampled at evaluation", true, [] {
    using Gate = moe::GumbelGate<moe::SoftmaxGate<S>>;
    return custom(TopKSelector<S>(2, {.capacity = {.factor = 0.5, .overflow = OverflowOrder::token_major}}),
                  Gate({.sampled = moe::Sampled::after_first, .draws = {.seed = 1, .at_evaluation = true}}));
  }));
  r.push_back(row("top-p, token-major capacity counting tokens", true, [] {
    return custom(moe::TopPSelector<S>(
        {.capacity = {.factor = 0.5, .times_k = false, .overflow = OverflowOrder::token_major}}));
  }));
  r.push_back(row("top-p, token-major capacity counting choices (C grows with later tokens' choices)", false, [] {
    return custom(moe::TopPSelector<S>({.p = 0.6, .capacity = {.factor = 0.5, .overflow = OverflowOrder::token_major}}));
  }));
  r.push_back(row("per-token k with k_max = 1 (k_t = 1)", true,
                  [] { return custom(moe::DynamicKSelector<S>(1, {.capacity = {.factor = 0.5}})); }));
  r.push_back(row("top-2 dropless, SwiGLU experts and a shared expert", true, [] {
    return moe::MoELayer(moe::make_topk_router<S>(D, E, 2, 24), moe::SwiGLUExperts<S>(E, D, H), moe::SwiGLUExperts<S>(1, D, H));
  }));
  // ---- the released models' routers: dropless, every stage per token
  r.push_back(row("MixtralRouter", true, [] { return layer(moe::make_mixtral_router<S>(D, E, 2, 26)); }));
  r.push_back(row("Qwen2MoERouter with its sigmoid-gated shared expert", true, [] {
    return moe::MoELayer(moe::make_qwen2_moe_router<S>(D, E, 4, false, 27), moe::SwiGLUExperts<S>(E, D, H),
                         moe::SigmoidGatedExpert(moe::SwiGLUExperts<S>(1, D, H)));
  }));
  r.push_back(row("Qwen3MoERouter", true, [] { return layer(moe::make_qwen3_moe_router<S>(D, E, 4, true, 28)); }));
  r.push_back(row("OLMoERouter", true, [] { return layer(moe::make_olmoe_router<S>(D, E, 4, false, 29)); }));
  r.push_back(row("DbrxRouter (p = 2)", true, [] { return layer(moe::make_dbrx_router<S>(D, E, 3, 2.0, 30)); }));
  r.push_back(row("DeepSeekV2Router (group maximum)", true, [] { return layer(moe::make_deepseek_v2_router<S>(D, E, 3, 4, 2, 16.0, moe::DeepSeekV2TopK::group_limited_greedy, 31)); }));
  r.push_back(row("GptOssRouter", true, [] { return layer(moe::make_gpt_oss_router<S>(D, E, 4, 32)); }));
  r.push_back(row("Llama4Router (weights on the input, shared expert)", true, [] {
    moe::MoELayer l(moe::make_llama4_router<S>(D, E, 1, 33), moe::SwiGLUExperts<S>(E, D, H), moe::SwiGLUExperts<S>(1, D, H));
    l.set_weighted_at(moe::WeightedAt::input);
    return l;
  }));
  r.push_back(row("top-2 dropless, identity experts", true,
                  [] { return moe::MoELayer(moe::make_topk_router<S>(D, E, 2, 25), moe::IdentityExperts<S>(E, D)); }));
  return r;
}

}  // namespace

TEST_CASE("Causal layers route and output earlier tokens alike when later tokens change; the others leak",
          "[causality]") {
  for (const Row& r : rows()) {
    INFO(r.name << ": declared causal must be " << r.causal);
    bool moved = false;
    for (std::uint64_t seed = 1; seed <= seeds && !(moved && !r.causal); ++seed) {
      INFO("seed " << seed);
      const Leak l = r.run(seed);
      INFO("largest change of an earlier output " << l.change << " (rounding: " << l.rounding << ")");
      REQUIRE(l.declared == r.causal);
      if (r.causal) {
        REQUIRE_FALSE(l.routing_moved);
        REQUIRE_FALSE(l.output_moved());
      }
      moved = moved || l.output_moved();
    }
    if (!r.causal) REQUIRE(moved);  // a leak the test can see, for every row declared not causal
  }
}

namespace {
// A gate that does not say whether it is causal.
struct UndeclaredGate {
  using scalar_type = S;
  void forward(moe::MatrixIn<S> logits, moe::MatrixOut<S> scores) { scores = logits; }
  void backward(moe::MatrixIn<S>, moe::MatrixIn<S>, moe::MatrixIn<S> dscores, moe::MatrixOut<S> dlogits) {
    dlogits += dscores;
  }
};
}  // namespace

TEST_CASE("A policy that declares nothing is taken as not causal", "[causality]") {
  static_assert(moe::is_causal(moe::SoftmaxGate<S>{}));  // constexpr where the policy is
  static_assert(!moe::is_causal(UndeclaredGate{}));
  REQUIRE_FALSE(moe::is_causal(moe::SoftSlotsSelector<S>{}));
  auto l = moe::MoELayer(moe::Router(moe::LinearScorer<S>(D, E), UndeclaredGate{}, moe::TopKSelector<S>(2)),
                         moe::FFNExperts<S>(E, D, H));
  REQUIRE_FALSE(l.router().causal());
  REQUIRE_FALSE(l.causal());
}

TEST_CASE("Capacity::causal: dropless, token-major, or rank-major with one choice a token", "[causality]") {
  using O = OverflowOrder;
  static_assert(Capacity{}.causal(false, true));  // dropless
  for (const O o : {O::rank_major, O::token_major, O::by_weight, O::batch_priority, O::by_score, O::by_masked_logit,
                    O::random, O::rank_major_by_score}) {
    const Capacity c{.factor = 1.0, .overflow = o};
    INFO("overflow " << int(o));
    CHECK(c.causal(false) == (o == O::token_major));
    CHECK(c.causal(true) == (o == O::token_major || o == O::rank_major));
    CHECK_FALSE(c.causal(true, true));                                          // C counts every choice
    CHECK(Capacity{.factor = 1.0, .times_k = false, .overflow = o}.causal(false, true) == (o == O::token_major));
  }
}
