// Depth routing (Mixture-of-Depths): the per-sequence top C of given router scores, and the layer
// forward with an FFN block at 12.5% capacity beside the same layer at full capacity (every token
// runs the block: the dense baseline whose time the routed layer should cut by about 8).
#include "common.hpp"

namespace moe_bench {

namespace {
// Sequences of L tokens as segment ids.
std::vector<std::int32_t> sequences(Index T, Index L) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) ids[std::size_t(t)] = std::int32_t(t / L);
  return ids;
}
}  // namespace

// The paper's router without a predictor: each sequence of L tokens runs its top 12.5% by r, the
// weight r itself. Bytes: one read of the scores.
static void BM_DepthRoute(benchmark::State& state) {
  const Index T = state.range(0), L = state.range(1);
  auto router = moe::Router(moe::DepthScorer<float>(8), moe::IdentityGate<float>{},
                            moe::DepthTopCSelector<float>({.capacity = {.factor = 0.125, .multiple_of = 1}}));
  const auto ids = sequences(T, L);
  time_route(state, router, T, 1, {.segment = ids});
}

// DepthRouter (with its predictor) and one FFN block (GELU, hidden H), forward without grad, the
// capacity in per mille of each sequence of 2048 tokens. "block FLOP/s" counts the block's two
// GEMMs over the tokens that run it (read against BM_FmaPeak).
static void BM_DepthLayer(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), H = state.range(2), permille = state.range(3);
  const Index L = std::min<Index>(T, 2048);
  moe::MoELayer layer(moe::make_depth_router<float>(D, double(permille) / 1000.0), moe::FFNExperts<float>(1, D, H));
  layer.set_grad_enabled(false);
  const auto ids = sequences(T, L);
  const Matrix<float> x = random_matrix(T, D, 8);  // GEMM-bound: one input suffices
  Matrix<float> y(T, D);
  layer.forward(x, y, {.segment = ids});  // warm-up outside the timer
  for (auto _ : state) {
    layer.forward(x, y, {.segment = ids});
    benchmark::ClobberMemory();
  }
  const double run = double(layer.routing().num_slots());
  state.counters["block tokens"] = run;
  state.counters["block FLOP/s"] = benchmark::Counter(4.0 * run * double(D) * double(H), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, 2.0 * double(T * D) * sizeof(float));
}

static void depth_route_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "L"})->Unit(benchmark::kMicrosecond);
  shapes(b, {{16384, 2048}, {16384, 512}}, {64, 32});
}
static void depth_layer_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "H", "permille"})->Unit(benchmark::kMillisecond);
  shapes(b, {{4096, 1024, 4096, 125}, {4096, 1024, 4096, 1000}}, {64, 16, 24, 125});
}
BENCHMARK(BM_DepthRoute)->Apply(depth_route_shapes);
BENCHMARK(BM_DepthLayer)->Apply(depth_layer_shapes);

}  // namespace moe_bench
