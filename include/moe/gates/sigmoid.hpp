#pragma once
// Sigmoid gate: scores = 1 / (1 + exp(-logits)), independently per expert (Megatron
// `score_function=sigmoid`, DeepSeek-V3; docs/gates.md).
#include <cmath>

#include "moe/core/math.hpp"
#include "moe/core/tensor.hpp"

namespace moe {

template <scalar S>
class SigmoidGate {
public:
  using scalar_type = S;

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) {
    scores = logits.unaryExpr([](S l) { return detail::sigmoid(l); });
  }

  // dlogits += dp * p * (1 - p).
  void backward(MatrixIn<S>, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    dlogits.array() += dscores.array() * scores.array() * (S(1) - scores.array());
  }
};

}  // namespace moe
