#pragma once
// Shared test helpers: deterministic data, named tolerances and central finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>
#include <moe/moe.hpp>

namespace moe_test {

using moe::Index;
using moe::Matrix;

// Entries drawn from N(0, sigma^2) keyed by (seed, row, col): the same data on every run.
template <class S>
Matrix<S> random_matrix(Index rows, Index cols, std::uint64_t seed, double sigma = 1.0) {
  const moe::CounterRng rng(seed, 7);
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = S(sigma * rng.normal(i, j));
  return m;
}

// Forward results vs an oracle: a few roundings per term of a length-n reduction.
template <class S>
S forward_tol(Index n) {
  return S(8) * S(std::max<Index>(n, 1)) * std::numeric_limits<S>::epsilon();
}

// Central differences in double: truncation O(h^2) and rounding O(eps/h) balance near
// h = eps^(1/3) ~ 6e-6; the gradient then agrees to about 1e-9 relative for smooth functions.
inline constexpr double fd_step = 1e-6;
inline constexpr double fd_rel_tol = 1e-6;

// d f / d p for every entry of p, by central differences (p is restored afterwards).
template <class M>
Matrix<double> numeric_gradient(M& p, const std::function<double()>& f, double h = fd_step) {
  Matrix<double> g(p.rows(), p.cols());
  for (Index i = 0; i < p.rows(); ++i)
    for (Index j = 0; j < p.cols(); ++j) {
      const double keep = p(i, j);
      p(i, j) = keep + h;
      const double up = f();
      p(i, j) = keep - h;
      const double down = f();
      p(i, j) = keep;
      g(i, j) = (up - down) / (2 * h);
    }
  return g;
}

// Analytic vs numeric gradient: max abs error relative to the largest gradient entry.
inline void require_gradient_close(const Matrix<double>& analytic, const Matrix<double>& numeric,
                                   double rel_tol = fd_rel_tol) {
  REQUIRE(analytic.rows() == numeric.rows());
  REQUIRE(analytic.cols() == numeric.cols());
  const double scale = std::max(1.0, numeric.cwiseAbs().maxCoeff());
  const double err = (analytic - numeric).cwiseAbs().maxCoeff();
  INFO("max |analytic - numeric| = " << err << ", scale " << scale);
  REQUIRE(err <= rel_tol * scale);
}

// Softmax of each row, written out: the oracle of the softmax gate.
template <class S>
Matrix<S> softmax_of(const Matrix<S>& logits) {
  Matrix<S> p(logits.rows(), logits.cols());
  for (Index t = 0; t < logits.rows(); ++t) {
    const S m = logits.row(t).maxCoeff();
    S z = 0;
    for (Index e = 0; e < logits.cols(); ++e) z += std::exp(logits(t, e) - m);
    for (Index e = 0; e < logits.cols(); ++e) p(t, e) = std::exp(logits(t, e) - m) / z;
  }
  return p;
}

// L = sum over the kept slots of w * R[t, e] + aux_loss, so d L / d w[slot] = R[t, e]; every
// evaluation draws at `step`, so a stochastic router's draws stay fixed under finite differences.
template <class Router>
double slot_objective(Router& router, const Matrix<double>& x, const Matrix<double>& R,
                      const moe::TokenInputs<double>& tokens, std::uint64_t step = 0) {
  router.set_step(step);
  const auto& r = router.forward(x, tokens);
  double sum = router.aux_loss();
  for (Index e = 0; e < r.num_experts; ++e)
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
      if (r.slot_token[s] >= 0) sum += r.slot_weight[s] * R(r.slot_token[s], e);
  return sum;
}

// The backward of slot_objective at the router's last forward: zeroes the parameter gradients,
// fills them, and returns d L / d x.
template <class Router>
Matrix<double> slot_backward(Router& router, const Matrix<double>& x, const Matrix<double>& R,
                             const moe::TokenInputs<double>& tokens) {
  const auto& r = router.routing();
  std::vector<double> dw(std::size_t(r.num_slots()));
  for (Index e = 0; e < r.num_experts; ++e)
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
      dw[std::size_t(s)] = r.slot_token[s] >= 0 ? R(r.slot_token[s], e) : 0.0;
  moe::zero_grad(router);
  Matrix<double> dx(x.rows(), x.cols());
  router.backward(x, tokens, dw, dx);
  return dx;
}

// A layer's (or router's) parameters by name, as views that may be written (finite differences).
template <class Layer>
std::map<std::string, Eigen::Ref<Matrix<double>>> parameters(Layer& layer) {
  std::map<std::string, Eigen::Ref<Matrix<double>>> out;
  layer.for_each_parameter([&](std::string_view name, auto value, auto) { out.emplace(std::string(name), value); });
  return out;
}

// Their gradients by name, copied.
template <class Layer>
std::map<std::string, Matrix<double>> gradients(Layer& layer) {
  std::map<std::string, Matrix<double>> out;
  layer.for_each_parameter([&](std::string_view name, auto, auto grad) { out.emplace(std::string(name), grad); });
  return out;
}

// Every entry of a and b within tol.
inline void require_close(const Matrix<double>& a, const Matrix<double>& b, double tol) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  if (a.size() == 0) return;
  INFO("max |a - b| = " << (a - b).cwiseAbs().maxCoeff());
  REQUIRE((a - b).cwiseAbs().maxCoeff() <= tol);
}

// A layer's backward of L = <y, R>, y = layer(x, tokens), against central differences: dx and
// every parameter's gradient, except the `frozen` ones, whose gradient must stay exactly 0.
// Returns the analytic parameter gradients by name.
template <class Layer>
std::map<std::string, Matrix<double>> check_layer_gradients(Layer& layer, Matrix<double>& x, const Matrix<double>& R,
                                                            const moe::TokenInputs<double>& tokens = {},
                                                            const std::vector<std::string>& frozen = {}) {
  Matrix<double> y(x.rows(), R.cols()), dx(x.rows(), x.cols());
  const auto loss = [&] {
    layer.forward(x, y, tokens);
    return y.cwiseProduct(R).sum();
  };
  loss();
  moe::zero_grad(layer);
  layer.backward(R, dx);
  const auto grads = gradients(layer);
  require_gradient_close(dx, numeric_gradient(x, loss));
  for (auto& [name, value] : parameters(layer)) {
    INFO(name);
    if (std::find(frozen.begin(), frozen.end(), name) != frozen.end()) REQUIRE(grads.at(name).isZero(0));
    else require_gradient_close(grads.at(name), numeric_gradient(value, loss));
  }
  return grads;
}

}  // namespace moe_test
