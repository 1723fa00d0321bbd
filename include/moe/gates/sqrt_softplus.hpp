#pragma once
// Square-root softplus gate: scores = sqrt(log(1 + exp(logits))) (Megatron
// `score_function=sqrtsoftplus`; docs/gates.md).
#include <algorithm>
#include <cmath>

#include "moe/core/math.hpp"
#include "moe/core/tensor.hpp"

namespace moe {

template <scalar S>
class SqrtSoftplusGate {
public:
  using scalar_type = S;
  constexpr bool causal() const { return true; }  // per entry

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) {
    scores = logits.unaryExpr([](S l) { return std::sqrt(detail::softplus(l)); });
  }

  // d sqrt(softplus(l)) / dl = sigmoid(l) / (2 sqrt(softplus(l))).
  void backward(MatrixIn<S> logits, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    for (Index t = 0; t < logits.rows(); ++t)
      for (Index e = 0; e < logits.cols(); ++e) {
        const S sig = detail::sigmoid(logits(t, e));
        // When softplus underflows to 0 the derivative's limit, exp(l/2)/2, is 0 as well.
        if (scores(t, e) > S(0)) dlogits(t, e) += dscores(t, e) * sig / (S(2) * scores(t, e));
      }
  }
};

}  // namespace moe
