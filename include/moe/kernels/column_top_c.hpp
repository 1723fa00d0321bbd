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
  std::vector<S> column(std::size_t(values.rows()));
  for (Index e = 0; e < values.cols(); ++e) {
    for (Index t = 0; t < values.rows(); ++t) column[std::size_t(t)] = values(t, e);  // plain reads in the sort (debug builds)
    auto col = idx;
    std::stable_sort(col.begin(), col.end(), [&](auto a, auto b) { return column[std::size_t(a)] > column[std::size_t(b)]; });
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
// bits made order-preserving and inverted, above the token, so a radix sort orders them without a
// comparison branch. double (the accuracy path): a ColumnEntry.
template <class S>
struct Candidates;

template <>
struct Candidates<float> {
  using type = std::uint64_t;
  type make(float v, std::int32_t t) const {
    const auto bits = std::bit_cast<std::uint32_t>(v + 0.0f);  // -0 as +0: they compare equal
    const std::uint32_t ordered = bits & 0x80000000u ? ~bits : bits | 0x80000000u;  // ascending with v
    return (std::uint64_t(~ordered) << 32) | std::uint32_t(t);
  }
  std::int32_t token(type c) const { return std::int32_t(std::uint32_t(c)); }
  // LSD radix sort by the value's four bytes only, skipping the bytes every key shares (the
  // exponent, mostly): the sort is stable and the candidates arrive in token order, so equal
  // values stay in token order.
  void sort(type* keys, Index n, std::vector<type>& tmp) const {
    if (n < 64) return std::sort(keys, keys + n);
    fit(tmp, n);
    std::array<std::array<Index, 257>, 4> count{};
    for (Index i = 0; i < n; ++i)
      for (int d = 0; d < 4; ++d) ++count[std::size_t(d)][((keys[i] >> (32 + 8 * d)) & 0xff) + 1];
    type *from = keys, *to = tmp.data();
    for (int d = 0; d < 4; ++d) {
      auto& c = count[std::size_t(d)];
      if (std::any_of(c.begin() + 1, c.end(), [n](Index k) { return k == n; })) continue;  // one byte value
      for (std::size_t b = 1; b < c.size(); ++b) c[b] += c[b - 1];
      for (Index i = 0; i < n; ++i) to[c[(from[i] >> (32 + 8 * d)) & 0xff]++] = from[i];
      std::swap(from, to);
    }
    if (from != keys) std::copy_n(from, n, keys);
  }
  // The key at place `rank` (from 0) of the ascending order of keys[0, n), without sorting: an MSD
  // radix select on the value's bytes, each pass keeping only the keys of the byte that holds the
  // place. The keys left at the end share their value and are still in arrival (token) order,
  // which is their key order, so the place indexes them directly.
  type select(const type* keys, Index n, Index rank, std::vector<type>& tmp) const {
    fit(tmp, n);
    const type* from = keys;
    for (int d = 3; d >= 0; --d) {
      const int shift = 32 + 8 * d;
      std::array<Index, 256> count{};
      for (Index i = 0; i < n; ++i) ++count[(from[i] >> shift) & 0xff];
      std::size_t b = 0;
      while (rank >= count[b]) rank -= count[b++];
      if (count[b] == n) continue;  // every key has this byte
      Index m = 0;
      for (Index i = 0; i < n; ++i) {  // in place after the first pass: m <= i
        tmp[std::size_t(m)] = from[i];
        m += ((from[i] >> shift) & 0xff) == b;
      }
      n = m;
      from = tmp.data();
    }
    return from[rank];
  }
};

template <>
struct Candidates<double> {
  using type = ColumnEntry<double>;
  type make(double v, std::int32_t t) const { return {v, t}; }
  std::int32_t token(const type& c) const { return c.token; }
  void sort(type* c, Index n, std::vector<type>&) const { std::sort(c, c + n); }
  type select(const type* c, Index n, Index rank, std::vector<type>& tmp) const {
    fit(tmp, n);
    std::copy_n(c, n, tmp.begin());
    std::nth_element(tmp.begin(), tmp.begin() + rank, tmp.begin() + n);
    return tmp[std::size_t(rank)];
  }
};

// The top C of a column's n candidates (in token order) into out: sorted, or (token_order) by
// selecting the C-th and keeping, in their order, those not after it.
template <class S>
void finish_column(const Candidates<S>& cand, typename Candidates<S>::type* c, Index n, Index capacity,
                   bool token_order, std::vector<typename Candidates<S>::type>& tmp, std::int32_t* out) {
  if (!token_order) {
    cand.sort(c, n, tmp);
    for (Index i = 0; i < capacity; ++i) out[i] = cand.token(c[i]);
    return;
  }
  const auto last = cand.select(c, n, capacity - 1, tmp);
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
  std::vector<S> threshold, sample;  // per column; bisection scratch
  std::vector<Index> sample_rows;
  std::vector<Candidate> candidates;  // `room` entries per column
  std::vector<Index> count;           // candidates seen per column (may pass room)
  struct Column {
    std::vector<Candidate> all, tmp;  // a column redone exactly; sorting scratch
  };
  PerThread<Column> column;
};

namespace detail {
// The columns' thresholds from the sampled rows: for each column a value x with at least `rank`
// sampled entries >= x, close to the rank-th largest, found by bisection between the column's
// sample minimum and maximum for all columns at once, a row's registers at a time (no sort, no
// transposition: the sampled rows stay in cache across the rounds).
template <class S>
void sample_thresholds_into(MatrixIn<S> values, std::span<const Index> rows, Index rank, S* lo, S* hi, S* mid, S* count) {
  const Index E = values.cols();
  std::fill_n(lo, E, std::numeric_limits<S>::max());
  std::fill_n(hi, E, std::numeric_limits<S>::lowest());
  for (const Index t : rows)
    for (Index e = 0; e < E; ++e) lo[e] = std::min(lo[e], values(t, e)), hi[e] = std::max(hi[e], values(t, e));
  // invariant: at least `rank` sampled entries >= lo, fewer than `rank` >= hi
  for (Index e = 0; e < E; ++e) hi[e] = std::nextafter(hi[e], std::numeric_limits<S>::infinity());
  constexpr Index W = Index(width<S>);
  using B = Batch<S>;
  for (int round = 0; round < 24; ++round) {
    Index e = 0;
    for (; e + W <= E; e += W) (B::load_unaligned(lo + e) + (B::load_unaligned(hi + e) - B::load_unaligned(lo + e)) * B(S(0.5))).store_unaligned(mid + e);
    for (; e < E; ++e) mid[e] = lo[e] + (hi[e] - lo[e]) * S(0.5);
    std::fill_n(count, E, S(0));
    for (const Index t : rows) {
      const S* row = values.row(t).data();
      Index j = 0;
      for (; j + W <= E; j += W) {
        const B c = B::load_unaligned(count + j) + xsimd::select(B::load_unaligned(row + j) >= B::load_unaligned(mid + j), B(S(1)), B(S(0)));
        c.store_unaligned(count + j);
      }
      for (; j < E; ++j) count[j] += row[j] >= mid[j] ? S(1) : S(0);
    }
    for (Index c = 0; c < E; ++c) {
      if (mid[c] <= lo[c] || mid[c] >= hi[c]) continue;  // the interval is one float wide
      (count[c] >= S(rank) ? lo[c] : hi[c]) = mid[c];
    }
  }
}
}  // namespace detail

template <class S>
void sample_thresholds(MatrixIn<S> values, std::span<const Index> rows, Index rank, TopCScratch<S>& scratch) {
  const Index E = values.cols();
  fit(scratch.threshold, E);
  fit(scratch.sample, 3 * E);
  if (rank >= Index(rows.size())) {  // every sampled value: take every entry
    std::fill(scratch.threshold.begin(), scratch.threshold.end(), std::numeric_limits<S>::lowest());
    return;
  }
  S* work = scratch.sample.data();
  detail::sample_thresholds_into<S>(values, rows, rank, scratch.threshold.data(), work, work + E, work + 2 * E);
}

// out[e * C + c] as in the twin; `valid_rows` = the number of valid rows (>= C).
template <class S>
void top_c_per_column(MatrixIn<S> values, Index capacity, std::span<const std::uint8_t> valid, Index valid_rows,
                      std::span<std::int32_t> out, TopCScratch<S>& scratch, bool token_order = false) {
  const Index T = values.rows(), E = values.cols();
  MOE_ASSERT(capacity <= valid_rows && Index(out.size()) >= capacity * E);
  if (capacity == 0 || E == 0) return;
  const auto is_valid = [&](Index t) { return valid.empty() || valid[std::size_t(t)] != 0; };
  const detail::Candidates<S> cand{};
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
  if (valid_rows < 8 * sample_rows || 2 * capacity > valid_rows) {
    parallel_for(E, 1, [&](Index e, Index) { exact(e); });
    return;
  }
  const Index stride = T / sample_rows;
  fit(scratch.sample_rows, sample_rows);
  Index m = 0;  // the sampled valid rows
  for (Index t = stride / 2; t < T && m < sample_rows; t += stride)
    if (is_valid(t)) scratch.sample_rows[std::size_t(m++)] = t;
  // The sample rank of the threshold: the expected share C / n of the m sampled values, plus
  // three standard deviations of that count, so a column falls short only rarely.
  const double share = double(capacity) / double(valid_rows);
  const Index rank = std::min<Index>(m, Index(std::ceil(double(m) * share + 3.0 * std::sqrt(double(m) * share))) + 2);
  sample_thresholds<S>(values, std::span<const Index>(scratch.sample_rows.data(), std::size_t(m)), rank, scratch);
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
