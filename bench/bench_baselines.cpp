// The raw baselines every figure is read against: memcpy of the same bytes, Eigen's GEMM of the
// same shape, expf over T x E elements, and the FMA peak of one core.
#include <cmath>
#include <cstring>

#include "common.hpp"

namespace moe_bench {

// Copies the bytes a dispatch of (T, D, k) moves: T k rows of D floats.
static void BM_Memcpy(benchmark::State& state) {
  const std::size_t bytes = std::size_t(state.range(0) * state.range(1) * state.range(2)) * sizeof(float);
  std::vector<char> src(bytes, 1), dst(bytes, 0);  // both written here: warm outside the timer
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(2 * bytes));
}
static void memcpy_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "k"})->Unit(benchmark::kMicrosecond);
  // ... and {16384, 64, 1}: the bytes of a [T, E] = [16384, 64] score matrix
  shapes(b, {{16384, 1024, 2}, {16384, 1024, 1}, {16384, 64, 1}}, {64, 32, 2});
}
BENCHMARK(BM_Memcpy)->Apply(memcpy_shapes);

// x [T, D] times W^T [D, E]: the logits GEMM, through Eigen's own product.
static void BM_EigenGemm(benchmark::State& state) {
  const Index T = state.range(0), D = state.range(1), E = state.range(2);
  const Matrix<float> x = random_matrix(T, D, 1), w = random_matrix(E, D, 2);
  Matrix<float> out(T, E);
  out.noalias() = x * w.transpose();  // warm-up outside the timer
  for (auto _ : state) {
    out.noalias() = x * w.transpose();
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(T * D * E), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
}
static void eigen_gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "D", "E"})->Unit(benchmark::kMicrosecond);
  // the logits GEMMs, then one SwiGLU expert block of the layer benchmark
  shapes(b, {{16384, 1024, 8}, {16384, 1024, 64}, {16384, 1024, 256}, {128, 1024, 2048}}, {64, 32, 8});
}
BENCHMARK(BM_EigenGemm)->Apply(eigen_gemm_shapes);

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
static void expert_gemm_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "K", "N"})->Unit(benchmark::kMicrosecond);
  shapes(b, {{128, 1024, 2048}}, {16, 32, 48});
}
BENCHMARK(BM_ExpertGemm)->Apply(expert_gemm_shapes);

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
BENCHMARK(BM_ExpertGemmPacked)->Apply(expert_gemm_shapes);

static void BM_Expf(benchmark::State& state) {
  const Index n = state.range(0) * state.range(1);
  const Matrix<float> in = random_matrix(state.range(0), state.range(1), 3);
  Matrix<float> out(state.range(0), state.range(1));
  out = in.array().exp().matrix();  // warm-up outside the timer
  for (auto _ : state) {
    out = in.array().exp().matrix();
    benchmark::ClobberMemory();
  }
  state.counters["elements/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}
static void expf_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "E"})->Unit(benchmark::kMicrosecond);
  shapes(b, {{16384, 64}, {16384, 8}}, {64, 8});
}
BENCHMARK(BM_Expf)->Apply(expf_shapes);

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
#if defined(__clang__)
#  pragma clang loop vectorize(enable)
#else
#  pragma GCC ivdep
#endif
        for (int l = 0; l < lanes; ++l) acc[c][l] = acc[c][l] * a + b;
    benchmark::DoNotOptimize(acc);
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * chains * lanes * double(reps), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_FmaPeak)->Unit(benchmark::kMicrosecond);

}  // namespace moe_bench
