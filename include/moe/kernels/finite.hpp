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
  const Index n = m.cols();
  B acc(S(0));
  S tail = 0;
  for (Index t = 0; t < m.rows(); ++t) {
    const S* row = m.row(t).data();
    Index e = 0;
    for (; e + w <= n; e += w) acc += B::load_unaligned(row + e) * B(S(0));
    for (; e < n; ++e) tail += row[e] * S(0);
  }
  return xsimd::hadd(acc) + tail == S(0);
}

}  // namespace moe::kernels
