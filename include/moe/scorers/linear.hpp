#pragma once
// Linear scorer: logits = x W^T (+ b), W in R^{E x D} (every token-choice router; docs/scorers.md).
// Initialised from N(0, init_scale / D) by the counter-based generator, so a seed fixes it.
// Optional multiplicative input jitter in training (Switch, DeepSpeed 'Jitter', Megatron-Core
// moe_input_jitter_eps): the router sees x * U(1 - eps, 1 + eps), the experts still see x.
#include <cmath>
#include <string_view>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/small_logits.hpp"

namespace moe {

template <scalar S>
class LinearScorer {
public:
  using scalar_type = S;

  struct Options {
    bool bias = false;
    double init_scale = 1.0;  // variance of W is init_scale / D (Switch uses 0.1)
    std::uint64_t seed = 0;
    double jitter = 0.0;   // eps of the multiplicative input jitter; 0 = none
    // A fixed random router (SMoE-Dropout): backward still gives dx but leaves the weight's
    // gradient at 0, so an optimizer without weight decay never moves it (it is still saved).
    bool frozen = false;
    Draws jitter_draws{};  // its generator key (tokens.jitter, [T, D], overrides it)
  };

  LinearScorer(Index input_dim, Index num_experts) : LinearScorer(input_dim, num_experts, Options{}) {}
  LinearScorer(Index input_dim, Index num_experts, Options opt)
      : bias_enabled_(opt.bias), frozen_(opt.frozen), jitter_(opt.jitter), jitter_draws_(opt.jitter_draws) {
    detail::require<config_error>(input_dim >= 1, "LinearScorer", "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, "LinearScorer", "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(opt.init_scale >= 0, "LinearScorer", "init_scale", opt.init_scale,
                                  "init_scale >= 0");
    detail::require<config_error>(opt.jitter >= 0 && opt.jitter < 1, "LinearScorer", "jitter", opt.jitter,
                                  "0 <= jitter < 1 (the factor U(1 - jitter, 1 + jitter) stays positive)");
    weight_.resize(num_experts, input_dim);
    const CounterRng rng(opt.seed);
    const double std_dev = std::sqrt(opt.init_scale / double(input_dim));
    for (Index e = 0; e < num_experts; ++e)
      for (Index j = 0; j < input_dim; ++j) weight_(e, j) = S(std_dev * rng.normal(e, j));
    bias_.setZero(1, num_experts);
    weight_grad_.setZero(num_experts, input_dim);
    bias_grad_.setZero(1, num_experts);
  }

  Index input_dim() const { return weight_.cols(); }
  Index num_experts() const { return weight_.rows(); }
  Matrix<S>& weight() { return weight_; }
  Matrix<S>& bias() { return bias_; }
  const Matrix<S>& weight() const { return weight_; }

  double jitter() const { return jitter_; }
  constexpr bool causal() const { return true; }  // per token (the jitter too: drawn per token)
  void set_draw_state(const DrawState& state) { draw_state_ = state; }

  // Row blocks of a fixed size, one GEMM each (a thread per block with OpenMP); few experts take
  // the streaming kernel instead, which beats a packed GEMM there.
  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    jittered_ = jitter_ > 0 && (draw_state_.training || jitter_draws_.at_evaluation);
    if (jittered_) {
      jitter_input(x, tokens);
      forward_on(jittered_x_, logits);
    } else {
      forward_on(x, logits);
    }
  }

  // dW += dlogits^T x, db += column sums of dlogits, dx = dlogits W (x the jittered input when
  // forward jittered it, and dx then times the same factors).
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const MatrixIn<S> seen = jittered_ ? MatrixIn<S>(jittered_x_) : x;
    gemms_.reserve();
    if (!frozen_) {
      gemms_.local().template run<true, false>(dlogits, seen, weight_grad_, S(1), true);  // a reduction over T: one thread
      if (bias_enabled_) bias_grad_.row(0) += dlogits.colwise().sum();
    }
    parallel_for(x.rows(), row_block, [&](Index t, Index end) {
      auto out = dx.middleRows(t, end - t);
      gemms_.local().run(dlogits.middleRows(t, end - t), weight_, out);
      if (jittered_) out.array() *= jitter_factor_.middleRows(t, end - t).array();
    });
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.weight"), MatrixOut<S>(weight_), MatrixOut<S>(weight_grad_));
    if (bias_enabled_) visit(std::string_view("router.bias"), MatrixOut<S>(bias_), MatrixOut<S>(bias_grad_));
  }

private:
  // factor = lo + u (hi - lo) with lo = 1 - eps and hi = 1 + eps rounded to S first, as
  // torch.distributions.Uniform(1 - eps, 1 + eps).rsample computes it: the same u give the
  // same bits.
  void jitter_input(MatrixIn<S> x, const TokenInputs<S>& tokens) {
    const Index T = x.rows(), D = x.cols();
    fit(jittered_x_, T, D);
    fit(jitter_factor_, T, D);
    const DrawSource<S> u(jitter_draws_, draw_state_, DrawStream::jitter, Distribution::uniform, tokens.jitter, D);
    const S lo = S(1.0 - jitter_), hi = S(1.0 + jitter_), width = hi - lo;
    parallel_for(T, row_block, [&](Index t0, Index end) {
      for (Index t = t0; t < end; ++t)
        for (Index j = 0; j < D; ++j) {
          jitter_factor_(t, j) = lo + u(t, j) * width;
          jittered_x_(t, j) = x(t, j) * jitter_factor_(t, j);
        }
    });
  }

  void forward_on(MatrixIn<S> x, MatrixOut<S> logits) {
    if (kernels::small_logits_supported(num_experts())) {
      kernels::small_logits<S>(x, weight_, logits);
      if (bias_enabled_) logits.rowwise() += bias_.row(0);
      return;
    }
    gemms_.reserve();
    parallel_for(x.rows(), row_block, [&](Index t, Index end) {
      auto out = logits.middleRows(t, end - t);
      gemms_.local().template run<false, true>(x.middleRows(t, end - t), weight_, out);
      if (bias_enabled_) out.rowwise() += bias_.row(0);
    });
  }

  bool bias_enabled_, frozen_;
  double jitter_;
  Draws jitter_draws_;
  DrawState draw_state_{};
  bool jittered_ = false;  // the last forward jittered x: backward reads these two
  Matrix<S> weight_, bias_, weight_grad_, bias_grad_, jittered_x_, jitter_factor_;
  static constexpr Index row_block = 4096;
  PerThread<Gemm<S>> gemms_;
};

}  // namespace moe
