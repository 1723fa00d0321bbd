#pragma once
// Router entropy loss, the "dynamic loss" of top-p routing (Huang et al., "Harder Tasks Need More
// Experts: Dynamic Routing in MoE Models", ACL 2024; docs/losses.md, EntropyLoss):
// L = -(1/N) sum over the N real tokens of sum_e p_te log p_te. Minimising it concentrates each
// token's mass on few experts, so top-p takes fewer of them. Gradient: -(log p_te + 1) / N into
// the scores; the gate carries it to the logits.
#include <algorithm>
#include <cmath>
#include <limits>

#include "moe/concepts.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class EntropyLoss {
public:
  using scalar_type = S;  // reads the [T, E] scores: the router keeps them in forward

  explicit EntropyLoss(S coefficient = S(1e-4)) : coefficient_(coefficient) {
    detail::require<config_error>(coefficient >= 0, "EntropyLoss", "coefficient", coefficient, "coefficient >= 0");
  }

  S coefficient() const { return coefficient_; }

  S forward(const LossInput<S>& in) const {
    S sum = 0;
    for (Index t = 0; t < in.scores.rows(); ++t) {
      if (!in.tokens.is_valid(t)) continue;
      const S* p = in.scores.row(t).data();
      S row = 0;
      for (Index e = 0; e < in.scores.cols(); ++e) row += p[e] > 0 ? p[e] * std::log(p[e]) : S(0);  // 0 log 0 = 0
      sum -= row;
    }
    return sum / tokens(in);
  }

  // dL/dp = -(log p + 1) / N; an underflowed p = 0 takes log of the smallest normal instead of
  // -inf (the softmax's backward multiplies it by p = 0).
  void backward(const LossInput<S>& in, MatrixOut<S>, MatrixOut<S> dscores) const {
    const S scale = coefficient_ / tokens(in);
    for (Index t = 0; t < in.scores.rows(); ++t) {
      if (!in.tokens.is_valid(t)) continue;
      for (Index e = 0; e < in.scores.cols(); ++e)
        dscores(t, e) -= scale * (std::log(std::max(in.scores(t, e), std::numeric_limits<S>::min())) + 1);
    }
  }

private:
  static S tokens(const LossInput<S>& in) { return S(std::max<Index>(in.routing.num_valid_tokens, 1)); }
  S coefficient_;
};

}  // namespace moe
