#pragma once
// Expert activations and their derivatives.

#include "moe/core/math.hpp"

namespace moe {

enum class Activation { relu, gelu };

namespace detail {
// GELU is the exact erf form (PyTorch's default), not the tanh approximation (detail::gelu).
template <class S>
S activate(Activation a, S x) {
  if (a == Activation::relu) return x > 0 ? x : S(0);
  return gelu(x);
}

template <class S>
S activate_grad(Activation a, S x) {
  if (a == Activation::relu) return x > 0 ? S(1) : S(0);
  return gelu_grad(x);
}
}  // namespace detail
}  // namespace moe
