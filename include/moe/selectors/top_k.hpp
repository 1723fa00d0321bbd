#pragma once
// Token-choice top-k selector (Switch k=1, GShard k=2, generic k; docs/selectors.md).
// Each real token picks the k experts with the largest rank values (ties to the lower expert),
// then capacity decides which (token, choice) pairs keep a slot, in the overflow order of
// docs/selectors.md (Capacity). Combine weights follow one of the reference normalisations below.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/slot_assignment.hpp"
#include "moe/kernels/top_k.hpp"
#include "moe/selectors/capacity.hpp"
#include "moe/selectors/weighting.hpp"

namespace moe {

// k chosen at run time (TopKSelector<S>) instead of compile time (TopKSelector<S, 2>).
inline constexpr int dynamic_k = 0;

// What happens to a token's second choice before capacity (k = 2).
enum class SecondExpert {
  all,     // always kept (GShard/fairseq 'all')
  random,  // kept iff 2 g2 > u, u ~ U(0, 1) per token, g2 the second choice's pre-drop gate
           // value (fairseq/GShard 'random'); a rejected choice takes no slot and counts as
           // dropped, so the first choice's weight renormalises alone
};

template <scalar S, int K = dynamic_k>
class TopKSelector {
  static_assert(K >= 0, "moe::TopKSelector: K must be >= 1 (or moe::dynamic_k)");

public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  struct Options {
    Weighting weighting = Weighting::raw;
    double scale = 1.0;  // multiplies every combine weight (DeepSeek-V3 route_scale 2.5)
    // > 0: a renormalisation divides by sum + epsilon (GLIDER's 1e-6), not by max(sum, float eps)
    double renormalize_epsilon = 0.0;
    double norm_p = 1.0;  // the q of Weighting::p_norm: finite and > 0
    Capacity capacity{};
    Padding padding = Padding::excluded;  // which tokens of a mask are routed and count in C
    SecondExpert second = SecondExpert::all;
    // the generator's key for OverflowOrder::random (tokens.uniform, [T, E], overrides it) and
    // SecondExpert::random (tokens.second_uniform, [T])
    Draws draws{};
  };

  explicit TopKSelector(Options opt = {}) requires(K != dynamic_k) : TopKSelector(K, opt, 0) {}
  // `TopKSelector<S, 1>({})`: an empty brace list converts to an initializer_list exactly, where
  // to Options and to TopKSelector (the move constructor) it would take a user-defined
  // conversion each, an ambiguity. Anything but the empty list is a config_error.
  explicit TopKSelector(std::initializer_list<Options> none) requires(K != dynamic_k)
      : TopKSelector(K, Options{}, 0) {
    detail::require<config_error>(none.size() == 0, "TopKSelector", "options", none.size(),
                                  "one Options object, not a list of them");
  }
  explicit TopKSelector(Index k, Options opt = {}) requires(K == dynamic_k) : TopKSelector(k, opt, 0) {}

  Index k() const { return k_; }
  // The k of the next calls, for a selector with a runtime k: a schedule (moe::scheduled_k) moves
  // it between training steps. k <= E is checked at the next call.
  void set_k(Index k) requires(K == dynamic_k) {
    detail::require<config_error>(k >= 1, "TopKSelector::set_k", "k", k, "k >= 1");
    detail::require<config_error>(opt_.second != SecondExpert::random || k == 2, "TopKSelector::set_k", "k", k,
                                  "k = 2 for SecondExpert::random (a second expert)");
    k_ = k;
  }
  const Options& options() const { return opt_; }

  // Causal as its capacity is (Capacity::causal), with the overflow order evaluation runs.
  bool causal() const {
    Capacity evaluation = opt_.capacity;
    evaluation.overflow = overflow_order(opt_.draws.at_evaluation);
    return evaluation.causal(k_ == 1);
  }

  // Called by Router at construction, when the number of experts is first known.
  void check_experts(Index experts) const { check_k(experts); }
  void set_draw_state(const DrawState& state) { draw_state_ = state; }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    detail::check_shape("TopKSelector", "scores", in.scores, in.logits.rows(), in.logits.cols());
    detail::check_shape("TopKSelector", "rank", in.rank, in.logits.rows(), in.logits.cols());
    prepare(in.logits, in.tokens);
    select_rows(in, 0);
    finish(in.logits, in.tokens, r);
  }

  // The staged form of forward (moe::staged_selector): the router runs select_rows inside its
  // blocked gating loop, on each block of scores while it is in cache.
  // prepare reads only the shapes and the token mask: it validates, counts the real tokens and
  // sizes the scratch, so a bad call throws before anything is written.
  void prepare(MatrixIn<S> logits, const TokenInputs<S>& tokens_in) {
    const Index tokens = logits.rows(), experts = logits.cols();
    validate(tokens_in, tokens, experts);
    fit(token_offsets_, tokens + 1);
    const Index k = k_;  // a local: the stores below could alias the member
    Index real = 0;
    Index* offsets = token_offsets_.data();
    // Megatron routes padding like any token; the other conventions only the real tokens.
    const bool route_all = tokens_in.valid.empty() || opt_.padding == Padding::megatron;
    if (route_all) {
      for (Index t = 0; t <= tokens; ++t) offsets[t] = t * k;
      real = count_valid(tokens_in.valid, tokens);
    } else {
      for (Index t = 0; t < tokens; ++t) {
        offsets[t] = real * k;
        real += tokens_in.valid[std::size_t(t)] != 0;
      }
      offsets[tokens] = real * k;
    }
    routed_ = route_all ? tokens : real;
    real_ = real;
    // C counts the real tokens only under the library's own convention.
    capacity_ = opt_.capacity.slots(opt_.padding == Padding::excluded ? real : tokens, experts, k_, "TopKSelector");
    const Index choices = routed_ * k_;
    fit(choice_expert_, choices);
    fit(choice_token_, choices);
    fit(pre_weight_, choices);
    fit(choice_score_, choices);
    if (opt_.capacity.overflow == OverflowOrder::batch_priority) fit(token_priority_, routed_);
  }

  // Each real token of the block (rows [begin, begin + rows) of the batch) picks its top-k, in
  // rank order, with its pre-drop combine weights; only the scratch is written, so disjoint
  // blocks may run in parallel.
  void select_rows(const SelectorInput<S>& block, Index begin) { select_rows(block, begin, nullptr); }

  // The same with a rank narrower than the scores: column j of row i of `block.rank` is expert
  // column_of[i * rank.cols() + j] (increasing along a row, so ties still go to the lower
  // expert). A selector that rules experts out (GroupLimitedTopKSelector) ranks only the rest.
  void select_rows(const SelectorInput<S>& block, Index begin, const std::int32_t* column_of) {
    const Index end = begin + block.scores.rows();
    if (begin >= end) return;
    // locals: the compiler cannot tell that the stores below leave the members alone
    const Index ranked = block.rank.cols(), k = k_;
    const Index* offsets = token_offsets_.data();
    std::int32_t* __restrict const expert = choice_expert_.data();
    std::int32_t* __restrict const token = choice_token_.data();
    S* __restrict const score = choice_score_.data();
    S* __restrict const weight = pre_weight_.data();
    const Weighting weighting = opt_.weighting;
    const bool renormalize = weighting == Weighting::renormalize_before_drop ||
                             weighting == Weighting::renormalize_after_drop;
    const S scale = S(opt_.scale);
    const detail::Renormalizer<S> den = denominator();
    const Index first = offsets[begin], last = offsets[end];
    const Index stride = block.scores.outerStride();
    const S* const scores = block.scores.data();
    const auto rows = [&](auto kk) {  // kk: k as a compile-time constant (small k) or k
      // the picks and their scores, while the block's rows are in cache
      if (last - first == (end - begin) * k) {  // no padding: whole rows at a time, and flat
        // loops the compiler vectorizes (the kernel interleaves rows)
        kernels::top_k_rows<S>(block.rank, k, expert + first);
        if (column_of)
          for (Index i = 0; i < last - first; ++i)
            expert[first + i] = column_of[(i / Index(kk)) * ranked + expert[first + i]];
        for (Index i = 0; i < last - first; ++i) {
          const Index row = i / Index(kk);
          token[first + i] = std::int32_t(begin + row);
          score[first + i] = scores[row * stride + expert[first + i]];
        }
      } else {
        for (Index t = begin; t < end; ++t) {
          const Index c = offsets[t];
          if (c == offsets[t + 1]) continue;  // padding
          kernels::top_k_row(block.rank.row(t - begin).data(), ranked, k, expert + c);
          if (column_of)
            for (Index j = 0; j < Index(kk); ++j) expert[c + j] = column_of[(t - begin) * ranked + expert[c + j]];
          for (Index j = 0; j < Index(kk); ++j) {
            token[c + j] = std::int32_t(t);
            score[c + j] = scores[(t - begin) * stride + expert[c + j]];
          }
        }
      }
      // pre-drop weights, token by token (each real token holds k consecutive choices); one loop
      // per weighting, so that each is simple enough to vectorize
      if (renormalize) {
        for (Index c = first; c < last; c += Index(kk)) {
          S z = 0;  // scale * (p / z): p / p is exactly 1, so equal weights stay equal for by_weight
          for (Index j = 0; j < Index(kk); ++j) z += score[c + j];
          z = den(z);
          for (Index j = 0; j < Index(kk); ++j) weight[c + j] = scale * (score[c + j] / z);
        }
      } else if (weighting == Weighting::raw) {
        for (Index c = first; c < last; ++c) weight[c] = scale * score[c];
      } else if (weighting == Weighting::p_norm) {
        for (Index c = first; c < last; c += Index(kk)) {
          const S z = p_norm(score + c);
          for (Index j = 0; j < Index(kk); ++j) weight[c + j] = scale * (score[c + j] / z);
        }
      } else {
        for (Index c = first; c < last; c += Index(kk))
          kept_logit_weights(block.logits.row(token[c] - begin).data(), expert + c, weight + c);
      }
      // batch priority (BPR): a token's largest score, kept here as the scores are not kept
      if (opt_.capacity.overflow == OverflowOrder::batch_priority)
        for (Index c = first; c < last; c += Index(kk))
          token_priority_[c / k] = block.scores.row(token[c] - begin).maxCoeff();
    };
    if (!kernels::with_static_count<2>(k, rows)) rows(k);
  }

  // Capacity and slots from the choices of every row: writes the routing.
  void finish(MatrixIn<S> logits, const TokenInputs<S>& tokens, routing_type& r) {
    // The routing takes the choice arrays by swap (its old ones become the next call's scratch)
    // and every other array is overwritten whole below, so nothing is cleared or copied.
    r.num_tokens = logits.rows();
    r.num_experts = logits.cols();
    r.num_valid_tokens = real_;
    r.capacity = capacity_;
    r.token_offsets.swap(token_offsets_);
    r.choice_expert.swap(choice_expert_);
    fit(token_offsets_, Index(r.token_offsets.size()));  // the first call's swap leaves them empty
    fit(choice_expert_, r.num_choices());
    fit(r.expert_offsets, r.num_experts + 1);
    fit(r.expert_count, r.num_experts);
    fit(r.choice_slot, r.num_choices());

    // the priority sequence; each expert keeps its first C entries of it, counting-sorted into
    // expert-grouped slots
    const Index ranks = priority_sequence(r, logits, tokens);
    const bool masked_logit = opt_.capacity.overflow == OverflowOrder::by_masked_logit;
    const bool sampled_second = sample_second_choices(r, tokens);
    kernels::assign_slots<S>({.choice_token = choice_token_, .order = order_, .ranks = ranks, .weight = pre_weight_,
                              .capacity = capacity_, .pad = opt_.capacity.pad,
                              .token_order = opt_.capacity.slot_order == SlotOrder::token,
                              .eligible = masked_logit || sampled_second ? std::span<const std::uint8_t>(eligible_)
                                                                         : std::span<const std::uint8_t>()},
                             r, count_);

    // The slots hold the pre-drop weights. Renormalised after the drop, they differ only for a
    // token that lost some but not all of its choices: its survivors share the weight again.
    if (opt_.weighting != Weighting::renormalize_after_drop || k_ == 1) return;
    detail::renormalize_survivors<S>(r, choice_token_, choice_score_, S(opt_.scale), denominator());
  }

  // d(slot weights) -> d(scores) and, for softmax_of_kept_logits, d(logits); both accumulated.
  void backward(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S> dlogits) {
    const S scale = S(opt_.scale);
    if (opt_.weighting == Weighting::p_norm) return add_p_norm_gradient(in, r, dslot_weight, dscores);
    if (opt_.weighting != Weighting::softmax_of_kept_logits)
      return detail::add_weighting_gradient<S>(opt_.weighting, scale, in.scores, r, dslot_weight, dscores, denominator());
    for (Index t = 0; t < r.num_tokens; ++t) {
      const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
      const auto dw = [&](Index c) { return r.choice_slot[c] >= 0 ? dslot_weight[r.choice_slot[c]] : S(0); };
      // softmax_of_kept_logits: q_c = pre_weight / scale, recomputed from the logits
      S inner = 0;
      const S top = max_logit(in, r, t);
      S sum = 0;
      for (Index c = lo; c < hi; ++c) sum += std::exp(in.logits(t, r.choice_expert[c]) - top);
      for (Index c = lo; c < hi; ++c)
        inner += dw(c) * std::exp(in.logits(t, r.choice_expert[c]) - top) / sum;
      for (Index c = lo; c < hi; ++c) {
        const S q = std::exp(in.logits(t, r.choice_expert[c]) - top) / sum;
        dlogits(t, r.choice_expert[c]) += scale * q * (dw(c) - inner);
      }
    }
  }

private:
  TopKSelector(Index k, Options opt, int) : k_(k), opt_(opt) {
    detail::require<config_error>(k >= 1, "TopKSelector", "k", k, "k >= 1");
    detail::require<config_error>(std::isfinite(opt.scale), "TopKSelector", "scale", opt.scale,
                                  "finite");
    detail::require<config_error>(std::isfinite(opt.norm_p) && opt.norm_p > 0, "TopKSelector", "norm_p", opt.norm_p,
                                  "finite and > 0");
    detail::require<config_error>(std::isfinite(opt.renormalize_epsilon) && opt.renormalize_epsilon >= 0, "TopKSelector",
                                  "renormalize_epsilon", opt.renormalize_epsilon, "finite and >= 0 (0: clamp at float epsilon)");
    opt_.capacity.validate("TopKSelector");
    if (opt_.second == SecondExpert::random) {
      detail::require<config_error>(k == 2, "TopKSelector", "k", k, "k = 2 for SecondExpert::random (a second expert)");
      detail::require<config_error>(opt_.capacity.overflow != OverflowOrder::by_masked_logit, "TopKSelector",
                                    "capacity.overflow", "by_masked_logit",
                                    "another order with SecondExpert::random (the masked-logit ranking decides the kept set itself)");
    }
  }

  // SecondExpert::random: eligible_ = 0 for each rejected second choice, 1 elsewhere. False when
  // nothing is sampled (the rule is off, or its draws are).
  bool sample_second_choices(const routing_type& r, const TokenInputs<S>& tokens) {
    if (opt_.second != SecondExpert::random) return false;
    const DrawSource<S> u(opt_.draws, draw_state_, DrawStream::second_uniform, Distribution::uniform,
                          tokens.second_uniform, 1, tokens.first);
    if (!u.on()) return false;
    fit(eligible_, r.num_choices());
    std::fill(eligible_.begin(), eligible_.end(), std::uint8_t(1));
    const bool normalized = opt_.weighting == Weighting::renormalize_before_drop;
    for (Index t = 0; t < r.num_tokens; ++t) {
      const Index c = r.token_offsets[t];
      if (r.token_offsets[t + 1] - c != 2) continue;  // padding
      // g2 as the reference compares it: the raw gate value, or normalised over the two choices
      const S g2 = normalized ? choice_score_[c + 1] / denominator()(choice_score_[c] + choice_score_[c + 1])
                              : choice_score_[c + 1];
      eligible_[std::size_t(c + 1)] = 2 * g2 > u(t, 0);
    }
    return true;
  }

  detail::Renormalizer<S> denominator() const { return {S(opt_.renormalize_epsilon)}; }

  // The order a call runs: random token selection without draws (`drawing` false) is first come.
  OverflowOrder overflow_order(bool drawing) const {
    const auto overflow = opt_.capacity.overflow;
    return overflow == OverflowOrder::random && !drawing ? OverflowOrder::rank_major : overflow;
  }

  void validate(const TokenInputs<S>& in, Index tokens, Index experts) const {
    check_k(experts);
    detail::check_tokens("TopKSelector", in, tokens, experts);
  }

  void check_k(Index experts) const {
    if (k_ > experts)  // the message is built only on failure: no allocation per call
      detail::fail<config_error>("TopKSelector", "k", k_, "k <= number of experts (" + std::to_string(experts) + ")");
  }

  S max_logit(const SelectorInput<S>& in, const routing_type& r, Index t) const {
    S top = -std::numeric_limits<S>::infinity();
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      top = std::max(top, in.logits(t, r.choice_expert[c]));
    return top;
  }

  // ||p||_q over a token's k choice scores, as torch.norm computes it (no floor: DBRX divides by
  // it as it is). q = 1 is the plain sum, so p_norm at q = 1 is renormalize_before_drop.
  S p_norm(const S* p) const {
    const S q = S(opt_.norm_p);
    S sum = 0;
    if (q == S(1)) {
      for (Index j = 0; j < k_; ++j) sum += std::abs(p[j]);
      return sum;
    }
    for (Index j = 0; j < k_; ++j) sum += std::pow(std::abs(p[j]), q);
    return std::pow(sum, S(1) / q);
  }

  // w_i = scale p_i / N, N = (sum_j p_j^q)^(1/q) over the token's choices (dropped or not):
  // dw_i/dp_j = scale (delta_ij / N - p_i p_j^(q-1) / N^(q+1)), scores being >= 0.
  void add_p_norm_gradient(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                           MatrixOut<S> dscores) const {
    const S scale = S(opt_.scale), q = S(opt_.norm_p);
    for (Index t = 0; t < r.num_tokens; ++t) {
      const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
      if (lo == hi) continue;
      S sum = 0, inner = 0;
      for (Index c = lo; c < hi; ++c) {
        const S p = in.scores(t, r.choice_expert[c]);
        sum += std::pow(p, q);
        if (r.choice_slot[c] >= 0) inner += dslot_weight[r.choice_slot[c]] * p;
      }
      const S n = std::pow(sum, S(1) / q);
      for (Index c = lo; c < hi; ++c) {
        const S p = in.scores(t, r.choice_expert[c]);
        const S dw = r.choice_slot[c] >= 0 ? dslot_weight[r.choice_slot[c]] : S(0);
        dscores(t, r.choice_expert[c]) += scale * (dw / n - inner * std::pow(p, q - 1) / (sum * n));
      }
    }
  }

  // Pre-drop weights of softmax_of_kept_logits: scale * softmax over the k chosen logits.
  void kept_logit_weights(const S* logits, const std::int32_t* e, S* w) const {
    S top = logits[e[0]], sum = 0;
    for (Index j = 1; j < k_; ++j) top = std::max(top, logits[e[j]]);
    for (Index j = 0; j < k_; ++j) sum += (w[j] = std::exp(logits[e[j]] - top));
    for (Index j = 0; j < k_; ++j) w[j] = S(opt_.scale) * (w[j] / sum);
  }

  // The priority sequence into order_, or empty order_ and the ranks of assign_slots' implicit
  // one (every real token holds exactly k choices).
  Index priority_sequence(const routing_type& r, MatrixIn<S> logits, const TokenInputs<S>& tokens) {
    const Index choices = r.num_choices(), valid = routed_;  // tokens holding k choices each
    const DrawSource<S> u(opt_.draws, draw_state_, DrawStream::uniform, Distribution::uniform, tokens.uniform,
                          logits.cols(), tokens.first);
    const auto overflow = overflow_order(u.on());
    if (overflow == OverflowOrder::by_masked_logit) {
      masked_logit_eligible(r, logits);  // the kept set itself; slots then in token order
      order_.clear();
      return 1;
    }
    if (overflow == OverflowOrder::token_major || overflow == OverflowOrder::rank_major) {
      order_.clear();
      return overflow == OverflowOrder::rank_major ? k_ : 1;
    }
    fit(order_, choices);
    switch (overflow) {
      case OverflowOrder::token_major:  // implicit or kept set: handled above
      case OverflowOrder::rank_major:
      case OverflowOrder::by_masked_logit:
        break;
      case OverflowOrder::random: {
        // Only an overflowing expert's order decides anything, and only among its own choices:
        // the choices grouped by expert (a stable counting sort), then each overflowing expert's
        // by its draws, highest first, ties to the lower choice (the first C are what counts).
        // So draws are taken for the choices of overflowing experts only.
        const Index experts = r.num_experts;
        fit(expert_start_, experts + 1);
        std::fill(expert_start_.begin(), expert_start_.end(), Index(0));
        for (Index c = 0; c < choices; ++c) ++expert_start_[r.choice_expert[c] + 1];
        for (Index e = 0; e < experts; ++e) expert_start_[e + 1] += expert_start_[e];
        fit(count_, experts);
        std::copy_n(expert_start_.begin(), experts, count_.begin());
        for (Index c = 0; c < choices; ++c) order_[count_[r.choice_expert[c]]++] = std::int32_t(c);
        for (Index e = 0; e < experts; ++e) {
          const Index begin = expert_start_[e], n = expert_start_[e + 1] - begin;
          if (capacity_ < 0 || n <= capacity_) continue;
          keyed_.clear();
          for (Index i = begin; i < begin + n; ++i) keyed_.emplace_back(u(choice_token_[order_[i]], e), order_[i]);
          std::partial_sort(keyed_.begin(), keyed_.begin() + capacity_, keyed_.end(), [](const auto& a, const auto& b) {
            return a.first != b.first ? a.first > b.first : a.second < b.second;
          });
          for (Index i = 0; i < n; ++i) order_[begin + i] = keyed_[i].second;
        }
        break;
      }
      case OverflowOrder::rank_major_by_score:  // choice c = token's first + rank
        std::iota(order_.begin(), order_.end(), 0);
        std::sort(order_.begin(), order_.end(), [&](auto a, auto b) {
          const auto ra = a % k_, rb = b % k_;
          if (ra != rb) return ra < rb;
          return choice_score_[a] != choice_score_[b] ? choice_score_[a] > choice_score_[b] : a < b;
        });
        break;
      case OverflowOrder::by_score:
        std::iota(order_.begin(), order_.end(), 0);
        std::sort(order_.begin(), order_.end(), [&](auto a, auto b) {
          return choice_score_[a] != choice_score_[b] ? choice_score_[a] > choice_score_[b] : a < b;
        });
        break;
      case OverflowOrder::by_weight:
        // a total order (weight, then token and rank), so the in-place sort is deterministic
        std::iota(order_.begin(), order_.end(), 0);
        std::sort(order_.begin(), order_.end(), [&](auto a, auto b) {
          return pre_weight_[a] != pre_weight_[b] ? pre_weight_[a] > pre_weight_[b] : a < b;
        });
        break;
      case OverflowOrder::batch_priority: {
        // the valid tokens by their first choice index (choice c = first + rank), sorted by
        // priority = the token's top score; ties keep token order (a stable sort, done as a
        // total order so the in-place sort needs no buffer)
        fit(token_order_, valid);
        for (Index i = 0; i < valid; ++i) token_order_[i] = std::int32_t(i * k_);
        std::sort(token_order_.begin(), token_order_.end(), [&](auto a, auto b) {
          const S pa = token_priority_[a / k_], pb = token_priority_[b / k_];
          return pa != pb ? pa > pb : a < b;
        });
        for (Index rank = 0, i = 0; rank < k_; ++rank)
          for (Index j = 0; j < valid; ++j) order_[i++] = std::int32_t(token_order_[j] + rank);
        break;
      }
    }
    return 1;
  }

  // by_masked_logit: expert e's column holds the logit of every token that chose e and 0 for
  // every other routed token; the choices among its top C entries (ties to the lower token) are
  // eligible. Per expert, the choices by descending logit: a positive one is preceded only by
  // larger choices, a negative one also by every zero entry, a zero one by the positive choices
  // and the zero entries of lower tokens.
  void masked_logit_eligible(const routing_type& r, MatrixIn<S> logits) {
    const Index choices = r.num_choices();
    fit(eligible_, choices);
    const auto logit = [&](Index c) { return logits(choice_token_[c], r.choice_expert[c]); };
    if (capacity_ < 0) {
      std::fill(eligible_.begin(), eligible_.end(), std::uint8_t(1));
      return;
    }
    fit(order_, choices);  // scratch here: the choices by (expert, logit descending, token)
    std::iota(order_.begin(), order_.end(), 0);
    std::sort(order_.begin(), order_.end(), [&](auto a, auto b) {
      const auto ea = r.choice_expert[a], eb = r.choice_expert[b];
      if (ea != eb) return ea < eb;
      const S la = logit(a), lb = logit(b);
      return la != lb ? la > lb : a < b;  // choice ids ascend with the token
    });
    for (Index g = 0; g < choices;) {
      Index end = g;
      while (end < choices && r.choice_expert[order_[end]] == r.choice_expert[order_[g]]) ++end;
      const Index others = routed_ - (end - g);  // routed tokens that did not choose the expert
      for (Index i = g; i < end; ++i) {
        const Index c = order_[i];
        const S v = logit(c);
        Index ahead = i - g;  // choices before it in the group
        if (v < 0) {
          ahead += others;
        } else if (v == 0) {  // also the others of lower tokens (rare: a logit of exactly 0)
          const Index t = choice_token_[c], routed_before = r.token_offsets[t] / k_;
          Index chosen_before = 0;
          for (Index j = g; j < end; ++j) chosen_before += choice_token_[order_[j]] < t;
          ahead += routed_before - chosen_before;
        }
        eligible_[std::size_t(c)] = ahead < capacity_;
      }
      g = end;
    }
  }

  Index k_;
  Options opt_;
  // scratch, sized once per shape; prepare sets the first three
  Index routed_ = 0, real_ = 0, capacity_ = -1;  // tokens given choices, tokens not masked, C
  std::vector<Index> token_offsets_;
  std::vector<std::int32_t> choice_expert_, choice_token_, order_, token_order_;
  std::vector<S> pre_weight_, choice_score_, token_priority_;
  std::vector<Index> count_;
  std::vector<std::uint8_t> eligible_;  // by_masked_logit, SecondExpert::random
  std::vector<Index> expert_start_;                   // OverflowOrder::random: choices by expert
  std::vector<std::pair<S, std::int32_t>> keyed_;     // ... and an overflowing expert's draws
  DrawState draw_state_{};
};

}  // namespace moe
