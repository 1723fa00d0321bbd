#pragma once
// C = alpha * op(A) * op(B) (+ C) on row-major views through the library's GEBP kernel
// (kernels/gemm.hpp), with the packing buffers owned here and reused: no allocation after the
// first call of a shape, no threads inside, the same bits on every call.
#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/gemm.hpp"

namespace moe {

template <class S>
class Gemm {
public:
  // op(A) = A^T when TransA (likewise B). The transposes are strides of the packing: no copy.
  template <bool TransA = false, bool TransB = false>
  void run(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, S alpha = S(1), bool accumulate = false) {
    MOE_ASSERT(c.rows() == (TransA ? a.cols() : a.rows()) && c.cols() == (TransB ? b.rows() : b.cols()) &&
               (TransB ? b.cols() : b.rows()) == (TransA ? a.rows() : a.cols()));
    kernels::gemm<TransA, TransB, S>(a, b, c, alpha, accumulate, buffers_);
  }

private:
  kernels::GemmBuffers<S> buffers_;
};

}  // namespace moe
