#pragma once
// Top-p (dynamic k) token-choice selector (docs/selectors.md, TopPSelector): each real token takes
// its experts by descending gate score (ties to the lower expert) until their cumulative score
// passes p, the expert that crosses it included, at least one. Huang et al., "Harder Tasks Need
// More Experts: Dynamic Routing in MoE Models" (ACL 2024) as ZhenweiAn/Dynamic_MoE writes it
// (boundary `exceeds`, raw weights, dropless), and XMoE's threshold gating (Yang et al. 2024) as
// ysngki/XMoE writes it (boundary `reaches`, capacity with rank-major-by-score overflow).
#include <cmath>
#include <cstdint>
#include <span>

#include "moe/concepts.hpp"
#include "moe/core/validate.hpp"
#include "moe/kernels/top_p.hpp"
#include "moe/selectors/capacity.hpp"
#include "moe/selectors/choice_lists.hpp"
#include "moe/selectors/weighting.hpp"

namespace moe {

// Where a token stops taking experts, c_j being the sum of its j best scores.
enum class TopPBoundary {
  exceeds,  // at the first j with c_j > p: an expert is taken iff the mass before it is <= p
            // (Dynamic_MoE's `cumulative_probs > top_p`)
  reaches,  // at the first j with c_j >= p: taken iff the mass before it is < p (XMoE's
            // `cum - g < threshold`; GLIDER / PHATGOOSE top-p)
};

template <scalar S>
class TopPSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  struct Options {
    double p = 0.4;  // Dynamic_MoE's top_p_threshold; XMoE's threshold is 0.9
    TopPBoundary boundary = TopPBoundary::exceeds;
    Weighting weighting = Weighting::raw;  // raw, renormalize_before_drop or renormalize_after_drop
    double scale = 1.0;                    // multiplies every combine weight
    Capacity capacity{};                   // default dropless; C counts the choices (sum of k_t)
    Padding padding = Padding::excluded;
  };

  explicit TopPSelector(Options opt = {}) : opt_(opt) {
    constexpr std::string_view where = "TopPSelector";
    detail::require<config_error>(std::isfinite(opt.p) && opt.p > 0 && opt.p <= 1, where, "p", opt.p, "0 < p <= 1");
    detail::require<config_error>(std::isfinite(opt.scale), where, "scale", opt.scale, "finite");
    detail::check_variable_weighting(where, opt.weighting);
    opt_.capacity.validate(where);
    detail::check_variable_overflow(where, opt_.capacity);
  }

  const Options& options() const { return opt_; }
  // p is a mass of the token's own scores: causal as its capacity is (a token may hold several
  // choices, and how many varies).
  bool causal() const { return opt_.capacity.causal(false, true); }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    detail::check_shape("TopPSelector", "scores", in.scores, in.logits.rows(), in.logits.cols());
    prepare(in.logits, in.tokens);
    select_rows(in, 0);
    finish(in.logits, in.tokens, r);
  }

  // Staged form (moe::staged_selector): validate and size the scratch for up to E picks a token.
  void prepare(MatrixIn<S> logits, const TokenInputs<S>& tokens) {
    detail::check_tokens("TopPSelector", tokens, logits.rows(), logits.cols());
    lists_.prepare(tokens, logits.rows(), logits.cols(), opt_.padding);
  }

  // The picks of the block's tokens, from the scores (the rank is not used: p is a mass of
  // scores), with their pre-drop weights.
  void select_rows(const SelectorInput<S>& block, Index begin) {
    const Index rows = block.scores.rows(), experts = block.scores.cols();
    const S mass = S(opt_.p), scale = S(opt_.scale);
    const bool reaches = opt_.boundary == TopPBoundary::reaches;
    const bool renormalize = opt_.weighting != Weighting::raw;
    Index at = lists_.block_start(begin);
    for (Index i = 0; i < rows; ++i) {
      Index n = 0;
      if (lists_.routes(block.tokens, i)) {
        std::int32_t* expert = lists_.experts(at);
        S* score = lists_.scores(at);
        S* weight = lists_.weights(at);
        n = kernels::top_p_row<S>(block.scores.row(i).data(), experts, mass, reaches, expert, score);
        detail::pre_drop_weights<S>(score, n, renormalize, scale, weight);
      }
      lists_.record(begin + i, at, n);
      at += n;
    }
  }

  void finish(MatrixIn<S> logits, const TokenInputs<S>&, routing_type& r) {
    lists_.finish(logits.rows(), logits.cols(), opt_.capacity, opt_.padding, opt_.weighting, S(opt_.scale),
                  "TopPSelector", r);
  }

  // The selection is discrete: the gradient flows through the weights of the kept choices.
  void backward(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S>) {
    detail::add_weighting_gradient<S>(opt_.weighting, S(opt_.scale), in.scores, r, dslot_weight, dscores);
  }

private:
  Options opt_;
  detail::ChoiceLists<S> lists_;
};

}  // namespace moe
