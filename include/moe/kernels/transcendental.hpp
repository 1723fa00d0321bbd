#pragma once
// Element-wise transcendental kernels for the noise on the logits (docs/scorers.md,
// NoisyLinearScorer): the softplus of the noise's deviation, the Box-Muller Gaussian draw and the
// load loss's normal CDF, over arrays. For float, whole SIMD registers with Cephes-style polynomials (log here, exp from
// simd.hpp), and the tail through the same code on a broadcast, so every element gets the same
// bits wherever it sits (and on any thread count); for double, the C library (the double paths
// are the gradient checks, not the hot ones). scalar:: is the twin the tests compare with.
// (xsimd 8.1's own log, log1p and cos do not build for AVX-512BW, hence these.)
#include <cmath>
#include <cstdint>
#include <numbers>
#include <type_traits>

#include "moe/core/math.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

// log(x) for positive normal float lanes: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then
// log(m) = f - f^2/2 + f^3 P(f), f = m - 1, with Cephes' degree-8 P, and e ln2 added in two
// parts (relative error ~1 ulp away from x = 1, absolute ~1e-7 near it).
template <class A>
MOE_INLINE xsimd::batch<float, A> log_approx(xsimd::batch<float, A> x) {
  using B = xsimd::batch<float, A>;
  using I = xsimd::batch<std::int32_t, A>;
  const I bits = xsimd::bitwise_cast<I>(x);
  B e = xsimd::batch_cast<float>((bits >> 23) - I(127));
  B m = xsimd::bitwise_cast<B>((bits & I(0x007fffff)) | I(0x3f800000));  // [1, 2)
  const auto high = m > B(1.41421356237f);
  m = xsimd::select(high, m * B(0.5f), m);
  e = xsimd::select(high, e + B(1.0f), e);
  const B f = m - B(1.0f), z = f * f;
  B p(7.0376836292e-2f);
  p = xsimd::fma(p, f, B(-1.1514610310e-1f));
  p = xsimd::fma(p, f, B(1.1676998740e-1f));
  p = xsimd::fma(p, f, B(-1.2420140846e-1f));
  p = xsimd::fma(p, f, B(1.4249322787e-1f));
  p = xsimd::fma(p, f, B(-1.6668057665e-1f));
  p = xsimd::fma(p, f, B(2.0000714765e-1f));
  p = xsimd::fma(p, f, B(-2.4999993993e-1f));
  p = xsimd::fma(p, f, B(3.3333331174e-1f));
  B y = p * f * z;
  y = xsimd::fma(e, B(-2.12194440e-4f), y);
  y = xsimd::fma(z, B(-0.5f), y);
  return xsimd::fma(e, B(0.693359375f), f + y);
}

// cos(2 pi u) for float lanes: u reduced to a in [0, 1/2] (cos is even and 1-periodic in u),
// folded to b in [0, 1/4] (cos(2 pi a) = -cos(2 pi (1/2 - a))), then the Cephes cos polynomial
// on [0, pi/4] or the sin polynomial of the complement on (pi/4, pi/2].
template <class A>
MOE_INLINE xsimd::batch<float, A> cos_2pi_approx(xsimd::batch<float, A> u) {
  using B = xsimd::batch<float, A>;
  const B a = xsimd::abs(u - xsimd::nearbyint(u));
  const auto far = a > B(0.25f);
  const B b = xsimd::select(far, B(0.5f) - a, a);
  const auto upper = b > B(0.125f);
  const B t = B(float(2 * std::numbers::pi)) * xsimd::select(upper, B(0.25f) - b, b), t2 = t * t;
  B c(2.443315711809948e-5f);
  c = xsimd::fma(c, t2, B(-1.388731625493765e-3f));
  c = xsimd::fma(c, t2, B(4.166664568298827e-2f));
  c = xsimd::fma(c * t2, t2, xsimd::fma(t2, B(-0.5f), B(1.0f)));
  B s(-1.9515295891e-4f);
  s = xsimd::fma(s, t2, B(8.3321608736e-3f));
  s = xsimd::fma(s, t2, B(-1.6666654611e-1f));
  s = xsimd::fma(s * t2, t, t);
  const B r = xsimd::select(upper, s, c);
  return xsimd::select(far, -r, r);
}

// Phi(z) = erfc(-z / sqrt 2) / 2 for float lanes, erfc(x) of |x| as t exp(-x^2 + Q(t)),
// t = 1 / (1 + |x|/2), Q the degree-9 Chebyshev fit of Numerical Recipes' erfcc (fractional error
// under 1.2e-7 everywhere), and 2 - erfc(|x|) for negative x. In float the lower tail's relative
// error grows with z^2 (the rounding of the exponent): 4e-6 at z = -9, where Phi is 1e-19.
template <class A>
MOE_INLINE xsimd::batch<float, A> normal_cdf_approx(xsimd::batch<float, A> z) {
  using B = xsimd::batch<float, A>;
  const B x = z * B(float(-1 / std::numbers::sqrt2)), ax = xsimd::abs(x);
  const B t = B(1.0f) / xsimd::fma(ax, B(0.5f), B(1.0f));
  B q(0.17087277f);
  q = xsimd::fma(q, t, B(-0.82215223f));
  q = xsimd::fma(q, t, B(1.48851587f));
  q = xsimd::fma(q, t, B(-1.13520398f));
  q = xsimd::fma(q, t, B(0.27886807f));
  q = xsimd::fma(q, t, B(-0.18628806f));
  q = xsimd::fma(q, t, B(0.09678418f));
  q = xsimd::fma(q, t, B(0.37409196f));
  q = xsimd::fma(q, t, B(1.00002368f));
  q = xsimd::fma(q, t, B(-1.26551223f));
  const B erfc_abs = t * exp_approx(q - ax * ax);
  return B(0.5f) * xsimd::select(x < B(0.0f), B(2.0f) - erfc_abs, erfc_abs);
}

namespace scalar {
// out = Phi(z)
template <class S>
void normal_cdf(const S* z, S* out, Index n) {
  for (Index i = 0; i < n; ++i) out[i] = moe::detail::normal_cdf(z[i]);
}

// out = softplus(x) + add
template <class S>
void softplus(const S* x, S* out, Index n, S add) {
  for (Index i = 0; i < n; ++i) out[i] = moe::detail::softplus(x[i]) + add;
}

// out = sqrt(-2 log u1) cos(2 pi u2) (Box-Muller)
template <class S>
void box_muller(const double* u1, const double* u2, S* out, Index n) {
  for (Index i = 0; i < n; ++i) out[i] = S(std::sqrt(-2.0 * std::log(u1[i])) * std::cos(2.0 * std::numbers::pi * u2[i]));
}
}  // namespace scalar

namespace detail {
// softplus(x) + add = max(x, 0) + log1p(exp(-|x|)) + add, log1p(y) as log(1 + y) y / ((1 + y) - 1),
// which cancels the rounding of 1 + y (and is y itself where 1 + y rounds to 1).
template <class B>
MOE_INLINE B softplus_add(B x, B add) {
  const B y = exp_approx<true>(-xsimd::abs(x)), u = B(1.0f) + y, d = u - B(1.0f);
  const B l = xsimd::select(d == B(0.0f), y, log_approx(u) * (y / xsimd::select(d == B(0.0f), B(1.0f), d)));
  return xsimd::max(x, B(0.0f)) + l + add;
}

template <class B>
MOE_INLINE B box_muller(B u1, B u2) {
  return xsimd::sqrt(B(-2.0f) * log_approx(u1)) * cos_2pi_approx(u2);
}

// One element through the vector code, so that tails match the body.
template <class F>
MOE_INLINE float on_broadcast(F&& f, float a, float b) {
  return f(xsimd::batch<float>(a), xsimd::batch<float>(b)).get(0);
}
}  // namespace detail

template <class S>
void softplus(const S* x, S* out, Index n, S add) {
  if constexpr (std::is_same_v<S, float>) {
    using B = Batch<float>;
    constexpr Index w = Index(B::size);
    Index i = 0;
    for (; i + w <= n; i += w) detail::softplus_add(B::load_unaligned(x + i), B(add)).store_unaligned(out + i);
    for (; i < n; ++i)
      out[i] = detail::on_broadcast([](auto a, auto b) { return detail::softplus_add(a, b); }, x[i], add);
  } else {
    scalar::softplus(x, out, n, add);
  }
}

template <class S>
void normal_cdf(const S* z, S* out, Index n) {
  if constexpr (std::is_same_v<S, float>) {
    using B = Batch<float>;
    constexpr Index w = Index(B::size);
    Index i = 0;
    for (; i + w <= n; i += w) normal_cdf_approx(B::load_unaligned(z + i)).store_unaligned(out + i);
    for (; i < n; ++i) out[i] = normal_cdf_approx(xsimd::batch<float>(z[i])).get(0);
  } else {
    scalar::normal_cdf(z, out, n);
  }
}

// For float the uniforms are rounded to float first (still in (0, 1]; log(1) = 0 is harmless),
// and the draw carries float's precision, which is all a float router keeps of it.
template <class S>
void box_muller(const double* u1, const double* u2, S* out, Index n) {
  if constexpr (std::is_same_v<S, float>) {
    using B = Batch<float>;
    constexpr Index w = Index(B::size);
    alignas(64) float a[w], b[w];
    Index i = 0;
    for (; i + w <= n; i += w) {
      for (Index j = 0; j < w; ++j) a[j] = float(u1[i + j]), b[j] = float(u2[i + j]);
      detail::box_muller(B::load_aligned(a), B::load_aligned(b)).store_unaligned(out + i);
    }
    for (; i < n; ++i)
      out[i] = detail::on_broadcast([](auto p, auto q) { return detail::box_muller(p, q); }, float(u1[i]), float(u2[i]));
  } else {
    scalar::box_muller(u1, u2, out, n);
  }
}

}  // namespace moe::kernels
