#pragma once
// Identity gate: scores = logits (docs/gates.md, IdentityGate). For a selector that normalises
// the logits itself, as SoftSlotsSelector does with its two softmaxes (Soft MoE), so the
// pipeline stays scorer -> gate -> selector.
#include "moe/core/tensor.hpp"

namespace moe {

template <scalar S>
class IdentityGate {
public:
  using scalar_type = S;
  constexpr bool causal() const { return true; }  // per entry

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) { scores = logits; }
  // dlogits += dscores
  void backward(MatrixIn<S>, MatrixIn<S>, MatrixIn<S> dscores, MatrixOut<S> dlogits) { dlogits += dscores; }
};

}  // namespace moe
