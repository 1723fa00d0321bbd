#pragma once
// Dispatch and combine: move whole token rows between the batch and the expert blocks.
#include <algorithm>
#include <cstdint>

#include "moe/core/tensor.hpp"
#include "moe/routing.hpp"

namespace moe::kernels {

// out[s] = x[slot_token[s]] (times scale[s] when given) for every slot; padding slots
// (token -1) become zero rows.
template <class S>
void gather_rows(MatrixIn<S> x, std::span<const std::int32_t> slot_token, MatrixOut<S> out,
                 std::span<const S> scale = {}) {
  const Index d = x.cols();
  for (std::size_t s = 0; s < slot_token.size(); ++s) {
    S* dst = out.row(Index(s)).data();
    const auto t = slot_token[s];
    if (t < 0) {
      std::fill_n(dst, d, S(0));
    } else if (scale.empty()) {
      std::copy_n(x.row(t).data(), d, dst);
    } else {
      const S* src = x.row(t).data();
      for (Index j = 0; j < d; ++j) dst[j] = scale[s] * src[j];
    }
  }
}

// y[t] (+)= sum over token t's kept choices of weight[slot] * rows[slot] (weight 1 when the
// span is empty), per token so that no two threads ever write one row and the summation order
// is fixed.
template <class S>
void combine_rows(const SparseRouting<S>& r, std::span<const S> weight, MatrixIn<S> rows,
                  MatrixOut<S> y, bool accumulate) {
  const Index d = rows.cols();
  for (Index t = 0; t < r.num_tokens; ++t) {
    S* dst = y.row(t).data();
    if (!accumulate) std::fill_n(dst, d, S(0));
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      const auto s = r.choice_slot[c];
      if (s < 0) continue;
      const S w = weight.empty() ? S(1) : weight[std::size_t(s)];
      const S* src = rows.row(s).data();
      for (Index j = 0; j < d; ++j) dst[j] += w * src[j];
    }
  }
}

}  // namespace moe::kernels
