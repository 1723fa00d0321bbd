#pragma once
// Per-call scratch is sized once and reused: these helpers resize only when the shape changes,
// and std::vector keeps its capacity, so steady-state calls on the same shapes never allocate.
#include <vector>

#include "moe/core/tensor.hpp"

namespace moe {

template <class Derived>
void fit(Eigen::PlainObjectBase<Derived>& m, Index rows, Index cols) {
  if (m.rows() != rows || m.cols() != cols) m.resize(rows, cols);
}

// Grow-only variant for buffers whose row count varies from call to call (kept slots change
// with the routing): returns the top `rows` rows, reallocating only when more are needed.
template <class Derived>
auto fit_rows(Eigen::PlainObjectBase<Derived>& m, Index rows, Index cols) {
  if (m.cols() != cols || m.rows() < rows) m.resize(rows, cols);
  return m.topRows(rows);
}

template <class T>
void fit(std::vector<T>& v, Index n) {
  v.resize(static_cast<std::size_t>(n));
}

}  // namespace moe
