#pragma once
// C = alpha * op(A) * op(B) (+ C) on row-major views: a GEBP kernel (Goto & van de Geijn) in
// xsimd. op(A) is packed into micro-panels of mr rows, op(B) into micro-panels of nr columns
// (the transposes are only strides of the packing), and a register-blocked mr x nr micro-kernel
// runs over them: per step of the depth it loads nr values of B and broadcasts mr values of A.
// Fixed summation order, no threads: the same inputs give the same bits on every call.
// scalar::gemm is the twin.
#include <algorithm>
#include <array>
#include <cstddef>
#include <utility>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
// The plain triple loop, each entry summed in double (raw strides: debug builds run it often).
template <bool TransA, bool TransB, class S>
void gemm(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, S alpha, bool accumulate) {
  const Index depth = TransA ? a.rows() : a.cols(), lda = a.outerStride(), ldb = b.outerStride();
  // op(A)[i, p] is a[i, p] or a[p, i]: the step along p and along i
  const Index a_p = TransA ? lda : 1, a_i = TransA ? 1 : lda, b_p = TransB ? 1 : ldb, b_j = TransB ? ldb : 1;
  for (Index i = 0; i < c.rows(); ++i)
    for (Index j = 0; j < c.cols(); ++j) {
      const S* ap = a.data() + i * a_i;
      const S* bp = b.data() + j * b_j;
      double sum = 0;
      for (Index p = 0; p < depth; ++p) sum += double(ap[p * a_p]) * double(bp[p * b_p]);
      S& out = c.data()[i * c.outerStride() + j];
      out = S(double(alpha) * sum + (accumulate ? double(out) : 0.0));
    }
}
}  // namespace scalar

namespace gebp {

template <class S>
using Buffer = std::vector<S, xsimd::aligned_allocator<S, 64>>;

// The tile: nb batches across (nr columns) by mr rows, mr * nb accumulators plus nb loaded B
// batches and one broadcast A value filling the vector registers (AVX-512 float: 14 x 32 with
// 28 accumulators; AVX2 / SSE: 6 x 2 batches with 12).
template <class S>
struct Tile {
  using B = Batch<S>;
#if defined(__AVX512F__) || defined(__aarch64__)
  static constexpr Index registers = 32;
#else
  static constexpr Index registers = 16;
#endif
  static constexpr Index w = Index(B::size);
  static constexpr Index nb = 2;
  static constexpr Index nr = nb * w;
  static constexpr Index mr = (registers - nb - 1) / nb;
};

// Cache blocking. The B micro-panel (kc x nr) is reused by every A micro-panel of the block, so
// it stays in L1: half of a 48 KiB L1d leaves room for the streamed A panel and the C tile,
// giving kc = 192 for AVX-512 float (24 KiB). The packed A block (mc rows, the whole depth when
// it fits) stays in half of a 2 MiB L2, read from memory in whole rows, and is swept once per B
// block; an expert block of <= 224 tokens is one A block, so the weights (B) are read exactly
// once. B is packed in blocks of kc x nc (~170 KiB, in L2) just before use, the next one
// prefetched meanwhile, or packed ahead once (PackedB, packed_b.hpp). Smaller caches only cost
// speed, never correctness.
template <class S>
struct Blocking {
  static constexpr std::size_t l1_bytes = std::size_t(48) << 10, l2_bytes = std::size_t(2) << 20;
  static constexpr Index kc_max = Index(l1_bytes / 2 / (std::size_t(Tile<S>::nr) * sizeof(S)));
  static constexpr Index a_elements = Index(l2_bytes / 2 / sizeof(S));
  static constexpr Index rows_min = 16 * Tile<S>::mr;  // B, packed per A block, amortised over them
  static constexpr Index nc_max = 256;  // 512 measured no better

  // n items in the fewest blocks of at most max, of near-equal size rounded up to a multiple
  // of unit (a short last block would waste a pass over the other operand).
  static Index split(Index n, Index max, Index unit) {
    const Index blocks = (n + max - 1) / max;
    const Index size = (n + blocks - 1) / blocks;
    return std::min(max, (size + unit - 1) / unit * unit);
  }

  // The B block: kc deep, nc wide. Both depend on op(B)'s shape only, never on the number of
  // rows of A, so that B can be packed once for any A (PackedB) with the same depth blocks, hence
  // the same summation order, as a call that packs it itself.
  static Index depth_block(Index depth) { return split(depth, kc_max, 1); }
  static Index column_block(Index n) { return split(n, nc_max, Tile<S>::nr); }
};

// Height of the row panel starting at row i of rows: mr, except that the last two panels share
// what is left past the full ones when that is between mr and 2 mr, so that no panel is much
// shorter than mr (128 rows: 8 x 14 + 8 + 8, not 9 x 14 + 2). A panel of few rows runs few
// independent accumulators, which the FMA latency leaves idle half the time.
template <class S>
MOE_INLINE Index panel_rows(Index rows, Index i) {
  constexpr Index mr = Tile<S>::mr;
  const Index left = rows - i;
  return left >= 2 * mr || left <= mr ? std::min(mr, left) : (left + 1) / 2;
}

// op(A)[i, p] for i < rows, p < depth into depth blocks of kc (each at dst + block * stride),
// each made of row panels (heights from panel_rows; panel from row i at i * kb): panel, then
// depth step, then row (h values per step for a panel of h rows).
template <bool TransA, class S>
void pack_a(const S* a, Index lda, Index rows, Index depth, Index kc, S* dst, Index stride) {
  constexpr Index mr = Tile<S>::mr;
  for (Index p0 = 0, block = 0; p0 < depth; p0 += kc, ++block) {
    const Index kb = std::min(kc, depth - p0);
    S* out = dst + block * stride;
    if constexpr (TransA) {  // op(A)[i, p] = a[p, i]: a row of a is a depth step of every panel
      for (Index p = 0; p < kb; ++p) {
        const S* src = a + (p0 + p) * lda;
        for (Index i = 0, h; i < rows; i += h) {
          h = panel_rows<S>(rows, i);
          for (Index r = 0; r < h; ++r) out[i * kb + p * h + r] = src[i + r];
        }
      }
    } else {  // h rows read side by side, a depth step written at a time
      for (Index i = 0, h; i < rows; i += h) {
        h = panel_rows<S>(rows, i);
        const S* src = a + i * lda + p0;
        S* panel = out + i * kb;
        if (h == mr) {
          for (Index p = 0; p < kb; ++p)
#pragma GCC unroll 16
            for (Index r = 0; r < mr; ++r) panel[p * mr + r] = src[r * lda + p];
        } else {
          for (Index p = 0; p < kb; ++p)
            for (Index r = 0; r < h; ++r) panel[p * h + r] = src[r * lda + p];
        }
      }
    }
  }
}

// op(B)[p, j0 + j] for p < kc, j < cols into micro-panels of nr columns (panel j / nr at
// dst + j * kc, nr values per depth step), zero-padded past cols so that the micro-kernel always
// runs full batches.
template <bool TransB, class S>
void pack_b(const S* b, Index ldb, Index kc, Index cols, S* dst) {
  using B = Batch<S>;
  constexpr Index nr = Tile<S>::nr, w = Tile<S>::w;
  const Index full = cols / nr * nr;
  if constexpr (!TransB) {
    for (Index p = 0; p < kc; ++p) {  // row by row: contiguous reads that the hardware prefetches
      const S* src = b + p * ldb;
      for (Index j = 0; j < full; j += nr)
        for (Index q = 0; q < nr; q += w) B::load_unaligned(src + j + q).store_aligned(dst + j * kc + p * nr + q);
      if (full < cols) {
        S* out = dst + full * kc + p * nr;
        for (Index j = full; j < cols; ++j) out[j - full] = src[j];
        for (Index j = cols - full; j < nr; ++j) out[j] = S(0);
      }
    }
  } else {  // op(B)[p, j] = b[j, p]: each column of a panel is a contiguous row of b
    for (Index j0 = 0; j0 < cols; j0 += nr) {
      S* out = dst + j0 * kc;
      const Index width = std::min(nr, cols - j0);
      for (Index j = 0; j < width; ++j) {
        const S* src = b + (j0 + j) * ldb;
        for (Index p = 0; p < kc; ++p) out[p * nr + j] = src[p];
      }
      for (Index j = width; j < nr; ++j)
        for (Index p = 0; p < kc; ++p) out[p * nr + j] = S(0);
    }
  }
}

// Cache lines to request into L2 while a micro-kernel runs, spread over its steps: a burst of
// prefetches that miss to memory fills the line buffers and stalls on them.
template <class S>
struct Prefetch {
  const S* from = nullptr;
  Index lines = 0;
};

// C[0:R, 0:cols] = alpha * Apanel * Bpanel (+ C unless overwrite): a packed A panel of R <= mr
// rows against one packed B panel, fetching `ahead` meanwhile when Ahead (else the step loop
// carries no prefetch bookkeeping).
template <class S, int R, bool Ahead>
void micro_kernel(Index kc, const S* pa, const S* pb, S* c, Index ldc, Index cols, S alpha, bool overwrite,
                  [[maybe_unused]] Prefetch<S> ahead) {
  using T = Tile<S>;
  using B = typename T::B;
  constexpr Index nb = T::nb, w = T::w, nr = T::nr;
  B acc[R][nb];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (Index q = 0; q < nb; ++q) acc[r][q] = B(S(0));
  }
  [[maybe_unused]] constexpr Index line = Index(64 / sizeof(S));
  // lines * steps done - kc * lines requested: one more line is due each time it reaches kc
  [[maybe_unused]] Index owed = 0;
  for (Index p = 0; p < kc; ++p, pa += R, pb += nr) {
    if constexpr (Ahead)
      for (owed += ahead.lines; owed >= kc; owed -= kc, ahead.from += line) __builtin_prefetch(ahead.from, 0, 2);
    B bv[nb];
#pragma GCC unroll 4
    for (Index q = 0; q < nb; ++q) bv[q] = B::load_aligned(pb + q * w);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const B av(pa[r]);
#pragma GCC unroll 4
      for (Index q = 0; q < nb; ++q) acc[r][q] = xsimd::fma(av, bv[q], acc[r][q]);
    }
  }
  const B al(alpha);
  if (cols == nr) {
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (Index q = 0; q < nb; ++q) {
        S* dst = c + r * ldc + q * w;
        (overwrite ? acc[r][q] * al : xsimd::fma(acc[r][q], al, B::load_unaligned(dst))).store_unaligned(dst);
      }
    return;
  }
  alignas(64) S tile[nr];  // a column edge: through a buffer, one row at a time
  for (int r = 0; r < R; ++r) {
    for (Index q = 0; q < nb; ++q) (acc[r][q] * al).store_aligned(tile + q * w);
    S* dst = c + r * ldc;
    for (Index j = 0; j < cols; ++j) dst[j] = overwrite ? tile[j] : dst[j] + tile[j];
  }
}

// Part `part` of `parts` of rows [0, count) of length len (stride ld), fetched into L2 a whole
// row at a time: the next B block is requested while the current one is multiplied, since the
// weights come from memory exactly once and the packing would otherwise wait on every line.
template <class S>
MOE_INLINE void prefetch_rows(const S* src, Index ld, Index count, Index len, Index part, Index parts) {
  constexpr Index line = Index(64 / sizeof(S));
  const Index end = (part + 1) * count / parts;
  for (Index r = part * count / parts; r < end; ++r)
    for (Index j = 0; j < len; j += line) __builtin_prefetch(src + r * ld + j, 0, 2);
}

template <class S>
using MicroKernel = void (*)(Index, const S*, const S*, S*, Index, Index, S, bool, Prefetch<S>);

// micro_kernel<S, R, Ahead> for R = 1..mr: a short last row panel computes only its rows.
template <class S, bool Ahead, std::size_t... R>
constexpr std::array<MicroKernel<S>, sizeof...(R)> micro_kernels(std::index_sequence<R...>) {
  return {&micro_kernel<S, int(R) + 1, Ahead>...};
}

// The B operand as the caller holds it: each block packed into `buffer` just before use, and the
// source rows of the next block prefetched meanwhile.
template <bool TransB, class S>
class SourceB {
public:
  SourceB(MatrixIn<S> b, S* buffer) : b_(b.data()), ldb_(b.outerStride()), buffer_(buffer) {}

  // The packed block of op(B) from depth p0, column j0: kb deep, cols wide.
  const S* block(Index p0, Index j0, Index kb, Index cols) {
    pack_b<TransB>(at(p0, j0), ldb_, kb, cols, buffer_);
    return buffer_;
  }
  // Part `part` of `parts` of the block at (p0, j0), kb x cols, requested ahead of its packing
  // (whole rows here: nothing left for the micro-kernel).
  static constexpr bool kernel_prefetches = false;
  MOE_INLINE Prefetch<S> prefetch(Index p0, Index j0, Index kb, Index cols, Index part, Index parts) const {
    if constexpr (TransB) prefetch_rows(at(p0, j0), ldb_, cols, kb, part, parts);
    else prefetch_rows(at(p0, j0), ldb_, kb, cols, part, parts);
    return {};
  }

private:
  const S* at(Index p0, Index j0) const { return b_ + (TransB ? j0 * ldb_ + p0 : p0 * ldb_ + j0); }
  const S* b_;
  Index ldb_;
  S* buffer_;
};

}  // namespace gebp

// Packing buffers, grown to the largest shape seen and then reused.
template <class S>
struct GemmBuffers {
  gebp::Buffer<S> a, b;
};

namespace gebp {

// C = alpha op(A) op(B) (+ C when accumulate), op(B) [depth, n] handed out a packed block at a
// time by `source` (SourceB, or PackedSource in packed_b.hpp). Loops, outermost first: depth
// blocks of kd and row blocks of mc (A block packed, in L2), column blocks of nc, depth blocks of
// kc (B block), column micro-panels of nr (B panel, kept in L1), row panels (the micro-kernel).
// The depth blocks of kc run inside the column blocks so that the mc x nc block of C they all
// update stays in L2 between them, rather than the whole of C passing through it each time.
// Each entry of C sums its depth blocks of kc in order, whatever kd is: the kc boundaries
// (Blocking::depth_block) alone fix the result.
template <bool TransA, class S, class Source>
void multiply(MatrixIn<S> a, Index depth, Source& source, MatrixOut<S> c, S alpha, bool accumulate,
              Buffer<S>& a_buffer) {
  using K = Blocking<S>;
  constexpr Index mr = Tile<S>::mr, nr = Tile<S>::nr;
  static constexpr auto kernels =
      micro_kernels<S, Source::kernel_prefetches>(std::make_index_sequence<std::size_t(mr)>{});
  const Index m = c.rows(), n = c.cols();
  // A block: mc rows (as many as fit with the whole depth, at least rows_min), by kd depth: the
  // whole depth, or near-equal runs of whole kc blocks when that would not fit.
  const Index kc = K::depth_block(depth), nc = K::column_block(n);
  const Index mc = K::split(m, std::max(K::rows_min, K::a_elements / depth / mr * mr), mr);
  const Index a_depth = std::max(K::kc_max, K::a_elements / mc);
  const Index k_blocks = (depth + kc - 1) / kc, a_blocks = (depth + a_depth - 1) / a_depth;
  const Index kd = (k_blocks + a_blocks - 1) / a_blocks * kc;
  const Index a_stride = mc * kc;
  if (Index(a_buffer.size()) < kd / kc * a_stride) a_buffer.resize(std::size_t(kd / kc * a_stride));
  const Index lda = a.outerStride(), ldc = c.outerStride();
  for (Index d0 = 0; d0 < depth; d0 += kd) {
    const Index d_end = std::min(depth, d0 + kd);
    for (Index i0 = 0; i0 < m; i0 += mc) {
      const Index rows = std::min(mc, m - i0);
      pack_a<TransA>(a.data() + (TransA ? d0 * lda + i0 : i0 * lda + d0), lda, rows, d_end - d0, kc,
                     a_buffer.data(), a_stride);
      Index panels = 0;  // row panels per B panel
      for (Index i = 0; i < rows; i += panel_rows<S>(rows, i)) ++panels;
      for (Index j0 = 0; j0 < n; j0 += nc) {
        const Index block = std::min(nc, n - j0);
        for (Index p0 = d0; p0 < d_end; p0 += kc) {
          const Index kb = std::min(kc, d_end - p0);
          const S* pa = a_buffer.data() + (p0 - d0) / kc * a_stride;
          const bool overwrite = !accumulate && p0 == 0;
          const S* pb = source.block(p0, j0, kb, block);
          // the next B block: the next depth of these columns, else the first depth of the next ones
          const bool deeper = p0 + kb < d_end;
          const Index nj = deeper ? j0 : j0 + nc, np = deeper ? p0 + kb : d0;
          const Index next_k = nj < n ? std::min(kc, d_end - np) : 0, next_cols = std::min(nc, n - nj);
          const Index calls = (block + nr - 1) / nr * panels;
          Index call = 0;
          for (Index j = 0; j < block; j += nr)
            for (Index i = 0, h; i < rows; i += h, ++call) {
              h = panel_rows<S>(rows, i);
              const Prefetch<S> ahead =
                  next_k > 0 ? source.prefetch(np, nj, next_k, next_cols, call, calls) : Prefetch<S>{};
              kernels[std::size_t(h - 1)](kb, pa + i * kb, pb + j * kb, c.data() + (i0 + i) * ldc + j0 + j, ldc,
                                          std::min(nr, block - j), alpha, overwrite, ahead);
            }
        }
      }
    }
  }
}

}  // namespace gebp

// C = alpha op(A) op(B) (+ C when accumulate), B packed a block at a time into buffers.b.
template <bool TransA, bool TransB, class S>
void gemm(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, S alpha, bool accumulate, GemmBuffers<S>& buffers) {
  using K = gebp::Blocking<S>;
  const Index m = c.rows(), n = c.cols(), depth = TransA ? a.rows() : a.cols();
  MOE_ASSERT((TransA ? a.cols() : a.rows()) == m && (TransB ? b.rows() : b.cols()) == n &&
             (TransB ? b.cols() : b.rows()) == depth);
  if (m == 0 || n == 0) return;
  if (depth == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  const Index b_size = K::depth_block(depth) * K::column_block(n);
  if (Index(buffers.b.size()) < b_size) buffers.b.resize(std::size_t(b_size));
  gebp::SourceB<TransB, S> source(b, buffers.b.data());
  gebp::multiply<TransA>(a, depth, source, c, alpha, accumulate, buffers.a);
}

}  // namespace moe::kernels
