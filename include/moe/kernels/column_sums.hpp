#pragma once
// Column sums of a [T, E] matrix over the rows a mask keeps (all rows without a mask): the mean
// gate score per expert of the balance losses. The SIMD
// kernel keeps one register per column chunk, or, for rows shorter than a register in a
// contiguous matrix, adds whole registers of the flat array and folds the lanes by column at the
// end. The order of the additions is fixed by the shape alone; scalar::column_sums is the twin.
#include <algorithm>
#include <cstdint>
#include <span>

#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void column_sums(MatrixIn<S> m, S* out, std::span<const std::uint8_t> valid = {}) {
  std::fill(out, out + m.cols(), S(0));
  for (Index t = 0; t < m.rows(); ++t)
    if (valid.empty() || valid[std::size_t(t)])
      for (Index e = 0; e < m.cols(); ++e) out[e] += m(t, e);
}
}  // namespace scalar

namespace detail {
template <class B, int Chunks, class S>
void column_sums_registers(MatrixIn<S> m, S* out) {
  constexpr Index w = Index(B::size);
  B acc[Chunks];
  for (int c = 0; c < Chunks; ++c) acc[c] = B(S(0));
  for (Index t = 0; t < m.rows(); ++t)
    for (int c = 0; c < Chunks; ++c) acc[c] += B::load_unaligned(m.row(t).data() + c * w);
  for (int c = 0; c < Chunks; ++c) acc[c].store_unaligned(out + c * w);
}
}  // namespace detail

template <class S>
void column_sums(MatrixIn<S> m, S* out, std::span<const std::uint8_t> valid = {}) {
  using B = Batch<S>;
  constexpr Index w = Index(B::size);
  const Index T = m.rows(), E = m.cols();
  if (E > 0 && E % w == 0 && valid.empty()) {
    switch (E / w) {
      case 1: return detail::column_sums_registers<B, 1>(m, out);
      case 2: return detail::column_sums_registers<B, 2>(m, out);
      case 4: return detail::column_sums_registers<B, 4>(m, out);
      case 8: return detail::column_sums_registers<B, 8>(m, out);
      default: break;
    }
  }
  if (E > 0 && w % E == 0 && m.outerStride() == E && valid.empty()) {  // w / E rows per register
    const S* flat = m.data();
    const Index whole = T * E / w * w;
    B acc[2] = {B(S(0)), B(S(0))};
    Index i = 0;
    for (; i + 2 * w <= whole; i += 2 * w) {
      acc[0] += B::load_unaligned(flat + i);
      acc[1] += B::load_unaligned(flat + i + w);
    }
    if (i < whole) acc[0] += B::load_unaligned(flat + i);
    alignas(64) S lanes[B::size];
    (acc[0] + acc[1]).store_aligned(lanes);
    std::fill(out, out + E, S(0));
    for (Index l = 0; l < w; ++l) out[l % E] += lanes[l];
    for (Index j = whole; j < T * E; ++j) out[j % E] += flat[j];  // the rows after the last register
    return;
  }
  // masked rows or any other width: each row added into the sums in memory (they stay in L1)
  std::fill(out, out + E, S(0));
  for (Index t = 0; t < T; ++t) {
    if (!valid.empty() && !valid[std::size_t(t)]) continue;
    const S* row = m.row(t).data();
    Index e = 0;
    for (; e + w <= E; e += w) (B::load_unaligned(out + e) + B::load_unaligned(row + e)).store_unaligned(out + e);
    for (; e < E; ++e) out[e] += row[e];
  }
}

}  // namespace moe::kernels
