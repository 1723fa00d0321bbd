#pragma once
// E SwiGLU experts y = (silu(x Wg_e) * (x Wu_e)) Wd_e (Shazeer 2020; Mixtral, DeepSeek), one
// GEMM per projection on each expert's contiguous block.
// Inference cache: with grad disabled (MoELayer::set_grad_enabled(false)) or after
// pack_weights(), forward multiplies by a packed copy of the weights (PackedWeights: same bits,
// no packing per call) that takes as much memory again as the weights until
// release_packed_weights(); for_each_parameter marks it stale: forward
// then repacks it when grad is disabled, and otherwise multiplies by the weights themselves.
#include <span>
#include <string_view>
#include <vector>

#include "moe/kernels/simd.hpp"
#include "moe/layer/ffn_experts.hpp"
#include "moe/layer/packed_weights.hpp"

namespace moe {

template <scalar S>
class SwiGLUExperts {
public:
  using scalar_type = S;

  SwiGLUExperts(Index num_experts, Index dim, Index hidden, std::uint64_t seed = 1)
      : experts_(num_experts), dim_(dim), hidden_(hidden), packed_(num_experts, 3) {
    detail::check_expert_dims("SwiGLUExperts", num_experts, dim, hidden);
    wg_.resize(num_experts * dim, hidden);
    wu_.resize(num_experts * dim, hidden);
    wd_.resize(num_experts * hidden, dim);
    detail::init_normal(wg_, dim, seed, 1);
    detail::init_normal(wu_, dim, seed, 2);
    detail::init_normal(wd_, hidden, seed, 3);
    wg_grad_.setZero(wg_.rows(), wg_.cols());
    wu_grad_.setZero(wu_.rows(), wu_.cols());
    wd_grad_.setZero(wd_.rows(), wd_.cols());
  }

  Index num_experts() const { return experts_; }
  Index input_dim() const { return dim_; }
  Index output_dim() const { return dim_; }
  constexpr bool causal() const { return true; }  // each row is processed alone
  Index hidden_dim() const { return hidden_; }

  // Whether a forward is followed by backward (MoELayer::set_grad_enabled calls this): when
  // not, forward packs the weights it uses into the inference cache.
  void set_grad_enabled(bool enabled) { packed_.set_automatic(!enabled); }

  // Packs every expert's weights now (the inference cache), for forwards until they may change.
  void pack_weights() {
    parallel_for(experts_, 1, [&](Index e, Index) { pack(e); });
  }
  // Frees the packed copy (forward packs again if grad is disabled).
  void release_packed_weights() { packed_.release(); }
  // Whether every expert's packed copy is current.
  bool weights_packed() const { return packed_.all_current(); }

  void forward(MatrixIn<S> x, std::span<const Index> offsets, MatrixOut<S> y) {
    offsets_.assign(offsets.begin(), offsets.end());
    fit_rows(g_, x.rows(), hidden_);
    fit_rows(u_, x.rows(), hidden_);
    fit_rows(h_, x.rows(), hidden_);
    gemms_.reserve();
    parallel_for(experts_, 1, [&](Index e, Index) {  // one expert per chunk: a thread owns its GEMMs
      auto& gemm_ = gemms_.local();
      const Index lo = offsets[e], n = offsets[e + 1] - lo;
      if (n == 0) return;
      if (packed_.wanted(e)) pack(e);
      gemm_.run(x.middleRows(lo, n), in_block(wg_, e), packed_.get(e, 0), g_.middleRows(lo, n));
      gemm_.run(x.middleRows(lo, n), in_block(wu_, e), packed_.get(e, 1), u_.middleRows(lo, n));
      for (Index i = lo; i < lo + n; ++i) silu_times(g_.row(i).data(), u_.row(i).data(), h_.row(i).data(), hidden_);
      gemm_.run(h_.middleRows(lo, n), out_block(wd_, e), packed_.get(e, 2), y.middleRows(lo, n));
    });
  }

  void backward(MatrixIn<S> x, MatrixIn<S> dy, MatrixOut<S> dx) {
    fit_rows(dg_, x.rows(), hidden_);
    fit_rows(du_, x.rows(), hidden_);
    gemms_.reserve();
    parallel_for(experts_, 1, [&](Index e, Index) {
      auto& gemm_ = gemms_.local();
      const Index lo = offsets_[e], n = offsets_[e + 1] - lo;
      if (n == 0) return;
      auto dh = dg_.middleRows(lo, n);  // holds dh, then dg in place
      auto du = du_.middleRows(lo, n);
      gemm_.template run<true, false>(h_.middleRows(lo, n), dy.middleRows(lo, n),
                                      out_block(wd_grad_, e), S(1), true);
      gemm_.template run<false, true>(dy.middleRows(lo, n), out_block(wd_, e), dh);
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < hidden_; ++j) {
          const S g = g_(lo + i, j), sig = detail::sigmoid(g);
          du(i, j) = dh(i, j) * g * sig;                                   // d/du
          dh(i, j) *= u_(lo + i, j) * sig * (S(1) + g * (S(1) - sig));     // d/dg: silu'(g) u
        }
      gemm_.template run<true, false>(x.middleRows(lo, n), dh, in_block(wg_grad_, e), S(1), true);
      gemm_.template run<true, false>(x.middleRows(lo, n), du, in_block(wu_grad_, e), S(1), true);
      gemm_.template run<false, true>(dh, in_block(wg_, e), dx.middleRows(lo, n));
      gemm_.template run<false, true>(du, in_block(wu_, e), dx.middleRows(lo, n), S(1), true);
    });
  }

  // The weights may be written through the views: the packed copy is stale from here on.
  template <class F>
  void for_each_parameter(F&& visit) {
    packed_.invalidate();
    visit(std::string_view("experts.w_gate"), MatrixOut<S>(wg_), MatrixOut<S>(wg_grad_));
    visit(std::string_view("experts.w_up"), MatrixOut<S>(wu_), MatrixOut<S>(wu_grad_));
    visit(std::string_view("experts.w_down"), MatrixOut<S>(wd_), MatrixOut<S>(wd_grad_));
  }

private:
  // h = silu(g) * u = g u / (1 + exp(-g)), vectorised (exp(-g) = inf for very negative g gives 0).
  static void silu_times(const S* g, const S* u, S* h, Index n) {
    using B = kernels::Batch<S>;
    constexpr Index w = Index(B::size);
    Index j = 0;
    for (; j + w <= n; j += w) {
      const B gv = B::load_unaligned(g + j);
      (gv * B::load_unaligned(u + j) / (B(S(1)) + kernels::exp_approx(-gv))).store_unaligned(h + j);
    }
    for (; j < n; ++j) h[j] = g[j] * u[j] / (S(1) + kernels::exp_approx(-g[j]));
  }

  void pack(Index e) {
    packed_.pack(e, 0, in_block(wg_, e));
    packed_.pack(e, 1, in_block(wu_, e));
    packed_.pack(e, 2, out_block(wd_, e));
    packed_.mark_current(e);
  }

  auto in_block(Matrix<S>& m, Index e) { return m.middleRows(e * dim_, dim_); }      // [D, H]
  auto out_block(Matrix<S>& m, Index e) { return m.middleRows(e * hidden_, hidden_); }  // [H, D]

  Index experts_, dim_, hidden_;
  Matrix<S> wg_, wu_, wd_, wg_grad_, wu_grad_, wd_grad_;
  std::vector<Index> offsets_;
  Matrix<S> g_, u_, h_, dg_, du_;
  PerThread<Gemm<S>> gemms_;
  PackedWeights<S> packed_;  // the inference cache
};

}  // namespace moe
