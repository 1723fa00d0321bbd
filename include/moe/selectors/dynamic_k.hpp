#pragma once
// Per-token k selector (docs/selectors.md, DynamicKSelector): token t takes its k_t best experts
// (top-k, ties to the lower expert), k_t from a caller-supplied importance I (TokenInputs::
// importance): k_t = clamp(ceil(k_max I_t / max_j I_j), 1, k_max), the maximum over the real
// tokens. DA-MoE (Aghdam, Jin, Wu 2024, "DA-MoE: Towards Dynamic Expert Allocation for
// Mixture-of-Experts Models") derives I from attention; it released no code, so the mapping is
// the library's, documented, and the importance is the caller's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/validate.hpp"
#include "moe/kernels/top_k.hpp"
#include "moe/selectors/capacity.hpp"
#include "moe/selectors/choice_lists.hpp"
#include "moe/selectors/weighting.hpp"

namespace moe {

template <scalar S>
class DynamicKSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  struct Options {
    Weighting weighting = Weighting::raw;  // raw, renormalize_before_drop or renormalize_after_drop
    double scale = 1.0;
    Capacity capacity{};  // default dropless; C counts the choices (sum of k_t)
    Padding padding = Padding::excluded;
  };

  explicit DynamicKSelector(Index k_max, Options opt = {}) : k_max_(k_max), opt_(opt) {
    constexpr std::string_view where = "DynamicKSelector";
    detail::require<config_error>(k_max >= 1, where, "k_max", k_max, "k_max >= 1");
    detail::require<config_error>(std::isfinite(opt.scale), where, "scale", opt.scale, "finite");
    detail::check_variable_weighting(where, opt.weighting);
    opt_.capacity.validate(where);
    detail::check_variable_overflow(where, opt_.capacity);
  }

  Index k_max() const { return k_max_; }
  const Options& options() const { return opt_; }
  // Not causal unless k_max = 1 (then k_t = 1 and its capacity decides): k_t divides the token's
  // importance by the largest of the batch, which a later token can raise.
  bool causal() const { return k_max_ == 1 && opt_.capacity.causal(true); }

  void check_experts(Index experts) const {
    if (k_max_ > experts)
      detail::fail<config_error>("DynamicKSelector", "k_max", k_max_,
                                 "k_max <= number of experts (" + std::to_string(experts) + ")");
  }

  // k_t of a token of importance `importance` when the largest importance is `largest`.
  static Index k_of(S importance, S largest, Index k_max) {
    if (!(largest > 0)) return 1;
    const double k = std::ceil(double(k_max) * double(importance) / double(largest));
    return std::clamp(Index(std::min(k, double(k_max))), Index(1), k_max);
  }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    detail::check_shape("DynamicKSelector", "scores", in.scores, in.logits.rows(), in.logits.cols());
    detail::check_shape("DynamicKSelector", "rank", in.rank, in.logits.rows(), in.logits.cols());
    prepare(in.logits, in.tokens);
    select_rows(in, 0);
    finish(in.logits, in.tokens, r);
  }

  // Staged form: validates (the importance is required), then the largest importance of the
  // real tokens, which every k_t needs before any block runs.
  void prepare(MatrixIn<S> logits, const TokenInputs<S>& tokens) {
    const Index T = logits.rows();
    check_experts(logits.cols());
    detail::check_tokens("DynamicKSelector", tokens, T, logits.cols());
    if (T > 0 && Index(tokens.importance.size()) != T)
      detail::fail<shape_error>("DynamicKSelector", "tokens.importance", tokens.importance.size(),
                                "length " + std::to_string(T) + " (one importance per token: the selector needs it)");
    largest_ = 0;
    for (Index t = 0; t < T; ++t)
      if (tokens.is_valid(t)) largest_ = std::max(largest_, tokens.importance[std::size_t(t)]);
    lists_.prepare(tokens, T, k_max_, opt_.padding);
  }

  // Each routed token's top-k_t by rank, with its scores and pre-drop weights.
  void select_rows(const SelectorInput<S>& block, Index begin) {
    const Index rows = block.scores.rows(), experts = block.scores.cols();
    const S scale = S(opt_.scale);
    const bool renormalize = opt_.weighting != Weighting::raw;
    Index at = lists_.block_start(begin);
    for (Index i = 0; i < rows; ++i) {
      Index n = 0;
      if (lists_.routes(block.tokens, i)) {
        n = k_of(block.tokens.importance[std::size_t(i)], largest_, k_max_);
        std::int32_t* expert = lists_.experts(at);
        S* score = lists_.scores(at);
        S* weight = lists_.weights(at);
        kernels::top_k_row(block.rank.row(i).data(), experts, n, expert);
        for (Index j = 0; j < n; ++j) score[j] = block.scores(i, expert[j]);
        detail::pre_drop_weights<S>(score, n, renormalize, scale, weight);
      }
      lists_.record(begin + i, at, n);
      at += n;
    }
  }

  void finish(MatrixIn<S> logits, const TokenInputs<S>&, routing_type& r) {
    lists_.finish(logits.rows(), logits.cols(), opt_.capacity, opt_.padding, opt_.weighting, S(opt_.scale),
                  "DynamicKSelector", r);
  }

  void backward(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S>) {
    detail::add_weighting_gradient<S>(opt_.weighting, S(opt_.scale), in.scores, r, dslot_weight, dscores);
  }

private:
  Index k_max_;
  Options opt_;
  S largest_ = 0;
  detail::ChoiceLists<S> lists_;
};

}  // namespace moe
