#pragma once
// C = alpha * op(A) * op(B) (+ C) on row-major views through the library's GEBP kernel
// (kernels/gemm.hpp), with the packing buffers owned here and reused: no allocation after the
// first call of a shape, no threads inside, the same bits on every call.
#include <Eigen/Core>
#include <vector>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/gemm.hpp"
#include "moe/kernels/packed_b.hpp"

namespace moe {

template <class S>
class Gemm {
public:
  // Outputs at most this wide (the logits GEMM, E <= 256) stay on Eigen's GEBP: packing A costs
  // about one cycle per element, a transposing scalar copy, against N / 32 cycles of FMAs, so it
  // does not amortise there, while Eigen packs with SIMD transposes. Measured on this machine,
  // BM_Logits T=16384 D=1024: E=64 68-83 GFLOP/s with the kernel vs 85-102 with Eigen, E=256
  // 96-97 vs 108-119.
  static constexpr Index eigen_max_cols = 256;

  // op(A) = A^T when TransA (likewise B). The transposes are strides of the packing: no copy.
  template <bool TransA = false, bool TransB = false>
  void run(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, S alpha = S(1), bool accumulate = false) {
    const Index m = TransA ? a.cols() : a.rows();
    const Index depth = TransA ? a.rows() : a.cols();
    const Index n = TransB ? b.rows() : b.cols();
    MOE_ASSERT(c.rows() == m && c.cols() == n && (TransB ? b.cols() : b.rows()) == depth);
    if (packs_b(n) || m == 0 || n == 0 || depth == 0) {
      kernels::gemm<TransA, TransB, S>(a, b, c, alpha, accumulate, buffers_);
      return;
    }
    if (!accumulate) c.setZero();
    blocking_.prepare(m, n, depth);
    constexpr int lhs_order = TransA ? Eigen::ColMajor : Eigen::RowMajor;
    constexpr int rhs_order = TransB ? Eigen::ColMajor : Eigen::RowMajor;
    Eigen::internal::general_matrix_matrix_product<Index, S, lhs_order, false, S, rhs_order, false,
                                                   Eigen::RowMajor, 1>::run(
        m, n, depth, a.data(), a.outerStride(), b.data(), b.outerStride(), c.data(), 1,
        c.outerStride(), alpha, blocking_);
  }

  // Whether run packs B for an output n wide (the kernel's path): only then does a packed B help.
  static bool packs_b(Index n) { return n > eigen_max_cols; }

  // The same product with op(B) also given packed (kernels::PackedB, packed with the same
  // TransB): the kernel then skips packing B. Where run would not take the kernel, or `packed`
  // does not hold op(B)'s shape, `b` is used as above: the bits are those of run(a, b, c) always.
  template <bool TransA = false, bool TransB = false>
  void run(MatrixIn<S> a, MatrixIn<S> b, const kernels::PackedB<S>& packed, MatrixOut<S> c, S alpha = S(1),
           bool accumulate = false) {
    const Index depth = TransA ? a.rows() : a.cols(), n = TransB ? b.rows() : b.cols();
    if (packs_b(n) && packed.fits(depth, n) && c.rows() > 0) {
      MOE_ASSERT(c.rows() == (TransA ? a.cols() : a.rows()) && c.cols() == n &&
                 (TransB ? b.cols() : b.rows()) == depth);
      kernels::gemm<TransA, S>(a, packed, c, alpha, accumulate, buffers_);
      return;
    }
    run<TransA, TransB>(a, b, c, alpha, accumulate);
  }

private:
  // Eigen's blocking sizes for the shape, with buffers that only ever grow (Eigen's own product
  // would allocate them on every call past EIGEN_STACK_ALLOCATION_LIMIT).
  class Blocking : public Eigen::internal::level3_blocking<S, S> {
  public:
    void prepare(Index rows, Index cols, Index depth) {
      // A row-major product runs as the transposed column-major one (Eigen does the same).
      this->m_mc = cols;
      this->m_nc = rows;
      this->m_kc = depth;
      Eigen::internal::computeProductBlockingSizes<S, S, 1, Index>(this->m_kc, this->m_mc, this->m_nc, 1);
      grow(a_, this->m_mc * this->m_kc);
      grow(b_, this->m_kc * this->m_nc);
      this->m_blockA = a_.data();
      this->m_blockB = b_.data();
    }

  private:
    using Buffer = std::vector<S, Eigen::aligned_allocator<S>>;
    static void grow(Buffer& buf, Index n) {
      if (static_cast<Index>(buf.size()) < n) buf.resize(static_cast<std::size_t>(n));
    }
    Buffer a_, b_;
  };
  kernels::GemmBuffers<S> buffers_;
  Blocking blocking_;
};

}  // namespace moe
