// The learned routers: Yuan 2.0-M32's attention router forward (the [T, 3E] projection GEMM, then
// per token an E x E attention across the experts), beside BM_Expf (its T E^2 exps dominate)
// and BM_EigenGemm (the projection's shape).
#include "common.hpp"

namespace moe_bench {

// x [T, D] -> routing: AttentionRouter per token (E x E softmax of q k^T, times v), top-2.
// elements/s counts the T E^2 exps.
static void BM_AttentionRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), D = state.range(2);
  auto router = moe::make_attention_router<float>(D, E, 2);
  std::vector<Matrix<float>> sets;
  for (int i = 0; i < 2; ++i) sets.push_back(random_matrix(T, D, 3000 + i));  // [T, D] inputs: two suffice, GEMM-bound
  for (const auto& x : sets) router.forward(x);
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.forward(sets[i++ % 2]).num_slots());
  state.counters["elements/s"] = benchmark::Counter(double(T) * double(E * E), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, double(T * D) * sizeof(float));
}
static void attention_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "D"})->Unit(benchmark::kMillisecond);
  shapes(b, {{16384, 64, 1024}, {16384, 32, 1024}}, {64, 8, 16});
}
BENCHMARK(BM_AttentionRoute)->Apply(attention_shapes);

}  // namespace moe_bench
