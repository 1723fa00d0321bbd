// The learned routers: Yuan 2.0-M32's attention router forward (the [T, 3E] projection GEMM, then
// per token an E x E attention across the experts), beside BM_Expf (its T E^2 exps dominate)
// and BM_EigenGemm (the projection's shape); VQMoE's nearest-code routing, whose distance GEMM
// is read against BM_FmaPeak.
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

// x [T, D] -> routing: VQRouter (squared distances to K codes through one GEMM, the nearest code,
// code mod E), with the quantiser's loss. FLOP/s counts the distance GEMM's 2 T D K.
static void BM_VQRoute(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), K = state.range(2);
  auto router = moe::make_vq_router<float>(D, 16, K);
  router.scorer().codebook() = random_matrix(K, D, 3100, 0.5);
  std::vector<Matrix<float>> sets;
  for (int i = 0; i < 2; ++i) sets.push_back(random_matrix(T, D, 3200 + i));  // GEMM-bound: two inputs suffice
  for (const auto& x : sets) router.forward(x);
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.forward(sets[i++ % 2]).num_slots());
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(T) * double(D) * double(K), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, double(T * D) * sizeof(float));
}
// The distances alone (kernels::squared_distances: the GEMM, then the norms pass): the
// distance GEMM's FLOP/s against BM_FmaPeak.
static void BM_VQDistances(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), K = state.range(2);
  const Matrix<float> x = random_matrix(T, D, 3300), codebook = random_matrix(K, D, 3301, 0.5);
  Matrix<float> dist(T, K), norms;
  moe::Gemm<float> gemm;
  moe::kernels::squared_distances<float, true>(x, codebook, dist, gemm, norms);  // warm-up outside the timer
  for (auto _ : state) {
    moe::kernels::squared_distances<float, true>(x, codebook, dist, gemm, norms);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(T) * double(D) * double(K), benchmark::Counter::kIsIterationInvariantRate);
}

static void vq_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "K"})->Unit(benchmark::kMillisecond);
  shapes(b, {{16384, 1024, 256}}, {64, 16, 16});
}
BENCHMARK(BM_VQRoute)->Apply(vq_shapes);
BENCHMARK(BM_VQDistances)->Apply(vq_shapes);

}  // namespace moe_bench
