#pragma once
// Whether every entry of a matrix is finite: x * 0 is 0 for finite x and NaN for NaN or +-Inf,
// so one running sum per lane answers it in a single vectorised pass. scalar::all_finite is the
// twin.
#include <cmath>

#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
bool all_finite(MatrixIn<S> m) {
  for (Index t = 0; t < m.rows(); ++t)
    for (Index e = 0; e < m.cols(); ++e)
      if (!std::isfinite(m(t, e))) return false;
  return true;
}
}  // namespace scalar

template <class S>
bool all_finite(MatrixIn<S> m) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size);
  // a contiguous matrix is one long row; four sums so the adds do not wait on each other
  const bool flat = m.outerStride() == m.cols();
  const Index rows = flat ? 1 : m.rows(), n = flat ? m.size() : m.cols();
  B acc[4] = {B(S(0)), B(S(0)), B(S(0)), B(S(0))};
  S tail = 0;
  for (Index t = 0; t < rows; ++t) {
    const S* row = m.data() + t * m.outerStride();
    Index e = 0;
    for (; e + 4 * w <= n; e += 4 * w)
      for (int i = 0; i < 4; ++i) acc[i] += B::load_unaligned(row + e + i * w) * B(S(0));
    for (; e + w <= n; e += w) acc[0] += B::load_unaligned(row + e) * B(S(0));
    for (; e < n; ++e) tail += row[e] * S(0);
  }
  return xsimd::hadd((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail == S(0);
}

}  // namespace moe::kernels
