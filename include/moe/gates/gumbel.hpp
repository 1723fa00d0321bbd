#pragma once
// Gumbel-sampled selection (docs/gates.md, GumbelGate): the selector ranks by logits + Gumbel
// noise, so a token's experts are drawn from the softmax instead of taken greedily (the
// Gumbel-max trick), while the combine weights stay the inner gate's clean scores. The forms of
// the references:
//   Sampled::after_first  the first expert is the inner gate's argmax, the others are sampled
//                         (DeepSpeed top2gating's top2_2nd_expert_sampling, fairseq/GShard
//                         second_expert_policy="sampling")
//   Sampled::all          every expert is sampled (DeepSpeed top1gating's noisy_gate_policy
//                         "RSample")
//   Sampled::none         no sampling: the inner gate's ranking, for a preset whose sampling is
//                         an option
// No gradient flows through the noise: only the choices it makes matter to backward.
#include <limits>
#include <type_traits>

#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"

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

  // rank = logits + g; under after_first the inner gate's own first choice ranks +inf, so it is
  // chosen first whatever the noise (ties to the lower expert, as argmax). Off (evaluation, or
  // Sampled::none): the inner gate's ranking.
  void rank(MatrixIn<S> logits, MatrixIn<S> scores, const TokenInputs<S>& tokens, MatrixOut<S> rank) {
    const DrawSource<S> g(opt_.draws, state_, DrawStream::gumbel, Distribution::gumbel, tokens.gumbel, logits.cols(),
                          tokens.first);
    if (opt_.sampled == Sampled::none || !g.on()) {
      inner_rank(logits, scores, tokens, rank);
      return;
    }
    const Index E = logits.cols();
    const bool keep_first = opt_.sampled == Sampled::after_first;
    if (keep_first) inner_rank(logits, scores, tokens, rank);  // read row by row below, then overwritten
    for (Index t = 0; t < logits.rows(); ++t) {
      Index first = 0;
      if (keep_first)
        for (Index e = 1; e < E; ++e) first = rank(t, e) > rank(t, first) ? e : first;
      for (Index e = 0; e < E; ++e) rank(t, e) = logits(t, e) + g(t, e);
      if (keep_first) rank(t, first) = std::numeric_limits<S>::infinity();
    }
  }

private:
  void inner_rank(MatrixIn<S> logits, MatrixIn<S> scores, const TokenInputs<S>& tokens, MatrixOut<S> rank) {
    if constexpr (requires { inner_.rank(logits, scores, tokens, rank); }) inner_.rank(logits, scores, tokens, rank);
    else rank = scores;
  }

  Inner inner_;
  Options opt_;
  DrawState state_{};
};

}  // namespace moe
