#pragma once
// A gate whose selector ranks by the logits, not by the scores (docs/gates.md, RankByLogits): the
// released models that take top-k on the logits and only then apply their score function
// (gpt-oss: softmax over the k; Llama 4: a sigmoid of each chosen logit). The scores, and so the
// combine weights, are the inner gate's. A monotone score function picks the same experts in
// exact arithmetic, but not in floating point: a sigmoid saturates at 1 (every logit above ~17 in
// float), and the selector would then take the lowest index among experts whose logits differ.
#include <algorithm>

#include "moe/concepts.hpp"
#include "moe/core/tensor.hpp"

namespace moe {

template <class Inner>
class RankByLogits {
public:
  using scalar_type = typename Inner::scalar_type;
  using S = scalar_type;

  explicit RankByLogits(Inner inner = {}) : inner_(std::move(inner)) {}

  bool causal() const { return is_causal(inner_); }
  Inner& inner() { return inner_; }

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) { inner_.forward(logits, scores); }
  void backward(MatrixIn<S> logits, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    inner_.backward(logits, scores, dscores, dlogits);
  }
  // rank = logits; nothing in backward reads rank's values.
  void rank(MatrixIn<S> logits, MatrixIn<S>, const TokenInputs<S>&, MatrixOut<S> rank) {
    for (Index t = 0; t < logits.rows(); ++t)
      std::copy_n(logits.row(t).data(), logits.cols(), rank.row(t).data());
  }

private:
  Inner inner_;
};

}  // namespace moe
