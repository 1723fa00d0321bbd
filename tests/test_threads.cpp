// Built with OpenMP: the same inputs give bit-identical routing, outputs and gradients on 1 and
// 2 threads (docs/architecture.md, Threading: fixed chunks, one writer per result, serial
// reductions).
#include <omp.h>

#include "support.hpp"

using namespace moe_test;

namespace {
struct Outputs {
  Matrix<float> y, dx;
  std::vector<Matrix<float>> grads;
  std::vector<std::int32_t> slot_token;
  std::vector<float> slot_weight, losses;
};

template <class Layer>
Outputs run(Layer layer, int threads, Index T, Index D, const moe::TokenInputs<float>& tokens = {}) {
  omp_set_num_threads(threads);
  const Matrix<float> x = random_matrix<float>(T, D, 1), dy = random_matrix<float>(T, D, 2);
  Outputs o{Matrix<float>(T, D), Matrix<float>(T, D), {}, {}, {}, {}};
  layer.forward(x, o.y, tokens);
  moe::zero_grad(layer);
  layer.backward(dy, o.dx);
  layer.for_each_parameter([&](std::string_view, auto, auto grad) { o.grads.emplace_back(grad); });
  o.slot_token = layer.routing().slot_token;
  o.slot_weight = layer.routing().slot_weight;
  const auto& losses = layer.router().loss_values();
  o.losses.assign(losses.begin(), losses.end());
  return o;
}

template <class Make>
void require_thread_independent(Make make, Index T, Index D, const moe::TokenInputs<float>& tokens = {}) {
  const Outputs one = run(make(), 1, T, D, tokens), two = run(make(), 2, T, D, tokens);
  REQUIRE(one.slot_token == two.slot_token);
  REQUIRE(one.slot_weight == two.slot_weight);
  REQUIRE(one.losses == two.losses);  // per-block score sums, added in block order
  REQUIRE(one.y == two.y);  // bitwise, not approximately
  REQUIRE(one.dx == two.dx);
  REQUIRE(one.grads.size() == two.grads.size());
  for (std::size_t i = 0; i < one.grads.size(); ++i) REQUIRE(one.grads[i] == two.grads[i]);
}
}  // namespace

TEST_CASE("1 and 2 threads give bit-identical layers", "[threads]") {
  REQUIRE(omp_get_num_procs() >= 1);
  // several chunks of every parallel loop: T spans many gating blocks, E many experts
  const Index T = 3000, D = 48, E = 16, H = 40;
  require_thread_independent([&] { return moe::MoELayer(moe::make_gshard_router<float>(D, E, 0.9), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_topk_router<float>(D, 12, 3), moe::SwiGLUExperts<float>(12, D, H), moe::SwiGLUExperts<float>(1, D, H)); }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_switch_router<float>(D, 64), moe::FFNExperts<float>(64, D, H)); }, T, D);
  // group-limited top-k keeps its masked rank in per-thread scratch
  require_thread_independent([&] {
    auto router = moe::make_deepseek_v3_router<float>(D, E, 4, 4, 2);
    for (Index e = 0; e < E; ++e) router.gate().bias()(0, e) = 0.01f * float(e % 3);
    return moe::MoELayer(std::move(router), moe::FFNExperts<float>(E, D, H));
  }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical X-MoE layers, both cosine forms", "[threads][xmoe]") {
  // T past two of the cosine scorer's 4096-row blocks: per-block temperature sums, added in order
  const Index T = 9000, D = 32, E = 8, H = 16;
  for (const auto form : {moe::CosineForm::torchscale, moe::CosineForm::paper})
    require_thread_independent([&] { return moe::MoELayer(moe::make_xmoe_router<float>(D, E, 2, 1.0, 5, form), moe::FFNExperts<float>(E, D, H)); }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical stochastic layers: draws keyed by token, not by thread",
          "[threads][noise]") {
  // T past the scorer's 4096-row blocks and many gating blocks; each router a fresh one at step 0
  const Index T = 9000, D = 32, E = 8, H = 16;
  using moe::NoisyGatePolicy;
  for (const auto policy : {NoisyGatePolicy::jitter, NoisyGatePolicy::rsample})  // with random token selection
    require_thread_independent([&] {
      return moe::MoELayer(moe::make_deepspeed_topk_router<float>(D, E, 1, 0.8, 8, 1, std::nullopt, {.noisy_gate_policy = policy, .seed = 2}),
                           moe::FFNExperts<float>(E, D, H));
    }, T, D);
  require_thread_independent([&] {  // the Gumbel-sampled second expert
    return moe::MoELayer(moe::make_deepspeed_topk_router<float>(D, E, 2, 0.8, 8, 3, std::nullopt, {.seed = 4}),
                         moe::FFNExperts<float>(E, D, H));
  }, T, D);
  require_thread_independent([&] {  // fairseq's random second expert
    return moe::MoELayer(moe::Router(moe::LinearScorer<float>(D, E), moe::SoftmaxGate<float>{},
                                     moe::TopKSelector<float, 2>({.weighting = moe::Weighting::renormalize_after_drop,
                                                                  .capacity = {.factor = 1.0},
                                                                  .second = moe::SecondExpert::random,
                                                                  .draws = {.seed = 5}}),
                                     moe::LoadBalanceLoss<float>(moe::BalanceNorm::switch_top1, 0.01f)),
                         moe::FFNExperts<float>(E, D, H));
  }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical noisy layers (generated draws)", "[threads][noisy]") {
  // T past two of the noise loop's 1024-row blocks; the draws are keyed by token, not by thread
  const Index T = 3000, D = 32, E = 8, H = 16;
  require_thread_independent([&] {
    auto router = moe::make_noisy_topk_router<float>(D, E, 2);
    router.scorer().weight() = random_matrix<float>(E, D, 4, 0.3);
    router.scorer().noise_weight() = random_matrix<float>(E, D, 5, 0.3);
    return moe::MoELayer(std::move(router), moe::FFNExperts<float>(E, D, H));
  }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_vmoe_router<float>(D, E, 2), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_bpr_router<float>(D, E, 2, 0.8), moe::FFNExperts<float>(E, D, H)); }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical inference forwards with packed expert weights", "[threads][packed]") {
  // widths past Gemm::eigen_max_cols: the experts pack their weights, expert by expert, on
  // whichever thread runs the expert
  const Index T = 600, D = 264, E = 6, H = 272;
  const Matrix<float> x = random_matrix<float>(T, D, 3);
  const auto forward = [&](int threads, bool inference) {
    omp_set_num_threads(threads);
    auto layer = moe::MoELayer(moe::make_topk_router<float>(D, E, 2), moe::SwiGLUExperts<float>(E, D, H),
                               moe::SwiGLUExperts<float>(1, D, H));
    layer.set_grad_enabled(!inference);
    Matrix<float> y(T, D);
    layer.forward(x, y);
    REQUIRE(layer.experts().weights_packed() == inference);
    layer.forward(x, y);  // the packed copy, when there is one
    return y;
  };
  const Matrix<float> plain = forward(1, false);
  REQUIRE(forward(1, true) == plain);
  REQUIRE(forward(2, true) == plain);
}

TEST_CASE("1 and 2 threads give bit-identical expert-choice and transport-plan layers", "[threads][expert_choice]") {
  // T past the per-column top-C's sampled path (4096 real tokens), E many columns per thread
  const Index T = 5000, D = 32, E = 16, H = 16;
  require_thread_independent([&] { return moe::MoELayer(moe::make_expert_choice_router<float>(D, E, 2.0), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_sinkhorn_router<float>(D, E, 2, 1.0), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] {
    return moe::MoELayer(moe::make_sinkhorn_router<float, moe::Choice::expert>(D, E, 2, 1.0), moe::FFNExperts<float>(E, D, H));
  }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_sbase_router<float>(D, E, 2), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] {
    return moe::MoELayer(moe::make_sparsity_constrained_ec_router<float>(D, E, 1.0), moe::FFNExperts<float>(E, D, H));
  }, 1000, D);
}

TEST_CASE("1 and 2 threads give bit-identical dynamic-k layers (top-p, XMoE threshold, per-token k)", "[threads][dynamic_k]") {
  // many gating blocks: each block packs its tokens' picks at its own place, finish compacts them
  const Index T = 5000, D = 32, E = 16, H = 24;
  std::vector<float> importance(static_cast<std::size_t>(T));
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  for (Index t = 0; t < T; ++t) importance[std::size_t(t)] = float((t * 7) % 11);
  for (Index t = 0; t < T; t += 13) valid[std::size_t(t)] = 0;
  const moe::TokenInputs<float> tokens{.valid = valid, .importance = importance};
  require_thread_independent([&] { return moe::MoELayer(moe::make_top_p_router<float>(D, E, 0.4f), moe::FFNExperts<float>(E, D, H)); }, T, D, tokens);
  require_thread_independent([&] { return moe::MoELayer(moe::make_xmoe_threshold_router<float>(D, E, 0.9, 0.5), moe::FFNExperts<float>(E, D, H)); }, T, D, tokens);
  require_thread_independent([&] { return moe::MoELayer(moe::make_dynamic_k_router<float>(D, E, 4, 0.8), moe::FFNExperts<float>(E, D, H)); }, T, D, tokens);
}

TEST_CASE("1 and 2 threads give bit-identical Soft MoE layers", "[threads][soft_moe]") {
  // T past the scorer's 4096-row blocks and many of the softmaxes' and products' blocks (not a
  // whole number of the dispatch softmax's row groups), S past its slot blocks, a whole number
  // of SIMD batches or not; with and without padding
  const Index T = 9000, D = 32, p = 2, H = 16;
  std::vector<std::uint8_t> valid(std::size_t(T), 1);
  for (Index t = 0; t < T; t += 7) valid[std::size_t(t)] = 0;
  for (const Index E : {24, 25})
  for (const bool masked : {false, true}) {
    const moe::TokenInputs<float> tokens{.valid = masked ? std::span<const std::uint8_t>(valid) : std::span<const std::uint8_t>()};
    const auto run_soft = [&](int threads) {
      omp_set_num_threads(threads);
      moe::MoELayer layer(moe::make_soft_moe_router<float>(D, E, p, 3), moe::FFNExperts<float>(E, D, H));
      const Matrix<float> x = random_matrix<float>(T, D, 1), dy = random_matrix<float>(T, D, 2);
      Matrix<float> y(T, D), dx(T, D);
      layer.forward(x, y, tokens);
      moe::zero_grad(layer);
      layer.backward(dy, dx);
      std::vector<Matrix<float>> out{y, dx, layer.routing().dispatch, layer.routing().combine};
      layer.for_each_parameter([&](std::string_view, auto, auto grad) { out.emplace_back(grad); });
      return out;
    };
    const auto one = run_soft(1), two = run_soft(2);
    REQUIRE(one.size() == two.size());
    for (std::size_t i = 0; i < one.size(); ++i) REQUIRE(one[i] == two[i]);  // bitwise
  }
}

TEST_CASE("1 and 2 threads give bit-identical depth-routing layers", "[threads][depth]") {
  // T past the linear scorer's 4096-row blocks; six segments (sequences) of 1000 tokens
  const Index T = 6000, D = 32, H = 48;
  std::vector<std::int32_t> segment(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) segment[std::size_t(t)] = std::int32_t(t / 1000);
  const moe::TokenInputs<float> tokens{.segment = segment};
  require_thread_independent([&] { return moe::MoELayer(moe::make_depth_router<float>(D), moe::FFNExperts<float>(1, D, H)); }, T, D, tokens);
  require_thread_independent([&] { return moe::MoELayer(moe::make_mindskip_router<float>(D), moe::SwiGLUExperts<float>(1, D, H)); }, T, D, tokens);
  require_thread_independent([&] {
    return moe::MoELayer(moe::make_mindskip_router<float>(D, moe::DepthPooling::token, 0.1, 0.5), moe::FFNExperts<float>(1, D, H));
  }, T, D, tokens);
}

TEST_CASE("1 and 2 threads give bit-identical attention-router layers", "[threads][attention]") {
  const Index T = 3000, D = 32, E = 16, H = 16;
  for (const Index chunk : {Index(1), Index(8)})
    require_thread_independent([&] { return moe::MoELayer(moe::make_attention_router<float>(D, E, 2, chunk), moe::FFNExperts<float>(E, D, H)); }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical GLIDER layers", "[threads][glider]") {
  const Index T = 3000, D = 32, E = 16, H = 16;
  std::vector<std::int32_t> segment(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) segment[std::size_t(t)] = std::int32_t(t % 3);
  require_thread_independent([&] {
    auto router = moe::make_glider_router<float>(D, E, 2, 3.0);
    router.scorer().set_expert_embeddings(random_matrix<float>(E, 8, 5));
    router.scorer().set_instructions(random_matrix<float>(3, 8, 6));
    return moe::MoELayer(std::move(router), moe::FFNExperts<float>(E, D, H));
  }, T, D, {.segment = segment});
}

TEST_CASE("1 and 2 threads give bit-identical task-level router layers", "[threads][task]") {
  const Index T = 3000, D = 32, E = 8, H = 16;
  std::vector<std::int32_t> segment(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) segment[std::size_t(t)] = std::int32_t(t / 500);  // six examples
  for (const auto form : {moe::TaskForm::dense, moe::TaskForm::sparse})
    require_thread_independent([&] {
      auto router = moe::make_task_router<float>(D, E, 6, 24, 64, form);
      router.gate().set_temperature(moe::gumbel_temperature(1000));
      return moe::MoELayer(std::move(router), moe::FFNExperts<float>(E, D, H));
    }, T, D, {.segment = segment});
}

TEST_CASE("1 and 2 threads give bit-identical HyperRouter and SMoE-Dropout layers", "[threads][hyper]") {
  const Index T = 3000, D = 32, E = 16, H = 16;
  require_thread_independent([&] { return moe::MoELayer(moe::make_hyper_router<float>(D, E, 2, 64), moe::FFNExperts<float>(E, D, H)); }, T, D);
  require_thread_independent([&] { return moe::MoELayer(moe::make_smoe_dropout_router<float>(D, E, 2), moe::FFNExperts<float>(E, D, H)); }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical Omni-router layers", "[threads][omni]") {
  const Index T = 3000, D = 32, E = 16, H = 16;
  require_thread_independent([&] { return moe::MoELayer(std::move(moe::make_omni_routers<float>(D, E, 2).back()), moe::FFNExperts<float>(E, D, H)); }, T, D);
}

TEST_CASE("1 and 2 threads give bit-identical VQ routing and VQMoE layers", "[threads][vq]") {
  const Index T = 3000, D = 32, E = 8, H = 16;
  const auto vq = [&] {
    auto router = moe::make_vq_router<float>(D, E, 12, 0.25, 0.08, 7);
    router.scorer().codebook() = random_matrix<float>(12, D, 8);
    return router;
  };
  require_thread_independent([&] { return moe::MoELayer(vq(), moe::FFNExperts<float>(E, D, H)); }, T, D);
  const auto layer_outputs = [&](int threads) {
    omp_set_num_threads(threads);
    moe::VQMoELayer layer(moe::make_topk_router<float>(D, E, 2), vq(), moe::FFNExperts<float>(E, D, H));
    const Matrix<float> x = random_matrix<float>(T, D, 1), dy = random_matrix<float>(T, D, 2);
    Outputs o{Matrix<float>(T, D), Matrix<float>(T, D), {}, {}, {}, {}};
    layer.forward(x, o.y);
    moe::zero_grad(layer);
    layer.backward(dy, o.dx);
    layer.for_each_parameter([&](std::string_view, auto, auto grad) { o.grads.emplace_back(grad); });
    return o;
  };
  const Outputs one = layer_outputs(1), two = layer_outputs(2);
  REQUIRE(one.y == two.y);
  REQUIRE(one.dx == two.dx);
  REQUIRE(one.grads == two.grads);
}
