// Dynamic-k routing of given logits: top-p (Dynamic_MoE), XMoE threshold gating with capacity,
// and per-token k from an importance vector.
#include "common.hpp"

namespace moe_bench {

// Top-p as Dynamic_MoE routes (p = 0.4, its config's top_p_threshold; softmax, experts by descending probability until the mass exceeds
// p, raw weights, dropless), the routing alone: no losses, as the reference's routing function
// computes none. compare_pytorch.py times the reference's sort + cumsum + mask on the same shapes.
static void BM_TopPRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1);
  moe::Router router(moe::LinearScorer<float>(8, E), moe::SoftmaxGate<float>{}, moe::TopPSelector<float>({.p = 0.4}));
  time_route(state, router, T, E);
  state.counters["experts/token"] = moe::experts_per_token(router.routing());
}

// The TopPRouter preset: the same routing plus its balance and entropy losses (the entropy reads
// every score: one log per (token, expert)).
static void BM_TopPRouterPreset(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1);
  auto router = moe::make_top_p_router<float>(8, E, 0.4);
  time_route(state, router, T, E);
}

// XMoE's threshold gating: threshold 0.9, C = max(ceil(cf T / E), 4), rank-major-by-probability
// overflow, priority slots.
static void BM_XMoEThresholdRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1);
  auto router = moe::make_xmoe_threshold_router<float>(8, E, 0.9, 1.25);
  time_route(state, router, T, E);
  state.counters["experts/token"] = moe::experts_per_token(router.routing());
}

// Per-token k (DA-MoE form): k_t from a fixed importance vector, k_max = 4, capacity 1.25.
static void BM_DynamicKRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1);
  std::vector<float> importance(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) importance[std::size_t(t)] = float((t * 2654435761u) % 1000) / 1000.0f;
  auto router = moe::make_dynamic_k_router<float>(8, E, 4, 1.25);
  time_route(state, router, T, E, {.importance = importance});
}

static void top_p_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E"});
  shapes(b, {{4096, 8}, {16384, 8}, {16384, 64}, {16384, 256}}, {64, 8});
}
static void dynamic_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E"});
  shapes(b, {{16384, 8}, {16384, 64}}, {64, 8});
}
BENCHMARK(BM_TopPRoute)->Apply(top_p_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TopPRouterPreset)->Apply(dynamic_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_XMoEThresholdRoute)->Apply(dynamic_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DynamicKRoute)->Apply(dynamic_shapes)->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench
