#pragma once
// Squared Euclidean distances from tokens to codebook entries (VQMoE, docs/scorers.md,
// VQScorer): d[t, j] = |x_t|^2 + |c_j|^2 - 2 <x_t, c_j>, the cross term one GEMM. Rounding can make
// a tiny distance negative; it is clamped at 0. scalar::squared_distances is the twin.
#include <vector>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void squared_distances(MatrixIn<S> x, MatrixIn<S> codebook, MatrixOut<S> dist) {
  for (Index t = 0; t < x.rows(); ++t)
    for (Index j = 0; j < codebook.rows(); ++j) {
      S sum = 0;
      for (Index i = 0; i < x.cols(); ++i) sum += (x(t, i) - codebook(j, i)) * (x(t, i) - codebook(j, i));
      dist(t, j) = sum;
    }
}
}  // namespace scalar

// `negative`: write -d instead (VQScorer's logits), in the same pass.
template <class S, bool negative = false>
void squared_distances(MatrixIn<S> x, MatrixIn<S> codebook, MatrixOut<S> dist, Gemm<S>& gemm,
                       Matrix<S>& code_norms) {
  gemm.template run<false, true>(x, codebook, dist, S(negative ? 2 : -2));
  fit(code_norms, 1, codebook.rows());
  code_norms = codebook.rowwise().squaredNorm().transpose();
  parallel_for(x.rows(), 256, [&](Index t0, Index end) {
    for (Index t = t0; t < end; ++t) {
      const S norm = x.row(t).squaredNorm();
      if constexpr (negative)
        dist.row(t) = (dist.row(t).array() - norm - code_norms.row(0).array()).cwiseMin(S(0)).matrix();
      else
        dist.row(t) = (dist.row(t).array() + norm + code_norms.row(0).array()).cwiseMax(S(0)).matrix();
    }
  });
}

}  // namespace moe::kernels
