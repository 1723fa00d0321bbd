#pragma once
// LayerNorm over each row without its affine part, forward and backward, written once for the
// policies that normalise tokens (GliderScorer's local router, VQMoELayer's discrete path):
//   n = (x - mean) / sqrt(var + eps), var the biased variance (nn.LayerNorm's).
#include <cmath>

#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"

namespace moe::detail {

// n [T, D] and 1 / sigma per row [T, 1] (kept for backward).
template <class S>
void layer_norm_rows(MatrixIn<S> x, Matrix<S>& normalized, Matrix<S>& inv_std, double eps) {
  const Index T = x.rows(), D = x.cols();
  fit(normalized, T, D);
  fit(inv_std, T, 1);
  parallel_for(T, 1024, [&](Index t0, Index end) {
    for (Index t = t0; t < end; ++t) {
      const S mean = x.row(t).mean();
      normalized.row(t) = x.row(t).array() - mean;
      const S inv = S(1) / std::sqrt(normalized.row(t).squaredNorm() / S(D) + S(eps));
      inv_std(t, 0) = inv;
      normalized.row(t) *= inv;
    }
  });
}

// d(normalized) -> dx, in place: dx = (dn - mean(dn) - n mean(dn * n)) / sigma.
template <class S>
void layer_norm_backward_rows(MatrixOut<S> d, const Matrix<S>& normalized, const Matrix<S>& inv_std) {
  const Index T = d.rows(), D = d.cols();
  parallel_for(T, 1024, [&](Index t0, Index end) {
    for (Index t = t0; t < end; ++t) {
      const S mean_d = d.row(t).mean(), mean_dn = d.row(t).dot(normalized.row(t)) / S(D);
      d.row(t) = inv_std(t, 0) * (d.row(t).array() - mean_d - normalized.row(t).array() * mean_dn);
    }
  });
}

}  // namespace moe::detail
