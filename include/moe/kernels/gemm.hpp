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
// it should stay in L1: half of a 48 KiB L1d leaves room for the streamed A panel and C tile,
// giving kc = 192 for AVX-512 float (24 KiB). The packed A block (mc x kc) is swept once per B
// micro-panel and stays in L2: half of a 2 MiB L2 gives mc ~ 1360 rows, so an expert block of
// ~128 tokens is a single A block and the weights are packed, one micro-panel at a time just
// before use, exactly once. Smaller caches only cost speed, never correctness.
template <class S>
struct Blocking {
  static constexpr std::size_t l1_bytes = std::size_t(48) << 10, l2_bytes = std::size_t(2) << 20;
  static constexpr Index kc_max = Index(l1_bytes / 2 / (std::size_t(Tile<S>::nr) * sizeof(S)));
  static constexpr Index mc_max =
      Index(l2_bytes / 2 / (std::size_t(kc_max) * sizeof(S))) / Tile<S>::mr * Tile<S>::mr;

  // n items in the fewest blocks of at most max, of near-equal size rounded up to a multiple
  // of unit (a short last block would waste a pass over the other operand).
  static Index split(Index n, Index max, Index unit) {
    const Index blocks = (n + max - 1) / max;
    const Index size = (n + blocks - 1) / blocks;
    return std::min(max, (size + unit - 1) / unit * unit);
  }
};

// op(A)[i0 + i, p0 + p] for i < rows, p < kc into panels of mr rows: panel-major, then depth,
// then row (mr values per depth step; a short last panel keeps the stride mr).
template <bool TransA, class S>
void pack_a(const S* a, Index lda, Index rows, Index kc, S* dst) {
  constexpr Index mr = Tile<S>::mr;
  for (Index i = 0; i < rows; i += mr, dst += mr * kc) {
    const Index r_end = std::min(mr, rows - i);
    if constexpr (TransA) {  // op(A)[i, p] = a[p, i]: a depth step is contiguous
      for (Index p = 0; p < kc; ++p) {
        const S* src = a + p * lda + i;
        for (Index r = 0; r < r_end; ++r) dst[p * mr + r] = src[r];
      }
    } else {  // a row is contiguous: mr streams
      for (Index r = 0; r < r_end; ++r) {
        const S* src = a + (i + r) * lda;
        for (Index p = 0; p < kc; ++p) dst[p * mr + r] = src[p];
      }
    }
  }
}

// op(B)[p, j0 + j] for p < kc, j < cols (cols <= nr) into one micro-panel: nr values per depth
// step, zero-padded past cols so the micro-kernel always runs full batches.
template <bool TransB, class S>
void pack_b(const S* b, Index ldb, Index kc, Index cols, S* dst) {
  using B = Batch<S>;
  constexpr Index nr = Tile<S>::nr, w = Tile<S>::w;
  if constexpr (!TransB) {
    if (cols == nr) {  // the common case: whole batches of a row
      for (Index p = 0; p < kc; ++p)
        for (Index q = 0; q < nr; q += w) B::load_unaligned(b + p * ldb + q).store_aligned(dst + p * nr + q);
      return;
    }
    for (Index p = 0; p < kc; ++p) {
      for (Index j = 0; j < cols; ++j) dst[p * nr + j] = b[p * ldb + j];
      for (Index j = cols; j < nr; ++j) dst[p * nr + j] = S(0);
    }
  } else {  // op(B)[p, j] = b[j, p]: each column of the panel is a contiguous row of b
    for (Index j = 0; j < cols; ++j) {
      const S* src = b + j * ldb;
      for (Index p = 0; p < kc; ++p) dst[p * nr + j] = src[p];
    }
    for (Index j = cols; j < nr; ++j)
      for (Index p = 0; p < kc; ++p) dst[p * nr + j] = S(0);
  }
}

// C[0:R, 0:cols] = alpha * Apanel * Bpanel (+ C unless overwrite): R <= mr rows of a packed A
// panel (stride mr) against one packed B panel.
template <class S, int R>
void micro_kernel(Index kc, const S* pa, const S* pb, S* c, Index ldc, Index cols, S alpha, bool overwrite) {
  using T = Tile<S>;
  using B = typename T::B;
  constexpr Index nb = T::nb, w = T::w, mr = T::mr, nr = T::nr;
  B acc[R][nb];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (Index q = 0; q < nb; ++q) acc[r][q] = B(S(0));
  for (Index p = 0; p < kc; ++p, pa += mr, pb += nr) {
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

template <class S>
using MicroKernel = void (*)(Index, const S*, const S*, S*, Index, Index, S, bool);

// micro_kernel<S, R> for R = 1..mr: a short last row panel computes only its rows.
template <class S, std::size_t... R>
constexpr std::array<MicroKernel<S>, sizeof...(R)> micro_kernels(std::index_sequence<R...>) {
  return {&micro_kernel<S, int(R) + 1>...};
}

}  // namespace gebp

// Packing buffers, grown to the largest shape seen and then reused.
template <class S>
struct GemmBuffers {
  gebp::Buffer<S> a, b;
};

// C = alpha op(A) op(B) (+ C when accumulate). Loops, outermost first: row blocks of mc (A block
// in L2), depth blocks of kc, column micro-panels of nr (B panel packed, then kept in L1),
// row micro-panels of mr (the micro-kernel).
template <bool TransA, bool TransB, class S>
void gemm(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, S alpha, bool accumulate, GemmBuffers<S>& buffers) {
  using T = gebp::Tile<S>;
  using K = gebp::Blocking<S>;
  constexpr Index mr = T::mr, nr = T::nr;
  static constexpr auto kernels = gebp::micro_kernels<S>(std::make_index_sequence<std::size_t(mr)>{});
  const Index m = c.rows(), n = c.cols(), depth = TransA ? a.rows() : a.cols();
  MOE_ASSERT((TransA ? a.cols() : a.rows()) == m && (TransB ? b.rows() : b.cols()) == n &&
             (TransB ? b.cols() : b.rows()) == depth);
  if (m == 0 || n == 0) return;
  if (depth == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  const Index kc = K::split(depth, K::kc_max, 1), mc = K::split(m, K::mc_max, mr);
  const auto grow = [](gebp::Buffer<S>& buf, Index size) {
    if (Index(buf.size()) < size) buf.resize(std::size_t(size));
  };
  grow(buffers.a, mc * kc);
  grow(buffers.b, kc * nr);
  S* pa = buffers.a.data();
  S* pb = buffers.b.data();
  const Index lda = a.outerStride(), ldb = b.outerStride(), ldc = c.outerStride();
  for (Index i0 = 0; i0 < m; i0 += mc) {
    const Index rows = std::min(mc, m - i0);
    for (Index p0 = 0; p0 < depth; p0 += kc) {
      const Index kb = std::min(kc, depth - p0);
      const bool overwrite = !accumulate && p0 == 0;
      gebp::pack_a<TransA>(a.data() + (TransA ? p0 * lda + i0 : i0 * lda + p0), lda, rows, kb, pa);
      for (Index j0 = 0; j0 < n; j0 += nr) {
        const Index cols = std::min(nr, n - j0);
        gebp::pack_b<TransB>(b.data() + (TransB ? j0 * ldb + p0 : p0 * ldb + j0), ldb, kb, cols, pb);
        for (Index i = 0; i < rows; i += mr) {
          const Index r = std::min(mr, rows - i);
          kernels[std::size_t(r - 1)](kb, pa + i * kb, pb, c.data() + (i0 + i) * ldc + j0, ldc, cols, alpha, overwrite);
        }
      }
    }
  }
}

}  // namespace moe::kernels
