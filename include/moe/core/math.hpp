#pragma once
// Scalar functions written once for every policy that needs them, stable for any |x|.
#include <algorithm>
#include <cmath>

namespace moe::detail {

// exp of a non-positive argument only: no overflow for large |x|.
template <class S>
S sigmoid(S x) {
  const S z = std::exp(-std::abs(x));
  return x >= 0 ? S(1) / (S(1) + z) : z / (S(1) + z);
}

// log(1 + exp(x)) without overflow for large x or cancellation for very negative x.
template <class S>
S softplus(S x) {
  return std::max(x, S(0)) + std::log1p(std::exp(-std::abs(x)));
}

}  // namespace moe::detail
