// Soft MoE: the whole layer forward (logits, two softmaxes, dispatch and combine GEMMs, experts),
// its two dense GEMMs alone, and the two softmaxes alone. FLOP/s counters read against
// BM_FmaPeak, elements/s (one exp per element and softmax) against BM_Expf.
#include "common.hpp"

namespace moe_bench {

namespace {
constexpr Index soft_experts = 64;  // S = E p slots: E = 64 experts of S / 64 slots each

Index slots_per_expert(Index S) { return std::max<Index>(1, S / soft_experts); }
Index experts_for(Index S) { return S / slots_per_expert(S); }

// The dispatch (X~ = dispatch x, [S, T] [T, D]) and combine (y = combine Y~, [T, S] [S, D])
// products: 2 T S D FLOPs each.
double mix_flops(Index T, Index D, Index S) { return 4.0 * double(T) * double(S) * double(D); }
}  // namespace

// extra_flops: the experts' GEMMs, counted with the logits and mixing GEMMs in "GEMM FLOP/s"
template <class Experts>
void soft_layer_forward(benchmark::State& state, Experts experts, double extra_flops = 0) {
  const Index T = state.range(0), D = state.range(1), S = state.range(2);
  const Index E = experts_for(S);
  moe::MoELayer layer(moe::make_soft_moe_router<float>(D, E, slots_per_expert(S)), std::move(experts));
  layer.set_grad_enabled(false);
  // GEMM-bound, no branches to learn: one input suffices (8 sets of [T, D] would take 512 MiB)
  const Matrix<float> x = random_matrix(T, D, 8);
  Matrix<float> y(T, D);
  layer.forward(x, y);  // warm-up outside the timer
  for (auto _ : state) {
    layer.forward(x, y);
    benchmark::ClobberMemory();
  }
  // the dispatch and combine GEMMs' FLOPs over the whole layer's time (a lower bound of their rate)
  state.counters["mix FLOP/s"] = benchmark::Counter(mix_flops(T, D, S), benchmark::Counter::kIsIterationInvariantRate);
  // every GEMM of the forward (logits 2 T D S, the two mixes, the experts') over the layer's time
  const double gemm_flops = 2.0 * double(T) * double(D) * double(S) + mix_flops(T, D, S) + extra_flops;
  state.counters["GEMM FLOP/s"] = benchmark::Counter(gemm_flops, benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, 2.0 * double(T * D) * sizeof(float));
}

static void BM_SoftMoELayer(benchmark::State& state) {
  const Index D = state.range(1), S = state.range(2);
  soft_layer_forward(state, moe::IdentityExperts<float>(experts_for(S), D));
}

// FFN experts (GELU, hidden H) on their p slots each: 2 GEMMs of 2 S D H more.
static void BM_SoftMoELayerFFN(benchmark::State& state) {
  const Index D = state.range(1), S = state.range(2), H = state.range(3);
  soft_layer_forward(state, moe::FFNExperts<float>(experts_for(S), D, H), 4.0 * double(S) * double(D) * double(H));
}

// The two mixing GEMMs alone, as the layer runs them (moe::Gemm, row blocks of the output).
static void BM_SoftDispatchCombineGemm(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), S = state.range(2);
  const Matrix<float> x = random_matrix(T, D, 9), dispatch = random_matrix(S, T, 10),
                      combine = random_matrix(T, S, 11);
  Matrix<float> slots(S, D), y(T, D);
  moe::Gemm<float> gemm;
  const auto run = [&] {
    gemm.run(dispatch, x, slots);
    gemm.run(combine, slots, y);
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(mix_flops(T, D, S), benchmark::Counter::kIsIterationInvariantRate);
}

// Routing given logits [T, S]: the identity gate's copy, the token softmax per slot (with the
// transpose) and the slot softmax per token. elements/s counts the 2 T S exps.
static void BM_SoftSlotsRoute(benchmark::State& state) {
  const Index T = state.range(0), S = state.range(2);
  auto router = moe::make_soft_moe_router<float>(8, experts_for(S), slots_per_expert(S));
  std::vector<Matrix<float>> sets;
  for (int i = 0; i < 2; ++i) sets.push_back(random_matrix(T, S, 2000 + i, 2.0));
  for (const auto& logits : sets) router.route(logits);
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.route(sets[i++ % 2]).num_slots());
  state.counters["elements/s"] = benchmark::Counter(2.0 * double(T) * double(S), benchmark::Counter::kIsIterationInvariantRate);
  set_rates(state, T, double(T * S) * sizeof(float));
}

static void soft_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "S"})->Unit(benchmark::kMillisecond);
  shapes(b, {{16384, 1024, 512}}, {64, 32, 16});
}
static void soft_ffn_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "S", "H"})->Unit(benchmark::kMillisecond);
  shapes(b, {{16384, 1024, 512, 256}}, {64, 32, 16, 24});
}
BENCHMARK(BM_SoftMoELayer)->Apply(soft_shapes);
BENCHMARK(BM_SoftMoELayerFFN)->Apply(soft_ffn_shapes);
BENCHMARK(BM_SoftDispatchCombineGemm)->Apply(soft_shapes);
BENCHMARK(BM_SoftSlotsRoute)->Apply(soft_shapes);

}  // namespace moe_bench
