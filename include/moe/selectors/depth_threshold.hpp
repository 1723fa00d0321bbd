#pragma once
// MindSkip's selector (He et al., Router-Tuning, EMNLP 2025; docs/selectors.md,
// DepthThresholdSelector): a real token runs the block when its score reaches the threshold,
// m = 1[score >= tau] (tau = 1/2 on a sigmoid: at exactly 1/2 the block runs), and the layer
// computes y = x + m f(x). The decision is a step; backward passes d(m) straight through to the
// score (d m / d score = 1), as the reference's STEFunction does.
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/selectors/block_routing.hpp"

namespace moe {

// Which tokens the block runs on in training (evaluation runs only those with m = 1: the output
// is the same, since the others are multiplied by 0).
enum class SkipForm {
  masked,   // every real token, its output times m: the maintained reference, which always runs
            // the block, so a skipped token's router still gets the task loss's gradient
  skipped,  // only the tokens with m = 1: the original code; skipped tokens' routers then learn
            // from the capacity loss only
};

template <scalar S>
class DepthThresholdSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;
  static constexpr bool skip_path = true;  // y = x + sum of the weighted block outputs

  struct Options {
    double threshold = 0.5;
    SkipForm form = SkipForm::masked;
  };

  explicit DepthThresholdSelector(Options opt = {}) : opt_(opt) {
    detail::require<config_error>(std::isfinite(opt.threshold), "DepthThresholdSelector", "threshold", opt.threshold,
                                  "a finite threshold");
  }

  const Options& options() const { return opt_; }
  void set_draw_state(const DrawState& state) { training_ = state.training; }
  // Each token's decision reads its own score only.
  bool causal() const { return true; }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    constexpr std::string_view where = "DepthThresholdSelector";
    const Index T = in.logits.rows(), cols = in.logits.cols();
    detail::check_shape(where, "scores", in.scores, T, cols);
    detail::check_tokens(where, in.tokens, T, cols);
    const bool all = training_ && opt_.form == SkipForm::masked;
    const S tau = S(opt_.threshold);
    run_.clear();
    weight_.clear();
    for (Index t = 0; t < T; ++t) {
      if (!in.tokens.is_valid(t)) continue;
      const bool m = in.scores(t, 0) >= tau;
      if (!m && !all) continue;
      run_.push_back(std::int32_t(t));
      weight_.push_back(m ? S(1) : S(0));
    }
    detail::block_routing<S>(r, T, count_valid(in.tokens.valid, T), run_, weight_, -1);
  }

  void backward(const SelectorInput<S>&, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S>) {
    detail::block_backward<S>(r, dslot_weight, dscores);
  }

private:
  Options opt_;
  bool training_ = true;
  std::vector<std::int32_t> run_;
  std::vector<S> weight_;
};

}  // namespace moe
