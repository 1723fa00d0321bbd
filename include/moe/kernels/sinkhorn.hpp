#pragma once
// Sinkhorn scaling of exp(logits) into a balanced routing plan (docs/gates.md, SinkhornGate), in
// the two forms the references use. Padding rows (valid[t] = 0) take no part: their plan row is
// 0 and the marginals count the real tokens n only.
//
// - sinkhorn (ott-jax, as "Routers in Vision MoE" calls it): K = exp(logits / eps), u = 1, then a
//   fixed number of rounds of v = (n/E) / (K^T u), u = 1 / (K v) (columns first); plan =
//   diag(u) K diag(v): rows sum to 1, columns to about n/E. A row of K may be taken relative to
//   its maximum: u absorbs the factor, so the plan is the same and exp never overflows.
// - sinkhorn_until (Megatron-Core's S-BASE): K = exp(logits), d1 = 1, then rounds of
//   d0 = (1/n) / (K d1 + 1e-8), d1 = (1/E) / (K^T d0 + 1e-8) until mean |d1 - previous d1| <=
//   tol; plan = diag(d0) K diag(d1). The 1e-8 guards make the plan depend on the scale of K, so
//   K is not shifted per row; it is shifted by the largest logit only when exp would overflow
//   (where the reference's plan is NaN).
//
// Each round is one pass over K: the row scalings of a row are computed and the row is added into
// the column sums for the next round while it is in cache. scalar:: holds the twins, written as
// the reference loops are.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/simd.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe::kernels {

namespace detail {
inline bool row_valid(std::span<const std::uint8_t> valid, Index t) { return valid.empty() || valid[std::size_t(t)] != 0; }
// The largest logit below which exp(logit) is finite in S, with room for a sum of many.
template <class S>
constexpr double exp_safe_limit() { return std::is_same_v<S, float> ? 80.0 : 700.0; }
// mass / sum for a row or column scaling, kept finite: a column no row reaches (its entries all
// underflowed, at logits ~1e3 apart) gets 0, not inf, so the plan never holds 0 * inf.
template <class S>
S column_scaling(S mass, S sum) {
  return sum > S(0) ? std::min(mass / sum, std::numeric_limits<S>::max()) : S(0);
}
// One round over the rows of K: each real row's scaling, mass / (<K_t, cols> + guard) kept
// finite, into scale[t]; with `sums`, the scaled rows are added into sums (K^T scale) while the
// row is in cache. Padding rows keep scale 0.
// K = exp(logits - shift) on the real rows (padding rows 0); returns the largest real logit, so a
// caller that finds it past exp's range redoes the pass with a shift.
template <class S>
S exp_rows(MatrixIn<S> logits, std::span<const std::uint8_t> valid, MatrixOut<S> K, S shift) {
  const Index T = logits.rows(), E = logits.cols();
  using B = Batch<S>;
  constexpr Index W = Index(B::size);
  B top(std::numeric_limits<S>::lowest());
  S top_tail = std::numeric_limits<S>::lowest();
  for (Index t = 0; t < T; ++t) {
    S* out = K.row(t).data();
    if (!row_valid(valid, t)) {
      std::fill_n(out, E, S(0));
      continue;
    }
    const S* in = logits.row(t).data();
    Index e = 0;
    for (; e + W <= E; e += W) {
      const B x = B::load_unaligned(in + e);
      top = xsimd::max(top, x);
      exp_approx(x - B(shift)).store_unaligned(out + e);
    }
    for (; e < E; ++e) top_tail = std::max(top_tail, in[e]), out[e] = std::exp(in[e] - shift);
  }
  return std::max(reduce_max(top), top_tail);
}

// A row of exactly Chunks full registers: the column scalings and the sums stay in registers, and
// a row's dot product is a tree over its chunks (short dependency chains).
template <class S, int Chunks>
void sinkhorn_round_registers(MatrixIn<S> K, std::span<const std::uint8_t> valid, const S* cols, S mass, S guard,
                              S* scale, S* sums) {
  using B = Batch<S>;
  constexpr Index W = Index(B::size);
  B c[Chunks], acc[Chunks];
  MOE_UNROLL
  for (int j = 0; j < Chunks; ++j) c[j] = B::load_unaligned(cols + j * W), acc[j] = B(S(0));
  for (Index t = 0; t < K.rows(); ++t) {
    if (!row_valid(valid, t)) continue;
    const S* row = K.row(t).data();
    B r[Chunks];
    MOE_UNROLL
    for (int j = 0; j < Chunks; ++j) r[j] = B::load_unaligned(row + j * W);
    B p[Chunks];
    MOE_UNROLL
    for (int j = 0; j < Chunks; ++j) p[j] = r[j] * c[j];
    MOE_UNROLL
    for (int step = 1; step < Chunks; step *= 2)
      MOE_UNROLL
      for (int j = 0; j + step < Chunks; j += 2 * step) p[j] = p[j] + p[j + step];
    const S st = column_scaling(mass, xsimd::hadd(p[0]) + guard);
    scale[t] = st;
    if (!sums) continue;
    const B sb(st);
    MOE_UNROLL
    for (int j = 0; j < Chunks; ++j) acc[j] = xsimd::fma(sb, r[j], acc[j]);
  }
  if (sums)
    MOE_UNROLL
    for (int j = 0; j < Chunks; ++j) acc[j].store_unaligned(sums + j * W);
}

template <class S>
void sinkhorn_round(MatrixIn<S> K, std::span<const std::uint8_t> valid, const S* cols, S mass, S guard, S* scale,
                    S* sums) {
  const Index T = K.rows(), E = K.cols();
  using B = Batch<S>;
  constexpr Index W = Index(B::size);
  switch (E % W == 0 ? E / W : 0) {
    case 1: return sinkhorn_round_registers<S, 1>(K, valid, cols, mass, guard, scale, sums);
    case 2: return sinkhorn_round_registers<S, 2>(K, valid, cols, mass, guard, scale, sums);
    case 4: return sinkhorn_round_registers<S, 4>(K, valid, cols, mass, guard, scale, sums);
    case 8: return sinkhorn_round_registers<S, 8>(K, valid, cols, mass, guard, scale, sums);
    default: break;
  }
  if (sums) std::fill_n(sums, E, S(0));
  for (Index t = 0; t < T; ++t) {
    if (!row_valid(valid, t)) continue;
    const S* row = K.row(t).data();
    B acc(S(0));
    Index e = 0;
    for (; e + W <= E; e += W) acc = xsimd::fma(B::load_unaligned(row + e), B::load_unaligned(cols + e), acc);
    S dot = xsimd::hadd(acc);
    for (; e < E; ++e) dot += row[e] * cols[e];
    const S st = column_scaling(mass, dot + guard);
    scale[t] = st;
    if (!sums) continue;
    const B sb(st);
    for (e = 0; e + W <= E; e += W) xsimd::fma(sb, B::load_unaligned(row + e), B::load_unaligned(sums + e)).store_unaligned(sums + e);
    for (; e < E; ++e) sums[e] += st * row[e];
  }
}
}  // namespace detail

namespace scalar {
template <class S>
void sinkhorn(MatrixIn<S> logits, std::span<const std::uint8_t> valid, int iterations, MatrixOut<S> plan,
              S epsilon = S(1)) {
  const Index T = logits.rows(), E = logits.cols();
  const Index n = moe::count_valid(valid, T);
  const S b = S(n) / S(E);
  Matrix<S> K = Matrix<S>::Zero(T, E);
  std::vector<S> u(std::size_t(T), S(0)), v(std::size_t(E), S(1));
  for (Index t = 0; t < T; ++t) {
    if (!kernels::detail::row_valid(valid, t)) continue;
    const S top = logits.row(t).maxCoeff();
    for (Index e = 0; e < E; ++e) K(t, e) = std::exp((logits(t, e) - top) / epsilon);
    u[std::size_t(t)] = S(1);
  }
  for (int it = 0; it < iterations; ++it) {
    for (Index e = 0; e < E; ++e) {
      S ktu = 0;
      for (Index t = 0; t < T; ++t) ktu += K(t, e) * u[t];
      v[e] = kernels::detail::column_scaling(b, ktu);
    }
    for (Index t = 0; t < T; ++t) {
      if (!kernels::detail::row_valid(valid, t)) continue;
      S kv = 0;
      for (Index e = 0; e < E; ++e) kv += K(t, e) * v[e];
      u[t] = kernels::detail::column_scaling(S(1), kv);
    }
  }
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) plan(t, e) = u[t] * K(t, e) * v[e];
}

// Returns the number of rounds run.
template <class S>
int sinkhorn_until(MatrixIn<S> logits, std::span<const std::uint8_t> valid, double tolerance, int max_iterations,
                   MatrixOut<S> plan) {
  const Index T = logits.rows(), E = logits.cols();
  const Index n = moe::count_valid(valid, T);
  const S guard = S(1e-8);
  S shift = 0;
  for (Index t = 0; t < T; ++t)
    if (kernels::detail::row_valid(valid, t)) shift = std::max(shift, logits.row(t).maxCoeff());
  if (shift <= S(kernels::detail::exp_safe_limit<S>())) shift = 0;
  Matrix<S> K = Matrix<S>::Zero(T, E);
  for (Index t = 0; t < T; ++t)
    if (kernels::detail::row_valid(valid, t))
      for (Index e = 0; e < E; ++e) K(t, e) = std::exp(logits(t, e) - shift);
  std::vector<S> d0(std::size_t(T), S(0)), d1(std::size_t(E), S(1));
  int rounds = 0;
  for (double error = 1e9; error > tolerance && rounds < max_iterations; ++rounds) {
    for (Index t = 0; t < T; ++t) {
      if (!kernels::detail::row_valid(valid, t)) continue;
      S kd = 0;
      for (Index e = 0; e < E; ++e) kd += d1[e] * K(t, e);
      d0[t] = (S(1) / S(n)) / (kd + guard);
    }
    error = 0;
    for (Index e = 0; e < E; ++e) {
      S kd = 0;
      for (Index t = 0; t < T; ++t) kd += d0[t] * K(t, e);
      const S next = (S(1) / S(E)) / (kd + guard);
      error += std::abs(double(d1[e]) - double(next));
      d1[e] = next;
    }
    error /= double(E);
  }
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) plan(t, e) = d1[e] * K(t, e) * d0[t];
  return rounds;
}
}  // namespace scalar

// Scratch of both forms: the row and column scalings and the column sums.
template <class S>
struct SinkhornScratch {
  std::vector<S> rows, cols, sums;
  void size(Index tokens, Index experts) {
    fit(rows, tokens);
    fit(cols, experts);
    fit(sums, experts);
  }
};

template <class S>
void sinkhorn(MatrixIn<S> logits, std::span<const std::uint8_t> valid, int iterations, MatrixOut<S> plan,
              SinkhornScratch<S>& scratch, S epsilon = S(1)) {
  const Index T = logits.rows(), E = logits.cols();
  const Index n = moe::count_valid(valid, T);
  const S b = S(n) / S(E);
  if (epsilon == S(1)) {
    softmax_rows<S>(logits, plan);  // rows of K up to a per-row factor, which u absorbs
  } else {
    for (Index t = 0; t < T; ++t) {
      const S top = logits.row(t).maxCoeff();
      plan.row(t) = ((logits.row(t).array() - top) / epsilon).exp().matrix();
    }
  }
  scratch.size(T, E);
  S* const u = scratch.rows.data();
  using Row = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  Row v(scratch.cols.data(), E), ktu(scratch.sums.data(), E);
  // K^T u for u = 1 (padding rows: u = 0, and their plan rows are zeroed)
  ktu.setZero();
  for (Index t = 0; t < T; ++t) {
    if (detail::row_valid(valid, t)) {
      u[t] = S(1);
      ktu += plan.row(t);
    } else {
      u[t] = S(0);
      plan.row(t).setZero();
    }
  }
  for (int it = 0; it < iterations; ++it) {
    for (Index e = 0; e < E; ++e) v[e] = detail::column_scaling(b, ktu[e]);
    detail::sinkhorn_round<S>(plan, valid, v.data(), S(1), S(0), u, it + 1 == iterations ? nullptr : ktu.data());
  }
  if (iterations == 0) v.setOnes();
  for (Index t = 0; t < T; ++t) plan.row(t) = u[t] * plan.row(t).cwiseProduct(v);
}

template <class S>
int sinkhorn_until(MatrixIn<S> logits, std::span<const std::uint8_t> valid, double tolerance, int max_iterations,
                   MatrixOut<S> plan, SinkhornScratch<S>& scratch) {
  const Index T = logits.rows(), E = logits.cols();
  const Index n = moe::count_valid(valid, T);
  const S guard = S(1e-8), row_mass = S(1) / S(n), col_mass = S(1) / S(E);
  if (const S top = detail::exp_rows<S>(logits, valid, plan, S(0)); top > S(detail::exp_safe_limit<S>()))
    detail::exp_rows<S>(logits, valid, plan, top);
  scratch.size(T, E);
  S* const d0 = scratch.rows.data();
  using Row = Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>>;
  Row d1(scratch.cols.data(), E), kd0(scratch.sums.data(), E);
  d1.setOnes();
  std::fill_n(d0, T, S(0));
  int rounds = 0;
  for (double error = 1e9; error > tolerance && rounds < max_iterations; ++rounds) {
    detail::sinkhorn_round<S>(plan, valid, d1.data(), row_mass, guard, d0, kd0.data());
    error = 0;
    for (Index e = 0; e < E; ++e) {
      const S next = col_mass / (kd0[e] + guard);
      error += std::abs(double(d1[e]) - double(next));
      d1[e] = next;
    }
    error /= double(E);
  }
  for (Index t = 0; t < T; ++t) plan.row(t) = d0[t] * plan.row(t).cwiseProduct(d1);
  return rounds;
}

}  // namespace moe::kernels
