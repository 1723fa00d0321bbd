// Dispatch, combine and whole layers: identity experts (the data path alone) and SwiGLU experts.
#include "common.hpp"

namespace moe_bench {

namespace {
// One routing of T tokens over E experts, top-k, capacity factor 1.25.
struct Routed {
  Routed(Index T, Index E, Index k) : router(benchmark_router(8, E, k)), logits(random_matrix(T, E, 5, 2.0)) {
    router.route(logits);
  }
  decltype(benchmark_router(8, 8, 1)) router;
  Matrix<float> logits;
  const moe::SparseRouting<float>& routing() const { return router.routing(); }
};
}  // namespace

static void BM_Dispatch(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2), k = state.range(3);
  const Routed routed(T, E, k);
  const auto& r = routed.routing();
  const Matrix<float> x = random_matrix(T, D, 6);
  Matrix<float> blocks(r.num_slots(), D);
  moe::kernels::gather_rows<float>(x, r.slot_token, blocks);  // warm-up: first touch of the output
  for (auto _ : state) {
    moe::kernels::gather_rows<float>(x, r.slot_token, blocks);
    benchmark::ClobberMemory();
  }
  set_rates(state, T, 2.0 * double(r.num_slots() * D) * sizeof(float));  // read + write each row
}

static void BM_Combine(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2), k = state.range(3);
  const Routed routed(T, E, k);
  const auto& r = routed.routing();
  const Matrix<float> blocks = random_matrix(r.num_slots(), D, 7);
  Matrix<float> y(T, D);
  moe::kernels::combine_rows<float>(r, r.slot_weight, blocks, y, false);  // warm-up: first touch of y
  for (auto _ : state) {
    moe::kernels::combine_rows<float>(r, r.slot_weight, blocks, y, false);
    benchmark::ClobberMemory();
  }
  set_rates(state, T, double((r.num_slots() + T) * D) * sizeof(float));  // read slots, write y
}

// Logits GEMM + routing + dispatch + combine, identity experts: the whole data path.
static void BM_LayerIdentity(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2), k = state.range(3);
  moe::MoELayer layer(benchmark_router(D, E, k), moe::IdentityExperts<float>(E, D));
  layer.set_grad_enabled(false);  // a forward pass, as PyTorch's without autograd
  std::vector<Matrix<float>> xs;
  for (int s = 0; s < rotating_sets; ++s) xs.push_back(random_matrix(T, D, 3000 + s));
  Matrix<float> y(T, D);
  layer.forward(xs[0], y);  // warm-up outside the timer: sizes (and first-touches) every buffer
  int i = 0;
  for (auto _ : state) {
    layer.forward(xs[i++ % rotating_sets], y);
    benchmark::ClobberMemory();
  }
  set_rates(state, T, 2.0 * double(T * D) * sizeof(float));
}

// SwiGLU experts forward: FLOP counter = 3 GEMMs of 2 n D H per routed token.
static void BM_LayerSwiGLUForward(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), H = state.range(2), E = state.range(3), k = state.range(4);
  moe::MoELayer layer(benchmark_router(D, E, k), moe::SwiGLUExperts<float>(E, D, H));
  layer.set_grad_enabled(false);
  const Matrix<float> x = random_matrix(T, D, 4);
  Matrix<float> y(T, D);
  layer.forward(x, y);  // warm-up outside the timer
  for (auto _ : state) {
    layer.forward(x, y);
    benchmark::ClobberMemory();
  }
  const double flops = 3.0 * 2.0 * double(layer.routing().num_slots()) * double(D) * double(H);
  state.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, 2.0 * double(T * D) * sizeof(float));
}

static void data_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "E", "k"})->Unit(benchmark::kMicrosecond);
  shapes(b, {{16384, 1024, 64, 2}, {16384, 1024, 8, 1}}, {64, 32, 8, 2});
}
static void swiglu_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "H", "E", "k"})->Unit(benchmark::kMillisecond);
  shapes(b, {{4096, 1024, 2048, 64, 2}}, {64, 32, 48, 8, 2});
}
BENCHMARK(BM_Dispatch)->Apply(data_shapes);
BENCHMARK(BM_Combine)->Apply(data_shapes);
BENCHMARK(BM_LayerIdentity)->Apply(data_shapes);
BENCHMARK(BM_LayerSwiGLUForward)->Apply(swiglu_shapes);

}  // namespace moe_bench
