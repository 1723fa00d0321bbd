#pragma once
// E feed-forward experts y = act(x W1_e) W2_e (Switch/GShard FFN, no biases as in T5/Mixtral),
// run as one GEMM per expert on the expert's contiguous block of dispatched rows.
// Inference cache: with grad disabled (MoELayer::set_grad_enabled(false)) or after
// pack_weights(), forward multiplies by a packed copy of the weights (PackedWeights: same bits,
// no packing per call) that takes as much memory again as the weights until
// release_packed_weights(); for_each_parameter and the mutable w1/w2 mark it stale: forward then
// repacks it when grad is disabled, and otherwise multiplies by the weights themselves.
#include <span>
#include <string_view>
#include <vector>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/layer/activation.hpp"
#include "moe/layer/packed_weights.hpp"

namespace moe {

namespace detail {
// Weights drawn from N(0, 1/fan_in) by the counter-based generator: `lane` separates matrices.
template <class S>
void init_normal(Matrix<S>& m, Index fan_in, std::uint64_t seed, std::uint64_t lane) {
  const CounterRng rng(seed, lane);
  const double std_dev = 1.0 / std::sqrt(double(fan_in));
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = S(std_dev * rng.normal(i, j));
}

inline void check_expert_dims(std::string_view where, Index experts, Index dim, Index hidden) {
  require<config_error>(experts >= 1, where, "num_experts", experts, "num_experts >= 1");
  require<config_error>(dim >= 1, where, "dim", dim, "dim >= 1");
  require<config_error>(hidden >= 1, where, "hidden", hidden, "hidden >= 1");
}
}  // namespace detail

template <scalar S>
class FFNExperts {
public:
  using scalar_type = S;

  FFNExperts(Index num_experts, Index dim, Index hidden, Activation act = Activation::gelu,
             std::uint64_t seed = 1)
      : experts_(num_experts), dim_(dim), hidden_(hidden), act_(act), packed_(num_experts, 2) {
    detail::check_expert_dims("FFNExperts", num_experts, dim, hidden);
    w1_.resize(num_experts * dim, hidden);
    w2_.resize(num_experts * hidden, dim);
    detail::init_normal(w1_, dim, seed, 1);
    detail::init_normal(w2_, hidden, seed, 2);
    w1_grad_.setZero(w1_.rows(), w1_.cols());
    w2_grad_.setZero(w2_.rows(), w2_.cols());
  }

  Index num_experts() const { return experts_; }
  Index input_dim() const { return dim_; }
  Index output_dim() const { return dim_; }
  constexpr bool causal() const { return true; }  // each row is processed alone
  Index hidden_dim() const { return hidden_; }
  // Expert e's weights. The mutable views may be written: they mark the packed copy stale.
  auto w1(Index e) {
    packed_.invalidate();
    return w1_block(e);
  }
  auto w2(Index e) {
    packed_.invalidate();
    return w2_block(e);
  }
  auto w1(Index e) const { return w1_.middleRows(e * dim_, dim_); }     // [D, H]
  auto w2(Index e) const { return w2_.middleRows(e * hidden_, hidden_); }  // [H, D]

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
    fit_rows(pre_, x.rows(), hidden_);
    fit_rows(act_out_, x.rows(), hidden_);
    gemms_.reserve();
    parallel_for(experts_, 1, [&](Index e, Index) {  // one expert per chunk: a thread owns its GEMMs
      auto& gemm_ = gemms_.local();
      const Index lo = offsets[e], n = offsets[e + 1] - lo;
      if (n == 0) return;
      if (packed_.wanted(e)) pack(e);
      gemm_.run(x.middleRows(lo, n), w1_block(e), packed_.get(e, 0), pre_.middleRows(lo, n));
      act_out_.middleRows(lo, n) =
          pre_.middleRows(lo, n).unaryExpr([a = act_](S v) { return detail::activate(a, v); });
      gemm_.run(act_out_.middleRows(lo, n), w2_block(e), packed_.get(e, 1), y.middleRows(lo, n));
    });
  }

  void backward(MatrixIn<S> x, MatrixIn<S> dy, MatrixOut<S> dx) {
    fit_rows(dpre_, x.rows(), hidden_);
    gemms_.reserve();
    parallel_for(experts_, 1, [&](Index e, Index) {
      auto& gemm_ = gemms_.local();
      const Index lo = offsets_[e], n = offsets_[e + 1] - lo;
      if (n == 0) return;
      auto dpre = dpre_.middleRows(lo, n);
      gemm_.template run<true, false>(act_out_.middleRows(lo, n), dy.middleRows(lo, n),
                                      w2_grad_.middleRows(e * hidden_, hidden_), S(1), true);
      gemm_.template run<false, true>(dy.middleRows(lo, n), w2_block(e), dpre);
      dpre.array() *= pre_.middleRows(lo, n).unaryExpr([a = act_](S v) {
        return detail::activate_grad(a, v);
      }).array();
      gemm_.template run<true, false>(x.middleRows(lo, n), dpre,
                                      w1_grad_.middleRows(e * dim_, dim_), S(1), true);
      gemm_.template run<false, true>(dpre, w1_block(e), dx.middleRows(lo, n));
    });
  }

  // The weights may be written through the views: the packed copy is stale from here on.
  template <class F>
  void for_each_parameter(F&& visit) {
    packed_.invalidate();
    visit(std::string_view("experts.w1"), MatrixOut<S>(w1_), MatrixOut<S>(w1_grad_));
    visit(std::string_view("experts.w2"), MatrixOut<S>(w2_), MatrixOut<S>(w2_grad_));
  }

private:
  auto w1_block(Index e) { return w1_.middleRows(e * dim_, dim_); }
  auto w2_block(Index e) { return w2_.middleRows(e * hidden_, hidden_); }
  void pack(Index e) {
    packed_.pack(e, 0, w1_block(e));
    packed_.pack(e, 1, w2_block(e));
    packed_.mark_current(e);
  }

  Index experts_, dim_, hidden_;
  Activation act_;
  Matrix<S> w1_, w2_, w1_grad_, w2_grad_;
  // saved by forward for backward, and scratch
  std::vector<Index> offsets_;
  Matrix<S> pre_, act_out_, dpre_;
  PerThread<Gemm<S>> gemms_;
  PackedWeights<S> packed_;  // the inference cache
};

}  // namespace moe
