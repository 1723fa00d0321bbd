#pragma once
// A shared expert scaled per token by a learned sigmoid gate (docs/experts.md,
// SigmoidGatedExpert): out_t = sigmoid(x_t . w) * expert(x_t), Qwen2-MoE's and Qwen3-Next's
// `shared_expert_gate` (one [1, D] linear map without bias). Wraps any one-expert `Expert` and is
// itself an expert, so it is MoELayer's third argument; its gate is visited as `gate.weight`
// (the layer adds `shared.`).
#include <span>
#include <string_view>

#include "moe/core/math.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/layer/ffn_experts.hpp"

namespace moe {

template <class Expert>
class SigmoidGatedExpert {
public:
  using scalar_type = typename Expert::scalar_type;
  using S = scalar_type;

  // The gate starts from N(0, 1/D) (seeded) like the library's expert weights.
  explicit SigmoidGatedExpert(Expert expert, std::uint64_t seed = 7) : expert_(std::move(expert)) {
    detail::require<config_error>(expert_.num_experts() == 1, "SigmoidGatedExpert", "expert.num_experts",
                                  expert_.num_experts(), "one expert (a shared expert)");
    w_.resize(1, expert_.input_dim());
    detail::init_normal(w_, expert_.input_dim(), seed, 1);
    w_grad_.setZero(1, expert_.input_dim());
  }

  Index num_experts() const { return 1; }
  Index input_dim() const { return expert_.input_dim(); }
  Index output_dim() const { return expert_.output_dim(); }
  bool causal() const { return is_causal(expert_); }
  Expert& expert() { return expert_; }
  void set_grad_enabled(bool enabled) {
    if constexpr (requires { expert_.set_grad_enabled(enabled); }) expert_.set_grad_enabled(enabled);
  }

  void forward(MatrixIn<S> x, std::span<const Index> offsets, MatrixOut<S> y) {
    expert_.forward(x, offsets, y);
    fit(gate_, x.rows());
    fit(out_, x.rows(), output_dim());
    for (Index t = 0; t < x.rows(); ++t) {
      gate_[t] = detail::sigmoid(x.row(t).dot(w_.row(0)));
      out_.row(t) = y.row(t);  // the expert's own output, for the gate's gradient
      y.row(t) *= gate_[t];
    }
  }

  // d(expert out)_t = g_t dy_t; d(gate logit)_t = <dy_t, expert out_t> g_t (1 - g_t), which
  // reaches w (summed over tokens in order) and x.
  void backward(MatrixIn<S> x, MatrixIn<S> dy, MatrixOut<S> dx) {
    fit(dout_, x.rows(), output_dim());
    fit(dlogit_, x.rows());
    for (Index t = 0; t < x.rows(); ++t) {
      const S g = gate_[t];
      dout_.row(t) = g * dy.row(t);
      dlogit_[t] = dy.row(t).dot(out_.row(t)) * g * (S(1) - g);
      w_grad_.row(0) += dlogit_[t] * x.row(t);
    }
    expert_.backward(x, dout_, dx);
    for (Index t = 0; t < x.rows(); ++t) dx.row(t) += dlogit_[t] * w_.row(0);
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    expert_.for_each_parameter(visit);
    visit("gate.weight", MatrixOut<S>(w_), MatrixOut<S>(w_grad_));
  }

private:
  Expert expert_;
  Matrix<S> w_, w_grad_;
  std::vector<S> gate_, dlogit_;
  Matrix<S> out_, dout_;
};

}  // namespace moe
