#pragma once
// The squared coefficient of variation of a per-expert vector, the balance measure of Shazeer et
// al. 2017 and V-MoE (docs/losses.md, CV²). The three references write it three ways; each is a
// named convention, with its exact gradient.
#include <span>

#include "moe/core/tensor.hpp"

namespace moe {

enum class CVSquared {
  tensor2tensor,  // population variance / (mean² + 1e-10), n counted as n + 1e-10 (cv_squared)
  pytorch_port,   // unbiased variance (÷ n-1) / (mean² + 1e-10); 0 for one expert (torch.var)
  vmoe,           // population variance / mean² = (std / mean)²; 0 when the mean is 0
};

namespace detail {

// CV²(x); with `grad` non-empty also writes d CV² / d x_e into it.
template <class S>
S cv_squared(CVSquared form, std::span<const S> x, std::span<S> grad = {}) {
  const Index n = Index(x.size());
  for (auto& g : grad) g = S(0);
  if (n == 0 || (form == CVSquared::pytorch_port && n == 1)) return S(0);
  constexpr S eps = S(1e-10);  // both PyTorch and TensorFlow forms
  const S a = form == CVSquared::tensor2tensor ? S(n) + eps : S(n);  // the mean's divisor
  const S b = form == CVSquared::pytorch_port ? S(n - 1) : a;        // the variance's
  S sum = 0;
  for (const S v : x) sum += v;
  const S mean = sum / a;
  S squares = 0;
  for (const S v : x) squares += (v - mean) * (v - mean);
  const S var = squares / b;
  const S den = mean * mean + (form == CVSquared::vmoe ? S(0) : eps);
  if (den == 0) return S(0);  // vmoe with a zero mean: nothing routed, nothing to balance
  if (!grad.empty()) {
    // d var / d x_e = (2/b) ((x_e - mean) - (sum - n mean) / a), d mean / d x_e = 1 / a
    const S shift = (sum - S(n) * mean) / a;
    for (Index e = 0; e < n; ++e)
      grad[std::size_t(e)] = S(2) / b * ((x[std::size_t(e)] - mean) - shift) / den - var * S(2) * mean / (den * den * a);
  }
  return var / den;
}

}  // namespace detail
}  // namespace moe
