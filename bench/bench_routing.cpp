// Routing: given logits (softmax + top-k + capacity + slots + balance loss), and gating with the
// logits GEMM in front.
#include "common.hpp"

namespace moe_bench {

static void BM_TokenChoiceRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2);
  auto router = benchmark_router(8, E, k);
  time_route(state, router, T, E);
}

// BM_TokenChoiceRoute in Shazeer's form (NoisyTopKRouter): the noise is drawn inside the scorer,
// so this runs forward from x [T, 8] (the logits GEMM is small next to the rest): clean and
// noise-deviation logits, generated N(0, 1) draws, top-k of the noisy logits, softmax over the k
// kept, dropless, importance and load (normal CDF against the (k+1)-th / k-th noisy logit) losses.
static void BM_NoisyTopKRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2), D = 8;
  std::vector<Matrix<float>> xs;
  for (int s = 0; s < rotating_sets; ++s) xs.push_back(random_matrix(T, D, 3000 + s));
  auto router = moe::make_noisy_topk_router<float>(D, E, k);
  router.scorer().weight() = random_matrix(E, D, 1, 0.7);  // trained-looking: not the zero start
  router.scorer().noise_weight() = random_matrix(E, D, 2, 0.1);
  for (const auto& x : xs) router.forward(x);  // warm-up: sizes and touches every buffer
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.forward(xs[i++ % rotating_sets]).num_slots());
  set_rates(state, T, double(T * D + 2 * T * E) * sizeof(float));
}

// DeepSeek-V3 routing of given logits: sigmoid + expert bias, 8-group limited top-8, weights
// 2.5 s / sum s, dropless, sequence-wise balance loss (one sequence per 4096 tokens).
static void BM_GroupLimitedRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2), G = state.range(3);
  auto router = moe::make_deepseek_v3_router<float>(8, E, k, G, G / 2);
  for (Index e = 0; e < E; ++e) router.gate().bias()(0, e) = 1e-3f * float(e % 7) - 3e-3f;  // a trained-looking bias
  std::vector<std::int32_t> segment(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) segment[static_cast<std::size_t>(t)] = std::int32_t(t / 4096);
  time_route(state, router, T, E, {.segment = segment});
}

// Released models' routers on given logits, as Hugging Face runs their gates, with the balance
// loss their training computes: model 0 = Qwen3-MoE (softmax, top-8 of 128, renormalised, HF's
// load-balancing loss), 1 = DeepSeek-V2 (softmax, top-6 among 3 of 8 groups scored by their
// maximum, weights 16 p, sequence-wise balance loss over sequences of 4096).
static void BM_ReleasedRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2), model = state.range(3);
  std::vector<std::int32_t> segment(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) segment[static_cast<std::size_t>(t)] = std::int32_t(t / 4096);
  if (model == 0) {
    auto router = moe::make_qwen3_moe_router<float>(8, E, k);
    time_route(state, router, T, E);
  } else {
    auto router = moe::make_deepseek_v2_router<float>(8, E, k, 8, 3);
    time_route(state, router, T, E, {.segment = segment});
  }
}

// DeepSpeed's stochastic gating of given logits, with generated draws: k = 1 top1gating (random
// token selection: a U(0, 1) draw per choice of an overflowing expert, and a partial sort), k = 2
// top2gating (the second expert sampled by one U(0, 1) draw per token through the cumulative
// softmax). Compare BM_TokenChoiceRoute at the same T, E, k.
static void BM_NoisyRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2);
  auto router = moe::make_deepspeed_topk_router<float>(8, E, k, 1.25, 8);
  time_route(state, router, T, E);
}

static void BM_Gating(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2), k = state.range(3);
  std::vector<Matrix<float>> xs;
  for (int s = 0; s < rotating_sets; ++s) xs.push_back(random_matrix(T, D, 2000 + s));
  auto router = benchmark_router(D, E, k);
  router.forward(xs[0]);  // warm-up outside the timer
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.forward(xs[i++ % rotating_sets]).num_slots());
  set_rates(state, T, double(T * D + E * D + T * E) * sizeof(float));
}

// The logits GEMM alone through the library's scorer (compare BM_EigenGemm of the same shape).
static void BM_Logits(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2);
  const Matrix<float> x = random_matrix(T, D, 1);
  moe::LinearScorer<float> scorer(D, E);
  Matrix<float> out(T, E);
  scorer.forward(x, {}, out);  // warm-up outside the timer
  for (auto _ : state) {
    scorer.forward(x, {}, out);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(T * D * E), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, double(T * D + E * D + T * E) * sizeof(float));
}

// X-MoE's cosine scorer on the same shapes as BM_Logits: x P^T (r = 16), then the cosine logits
// against the normalised expert embeddings. form 0 = the paper's (token norms and a temperature
// too), 1 = the torchscale reference's (embeddings rescaled before each forward).
static void BM_CosineScorer(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2);
  const auto form = state.range(3) == 0 ? moe::CosineForm::paper : moe::CosineForm::torchscale;
  const Matrix<float> x = random_matrix(T, D, 1);
  moe::CosineScorer<float> scorer(D, E, {.form = form});
  Matrix<float> out(T, E);
  scorer.forward(x, {}, out);  // warm-up outside the timer
  for (auto _ : state) {
    scorer.forward(x, {}, out);
    benchmark::ClobberMemory();
  }
  const double r = double(scorer.proj_dim());
  state.counters["FLOP/s"] =
      benchmark::Counter(2.0 * double(T) * r * double(D + E), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, (double(T * D + T * E) + r * double(D + E)) * sizeof(float));
}

static void token_choice_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"});
  if (smoke_run()) return void(b->Args({64, 8, 2}));
  for (Index T : {4096, 16384})
    for (Index E : {8, 64, 256})
      for (Index k : {1, 2, 8})
        if (k <= E) b->Args({T, E, k});
}

BENCHMARK(BM_TokenChoiceRoute)->Apply(token_choice_shapes)->Unit(benchmark::kMicrosecond);
static void noisy_topk_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"});
  shapes(b, {{16384, 8, 1}, {16384, 64, 2}, {16384, 256, 8}}, {64, 8, 2});
}
BENCHMARK(BM_NoisyTopKRoute)->Apply(noisy_topk_shapes)->Unit(benchmark::kMicrosecond);
static void group_limited_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k", "G"});
  shapes(b, {{16384, 256, 8, 8}}, {64, 16, 4, 4});
}
BENCHMARK(BM_GroupLimitedRoute)->Apply(group_limited_shapes)->Unit(benchmark::kMicrosecond);
static void released_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k", "model"});
  shapes(b, {{16384, 128, 8, 0}, {16384, 160, 6, 1}}, {64, 16, 8, 0});
  if (smoke_run()) b->Args({64, 16, 6, 1});
}
BENCHMARK(BM_ReleasedRoute)->Apply(released_shapes)->Unit(benchmark::kMicrosecond);
static void noisy_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"});
  shapes(b, {{16384, 8, 1}, {16384, 64, 1}, {16384, 8, 2}, {16384, 64, 2}}, {64, 8, 2});
}
BENCHMARK(BM_NoisyRoute)->Apply(noisy_shapes)->Unit(benchmark::kMicrosecond);
static void logits_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "E"});
  shapes(b, {{16384, 1024, 8}, {16384, 1024, 64}, {16384, 1024, 256}}, {64, 32, 8});
}
static void cosine_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "E", "form"});
  shapes(b, {{16384, 1024, 64, 0}, {16384, 1024, 64, 1}}, {64, 32, 8, 0});
}
static void gating_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "E", "k"});
  shapes(b, {{16384, 1024, 8, 1}, {16384, 1024, 64, 2}, {16384, 1024, 256, 8}}, {64, 32, 8, 2});
}
BENCHMARK(BM_Logits)->Apply(logits_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CosineScorer)->Apply(cosine_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gating)->Apply(gating_shapes)->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench
