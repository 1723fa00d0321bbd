#pragma once
// moe::MoELayer<Router, Experts, Shared> (docs/architecture.md, Pipeline): route, dispatch each
// expert's tokens into one contiguous block, one GEMM per block, combine the weighted rows back per
// token; an optional shared expert sees every token. Backward runs the same arrows in reverse.
// A router whose routing is a SoftRouting (Soft MoE) dispatches and combines by two dense GEMMs
// instead: slot inputs = dispatch x, y = combine (expert outputs).
#include <array>
#include <span>
#include <string>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/dispatch.hpp"

namespace moe {

// The default third argument: no shared expert.
struct NoSharedExpert {};

// What a combine weight multiplies: the expert's output (every reference but one) or its input
// (Llama 4: the expert sees x * w and its output is added as it is). The two differ for any
// expert that is not linear.
enum class WeightedAt { output, input };

// The shared expert's diagnosis (none needed when there is none). A namespace-scope function:
// clang cannot call a consteval member from the class's own static member initializers.
template <class Shared>
consteval bool diagnose_shared_expert() {
  if constexpr (std::same_as<Shared, NoSharedExpert>) return true;
  else return diagnose_experts<Shared>();
}

template <class Router, class Experts, class Shared = NoSharedExpert>
class MoELayer {
  // A router that is itself a diagnosing fallback has printed its diagnosis already: nothing to add.
  static constexpr bool router_diagnosed = requires { requires Router::diagnoses_policy_error; };
  static constexpr bool router_ok = requires { typename Router::scalar_type; };
  static_assert(router_ok || router_diagnosed,
                "moe::MoELayer: the first argument must be a router (a moe::Router, or a type with "
                "`scalar_type`, forward, backward and for_each_parameter)");
  // Names the experts' (or shared expert's) first missing member; when both model the concept,
  // what is left is a scalar type that differs from the router's.
  static constexpr bool each_models = diagnose_experts<Experts>() && diagnose_shared_expert<Shared>();
  static_assert(!(router_ok && each_models),
                "moe::MoELayer: the router and the experts must share one scalar_type");

public:
  template <class... Args>
  explicit MoELayer(Args&&...) {}  // absorbs the construction so only the diagnosis is printed
};

template <class Router, class Experts, class Shared>
  requires experts<Experts> && (std::same_as<Shared, NoSharedExpert> || experts<Shared>) &&
           std::same_as<typename Router::scalar_type, typename Experts::scalar_type>
class MoELayer<Router, Experts, Shared> {
public:
  using scalar_type = typename Router::scalar_type;
  using S = scalar_type;
  static constexpr bool has_shared = !std::same_as<Shared, NoSharedExpert>;
  static constexpr bool identity_experts = requires { requires Experts::is_identity; };
  static constexpr bool soft = is_soft_routing<std::remove_cvref_t<decltype(std::declval<Router&>().routing())>>;
  // y = x + the combine: the skip path of depth routing (Router::skip_path).
  static constexpr bool skip_path = requires { requires Router::skip_path; };

  MoELayer(Router router, Experts experts, Shared shared = {})
      : router_(std::move(router)), experts_(std::move(experts)), shared_(std::move(shared)) {
    constexpr std::string_view where = "MoELayer";
    detail::require<shape_error>(experts_.num_experts() == router_.num_experts(), where,
                                 "experts.num_experts", experts_.num_experts(),
                                 "equal to the router's number of experts (" +
                                     std::to_string(router_.num_experts()) + ")");
    detail::require<shape_error>(experts_.input_dim() == router_.input_dim(), where,
                                 "experts.input_dim", experts_.input_dim(),
                                 "equal to the router's input width (" +
                                     std::to_string(router_.input_dim()) + ")");
    if constexpr (skip_path)
      detail::require<shape_error>(experts_.output_dim() == experts_.input_dim(), where, "experts.output_dim",
                                   experts_.output_dim(),
                                   "equal to the input width (" + std::to_string(experts_.input_dim()) +
                                       "): a depth router's skip path adds the input to the output");
    if constexpr (has_shared) {
      detail::require<shape_error>(shared_.num_experts() == 1, where, "shared.num_experts",
                                   shared_.num_experts(), "a shared expert is one expert");
      detail::require<shape_error>(shared_.input_dim() == input_dim() &&
                                       shared_.output_dim() == output_dim(),
                                   where, "shared.input_dim", shared_.input_dim(),
                                   "the shared expert has the routed experts' widths");
    }
  }

  Index input_dim() const { return router_.input_dim(); }
  Index output_dim() const { return experts_.output_dim(); }

  // Whether a token's output depends on no later token of the batch, in evaluation
  // (docs/architecture.md, Causality): the router, the experts and the shared expert all causal.
  bool causal() const {
    if constexpr (has_shared) return is_causal(router_) && is_causal(experts_) && is_causal(shared_);
    else return is_causal(router_) && is_causal(experts_);
  }

  // Whether forward keeps what backward needs (a copy of x and of the token inputs): on by
  // default; off for inference, as under torch.no_grad(), which saves copying x every call.
  // Experts (and shared expert) that have set_grad_enabled are told too: the built-in FFN and
  // SwiGLU experts then keep a packed copy of their weights for forward (PackedWeights).
  void set_grad_enabled(bool enabled) {
    grad_enabled_ = enabled;
    if constexpr (requires { experts_.set_grad_enabled(enabled); }) experts_.set_grad_enabled(enabled);
    if constexpr (has_shared && requires { shared_.set_grad_enabled(enabled); }) shared_.set_grad_enabled(enabled);
  }
  bool grad_enabled() const { return grad_enabled_; }

  // WeightedAt::input: each expert sees its tokens scaled by their combine weights (Llama 4).
  // For sparse routing and experts that compute something (not identity experts or a skip path).
  void set_weighted_at(WeightedAt at) {
    if constexpr (soft || identity_experts || skip_path)
      detail::require<config_error>(at == WeightedAt::output, "MoELayer::set_weighted_at", "at", "input",
                                    "WeightedAt::output for soft routing, identity experts and depth routing");
    weighted_at_ = at;
  }
  WeightedAt weighted_at() const { return weighted_at_; }

  // y [T, D_out] = sum of the weighted expert outputs (+ the shared expert). `tokens` is copied,
  // so its buffers need not outlive the call. On a bad argument nothing is written.
  void forward(MatrixIn<S> x, MatrixOut<S> y, const TokenInputs<S>& tokens = {}) {
    constexpr std::string_view where = "MoELayer::forward";
    detail::check_shape(where, "x", x, x.rows(), input_dim());
    detail::check_shape(where, "y", y, x.rows(), output_dim());
    const auto& r = router_.forward(x, tokens);  // validates tokens and logits
    forwarded_ = true;
    backward_ready_ = grad_enabled_;
    if (grad_enabled_) {
      keep_tokens(tokens);
      fit(x_, x.rows(), x.cols());
      x_ = x;
    }
    if constexpr (soft) {
      forward_soft(r, x, y);
    } else {
      const bool on_input = weighted_at_ == WeightedAt::input;
      const std::span<const S> weight(r.slot_weight);
      auto in = fit_rows(blocks_in_, r.num_slots(), input_dim());
      kernels::gather_rows<S>(x, r.slot_token, in, on_input ? weight : std::span<const S>());
      if constexpr (skip_path) y = x;  // the skip path; the block outputs are added to it
      if constexpr (identity_experts) {
        kernels::combine_rows<S>(r, weight, in, y, skip_path);
      } else {
        auto out = fit_rows(blocks_out_, r.num_slots(), output_dim());
        experts_.forward(in, r.expert_offsets, out);
        kernels::combine_rows<S>(r, on_input ? std::span<const S>() : weight, out, y, skip_path);
      }
    }
    if constexpr (has_shared) {
      fit(shared_out_, x.rows(), output_dim());
      all_tokens_ = {0, x.rows()};
      shared_.forward(x, all_tokens_, shared_out_);
      y += shared_out_;
    }
  }

  // dy [T, D_out] -> dx [T, D]; adds every parameter's gradient. Uses the last forward's state.
  void backward(MatrixIn<S> dy, MatrixOut<S> dx) {
    constexpr std::string_view where = "MoELayer::backward";
    detail::require<config_error>(forwarded_, where, "forward", "not run",
                                  "backward needs a forward before it");
    detail::require<config_error>(backward_ready_, where, "grad_enabled", "false",
                                  "backward follows a forward run with grad enabled");
    detail::check_shape(where, "dy", dy, x_.rows(), output_dim());
    detail::check_shape(where, "dx", dx, x_.rows(), input_dim());
    if constexpr (soft) {
      backward_soft(dy, dx);
    } else {
      const auto& r = router_.routing();
      const Index slots = r.num_slots();
      fit(dslot_weight_, r.num_slots());
      if (weighted_at_ == WeightedAt::input) {
        // d(expert outputs) = dy_t, d(expert inputs) by the experts, d(w_s) = <that, x_t>,
        // dx_t += w_s d(expert input s)
        if constexpr (!identity_experts) {
          auto dout = fit_rows(dblocks_out_, slots, output_dim());
          kernels::gather_rows<S>(dy, r.slot_token, dout);
          auto din = fit_rows(dblocks_in_, slots, input_dim());
          experts_.backward(blocks_in_.topRows(slots), dout, din);
          for (Index s = 0; s < slots; ++s)
            dslot_weight_[s] = r.slot_token[s] < 0 ? S(0) : x_.row(r.slot_token[s]).dot(din.row(s));
          router_.backward(x_, tokens_view(), dslot_weight_, dx);
          kernels::combine_rows<S>(r, r.slot_weight, din, dx, true);
        }
        if constexpr (has_shared) add_shared_backward(dy, dx);
        return;
      }
      // d(expert outputs) = w_s dy_t, d(w_s) = <dy_t, expert output s>
      auto dout = fit_rows(dblocks_out_, slots, output_dim());
      kernels::gather_rows<S>(dy, r.slot_token, dout, r.slot_weight);
      const Matrix<S>& expert_out = identity_experts ? blocks_in_ : blocks_out_;
      for (Index s = 0; s < r.num_slots(); ++s)
        dslot_weight_[s] = r.slot_token[s] < 0 ? S(0) : dy.row(r.slot_token[s]).dot(expert_out.row(s));
      router_.backward(x_, tokens_view(), dslot_weight_, dx);
      if constexpr (identity_experts) {
        kernels::combine_rows<S>(r, {}, dout, dx, true);
      } else {
        auto din = fit_rows(dblocks_in_, slots, input_dim());
        experts_.backward(blocks_in_.topRows(slots), dout, din);
        kernels::combine_rows<S>(r, {}, din, dx, true);
      }
      if constexpr (skip_path) dx += dy;
    }
    if constexpr (has_shared) add_shared_backward(dy, dx);
  }

  // Router, expert and shared-expert parameters with their gradients, for an optimizer.
  template <class F>
  void for_each_parameter(F&& visit) {
    router_.for_each_parameter(visit);
    experts_.for_each_parameter(visit);
    if constexpr (has_shared)
      shared_.for_each_parameter([&](std::string_view name, MatrixOut<S> value, MatrixOut<S> grad) {
        // "shared." + the expert's own name, in a stack buffer: names stay unique, no allocation
        char buf[96] = "shared.";
        const std::size_t n = std::min(name.size(), sizeof(buf) - 8);
        std::copy_n(name.data(), n, buf + 7);
        visit(std::string_view(buf, 7 + n), value, grad);
      });
  }

  Router& router() { return router_; }
  const Router& router() const { return router_; }
  Experts& experts() { return experts_; }
  Shared& shared_expert() requires has_shared { return shared_; }
  const auto& routing() const { return router_.routing(); }

private:
  void add_shared_backward(MatrixIn<S> dy, MatrixOut<S> dx) requires has_shared {
    fit(dshared_in_, x_.rows(), input_dim());
    shared_.backward(x_, dy, dshared_in_);
    dx += dshared_in_;
  }

  // Soft routing: X~ = dispatch x [S, D], the experts on their blocks of p slots, y = combine Y~.
  // Each product by row blocks of its output (a thread per block with OpenMP): the blocks do
  // not depend on the thread count, so neither do the bits.
  template <class R>
  void forward_soft(const R& r, MatrixIn<S> x, MatrixOut<S> y) {
    const Index slots = r.num_slots();
    auto in = fit_rows(blocks_in_, slots, input_dim());
    product<false, false>(r.dispatch, x, in);
    if constexpr (identity_experts) {
      product<false, false>(r.combine, in, y);
    } else {
      auto out = fit_rows(blocks_out_, slots, output_dim());
      experts_.forward(in, r.expert_offsets, out);
      product<false, false>(r.combine, out, y);
    }
  }

  // dcombine = dy Y~^T, dY~ = combine^T dy, dX~ = the experts' backward, ddispatch = dX~ x^T;
  // the router takes both to dx through its two softmaxes and the scorer, then dx += dispatch^T dX~.
  void backward_soft(MatrixIn<S> dy, MatrixOut<S> dx) {
    const auto& r = router_.routing();
    const Index slots = r.num_slots();
    const auto expert_out = (identity_experts ? blocks_in_ : blocks_out_).topRows(slots);
    fit(dcombine_, x_.rows(), slots);
    product<false, true>(dy, expert_out, dcombine_);
    auto dout = fit_rows(dblocks_out_, slots, output_dim());
    product<true, false>(r.combine, dy, dout);
    auto din = fit_rows(dblocks_in_, slots, input_dim());
    if constexpr (identity_experts) din = dout;
    else experts_.backward(blocks_in_.topRows(slots), dout, din);
    fit(ddispatch_, slots, x_.rows());
    product<false, true>(din, x_, ddispatch_);
    router_.backward(x_, tokens_view(), ddispatch_, dcombine_, dx);
    product<true, false>(r.dispatch, din, dx, true);
  }

  // c (+)= op(a) op(b), by blocks of c's rows.
  template <bool TransA, bool TransB>
  void product(MatrixIn<S> a, MatrixIn<S> b, MatrixOut<S> c, bool accumulate = false) {
    gemms_.reserve();
    parallel_for(c.rows(), product_block, [&](Index i, Index end) {
      const MatrixIn<S> ai = [&]() -> MatrixIn<S> {
        if constexpr (TransA) return a.middleCols(i, end - i);
        else return a.middleRows(i, end - i);
      }();
      gemms_.local().template run<TransA, TransB>(ai, b, c.middleRows(i, end - i), S(1), accumulate);
    });
  }

  void keep_tokens(const TokenInputs<S>& t) {
    valid_.assign(t.valid.begin(), t.valid.end());
    segment_.assign(t.segment.begin(), t.segment.end());
    for (std::size_t i = 0; i < draws_.size(); ++i) draws_[i].assign(draw_spans(t)[i].begin(), draw_spans(t)[i].end());
  }
  static std::array<std::span<const S>, 5> draw_spans(const TokenInputs<S>& t) {
    return {t.normal, t.gumbel, t.uniform, t.second_uniform, t.jitter};
  }
  TokenInputs<S> tokens_view() const {
    return {.valid = valid_, .segment = segment_, .normal = draws_[0], .gumbel = draws_[1], .uniform = draws_[2],
            .second_uniform = draws_[3], .jitter = draws_[4]};
  }

  Router router_;
  Experts experts_;
  [[no_unique_address]] Shared shared_;
  // state of the last forward, and scratch
  bool grad_enabled_ = true, forwarded_ = false, backward_ready_ = false;
  WeightedAt weighted_at_ = WeightedAt::output;
  Matrix<S> x_, blocks_in_, blocks_out_, dblocks_out_, dblocks_in_, shared_out_, dshared_in_;
  std::vector<S> dslot_weight_;
  Matrix<S> dcombine_, ddispatch_;  // soft routing: d(loss)/d(combine), d(loss)/d(dispatch)
  PerThread<Gemm<S>> gemms_;
  static constexpr Index product_block = 256;
  std::array<std::vector<S>, 5> draws_;  // the caller's draws (TokenInputs), for backward
  std::vector<std::uint8_t> valid_;
  std::vector<std::int32_t> segment_;
  std::array<Index, 2> all_tokens_{};
};

template <class Router, class Experts>
MoELayer(Router, Experts) -> MoELayer<Router, Experts>;
template <class Router, class Experts, class Shared>
MoELayer(Router, Experts, Shared) -> MoELayer<Router, Experts, Shared>;

}  // namespace moe
