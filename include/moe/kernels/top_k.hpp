#pragma once
// Top-k of one row: indices of the k largest values in descending order, ties broken to the
// lowest index (DESIGN.md §6). Insertion into a sorted run of k, right for the small k of MoE.
#include <cstdint>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"

namespace moe::kernels {

template <class S>
void top_k_row(const S* values, Index n, Index k, std::int32_t* out) {
  MOE_ASSERT(k <= n);
  if (k <= 0) return;  // a token that chooses nothing (dynamic k)
  Index filled = 0;
  for (Index e = 0; e < n; ++e) {
    const S v = values[e];
    if (filled == k && !(v > values[out[k - 1]])) continue;  // strict: an equal later index loses
    Index pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > values[out[pos - 1]]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<std::int32_t>(e);
  }
}

}  // namespace moe::kernels
