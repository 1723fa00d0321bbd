#pragma once
// Sigmoid gate: scores = 1 / (1 + exp(-logits)), independently per expert (Megatron
// `score_function=sigmoid`, DeepSeek-V3; docs/gates.md).
#include <cmath>
#include <type_traits>

#include "moe/core/math.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe {

template <scalar S>
class SigmoidGate {
public:
  using scalar_type = S;
  constexpr bool causal() const { return true; }  // per entry

  // float: the SIMD exp of the softmax kernel (within 2 float epsilons of std::exp), on every
  // entry of a row including its tail, so a row has the same bits in a block as in the batch.
  void forward(MatrixIn<S> logits, MatrixOut<S> scores) {
    if constexpr (std::is_same_v<S, float>) {
      using B = kernels::Batch<float>;
      constexpr Index w = Index(B::size);
      // contiguous rows run as one: a narrow E (one column for depth routing) has no tail per row
      const bool flat = logits.outerStride() == logits.cols() && scores.outerStride() == scores.cols();
      const Index E = flat ? logits.size() : logits.cols(), rows = flat ? Index(logits.size() > 0) : logits.rows();
      for (Index t = 0; t < rows; ++t) {
        const float* in = logits.data() + t * logits.outerStride();
        float* out = scores.data() + t * scores.outerStride();
        Index e = 0;
        for (; e + w <= E; e += w) sigmoid_lanes(B::load_unaligned(in + e)).store_unaligned(out + e);
        for (; e < E; ++e) out[e] = sigmoid_lanes(B(in[e])).get(0);
      }
    } else {
      scores = logits.unaryExpr([](S l) { return detail::sigmoid(l); });
    }
  }

  // dlogits += dp * p * (1 - p).
  void backward(MatrixIn<S>, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    dlogits.array() += dscores.array() * scores.array() * (S(1) - scores.array());
  }

private:
  // exp of a non-positive argument only, as detail::sigmoid: no overflow for large |x|.
  template <class B>
  static MOE_INLINE B sigmoid_lanes(B x) {
    const B z = kernels::exp_approx<true>(-xsimd::abs(x));
    const B d = B(1.0f) + z;
    return xsimd::select(x >= B(0.0f), B(1.0f) / d, z / d);
  }
};

}  // namespace moe
