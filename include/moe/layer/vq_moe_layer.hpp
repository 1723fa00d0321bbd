#pragma once
// VQMoE's layer (Do, Pham, Le, Tran, "On the Role of Discrete Representation in Sparse Mixture of
// Experts", TMLR 2025; docs/experts.md, VQMoELayer): two paths over one set of experts, mixed per
// token by a learned two-way softmax,
//   y = a_c y_c + a_d y_d,  [a_c, a_d] = softmax(W_mix x + b_mix),
// - the continuous path y_c: an ordinary MoELayer (any router) over the experts;
// - the discrete path y_d: a VQ router (VQScorer + NearestCodeSelector) sends each token to the
//   expert of its nearest code q, whose input is the straight-through mix of x and q,
//     partial (the reference's quantiser): z = x (1 - r) + sg(q - x) r   (dz/dx = (1 - r) I)
//     classic:                             z = x + sg(q - x)             (value q, dz/dx = I)
//   normalised, run, and normalised again with the same LayerNorm:
//     y_d = LN(f_code(LN(z))).
// The codebook learns from the VQ router's own loss (VQScorer), which Router::aux_loss reports.
//
// The experts serve both paths and keep only their last forward's state for backward, so
// forward runs the discrete path first and the continuous one last; backward runs the continuous
// path's backward first, then replays the experts' forward on the discrete blocks before theirs.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/gemm.hpp"
#include "moe/core/layer_norm.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/dispatch.hpp"
#include "moe/kernels/softmax.hpp"
#include "moe/layer/moe_layer.hpp"

namespace moe {

enum class StraightThrough {
  partial,  // z = x (1 - r) + sg(q - x) r: the reference VectorQuantizer's contrib_rate form
  classic,  // z = x + sg(q - x): the expert sees q, the gradient reaches x unchanged
};

template <class Router, class VQRouter, class Experts>
class VQMoELayer {
public:
  using scalar_type = typename Router::scalar_type;
  using S = scalar_type;

  struct Options {
    StraightThrough form = StraightThrough::partial;
    double contrib_rate = 0.05;   // r (the reference's scripts; its class default is 0.1)
    double layer_norm_eps = 1e-5;
    std::uint64_t seed = 0;       // W_mix, b_mix ~ U(-1/sqrt(D), 1/sqrt(D)) (nn.Linear's default)
  };

  VQMoELayer(Router continuous, VQRouter vq, Experts experts) : VQMoELayer(std::move(continuous), std::move(vq), std::move(experts), Options{}) {}
  VQMoELayer(Router continuous, VQRouter vq, Experts experts, Options opt)
      : continuous_(std::move(continuous), std::move(experts)), vq_(std::move(vq)), opt_(opt) {
    constexpr std::string_view where = "VQMoELayer";
    const Index D = input_dim();
    detail::require<shape_error>(vq_.input_dim() == D, where, "vq.input_dim", vq_.input_dim(),
                                 "the continuous router's input width (" + std::to_string(D) + ")");
    detail::require<shape_error>(vq_.num_experts() == continuous_.experts().num_experts(), where, "vq.num_experts",
                                 vq_.num_experts(),
                                 "the experts' number (" + std::to_string(continuous_.experts().num_experts()) + ")");
    detail::require<shape_error>(output_dim() == D, where, "experts.output_dim", output_dim(),
                                 "equal to the input width (" + std::to_string(D) + "): the discrete path normalises the expert output with the input's LayerNorm");
    detail::require<config_error>(opt.contrib_rate >= 0 && opt.contrib_rate <= 1, where, "contrib_rate", opt.contrib_rate,
                                  "0 <= contrib_rate <= 1");
    detail::require<config_error>(opt.layer_norm_eps > 0, where, "layer_norm_eps", opt.layer_norm_eps, "> 0");
    gamma_.setOnes(1, D);
    beta_.setZero(1, D);
    mix_weight_.resize(2, D);
    mix_bias_.resize(1, 2);
    const CounterRng rng(opt.seed, 0);
    const double bound = 1.0 / std::sqrt(double(D));
    for (Index i = 0; i < 2; ++i) {
      for (Index j = 0; j < D; ++j) mix_weight_(i, j) = S(bound * (2 * rng.uniform(i, j) - 1));
      mix_bias_(0, i) = S(bound * (2 * rng.uniform(2, i) - 1));
    }
    gamma_grad_.setZero(1, D);
    beta_grad_.setZero(1, D);
    mix_weight_grad_.setZero(2, D);
    mix_bias_grad_.setZero(1, 2);
  }

  Index input_dim() const { return continuous_.input_dim(); }
  Index output_dim() const { return continuous_.output_dim(); }
  bool causal() const { return continuous_.causal() && is_causal(vq_); }

  MoELayer<Router, Experts>& continuous() { return continuous_; }
  const MoELayer<Router, Experts>& continuous() const { return continuous_; }
  VQRouter& vq_router() { return vq_; }
  Experts& experts() { return continuous_.experts(); }
  // The last forward: each token's mixing weights [T, 2] (continuous, discrete) and the two paths.
  const Matrix<S>& mix() const { return mix_; }
  const Matrix<S>& continuous_output() const { return yc_; }
  const Matrix<S>& discrete_output() const { return yd_; }
  // Both routers' auxiliary losses: the continuous router's terms and the VQ loss.
  S aux_loss() const { return continuous_.router().aux_loss() + vq_.aux_loss(); }

  void forward(MatrixIn<S> x, MatrixOut<S> y, const TokenInputs<S>& tokens = {}) {
    constexpr std::string_view where = "VQMoELayer::forward";
    detail::check_shape(where, "x", x, x.rows(), input_dim());
    detail::check_shape(where, "y", y, x.rows(), output_dim());
    const Index T = x.rows();
    // The discrete path first (see the header): its experts' state is replayed in backward.
    const auto& rd = vq_.forward(x, tokens);
    const Matrix<S>& codebook = vq_.scorer().forward_codebook();
    const auto codes = vq_.scorer().codes();
    fit(z_, T, input_dim());
    const S r = S(opt_.contrib_rate);
    for (Index t = 0; t < T; ++t) {
      if (codes[std::size_t(t)] < 0) {  // padding: not dispatched
        z_.row(t) = x.row(t);
        continue;
      }
      const auto q = codebook.row(codes[std::size_t(t)]);
      if (opt_.form == StraightThrough::partial) z_.row(t) = x.row(t) * (S(1) - r) + (q - x.row(t)) * r;  // the reference's expression
      else z_.row(t) = x.row(t) + (q - x.row(t));
    }
    detail::layer_norm_rows<S>(z_, zn_, z_inv_std_, opt_.layer_norm_eps);
    affine(zn_, zhat_);
    auto in = fit_rows(in_d_, rd.num_slots(), input_dim());
    kernels::gather_rows<S>(zhat_, rd.slot_token, in);
    auto out = fit_rows(out_d_, rd.num_slots(), output_dim());
    continuous_.experts().forward(in, rd.expert_offsets, out);
    fit(raw_, T, output_dim());
    kernels::combine_rows<S>(rd, {}, out, raw_, false);
    detail::layer_norm_rows<S>(raw_, rn_, r_inv_std_, opt_.layer_norm_eps);
    affine(rn_, yd_);
    for (Index t = 0; t < T; ++t)
      if (!tokens.is_valid(t)) yd_.row(t).setZero();  // padding: no path output
    fit(yc_, T, output_dim());
    continuous_.forward(x, yc_, tokens);
    fit(mix_, T, 2);
    mix_gemm_.template run<false, true>(x, mix_weight_, mix_);
    mix_.rowwise() += mix_bias_.row(0);
    kernels::softmax_rows<S>(mix_, mix_);
    for (Index t = 0; t < T; ++t) y.row(t) = mix_(t, 0) * yc_.row(t) + mix_(t, 1) * yd_.row(t);
    fit(x_, T, input_dim());
    x_ = x;
    tokens_valid_.assign(tokens.valid.begin(), tokens.valid.end());
    tokens_segment_.assign(tokens.segment.begin(), tokens.segment.end());
    forwarded_ = true;
  }

  void backward(MatrixIn<S> dy, MatrixOut<S> dx) {
    constexpr std::string_view where = "VQMoELayer::backward";
    detail::require<config_error>(forwarded_, where, "forward", "not run", "backward needs a forward before it");
    detail::check_shape(where, "dy", dy, x_.rows(), output_dim());
    detail::check_shape(where, "dx", dx, x_.rows(), input_dim());
    const Index T = x_.rows();
    // the mixing softmax: d l_i = a_i (d a_i - <d a, a>), d a_i = <dy, y_i>
    fit(dmix_, T, 2);
    for (Index t = 0; t < T; ++t) {
      const S da0 = dy.row(t).dot(yc_.row(t)), da1 = dy.row(t).dot(yd_.row(t));
      const S inner = mix_(t, 0) * da0 + mix_(t, 1) * da1;
      dmix_(t, 0) = mix_(t, 0) * (da0 - inner);
      dmix_(t, 1) = mix_(t, 1) * (da1 - inner);
    }
    mix_gemm_.template run<true, false>(dmix_, x_, mix_weight_grad_, S(1), true);
    mix_bias_grad_ += dmix_.colwise().sum();
    // the continuous path (its experts' state is the last forward's)
    fit(dpath_, T, output_dim());
    for (Index t = 0; t < T; ++t) dpath_.row(t) = mix_(t, 0) * dy.row(t);
    continuous_.backward(dpath_, dx);
    mix_gemm_.run(dmix_, mix_weight_, dx, S(1), true);
    // the discrete path: the output LayerNorm, the experts (replayed), the input LayerNorm, z
    const TokenInputs<S> tokens{.valid = tokens_valid_, .segment = tokens_segment_};
    for (Index t = 0; t < T; ++t) dpath_.row(t) = (tokens.is_valid(t) ? mix_(t, 1) : S(0)) * dy.row(t);
    affine_backward(dpath_, rn_);
    detail::layer_norm_backward_rows<S>(dpath_, rn_, r_inv_std_);
    const auto& rd = vq_.routing();
    const Index slots = rd.num_slots();
    auto dout = fit_rows(dout_d_, slots, output_dim());
    kernels::gather_rows<S>(dpath_, rd.slot_token, dout);
    continuous_.experts().forward(in_d_.topRows(slots), rd.expert_offsets, out_d_.topRows(slots));  // replay
    auto din = fit_rows(din_d_, slots, input_dim());
    continuous_.experts().backward(in_d_.topRows(slots), dout, din);
    fit(dz_, T, input_dim());
    kernels::combine_rows<S>(rd, {}, din, dz_, false);
    affine_backward(dz_, zn_);
    detail::layer_norm_backward_rows<S>(dz_, zn_, z_inv_std_);
    dx += (opt_.form == StraightThrough::partial ? S(1) - S(opt_.contrib_rate) : S(1)) * dz_;
    // the VQ router: its weights are constant, so only its loss's gradient (commitment) reaches x
    zero_slots_.assign(std::size_t(slots), S(0));
    fit(dx_vq_, T, input_dim());
    vq_.backward(x_, tokens, zero_slots_, dx_vq_);
    dx += dx_vq_;
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    continuous_.for_each_parameter(visit);
    vq_.for_each_parameter(visit);
    visit(std::string_view("vq.layer_norm.weight"), MatrixOut<S>(gamma_), MatrixOut<S>(gamma_grad_));
    visit(std::string_view("vq.layer_norm.bias"), MatrixOut<S>(beta_), MatrixOut<S>(beta_grad_));
    visit(std::string_view("vq.mix.weight"), MatrixOut<S>(mix_weight_), MatrixOut<S>(mix_weight_grad_));
    visit(std::string_view("vq.mix.bias"), MatrixOut<S>(mix_bias_), MatrixOut<S>(mix_bias_grad_));
  }

private:
  // out = n * gamma + beta, row by row
  void affine(const Matrix<S>& n, Matrix<S>& out) const {
    fit(out, n.rows(), n.cols());
    out = (n.array().rowwise() * gamma_.row(0).array()).rowwise() + beta_.row(0).array();
  }
  // d(out) in d -> d(n) in d; adds d gamma = sum d * n, d beta = sum d
  void affine_backward(Matrix<S>& d, const Matrix<S>& n) {
    gamma_grad_ += (d.array() * n.array()).colwise().sum().matrix();
    beta_grad_ += d.colwise().sum();
    d = (d.array().rowwise() * gamma_.row(0).array()).matrix();
  }

  MoELayer<Router, Experts> continuous_;
  VQRouter vq_;
  Options opt_;
  Matrix<S> gamma_, beta_, mix_weight_, mix_bias_;
  Matrix<S> gamma_grad_, beta_grad_, mix_weight_grad_, mix_bias_grad_;
  // the last forward, and scratch
  bool forwarded_ = false;
  Matrix<S> x_, z_, zn_, z_inv_std_, zhat_, in_d_, out_d_, raw_, rn_, r_inv_std_, yd_, yc_, mix_;
  Matrix<S> dmix_, dpath_, dout_d_, din_d_, dz_, dx_vq_;
  std::vector<S> zero_slots_;
  std::vector<std::uint8_t> tokens_valid_;
  std::vector<std::int32_t> tokens_segment_;
  Gemm<S> mix_gemm_;
};

template <class Router, class VQRouter, class Experts>
VQMoELayer(Router, VQRouter, Experts) -> VQMoELayer<Router, VQRouter, Experts>;

}  // namespace moe
