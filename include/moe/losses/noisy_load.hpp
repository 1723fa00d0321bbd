#pragma once
// Load loss of noisy top-k gating, L = CV²(load), load_e = sum over real tokens of P(t, e), the
// probability that expert e would still be among token t's top k if its noise were drawn again
// (docs/losses.md, NoisyLoadLoss): P = Phi((clean - threshold) / stddev). The threshold is
// Shazeer's (tensor2tensor _prob_in_top_k: the (k+1)-th largest noisy logit for an entry in the
// top k, the k-th for one outside) or V-MoE's (the k-th largest noisy logit of the token, its own
// included). The gradient is exact, through Phi to the clean logits and the deviation and through
// the threshold to the noisy logit that set it: no reference stops the threshold's gradient.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/math.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/top_k.hpp"
#include "moe/kernels/transcendental.hpp"
#include "moe/losses/cv_squared.hpp"

namespace moe {

enum class LoadThreshold {
  shazeer,  // (k+1)-th / k-th largest noisy logit; without noise the load is the count of
            // choices per expert, which has no gradient (tensor2tensor, the PyTorch port)
  vmoe,     // k-th largest noisy logit; without noise the loss is 0 (vmoe has none then)
};

template <scalar S>
class NoisyLoadLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // logits, noise and routing only

  struct Options {
    LoadThreshold threshold = LoadThreshold::shazeer;
    CVSquared cv = CVSquared::tensor2tensor;
  };

  // k: the selector's k (the threshold is the k-th or (k+1)-th value of a row).
  explicit NoisyLoadLoss(Index k, S coefficient = S(1e-2), Options opt = {})
      : k_(k), coefficient_(coefficient), opt_(opt) {
    detail::require<config_error>(k >= 1, "NoisyLoadLoss", "k", k, "k >= 1");
    detail::require<config_error>(coefficient >= 0, "NoisyLoadLoss", "coefficient", coefficient, "coefficient >= 0");
  }

  Index k() const { return k_; }
  S coefficient() const { return coefficient_; }
  const Options& options() const { return opt_; }

  // Called by Router at construction: Shazeer's threshold reads the (k+1)-th value.
  void check_experts(Index experts) const {
    if (opt_.threshold == LoadThreshold::shazeer && k_ >= experts)
      detail::fail<config_error>("NoisyLoadLoss", "k", k_,
                                 "k < number of experts (" + std::to_string(experts) +
                                     ") for Shazeer's load, which compares with the (k+1)-th noisy logit");
    if (k_ > experts)
      detail::fail<config_error>("NoisyLoadLoss", "k", k_, "k <= number of experts (" + std::to_string(experts) + ")");
  }

  S forward(const LossInput<S>& in) const {
    check_experts(in.logits.cols());
    if (!in.noise && opt_.threshold == LoadThreshold::vmoe) return S(0);
    load(in);
    return detail::cv_squared<S>(opt_.cv, load_);
  }

  // Without noise: counts (Shazeer) or nothing (V-MoE), neither with a gradient.
  void backward(const LossInput<S>&, MatrixOut<S>, MatrixOut<S>) const {}

  void backward(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S>, LogitNoiseGradient<S>& dnoise) const {
    load(in);
    const Index E = in.logits.cols();
    fit(dload_, E);
    detail::cv_squared<S>(opt_.cv, load_, dload_);
    const LogitNoise<S>& noise = *in.noise;
    const bool learned = dnoise.stddev.size() > 0;
    for (Index t = 0; t < in.logits.rows(); ++t) {
      if (!in.tokens.is_valid(t)) continue;
      top(in, t);
      for (Index e = 0; e < E; ++e) {
        const auto [threshold, at] = threshold_of(in, t, e);
        const S sd = noise.stddev_at(t, e), z = (noise.clean(t, e) - threshold) / sd;
        // dP/dclean = phi / sd, dP/dthreshold = -phi / sd, dP/dstddev = -phi z / sd
        const S a = coefficient_ * dload_[std::size_t(e)] * detail::normal_pdf(z) / sd;
        dnoise.clean(t, e) += a;
        dlogits(t, at) -= a;
        if (learned) dnoise.stddev(t, e) -= a * z;
      }
    }
  }

private:
  // The top (k+1) (Shazeer) or k (V-MoE) experts of row t of the noisy logits, into top_.
  void top(const LossInput<S>& in, Index t) const {
    const Index m = opt_.threshold == LoadThreshold::shazeer ? k_ + 1 : k_;
    fit(top_, m);
    kernels::top_k_row(in.logits.row(t).data(), in.logits.cols(), m, top_.data());
  }

  // The threshold entry (t, e) must beat, and the expert whose noisy logit it is.
  std::pair<S, Index> threshold_of(const LossInput<S>& in, Index t, Index e) const {
    const auto value = [&](Index i) { return std::pair<S, Index>{in.logits(t, top_[std::size_t(i)]), top_[std::size_t(i)]}; };
    if (opt_.threshold == LoadThreshold::vmoe) return value(k_ - 1);
    const auto in_top = value(k_);  // in the top k: strictly above the (k+1)-th value
    return in.logits(t, e) > in_top.first ? in_top : value(k_ - 1);
  }

  void load(const LossInput<S>& in) const {
    const Index E = in.logits.cols();
    fit(load_, E);
    std::fill(load_.begin(), load_.end(), S(0));
    if (!in.noise) {  // Shazeer without noise: the number of real tokens that chose each expert
      const auto& r = in.routing;
      for (Index t = 0; t < r.num_tokens; ++t)
        if (in.tokens.is_valid(t))
          for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) load_[std::size_t(r.choice_expert[c])] += 1;
      return;
    }
    const LogitNoise<S>& noise = *in.noise;
    fit(z_, E);
    fit(p_, E);
    for (Index t = 0; t < in.logits.rows(); ++t) {
      if (!in.tokens.is_valid(t)) continue;
      top(in, t);
      for (Index e = 0; e < E; ++e) z_[std::size_t(e)] = (noise.clean(t, e) - threshold_of(in, t, e).first) / noise.stddev_at(t, e);
      kernels::normal_cdf(z_.data(), p_.data(), E);  // a row's probabilities on whole SIMD registers
      for (Index e = 0; e < E; ++e) load_[std::size_t(e)] += p_[std::size_t(e)];
    }
  }

  Index k_;
  S coefficient_;
  Options opt_;
  mutable std::vector<S> load_, dload_, z_, p_;  // scratch
  mutable std::vector<std::int32_t> top_;
};

}  // namespace moe
