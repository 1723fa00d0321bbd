// Expert choice and the transport-plan routers of "Routers in Vision MoE", routing given logits
// (compare BM_TokenChoiceRoute at the same T and E), and the per-column top-C alone (compare
// BM_Memcpy of the score matrix's bytes: one read of it).
#include "common.hpp"

namespace moe_bench {

// vmoe's expert choice: softmax, each expert its top C = ceil(cf k T / E) tokens (a multiple of
// 4), slots by descending score; the capacity factor 1.25 per choice of k = 2 token choice.
static void BM_ExpertChoiceRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), k = state.range(2);
  auto router = moe::make_expert_choice_router<float>(8, E, 1.25 * double(k));
  time_route(state, router, T, E);
}

// The selection alone: each column's top C of a softmax score matrix [T, E], in (score desc,
// token asc) order. Its bytes are one read of the matrix.
static void BM_ColumnTopC(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), C = state.range(2);
  std::vector<Matrix<float>> sets;
  for (const auto& logits : logit_sets(T, E)) {
    Matrix<float> p(T, E);
    moe::kernels::softmax_rows<float>(logits, p);
    sets.push_back(std::move(p));
  }
  std::vector<std::int32_t> out(std::size_t(E * C));
  moe::kernels::TopCScratch<float> scratch;
  for (const auto& p : sets) moe::kernels::top_c_per_column<float>(p, C, {}, T, out, scratch);
  int i = 0;
  for (auto _ : state) {
    moe::kernels::top_c_per_column<float>(sets[i++ % rotating_sets], C, {}, T, out, scratch);
    benchmark::DoNotOptimize(out.data());
  }
  set_rates(state, T, double(T * E) * sizeof(float));
}

// Sinkhorn routing of given logits: mode 0 token choice (vmoe: 20 ott rounds, top-2 of the plan,
// V-MoE capacity 1.25), 1 expert choice (20 rounds, each expert its top C of the plan, the same
// C), 2 Megatron's S-BASE in training (rounds until the mean change of the column scaling is at
// most 1e-4, top-2 of the plan, dropless).
static void BM_SinkhornRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1), mode = state.range(2);
  if (mode == 0) {
    auto router = moe::make_sinkhorn_router<float>(8, E, 2, 1.25);
    time_route(state, router, T, E);
  } else if (mode == 1) {
    auto router = moe::make_sinkhorn_router<float, moe::Choice::expert>(8, E, 2, 1.25);
    time_route(state, router, T, E);
  } else {
    auto router = moe::make_sbase_router<float>(8, E, 2);
    time_route(state, router, T, E);
    state.counters["rounds"] = double(router.gate().rounds());
  }
}

// vmoe's sparsity-constrained expert choice: at most 20 Adam steps on the semi-dual, each a
// per-column top C of the shifted scores and a simplex projection, then the top C of the plan.
static void BM_SparsityConstrainedRoute(benchmark::State& state) {
  const Index T = state.range(0), E = state.range(1);
  auto router = moe::make_sparsity_constrained_ec_router<float>(8, E, 2.5);
  time_route(state, router, T, E);
  state.counters["steps"] = double(router.selector().steps());
}

static void expert_choice_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "k"});
  shapes(b, {{16384, 8, 2}, {16384, 64, 2}, {16384, 256, 2}}, {64, 8, 2});
}
static void column_top_c_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "C"});
  shapes(b, {{16384, 64, 640}, {16384, 64, 64}}, {64, 8, 16});
}
static void sinkhorn_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E", "mode"});
  shapes(b, {{16384, 64, 0}, {16384, 64, 1}, {16384, 64, 2}}, {64, 8, 0});
}
static void sparsity_constrained_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E"});
  shapes(b, {{4096, 64}}, {64, 8});
}
BENCHMARK(BM_ExpertChoiceRoute)->Apply(expert_choice_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ColumnTopC)->Apply(column_top_c_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SinkhornRoute)->Apply(sinkhorn_shapes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SparsityConstrainedRoute)->Apply(sparsity_constrained_shapes)->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench
