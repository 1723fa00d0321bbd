#pragma once
// Straight-through Gumbel-softmax selection (Ye, Zha, Ren, "Eliciting and Understanding Cross-Task
// Skills with Task-Level Mixture-of-Experts", Findings of EMNLP 2022; docs/gates.md,
// StraightThroughGate): p = softmax(logits / tau). Hard, the forward scores are one-hot at the
// first argmax of p and the backward is p's (straight-through); soft, the scores are p.
// The hard scores are computed as torch.nn.functional.gumbel_softmax(hard=True) computes them,
// (y_hard - p) + p: the chosen score is (1 - p) + p, which rounds to exactly 1 (1 - p is exact for
// p >= 1/2, else within half an ulp below 1, which the addition rounds back), the others to 0.
// The Gumbel noise of gumbel_softmax is not drawn here: a gate sees no TokenInputs in forward,
// so the scorer adds it to the logits (TaskScorer). tau is the caller's to anneal
// (gumbel_temperature); set it before a forward, not between a forward and its backward.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe {

// Whether the forward scores are one-hot (straight-through) or the probabilities themselves.
enum class Hardness { hard, soft };

// The reference's temperature schedule (CrossTaskMoE utils.get_gumbel_temperature, set at every
// training step): max(initial exp(-anneal_rate step), minimum), in double as numpy computes it.
inline double gumbel_temperature(std::uint64_t step, double initial = 2.0, double anneal_rate = 3e-4,
                                 double minimum = 0.1) {
  constexpr std::string_view where = "gumbel_temperature";
  detail::require<config_error>(std::isfinite(initial) && initial > 0, where, "initial", initial, "finite and > 0");
  detail::require<config_error>(std::isfinite(anneal_rate) && anneal_rate >= 0, where, "anneal_rate", anneal_rate,
                                "finite and >= 0");
  detail::require<config_error>(std::isfinite(minimum) && minimum > 0, where, "minimum", minimum,
                                "finite and > 0 (a temperature)");
  return std::max(initial * std::exp(-anneal_rate * double(step)), minimum);
}

template <scalar S>
class StraightThroughGate {
public:
  using scalar_type = S;

  struct Options {
    double temperature = 5.0;          // Selection's tau until the training loop sets one
    Hardness hardness = Hardness::hard;  // gumbel_softmax_st; soft: gumbel_softmax and softmax
  };

  StraightThroughGate() : StraightThroughGate(Options{}) {}
  explicit StraightThroughGate(Options opt) : opt_(opt) { check_temperature("StraightThroughGate", opt.temperature); }

  const Options& options() const { return opt_; }
  double temperature() const { return opt_.temperature; }
  // For the next forward; the schedule of the reference is gumbel_temperature(step).
  void set_temperature(double tau) {
    check_temperature("StraightThroughGate::set_temperature", tau);
    opt_.temperature = tau;
  }
  constexpr bool causal() const { return true; }  // per token

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) const {
    probabilities(logits, scores);
    if (opt_.hardness == Hardness::soft) return;
    for (Index t = 0; t < scores.rows(); ++t) {
      Index chosen = 0;
      scores.row(t).maxCoeff(&chosen);  // the first maximum
      for (Index e = 0; e < scores.cols(); ++e) {
        const S p = scores(t, e);
        scores(t, e) = (S(e == chosen ? 1 : 0) - p) + p;  // y_hard - y_soft.detach() + y_soft
      }
    }
  }

  // Both forms differentiate p: dlogits += p (g - <g, p>) / tau, p recomputed from the logits
  // (the hard scores are not p).
  void backward(MatrixIn<S> logits, MatrixIn<S>, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    fit(p_, logits.rows(), logits.cols());
    probabilities(logits, p_);
    const S tau = S(opt_.temperature);
    for (Index t = 0; t < logits.rows(); ++t) {
      const S inner = p_.row(t).dot(dscores.row(t));
      dlogits.row(t).array() += p_.row(t).array() * (dscores.row(t).array() - inner) / tau;
    }
  }

private:
  static void check_temperature(std::string_view where, double tau) {
    detail::require<config_error>(std::isfinite(tau) && tau > 0, where, "temperature", tau, "finite and > 0");
  }

  // softmax(logits / tau) into out, row by row: divided as PyTorch divides, then the softmax kernel
  // in place, so a row has the same bits in a block as in the whole matrix.
  void probabilities(MatrixIn<S> logits, MatrixOut<S> out) const {
    out = logits / S(opt_.temperature);
    kernels::softmax_rows<S>(out, out);
  }

  Options opt_;
  Matrix<S> p_;  // backward's probabilities
};

}  // namespace moe
