#pragma once
// Importance loss, L = CV²(importance), importance_e = sum over real tokens of G[t, e]
// (docs/losses.md, ImportanceLoss). Shazeer et al. 2017 take G from the routing: the softmax over
// each token's k kept (noisy) logits, 0 elsewhere; V-MoE takes the softmax of the clean logits
// over every expert, so the loss does not see the noise. The CV² is one of the references' three.
#include <algorithm>
#include <cmath>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/losses/cv_squared.hpp"

namespace moe {

enum class ImportanceSource {
  clean_softmax,  // softmax of the clean logits over all experts (V-MoE)
  kept_softmax,   // softmax over the k chosen logits, 0 elsewhere: the pre-capacity combine
                  // weights of Shazeer's KeepTopK gate (tensor2tensor, the PyTorch port)
};

template <scalar S>
class ImportanceLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // logits, noise and routing only

  struct Options {
    ImportanceSource source = ImportanceSource::clean_softmax;
    CVSquared cv = CVSquared::vmoe;
  };

  explicit ImportanceLoss(S coefficient = S(1e-2), Options opt = {}) : coefficient_(coefficient), opt_(opt) {
    detail::require<config_error>(coefficient >= 0, "ImportanceLoss", "coefficient", coefficient, "coefficient >= 0");
  }

  S coefficient() const { return coefficient_; }
  const Options& options() const { return opt_; }

  S forward(const LossInput<S>& in) const {
    importance(in);
    return detail::cv_squared<S>(opt_.cv, importance_);
  }

  // Without noise (evaluation, or a plain scorer) the clean logits are the logits.
  void backward(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S>) const { add_gradient(in, dlogits, dlogits); }

  // With noise: the clean softmax's gradient goes to the clean logits, the kept softmax's to the
  // noisy logits (through which the scorer reaches both of its matrices).
  void backward(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S>, LogitNoiseGradient<S>& dnoise) const {
    add_gradient(in, dlogits, dnoise.clean);
  }

private:
  MatrixIn<S> clean(const LossInput<S>& in) const { return in.noise ? in.noise->clean : in.logits; }

  // G's row of token t into g_ (E entries; only the kept experts for kept_softmax, in choice order).
  void row(const LossInput<S>& in, Index t, Index& count) const {
    const Index E = in.logits.cols();
    if (opt_.source == ImportanceSource::clean_softmax) {
      const MatrixIn<S> logits = clean(in);  // a named view: a row of a temporary one would dangle
      const auto c = logits.row(t);
      const S top = c.maxCoeff();
      S sum = 0;
      for (Index e = 0; e < E; ++e) sum += (g_[std::size_t(e)] = std::exp(c(e) - top));
      for (Index e = 0; e < E; ++e) g_[std::size_t(e)] /= sum;
      count = E;
    } else {
      const auto& r = in.routing;
      const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
      count = hi - lo;
      if (count == 0) return;
      S top = in.logits(t, r.choice_expert[lo]), sum = 0;
      for (Index c = lo; c < hi; ++c) top = std::max(top, in.logits(t, r.choice_expert[c]));
      for (Index c = lo; c < hi; ++c) sum += (g_[std::size_t(c - lo)] = std::exp(in.logits(t, r.choice_expert[c]) - top));
      for (Index c = lo; c < hi; ++c) g_[std::size_t(c - lo)] /= sum;
    }
  }

  Index expert_of(const LossInput<S>& in, Index t, Index i) const {
    return opt_.source == ImportanceSource::clean_softmax ? i : Index(in.routing.choice_expert[in.routing.token_offsets[t] + i]);
  }

  void importance(const LossInput<S>& in) const {
    const Index T = in.logits.rows(), E = in.logits.cols();
    fit(importance_, E);
    fit(g_, E);
    std::fill(importance_.begin(), importance_.end(), S(0));
    for (Index t = 0; t < T; ++t) {
      if (!in.tokens.is_valid(t)) continue;
      Index count = 0;
      row(in, t, count);
      for (Index i = 0; i < count; ++i) importance_[std::size_t(expert_of(in, t, i))] += g_[std::size_t(i)];
    }
  }

  // coefficient * dL/dG through the softmax of each row: d source[t, e] += G (dG - <G, dG>).
  void add_gradient(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S> dclean) const {
    importance(in);
    const Index T = in.logits.rows(), E = in.logits.cols();
    fit(dimportance_, E);
    detail::cv_squared<S>(opt_.cv, importance_, dimportance_);
    MatrixOut<S>& target = opt_.source == ImportanceSource::clean_softmax ? dclean : dlogits;
    for (Index t = 0; t < T; ++t) {
      if (!in.tokens.is_valid(t)) continue;
      Index count = 0;
      row(in, t, count);
      S inner = 0;
      for (Index i = 0; i < count; ++i) inner += g_[std::size_t(i)] * dimportance_[std::size_t(expert_of(in, t, i))];
      for (Index i = 0; i < count; ++i) {
        const Index e = expert_of(in, t, i);
        target(t, e) += coefficient_ * g_[std::size_t(i)] * (dimportance_[std::size_t(e)] - inner);
      }
    }
  }

  S coefficient_;
  Options opt_;
  mutable std::vector<S> importance_, dimportance_, g_;  // scratch
};

}  // namespace moe
