#pragma once
// Mixture-of-Depths' selector (Raposo et al. 2024; docs/selectors.md, DepthTopCSelector): in each
// segment (sequence), the C real tokens with the largest router score run the block, ties to the
// lower token, and their combine weight is the score itself, which puts the router on the
// gradient path: y = x + r f(x) for them and y = x for the rest (the layer's skip path).
// The top-C reads every token of the segment, so a decoder cannot use it; with
// DepthInference::predictor, evaluation instead runs the tokens whose predictor logit is >= 0
// (sigmoid >= 1/2): a per-token, causal decision.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/column_top_c.hpp"
#include "moe/selectors/block_routing.hpp"
#include "moe/selectors/capacity.hpp"

namespace moe {

// How evaluation picks the tokens that run the block (training always takes the top C).
enum class DepthInference {
  top_c,      // the top C of each segment, as in training
  predictor,  // the predictor's logit >= 0: the last logit column (DepthScorer's predictor), or
              // r itself when the scorer has none (the paper's first method: sigmoid(r) is
              // trained by DepthPredictorLoss to predict the top C)
};

// A segment with fewer real tokens than a C given in slots.
enum class ShortSegment {
  run_all,  // every real token of the segment runs the block
  error,    // a value_error naming the segment
};

template <scalar S>
class DepthTopCSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;
  static constexpr bool skip_path = true;  // y = x + sum of the weighted block outputs

  struct Options {
    // C per segment: slots, or the factor (a fraction in (0, 1]) times the segment's real tokens,
    // rounded. The paper's best: 12.5% of the sequence.
    ExpertCapacity capacity{.factor = 0.125, .multiple_of = 1};
    ShortSegment short_segment = ShortSegment::run_all;
    DepthInference inference = DepthInference::top_c;
  };

  explicit DepthTopCSelector(Options opt = {}) : opt_(opt) {
    opt_.capacity.validate("DepthTopCSelector");
    detail::require<config_error>(opt.capacity.slots > 0 || opt.capacity.factor <= 1, "DepthTopCSelector",
                                  "capacity.factor", opt.capacity.factor,
                                  "a fraction of the segment: 0 < factor <= 1 (or C in capacity.slots)");
  }

  const Options& options() const { return opt_; }
  void set_draw_state(const DrawState& state) { training_ = state.training; }
  // Evaluation by the predictor reads each token alone; the top C reads the whole segment.
  bool causal() const { return opt_.inference == DepthInference::predictor; }

  // C of a segment with `real` real tokens (before the short-segment rule).
  Index capacity(Index real) const { return opt_.capacity.slots_for(real, 1, "DepthTopCSelector"); }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    constexpr std::string_view where = "DepthTopCSelector";
    const Index T = in.logits.rows(), cols = in.logits.cols();
    detail::check_shape(where, "scores", in.scores, T, cols);
    detail::check_shape(where, "rank", in.rank, T, cols);
    detail::check_tokens(where, in.tokens, T, cols);
    detail::check_segments(where, in.tokens.segment);
    const Index real = count_valid(in.tokens.valid, T);
    run_.clear();
    Index slots = 0;
    if (!training_ && opt_.inference == DepthInference::predictor) {
      for (Index t = 0; t < T; ++t)
        if (in.tokens.is_valid(t) && in.logits(t, cols - 1) >= S(0)) run_.push_back(std::int32_t(t));
      slots = -1;  // no fixed C
    } else {
      // every segment's C first, so a rejected batch writes nothing; then their top C
      segments_.clear();
      for_each_segment(in.tokens.segment, T, [&](Index b, Index e) { slots += plan_segment(in.tokens, b, e); });
      run_.resize(std::size_t(slots));
      for (const Segment& g : segments_) take_top(in, g);
    }
    fit(weight_, Index(run_.size()));
    for (std::size_t s = 0; s < run_.size(); ++s) weight_[s] = in.scores(run_[s], 0);
    detail::block_routing<S>(r, T, real, run_, weight_, slots);
  }

  void backward(const SelectorInput<S>&, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S>) {
    detail::block_backward<S>(r, dslot_weight, dscores);
  }

private:
  // A segment [begin, end) with its real tokens and the C of them that run the block.
  struct Segment {
    Index begin, end, real, taken, at;  // at: its first slot
  };

  std::span<const std::uint8_t> valid_of(const TokenInputs<S>& tok, Index b, Index e) const {
    return tok.valid.empty() ? tok.valid : tok.valid.subspan(std::size_t(b), std::size_t(e - b));
  }

  // Records segment [b, e) and returns how many of its real tokens run the block.
  Index plan_segment(const TokenInputs<S>& tok, Index b, Index e) {
    const Index n = count_valid(valid_of(tok, b, e), e - b);
    const Index c = capacity(n);
    if (c > n && opt_.short_segment == ShortSegment::error && n > 0)
      detail::fail<value_error>("DepthTopCSelector", "capacity.slots", c,
                                "C <= the real tokens of every segment (ShortSegment::error); the segment of tokens [" +
                                    std::to_string(b) + ", " + std::to_string(e) + ") has " + std::to_string(n));
    const Index at = segments_.empty() ? 0 : segments_.back().at + segments_.back().taken;
    segments_.push_back({b, e, n, std::min(c, n), at});
    return std::min(c, n);
  }

  // The segment's top C by rank, ties to the lower token, in token order at its slots: the
  // per-column top C of expert choice on the segment's one column.
  void take_top(const SelectorInput<S>& in, const Segment& g) {
    const auto out = std::span<std::int32_t>(run_).subspan(std::size_t(g.at), std::size_t(g.taken));
    kernels::top_c_per_column<S>(in.rank.middleRows(g.begin, g.end - g.begin).leftCols(1), g.taken,
                                 valid_of(in.tokens, g.begin, g.end), g.real, out, scratch_, true);
    for (std::int32_t& t : out) t += std::int32_t(g.begin);
  }

  Options opt_;
  bool training_ = true;
  std::vector<std::int32_t> run_;
  std::vector<Segment> segments_;
  kernels::TopCScratch<S> scratch_;
  std::vector<S> weight_;
};

}  // namespace moe
