#pragma once
// Scalar functions written once for every policy that needs them, stable for any |x|.
#include <algorithm>
#include <cmath>
#include <numbers>

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

// Standard normal CDF through erfc, which keeps its relative accuracy in the lower tail
// (1 - Phi(-z) would cancel there).
template <class S>
S normal_cdf(S z) {
  return S(0.5) * std::erfc(-z / S(std::numbers::sqrt2));
}

// Standard normal density.
template <class S>
S normal_pdf(S z) {
  return S(std::numbers::inv_sqrtpi / std::numbers::sqrt2) * std::exp(S(-0.5) * z * z);
}

// GELU, the exact erf form (PyTorch's nn.GELU default, not the tanh approximation):
// x Phi(x), and its derivative Phi(x) + x phi(x).
template <class S>
S gelu(S x) {
  return S(0.5) * x * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2)));
}

template <class S>
S gelu_grad(S x) {
  const S cdf = S(0.5) * (S(1) + std::erf(x * S(std::numbers::sqrt2 / 2)));
  return cdf + x * normal_pdf(x);
}

}  // namespace moe::detail
