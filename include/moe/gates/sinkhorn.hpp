#pragma once
// Sinkhorn gate (docs/gates.md, SinkhornGate): the scores, the combine weights, are the softmax
// (or the sigmoid) of the logits; the values the selector ranks by are a balanced transport plan
// of the whole batch, found by Sinkhorn scaling of exp(logits). With a token-choice selector this
// is "Sinkhorn token choice", with the expert-choice selector "Sinkhorn expert choice" (Liu et al.
// 2024, "Routers in Vision MoE"), and in Megatron's form S-BASE (Clark et al. 2022). Selection is
// discrete, so gradients reach the logits through the scores only, as in the references.
#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/gates/sigmoid.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/kernels/sinkhorn.hpp"

namespace moe {

enum class SinkhornForm {
  ott,       // vmoe + ott-jax: exp(logits / epsilon), marginals 1 per token and n/E per expert, a
             // fixed number of rounds, columns first; in training and evaluation
  megatron,  // Megatron-Core's S-BASE: exp(logits), marginals 1/n and 1/E with 1e-8 guards, until
             // the mean change of the column scaling is at most `tolerance`; in training only
             // (evaluation ranks by the scores themselves)
};

enum class SinkhornScores {
  softmax,  // softmax over experts (vmoe; Megatron for k > 1)
  sigmoid,  // per expert (Megatron for k = 1)
};

template <scalar S>
class SinkhornGate {
public:
  using scalar_type = S;
  static constexpr bool ranks_whole_batch = true;  // the plan couples the rows (moe::Router)

  struct Options {
    SinkhornForm form = SinkhornForm::ott;
    int iterations = 20;          // ott: the fixed number of rounds
    double epsilon = 1.0;         // ott: entropic regularisation
    double tolerance = 1e-4;      // megatron: stop when mean |change of d1| <= tolerance
    int max_iterations = 10000;   // megatron: a cap the reference does not have
    SinkhornScores scores = SinkhornScores::softmax;
    // padding rows take part in the plan like real tokens (Megatron's sinkhorn takes no mask, and
    // Padding::megatron routes padding); by default they are left out
    bool plan_padding = false;
  };

  explicit SinkhornGate(Options opt = {}) : opt_(opt) {
    detail::require<config_error>(opt.iterations >= 0, "SinkhornGate", "iterations", opt.iterations, "iterations >= 0");
    detail::require<config_error>(std::isfinite(opt.epsilon) && opt.epsilon > 0, "SinkhornGate", "epsilon", opt.epsilon,
                                  "epsilon > 0 and finite");
    detail::require<config_error>(std::isfinite(opt.tolerance) && opt.tolerance > 0, "SinkhornGate", "tolerance",
                                  opt.tolerance, "tolerance > 0 and finite");
    detail::require<config_error>(opt.max_iterations >= 1, "SinkhornGate", "max_iterations", opt.max_iterations,
                                  "max_iterations >= 1");
  }

  const Options& options() const { return opt_; }
  // ott's plan couples the batch in evaluation too; Megatron's form plans in training only and
  // ranks by the token's own scores in evaluation.
  bool causal() const { return opt_.form == SinkhornForm::megatron; }
  void set_draw_state(const DrawState& state) { training_ = state.training; }
  // Megatron's form: the rounds the last plan took (0 when none was computed).
  int rounds() const { return rounds_; }

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) {
    if (opt_.scores == SinkhornScores::sigmoid) sigmoid_.forward(logits, scores);
    else softmax_.forward(logits, scores);
  }

  void backward(MatrixIn<S> logits, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    if (opt_.scores == SinkhornScores::sigmoid) sigmoid_.backward(logits, scores, dscores, dlogits);
    else softmax_.backward(logits, scores, dscores, dlogits);
  }

  // The plan of the batch's real tokens (padding rows: 0), or of every row with plan_padding.
  void rank(MatrixIn<S> logits, MatrixIn<S> scores, const TokenInputs<S>& tokens, MatrixOut<S> plan) {
    rounds_ = 0;
    const std::span<const std::uint8_t> valid = opt_.plan_padding ? std::span<const std::uint8_t>() : tokens.valid;
    if (opt_.form == SinkhornForm::ott) {
      kernels::sinkhorn<S>(logits, valid, opt_.iterations, plan, scratch_, S(opt_.epsilon));
    } else if (training_) {
      rounds_ = kernels::sinkhorn_until<S>(logits, valid, opt_.tolerance, opt_.max_iterations, plan, scratch_);
    } else {
      plan = scores;
    }
  }

private:
  Options opt_;
  SoftmaxGate<S> softmax_;
  SigmoidGate<S> sigmoid_;
  bool training_ = true;
  int rounds_ = 0;
  kernels::SinkhornScratch<S> scratch_;
};

}  // namespace moe
