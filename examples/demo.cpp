// The main demo: one MoE layer per router preset on a synthetic batch, forward and backward,
// then one table row per preset. Options: --tokens T --dim D --experts E --hidden H --reps N.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <moe/moe.hpp>

namespace {

struct Settings {
  moe::Index tokens = 4096, dim = 256, experts = 16, hidden = 512, reps = 3;
};

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const long v = std::atol(argv[i + 1]);
    if (!std::strcmp(argv[i], "--tokens")) s.tokens = v;
    else if (!std::strcmp(argv[i], "--dim")) s.dim = v;
    else if (!std::strcmp(argv[i], "--experts")) s.experts = v;
    else if (!std::strcmp(argv[i], "--hidden")) s.hidden = v;
    else if (!std::strcmp(argv[i], "--reps")) s.reps = v;
    else { std::fprintf(stderr, "unknown option %s\n", argv[i]); std::exit(2); }
    if (v < 1) { std::fprintf(stderr, "option %s must be a whole number >= 1, not '%s'\n", argv[i], argv[i + 1]); std::exit(2); }
  }
  if (argc % 2 == 0) { std::fprintf(stderr, "option %s has no value\n", argv[argc - 1]); std::exit(2); }
  return s;
}

// Runs forward + backward `reps` times after one warm-up call, timing each pass on its own, and
// prints the preset's row.
template <class Router>
void run(const char* name, Router router, const Settings& s, const moe::Matrix<float>& x,
         const moe::TokenInputs<float>& tokens = {}, moe::WeightedAt weighted_at = moe::WeightedAt::output) {
  using clock = std::chrono::steady_clock;
  const moe::Index experts = router.num_experts();  // E, or the one block of a depth router
  moe::MoELayer layer(std::move(router), moe::FFNExperts<float>(experts, s.dim, s.hidden));
  layer.set_weighted_at(weighted_at);
  moe::Matrix<float> y(s.tokens, s.dim), dx(s.tokens, s.dim);
  const moe::Matrix<float> dy = moe::Matrix<float>::Ones(s.tokens, s.dim) / float(s.tokens);
  layer.forward(x, y, tokens);  // warm-up: sizes every workspace once
  layer.backward(dy, dx);
  double forward_s = 0, backward_s = 0;
  for (moe::Index i = 0; i < s.reps; ++i) {
    const auto t0 = clock::now();
    layer.forward(x, y, tokens);
    const auto t1 = clock::now();
    layer.backward(dy, dx);
    forward_s += std::chrono::duration<double>(t1 - t0).count();
    backward_s += std::chrono::duration<double>(clock::now() - t1).count();
  }
  const auto& r = layer.routing();
  std::string aux;  // each aux loss's raw value, in the order the router lists them
  for (const float v : layer.router().loss_values()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.4f", aux.empty() ? "" : " ", double(v));
    aux += buf;
  }
  const double ms = 1e3 / double(s.reps);
  char capacity[32], drop[32], cv[32];  // room for any long: GCC checks at -O2
  double experts_per_token = 0;
  if constexpr (moe::is_soft_routing<std::remove_cvref_t<decltype(r)>>) {
    // soft: p slots per expert, every slot mixes every token and back; nothing dropped
    std::snprintf(capacity, sizeof capacity, "soft p=%ld", long(r.slots_per_expert));
    std::snprintf(drop, sizeof drop, "n/a");
    std::snprintf(cv, sizeof cv, "n/a");
    experts_per_token = double(r.num_experts);
  } else {
    if (r.capacity < 0) std::snprintf(capacity, sizeof capacity, "none");
    else std::snprintf(capacity, sizeof capacity, "%ld", long(r.capacity));
    std::snprintf(drop, sizeof drop, "%.2f", 100.0 * moe::drop_fraction(r));
    std::snprintf(cv, sizeof cv, "%.3f", moe::load_cv(r));
    experts_per_token = moe::experts_per_token(r);
  }
  std::printf("| %-27s | %9.0f | %8.2f | %8.2f | %8s | %7s | %7s | %8.3f | %-16s |\n", name,
              double(s.tokens) * double(s.reps) / forward_s, forward_s * ms, backward_s * ms,
              capacity, drop, cv, experts_per_token, aux.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  std::printf("moe-routers %s demo: T=%ld tokens, D=%ld, E=%ld experts, FFN hidden %ld (GELU), float\n",
              MOE_VERSION_STRING, long(s.tokens), long(s.dim), long(s.experts), long(s.hidden));
  std::printf("SIMD target %s, %d thread%s, mean of %ld forward + backward passes after "
              "one warm-up\n\n",
              moe::simd_target(), moe::max_threads(), moe::max_threads() == 1 ? "" : "s", long(s.reps));
  // Tokens from a few clusters, so routing has structure to find (and load is not uniform).
  moe::Matrix<float> x(s.tokens, s.dim);
  const moe::CounterRng rng(42);
  for (moe::Index t = 0; t < s.tokens; ++t)
    for (moe::Index j = 0; j < s.dim; ++j)
      x(t, j) = float(rng.normal(t, j) + 2.0 * rng.normal(t % 5, s.dim + j));

  std::printf("| %-27s | %9s | %8s | %8s | %8s | %7s | %7s | %8s | %-16s |\n", "preset", "fwd tok/s",
              "fwd ms", "bwd ms", "capacity", "drop %", "load CV", "exp/tok", "aux losses");
  std::printf("|%s|%s:|%s:|%s:|%s:|%s:|%s:|%s:|%s|\n", std::string(29, '-').c_str(),
              std::string(10, '-').c_str(), std::string(9, '-').c_str(), std::string(9, '-').c_str(),
              std::string(9, '-').c_str(), std::string(8, '-').c_str(), std::string(8, '-').c_str(),
              std::string(9, '-').c_str(), std::string(18, '-').c_str());
  run("SwitchRouter", moe::make_switch_router<float>(s.dim, s.experts), s, x);
  run("GShardRouter", moe::make_gshard_router<float>(s.dim, s.experts), s, x);
  run("TopKRouter", moe::make_topk_router<float>(s.dim, s.experts, 2), s, x);
  run("DeepSpeedTopKRouter", moe::make_deepspeed_topk_router<float>(s.dim, s.experts, 2), s, x);
  run("DeepSpeedTopKRouter k=1", moe::make_deepspeed_topk_router<float>(s.dim, s.experts, 1, 1.0, 8, 0, std::nullopt,
                                                                         {.noisy_gate_policy = moe::NoisyGatePolicy::jitter}), s, x);
  run("XMoERouter", moe::make_xmoe_router<float>(s.dim, s.experts, 2), s, x);
  run("NoisyTopKRouter", moe::make_noisy_topk_router<float>(s.dim, s.experts, 2), s, x);
  run("VMoERouter", moe::make_vmoe_router<float>(s.dim, s.experts, 2), s, x);
  run("BPRRouter", moe::make_bpr_router<float>(s.dim, s.experts, 2), s, x);
  run("TopPRouter", moe::make_top_p_router<float>(s.dim, s.experts), s, x);
  run("XMoEThresholdRouter", moe::make_xmoe_threshold_router<float>(s.dim, s.experts), s, x);
  // DA-MoE's importance comes from attention; here a deterministic stand-in: the token's
  // distance from the batch mean, so tokens far from the bulk get more experts
  std::vector<float> importance(static_cast<std::size_t>(s.tokens));
  const moe::Matrix<float> mean = x.colwise().mean();
  for (moe::Index t = 0; t < s.tokens; ++t) importance[std::size_t(t)] = (x.row(t) - mean).norm();
  run("DynamicKRouter", moe::make_dynamic_k_router<float>(s.dim, s.experts), s, x, {.importance = importance});
  // DeepSeek-V3's 8 groups of 32, 4 kept, k = 8 need E = 256 (--experts 256); below that the row
  // is scaled to 4 groups, 2 kept, k = 4 (E divisible by 4), still scoring a group by its top 2
  if (s.experts == 256)
    run("DeepSeekV3Router", moe::make_deepseek_v3_router<float>(s.dim, s.experts), s, x);
  else if (s.experts % 4 == 0 && s.experts >= 8)
    run("DeepSeekV3Router", moe::make_deepseek_v3_router<float>(s.dim, s.experts, 4, 4, 2), s, x);
  run("ExpertChoiceRouter", moe::make_expert_choice_router<float>(s.dim, s.experts, 2.0), s, x);
  run("SinkhornRouter token", moe::make_sinkhorn_router<float>(s.dim, s.experts, 2, 1.25), s, x);
  run("SinkhornRouter expert", moe::make_sinkhorn_router<float, moe::Choice::expert>(s.dim, s.experts, 2, 1.25), s, x);
  run("SinkhornRouter S-BASE", moe::make_sbase_router<float>(s.dim, s.experts, 2), s, x);
  run("SparsityConstrainedECRouter", moe::make_sparsity_constrained_ec_router<float>(s.dim, s.experts, 2.0), s, x);
  run("SoftMoERouter", moe::make_soft_moe_router<float>(s.dim, s.experts, 1), s, x);
  run("AttentionRouter", moe::make_attention_router<float>(s.dim, s.experts, 2), s, x);
  {  // GLIDER: stand-ins for the embedded instructions, one per expert's task and one per sequence of 512
    auto glider = moe::make_glider_router<float>(s.dim, s.experts, 2, 3.0);
    const moe::Index sequences = (s.tokens + 511) / 512, width = 64;
    moe::Matrix<float> u(s.experts, width), q(sequences, width);
    for (moe::Index e = 0; e < s.experts; ++e)
      for (moe::Index j = 0; j < width; ++j) u(e, j) = float(rng.normal(1000 + e, j));
    for (moe::Index i = 0; i < sequences; ++i)
      for (moe::Index j = 0; j < width; ++j) q(i, j) = float(rng.normal(2000 + i, j));
    glider.scorer().set_expert_embeddings(u);
    glider.scorer().set_instructions(q);
    std::vector<std::int32_t> query(static_cast<std::size_t>(s.tokens));
    for (moe::Index t = 0; t < s.tokens; ++t) query[std::size_t(t)] = std::int32_t(t / 512);
    run("GliderRouter", std::move(glider), s, x, {.segment = query});
  }
  {  // task-level MoE: each sequence of 512 tokens one example, of 4 tasks in turn, 64-wide task embeddings
    std::vector<std::int32_t> example(static_cast<std::size_t>(s.tokens)), task_of((static_cast<std::size_t>(s.tokens) + 511) / 512);
    for (moe::Index t = 0; t < s.tokens; ++t) example[std::size_t(t)] = std::int32_t(t / 512);
    for (std::size_t i = 0; i < task_of.size(); ++i) task_of[i] = std::int32_t(i % 4);
    auto task = moe::make_task_router<float>(s.dim, s.experts, 4, 64, 64, moe::TaskForm::sparse);
    task.scorer().set_segment_tasks(task_of);
    task.gate().set_temperature(moe::gumbel_temperature(1000));
    run("TaskRouter", std::move(task), s, x, {.segment = example});
  }
  run("HyperRouter", moe::make_hyper_router<float>(s.dim, s.experts, 2), s, x);
  run("SMoEDropoutRouter", moe::make_smoe_dropout_router<float>(s.dim, s.experts, 2), s, x);
  run("OmniRouter (layer 1)", std::move(moe::make_omni_routers<float>(s.dim, s.experts, 2).front()), s, x);
  {  // the codebook drawn around the data's scale (the reference's U(-1/K, 1/K) sits near 0)
    auto vq = moe::make_vq_router<float>(s.dim, s.experts, s.experts);
    for (moe::Index j = 0; j < s.experts; ++j) vq.scorer().codebook().row(j) = x.row(j * (s.tokens / s.experts));
    run("VQRouter", std::move(vq), s, x);
  }
  // depth routers: one block (an FFN), sequences of 512 tokens as segments
  std::vector<std::int32_t> sequence(static_cast<std::size_t>(s.tokens));
  for (moe::Index t = 0; t < s.tokens; ++t) sequence[std::size_t(t)] = std::int32_t(t / 512);
  run("DepthRouter", moe::make_depth_router<float>(s.dim), s, x, {.segment = sequence});
  run("MindSkipRouter", moe::make_mindskip_router<float>(s.dim), s, x, {.segment = sequence});
  // the released models' routers, at the demo's E (k capped at E)
  const auto k_of = [&](moe::Index k) { return std::min(k, s.experts); };
  run("MixtralRouter", moe::make_mixtral_router<float>(s.dim, s.experts, k_of(2)), s, x);
  run("Qwen2MoERouter", moe::make_qwen2_moe_router<float>(s.dim, s.experts, k_of(4)), s, x);
  run("Qwen3MoERouter", moe::make_qwen3_moe_router<float>(s.dim, s.experts, k_of(8)), s, x);
  run("OLMoERouter", moe::make_olmoe_router<float>(s.dim, s.experts, k_of(8)), s, x);
  run("DbrxRouter", moe::make_dbrx_router<float>(s.dim, s.experts, k_of(4)), s, x);
  if (s.experts % 8 == 0)  // V2's 8 groups, 3 kept, k = 6
    run("DeepSeekV2Router", moe::make_deepseek_v2_router<float>(s.dim, s.experts), s, x);
  run("GptOssRouter", moe::make_gpt_oss_router<float>(s.dim, s.experts, k_of(4)), s, x);
  run("Llama4Router", moe::make_llama4_router<float>(s.dim, s.experts), s, x, {}, moe::WeightedAt::input);
  std::printf("\ncapacity: slots per expert (none: dropless); drop %%: (token, choice) pairs dropped; "
              "load CV: std/mean of tokens per expert;\nexp/tok: experts per real token; aux losses: "
              "each loss's raw value, in the preset's order (balance, then z-loss;\n"
              "importance, then load for NoisyTopKRouter and VMoERouter; importance for BPRRouter;\n"
              "balance, then entropy for TopPRouter).\n"
              "TopPRouter, XMoEThresholdRouter, DynamicKRouter: experts per token vary by token (exp/tok is the "
              "mean); DynamicKRouter's importance: the token's distance from the batch mean.\n"
              "NoisyTopKRouter, VMoERouter: noise on the logits in training, drawn afresh each pass; "
              "VMoERouter and BPRRouter at the demo's E (the V-MoE paper: --experts 32).\n"
              "DeepSpeedTopKRouter: top2gating (second expert Gumbel-sampled); k=1: top1gating with random token "
              "selection and input jitter.\n"
              "DeepSeekV3Router: DeepSeek-V3's 8 groups, 4 kept, k = 8 at --experts 256 only; at other E "
              "(divisible by 4) scaled to 4 groups, 2 kept, k = 4.\n"
              "ExpertChoiceRouter, SparsityConstrainedECRouter: experts take their top C tokens (cf 2: as many slots as "
              "top-2); a token may get 0..E experts.\n"
              "SinkhornRouter token / expert: top-2 per token or top-C per expert of the Sinkhorn plan (same slots); "
              "S-BASE: Megatron's form, dropless.\n"
              "SoftMoERouter: p = 1 slot per expert, each slot a softmax mix of every token, each token a softmax "
              "mix of every slot's output (exp/tok = E); nothing dropped, no loss.\n"
              "AttentionRouter: Yuan 2.0-M32's attention across the experts (q k^T per token), top-2 renormalised, dropless, "
              "no loss.\n"
              "GliderRouter: local LayerNorm router plus 3 x the cosine of random stand-in instruction embeddings "
              "(one per expert, one per sequence of 512), top-2.\n"
              "TaskRouter: one expert per sequence of 512 (4 tasks in turn) from its task embedding, Gumbel-sampled at "
              "tau(step 1000) = 1.48; the sparse form (the reference's\ninference; its dense training form runs all E "
              "experts, the chosen one weighted 1).\n"
              "HyperRouter: router weights from a frozen random hypernetwork (hidden 256) of a trainable embedding; "
              "SMoEDropoutRouter: a frozen random router; both top-2, softmax over the 2.\n"
              "OmniRouter (layer 1): the first of two layers sharing one router weight; alone it routes as "
              "SwitchRouter.\n"
              "VQRouter: each token to the expert of its nearest code (K = E codes, started from tokens of the batch), "
              "weight 1, dropless; its loss (codebook + commitment)\nis the quantiser's own (Router::aux_loss), not a loss term.\n"
              "DepthRouter, MindSkipRouter: one block (the FFN) and the skip path y = x + w f(x), per sequence of 512 "
              "tokens; DepthRouter runs the top 12.5%% of each\nsequence (aux loss: its predictor's BCE); MindSkipRouter "
              "decides per sequence, and in training runs every token times its 0/1 decision\n(aux loss: the share of "
              "sequences that run the block).\n"
              "Released models' routers, each at the demo's E with its model's k (Mixtral 2, Qwen2-MoE 4, Qwen3-MoE 8, "
              "OLMoE 8, DBRX 4, DeepSeek-V2 6 in 3 of 8 groups\n(E divisible by 8), gpt-oss 4, Llama 4 1): "
              "aux losses as Hugging Face computes them per layer; DeepSeekV2Router's weights are 16 x the "
              "probabilities;\nLlama4Router's weight scales the expert's input (the demo's experts have no shared "
              "expert).\n");
  return 0;
}
