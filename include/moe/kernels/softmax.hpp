#pragma once
// Row softmax, max-subtracted so that logits near +-1e3 neither overflow nor vanish.
#include <algorithm>
#include <cmath>

#include "moe/core/tensor.hpp"

namespace moe::kernels {

template <class S>
void softmax_rows(MatrixIn<S> logits, MatrixOut<S> probs) {
  const Index cols = logits.cols();
  for (Index t = 0; t < logits.rows(); ++t) {
    const S* in = logits.row(t).data();
    S* out = probs.row(t).data();
    const S top = *std::max_element(in, in + cols);
    S sum = 0;
    for (Index e = 0; e < cols; ++e) sum += (out[e] = std::exp(in[e] - top));
    const S inv = S(1) / sum;
    for (Index e = 0; e < cols; ++e) out[e] *= inv;
  }
}

// log(sum(exp(row))) of one row, max-subtracted.
template <class S>
S log_sum_exp(const S* row, Index n) {
  const S top = *std::max_element(row, row + n);
  S sum = 0;
  for (Index e = 0; e < n; ++e) sum += std::exp(row[e] - top);
  return top + std::log(sum);
}

}  // namespace moe::kernels
