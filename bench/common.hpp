#pragma once
// Shared pieces of the benchmarks: the shapes, pre-generated inputs and the counters.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <vector>

#include <moe/moe.hpp>

namespace moe_bench {

using moe::Index;
using moe::Matrix;

// With MOE_BENCH_SMOKE set in the environment every benchmark registers one small shape instead
// of its real ones, so the `bench_smoke` test runs each of them once in seconds: a benchmark that
// breaks fails the test run instead of the next measurement.
inline bool smoke_run() { return std::getenv("MOE_BENCH_SMOKE") != nullptr; }

// Registers the `full` argument lists, or only `small` in a smoke run.
inline void shapes(benchmark::internal::Benchmark* b, std::initializer_list<std::vector<std::int64_t>> full,
                   const std::vector<std::int64_t>& small) {
  if (smoke_run()) {
    b->Args(small);
    return;
  }
  for (const auto& args : full) b->Args(args);
}

// A branch predictor learns inputs that repeat, so routing benchmarks rotate through this many
// pre-generated logit sets (generated outside the timer).
inline constexpr int rotating_sets = 8;

inline Matrix<float> random_matrix(Index rows, Index cols, std::uint64_t seed, double sigma = 1.0) {
  const moe::CounterRng rng(seed, 99);
  Matrix<float> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = float(sigma * rng.normal(i, j));
  return m;
}

inline std::vector<Matrix<float>> logit_sets(Index tokens, Index experts) {
  std::vector<Matrix<float>> sets;
  for (int i = 0; i < rotating_sets; ++i) sets.push_back(random_matrix(tokens, experts, 1000 + i, 2.0));
  return sets;
}

// tokens/s plus bytes/s (the bytes the operation must move at least).
inline void set_rates(benchmark::State& state, Index tokens, double bytes) {
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(std::int64_t(double(state.iterations()) * bytes));
}

// Times router.route over the rotating logit sets of [T, E] (every buffer warmed by one pass over
// them first), with the logits' bytes as the rate.
template <class Router>
void time_route(benchmark::State& state, Router& router, Index T, Index E, const moe::TokenInputs<float>& tokens = {}) {
  const auto sets = logit_sets(T, E);
  for (const auto& logits : sets) router.route(logits, tokens);
  int i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(router.route(sets[i++ % rotating_sets], tokens).num_slots());
  set_rates(state, T, double(T * E) * sizeof(float));
}

// The token-choice router every routing benchmark uses: softmax, top-k, capacity factor 1.25
// counted per choice (ceil(k cf T / E)), all first choices before second ones, weights
// renormalised over the survivors (GShard/DeepSpeed top-2), Switch balance loss.
inline auto benchmark_router(Index dim, Index experts, Index k) {
  return moe::Router(moe::LinearScorer<float>(dim, experts), moe::SoftmaxGate<float>{},
                     moe::TopKSelector<float>(k, {.weighting = moe::Weighting::renormalize_after_drop,
                                                  .capacity = {.factor = 1.25}}),
                     moe::LoadBalanceLoss<float>(moe::BalanceNorm::switch_top1));
}

}  // namespace moe_bench
