#pragma once
// Sampled selection (docs/gates.md, GumbelGate): one expert per token is drawn from the softmax of
// its logits instead of taken greedily, while the combine weights stay the inner gate's clean
// scores. The forms of the references, each sampling one expert:
//   Sampled::after_first  the first expert is the inner gate's argmax, the second is sampled
//                         among the others (DeepSpeed top2gating's top2_2nd_expert_sampling,
//                         fairseq/GShard second_expert_policy="sampling")
//   Sampled::all          the first expert is sampled (DeepSpeed top1gating's noisy_gate_policy
//                         "RSample")
//   Sampled::none         no sampling: the inner gate's ranking, for a preset whose sampling is
//                         an option
// With the batch's Gumbel draws g (tokens.gumbel) the sampled expert is argmax(logits + g), as the
// references compute it, so their draws replay exactly. Without them the gate draws one U(0, 1)
// per token and inverts the cumulative softmax: the same distribution, with one draw and no
// logarithm per token instead of a Gumbel draw per logit. Later choices (k beyond the sampled
// one) follow the inner gate's ranking. No gradient flows through the sampling.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moe/concepts.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/kernels/top_k.hpp"

namespace moe {

enum class Sampled { none, after_first, all };

template <class Inner>
class GumbelGate {
public:
  using scalar_type = typename Inner::scalar_type;
  using S = scalar_type;

  struct Options {
    Sampled sampled = Sampled::after_first;
    Draws draws{};  // the generator's key; tokens.gumbel ([T, E]) overrides it
  };

  explicit GumbelGate(Options opt = {}, Inner inner = {}) : inner_(std::move(inner)), opt_(opt) {}

  const Options& options() const { return opt_; }
  Inner& inner() { return inner_; }
  // A token's draws are keyed by (seed, step, token, expert): causal as the inner gate is.
  bool causal() const { return is_causal(inner_); }

  void set_draw_state(const DrawState& state) {
    state_ = state;
    if constexpr (requires { inner_.set_draw_state(state); }) inner_.set_draw_state(state);
  }
  void check_experts(Index experts) const {
    if constexpr (requires { inner_.check_experts(experts); }) inner_.check_experts(experts);
  }

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) { inner_.forward(logits, scores); }
  void backward(MatrixIn<S> logits, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    inner_.backward(logits, scores, dscores, dlogits);
  }

  // The inner gate's ranking, with the sampled expert (and under after_first the greedy first one)
  // moved to the top. Off (evaluation, or Sampled::none): the inner gate's ranking.
  void rank(MatrixIn<S> logits, MatrixIn<S> scores, const TokenInputs<S>& tokens, MatrixOut<S> rank) {
    inner_rank(logits, scores, tokens, rank);
    const bool given = !tokens.gumbel.empty();
    const DrawSource<S> draw(opt_.draws, state_, DrawStream::gumbel, given ? Distribution::gumbel : Distribution::uniform,
                             tokens.gumbel, given ? logits.cols() : 1, tokens.first);
    if (opt_.sampled == Sampled::none || !draw.on()) return;
    const Index E = logits.cols();
    const bool keep_first = opt_.sampled == Sampled::after_first;
    constexpr S top = std::numeric_limits<S>::infinity(), next = std::numeric_limits<S>::max();
    for (Index t = 0; t < logits.rows(); ++t) {
      Index first = -1;  // excluded from the sampling
      if (keep_first) {
        std::int32_t top = 0;  // the inner ranking's first, ties to the lower expert (SIMD top-1)
        kernels::top_k_row(&rank(t, 0), E, 1, &top);
        first = top;
        if (E == 1) continue;
      }
      const Index sampled = given ? gumbel_max(logits.row(t).data(), E, first, [&](Index e) { return draw(t, e); })
                                  : inverse_cdf(logits.row(t).data(), scores.row(t).data(), E, first, draw(t, 0));
      if (keep_first) rank(t, first) = top;
      rank(t, sampled) = keep_first ? next : top;
    }
  }

private:
  // argmax over e != skip of logit_e + g_e (ties to the lower expert, as torch.argmax).
  template <class G>
  static Index gumbel_max(const S* logit, Index E, Index skip, G&& g) {
    Index best = -1;
    S best_value = 0;
    for (Index e = 0; e < E; ++e) {
      if (e == skip) continue;
      const S v = logit[e] + g(e);
      if (best < 0 || v > best_value) best = e, best_value = v;
    }
    return best;
  }

  // The first e != skip whose cumulative probability exceeds u times the total, the softmax of
  // the logits (the inner scores when the inner gate is the softmax) over e != skip.
  static Index inverse_cdf(const S* logit, const S* score, Index E, Index skip, S u) {
    constexpr bool softmax_scores = std::is_same_v<Inner, SoftmaxGate<S>>;
    double row_max = 0;
    if constexpr (!softmax_scores) row_max = double(*std::max_element(logit, logit + E));
    const auto p = [&](Index e) -> double {
      if constexpr (softmax_scores) return double(score[e]);
      else return std::exp(double(logit[e]) - row_max);
    };
    double total = 0;
    for (Index e = 0; e < E; ++e) total += e == skip ? 0.0 : p(e);
    const double target = double(u) * total;
    // Branch-free: the cumulative sums do not decrease, so the first e whose sum exceeds the
    // target is the number of positions whose sum does not (skip and zero-probability entries
    // repeat the previous sum, and are never that first e).
    double sum = 0;
    Index below = 0, last = -1;
    for (Index e = 0; e < E; ++e) {
      const double q = e == skip ? 0.0 : p(e);
      sum += q;
      below += sum <= target;
      last = q > 0 ? e : last;
    }
    if (below < E) return below;
    return last >= 0 ? last : (skip == 0 ? 1 : 0);  // rounding past the end, or every p zero
  }

  void inner_rank(MatrixIn<S> logits, MatrixIn<S> scores, const TokenInputs<S>& tokens, MatrixOut<S> rank) {
    if constexpr (requires { inner_.rank(logits, scores, tokens, rank); }) inner_.rank(logits, scores, tokens, rank);
    else rank = scores;
  }

  Inner inner_;
  Options opt_;
  DrawState state_{};
};

}  // namespace moe
