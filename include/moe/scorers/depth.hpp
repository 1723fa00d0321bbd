#pragma once
// Depth scorer (docs/scorers.md, DepthScorer): one scalar per token, r_t = w^T x_t, for the
// routers that decide whether a token runs a block at all (Mixture-of-Depths, MindSkip).
// - Per-segment pooling (MindSkip's sequence granularity): every token of a segment gets the mean
//   of the segment's r_t, which is w^T (the mean of its x_t) since r is linear.
// - An auxiliary predictor (Mixture-of-Depths' causal form): a small MLP on the input with the
//   gradient stopped, r'_t = w2^T silu(W1 x_t + b1) + b2 in a second logit column. It is trained
//   by DepthPredictorLoss to tell which tokens the segment's top-C takes, and a decoder routes by
//   it, since it reads no other token.
#include <cstdint>
#include <string_view>

#include "moe/core/gemm.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/scorers/linear.hpp"

namespace moe {

enum class DepthPooling {
  token,         // r_t per token (Mixture-of-Depths; MindSkip's *_token granularities)
  segment_mean,  // one r per segment: the mean over its tokens (MindSkip's default, attn_sequence)
};

template <scalar S>
class DepthScorer {
public:
  using scalar_type = S;

  struct Options {
    DepthPooling pooling = DepthPooling::token;
    // Which rows a segment's mean counts: its real tokens (excluded), or every row, padding too
    // (fairseq: MindSkip's reference means over the padded sequence).
    Padding pool_padding = Padding::excluded;
    Index predictor_hidden = 0;  // width of the auxiliary predictor's hidden layer; 0 = none
    typename LinearScorer<S>::Options router{};  // w (no bias in either reference)
  };

  explicit DepthScorer(Index input_dim) : DepthScorer(input_dim, Options{}) {}
  DepthScorer(Index input_dim, Options opt) : opt_(opt), router_(input_dim, 1, opt.router) {
    detail::require<config_error>(opt.predictor_hidden >= 0, "DepthScorer", "predictor_hidden",
                                  opt.predictor_hidden, "predictor_hidden >= 0 (0: no predictor)");
    detail::require<config_error>(opt.pool_padding != Padding::megatron, "DepthScorer", "pool_padding", "megatron",
                                  "excluded or fairseq (padding is never routed by a depth router)");
    if (const Index H = opt.predictor_hidden; H > 0) {
      // nn.Linear-like scales: N(0, 1/D) and N(0, 1/H), from a stream apart from w's
      const CounterRng rng(opt.router.seed, 0, DrawStream::jitter);
      w1_.resize(H, input_dim);
      for (Index i = 0; i < H; ++i)
        for (Index j = 0; j < input_dim; ++j) w1_(i, j) = S(rng.normal(i, j) / std::sqrt(double(input_dim)));
      w2_.resize(1, H);
      for (Index i = 0; i < H; ++i) w2_(0, i) = S(rng.normal(H + i, 0) / std::sqrt(double(H)));
      b1_.setZero(1, H);
      b2_.setZero(1, 1);
      w1_grad_.setZero(H, input_dim);
      w2_grad_.setZero(1, H);
      b1_grad_.setZero(1, H);
      b2_grad_.setZero(1, 1);
    }
  }

  Index input_dim() const { return router_.input_dim(); }
  Index num_experts() const { return 1; }  // the block
  // Column 0: r; column 1: the predictor's logit, when there is a predictor.
  Index logit_columns() const { return has_predictor() ? 2 : 1; }
  bool has_predictor() const { return opt_.predictor_hidden > 0; }
  const Options& options() const { return opt_; }
  LinearScorer<S>& router() { return router_; }
  // r_t and the predictor read token t alone; a segment's mean reads its later tokens too.
  bool causal() const { return opt_.pooling == DepthPooling::token; }

  void set_draw_state(const DrawState& state) { router_.set_draw_state(state); }

  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    if (opt_.pooling == DepthPooling::segment_mean) detail::check_segments("DepthScorer", tokens.segment);
    router_.forward(x, tokens, logits.leftCols(1));
    if (opt_.pooling == DepthPooling::segment_mean)
      for_each_segment(tokens.segment, x.rows(), [&](Index b, Index e) {
        S sum = 0;
        Index n = 0;
        for (Index t = b; t < e; ++t)
          if (counts(tokens, t)) sum += logits(t, 0), ++n;
        const S mean = n > 0 ? sum / S(n) : S(0);
        for (Index t = b; t < e; ++t) logits(t, 0) = mean;
      });
    if (has_predictor()) {
      fit(z_, x.rows(), opt_.predictor_hidden);
      fit(h_, x.rows(), opt_.predictor_hidden);
      fit(q_, x.rows(), 1);
      gemm_.template run<false, true>(x, w1_, z_);
      z_.rowwise() += b1_.row(0);
      // silu(z) = z sigmoid(z), vectorised by Eigen (exp(-z) = inf gives 0 for very negative z)
      h_.array() = z_.array() / (S(1) + (-z_.array()).exp());
      gemm_.template run<false, true>(h_, w2_, q_);
      logits.col(1) = q_.col(0).array() + b2_(0, 0);
    }
  }

  // dx = the router's part only: the predictor reads x with the gradient stopped.
  void backward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    fit(dr_, x.rows(), 1);
    dr_ = dlogits.leftCols(1);
    if (opt_.pooling == DepthPooling::segment_mean)
      for_each_segment(tokens.segment, x.rows(), [&](Index b, Index e) {
        S sum = 0;
        Index n = 0;
        for (Index t = b; t < e; ++t) sum += dlogits(t, 0), n += counts(tokens, t);
        for (Index t = b; t < e; ++t) dr_(t, 0) = counts(tokens, t) ? sum / S(n) : S(0);
      });
    router_.backward(x, tokens, dr_, dx);
    if (has_predictor()) {
      // dz = dp w2 * silu'(z); dW1 += dz^T x, and the biases and w2 their sums
      fit(dz_, x.rows(), opt_.predictor_hidden);
      q_.col(0) = dlogits.col(1);  // dq, contiguous
      b2_grad_(0, 0) += q_.sum();
      gemm_.template run<true, false>(q_, h_, w2_grad_, S(1), true);
      // silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
      dz_.array() = S(1) / (S(1) + (-z_.array()).exp());
      dz_.array() = (q_ * w2_).array() * dz_.array() * (S(1) + z_.array() * (S(1) - dz_.array()));
      b1_grad_.row(0) += dz_.colwise().sum();
      gemm_.template run<true, false>(dz_, x, w1_grad_, S(1), true);
    }
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    router_.for_each_parameter(visit);
    if (!has_predictor()) return;
    visit(std::string_view("predictor.w1"), MatrixOut<S>(w1_), MatrixOut<S>(w1_grad_));
    visit(std::string_view("predictor.b1"), MatrixOut<S>(b1_), MatrixOut<S>(b1_grad_));
    visit(std::string_view("predictor.w2"), MatrixOut<S>(w2_), MatrixOut<S>(w2_grad_));
    visit(std::string_view("predictor.b2"), MatrixOut<S>(b2_), MatrixOut<S>(b2_grad_));
  }

private:
  bool counts(const TokenInputs<S>& tokens, Index t) const {
    return opt_.pool_padding == Padding::fairseq || tokens.is_valid(t);
  }

  Options opt_;
  LinearScorer<S> router_;
  Matrix<S> w1_, b1_, w2_, b2_, w1_grad_, b1_grad_, w2_grad_, b2_grad_;
  Matrix<S> z_, h_, q_, dz_, dr_;  // the predictor's pre-activations and hidden layer (kept for backward), scratch
  Gemm<S> gemm_;
};

}  // namespace moe
