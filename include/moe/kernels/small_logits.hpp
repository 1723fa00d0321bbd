#pragma once
// Router logits for few experts (E in {4, 8, 16}): out = x W^T with W [E, D] small enough to
// stay in L1. Eigen's GEMM packs and blocks for large outputs; with E <= 16 the work is one
// streaming pass over x, so two tokens at a time keep 2E accumulators in registers and read
// each x element once. scalar::small_logits is the twin.
#include "moe/core/parallel.hpp"
#include "moe/core/tensor.hpp"
#include "moe/kernels/simd.hpp"

namespace moe::kernels {

namespace scalar {
template <class S>
void small_logits(MatrixIn<S> x, MatrixIn<S> w, MatrixOut<S> out) {
  for (Index t = 0; t < x.rows(); ++t)
    for (Index e = 0; e < w.rows(); ++e) {
      S sum = 0;
      for (Index i = 0; i < x.cols(); ++i) sum += x(t, i) * w(e, i);
      out(t, e) = sum;
    }
}
}  // namespace scalar

namespace detail {
// Rows [begin, end) in groups of G tokens: G*E accumulators, each x element and each W element
// loaded once per group.
template <int E, int G, class S>
Index small_logits_group(MatrixIn<S> x, MatrixIn<S> w, MatrixOut<S> out, Index begin, Index end) {
  using B = Batch<S>;
  constexpr Index lanes = Index(B::size);
  const Index d = x.cols(), body = d / lanes * lanes;
  Index t = begin;
  for (; t + G <= end; t += G) {
    B acc[G][E];
    for (int g = 0; g < G; ++g)
      for (int e = 0; e < E; ++e) acc[g][e] = B(S(0));
    for (Index i = 0; i < body; i += lanes) {
      B xs[G];
      for (int g = 0; g < G; ++g) xs[g] = B::load_unaligned(x.row(t + g).data() + i);
      for (int e = 0; e < E; ++e) {
        const B we = B::load_unaligned(w.row(e).data() + i);
        for (int g = 0; g < G; ++g) acc[g][e] = xsimd::fma(xs[g], we, acc[g][e]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int e = 0; e < E; ++e) {
        S sum = xsimd::hadd(acc[g][e]);
        for (Index i = body; i < d; ++i) sum += x(t + g, i) * w(e, i);
        out(t + g, e) = sum;
      }
  }
  return t;
}

template <int E, class S>
void small_logits_rows(MatrixIn<S> x, MatrixIn<S> w, MatrixOut<S> out, Index begin, Index end) {
  constexpr int group = E <= 4 ? 4 : E <= 8 ? 3 : 1;  // G*E + G + 1 registers of 32
  const Index t = small_logits_group<E, group, S>(x, w, out, begin, end);
  small_logits_group<E, 1, S>(x, w, out, t, end);
}
}  // namespace detail

// Whether small_logits handles this many experts.
inline bool small_logits_supported(Index experts) { return experts == 4 || experts == 8 || experts == 16; }

template <class S>
void small_logits(MatrixIn<S> x, MatrixIn<S> w, MatrixOut<S> out) {
  MOE_ASSERT(small_logits_supported(w.rows()) && w.cols() == x.cols());
  parallel_for(x.rows(), 1024, [&](Index begin, Index end) {
    switch (w.rows()) {
      case 4: return detail::small_logits_rows<4, S>(x, w, out, begin, end);
      case 8: return detail::small_logits_rows<8, S>(x, w, out, begin, end);
      default: return detail::small_logits_rows<16, S>(x, w, out, begin, end);
    }
  });
}

}  // namespace moe::kernels
