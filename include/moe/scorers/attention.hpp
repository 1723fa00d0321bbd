#pragma once
// The attention router of Yuan 2.0-M32 (IEIT-Yuan, 2024; docs/scorers.md, AttentionScorer): per
// token, q, k, v = W_Q x, W_K x, W_V x in R^E (one fused [3E, D] weight, as the reference's
// Linear(d, 3E)), and the logits are attention across experts:
//   logits_i = sum_j softmax_j(q_i k_j) v_j,
// an E x E outer product with no 1/sqrt scaling. The reference's training operator is written for
// heads of c consecutive tokens (the sequence split into `num_attention_router_heads` chunks):
// S = Q_h^T K_h / sqrt(c) over the chunk's tokens, logits_h = V_h softmax(S)^T; its scripts use
// one token a head (c = 1), which is the formula above. Chunks of c > 1 tokens mix tokens.
#include <cmath>
#include <string>
#include <string_view>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe {

template <scalar S>
class AttentionScorer {
public:
  using scalar_type = S;

  struct Options {
    Index chunk = 1;          // tokens per head: 1 = per token (the released scripts)
    bool bias = false;        // add_bias_linear
    double init_scale = 1.0;  // variance of W is init_scale / D
    std::uint64_t seed = 0;
  };

  AttentionScorer(Index input_dim, Index num_experts) : AttentionScorer(input_dim, num_experts, Options{}) {}
  AttentionScorer(Index input_dim, Index num_experts, Options opt) : opt_(opt), experts_(num_experts) {
    detail::require<config_error>(input_dim >= 1, "AttentionScorer", "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, "AttentionScorer", "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(opt.chunk >= 1, "AttentionScorer", "chunk", opt.chunk, "chunk >= 1 token per head");
    detail::require<config_error>(opt.init_scale >= 0, "AttentionScorer", "init_scale", opt.init_scale, "init_scale >= 0");
    weight_.resize(3 * num_experts, input_dim);
    const CounterRng rng(opt.seed);
    const double std_dev = std::sqrt(opt.init_scale / double(input_dim));
    for (Index r = 0; r < weight_.rows(); ++r)
      for (Index j = 0; j < input_dim; ++j) weight_(r, j) = S(std_dev * rng.normal(r, j));
    bias_.setZero(1, 3 * num_experts);
    weight_grad_.setZero(weight_.rows(), input_dim);
    bias_grad_.setZero(1, 3 * num_experts);
  }

  Index input_dim() const { return weight_.cols(); }
  Index num_experts() const { return experts_; }
  Index chunk() const { return opt_.chunk; }
  // [3E, D]: rows [0, E) W_Q, [E, 2E) W_K, [2E, 3E) W_V.
  Matrix<S>& weight() { return weight_; }
  Matrix<S>& bias() { return bias_; }
  // A head of one token reads nothing else; a longer head mixes its tokens.
  bool causal() const { return opt_.chunk == 1; }

  void forward(MatrixIn<S> x, const TokenInputs<S>&, MatrixOut<S> logits) {
    check_rows(x.rows());
    project(x);
    const Index E = experts_, c = opt_.chunk;
    heads_.reserve();
    parallel_for(x.rows() / c, head_block, [&](Index h0, Index h1) {
      Head& w = heads_.local();
      for (Index h = h0; h < h1; ++h) {
        attention(h, w);
        logits.middleRows(h * c, c).noalias() = qkv_.block(h * c, 2 * E, c, E) * w.a.transpose();
      }
    });
  }

  // Recomputes each head's softmax; dW += d(qkv)^T x, db += its column sums, dx = d(qkv) W.
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const Index E = experts_, c = opt_.chunk;
    const S scale = S(1) / std::sqrt(S(c));
    fit(dqkv_, x.rows(), 3 * E);
    heads_.reserve();
    parallel_for(x.rows() / c, head_block, [&](Index h0, Index h1) {
      Head& w = heads_.local();
      for (Index h = h0; h < h1; ++h) {
        attention(h, w);
        const auto dl = dlogits.middleRows(h * c, c);
        const auto q = qkv_.block(h * c, 0, c, E), k = qkv_.block(h * c, E, c, E), v = qkv_.block(h * c, 2 * E, c, E);
        dqkv_.block(h * c, 2 * E, c, E).noalias() = dl * w.a;  // dV
        fit(w.da, E, E);
        w.da.noalias() = dl.transpose() * v;  // dA
        // through each row's softmax: dS = A (dA - <A, dA>)
        for (Index i = 0; i < E; ++i) {
          const S inner = w.a.row(i).dot(w.da.row(i));
          w.da.row(i).array() = w.a.row(i).array() * (w.da.row(i).array() - inner);
        }
        dqkv_.block(h * c, 0, c, E).noalias() = scale * (k * w.da.transpose());  // dQ
        dqkv_.block(h * c, E, c, E).noalias() = scale * (q * w.da);              // dK
      }
    });
    gemm_.template run<true, false>(dqkv_, x, weight_grad_, S(1), true);  // a reduction over T: one thread
    if (opt_.bias) bias_grad_.row(0) += dqkv_.colwise().sum();
    gemm_.run(dqkv_, weight_, dx);
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.weight"), MatrixOut<S>(weight_), MatrixOut<S>(weight_grad_));
    if (opt_.bias) visit(std::string_view("router.bias"), MatrixOut<S>(bias_), MatrixOut<S>(bias_grad_));
  }

private:
  struct Head {
    Matrix<S> s, a, da;  // [E, E] scores, their row softmax, its gradient
  };

  void check_rows(Index rows) const {
    if (rows % opt_.chunk != 0)
      detail::fail<shape_error>("AttentionScorer", "x.rows", rows,
                                "a multiple of chunk (" + std::to_string(opt_.chunk) + " tokens per head)");
  }

  // qkv = x W^T (+ b), kept for backward.
  void project(MatrixIn<S> x) {
    fit(qkv_, x.rows(), 3 * experts_);
    gemm_.template run<false, true>(x, weight_, qkv_);
    if (opt_.bias) qkv_.rowwise() += bias_.row(0);
  }

  // Head h's A = softmax over each row of Q_h^T K_h / sqrt(c), into w.a.
  void attention(Index h, Head& w) const {
    const Index E = experts_, c = opt_.chunk;
    fit(w.s, E, E);
    fit(w.a, E, E);
    w.s.noalias() = qkv_.block(h * c, 0, c, E).transpose() * qkv_.block(h * c, E, c, E);
    if (c > 1) w.s *= S(1) / std::sqrt(S(c));
    kernels::softmax_rows<S>(w.s, w.a);
  }

  static constexpr Index head_block = 64;
  Options opt_;
  Index experts_;
  Matrix<S> weight_, bias_, weight_grad_, bias_grad_;
  Matrix<S> qkv_, dqkv_;  // the last forward's projections; backward's gradient of them
  PerThread<Head> heads_;
  Gemm<S> gemm_;
};

}  // namespace moe
