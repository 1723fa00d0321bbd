#pragma once
// Identity gate: scores = logits (docs/gates.md, IdentityGate). For a selector that normalises
// the logits itself, as SoftSlotsSelector does with its two softmaxes (Soft MoE), so the
// pipeline stays scorer -> gate -> selector.
#include <algorithm>

#include "moe/core/tensor.hpp"

namespace moe {

template <scalar S>
class IdentityGate {
public:
  using scalar_type = S;
  constexpr bool causal() const { return true; }  // per entry

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) {
    // one flat copy when both are contiguous: Eigen copies a one-column block row by row
    if (logits.outerStride() == logits.cols() && scores.outerStride() == scores.cols())
      std::copy_n(logits.data(), logits.size(), scores.data());
    else
      scores = logits;
  }
  // dlogits += dscores
  void backward(MatrixIn<S>, MatrixIn<S>, MatrixIn<S> dscores, MatrixOut<S> dlogits) { dlogits += dscores; }
};

}  // namespace moe
