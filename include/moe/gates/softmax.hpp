#pragma once
// Softmax gate: scores = softmax(logits) over experts (Switch, GShard, Mixtral; docs/gates.md).
#include "moe/core/tensor.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe {

template <scalar S>
class SoftmaxGate {
public:
  using scalar_type = S;
  constexpr bool causal() const { return true; }  // per token

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) { kernels::softmax_rows<S>(logits, scores); }

  // dlogits += p * (dp - <dp, p>) per row.
  void backward(MatrixIn<S>, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    for (Index t = 0; t < scores.rows(); ++t) {
      const S inner = scores.row(t).dot(dscores.row(t));
      dlogits.row(t).array() += scores.row(t).array() * (dscores.row(t).array() - inner);
    }
  }
};

}  // namespace moe
