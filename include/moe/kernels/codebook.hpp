#pragma once
// Squared Euclidean distances from tokens to codebook entries (VQMoE, docs/routers.md, Planned
// routers): d[t, j] = |x_t|^2 + |c_j|^2 - 2 <x_t, c_j>, the cross term one GEMM. Rounding can make
// a tiny distance negative; it is clamped at 0. scalar::squared_distances is the twin.
#include <vector>

#include "moe/core/gemm.hpp"
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

template <class S>
void squared_distances(MatrixIn<S> x, MatrixIn<S> codebook, MatrixOut<S> dist, Gemm<S>& gemm,
                       Matrix<S>& code_norms) {
  gemm.template run<false, true>(x, codebook, dist, S(-2));
  fit(code_norms, 1, codebook.rows());
  code_norms = codebook.rowwise().squaredNorm().transpose();
  for (Index t = 0; t < x.rows(); ++t)
    dist.row(t) = (dist.row(t).array() + x.row(t).squaredNorm() + code_norms.row(0).array()).cwiseMax(S(0)).matrix();
}

}  // namespace moe::kernels
