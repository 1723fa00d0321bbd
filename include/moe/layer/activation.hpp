#pragma once
// Expert activations and their derivatives.
#include <cmath>
#include <numbers>

#include "moe/core/math.hpp"

namespace moe {

enum class Activation { relu, gelu };

namespace detail {
// GELU is the exact erf form (PyTorch's default), not the tanh approximation.
template <class S>
S activate(Activation a, S x) {
  if (a == Activation::relu) return x > 0 ? x : S(0);
  return S(0.5) * x * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2)));
}

template <class S>
S activate_grad(Activation a, S x) {
  if (a == Activation::relu) return x > 0 ? S(1) : S(0);
  const S cdf = S(0.5) * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2)));
  const S pdf = std::exp(S(-0.5) * x * x) * S(std::numbers::inv_sqrtpi / std::numbers::sqrt2);
  return cdf + x * pdf;
}
}  // namespace detail
}  // namespace moe
