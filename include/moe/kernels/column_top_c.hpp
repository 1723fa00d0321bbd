#pragma once
// Per-column top-C (expert choice, docs/selectors.md, ExpertChoiceSelector): for each expert e,
// the C real tokens with the largest values in column e, in (value desc, token asc) order or in
// token order. Padding rows (valid[t] = 0) are never taken.
//
// A column is never sorted whole. A sample of rows gives each column a threshold a little below
// its estimated C-th value; one row-major pass over the matrix (one SIMD compare per register of
// a row) collects the entries at or above it; only those candidates are ordered (float: a radix
// sort of 64-bit keys, no comparison branches). Every entry at or above the threshold is a
// candidate, so when a column has at least C of them its top C are among them whatever the
// sample said; a column with too few (or too many to hold) is redone from all its entries. The
// result does not depend on the sample.
// scalar::top_c_per_column, a stable sort per column, is the twin.
#include <algorithm>
#include <array>
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

namespace detail {
// A column's candidates. float: one 64-bit key, ascending in (value desc, token asc): the value's
// bits made order-preserving and inverted, above the token's bits, so a radix sort orders them
// without a comparison branch. double (the accuracy path): a ColumnEntry.
template <class S>
struct Candidates;

template <>
struct Candidates<float> {
  using type = std::uint64_t;
  int shift = 0;  // bits of the token
  type make(float v, std::int32_t t) const {
    const auto bits = std::bit_cast<std::uint32_t>(v + 0.0f);  // -0 as +0: they compare equal
    const std::uint32_t ordered = bits & 0x80000000u ? ~bits : bits | 0x80000000u;  // ascending with v
    return (std::uint64_t(~ordered) << shift) | std::uint64_t(t);
  }
  std::int32_t token(type c) const { return std::int32_t(c & ((std::uint64_t(1) << shift) - 1)); }
  // LSD radix sort by bytes, skipping the bytes every key shares (most of a column's value bits).
  void sort(type* keys, Index n, std::vector<type>& tmp) const {
    if (n < 64) return std::sort(keys, keys + n);
    fit(tmp, n);
    const int bytes = (32 + shift + 7) / 8;
    std::array<std::array<Index, 257>, 8> count{};
    for (Index i = 0; i < n; ++i)
      for (int d = 0; d < bytes; ++d) ++count[std::size_t(d)][((keys[i] >> (8 * d)) & 0xff) + 1];
    type *from = keys, *to = tmp.data();
    for (int d = 0; d < bytes; ++d) {
      auto& c = count[std::size_t(d)];
      if (std::any_of(c.begin() + 1, c.end(), [n](Index k) { return k == n; })) continue;  // one byte value
      for (std::size_t b = 1; b < c.size(); ++b) c[b] += c[b - 1];
      for (Index i = 0; i < n; ++i) to[c[(from[i] >> (8 * d)) & 0xff]++] = from[i];
      std::swap(from, to);
    }
    if (from != keys) std::copy_n(from, n, keys);
  }
};

template <>
struct Candidates<double> {
  using type = ColumnEntry<double>;
  int shift = 0;
  type make(double v, std::int32_t t) const { return {v, t}; }
  std::int32_t token(const type& c) const { return c.token; }
  void sort(type* c, Index n, std::vector<type>&) const { std::sort(c, c + n); }
};

// The top C of a column's n candidates (in token order) into out: sorted, or (token_order) by
// finding the C-th and keeping, in their order, those not after it.
template <class S>
void finish_column(const Candidates<S>& cand, typename Candidates<S>::type* c, Index n, Index capacity,
                   bool token_order, std::vector<typename Candidates<S>::type>& tmp, std::int32_t* out) {
  if (!token_order) {
    cand.sort(c, n, tmp);
    for (Index i = 0; i < capacity; ++i) out[i] = cand.token(c[i]);
    return;
  }
  fit(tmp, n);
  std::copy_n(c, n, tmp.begin());
  std::nth_element(tmp.begin(), tmp.begin() + (capacity - 1), tmp.begin() + n);
  const auto last = tmp[std::size_t(capacity - 1)];
  Index k = 0;
  for (Index i = 0; i < n; ++i)
    if (!(last < c[i])) out[k++] = cand.token(c[i]);
  MOE_ASSERT(k == capacity);
}
}  // namespace detail

// Reused across calls: sized once per shape.
template <class S>
struct TopCScratch {
  using Candidate = typename detail::Candidates<S>::type;
  std::vector<S> threshold, sample;
  std::vector<Candidate> candidates;  // `room` entries per column
  std::vector<Index> count;           // candidates seen per column (may pass room)
  struct Column {
    std::vector<Candidate> all, tmp;  // a column redone exactly; sorting scratch
  };
  PerThread<Column> column;
};

// out[e * C + c] as in the twin; `valid_rows` = the number of valid rows (>= C).
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<const std::uint8_t> valid, Index valid_rows,
                      std::span<std::int32_t> out, TopCScratch<S>& scratch, bool token_order = false) {
  const Index T = values.rows(), E = values.cols();
  MOE_ASSERT(capacity <= valid_rows && Index(out.size()) >= capacity * E);
  if (capacity == 0 || E == 0) return;
  const auto is_valid = [&](Index t) { return valid.empty() || valid[std::size_t(t)] != 0; };
  const detail::Candidates<S> cand{.shift = std::max(1, int(std::bit_width(std::uint64_t(T - 1))))};
  scratch.column.reserve();
  const auto finish = [&](Index e, typename TopCScratch<S>::Candidate* c, Index n) {
    detail::finish_column<S>(cand, c, n, capacity, token_order, scratch.column.local().tmp, out.data() + e * capacity);
  };
  const auto exact = [&](Index e) {  // every valid entry of the column
    auto& all = scratch.column.local().all;
    all.clear();
    for (Index t = 0; t < T; ++t)
      if (is_valid(t)) all.push_back(cand.make(values(t, e), std::int32_t(t)));
    finish(e, all.data(), Index(all.size()));
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
  S* const sample = scratch.sample.data();
  for (Index t = stride / 2; t < T && m < sample_rows; t += stride) {
    if (!is_valid(t)) continue;
    const S* row = values.row(t).data();
    for (Index e = 0; e < E; ++e) sample[e * sample_rows + m] = row[e];
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
  // Room for three times the expected candidates: an overfull column is redone exactly.
  const Index room = std::min(valid_rows, 3 * Index(std::ceil(double(valid_rows) * double(rank) / double(m))) + 256);
  fit(scratch.candidates, room * E);
  fit(scratch.count, E);
  std::fill(scratch.count.begin(), scratch.count.end(), Index(0));
  auto* const cands = scratch.candidates.data();
  Index* const count = scratch.count.data();
  const S* const thr = scratch.threshold.data();
  // branch-free: a column past its room keeps overwriting its last entry and is redone anyway
  const auto take = [&](Index t, Index e, S v) {
    cands[e * room + std::min(count[e], room - 1)] = cand.make(v, std::int32_t(t));
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
    finish(e, cands + e * room, n);
  });
}

}  // namespace moe::kernels
