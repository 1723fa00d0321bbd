#pragma once
// Sinkhorn iterations for the balanced routing plan of "Routers in Vision MoE"
// (docs/routers.md, Planned routers):
// K = exp(logits / eps), u = 1_T, v = 1_E; repeat: v = b / (K^T u), u = a / (K v);
// plan = diag(u) K diag(v). Row marginals a = 1 per token, column marginals b = T/E per expert
// (ott-jax defaults, fixed iteration count, column update first). Each row of K is taken
// relative to its maximum: the factor is absorbed by u, so the plan is unchanged and exp never
// overflows. scalar::sinkhorn is the twin.
#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/simd.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void sinkhorn(MatrixIn<S> logits, int iterations, MatrixOut<S> plan, S epsilon = S(1)) {
  const Index T = logits.rows(), E = logits.cols();
  const S a = S(1), b = S(T) / S(E);
  Matrix<S> K(T, E);
  for (Index t = 0; t < T; ++t) {
    const S top = logits.row(t).maxCoeff();
    for (Index e = 0; e < E; ++e) K(t, e) = std::exp((logits(t, e) - top) / epsilon);
  }
  std::vector<S> u(std::size_t(T), S(1)), v(std::size_t(E), S(1));
  for (int it = 0; it < iterations; ++it) {
    for (Index e = 0; e < E; ++e) {
      S ktu = 0;
      for (Index t = 0; t < T; ++t) ktu += K(t, e) * u[t];
      v[e] = b / ktu;
    }
    for (Index t = 0; t < T; ++t) {
      S kv = 0;
      for (Index e = 0; e < E; ++e) kv += K(t, e) * v[e];
      u[t] = a / kv;
    }
  }
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) plan(t, e) = u[t] * K(t, e) * v[e];
}
}  // namespace scalar

// The SIMD kernel: K lives in `plan` during the iterations; K^T u accumulates whole rows (one
// pass over K, vectorised over experts), K v is a row dot product. Scratch u, v, K^T u are
// caller-owned so a router can reuse them.
template <class S>
void sinkhorn(MatrixIn<S> logits, int iterations, MatrixOut<S> plan, std::vector<S>& u,
              std::vector<S>& v, S epsilon = S(1)) {
  const Index T = logits.rows(), E = logits.cols();
  const S a = S(1), b = S(T) / S(E);
  if (epsilon == S(1)) {
    softmax_rows<S>(logits, plan);  // rows of K up to a per-row factor, which u absorbs
  } else {
    for (Index t = 0; t < T; ++t) {
      const S top = logits.row(t).maxCoeff();
      plan.row(t) = ((logits.row(t).array() - top) / epsilon).exp().matrix();
    }
  }
  fit(u, T);
  fit(v, 2 * E);  // v, then K^T u
  std::fill(u.begin(), u.end(), S(1));
  Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> vv(v.data(), E), ktu(v.data() + E, E);
  for (int it = 0; it < iterations; ++it) {
    ktu.setZero();
    for (Index t = 0; t < T; ++t) ktu += u[t] * plan.row(t);
    vv = (b / ktu.array()).matrix();
    for (Index t = 0; t < T; ++t) u[t] = a / plan.row(t).dot(vv);
  }
  for (Index t = 0; t < T; ++t) plan.row(t) = u[t] * plan.row(t).cwiseProduct(vv);
}

}  // namespace moe::kernels
