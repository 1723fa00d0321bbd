#pragma once
// moe::Router<Scorer, Gate, Selector, Losses...> (docs/architecture.md, Pipeline): the composition
// of the four stages, forward and backward. A policy that does not model its stage's concept
// selects the diagnosing primary template below, which names the missing member in one
// static_assert.
#include <algorithm>
#include <array>
#include <numeric>
#include <span>
#include <string>
#include <tuple>
#include <utility>

#include "moe/concepts.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/column_sums.hpp"

namespace moe {

// Diagnosing fallback: only reached when some policy misses a requirement.
template <class Scorer, class Gate, class Selector, class... Losses>
class Router {
  // Each diagnose_* names its policy's first missing member; when every policy models its
  // concept on its own, what is left is a mix of scalar types.
  static constexpr bool each_models = diagnose_scorer<Scorer>() && diagnose_gate<Gate>() &&
                                      diagnose_selector<Selector>() &&
                                      (diagnose_loss_term<Losses>() && ...);
  static_assert(!each_models,
                "moe::Router: the scorer, gate, selector and losses must share one scalar_type");

public:
  // Tells MoELayer that this router has printed its diagnosis, so the layer adds none of its own.
  static constexpr bool diagnoses_policy_error = true;
  template <class... Args>
  explicit Router(Args&&...) {}  // absorbs the construction so only the diagnosis is printed
};

template <class Scorer, class Gate, class Selector, class... Losses>
concept router_parts =
    scorer<Scorer> && gate<Gate> && selector<Selector> && (loss_term<Losses> && ...) &&
    std::same_as<typename Gate::scalar_type, typename Scorer::scalar_type> &&
    std::same_as<typename Selector::scalar_type, typename Scorer::scalar_type> &&
    (std::same_as<typename Losses::scalar_type, typename Scorer::scalar_type> && ...);

template <class Scorer, class Gate, class Selector, class... Losses>
  requires router_parts<Scorer, Gate, Selector, Losses...>
class Router<Scorer, Gate, Selector, Losses...> {
public:
  using scalar_type = typename Scorer::scalar_type;
  using S = scalar_type;
  using routing_type = typename Selector::routing_type;
  static constexpr std::size_t num_losses = sizeof...(Losses);
  // Soft routing (SoftRouting: dense dispatch and combine) has no slot weights for a loss to read.
  static constexpr bool soft = is_soft_routing<routing_type>;
  static_assert(!soft || num_losses == 0, "moe::Router: a selector that returns SoftRouting takes no loss terms");
  // A depth selector (Mixture-of-Depths, MindSkip) says `static constexpr bool skip_path = true;`:
  // the layer then adds its input, y = x + the weighted block outputs, so an unrouted token
  // passes through unchanged.
  static constexpr bool skip_path = requires { requires Selector::skip_path; };

  Router(Scorer scorer, Gate gate, Selector selector, Losses... losses)
      : scorer_(std::move(scorer)), gate_(std::move(gate)), selector_(std::move(selector)),
        losses_(std::move(losses)...) {
    // A policy whose rule depends on the number of experts (k <= E, one bias per expert,
    // Shazeer's k < E) is checked now, not at the first batch.
    const auto check = [&](const auto& policy) {
      if constexpr (requires { policy.check_experts(Index{}); }) policy.check_experts(num_experts());
    };
    check(gate_);
    check(selector_);
    // A selector that reads the logits' columns as slots checks them against the scorer's.
    if constexpr (requires { selector_.check_slots(Index{}, Index{}); })
      selector_.check_slots(num_experts(), logit_columns());
    std::apply([&](const auto&... l) { (check(l), ...); }, losses_);
  }

  Index input_dim() const { return scorer_.input_dim(); }
  Index num_experts() const { return scorer_.num_experts(); }
  // Columns of the logits: num_experts(), or the slots of a scorer that scores slots.
  Index logit_columns() const { return moe::logit_columns(scorer_); }

  // Whether a token's routing depends on no later token of the batch, in evaluation
  // (docs/architecture.md, Causality): every stage causal. Losses do not change the routing.
  bool causal() const { return is_causal(scorer_) && is_causal(gate_) && is_causal(selector_); }

  // x [T, D] -> routing. On error the previous call's routing, logits, scores and loss values
  // stay as they were (a backward after a rejected batch still sees the last good one).
  const routing_type& forward(MatrixIn<S> x, const TokenInputs<S>& tokens = {}) {
    detail::check_shape("Router::forward", "x", x, x.rows(), input_dim());
    detail::check_tokens("Router::forward", tokens, x.rows(), logit_columns(), input_dim());
    share_draw_state();
    auto& logits = state_[1 - current_].logits;
    fit(logits, x.rows(), logit_columns());
    if (state_[current_].logits.size() == 0) fit(state_[current_].logits, x.rows(), logit_columns());  // first call sizes both
    scorer_.forward(x, tokens, logits);
    try {
      return route_logits(logits, tokens, true);
    } catch (const value_error&) {
      // Non-finite logits: name the entry of x they came from, when x has one.
      detail::check_finite<S>("Router::forward", "x", x);
      throw;
    }
  }

  // Routing from logits the caller already has ([T, E]); the scorer is skipped. The logits are
  // read in place, not copied: keep them alive and unchanged until backward. So they must be
  // row-major data with unit inner stride (a moe::Matrix, a block of one, a Map): anything else
  // would be copied into a temporary that is gone when route returns, and is refused at compile
  // time instead.
  template <class Logits>
  const routing_type& route(const Eigen::MatrixBase<Logits>& logits, const TokenInputs<S>& tokens = {}) {
    static_assert(std::same_as<typename Logits::Scalar, S>, "Router::route: the logits must have the router's scalar_type");
    static_assert((int(Logits::Flags) & Eigen::DirectAccessBit) && (int(Logits::Flags) & Eigen::RowMajorBit) &&
                      (Logits::InnerStrideAtCompileTime == 1 || Logits::InnerStrideAtCompileTime == Eigen::Dynamic),
                  "Router::route reads the logits in place until backward: pass row-major data (a moe::Matrix, "
                  "a block or an Eigen::Map of one), not an expression or a column-major matrix; copy those "
                  "into a moe::Matrix first");
    const MatrixIn<S> view(logits.derived());
    MOE_ASSERT(view.data() == logits.derived().data());  // read in place, never a temporary
    detail::check_shape("Router::route", "logits", view, view.rows(), logit_columns());
    detail::check_tokens("Router::route", tokens, view.rows(), logit_columns());
    share_draw_state();
    return route_logits(view, tokens, false);
  }

  // Backward from d(loss)/d(slot weight) [num_slots]: adds the router parameters' gradients
  // (combine path plus coefficient-weighted aux losses) and writes d(loss)/dx into dx [T, D].
  // Needs the x and tokens of the last forward.
  void backward(MatrixIn<S> x, const TokenInputs<S>& tokens, std::span<const S> dslot_weight,
                MatrixOut<S> dx) requires(!soft) {
    check_backward(x, tokens, dx);
    backward_logits(tokens, dslot_weight);
    scorer_.backward(x, tokens, dlogits_, dx);
  }

  // Soft routing: backward from d(loss)/d(dispatch) [S, T] and d(loss)/d(combine) [T, S] (S the
  // slots), through both softmaxes to the logits, then the scorer. Writes dx as above.
  void backward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixIn<S> ddispatch, MatrixIn<S> dcombine,
                MatrixOut<S> dx) requires soft {
    check_backward(x, tokens, dx);
    backward_logits(tokens, ddispatch, dcombine);
    scorer_.backward(x, tokens, dlogits_, dx);
  }

  // The same without a scorer: d(loss)/d(logits) of the last forward or route.
  const Matrix<S>& backward_logits(const TokenInputs<S>& tokens, std::span<const S> dslot_weight) requires(!soft) {
    detail::require<config_error>(routed_, "Router::backward", "forward", "not run",
                                  "backward needs a forward (or route) before it");
    detail::check_tokens("Router::backward", tokens, logits_rows_, num_experts());
    if (Index(dslot_weight.size()) != routing_.num_slots())
      detail::fail<shape_error>("Router::backward", "dslot_weight.size", dslot_weight.size(),
                                "one entry per slot of the last routing (" + std::to_string(routing_.num_slots()) + ")");
    return backward_from_selector(tokens, [&](const SelectorInput<S>& sel) {
      selector_.backward(sel, routing_, dslot_weight, dscores_, dlogits_);
    });
  }

  const Matrix<S>& backward_logits(const TokenInputs<S>& tokens, MatrixIn<S> ddispatch, MatrixIn<S> dcombine)
    requires soft {
    detail::require<config_error>(routed_, "Router::backward", "forward", "not run",
                                  "backward needs a forward (or route) before it");
    detail::check_tokens("Router::backward", tokens, logits_rows_, logit_columns());
    detail::check_shape("Router::backward", "ddispatch", ddispatch, routing_.num_slots(), logits_rows_);
    detail::check_shape("Router::backward", "dcombine", dcombine, logits_rows_, routing_.num_slots());
    return backward_from_selector(tokens, [&](const SelectorInput<S>& sel) {
      selector_.backward(sel, routing_, ddispatch, dcombine, dscores_, dlogits_);
    });
  }

private:
  void check_backward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> dx) const {
    detail::require<config_error>(routed_, "Router::backward", "forward", "not run",
                                  "backward needs a forward before it");
    detail::check_shape("Router::backward", "x", x, logits_rows_, input_dim());
    detail::check_shape("Router::backward", "dx", dx, logits_rows_, input_dim());
    detail::check_tokens("Router::backward", tokens, logits_rows_, logit_columns(), input_dim());
  }

  // The selector's backward (given), then the losses' and the gate's: d(loss)/d(logits).
  template <class SelectorBackward>
  const Matrix<S>& backward_from_selector(const TokenInputs<S>& tokens, SelectorBackward&& selector_backward) {
    const MatrixIn<S> logits = this->logits();
    fit(dscores_, logits.rows(), logits.cols());
    fit(dlogits_, logits.rows(), logits.cols());
    dscores_.setZero();
    dlogits_.setZero();
    const Matrix<S>& scores = this->scores();
    const SelectorInput<S> sel{logits, scores, rank_for_backward(logits, scores, tokens), tokens};
    selector_backward(sel);
    if constexpr (num_losses > 0) {
      LossInput<S> li{logits, scores, routing_, tokens};
      if constexpr (adds_logit_noise) li.noise = noisy_ ? scorer_.logit_noise() : nullptr;
      if (li.noise) {  // losses that read the noise also differentiate through it
        if constexpr (adds_logit_noise) {
          LogitNoiseGradient<S> dnoise = scorer_.logit_noise_gradient();
          std::apply([&](auto&... l) { (backward_loss(l, li, dnoise), ...); }, losses_);
        }
      } else {
        std::apply([&](auto&... l) { (l.backward(li, dlogits_, dscores_), ...); }, losses_);
      }
    }
    gate_.backward(logits, scores, dscores_, dlogits_);
    return dlogits_;
  }

public:
  const routing_type& routing() const { return routing_; }
  // The logits of the last forward (the router's own) or route (the caller's).
  MatrixIn<S> logits() const {
    using View = Eigen::Map<const Matrix<S>, 0, Eigen::OuterStride<>>;
    return View(logits_data_, logits_rows_, logit_columns(), Eigen::OuterStride<>(logits_stride_));
  }
  // The gate's scores of the last forward or route. When forward did not keep them (see
  // keeps_scores), the first call after it recomputes them from the logits.
  const Matrix<S>& scores() {
    if constexpr (keeps_scores) {
      return state_[current_].scores;
    } else {
      if (scores_stale_) {
        fit(scores_, logits_rows_, logit_columns());
        gate_.forward(logits(), scores_);
        scores_stale_ = false;
      }
      return scores_;
    }
  }
  // Raw values of the aux losses of the last forward, in the order of Losses...
  const std::array<S, num_losses>& loss_values() const { return loss_values_; }
  // sum of coefficient * value: the term backward differentiates. A scorer that owns a loss of
  // its own (VQScorer's codebook and commitment terms) says `S aux_loss() const`; it is added
  // here, and the scorer's backward adds its gradient.
  S aux_loss() const {
    S sum = 0;
    if constexpr (requires { { scorer_.aux_loss() } -> std::convertible_to<S>; }) sum = scorer_.aux_loss();
    std::size_t i = 0;
    std::apply([&](const auto&... l) { ((sum += l.coefficient() * loss_values_[i++]), ...); }, losses_);
    return sum;
  }

  Scorer& scorer() { return scorer_; }
  Gate& gate() { return gate_; }
  Selector& selector() { return selector_; }
  template <std::size_t I>
  auto& loss() { return std::get<I>(losses_); }

  template <class F>
  void for_each_parameter(F&& visit) { scorer_.for_each_parameter(visit); }

  // Training or evaluation, and the step the next forward or route draws at (docs/architecture.md,
  // Randomness): stochastic options draw in training only (unless their reference also draws at
  // evaluation), keyed by (seed, step, token, expert). Each successful forward or route advances
  // the step by one; set_step replays any step.
  void set_training(bool on) { draw_state_.training = on; }
  bool training() const { return draw_state_.training; }
  void set_step(std::uint64_t step) { draw_state_.step = step; }
  std::uint64_t step() const { return draw_state_.step; }

private:
  // A scorer that puts noise on its logits shows it to the losses (moe::LogitNoise).
  static constexpr bool adds_logit_noise = requires(Scorer& s, const Scorer& cs) {
    { cs.logit_noise() } -> std::convertible_to<const LogitNoise<S>*>;
    { s.logit_noise_gradient() } -> std::convertible_to<LogitNoiseGradient<S>>;
  };

  // Hands the mode and step to every policy that draws.
  void share_draw_state() {
    const auto share = [&](auto& p) {
      if constexpr (requires { p.set_draw_state(draw_state_); }) p.set_draw_state(draw_state_);
    };
    share(scorer_);
    share(gate_);
    share(selector_);
    std::apply([&](auto&... l) { (share(l), ...); }, losses_);
  }

  template <class L>
  void backward_loss(const L& loss, const LossInput<S>& li, LogitNoiseGradient<S>& dnoise) {
    if constexpr (requires { loss.backward(li, dlogits_, dscores_, dnoise); }) loss.backward(li, dlogits_, dscores_, dnoise);
    else loss.backward(li, dlogits_, dscores_);
  }

  static constexpr bool gate_ranks = requires(Gate& g, MatrixIn<S> in, const TokenInputs<S>& tok,
                                              MatrixOut<S> out) { g.rank(in, in, tok, out); };
  // A gate whose ranking couples the rows (a transport plan over the batch) says
  // `static constexpr bool ranks_whole_batch = true;`: it ranks once, after the gating loop, and
  // the selector then runs on the whole batch.
  static constexpr bool gate_ranks_batch = gate_ranks && requires { requires Gate::ranks_whole_batch; };
  static constexpr bool staged = staged_selector<Selector> && !gate_ranks_batch;
  // Forward writes the [T, E] scores (and rank) only when something reads them after the gating
  // loop: a selector that is not staged, or a loss that reads the score matrix. Otherwise each
  // block's scores live in a per-thread scratch that stays in cache, which saves writing (and
  // first reading for ownership) a T x E matrix; backward recomputes them from the logits.
  static constexpr bool keeps_scores = !staged || (reads_score_matrix<Losses> || ...);

  // The per-call matrices, double-buffered: a call works in the spare set and makes it current
  // only once it has succeeded, without copying or allocating.
  struct State {
    Matrix<S> logits, scores, rank;
  };
  struct BlockScratch {
    Matrix<S> scores, rank;
  };

  template <class L>
  static bool reads_padding(const L& loss) {
    if constexpr (requires { loss.reads_padding_scores(); }) return loss.reads_padding_scores();
    else return false;
  }

  MatrixIn<S> rank_view(const State& st) const {
    if constexpr (gate_ranks) return st.rank; else return st.scores;
  }

  MatrixIn<S> rank_for_backward(MatrixIn<S> logits, const Matrix<S>& scores, const TokenInputs<S>& tokens) {
    if constexpr (keeps_scores) {
      return rank_view(state_[current_]);
    } else if constexpr (gate_ranks) {
      fit(rank_, logits.rows(), logits.cols());
      gate_.rank(logits, scores, tokens, rank_);
      return rank_;
    } else {
      return scores;
    }
  }

  // `scored`: the logits are the scorer's of this call (forward), not the caller's (route).
  const routing_type& route_logits(MatrixIn<S> logits, const TokenInputs<S>& tokens, [[maybe_unused]] bool scored) {
    const int next = 1 - current_;
    State& st = state_[next];
    const Index T = logits.rows(), E = logits.cols();
    if constexpr (keeps_scores)
      for (State* s : {&st, &state_[current_]}) {  // the current set only on the first call
        if (s != &st && s->scores.size() != 0) continue;
        fit(s->scores, T, E);
        if constexpr (gate_ranks) fit(s->rank, T, E);
      }
    if constexpr (staged) selector_.prepare(logits, tokens);
    // Validation, gating and the selector's per-token work run block by block, so each block of
    // logits is read from memory once and its scores are still in cache for the selector. A bad
    // block throws before the routing is touched: only the spare state and scratch are written.
    // ~16 KiB of logits per block, in whole groups of 16 rows (the token-parallel kernels' unit),
    // and in whole multiples of a staged selector's min_block_rows
    Index block = std::max<Index>(1, 256 / std::max<Index>(E, 1)) * 16;
    if constexpr (staged && requires { Selector::min_block_rows; }) {
      constexpr Index m = std::lcm(Index(16), Index(Selector::min_block_rows));
      block = (block + m - 1) / m * m;
    }
    if constexpr (num_losses > 0) fit(block_sums_, (T + block - 1) / block, E);
    // A loss that averages over padding rows too (Padding::fairseq) gets sums over every row.
    const bool sum_all_rows = !tokens.valid.empty() && std::apply([](const auto&... l) { return (reads_padding(l) || ...); }, losses_);
    if (sum_all_rows) fit(block_sums_all_, (T + block - 1) / block, E);
    if constexpr (!keeps_scores) block_scratch_.reserve();
    parallel_for(T, block, [&](Index t, Index end) {
      const Index n = end - t;
      const auto rows = logits.middleRows(t, n);
      const TokenInputs<S> tok = tokens.rows(t, n, E);
      auto [scores, rank] = [&]() -> std::pair<MatrixOut<S>, MatrixOut<S>> {
        if constexpr (keeps_scores) {
          return {st.scores.middleRows(t, n), (gate_ranks ? st.rank : st.scores).middleRows(t, n)};
        } else {
          BlockScratch& b = block_scratch_.local();
          fit(b.scores, block, E);
          if constexpr (gate_ranks) fit(b.rank, block, E);
          return {b.scores.topRows(n), (gate_ranks ? b.rank : b.scores).topRows(n)};
        }
      }();
      // checked after the gate has brought the block into cache, where the pass is cheap (as a
      // first, cold pass over the logits it took 10-16% of top-2 routing at E=64); a bad
      // block's scores are only ever written to the spare state or scratch
      gate_.forward(rows, scores);
      detail::check_finite<S>("Router", "logits", rows, t);
      if constexpr (gate_ranks && !gate_ranks_batch) gate_.rank(rows, scores, tok, rank);
      if constexpr (staged) selector_.select_rows(SelectorInput<S>{rows, scores, rank, tok}, t);
      if constexpr (num_losses > 0) {  // per block, summed below in block order: any thread count
        kernels::column_sums<S>(scores, block_sums_.row(t / block).data(), tok.valid);
        if (sum_all_rows) kernels::column_sums<S>(scores, block_sums_all_.row(t / block).data());
      }
    });
    if constexpr (gate_ranks_batch) gate_.rank(logits, st.scores, tokens, st.rank);
    if constexpr (staged) selector_.finish(logits, tokens, routing_);
    else selector_.forward({logits, st.scores, rank_view(st), tokens}, routing_);  // validates before it writes
    current_ = next;
    scores_stale_ = true;
    routed_ = true;
    ++draw_state_.step;
    noisy_ = false;
    if constexpr (adds_logit_noise) noisy_ = scored && scorer_.logit_noise() != nullptr;
    logits_data_ = logits.data();
    logits_rows_ = T;
    logits_stride_ = logits.outerStride();
    if constexpr (num_losses > 0) {
      const auto total = [&](const Matrix<S>& blocks, std::vector<S>& sums) {
        fit(sums, E);
        std::fill(sums.begin(), sums.end(), S(0));
        for (Index b = 0; b < blocks.rows(); ++b)
          for (Index e = 0; e < E; ++e) sums[e] += blocks(b, e);
      };
      total(block_sums_, score_sums_);
      if (sum_all_rows) total(block_sums_all_, score_sums_all_);
      LossInput<S> li{logits, keeps_scores ? MatrixIn<S>(st.scores) : MatrixIn<S>(logits.topRows(0)),
                      routing_, tokens, score_sums_,
                      sum_all_rows ? std::span<const S>(score_sums_all_) : std::span<const S>()};
      if constexpr (adds_logit_noise) li.noise = noisy_ ? scorer_.logit_noise() : nullptr;
      std::size_t i = 0;
      std::apply([&](const auto&... l) { ((loss_values_[i++] = l.forward(li)), ...); }, losses_);
    }
    return routing_;
  }

  Scorer scorer_;
  Gate gate_;
  Selector selector_;
  std::tuple<Losses...> losses_;
  // workspace, reused across calls
  State state_[2];
  int current_ = 0;
  Matrix<S> dscores_, dlogits_;
  PerThread<BlockScratch> block_scratch_;  // a gating block's scores and rank (!keeps_scores)
  Matrix<S> scores_, rank_;      // recomputed from the logits on demand (!keeps_scores)
  bool scores_stale_ = true;
  Matrix<S> block_sums_;         // per gating block, the column sums of its scores (real tokens)
  std::vector<S> score_sums_;    // their sum: LossInput::score_sums
  Matrix<S> block_sums_all_;     // the same over every row, padding included (reads_padding)
  std::vector<S> score_sums_all_;
  bool routed_ = false;              // a forward or route has succeeded (backward has a state)
  bool noisy_ = false;               // ... and its logits carry the scorer's noise
  DrawState draw_state_{};
  const S* logits_data_ = nullptr;  // the logits routed last: the router's own or the caller's
  Index logits_rows_ = 0, logits_stride_ = 0;
  routing_type routing_;
  std::array<S, num_losses> loss_values_{};
};

template <class Scorer, class Gate, class Selector, class... Losses>
Router(Scorer, Gate, Selector, Losses...) -> Router<Scorer, Gate, Selector, Losses...>;

}  // namespace moe
