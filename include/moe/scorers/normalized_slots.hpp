#pragma once
// Normalized-slots scorer of Soft MoE (Puigcerver et al., "From Sparse to Soft Mixtures of
// Experts", ICLR 2024; docs/scorers.md, NormalizedSlotsScorer): one learned vector per slot
// (E experts times p slots each, the columns of phi [D, E p]) and a learned scalar scale; the
// logit of token t and slot s is scale times the inner product of the two L2-normalised vectors,
// each normalised as v / sqrt(|v|^2 + 1e-6). The logits have one column per slot, not per
// expert (logit_columns() = E p); SoftSlotsSelector turns them into a SoftRouting.
#include <cmath>
#include <cstdint>
#include <string_view>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class NormalizedSlotsScorer {
public:
  using scalar_type = S;

  struct Options {
    double scale = 1.0;  // initial scale (the reference initialises it to ones)
    std::uint64_t seed = 0;
  };

  // The epsilon under the square root of both normalisations.
  static constexpr double eps = 1e-6;

  NormalizedSlotsScorer(Index input_dim, Index num_experts, Index slots_per_expert = 1)
      : NormalizedSlotsScorer(input_dim, num_experts, slots_per_expert, Options{}) {}
  NormalizedSlotsScorer(Index input_dim, Index num_experts, Index slots_per_expert, Options opt)
      : experts_(num_experts), slots_per_expert_(slots_per_expert) {
    constexpr std::string_view where = "NormalizedSlotsScorer";
    detail::require<config_error>(input_dim >= 1, where, "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, where, "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(slots_per_expert >= 1, where, "slots_per_expert", slots_per_expert,
                                  "slots_per_expert >= 1");
    detail::require<config_error>(std::isfinite(opt.scale), where, "scale", opt.scale, "scale finite");
    // LeCun normal as the reference's initializer computes it for a [D, E, p] array: fan_in is
    // E times the receptive field D, a normal truncated to two standard deviations, rescaled so
    // that its standard deviation is 1 / sqrt(fan_in). The value hardly matters (phi is
    // normalised) except for the size of the first updates.
    const Index slots = num_experts * slots_per_expert;
    phi_.resize(input_dim, slots);
    const CounterRng rng(opt.seed);
    const double std_dev = 1.0 / std::sqrt(double(input_dim) * double(num_experts)) / 0.87962566103423978;
    for (Index i = 0; i < input_dim; ++i)
      for (Index s = 0; s < slots; ++s) {
        double z = rng.normal(i, s);
        for (std::uint64_t redraw = 1; std::abs(z) > 2.0; ++redraw) z = rng.normal(i, s + redraw * std::uint64_t(slots));
        phi_(i, s) = S(std_dev * z);
      }
    scale_.setConstant(1, 1, S(opt.scale));
    phi_grad_.setZero(input_dim, slots);
    scale_grad_.setZero(1, 1);
  }

  Index input_dim() const { return phi_.rows(); }
  Index num_experts() const { return experts_; }
  Index slots_per_expert() const { return slots_per_expert_; }
  Index num_slots() const { return phi_.cols(); }
  Index logit_columns() const { return phi_.cols(); }
  // Per token; its selector, SoftSlotsSelector, is what mixes the batch.
  constexpr bool causal() const { return true; }

  Matrix<S>& phi() { return phi_; }
  const Matrix<S>& phi() const { return phi_; }
  S& scale() { return scale_(0, 0); }
  S scale() const { return scale_(0, 0); }

  // logits = scale x_hat phi_hat, by row blocks (a thread per block with OpenMP). The scale goes
  // on whichever normalised operand has fewer entries, as the reference does (the value is the
  // same either way, up to rounding).
  void forward(MatrixIn<S> x, const TokenInputs<S>&, MatrixOut<S> logits) {
    const bool scale_tokens = x.size() < phi_.size();
    normalize_phi(scale_tokens ? S(1) : scale());
    fit(x_hat_, x.rows(), x.cols());
    gemms_.reserve();
    parallel_for(x.rows(), row_block, [&](Index t, Index end) {
      auto xh = x_hat_.middleRows(t, end - t);
      normalize_rows(x.middleRows(t, end - t), xh, scale_tokens ? scale() : S(1));
      gemms_.local().run(xh, phi_hat_, logits.middleRows(t, end - t));
    });
  }

  // With u = x_hat, v = phi_hat (columns), c = scale and G = dlogits: logits = c u v^T, so
  // du = c G v, dv = c G^T u (columns), dc = sum(G (u v^T)) = sum_t <u_t, (G v)_t>; then each
  // normalisation u = w r, r = (|w|^2 + eps)^(-1/2): dw = r (du - r^2 <w, du> w).
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const Index T = x.rows(), D = x.cols();
    normalize_phi(S(1));
    fit(x_hat_, T, D);
    fit(dx_hat_, T, D);
    fit(partial_scale_, (T + row_block - 1) / row_block, 1);
    const S c = scale();
    gemms_.reserve();
    parallel_for(T, row_block, [&](Index t, Index end) {
      auto xh = x_hat_.middleRows(t, end - t);
      auto g = dx_hat_.middleRows(t, end - t);  // G v, then dx
      const auto xb = x.middleRows(t, end - t);
      normalize_rows(xb, xh, S(1));
      gemms_.local().template run<false, true>(dlogits.middleRows(t, end - t), phi_hat_, g);
      S acc = 0;
      for (Index i = 0; i < g.rows(); ++i) acc += xh.row(i).dot(g.row(i));
      partial_scale_(t / row_block, 0) = acc;
      auto out = dx.middleRows(t, end - t);
      for (Index i = 0; i < g.rows(); ++i) {
        const S r = inv_norm(xb.row(i).squaredNorm());
        const S inner = xb.row(i).dot(g.row(i));  // <w, G v>; du = c G v
        out.row(i) = (c * r) * (g.row(i) - (r * r * inner) * xb.row(i));
      }
    });
    // Reductions over T: one thread, a fixed order.
    fit(dphi_hat_, D, num_slots());
    gemms_.local().template run<true, false>(x_hat_, dlogits, dphi_hat_, c);  // dv = c u^T G
    for (Index s = 0; s < num_slots(); ++s) {
      const S r = phi_inv_norm_(0, s);
      const S inner = phi_.col(s).dot(dphi_hat_.col(s));
      phi_grad_.col(s) += r * (dphi_hat_.col(s) - (r * r * inner) * phi_.col(s));
    }
    S sum = 0;
    for (Index b = 0; b < partial_scale_.rows(); ++b) sum += partial_scale_(b, 0);
    scale_grad_(0, 0) += sum;
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.phi"), MatrixOut<S>(phi_), MatrixOut<S>(phi_grad_));
    visit(std::string_view("router.scale"), MatrixOut<S>(scale_), MatrixOut<S>(scale_grad_));
  }

private:
  static S inv_norm(S squared) { return S(1) / std::sqrt(squared + S(eps)); }

  // out = in / sqrt(|in|^2 + eps) * factor, row by row.
  static void normalize_rows(MatrixIn<S> in, MatrixOut<S> out, S factor) {
    for (Index i = 0; i < in.rows(); ++i) out.row(i) = in.row(i) * (inv_norm(in.row(i).squaredNorm()) * factor);
  }

  // phi_hat_ = the normalised columns of phi times factor; phi_inv_norm_ their 1 / norms.
  void normalize_phi(S factor) {
    fit(phi_hat_, phi_.rows(), phi_.cols());
    fit(phi_inv_norm_, 1, phi_.cols());
    phi_inv_norm_.row(0) = phi_.colwise().squaredNorm();
    for (Index s = 0; s < phi_.cols(); ++s) phi_inv_norm_(0, s) = inv_norm(phi_inv_norm_(0, s));
    for (Index i = 0; i < phi_.rows(); ++i)
      phi_hat_.row(i) = phi_.row(i).cwiseProduct(phi_inv_norm_.row(0)) * factor;
  }

  Index experts_, slots_per_expert_;
  Matrix<S> phi_, scale_, phi_grad_, scale_grad_;
  Matrix<S> phi_hat_, phi_inv_norm_, x_hat_, dx_hat_, dphi_hat_, partial_scale_;
  static constexpr Index row_block = 4096;
  PerThread<Gemm<S>> gemms_;
};

}  // namespace moe
