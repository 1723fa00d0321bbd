#pragma once
// Load-balancing auxiliary loss, L = c * sum_e f_e P_e (docs/losses.md). f_e is the fraction of
// routed (token, choice) pairs that chose expert e before capacity dropping, P_e the mean gate
// score of e; the references differ only in which choices count and how they normalise, so each
// is a named variant, and in how a padding mask counts (Padding: excluded by default, fairseq,
// megatron). Gradient flows through P only.
#include <algorithm>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/column_sums.hpp"

namespace moe {

enum class BalanceNorm {
  switch_top1,     // E * sum f P, f from first choices (Switch, DeepSpeed top-1/top-2, fairseq,
                   // vmoe _gshard_auxiliary_loss): 1 at perfect balance
  topk_mean,       // (E/k) * sum f P, f from all k choices (DeepSpeed top-k): 1 at balance
  megatron,        // E * sum f P, f = count / (k T) (Megatron switch_load_balancing): 1
  flaxformer,      // E * sum f P, f from all k choices, not divided by k (flaxformer, HF
                   // Mixtral): k at balance
  fastmoe_balance, // E * sum f P with f = count/(T k), P = sum g/(T k) (HyperRouter/VQMoE): 1/k
};

template <scalar S>
class LoadBalanceLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // P from LossInput::score_sums

  explicit LoadBalanceLoss(BalanceNorm norm = BalanceNorm::switch_top1, S coefficient = S(1e-2),
                           Padding padding = Padding::excluded)
      : norm_(norm), coefficient_(coefficient), padding_(padding) {
    detail::require<config_error>(coefficient >= 0, "LoadBalanceLoss", "coefficient", coefficient,
                                  "coefficient >= 0");
  }

  BalanceNorm norm() const { return norm_; }
  S coefficient() const { return coefficient_; }
  Padding padding() const { return padding_; }
  // Padding::fairseq takes P_e over every row, padding included: the router then passes
  // LossInput::score_sums_all.
  bool reads_padding_scores() const { return padding_ == Padding::fairseq; }

  S forward(const LossInput<S>& in) const {
    const auto [f, p_scale] = fractions(in);
    const Index experts = in.logits.cols();
    const bool all_rows = padding_ == Padding::fairseq && !in.tokens.valid.empty();
    const std::span<const S> given = all_rows ? in.score_sums_all : in.score_sums;
    fit(score_sum_, 1, experts);
    if (given.empty())
      kernels::column_sums<S>(in.scores, score_sum_.data(), all_rows ? std::span<const std::uint8_t>() : in.tokens.valid);
    const S* sums = given.empty() ? score_sum_.data() : given.data();
    S value = 0;
    for (Index e = 0; e < experts; ++e) value += f[e] * sums[e] * p_scale;
    return value;
  }

  // dL/dscores[t, e] = c * f_e * p_scale for every token t that P_e averages over.
  void backward(const LossInput<S>& in, MatrixOut<S>, MatrixOut<S> dscores) const {
    const auto [f, p_scale] = fractions(in);
    fit(score_sum_, 1, in.scores.cols());  // reused as the per-expert gradient row
    for (Index e = 0; e < in.scores.cols(); ++e) score_sum_(0, e) = coefficient_ * f[e] * p_scale;
    for (Index t = 0; t < in.scores.rows(); ++t)
      if (padding_ == Padding::fairseq || in.tokens.is_valid(t)) dscores.row(t) += score_sum_;
  }

private:
  // E-scaled f_e (into f_) and the factor that turns sum_t g[t, e] into P_e.
  std::pair<const std::vector<S>&, S> fractions(const LossInput<S>& in) const {
    const auto& r = in.routing;
    const Index experts = in.logits.cols();
    const bool masked = !in.tokens.valid.empty();
    // f and P are means over the real tokens, or over all T under fairseq's convention; k is the
    // number of choices of a routed token (Megatron routes the padding too).
    const Index routed = !masked || padding_ == Padding::megatron ? r.num_tokens : r.num_valid_tokens;
    const Index over = padding_ == Padding::fairseq ? r.num_tokens : r.num_valid_tokens;
    const S tokens = S(std::max<Index>(over, 1));  // all padded: no division by 0
    const S k = routed > 0 ? S(r.num_choices()) / S(routed) : S(1);
    // Megatron's padding holds choices that the loss must not count.
    const bool skip_padding = masked && padding_ == Padding::megatron;
    // integer counts in four histograms, position i counted in histogram i % 4, so that a run of
    // one expert does not wait on its own previous increment
    constexpr Index ways = 4;
    fit(counts_, ways * experts);
    std::fill(counts_.begin(), counts_.end(), 0);
    Index* const counts = counts_.data();
    Index* const histogram[ways] = {counts, counts + experts, counts + 2 * experts, counts + 3 * experts};
    const Index* const offsets = r.token_offsets.data();
    const std::int32_t* const expert = r.choice_expert.data();
    const Index num_tokens = r.num_tokens, num_choices = r.num_choices();  // locals: counts may alias
    // i over [0, n), choice(i) the choice counted at position i or -1
    const auto tally = [&](Index n, auto choice) {
      Index i = 0;
      for (; i + ways <= n; i += ways)
        for (Index way = 0; way < ways; ++way)
          if (const Index c = choice(i + way); c >= 0) ++histogram[way][expert[c]];
      for (; i < n; ++i)
        if (const Index c = choice(i); c >= 0) ++histogram[0][expert[c]];
    };
    if (norm_ == BalanceNorm::switch_top1)  // first choices only
      tally(num_tokens, [&](Index t) {
        return offsets[t] != offsets[t + 1] && (!skip_padding || in.tokens.valid[std::size_t(t)]) ? offsets[t] : Index(-1);
      });
    else if (!skip_padding)
      tally(num_choices, [](Index c) { return c; });
    else
      for (Index t = 0; t < num_tokens; ++t)
        if (in.tokens.valid[std::size_t(t)])
          for (Index c = offsets[t]; c < offsets[t + 1]; ++c) ++histogram[0][expert[c]];
    fit(f_, experts);
    for (Index e = 0; e < experts; ++e) {
      Index n = 0;
      for (Index way = 0; way < ways; ++way) n += counts[way * experts + e];
      f_[e] = S(n);
    }
    S f_scale = S(experts) / tokens, p_scale = S(1) / tokens;
    if (norm_ == BalanceNorm::topk_mean || norm_ == BalanceNorm::megatron) f_scale /= k;
    if (norm_ == BalanceNorm::fastmoe_balance) f_scale /= k, p_scale /= k;
    for (auto& v : f_) v *= f_scale;
    return {f_, p_scale};
  }

  BalanceNorm norm_;
  S coefficient_;
  Padding padding_;
  mutable std::vector<S> f_;         // scratch
  mutable std::vector<Index> counts_;
  mutable Matrix<S> score_sum_;      // scratch
};

}  // namespace moe
