// The raw baselines every figure is read against: memcpy of the same bytes, Eigen's GEMM of the
// same shape, expf over T x E elements, and the FMA peak of one core.
#include <cmath>
#include <cstring>

#include "common.hpp"

namespace moe_bench {

// Copies the bytes a dispatch of (T, D, k) moves: T k rows of D floats.
static void BM_Memcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0) * state.range(1) * state.range(2)) * sizeof(float);
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * bytes));
}
BENCHMARK(BM_Memcpy)->ArgNames({"T", "D", "k"})->Args({16384, 1024, 2})->Args({16384, 1024, 1})->Unit(benchmark::kMicrosecond);

// x [T, D] times W^T [D, E]: the logits GEMM, through Eigen's own product.
static void BM_EigenGemm(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2);
  const Matrix<float> x = random_matrix(T, D, 1), w = random_matrix(E, D, 2);
  Matrix<float> out(T, E);
  for (auto _ : state) {
    out.noalias() = x * w.transpose();
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(T * D * E), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_EigenGemm)
    ->ArgNames({"T", "D", "E"})
    ->Args({16384, 1024, 8})
    ->Args({16384, 1024, 64})
    ->Args({16384, 1024, 256})
    ->Args({128, 1024, 2048})  // one SwiGLU expert block of the layer benchmark
    ->Unit(benchmark::kMicrosecond);

// One SwiGLU expert block through the library's GEMM: x [M, K] times W [K, N] row-major, the
// shape of the layer benchmark's gate/up projections (compare BM_EigenGemm and BM_FmaPeak).
static void BM_ExpertGemm(benchmark::State& state) {
  const Index M = state.range(0), K = state.range(1), N = state.range(2);
  const Matrix<float> x = random_matrix(M, K, 1), w = random_matrix(K, N, 2);
  Matrix<float> out(M, N);
  moe::Gemm<float> gemm;
  gemm.run(x, w, out);  // sizes the packing buffers outside the timer
  for (auto _ : state) {
    gemm.run(x, w, out);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(M * K * N), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ExpertGemm)->ArgNames({"M", "K", "N"})->Args({128, 1024, 2048})->Unit(benchmark::kMicrosecond);

// The same product with the weights packed once ahead (kernels::PackedB, as the experts'
// inference cache holds them): the GEMM without packing B.
static void BM_ExpertGemmPacked(benchmark::State& state) {
  const Index M = state.range(0), K = state.range(1), N = state.range(2);
  const Matrix<float> x = random_matrix(M, K, 1), w = random_matrix(K, N, 2);
  Matrix<float> out(M, N);
  moe::kernels::PackedB<float> packed;
  packed.pack(w);
  moe::Gemm<float> gemm;
  gemm.run(x, w, packed, out);
  for (auto _ : state) {
    gemm.run(x, w, packed, out);
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(M * K * N), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ExpertGemmPacked)->ArgNames({"M", "K", "N"})->Args({128, 1024, 2048})->Unit(benchmark::kMicrosecond);

static void BM_Expf(benchmark::State& state) {
  const Index n = state.range(0) * state.range(1);
  const Matrix<float> in = random_matrix(state.range(0), state.range(1), 3);
  Matrix<float> out(state.range(0), state.range(1));
  for (auto _ : state) {
    out = in.array().exp().matrix();
    benchmark::ClobberMemory();
  }
  state.counters["elements/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Expf)->ArgNames({"T", "E"})->Args({16384, 64})->Args({16384, 8})->Unit(benchmark::kMicrosecond);

// Independent FMA chains in registers: the single-core fp32 peak the GEMM figures are read
// against (FLOP/s counter).
static void BM_FmaPeak(benchmark::State& state) {
  constexpr int chains = 12, lanes = 16;
  alignas(64) float acc[chains][lanes];
  for (int c = 0; c < chains; ++c)
    for (int l = 0; l < lanes; ++l) acc[c][l] = 1.0f + float(c + l) * 1e-3f;
  const float a = 0.999999f, b = 1e-7f;
  const long reps = 1 << 16;
  for (auto _ : state) {
    for (long r = 0; r < reps; ++r)
      for (int c = 0; c < chains; ++c)
#pragma GCC ivdep
        for (int l = 0; l < lanes; ++l) acc[c][l] = acc[c][l] * a + b;
    benchmark::DoNotOptimize(acc);
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * chains * lanes * double(reps), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_FmaPeak)->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench
