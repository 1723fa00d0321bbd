#pragma once
// Per-column top-C (expert choice, docs/selectors.md, ExpertChoiceSelector): for each expert e,
// the C real tokens with the largest values in column e, in (value desc, token asc) order or in
// token order. Padding rows (valid[t] = 0) are never taken.
//
// A column is never sorted whole. A sample of rows gives each column a threshold a little below
// its estimated C-th value; one row-major pass over the matrix (one SIMD compare per register of
// a row) collects the entries at or above it; only those candidates are partitioned around the
// C-th and the winners sorted. Every entry at or above the threshold is a candidate, so when a
// column has at least C of them its top C are among them whatever the sample said; a column
// with too few (or too many to hold) is redone exactly. The result does not depend on the sample.
// scalar::top_c_per_column, a stable sort per column, is the twin.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "moe/config.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
// out[e * C + c] = the c-th token of expert e among the valid rows (all rows when valid is empty);
// C <= the number of valid rows.
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<const std::uint8_t> valid,
                      std::span<std::int32_t> out, bool token_order = false) {
  std::vector<std::int32_t> idx;
  for (Index t = 0; t < values.rows(); ++t)
    if (valid.empty() || valid[std::size_t(t)]) idx.push_back(std::int32_t(t));
  for (Index e = 0; e < values.cols(); ++e) {
    auto col = idx;
    std::stable_sort(col.begin(), col.end(), [&](auto a, auto b) { return values(a, e) > values(b, e); });
    if (token_order) std::sort(col.begin(), col.begin() + capacity);
    std::copy_n(col.begin(), capacity, out.begin() + e * capacity);
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

// Reused across calls: sized once per shape.
template <class S>
struct TopCScratch {
  std::vector<S> threshold, sample;
  std::vector<ColumnEntry<S>> candidates;  // `room` entries per column
  std::vector<Index> count;                // candidates seen per column (may pass room)
  PerThread<std::vector<ColumnEntry<S>>> column;  // a column redone exactly
};

namespace detail {
// The exact path for one column: every valid entry, partitioned, the winners sorted.
template <class S>
void top_c_exact(MatrixIn<S> values, Index e, Index capacity, std::span<const std::uint8_t> valid,
                 std::vector<ColumnEntry<S>>& col) {
  col.clear();
  for (Index t = 0; t < values.rows(); ++t)
    if (valid.empty() || valid[std::size_t(t)]) col.push_back({values(t, e), std::int32_t(t)});
  if (capacity < Index(col.size())) std::nth_element(col.begin(), col.begin() + capacity, col.end());
}
}  // namespace detail

// out[e * C + c] as in the twin; `valid_rows` = the number of valid rows (>= C).
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<const std::uint8_t> valid, Index valid_rows,
                      std::span<std::int32_t> out, TopCScratch<S>& scratch, bool token_order = false) {
  const Index T = values.rows(), E = values.cols();
  MOE_ASSERT(capacity <= valid_rows && Index(out.size()) >= capacity * E);
  if (capacity == 0 || E == 0) return;
  const auto is_valid = [&](Index t) { return valid.empty() || valid[std::size_t(t)] != 0; };
  const auto emit = [&](Index e, ColumnEntry<S>* winners) {
    if (token_order) std::sort(winners, winners + capacity, [](const auto& a, const auto& b) { return a.token < b.token; });
    else std::sort(winners, winners + capacity);
    for (Index c = 0; c < capacity; ++c) out[std::size_t(e * capacity + c)] = winners[c].token;
  };
  scratch.column.reserve();
  const auto exact = [&](Index e) {
    auto& col = scratch.column.local();
    detail::top_c_exact<S>(values, e, capacity, valid, col);
    emit(e, col.data());
  };

  // The sample: about 512 valid rows spread over the batch. Small batches, or a C that takes most
  // of a column, gain nothing from candidates: every column is done exactly.
  constexpr Index sample_rows = 512;
  if (valid_rows < 8 * sample_rows || 4 * capacity > valid_rows) {
    parallel_for(E, 1, [&](Index e, Index) { exact(e); });
    return;
  }
  const Index stride = T / sample_rows;
  fit(scratch.sample, sample_rows * E);
  Index m = 0;  // sampled valid rows, stored column by column
  for (Index t = stride / 2; t < T && m < sample_rows; t += stride) {
    if (!is_valid(t)) continue;
    for (Index e = 0; e < E; ++e) scratch.sample[std::size_t(e * sample_rows + m)] = values(t, e);
    ++m;
  }
  // The sample rank of the threshold: the expected share C / n of the m sampled values, plus
  // three standard deviations of that count, so a column falls short only rarely.
  const double share = double(capacity) / double(valid_rows);
  const Index rank = std::min<Index>(m, Index(std::ceil(double(m) * share + 3.0 * std::sqrt(double(m) * share))) + 2);
  fit(scratch.threshold, E);
  for (Index e = 0; e < E; ++e) {
    S* col = scratch.sample.data() + e * sample_rows;
    if (rank >= m) {
      scratch.threshold[std::size_t(e)] = std::numeric_limits<S>::lowest();
      continue;
    }
    std::nth_element(col, col + (rank - 1), col + m, std::greater<S>());
    scratch.threshold[std::size_t(e)] = col[rank - 1];
  }
  // Room for twice the expected candidates: an overfull column is redone exactly.
  const Index room = std::min(valid_rows, 2 * Index(std::ceil(double(valid_rows) * double(rank) / double(m))) + 64);
  fit(scratch.candidates, room * E);
  fit(scratch.count, E);
  std::fill(scratch.count.begin(), scratch.count.end(), Index(0));
  ColumnEntry<S>* const cand = scratch.candidates.data();
  Index* const count = scratch.count.data();
  const S* const thr = scratch.threshold.data();
  const auto take = [&](Index t, Index e, S v) {
    if (count[e] < room) cand[e * room + count[e]] = {v, std::int32_t(t)};
    ++count[e];
  };
  constexpr Index W = Index(width<S>);
  for (Index t = 0; t < T; ++t) {
    if (!is_valid(t)) continue;
    const S* row = values.row(t).data();
    Index e = 0;
    for (; e + W <= E; e += W) {
      std::uint64_t bits = mask_bits(Batch<S>::load_unaligned(row + e) >= Batch<S>::load_unaligned(thr + e));
      for (; bits; bits &= bits - 1) {
        const Index c = e + std::countr_zero(bits);
        take(t, c, row[c]);
      }
    }
    for (; e < E; ++e)
      if (row[e] >= thr[e]) take(t, e, row[e]);
  }
  parallel_for(E, 1, [&](Index e, Index) {
    const Index n = count[e];
    if (n < capacity || n > room) return exact(e);
    ColumnEntry<S>* col = cand + e * room;
    if (capacity < n) std::nth_element(col, col + capacity, col + n);
    emit(e, col);
  });
}

}  // namespace moe::kernels
