#pragma once
// The B operand of the GEMM kernel packed once, for reuse across calls: every (kc x nc) block of
// op(B) laid out exactly as gebp::pack_b would write it during a call, one after the other in
// the order the kernel uses them (column blocks, then depth blocks within each). A weight matrix
// multiplied by many small row blocks (an expert's tokens) is then read from memory as one
// contiguous stream and never repacked. The blocks depend on op(B)'s shape only
// (Blocking::depth_block, column_block), so one packed copy serves every A, with the same
// summation order, hence the same bits, as gemm on the unpacked B.
#include <algorithm>

#include "moe/kernels/gemm.hpp"

namespace moe::kernels {

template <class S>
class PackedB {
  using K = gebp::Blocking<S>;
  static constexpr Index nr = gebp::Tile<S>::nr;

public:
  // op(B) [depth, n] (b^T when TransB). Storage is reused when it is large enough.
  template <bool TransB = false>
  void pack(MatrixIn<S> b) {
    depth_ = TransB ? b.cols() : b.rows();
    cols_ = TransB ? b.rows() : b.cols();
    kc_ = depth_ > 0 ? K::depth_block(depth_) : 0;
    nc_ = cols_ > 0 ? K::column_block(cols_) : 0;
    const Index size = depth_ * ((cols_ + nr - 1) / nr * nr);
    if (Index(data_.size()) < size) data_.resize(std::size_t(size));
    const Index ldb = b.outerStride();
    for (Index j0 = 0; j0 < cols_; j0 += nc_)
      for (Index p0 = 0; p0 < depth_; p0 += kc_)
        gebp::pack_b<TransB>(b.data() + (TransB ? j0 * ldb + p0 : p0 * ldb + j0), ldb,
                             std::min(kc_, depth_ - p0), std::min(nc_, cols_ - j0),
                             data_.data() + offset(p0, j0));
  }

  // Frees the storage; nothing is packed afterwards.
  void release() {
    data_ = {};
    depth_ = cols_ = kc_ = nc_ = 0;
  }

  Index depth() const { return depth_; }
  Index cols() const { return cols_; }
  // Whether this is a packed op(B) of depth x n in the blocking the kernel uses for it.
  bool fits(Index depth, Index n) const {
    return depth == depth_ && n == cols_ && depth > 0 && n > 0 && kc_ == K::depth_block(depth) &&
           nc_ == K::column_block(n);
  }

  // The block from depth p0 (a multiple of kc), columns from j0 (a multiple of nc): the column
  // blocks before it are nc wide (a multiple of nr) and the whole depth deep.
  const S* block(Index p0, Index j0) const { return data_.data() + offset(p0, j0); }

private:
  Index offset(Index p0, Index j0) const {
    const Index width = (std::min(nc_, cols_ - j0) + nr - 1) / nr * nr;
    return j0 * depth_ + p0 * width;
  }

  Index depth_ = 0, cols_ = 0, kc_ = 0, nc_ = 0;
  gebp::Buffer<S> data_;
};

namespace gebp {

// A PackedB as gebp::multiply's B source: blocks are handed out as they are.
template <class S>
class PackedSource {
public:
  explicit PackedSource(const PackedB<S>& b) : b_(b) {}
  const S* block(Index p0, Index j0, Index, Index) const { return b_.block(p0, j0); }
  // The next block is contiguous: part `part` of `parts` of its lines, left to the micro-kernel
  // to request between its steps.
  static constexpr bool kernel_prefetches = true;
  MOE_INLINE Prefetch<S> prefetch(Index p0, Index j0, Index kb, Index cols, Index part, Index parts) const {
    constexpr Index line = Index(64 / sizeof(S)), nr = Tile<S>::nr;
    const Index lines = kb * ((cols + nr - 1) / nr * nr) / line;
    const Index first = part * lines / parts;
    return {b_.block(p0, j0) + first * line, (part + 1) * lines / parts - first};
  }

private:
  const PackedB<S>& b_;
};

}  // namespace gebp

// C = alpha op(A) B (+ C when accumulate) with B packed ahead: the same bits as gemm on the
// unpacked B, without packing it. b.fits(depth, n) is required.
template <bool TransA, class S>
void gemm(MatrixIn<S> a, const PackedB<S>& b, MatrixOut<S> c, S alpha, bool accumulate, GemmBuffers<S>& buffers) {
  const Index m = c.rows(), n = c.cols(), depth = TransA ? a.rows() : a.cols();
  MOE_ASSERT((TransA ? a.cols() : a.rows()) == m);
  if (m == 0 || n == 0) return;
  if (depth == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  MOE_ASSERT(b.fits(depth, n));
  gebp::PackedSource<S> source(b);
  gebp::multiply<TransA>(a, depth, source, c, alpha, accumulate, buffers.a);
}

}  // namespace moe::kernels
