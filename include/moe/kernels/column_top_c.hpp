#pragma once
// Per-column top-C (expert choice, docs/routers.md, Planned routers): for each expert e, the C
// tokens with the largest values in column e, in (value desc, token asc) order. Each column is
// copied once (a strided read), partitioned around its C-th entry in linear time, and only the C
// winners are sorted. scalar::top_c_per_column, a full stable sort per column, is the twin.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"

namespace moe::kernels {

namespace scalar {
// out[e * C + c] = the c-th token of expert e.
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<std::int32_t> out) {
  std::vector<std::int32_t> idx(std::size_t(values.rows()));
  for (Index e = 0; e < values.cols(); ++e) {
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](auto a, auto b) { return values(a, e) > values(b, e); });
    std::copy_n(idx.begin(), capacity, out.begin() + e * capacity);
  }
}
}  // namespace scalar

template <class S>
struct ColumnEntry {
  S value;
  std::int32_t token;
  // (value desc, token asc): a strict total order, so the result is unique
  friend bool operator<(const ColumnEntry& a, const ColumnEntry& b) {
    return a.value != b.value ? a.value > b.value : a.token < b.token;
  }
};

// scratch: one column buffer per thread, grown once.
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<std::int32_t> out,
                      PerThread<std::vector<ColumnEntry<S>>>& scratch) {
  const Index T = values.rows();
  MOE_ASSERT(capacity <= T && Index(out.size()) >= capacity * values.cols());
  scratch.reserve();
  parallel_for(values.cols(), 1, [&](Index e, Index) {
    auto& col = scratch.local();
    col.resize(std::size_t(T));
    for (Index t = 0; t < T; ++t) col[t] = {values(t, e), std::int32_t(t)};
    if (capacity < T) std::nth_element(col.begin(), col.begin() + capacity, col.end());
    std::sort(col.begin(), col.begin() + capacity);
    for (Index c = 0; c < capacity; ++c) out[std::size_t(e * capacity + c)] = col[c].token;
  });
}

}  // namespace moe::kernels
