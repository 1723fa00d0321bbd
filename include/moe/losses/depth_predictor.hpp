#pragma once
// The auxiliary loss of Mixture-of-Depths' causal form (Raposo et al. 2024, section 3.5;
// docs/losses.md, DepthPredictorLoss): binary cross-entropy between a predictor's logit p_t and
// whether the segment's top C took token t (y_t = 1 when it runs the block),
// L = (1/N) sum over the N real tokens of softplus(p_t) - y_t p_t.
// p is the last logit column: DepthScorer's predictor (the paper's second method, trained on the
// stop-gradient input) or, without one, the router's own r (its first method). Gradient:
// (sigmoid(p_t) - y_t) / N. Meant for training, where the routing is the top C.
#include <algorithm>

#include "moe/concepts.hpp"
#include "moe/core/math.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class DepthPredictorLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // logits and routing only

  explicit DepthPredictorLoss(S coefficient = S(1)) : coefficient_(coefficient) {
    detail::require<config_error>(coefficient >= 0, "DepthPredictorLoss", "coefficient", coefficient,
                                  "coefficient >= 0");
  }

  S coefficient() const { return coefficient_; }

  S forward(const LossInput<S>& in) const {
    const Index col = in.logits.cols() - 1;
    S sum = 0;
    for (Index t = 0; t < in.logits.rows(); ++t)
      if (in.tokens.is_valid(t)) sum += detail::softplus(in.logits(t, col)) - (runs(in, t) ? in.logits(t, col) : S(0));
    return sum / tokens(in);
  }

  void backward(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S>) const {
    const Index col = in.logits.cols() - 1;
    const S scale = coefficient_ / tokens(in);
    for (Index t = 0; t < in.logits.rows(); ++t)
      if (in.tokens.is_valid(t)) dlogits(t, col) += scale * (detail::sigmoid(in.logits(t, col)) - (runs(in, t) ? S(1) : S(0)));
  }

private:
  static bool runs(const LossInput<S>& in, Index t) { return in.routing.token_offsets[t + 1] > in.routing.token_offsets[t]; }
  static S tokens(const LossInput<S>& in) { return S(std::max<Index>(in.routing.num_valid_tokens, 1)); }
  S coefficient_;
};

}  // namespace moe
