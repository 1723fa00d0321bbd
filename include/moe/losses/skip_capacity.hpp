#pragma once
// MindSkip's capacity loss (He et al., Router-Tuning; docs/losses.md, SkipCapacityLoss): the share
// of decisions that run the block, cap = mean of m (m in {0, 1} the straight-through decision),
// as L = cap (the original code) or L = max(cap - target, 0) (the maintained code, with its
// target capacity). A decision is a token's, or a segment's (per_segment: each segment counts
// once, the mean of m over its real tokens, which is its one decision under segment pooling).
// Gradient through the straight-through estimator (d m / d score = 1): each real token's score
// gets 1/N (or 1/(N_segments n_segment)); nothing when the target is not exceeded.
#include <algorithm>
#include <cmath>
#include <optional>

#include "moe/concepts.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class SkipCapacityLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // routing only

  struct Options {
    std::optional<double> target{};  // absent: L = cap
    bool per_segment = false;
  };

  // The reference's default weight (gradient_scale) is 0: the loss is reported but trains nothing.
  explicit SkipCapacityLoss(S coefficient = S(0), Options opt = {}) : coefficient_(coefficient), opt_(opt) {
    detail::require<config_error>(coefficient >= 0, "SkipCapacityLoss", "coefficient", coefficient, "coefficient >= 0");
    if (opt.target)
      detail::require<config_error>(std::isfinite(*opt.target) && *opt.target >= 0 && *opt.target <= 1,
                                    "SkipCapacityLoss", "target", *opt.target, "0 <= target <= 1");
  }

  S coefficient() const { return coefficient_; }
  const Options& options() const { return opt_; }

  S forward(const LossInput<S>& in) const {
    const S cap = share(in, nullptr);
    return opt_.target ? std::max(cap - S(*opt_.target), S(0)) : cap;
  }

  void backward(const LossInput<S>& in, MatrixOut<S>, MatrixOut<S> dscores) const {
    if (opt_.target && !(share(in, nullptr) > S(*opt_.target))) return;  // relu'(0) = 0, as torch
    share(in, &dscores);
  }

private:
  // cap; with `d`, also adds coefficient * d cap / d score_t into column 0 of *d.
  S share(const LossInput<S>& in, MatrixOut<S>* d) const {
    const SparseRouting<S>& r = in.routing;
    const auto m = [&](Index t) {
      S sum = 0;
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        if (r.choice_slot[c] >= 0) sum += r.slot_weight[r.choice_slot[c]];
      return sum;
    };
    if (!opt_.per_segment) {
      const S n = S(std::max<Index>(r.num_valid_tokens, 1));
      S sum = 0;
      for (Index t = 0; t < r.num_tokens; ++t)
        if (in.tokens.is_valid(t)) {
          sum += m(t);
          if (d) (*d)(t, 0) += coefficient_ / n;
        }
      return sum / n;
    }
    Index segments = 0;  // those with a real token
    for_each_segment(in.tokens.segment, r.num_tokens, [&](Index b, Index e) {
      for (Index t = b; t < e; ++t)
        if (in.tokens.is_valid(t)) return void(++segments);
    });
    S sum = 0;
    for_each_segment(in.tokens.segment, r.num_tokens, [&](Index b, Index e) {
      Index n = 0;
      S seg = 0;
      for (Index t = b; t < e; ++t)
        if (in.tokens.is_valid(t)) seg += m(t), ++n;
      if (n == 0) return;
      sum += seg / S(n);
      if (d)
        for (Index t = b; t < e; ++t)
          if (in.tokens.is_valid(t)) (*d)(t, 0) += coefficient_ / (S(segments) * S(n));
    });
    return segments == 0 ? S(0) : sum / S(segments);
  }

  S coefficient_;
  Options opt_;
};

}  // namespace moe
