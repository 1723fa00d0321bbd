// Gates, the token-choice selector with every capacity rule, the losses and the Router presets,
// each checked against a reference written from docs/gates.md, docs/selectors.md and
// docs/losses.md (not from the code under test), plus finite-difference gradients in double and
// the bad-input contract.
#include <algorithm>
#include <array>
#include <cfloat>
#include <map>
#include <numeric>
#include <set>
#include <tuple>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::BalanceNorm;
using moe::Capacity;
using moe::OverflowOrder;
using moe::SlotOrder;
using moe::Weighting;

namespace {

// ---- reference top-k routing, straight from docs/selectors.md ---------------------------------

struct RefChoice {
  int token, rank, expert;
  bool kept = false;
  Index slot_in_expert = -1;  // position inside the expert's buffer
  double weight = 0;          // final combine weight (0 when dropped)
};

struct RefRouting {
  Index capacity = -1;
  std::vector<RefChoice> choices;  // every (token, rank) of the real tokens
};

// Every (token, rank) of the real tokens: top-k by stable sort (ties to the lower expert),
// the priority sequence by explicit sort keys, first C per expert, weights by the formulas.
template <class S>
RefRouting reference_route(const Matrix<S>& logits, const Matrix<S>& scores, Index k,
                           const typename moe::TopKSelector<S>::Options& opt,
                           const std::vector<std::uint8_t>& valid = {}, const Matrix<S>& uniform = {},
                           const Matrix<S>& rank = {}) {
  const Index T = scores.rows(), E = scores.cols();
  const auto is_valid = [&](Index t) { return valid.empty() || valid[t]; };
  RefRouting out;
  std::vector<std::vector<int>> top(T);
  Index n_valid = 0;
  for (Index t = 0; t < T; ++t) {
    if (!is_valid(t)) continue;
    ++n_valid;
    std::vector<int> idx(E);
    std::iota(idx.begin(), idx.end(), 0);
    const Matrix<S>& by = rank.size() ? rank : scores;  // the selection ranks by `rank` when given
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return by(t, a) > by(t, b); });
    top[t].assign(idx.begin(), idx.begin() + k);
    for (int r = 0; r < k; ++r) out.choices.push_back({int(t), r, top[t][r]});
  }
  // pre-drop weight of a choice, as the chosen weighting defines it
  const auto pre = [&](const RefChoice& c) -> double {
    const auto& e = top[c.token];
    if (opt.weighting == Weighting::raw) return opt.scale * scores(c.token, c.expert);
    if (opt.weighting == Weighting::softmax_of_kept_logits) {
      // max-subtracted, so that mathematically equal weights (k = 1) are equal in floating point
      double z = 0, top = logits(c.token, e[0]);
      for (int j : e) top = std::max(top, double(logits(c.token, j)));
      for (int j : e) z += std::exp(double(logits(c.token, j)) - top);
      return opt.scale * (std::exp(double(logits(c.token, c.expert)) - top) / z);
    }
    double z = 0;
    for (int j : e) z += scores(c.token, j);
    return opt.scale * (scores(c.token, c.expert) / std::max(z, double(FLT_EPSILON)));
  };
  const auto& cap = opt.capacity;
  if (cap.factor) {
    const double base = double(n_valid) * double(cap.times_k ? k : 1) * *cap.factor / double(E);
    double c = cap.rounding == moe::Rounding::ceil    ? std::ceil(base)
               : cap.rounding == moe::Rounding::round ? std::nearbyint(base)  // Python round: half to even
                                                      : std::floor(base);
    Index C = std::max(Index(c), cap.minimum);
    out.capacity = (C + cap.multiple_of - 1) / cap.multiple_of * cap.multiple_of;
  }
  // the priority sequence of docs/selectors.md (Capacity) as sort keys
  std::vector<std::size_t> seq(out.choices.size());
  std::iota(seq.begin(), seq.end(), 0);
  const auto key = [&](std::size_t i) {
    const auto& c = out.choices[i];
    const double top1 = scores.row(c.token).maxCoeff();
    switch (cap.overflow) {
      case OverflowOrder::rank_major: return std::make_tuple(double(c.rank), 0.0, double(c.token), 0.0);
      case OverflowOrder::token_major: return std::make_tuple(double(c.token), double(c.rank), 0.0, 0.0);
      case OverflowOrder::by_weight: return std::make_tuple(-pre(c), double(c.token), double(c.rank), 0.0);
      case OverflowOrder::batch_priority: return std::make_tuple(double(c.rank), -top1, double(c.token), 0.0);
      case OverflowOrder::by_score: return std::make_tuple(-double(scores(c.token, c.expert)), double(c.token), double(c.rank), 0.0);
      case OverflowOrder::rank_major_by_score: return std::make_tuple(double(c.rank), -double(scores(c.token, c.expert)), double(c.token), 0.0);
      case OverflowOrder::by_masked_logit: return std::make_tuple(double(c.token), double(c.rank), 0.0, 0.0);
      case OverflowOrder::random:  // the highest draw first; rank-major when there are none
        if (uniform.size() == 0) return std::make_tuple(double(c.rank), 0.0, double(c.token), 0.0);
        return std::make_tuple(-double(uniform(c.token, c.expert)), double(c.token), double(c.rank), 0.0);
    }
    return std::make_tuple(0.0, 0.0, 0.0, 0.0);
  };
  std::stable_sort(seq.begin(), seq.end(), [&](auto a, auto b) { return key(a) < key(b); });
  // by_masked_logit (DeepSpeed's 'probs'): expert e's column holds, for every routed token, its
  // logit if it chose e and 0 if not; the expert keeps the choices among the column's top C
  // (ties to the lower token)
  std::set<std::pair<int, int>> in_top_c;  // (token, expert)
  if (cap.overflow == OverflowOrder::by_masked_logit && out.capacity >= 0)
    for (Index e = 0; e < E; ++e) {
      std::vector<std::pair<double, int>> column;  // (-value, token): ascending = the column's order
      for (Index t = 0; t < T; ++t) {
        if (!is_valid(t)) continue;
        const bool chose = std::find(top[t].begin(), top[t].end(), int(e)) != top[t].end();
        column.emplace_back(chose ? -double(logits(t, e)) : 0.0, int(t));
      }
      std::sort(column.begin(), column.end());
      for (Index i = 0; i < std::min<Index>(out.capacity, Index(column.size())); ++i)
        in_top_c.insert({column[i].second, int(e)});
    }
  std::map<int, Index> taken;
  std::vector<std::size_t> kept_in_priority;
  for (auto i : seq) {
    auto& c = out.choices[i];
    if (cap.overflow == OverflowOrder::by_masked_logit && out.capacity >= 0 && !in_top_c.count({c.token, c.expert}))
      continue;
    if (out.capacity < 0 || taken[c.expert] < out.capacity) {
      c.kept = true;
      ++taken[c.expert];
      kept_in_priority.push_back(i);
    }
  }
  // slot inside the expert: by token, or by the order the slots were won
  std::map<int, Index> next;
  if (cap.slot_order == SlotOrder::token) {
    for (auto& c : out.choices)  // choices are listed in token order already
      if (c.kept) c.slot_in_expert = next[c.expert]++;
  } else {
    for (auto i : kept_in_priority) out.choices[i].slot_in_expert = next[out.choices[i].expert]++;
  }
  for (auto& c : out.choices) {
    if (!c.kept) continue;
    if (opt.weighting != Weighting::renormalize_after_drop) {
      c.weight = pre(c);
      continue;
    }
    double z = 0;
    for (const auto& o : out.choices)
      if (o.token == c.token && o.kept) z += scores(o.token, o.expert);
    c.weight = opt.scale * (scores(c.token, c.expert) / std::max(z, double(FLT_EPSILON)));
  }
  return out;
}

// The library's routing agrees with the reference choice by choice.
template <class S>
void require_matches(const moe::SparseRouting<S>& r, const RefRouting& ref, bool pad) {
  REQUIRE(r.capacity == ref.capacity);
  REQUIRE(r.num_choices() == Index(ref.choices.size()));
  for (Index c = 0; c < r.num_choices(); ++c) {
    const auto& want = ref.choices[c];
    INFO("token " << want.token << " rank " << want.rank);
    REQUIRE(r.token_offsets[want.token] + want.rank == c);
    REQUIRE(r.choice_expert[c] == want.expert);
    REQUIRE((r.choice_slot[c] >= 0) == want.kept);
    if (!want.kept) continue;
    const auto slot = r.choice_slot[c];
    REQUIRE(slot - r.expert_offsets[want.expert] == want.slot_in_expert);
    REQUIRE(r.slot_token[slot] == want.token);
    REQUIRE(r.slot_weight[slot] == Approx(want.weight).epsilon(forward_tol<S>(8)).margin(0));
  }
  for (Index e = 0; e < r.num_experts; ++e) {
    const auto kept = std::count_if(ref.choices.begin(), ref.choices.end(),
                                    [&](const RefChoice& c) { return c.kept && c.expert == e; });
    REQUIRE(r.expert_count[e] == kept);
    REQUIRE(r.slots_of(e) == (pad ? ref.capacity : Index(kept)));
  }
}

// Invariants every token-choice routing keeps, whatever the configuration.
template <class S>
void require_invariants(const moe::SparseRouting<S>& r, const std::vector<std::uint8_t>& valid) {
  REQUIRE(r.expert_offsets.front() == 0);
  REQUIRE(r.expert_offsets.back() == r.num_slots());
  for (Index e = 0; e < r.num_experts; ++e) {
    if (r.capacity >= 0) REQUIRE(r.slots_of(e) <= r.capacity);
    std::vector<int> seen;
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
      if (r.slot_token[s] >= 0) seen.push_back(r.slot_token[s]);
      else REQUIRE(r.slot_weight[s] == S(0));  // padding slots carry nothing
    std::sort(seen.begin(), seen.end());
    REQUIRE(std::adjacent_find(seen.begin(), seen.end()) == seen.end());  // no token twice
    REQUIRE(Index(seen.size()) == r.expert_count[e]);
    for (int t : seen) REQUIRE((valid.empty() || valid[t]));  // masked tokens never routed
  }
  for (Index t = 0; t < r.num_tokens; ++t)
    if (!valid.empty() && !valid[t]) REQUIRE(r.token_offsets[t] == r.token_offsets[t + 1]);
}

template <class S>
moe::SelectorInput<S> input_of(const Matrix<S>& logits, const Matrix<S>& scores,
                               const moe::TokenInputs<S>& tokens) {
  return {logits, scores, scores, tokens};
}

const std::vector<Weighting> all_weightings = {Weighting::raw, Weighting::renormalize_before_drop,
                                               Weighting::renormalize_after_drop,
                                               Weighting::softmax_of_kept_logits};
const std::vector<OverflowOrder> all_overflows = {OverflowOrder::rank_major, OverflowOrder::token_major,
                                                  OverflowOrder::by_weight, OverflowOrder::batch_priority,
                                                  OverflowOrder::by_score, OverflowOrder::by_masked_logit,
                                                  OverflowOrder::rank_major_by_score};

}  // namespace

// ---- gates ------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("gates match their formulas", "[gate]", float, double) {
  using S = TestType;
  Matrix<S> logits = random_matrix<S>(5, 7, 1, 3.0);
  logits(0, 0) = S(800);  // far outside exp's range: the stable forms must still be finite
  logits(1, 1) = S(-800);
  Matrix<S> p(5, 7);
  const S tol = forward_tol<S>(7);
  SECTION("softmax") {
    moe::SoftmaxGate<S>{}.forward(logits, p);
    for (Index t = 0; t < 5; ++t) {
      const double m = logits.row(t).maxCoeff();
      double z = 0;
      for (Index e = 0; e < 7; ++e) z += std::exp(double(logits(t, e)) - m);
      for (Index e = 0; e < 7; ++e)
        REQUIRE(double(p(t, e)) == Approx(std::exp(double(logits(t, e)) - m) / z).margin(tol));
    }
  }
  SECTION("sigmoid") {
    moe::SigmoidGate<S>{}.forward(logits, p);
    for (Index t = 0; t < 5; ++t)
      for (Index e = 0; e < 7; ++e)
        REQUIRE(double(p(t, e)) == Approx(1 / (1 + std::exp(-double(logits(t, e))))).margin(tol));
  }
  SECTION("sqrt-softplus") {
    moe::SqrtSoftplusGate<S>{}.forward(logits, p);
    for (Index t = 0; t < 5; ++t)
      for (Index e = 0; e < 7; ++e) {
        const double l = logits(t, e);
        const double want = std::sqrt(l > 30 ? l : std::log1p(std::exp(l)));
        REQUIRE(double(p(t, e)) == Approx(want).epsilon(tol).margin(tol));
      }
  }
}

template <class Gate>
void check_gate_gradient() {
  Matrix<double> logits = random_matrix<double>(4, 6, 2, 2.0);
  const Matrix<double> weight = random_matrix<double>(4, 6, 3);
  Gate gate;
  Matrix<double> p(4, 6), dlogits = Matrix<double>::Zero(4, 6);
  gate.forward(logits, p);
  gate.backward(logits, p, weight, dlogits);
  const auto numeric = numeric_gradient(logits, [&] {
    Matrix<double> q(4, 6);
    Gate{}.forward(logits, q);
    return q.cwiseProduct(weight).sum();
  });
  require_gradient_close(dlogits, numeric);
}

TEST_CASE("gate backward matches finite differences", "[gate][gradient]") {
  check_gate_gradient<moe::SoftmaxGate<double>>();
  check_gate_gradient<moe::SigmoidGate<double>>();
  check_gate_gradient<moe::SqrtSoftplusGate<double>>();
}

// ---- the selector on a hand-worked case ---------------------------------------------------

// Four tokens, two experts, C = 2 (factor 0.5 x k=2 x 4 tokens / 2 experts). Worked by hand:
// rank-major:     t0->e0, t1->e0, t2->e1, t3->e0 full;  t0->e1, rest full
// token-major:    t0->e0, t0->e1, t1->e0, t1->e1; t2, t3 find both full
// by weight:      e0 keeps t3 (.9), t0 (.7); e1 keeps t2 (.8), t1 (.4)
// batch priority: t3->e0, t2->e1, t0->e0, t1 dropped; then t3->e1, the rest full
TEST_CASE("top-2 capacity orders on a hand-worked case", "[selector]") {
  Matrix<double> scores(4, 2);
  scores << 0.7, 0.3, 0.6, 0.4, 0.2, 0.8, 0.9, 0.1;
  const Matrix<double> logits = scores.array().log().matrix();
  const moe::TokenInputs<double> tokens;
  const auto run = [&](OverflowOrder order) {
    moe::TopKSelector<double, 2> sel({.weighting = Weighting::renormalize_after_drop,
                                      .capacity = {.factor = 0.5, .overflow = order}});
    moe::SparseRouting<double> r;
    sel.forward(input_of(logits, scores, tokens), r);
    REQUIRE(r.capacity == 2);
    // kept (token, expert) pairs with their weights
    std::map<std::pair<int, int>, double> kept;
    for (Index t = 0; t < 4; ++t)
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        if (r.choice_slot[c] >= 0) kept[{int(t), r.choice_expert[c]}] = r.slot_weight[r.choice_slot[c]];
    return kept;
  };
  using K = std::map<std::pair<int, int>, double>;
  CHECK(run(OverflowOrder::rank_major) == K{{{0, 0}, 0.7}, {{0, 1}, 0.3}, {{1, 0}, 1.0}, {{2, 1}, 1.0}});
  CHECK(run(OverflowOrder::token_major) == K{{{0, 0}, 0.7}, {{0, 1}, 0.3}, {{1, 0}, 0.6}, {{1, 1}, 0.4}});
  CHECK(run(OverflowOrder::by_weight) == K{{{3, 0}, 1.0}, {{0, 0}, 1.0}, {{2, 1}, 1.0}, {{1, 1}, 1.0}});
  CHECK(run(OverflowOrder::batch_priority) == K{{{3, 0}, 0.9}, {{3, 1}, 0.1}, {{2, 1}, 1.0}, {{0, 0}, 1.0}});
}

// ---- the selector against the reference, every configuration ------------------------------

TEMPLATE_TEST_CASE("top-k selector matches the reference for every capacity rule", "[selector]",
                   float, double) {
  using S = TestType;
  const Index T = 37, E = 6;
  const Matrix<S> logits = random_matrix<S>(T, E, 11, 2.0);
  Matrix<S> scores(T, E);
  moe::SoftmaxGate<S>{}.forward(logits, scores);
  std::vector<std::uint8_t> valid(T, 1);
  for (Index t = 0; t < T; t += 5) valid[t] = 0;
  const Capacity rules[] = {
      {},                                                                      // dropless
      {.factor = 1.0},                                                         // Megatron
      {.factor = 0.8, .minimum = 3},                                           // DeepSpeed-like
      {.factor = 1.0, .times_k = false, .rounding = moe::Rounding::round, .minimum = 4},  // flaxformer
      {.factor = 0.7, .multiple_of = 4},                                       // vmoe
      {.factor = 0.6, .rounding = moe::Rounding::floor, .pad = true},          // padded
  };
  for (const Index k : {1, 2, 3, 6})
    for (auto rule : rules)
      for (auto overflow : all_overflows)
        for (auto slot_order : {SlotOrder::token, SlotOrder::priority})
          for (auto weighting : all_weightings)
            for (bool masked : {false, true}) {
              rule.overflow = overflow;
              rule.slot_order = slot_order;
              const typename moe::TopKSelector<S>::Options opt{.weighting = weighting, .scale = 1.5, .capacity = rule};
              const auto mask = masked ? valid : std::vector<std::uint8_t>{};
              const moe::TokenInputs<S> tokens{.valid = mask};
              moe::TopKSelector<S> sel(k, opt);
              moe::SparseRouting<S> r;
              sel.forward(input_of(logits, scores, tokens), r);
              INFO("k " << k << " factor " << rule.factor.value_or(-1) << " overflow " << int(overflow)
                        << " slots " << int(slot_order) << " weighting " << int(weighting) << " masked " << masked);
              require_matches(r, reference_route(logits, scores, k, opt, mask), rule.pad);
              require_invariants(r, mask);
            }
}

TEST_CASE("weights sum as the weighting promises", "[selector]") {
  const Index T = 50, E = 8, k = 3;
  const Matrix<double> logits = random_matrix<double>(T, E, 5, 2.0);
  Matrix<double> scores(T, E);
  moe::SoftmaxGate<double>{}.forward(logits, scores);
  const moe::TokenInputs<double> tokens;
  const double tol = forward_tol<double>(k);
  const auto sums = [&](Weighting w, Capacity cap) {
    moe::TopKSelector<double> sel(k, {.weighting = w, .scale = 2.0, .capacity = cap});
    moe::SparseRouting<double> r;
    sel.forward(input_of(logits, scores, tokens), r);
    std::vector<std::pair<double, Index>> out;  // (sum of kept weights, kept count)
    for (Index t = 0; t < T; ++t) {
      double s = 0;
      Index kept = 0;
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        if (r.choice_slot[c] >= 0) s += r.slot_weight[r.choice_slot[c]], ++kept;
      out.push_back({s, kept});
    }
    return out;
  };
  for (auto [s, kept] : sums(Weighting::softmax_of_kept_logits, {})) REQUIRE(s == Approx(2.0).margin(tol));
  for (auto [s, kept] : sums(Weighting::renormalize_before_drop, {})) REQUIRE(s == Approx(2.0).margin(tol));
  Index partial = 0;
  for (auto [s, kept] : sums(Weighting::renormalize_after_drop, {.factor = 0.5}))
    if (kept > 0) REQUIRE(s == Approx(2.0).margin(tol)); else ++partial;
  for (auto [s, kept] : sums(Weighting::renormalize_before_drop, {.factor = 0.5})) {
    REQUIRE(s <= 2.0 + tol);
    partial += s < 2.0 - tol;
  }
  REQUIRE(partial > 0);  // the factor really dropped something, so the checks above had teeth
}

// ---- losses -----------------------------------------------------------------------------------

namespace {
// L = factor * sum_e f_e P_e with f, P and factor per docs/losses.md, from the dense top-k form.
double reference_balance(BalanceNorm norm, const Matrix<double>& scores,
                         const moe::SparseRouting<double>& r, const std::vector<std::uint8_t>& valid) {
  moe::IndexMatrix experts;
  Matrix<double> w;
  moe::to_topk_form(r, experts, w);
  const Index E = scores.cols();
  double T = 0, k = double(experts.cols());
  std::vector<double> count(E, 0), top1(E, 0), psum(E, 0);
  for (Index t = 0; t < scores.rows(); ++t) {
    if (!valid.empty() && !valid[t]) continue;
    T += 1;
    for (Index e = 0; e < E; ++e) psum[e] += scores(t, e);
    top1[experts(t, 0)] += 1;
    for (Index j = 0; j < experts.cols(); ++j) count[experts(t, j)] += 1;
  }
  double sum = 0;
  for (Index e = 0; e < E; ++e) {
    const double P = psum[e] / T;
    switch (norm) {
      case BalanceNorm::switch_top1: sum += E * (top1[e] / T) * P; break;
      case BalanceNorm::topk_mean: sum += (E / k) * (count[e] / T) * P; break;
      case BalanceNorm::megatron: sum += E * (count[e] / (k * T)) * P; break;
      case BalanceNorm::flaxformer: sum += E * (count[e] / T) * P; break;
      case BalanceNorm::fastmoe_balance: sum += E * (count[e] / (T * k)) * (psum[e] / (T * k)); break;
    }
  }
  return sum;
}

const std::vector<BalanceNorm> all_norms = {BalanceNorm::switch_top1, BalanceNorm::topk_mean,
                                            BalanceNorm::megatron, BalanceNorm::flaxformer,
                                            BalanceNorm::fastmoe_balance};
}  // namespace

TEST_CASE("load-balancing loss: every normalisation, and its value at perfect balance", "[loss]") {
  const Index E = 4, k = 2;
  SECTION("random routing with a mask, against the reference") {
    const Index T = 30;
    const Matrix<double> logits = random_matrix<double>(T, E, 21, 1.5);
    Matrix<double> scores(T, E);
    moe::SoftmaxGate<double>{}.forward(logits, scores);
    std::vector<std::uint8_t> valid(T, 1);
    valid[3] = valid[17] = 0;
    const moe::TokenInputs<double> tokens{.valid = valid};
    moe::TopKSelector<double> sel(k, {.capacity = {.factor = 0.5}});  // drops must not change f
    moe::SparseRouting<double> r;
    sel.forward(input_of(logits, scores, tokens), r);
    REQUIRE(r.num_dropped() > 0);
    for (auto norm : all_norms) {
      const moe::LoadBalanceLoss<double> loss(norm, 1.0);
      const double got = loss.forward({logits, scores, r, tokens});
      REQUIRE(got == Approx(reference_balance(norm, scores, r, valid)).epsilon(forward_tol<double>(T * E)));
    }
  }
  SECTION("perfect balance gives each reference's documented value") {
    // 8 tokens, uniform scores; token t picks experts t%4 and (t+1)%4: every count equal
    const Index T = 8;
    Matrix<double> scores = Matrix<double>::Constant(T, E, 0.25);
    for (Index t = 0; t < T; ++t) scores(t, t % E) += 1e-3, scores(t, (t + 1) % E) += 5e-4;
    const Matrix<double> uniform = Matrix<double>::Constant(T, E, 0.25);
    const moe::TokenInputs<double> tokens;
    moe::TopKSelector<double> sel(k);
    moe::SparseRouting<double> r;
    sel.forward(input_of(scores, scores, tokens), r);
    const auto value = [&](BalanceNorm n) { return moe::LoadBalanceLoss<double>(n, 1.0).forward({uniform, uniform, r, tokens}); };
    const double tol = forward_tol<double>(T * E);
    CHECK(value(BalanceNorm::switch_top1) == Approx(1.0).epsilon(tol));
    CHECK(value(BalanceNorm::topk_mean) == Approx(1.0).epsilon(tol));
    CHECK(value(BalanceNorm::megatron) == Approx(1.0).epsilon(tol));
    CHECK(value(BalanceNorm::flaxformer) == Approx(double(k)).epsilon(tol));
    CHECK(value(BalanceNorm::fastmoe_balance) == Approx(1.0 / k).epsilon(tol));
  }
}

TEST_CASE("by_masked_logit: a chosen negative logit loses to the tokens that did not choose", "[selector]") {
  // tokens 0 and 1 choose expert 0 with negative logits, tokens 2 and 3 choose expert 1; C = 2.
  // Expert 0's column is (-1, -0.5, 0, 0): its top 2 are tokens 2 and 3, which did not choose
  // it, so both of its choices drop although it has room (DeepSpeed's 'probs' policy).
  Matrix<double> logits(4, 2);
  logits << -1, -2, -0.5, -3, 0.1, 2, 0.3, 1;
  const auto route = [&](OverflowOrder order) {
    moe::Router router(moe::LinearScorer<double>(2, 2), moe::SoftmaxGate<double>{},
                       moe::TopKSelector<double, 1>({.capacity = {.factor = 1.0, .overflow = order}}));
    const auto r = router.route(logits);
    return r.choice_slot;
  };
  const auto masked = route(OverflowOrder::by_masked_logit);
  REQUIRE(masked[0] == -1);
  REQUIRE(masked[1] == -1);
  REQUIRE(masked[2] >= 0);
  REQUIRE(masked[3] >= 0);
  for (const auto order : {OverflowOrder::by_score, OverflowOrder::by_weight, OverflowOrder::token_major})
    for (const auto slot : route(order)) REQUIRE(slot >= 0);  // C = 2 holds every choice
  // the preset uses it
  REQUIRE(moe::make_deepspeed_topk_router<double>(2, 3, 3).selector().options().capacity.overflow ==
          OverflowOrder::by_masked_logit);
}

TEST_CASE("padding conventions: capacity, routing and balance loss as each reference counts them",
          "[selector][loss]") {
  using moe::Padding;
  const Index T = 8, E = 4, k = 2, real = 5;
  const Matrix<double> logits = random_matrix<double>(T, E, 91, 2.0);
  const std::vector<std::uint8_t> valid{1, 0, 1, 1, 0, 1, 0, 1};
  // the oracle: softmax and the top-2 of every row, by hand
  Matrix<double> g(T, E);
  std::vector<std::array<int, 2>> top(T);
  for (Index t = 0; t < T; ++t) {
    const double m = logits.row(t).maxCoeff();
    g.row(t) = (logits.row(t).array() - m).exp().matrix();
    g.row(t) /= g.row(t).sum();
    std::array<int, 4> idx{0, 1, 2, 3};
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return g(t, a) > g(t, b); });
    top[t] = {idx[0], idx[1]};
  }
  const auto expected_loss = [&](Padding p) {
    // E sum_e f_e P_e, f = count of the real tokens' choices / (k T_p), P = score sum / T_p,
    // where T_p and the rows P sums over are all T under fairseq's convention, else the real ones
    const double over = p == Padding::fairseq ? double(T) : double(real);
    std::array<double, 4> count{}, sum{};
    for (Index t = 0; t < T; ++t) {
      if (valid[t])
        for (int e : top[t]) count[e] += 1;
      if (valid[t] || p == Padding::fairseq)
        for (Index e = 0; e < E; ++e) sum[e] += g(t, e);
    }
    double value = 0;
    for (Index e = 0; e < E; ++e) value += E * (count[e] / (k * over)) * (sum[e] / over);
    return value;
  };
  struct Case {
    Padding padding;
    Index capacity;    // ceil(k cf N / E), N the tokens counted
    bool padding_routed;
  };
  for (const Case c : {Case{Padding::excluded, 3, false}, Case{Padding::fairseq, 4, false},
                       Case{Padding::megatron, 4, true}}) {
    INFO("padding convention " << int(c.padding));
    moe::Router router(moe::LinearScorer<double>(3, E), moe::SoftmaxGate<double>{},
                       moe::TopKSelector<double>(k, {.capacity = {.factor = 1.0}, .padding = c.padding}),
                       moe::LoadBalanceLoss<double>(BalanceNorm::megatron, 1.0, c.padding));
    const auto& r = router.route(logits, {.valid = valid});
    REQUIRE(r.capacity == c.capacity);
    REQUIRE(r.num_valid_tokens == real);
    for (Index t = 0; t < T; ++t) {
      const Index choices = r.token_offsets[t + 1] - r.token_offsets[t];
      REQUIRE(choices == (valid[t] || c.padding_routed ? k : 0));
      for (Index j = 0; j < choices; ++j) REQUIRE(r.choice_expert[r.token_offsets[t] + j] == top[t][j]);
    }
    for (Index e = 0; e < E; ++e) REQUIRE(r.expert_count[e] <= c.capacity);
    REQUIRE(router.loss_values()[0] == Approx(expected_loss(c.padding)).epsilon(forward_tol<double>(T * E)));
  }
  // the three values differ on this batch, so each test above pins its own convention
  REQUIRE(expected_loss(Padding::fairseq) != Approx(expected_loss(Padding::excluded)));

  // the presets follow their references: fairseq for Switch (DeepSpeed's used_token) and GShard,
  // Megatron for the Mixtral-style top-k; a user can ask for the library's own instead
  const Matrix<double> x = random_matrix<double>(T, 3, 92);
  const moe::TokenInputs<double> tokens{.valid = valid};
  REQUIRE(moe::make_switch_router<double>(3, E).forward(x, tokens).capacity == 3);  // ceil(1.25 * 8 / 4)
  REQUIRE(moe::make_switch_router<double>(3, E, 1.25, 0, Padding::excluded).forward(x, tokens).capacity == 2);
  REQUIRE(moe::make_gshard_router<double>(3, E).forward(x, tokens).capacity == 4);  // 2 ceil(8 / 4)
  REQUIRE(moe::make_topk_router<double>(3, E).forward(x, tokens).num_choices() == T * k);
  REQUIRE(moe::make_topk_router<double>(3, E, 2, 0, Padding::excluded).forward(x, tokens).num_choices() == real * k);
}

TEST_CASE("z-loss matches its formula", "[loss]") {
  const Index T = 9, E = 5;
  const Matrix<double> logits = random_matrix<double>(T, E, 31, 4.0);
  std::vector<std::uint8_t> valid(T, 1);
  valid[0] = 0;
  const moe::TokenInputs<double> tokens{.valid = valid};
  moe::SparseRouting<double> r;
  r.reset(T, E);
  r.num_valid_tokens = T - 1;
  double want = 0;
  for (Index t = 1; t < T; ++t) {
    double z = 0;
    for (Index e = 0; e < E; ++e) z += std::exp(double(logits(t, e)));
    want += std::log(z) * std::log(z) / double(T - 1);
  }
  REQUIRE(moe::ZLoss<double>(1.0).forward({logits, logits, r, tokens}) == Approx(want).epsilon(forward_tol<double>(T * E)));
}

// ---- the Router: gradients by finite differences ------------------------------------------

namespace {
// masked: tokens 1 and T-2 are padding; `padding_gradient`: whether the convention lets them
// have a gradient (routed under megatron, in the balance loss's mean under fairseq).
template <class Router>
void check_router_gradient(Router router, Index T, std::uint64_t seed, bool masked = false,
                           bool padding_gradient = false, std::span<const std::int32_t> segment = {}) {
  const Index D = router.input_dim(), E = router.num_experts();
  Matrix<double> x = random_matrix<double>(T, D, seed, 1.0);
  const Matrix<double> R = random_matrix<double>(T, E, seed + 1);
  std::vector<std::uint8_t> valid(T, 1);
  if (masked) valid[1] = valid[T - 2] = 0;
  const moe::TokenInputs<double> tokens{.valid = masked ? std::span<const std::uint8_t>(valid) : std::span<const std::uint8_t>(),
                                        .segment = segment};
  // scale the router so that logits are O(1) and routing decisions stay away from ties
  router.scorer().weight() *= 3.0;
  slot_objective(router, x, R, tokens);
  const Matrix<double> dx = slot_backward(router, x, R, tokens);
  Matrix<double> dweight;
  router.for_each_parameter([&](std::string_view name, auto, auto grad) {
    if (name == "router.weight") dweight = grad;
  });
  const auto f = [&] { return slot_objective(router, x, R, tokens); };
  require_gradient_close(dx, numeric_gradient(x, f));
  require_gradient_close(dweight, numeric_gradient(router.scorer().weight(), f));
  if (masked) REQUIRE(dx.row(1).isZero(0) == !padding_gradient);
}

template <class Gate>
void check_gate_router_gradients(Weighting w, Capacity cap, Index k) {
  using R = moe::Router<moe::LinearScorer<double>, Gate, moe::TopKSelector<double>,
                        moe::LoadBalanceLoss<double>, moe::ZLoss<double>>;
  check_router_gradient(R(moe::LinearScorer<double>(5, 6, {.bias = true, .seed = 3}), Gate{},
                          moe::TopKSelector<double>(k, {.weighting = w, .scale = 1.3, .capacity = cap}),
                          moe::LoadBalanceLoss<double>(BalanceNorm::megatron, 0.1),
                          moe::ZLoss<double>(0.01)),
                        14, 40, true);
}
}  // namespace

TEST_CASE("router gradients: presets", "[router][gradient]") {
  check_router_gradient(moe::make_switch_router<double>(6, 4, 1.0), 16, 1);
  check_router_gradient(moe::make_gshard_router<double>(6, 4, 0.75), 16, 2);
  check_router_gradient(moe::make_topk_router<double>(6, 5, 3), 16, 3, true, true);  // megatron
  check_router_gradient(moe::make_topk_router<double>(6, 5, 3, 0, moe::Padding::excluded), 16, 3, true);
  check_router_gradient(moe::make_gshard_router<double>(6, 4, 0.75), 16, 5, true, true);  // fairseq
  check_router_gradient(moe::make_switch_router<double>(6, 4, 1.0), 16, 6, true, true);
  check_router_gradient(moe::make_deepspeed_topk_router<double>(6, 5, 3, 0.6, 2), 16, 4);
}

TEST_CASE("router gradients: every weighting, capacity and gate", "[router][gradient]") {
  for (auto w : all_weightings)
    for (const Capacity& cap : {Capacity{}, Capacity{.factor = 0.6, .overflow = OverflowOrder::by_weight},
                                Capacity{.factor = 0.7, .pad = true, .overflow = OverflowOrder::token_major}}) {
      INFO("weighting " << int(w) << " factor " << cap.factor.value_or(-1));
      check_gate_router_gradients<moe::SoftmaxGate<double>>(w, cap, 2);
      check_gate_router_gradients<moe::SigmoidGate<double>>(w, cap, 2);
      check_gate_router_gradients<moe::SqrtSoftplusGate<double>>(w, cap, 3);
    }
}

// ---- the Router: end to end against the reference, determinism, edge cases ----------------

TEMPLATE_TEST_CASE("Router routes as the reference on its own logits", "[router]", float, double) {
  using S = TestType;
  auto router = moe::make_deepspeed_topk_router<S>(8, 6, 3, 1.0, 4);
  const Matrix<S> x = random_matrix<S>(40, 8, 9);
  const auto& r = router.forward(x);
  // the logits are x W^T: recomputed here, the reference routes them independently
  const Matrix<S> logits = x * router.scorer().weight().transpose();
  REQUIRE(router.logits().isApprox(logits, forward_tol<S>(8)));
  Matrix<S> scores(40, 6);
  moe::SoftmaxGate<S>{}.forward(router.logits(), scores);
  require_matches(r, reference_route(Matrix<S>(router.logits()), scores, 3, router.selector().options()), false);
}

TEST_CASE("same input, bit-identical routing and gradients", "[router]") {
  auto a = moe::make_gshard_router<float>(8, 4, 0.8);
  const Matrix<float> x = random_matrix<float>(64, 8, 12);
  const auto first = a.forward(x);
  const auto second = a.forward(x);
  REQUIRE(first.slot_token == second.slot_token);
  REQUIRE(first.slot_weight == second.slot_weight);
  REQUIRE(first.choice_slot == second.choice_slot);
}

namespace {
// A loss of sum_t sum_e scores[t, e]^2 / T that reads the score matrix in forward, or (Reads =
// false) declares it does not and only records how many score rows forward handed it.
template <bool Reads>
struct ScoreSquares {
  using scalar_type = double;
  static constexpr bool reads_score_matrix = Reads;
  mutable Index rows_seen = -1;
  double coefficient() const { return 0.5; }
  double forward(const moe::LossInput<double>& in) const {
    rows_seen = in.scores.rows();
    return Reads ? in.scores.squaredNorm() / double(in.logits.rows()) : 0.0;
  }
  void backward(const moe::LossInput<double>& in, moe::MatrixOut<double>, moe::MatrixOut<double> dscores) const {
    dscores += coefficient() * 2.0 / double(in.logits.rows()) * in.scores;
  }
};
}  // namespace

TEST_CASE("forward writes the score matrix only when a loss reads it", "[router]") {
  const Index T = 300, D = 5, E = 6;  // several gating blocks and a ragged last one
  const auto make = [&]<bool Reads>(std::bool_constant<Reads>) {
    return moe::Router(moe::LinearScorer<double>(D, E, {.seed = 8}), moe::SoftmaxGate<double>{},
                       moe::TopKSelector<double>(2, {.weighting = Weighting::renormalize_after_drop,
                                                     .capacity = {.factor = 0.8}}),
                       moe::LoadBalanceLoss<double>(BalanceNorm::switch_top1, 0.1), ScoreSquares<Reads>{});
  };
  auto keeps = make(std::true_type{});
  auto recomputes = make(std::false_type{});
  const Matrix<double> x = random_matrix<double>(T, D, 21, 2.0);
  const auto& a = keeps.forward(x);
  const auto& b = recomputes.forward(x);
  REQUIRE(keeps.loss<1>().rows_seen == T);
  REQUIRE(recomputes.loss<1>().rows_seen == 0);
  REQUIRE(a.slot_token == b.slot_token);
  REQUIRE(a.slot_weight == b.slot_weight);
  REQUIRE(a.choice_slot == b.choice_slot);
  REQUIRE(keeps.loss_values()[0] == recomputes.loss_values()[0]);
  // the recomputed scores are the kept ones, bit for bit, and the softmax of the logits
  Matrix<double> want(T, E);
  for (Index t = 0; t < T; ++t) want.row(t) = (keeps.logits().row(t).array() - keeps.logits().row(t).maxCoeff()).exp();
  for (Index t = 0; t < T; ++t) want.row(t) /= want.row(t).sum();
  REQUIRE(recomputes.scores() == keeps.scores());
  REQUIRE(keeps.scores().isApprox(want, forward_tol<double>(E)));
  // so are the gradients: backward reads the same scores, kept or recomputed
  const Matrix<double> R = random_matrix<double>(T, E, 22);
  std::vector<double> dw(std::size_t(a.num_slots()));
  for (Index e = 0; e < E; ++e)
    for (Index s = a.expert_offsets[e]; s < a.expert_offsets[e + 1]; ++s)
      dw[std::size_t(s)] = a.slot_token[s] >= 0 ? R(a.slot_token[s], e) : 0.0;
  const Matrix<double> dl_keeps = keeps.backward_logits({}, dw);
  REQUIRE(recomputes.backward_logits({}, dw) == dl_keeps);
  REQUIRE(!dl_keeps.isZero(0));
}

TEST_CASE("an empty batch is valid", "[router]") {
  auto router = moe::make_topk_router<double>(4, 3, 2);
  const Matrix<double> x(0, 4);
  const auto& r = router.forward(x);
  REQUIRE(r.num_slots() == 0);
  REQUIRE(r.num_choices() == 0);
  REQUIRE(r.expert_offsets == std::vector<Index>(4, 0));
  REQUIRE(router.loss_values()[0] == 0);
  REQUIRE(router.loss_values()[1] == 0);
  Matrix<double> dx(0, 4);
  router.backward(x, {}, {}, dx);
  auto capped = moe::make_switch_router<double>(4, 3);
  REQUIRE(capped.forward(x).capacity == 0);
}

// ---- bad input --------------------------------------------------------------------------------

namespace {
template <class Error, class F>
void require_error(F&& f, std::vector<std::string> words) {
  try {
    f();
    FAIL("no exception");
  } catch (const Error& e) {
    const std::string what = e.what();
    REQUIRE(dynamic_cast<const moe::error*>(&e) != nullptr);
    for (const auto& w : words) {
      INFO(what);
      REQUIRE(what.find(w) != std::string::npos);
    }
  }
}
}  // namespace

TEST_CASE("bad configuration throws config_error naming argument, value and rule", "[errors]") {
  require_error<moe::config_error>([] { moe::TopKSelector<float>(0); }, {"'k'", "= 0", "k >= 1"});
  require_error<moe::config_error>([] { moe::TopKSelector<float>(2, {.capacity = {.factor = 0.0}}); },
                                   {"capacity.factor", "= 0", "> 0"});
  require_error<moe::config_error>([] { moe::TopKSelector<float>(2, {.capacity = {.factor = -1.0}}); },
                                   {"capacity.factor", "= -1"});
  require_error<moe::config_error>([] { moe::LinearScorer<float>(4, 0); }, {"num_experts", "= 0"});
  // k > E is known as soon as the router is composed, before any batch
  require_error<moe::config_error>(
      [] { moe::Router(moe::LinearScorer<double>(4, 3), moe::SoftmaxGate<double>{}, moe::TopKSelector<double>(4)); },
      {"'k'", "= 4", "k <= number of experts (3)"});
  require_error<moe::config_error>([] { moe::make_topk_router<float>(4, 3, 5); }, {"'k'", "= 5", "(3)"});
  require_error<moe::config_error>(
      [] { moe::Router(moe::LinearScorer<float>(4, 1), moe::SoftmaxGate<float>{}, moe::TopKSelector<float, 2>{}); },
      {"'k'", "= 2", "(1)"});
}

TEST_CASE("a static-k selector takes an empty brace list as default options", "[selector]") {
  // ({}) would be ambiguous between Options and the move constructor without the list overload
  const moe::TopKSelector<float, 1> braces({});
  const moe::TopKSelector<float, 1> defaults;
  REQUIRE(braces.k() == 1);
  REQUIRE(braces.options().weighting == defaults.options().weighting);
  REQUIRE_FALSE(braces.options().capacity.limited());
  const moe::TopKSelector<float, 2> designated({.weighting = Weighting::renormalize_before_drop});
  REQUIRE(designated.options().weighting == Weighting::renormalize_before_drop);
}

TEST_CASE("bad input throws before anything is written", "[errors]") {
  auto router = moe::make_topk_router<double>(4, 3, 2);
  const Matrix<double> good = random_matrix<double>(6, 4, 1);
  const auto before = router.forward(good);  // a routing that must survive every failure
  const auto unchanged = [&] {
    REQUIRE(router.routing().slot_token == before.slot_token);
    REQUIRE(router.routing().slot_weight == before.slot_weight);
  };
  SECTION("k > E, for a selector used on its own: rejected at the batch") {
    moe::TopKSelector<double> selector(4);
    const Matrix<double> logits = random_matrix<double>(6, 3, 2);
    moe::SparseRouting<double> r;
    require_error<moe::config_error>([&] { selector.forward({logits, logits, logits, {}}, r); },
                                     {"'k'", "= 4", "k <= number of experts (3)"});
    REQUIRE(r.num_tokens == 0);
  }
  SECTION("backward before any forward") {
    auto fresh = moe::make_topk_router<double>(4, 3, 2);
    Matrix<double> dx(6, 4);
    require_error<moe::config_error>([&] { fresh.backward(good, {}, {}, dx); }, {"'forward'", "not run"});
    require_error<moe::config_error>([&] { fresh.backward_logits({}, {}); }, {"'forward'", "not run"});
  }
  SECTION("backward with a gradient of the wrong length") {
    Matrix<double> dx(6, 4);
    const std::vector<double> short_dw(std::size_t(before.num_slots() - 1), 1.0);
    require_error<moe::shape_error>([&] { router.backward(good, {}, short_dw, dx); },
                                    {"dslot_weight.size", std::to_string(before.num_slots())});
  }
  SECTION("width mismatch") {
    const Matrix<double> wide = random_matrix<double>(6, 5, 1);
    require_error<moe::shape_error>([&] { router.forward(wide); }, {"'x'", "[6 x 5]", "[6 x 4]"});
    unchanged();
  }
  SECTION("mask of the wrong length") {
    const std::vector<std::uint8_t> valid(5, 1);
    require_error<moe::shape_error>([&] { router.forward(good, {.valid = valid}); }, {"tokens.valid", "= 5"});
    unchanged();
  }
  SECTION("NaN and Inf in x or in the logits") {
    Matrix<double> bad = good;
    bad(2, 1) = std::numeric_limits<double>::quiet_NaN();
    // named where the user can fix it: the entry of x, not the logits it spoiled
    require_error<moe::value_error>([&] { router.forward(bad); }, {"'x'", "nan at (2, 1)", "finite"});
    unchanged();
    // finite x whose logits overflow: the logits are what is not finite
    const Matrix<double> huge = Matrix<double>::Constant(6, 4, 1e300);
    router.scorer().weight().setConstant(1e300);
    require_error<moe::value_error>([&] { router.forward(huge); }, {"'logits'", "inf at (0, 0)"});
    unchanged();
    Matrix<double> logits = Matrix<double>::Zero(6, 3);
    logits(4, 2) = std::numeric_limits<double>::infinity();
    require_error<moe::value_error>([&] { router.route(logits); }, {"'logits'", "inf at (4, 2)"});
    unchanged();
  }
  SECTION("a NaN in the last gating block, after the selector has run on the others") {
    const Index T = 5000;  // many blocks of the gating loop
    auto big = moe::make_gshard_router<double>(4, 3, 1.0);
    const Matrix<double> x = random_matrix<double>(T, 4, 3);
    const auto first = big.forward(x);
    const Matrix<double> scores = big.scores();
    const auto losses = big.loss_values();
    Matrix<double> bad = random_matrix<double>(T, 4, 4);
    bad(T - 1, 0) = std::numeric_limits<double>::quiet_NaN();
    require_error<moe::value_error>([&] { big.forward(bad); }, {"'x'", "nan at (4999, 0)"});
    REQUIRE(big.routing().slot_token == first.slot_token);
    REQUIRE(big.routing().slot_weight == first.slot_weight);
    REQUIRE(big.routing().choice_expert == first.choice_expert);
    REQUIRE(big.scores() == scores);
    REQUIRE(big.loss_values() == losses);
  }
}

// ---- X-MoE: the cosine scorer and XMoERouter (docs/scorers.md, docs/routers.md) --------------

namespace {
using moe::CosineForm;
using moe::CosineScorer;

// The logits straight from the formula of docs/scorers.md (CosineScorer), in double:
// h = x W_proj^T; u = h / max(|h|, eps) (paper) or h (torchscale); e^ = e / max(|e|, eps);
// l = <u, e^> / max(tau, tau_min) (paper) or <u, e^> (torchscale).
template <class S>
Matrix<double> cosine_logits_oracle(const Matrix<S>& x, const Matrix<S>& proj, const Matrix<S>& emb,
                                    bool paper, double tau, double eps = 1e-4, double tau_min = 1e-4) {
  const Index T = x.rows(), D = x.cols(), r = proj.rows(), E = emb.rows();
  Matrix<double> out(T, E);
  for (Index t = 0; t < T; ++t) {
    std::vector<double> h(std::size_t(r), 0.0);
    for (Index i = 0; i < r; ++i)
      for (Index d = 0; d < D; ++d) h[i] += double(x(t, d)) * double(proj(i, d));
    double hn = 0;
    for (double v : h) hn += v * v;
    hn = std::sqrt(hn);
    for (Index j = 0; j < E; ++j) {
      double en = 0, dot = 0;
      for (Index i = 0; i < r; ++i) en += double(emb(j, i)) * double(emb(j, i));
      en = std::sqrt(en);
      for (Index i = 0; i < r; ++i) dot += h[i] * double(emb(j, i));
      double l = dot / std::max(en, eps);
      if (paper) l = l / std::max(hn, eps) / std::max(tau, tau_min);
      out(t, j) = l;
    }
  }
  return out;
}

// Every parameter of a scorer or router, by name: (value, gradient).
template <class P>
std::map<std::string, std::pair<moe::MatrixOut<double>, moe::MatrixOut<double>>> parameters_of(P& p) {
  std::map<std::string, std::pair<moe::MatrixOut<double>, moe::MatrixOut<double>>> out;
  p.for_each_parameter([&](std::string_view name, moe::MatrixOut<double> v, moe::MatrixOut<double> g) {
    out.emplace(std::string(name), std::make_pair(v, g));
  });
  return out;
}

CosineScorer<double>::Options cosine_options(CosineForm form, std::uint64_t seed) {
  // the embedding rescale is a separate step here: finite differences must not move the point
  return {.form = form, .proj_dim = 5, .temperature = 0.3, .rescale_each_forward = false, .seed = seed};
}
}  // namespace

TEMPLATE_TEST_CASE("cosine scorer logits match the formula in both forms", "[scorer][xmoe]", float, double) {
  using S = TestType;
  const Index D = 24, E = 6;
  for (const Index T : {Index(37), Index(4100)}) {  // one block, and a ragged second block
    const Matrix<S> x = random_matrix<S>(T, D, 31);
    for (const CosineForm form : {CosineForm::paper, CosineForm::torchscale}) {
      INFO("T " << T << " form " << int(form));
      CosineScorer<S> scorer(D, E, {.form = form, .temperature = 0.25, .seed = 5});
      REQUIRE(scorer.proj_dim() == 16);
      // unequal embedding norms, so that the normalisation matters
      for (Index j = 0; j < E; ++j) scorer.embedding().row(j) *= S(0.5 + 0.3 * double(j));
      const Matrix<S> emb_before = scorer.embedding();
      Matrix<S> logits(T, E);
      scorer.forward(x, {}, logits);
      const bool paper = form == CosineForm::paper;
      // the torchscale form rescaled every embedding to norm 1.5 before scoring; the paper form
      // left them alone
      for (Index j = 0; j < E; ++j)
        REQUIRE(double(scorer.embedding().row(j).norm()) ==
                Approx(paper ? double(emb_before.row(j).norm()) : 1.5).epsilon(forward_tol<S>(16)));
      // the oracle scores with the embeddings before the rescale: the logits cannot tell
      const Matrix<double> want = cosine_logits_oracle(x, scorer.proj(), emb_before, paper, 0.25);
      const double scale = std::max(1.0, want.cwiseAbs().maxCoeff());
      const double err = (logits.template cast<double>() - want).cwiseAbs().maxCoeff();
      INFO("max error " << err << " scale " << scale);
      REQUIRE(err <= double(forward_tol<S>(D + 16)) * scale);
      if (paper) REQUIRE(want.cwiseAbs().maxCoeff() <= 1 / 0.25 + 1e-9);  // a cosine over tau
    }
  }
}

TEST_CASE("cosine scorer initialisation: seeded, orthogonal embeddings with gain 0.32", "[scorer][xmoe]") {
  for (const Index E : {Index(4), Index(40)}) {  // fewer and more experts than r = 16
    const CosineScorer<double> a(12, E, {.seed = 9}), b(12, E, {.seed = 9}), c(12, E, {.seed = 10});
    REQUIRE(a.embedding() == b.embedding());
    REQUIRE(a.proj() == b.proj());
    REQUIRE(a.embedding() != c.embedding());
    const Matrix<double>& m = a.embedding();
    // orthonormal columns (E >= r) or rows (E < r), times the gain
    const Matrix<double> gram = E >= 16 ? Matrix<double>(m.transpose() * m) : Matrix<double>(m * m.transpose());
    REQUIRE(gram.isApprox(0.32 * 0.32 * Matrix<double>::Identity(gram.rows(), gram.cols()), 1e-12));
    REQUIRE(a.proj().cwiseAbs().maxCoeff() <= 1 / std::sqrt(12.0));
    REQUIRE(a.temperature() == 0.07);
  }
}

TEST_CASE("cosine scorer backward matches finite differences in both forms", "[scorer][xmoe][gradient]") {
  const Index T = 13, D = 7, E = 5;
  for (const CosineForm form : {CosineForm::paper, CosineForm::torchscale}) {
    INFO("form " << int(form));
    CosineScorer<double> scorer(D, E, cosine_options(form, 4));
    scorer.rescale_embeddings();  // as torchscale would before the forward
    scorer.embedding().row(2) *= 0.4;  // one embedding of another norm
    Matrix<double> x = random_matrix<double>(T, D, 41);
    const Matrix<double> R = random_matrix<double>(T, E, 42);
    // L = sum R l + 0.25 sum l^2: dL/dl = R + l / 2
    Matrix<double> logits(T, E);
    const auto f = [&] {
      scorer.forward(x, {}, logits);
      return (R.array() * logits.array()).sum() + 0.25 * logits.squaredNorm();
    };
    f();
    const Matrix<double> G = R + 0.5 * logits;
    moe::zero_grad(scorer);
    Matrix<double> dx(T, D);
    scorer.backward(x, {}, G, dx);
    auto params = parameters_of(scorer);
    REQUIRE(params.count("router.proj") == 1);
    REQUIRE(params.count("router.expert_embedding") == 1);
    REQUIRE(params.count("router.temperature") == (form == CosineForm::paper ? 1u : 0u));
    require_gradient_close(dx, numeric_gradient(x, f));
    for (auto& [name, p] : params) {
      INFO(name);
      const Matrix<double> analytic = p.second;
      require_gradient_close(analytic, numeric_gradient(p.first, f));
    }
    if (form == CosineForm::paper) {
      // a clamped temperature gets no gradient and divides by the clamp
      scorer.temperature() = 1e-5;
      f();
      const Matrix<double> oracle = cosine_logits_oracle(x, scorer.proj(), scorer.embedding(), true, 1e-5);
      REQUIRE((logits - oracle).cwiseAbs().maxCoeff() <= forward_tol<double>(D + 5) * oracle.cwiseAbs().maxCoeff());
      moe::zero_grad(scorer);
      scorer.backward(x, {}, R, dx);
      REQUIRE(parameters_of(scorer).at("router.temperature").second(0, 0) == 0.0);
    }
  }
}

TEST_CASE("cosine scorer: a zero token and a zero embedding stay finite", "[scorer][xmoe]") {
  const Index T = 6, D = 5, E = 4;
  for (const CosineForm form : {CosineForm::paper, CosineForm::torchscale}) {
    INFO("form " << int(form));
    CosineScorer<double> scorer(D, E, {.form = form, .proj_dim = 3, .seed = 2});
    scorer.embedding().row(1).setZero();  // below eps: the rescale leaves it, its unit vector is 0
    Matrix<double> x = random_matrix<double>(T, D, 3);
    x.row(0).setZero();
    Matrix<double> logits(T, E), dx(T, D);
    scorer.forward(x, {}, logits);
    REQUIRE(logits.allFinite());
    REQUIRE(logits.row(0).isZero(0));
    REQUIRE(logits.col(1).isZero(0));
    REQUIRE(scorer.embedding().row(1).isZero(0));
    moe::zero_grad(scorer);
    scorer.backward(x, {}, random_matrix<double>(T, E, 4), dx);
    REQUIRE(dx.allFinite());
    for (auto& [name, p] : parameters_of(scorer)) {
      INFO(name);
      REQUIRE(Matrix<double>(p.second).allFinite());
    }
    // below the clamp the normalisation is a division by eps: dx of the zero token is G e^ W / eps
    if (form == CosineForm::paper) REQUIRE(!dx.row(0).isZero(0));
  }
  // through a whole router: the zero token is routed like any other
  auto router = moe::make_xmoe_router<double>(D, E, 2);
  Matrix<double> x = random_matrix<double>(T, D, 5);
  x.row(3).setZero();
  const auto& r = router.forward(x);
  REQUIRE(r.token_offsets[4] - r.token_offsets[3] == 2);
  REQUIRE(router.logits().allFinite());
}

namespace {
// A router whose embeddings are rescaled once, outside the objective (see cosine_options).
moe::XMoERouter<double> xmoe_router_for_gradients(CosineForm form, Index k, double factor) {
  CosineScorer<double> scorer(6, 5, cosine_options(form, 7));
  scorer.rescale_embeddings();
  return {std::move(scorer), moe::SoftmaxGate<double>{},
          moe::TopKSelector<double>(k, {.weighting = k == 1 ? Weighting::raw : Weighting::renormalize_after_drop,
                                        .capacity = {.factor = factor, .multiple_of = k,
                                                     .overflow = OverflowOrder::rank_major,
                                                     .slot_order = SlotOrder::priority}}),
          moe::LoadBalanceLoss<double>(BalanceNorm::switch_top1, 0.1)};
}
}  // namespace

TEST_CASE("XMoERouter gradients match finite differences in both forms", "[router][xmoe][gradient]") {
  const Index T = 16;
  for (const CosineForm form : {CosineForm::paper, CosineForm::torchscale})
    for (const Index k : {Index(1), Index(2)}) {
      INFO("form " << int(form) << " k " << k);
      auto router = xmoe_router_for_gradients(form, k, 0.8);  // some tokens dropped
      Matrix<double> x = random_matrix<double>(T, router.input_dim(), 50 + std::uint64_t(k), 2.0);
      const Matrix<double> R = random_matrix<double>(T, router.num_experts(), 51);
      const auto& r = router.forward(x);
      std::vector<double> dw(std::size_t(r.num_slots()));
      for (Index e = 0; e < r.num_experts; ++e)
        for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
          dw[std::size_t(s)] = r.slot_token[s] >= 0 ? R(r.slot_token[s], e) : 0.0;
      moe::zero_grad(router);
      Matrix<double> dx(T, router.input_dim());
      router.backward(x, {}, dw, dx);
      const auto f = [&] { return slot_objective(router, x, R, {}); };
      require_gradient_close(dx, numeric_gradient(x, f));
      for (auto& [name, p] : parameters_of(router)) {
        INFO(name);
        const Matrix<double> analytic = p.second;
        REQUIRE(!analytic.isZero(0));
        require_gradient_close(analytic, numeric_gradient(p.first, f));
      }
    }
}

TEMPLATE_TEST_CASE("XMoERouter routes as torchscale's top-1 and top-2 gating", "[router][xmoe]", float, double) {
  using S = TestType;
  const Index T = 100, D = 12, E = 8;  // E does not divide T: 2 ceil(T/E) = 26, ceil(T/E) = 13
  const Matrix<S> x = random_matrix<S>(T, D, 60, 2.0);
  for (const Index k : {Index(1), Index(2)}) {
    INFO("k " << k);
    auto router = moe::make_xmoe_router<S>(D, E, k, 1.0, 3);
    const auto& r = router.forward(x);
    REQUIRE(r.capacity == (k == 1 ? 13 : 26));
    Matrix<S> scores(T, E);
    moe::SoftmaxGate<S>{}.forward(router.logits(), scores);
    require_matches(r, reference_route(Matrix<S>(router.logits()), scores, k, router.selector().options()), false);
    // torchscale's l_aux: E^2 mean_e(mean_t g * mean_t first-choice mask)
    double laux = 0;
    for (Index e = 0; e < E; ++e) {
      double me = 0, ce = 0;
      for (Index t = 0; t < T; ++t) {
        me += double(scores(t, e)) / double(T);
        Index best = 0;
        for (Index j = 1; j < E; ++j)
          if (scores(t, j) > scores(t, best)) best = j;
        ce += (best == e) / double(T);
      }
      laux += me * ce * double(E);
    }
    REQUIRE(double(router.loss_values()[0]) == Approx(laux).epsilon(double(forward_tol<S>(T))));
    REQUIRE(router.template loss<0>().coefficient() == S(1e-2));
  }
}

TEST_CASE("XMoERouter in a MoELayer: forward, backward, every parameter", "[router][xmoe][layer]") {
  const Index T = 90, D = 16, E = 6, H = 20;
  for (const CosineForm form : {CosineForm::torchscale, CosineForm::paper}) {
    INFO("form " << int(form));
    auto layer = moe::MoELayer(moe::make_xmoe_router<float>(D, E, 2, 1.0, 4, form), moe::FFNExperts<float>(E, D, H));
    const Matrix<float> x = random_matrix<float>(T, D, 70), dy = random_matrix<float>(T, D, 71);
    Matrix<float> y(T, D), dx(T, D);
    layer.forward(x, y);
    REQUIRE(y.allFinite());
    REQUIRE(!y.isZero(0));
    moe::zero_grad(layer);
    layer.backward(dy, dx);
    REQUIRE(dx.allFinite());
    std::vector<std::string> names;
    layer.for_each_parameter([&](std::string_view name, auto, auto grad) {
      names.emplace_back(name);
      if (name.starts_with("router.")) REQUIRE(!Matrix<float>(grad).isZero(0));
    });
    REQUIRE(std::count(names.begin(), names.end(), "router.proj") == 1);
    REQUIRE(std::count(names.begin(), names.end(), "router.expert_embedding") == 1);
    REQUIRE(std::count(names.begin(), names.end(), "router.temperature") == (form == CosineForm::paper));
  }
}

TEST_CASE("cosine scorer and XMoERouter: bad configuration throws config_error", "[errors][xmoe]") {
  require_error<moe::config_error>([] { CosineScorer<float>(0, 4); }, {"CosineScorer", "'input_dim'", "= 0", ">= 1"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 0); }, {"'num_experts'", "= 0"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.proj_dim = 0}); },
                                   {"'proj_dim'", "= 0", "proj_dim >= 1"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.temperature = 0}); },
                                   {"'temperature'", "= 0", "temperature >= min_temperature"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.temperature = -1}); }, {"'temperature'", "= -1"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.min_temperature = 0}); }, {"'min_temperature'", "= 0"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.eps = 0}); }, {"'eps'", "= 0", "eps > 0"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.embedding_norm = -1.5}); },
                                   {"'embedding_norm'", "= -1.5"});
  require_error<moe::config_error>([] { CosineScorer<float>(4, 3, {.embedding_gain = 0}); }, {"'embedding_gain'", "= 0"});
  require_error<moe::config_error>([] { moe::make_xmoe_router<float>(4, 3, 3); },
                                   {"make_xmoe_router", "'k'", "= 3", "Top2Gate"});
  require_error<moe::config_error>([] { moe::make_xmoe_router<float>(4, 1, 2); }, {"'k'", "= 2", "(1)"});
  require_error<moe::config_error>([] { moe::make_xmoe_router<float>(4, 3, 2, 0.0); }, {"capacity.factor", "= 0"});
}

// ---- DeepSeek-V3: selection-only expert bias, group-limited top-k, normalised balance loss ----

namespace {
// Group-limited top-k written from docs/selectors.md: group score = sum of the m largest rank
// values of the group (m = k / keep); the `keep` best groups by a stable sort (ties to the lower
// group); then the k largest rank values among their experts by a stable sort (ties to the lower
// expert). Returns the chosen experts in rank order.
template <class S>
std::vector<int> reference_group_top_k(const S* rank, Index E, Index G, Index keep, Index k) {
  const Index size = E / G, m = k / keep;
  std::vector<S> group(G);  // summed in S, largest first, so that equal sums stay equal
  for (Index g = 0; g < G; ++g) {
    std::vector<S> v(rank + g * size, rank + (g + 1) * size);
    std::sort(v.begin(), v.end(), std::greater<>());
    S sum = 0;
    for (Index i = 0; i < m; ++i) sum += v[i];
    group[g] = sum;
  }
  std::vector<int> order(G);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return group[a] > group[b]; });
  std::vector<int> candidates;
  for (Index j = 0; j < keep; ++j)
    for (Index e = order[j] * size; e < (order[j] + 1) * size; ++e) candidates.push_back(int(e));
  std::sort(candidates.begin(), candidates.end());
  std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return rank[a] > rank[b]; });
  candidates.resize(std::size_t(k));
  return candidates;
}

std::vector<int> chosen(const moe::SparseRouting<double>& r, Index t) {
  return {r.choice_expert.begin() + r.token_offsets[t], r.choice_expert.begin() + r.token_offsets[t + 1]};
}

// The normalised balance loss written from docs/losses.md, sequence by sequence.
double reference_normalized_balance(const Matrix<double>& p, Index k, const std::vector<std::int32_t>& segment,
                                    const std::vector<std::uint8_t>& valid) {
  const Index T = p.rows(), E = p.cols();
  std::map<std::int32_t, std::vector<Index>> sequences;
  for (Index t = 0; t < T; ++t)
    if (valid.empty() || valid[t]) sequences[segment.empty() ? 0 : segment[t]].push_back(t);
  double total = 0;
  for (const auto& [id, tokens] : sequences) {
    const double Ts = double(tokens.size());
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (const Index t : tokens) {
      std::vector<int> idx(E);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p(t, a) > p(t, b); });
      for (Index j = 0; j < k; ++j) f[idx[j]] += double(E) / (double(k) * Ts);
      const double z = p.row(t).sum() + 1e-20;
      for (Index e = 0; e < E; ++e) P[e] += p(t, e) / z / Ts;
    }
    for (Index e = 0; e < E; ++e) total += f[e] * P[e];
  }
  return total / double(sequences.size());
}
}  // namespace

TEST_CASE("group-limited top-k: hand-worked cases, ties to the lower group", "[selector][deepseek]") {
  const auto route = [](Index E, Index G, Index keep, Index k, std::vector<double> row) {
    moe::GroupLimitedTopKSelector<double> selector(k, {.count = G, .keep = keep});
    const Matrix<double> rank = Eigen::Map<Matrix<double>>(row.data(), 1, E);
    moe::SparseRouting<double> r;
    selector.forward({rank, rank, rank, {}}, r);
    return chosen(r, 0);
  };
  // groups of 2, scored by their top 2: {0.9, 0} = 0.9 < {0.5, 0.5} = 1.0 < {0.6, 0.45} = 1.05;
  // groups 1 and 2 are kept, so expert 0 (the best single score) is never picked
  REQUIRE(route(8, 4, 2, 4, {0.9, 0.0, 0.5, 0.5, 0.6, 0.45, 0.1, 0.1}) == std::vector<int>{4, 2, 3, 5});
  // scored by their top 1 (k = keep): groups 0 and 2 win
  REQUIRE(route(8, 4, 2, 2, {0.9, 0.0, 0.5, 0.5, 0.6, 0.45, 0.1, 0.1}) == std::vector<int>{0, 4});
  // equal group scores (0.75 + 0.25 = 0.875 + 0.125): the lower group is kept, although plain
  // top-2 would take expert 2
  REQUIRE(route(4, 2, 1, 2, {0.75, 0.25, 0.875, 0.125}) == std::vector<int>{0, 1});
}

TEMPLATE_TEST_CASE("group-limited top-k matches its oracle and never picks from a dropped group",
                   "[selector][deepseek]", float, double) {
  using S = TestType;
  const Index T = 200;
  // {E, G, keep, k, coarse}: groups of 1 to 32 experts, group scores from the top 1, 2, 3 or 6
  // (groups of 16 and 32 go through the SIMD group scores); coarse scores take 5 values only, so
  // that groups and experts tie often
  const std::vector<std::array<Index, 5>> configs{{24, 4, 2, 6, 0}, {24, 6, 3, 6, 0}, {24, 8, 3, 6, 0}, {24, 3, 1, 6, 0},
                                                  {24, 24, 6, 6, 0}, {64, 2, 1, 2, 0}, {64, 4, 2, 4, 0}, {64, 4, 2, 2, 0},
                                                  {64, 2, 1, 2, 1}, {64, 4, 2, 4, 1}, {64, 4, 4, 4, 1}, {256, 8, 4, 8, 0},
                                                  {256, 8, 4, 8, 1}};
  for (const auto& [E, G, keep, k, coarse] : configs) {
    INFO("E " << E << " groups " << G << " keep " << keep << " k " << k << " coarse " << coarse);
    Matrix<S> logits = random_matrix<S>(T, E, 70 + G + E);
    if (coarse) logits = (logits.array() * S(2)).round().max(S(-2)).min(S(2)).matrix();
    Matrix<S> scores(T, E);
    moe::SigmoidGate<S>{}.forward(logits, scores);
    moe::GroupLimitedTopKSelector<S> selector(k, {.count = G, .keep = keep},
                                              {.weighting = Weighting::renormalize_before_drop, .scale = 2.5});
    moe::SparseRouting<S> r;
    selector.forward({logits, scores, scores, {}}, r);
    for (Index t = 0; t < T; ++t) {
      const auto want = reference_group_top_k(scores.row(t).data(), E, G, keep, k);
      const std::vector<int> got(r.choice_expert.begin() + r.token_offsets[t], r.choice_expert.begin() + r.token_offsets[t + 1]);
      REQUIRE(got == want);
      // the groups of the chosen experts are at most `keep`: nothing from a dropped group
      std::vector<Index> groups;
      for (const int e : got) groups.push_back(e / (E / G));
      std::sort(groups.begin(), groups.end());
      REQUIRE(std::unique(groups.begin(), groups.end()) - groups.begin() <= keep);
      double z = 0;
      for (const int e : want) z += double(scores(t, e));
      for (Index j = 0; j < k; ++j) {
        const Index c = r.token_offsets[t] + j;
        REQUIRE(double(r.slot_weight[r.choice_slot[c]]) ==
                Approx(2.5 * double(scores(t, want[j])) / z).epsilon(forward_tol<S>(k)));
      }
    }
  }
}

TEST_CASE("expert bias changes which experts are chosen but not the weights", "[gate][deepseek]") {
  const Index T = 40, D = 5, E = 8, k = 2;
  moe::Router router(moe::LinearScorer<double>(D, E, {.seed = 4}), moe::ExpertBiasGate<moe::SigmoidGate<double>>(E),
                     moe::TopKSelector<double>(k, {.weighting = Weighting::renormalize_before_drop, .scale = 2.5}));
  router.scorer().weight() *= 3.0;
  const Matrix<double> x = random_matrix<double>(T, D, 5);
  const Matrix<double> logits = x * router.scorer().weight().transpose();
  Matrix<double> s = logits.unaryExpr([](double l) { return 1.0 / (1.0 + std::exp(-l)); });
  const auto check = [&](const Matrix<double>& bias) {
    router.gate().bias() = bias;
    const auto& r = router.forward(x);
    for (Index t = 0; t < T; ++t) {
      std::vector<int> idx(E);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return s(t, a) + bias(0, a) > s(t, b) + bias(0, b); });
      REQUIRE(chosen(r, t) == std::vector<int>(idx.begin(), idx.begin() + k));
      const double z = s(t, idx[0]) + s(t, idx[1]);
      for (Index j = 0; j < k; ++j)
        REQUIRE(r.slot_weight[r.choice_slot[r.token_offsets[t] + j]] == Approx(2.5 * s(t, idx[j]) / z).epsilon(1e-12));
    }
    return r.choice_expert;
  };
  const auto plain = check(Matrix<double>::Zero(1, E));
  Matrix<double> bias = Matrix<double>::Zero(1, E);
  bias(0, 6) = 2.0;  // every token now takes expert 6, at its un-biased weight
  bias(0, 1) = -0.3;
  const auto biased = check(bias);
  REQUIRE(biased != plain);
  // the bias is not a parameter: the router's parameters are the scorer's alone
  int parameters = 0;
  router.for_each_parameter([&](std::string_view name, auto, auto) {
    ++parameters;
    REQUIRE(name.find("bias") == std::string_view::npos);
  });
  REQUIRE(parameters == 1);
}

TEST_CASE("the bias update moves load toward balance", "[gate][deepseek]") {
  // Skewed synthetic logits: the first 4 of 16 experts have a head start of 0.2, about 0.05 in
  // sigmoid score, next to a spread of 0.1 in the logits.
  const Index T = 2048, E = 16;
  auto router = moe::make_deepseek_v3_router<float>(4, E, 4, 4, 2);
  Matrix<float> logits = random_matrix<float>(T, E, 31, 0.1);
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < 4; ++e) logits(t, e) += 0.2f;
  const double before = moe::load_cv(router.route(logits));
  REQUIRE(before > 0.5);
  for (int step = 0; step < 50; ++step) router.gate().update_bias(router.route(logits));
  const double after = moe::load_cv(router.route(logits));
  INFO("load CV " << before << " -> " << after);
  REQUIRE(after <= before / 2);
  // the update itself: +u below the mean load, -u above, 0 at it
  moe::ExpertBiasGate<moe::SigmoidGate<double>> gate(3, {.update_rate = 0.5});
  gate.update_bias(std::span<const Index>(std::vector<Index>{1, 2, 3}));
  REQUIRE(gate.bias() == Matrix<double>{{0.5, 0.0, -0.5}});
  // Megatron-Core routes padding but leaves it out of the counts: the mask given to the update.
  // Tokens 0, 1 choose expert 0, token 2 expert 1, and the padding tokens 3, 4 expert 1 too.
  moe::Router megatron(moe::LinearScorer<double>(2, 3), moe::ExpertBiasGate<moe::SigmoidGate<double>>(3, {.update_rate = 0.5}),
                       moe::TopKSelector<double, 1>({.padding = moe::Padding::megatron}));
  const std::vector<std::uint8_t> valid{1, 1, 1, 0, 0};
  const Matrix<double> five{{2, 0, 0}, {2, 0, 0}, {0, 2, 0}, {0, 2, 0}, {0, 2, 0}};
  const auto& routed = megatron.route(five, {.valid = valid});
  REQUIRE(routed.num_choices() == 5);  // padding routed
  megatron.gate().update_bias(routed, valid);  // loads (2, 1, 0), mean 1
  REQUIRE(megatron.gate().bias() == Matrix<double>{{-0.5, 0.0, 0.5}});
  megatron.gate().bias().setZero();
  megatron.gate().update_bias(routed);  // without the mask: loads (2, 3, 0), mean 5/3
  REQUIRE(megatron.gate().bias() == Matrix<double>{{-0.5, -0.5, 0.5}});
  require_error<moe::shape_error>([&] { megatron.gate().update_bias(routed, std::span<const std::uint8_t>(valid).first(3)); },
                                  {"valid.size", "= 3", "(5)"});
}

TEST_CASE("normalised balance loss: value and gradient from its formula", "[loss][gradient][deepseek]") {
  const Index T = 14, E = 6, k = 2;
  const Matrix<double> logits = random_matrix<double>(T, E, 81, 2.0);
  Matrix<double> p(T, E);
  moe::SigmoidGate<double>{}.forward(logits, p);
  std::vector<std::int32_t> segment{7, 7, 7, 7, 7, 3, 3, 3, 3, 3, 3, 9, 9, 9};
  std::vector<std::uint8_t> valid(T, 1);
  valid[2] = valid[12] = 0;
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = segment};
  moe::TopKSelector<double> selector(k);
  moe::SparseRouting<double> r;
  selector.forward({logits, p, p, tokens}, r);
  for (const auto scope : {moe::BalanceScope::sequence, moe::BalanceScope::batch}) {
    INFO("scope " << int(scope));
    const moe::NormalizedBalanceLoss<double> loss(0.7, {.scope = scope});
    const auto seg = scope == moe::BalanceScope::sequence ? segment : std::vector<std::int32_t>{};
    const double want = reference_normalized_balance(p, k, seg, valid);
    REQUIRE(loss.forward({logits, p, r, tokens}) == Approx(want).epsilon(1e-13));
    Matrix<double> dscores = Matrix<double>::Zero(T, E), dlogits = Matrix<double>::Zero(T, E);
    loss.backward({logits, p, r, tokens}, dlogits, dscores);
    Matrix<double> q = p;
    const Matrix<double> numeric =
        numeric_gradient(q, [&] { return 0.7 * loss.forward({logits, q, r, tokens}); });
    require_gradient_close(dscores, numeric);
    REQUIRE(dscores.row(2).isZero(0));  // padding: no gradient
    REQUIRE(dlogits.isZero(0));
  }
  // counting the router's own choices instead: f from the routing
  const moe::NormalizedBalanceLoss<double> by_routing(1.0, {.scope = moe::BalanceScope::batch, .count = moe::BalanceCount::routing});
  REQUIRE(by_routing.forward({logits, p, r, tokens}) == Approx(reference_normalized_balance(p, k, {}, valid)).epsilon(1e-13));
  // perfect balance: f = 1 and P = 1/E for every expert, L = 1
  const Matrix<double> flat = Matrix<double>::Constant(4, 4, 0.5);
  moe::SparseRouting<double> rr;
  moe::TopKSelector<double>(1).forward({flat, flat, flat, {}}, rr);
  // each token takes expert 0 (ties to the lower expert): f_0 = 4, P = 1/4 → L = 1 as well
  REQUIRE(moe::NormalizedBalanceLoss<double>(1.0, {.scope = moe::BalanceScope::batch}).forward({flat, flat, rr, {}}) == Approx(1.0));
}

TEST_CASE("router gradients: DeepSeek-V3", "[router][gradient][deepseek]") {
  std::vector<std::int32_t> segment(16);
  for (Index t = 0; t < 16; ++t) segment[t] = std::int32_t(t / 5);
  auto make = [] {
    moe::DeepSeekV3Router<double> r(moe::LinearScorer<double>(6, 16, {.bias = false, .seed = 8}),
                                    moe::ExpertBiasGate<moe::SigmoidGate<double>>(16),
                                    moe::GroupLimitedTopKSelector<double>(4, {.count = 4, .keep = 2},
                                                                          {.weighting = Weighting::renormalize_before_drop, .scale = 2.5}),
                                    moe::NormalizedBalanceLoss<double>(0.3));
    for (Index e = 0; e < 16; ++e) r.gate().bias()(0, e) = 0.05 * double((e * 7) % 5) - 0.1;
    return r;
  };
  check_router_gradient(make(), 16, 90, true, false, segment);
  check_router_gradient(moe::make_deepseek_v3_router<double>(6, 16, 4, 8, 4), 16, 91, false, false, segment);
  check_router_gradient(moe::make_deepseek_v3_router<double>(6, 32, 8, 8, 4), 16, 92);
}

TEST_CASE("DeepSeek-V3 preset: defaults, and the same input twice is bit-identical", "[router][deepseek]") {
  auto router = moe::make_deepseek_v3_router<float>(16);
  REQUIRE(router.num_experts() == 256);
  REQUIRE(router.selector().k() == 8);
  REQUIRE(router.selector().groups().count == 8);
  REQUIRE(router.selector().groups().keep == 4);
  REQUIRE(router.selector().options().scale == 2.5);
  REQUIRE(router.selector().options().weighting == Weighting::renormalize_before_drop);
  REQUIRE_FALSE(router.selector().options().capacity.limited());
  REQUIRE(router.gate().options().update_rate == 1e-3);
  REQUIRE(router.loss<0>().coefficient() == 1e-4f);
  const Matrix<float> x = random_matrix<float>(300, 16, 13);
  std::vector<std::int32_t> segment(300);
  for (Index t = 0; t < 300; ++t) segment[t] = std::int32_t(t / 100);
  const moe::TokenInputs<float> tokens{.segment = segment};
  router.gate().update_bias(router.forward(x, tokens));
  const auto run = [&] {
    const auto r = router.forward(x, tokens);
    std::vector<float> dw(r.num_slots(), 1.0f);
    Matrix<float> dx(300, 16);
    moe::zero_grad(router);
    router.backward(x, tokens, dw, dx);
    return std::tuple(r.choice_expert, r.slot_weight, router.loss_values(), dx);
  };
  const auto first = run(), second = run();
  REQUIRE(std::get<0>(first) == std::get<0>(second));
  REQUIRE(std::get<1>(first) == std::get<1>(second));
  REQUIRE(std::get<2>(first) == std::get<2>(second));
  REQUIRE(std::get<3>(first) == std::get<3>(second));
  // every token's 8 experts lie in at most 4 of the 8 groups of 32
  const auto& r = router.routing();
  for (Index t = 0; t < 300; ++t) {
    std::vector<int> groups;
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) groups.push_back(r.choice_expert[c] / 32);
    std::sort(groups.begin(), groups.end());
    REQUIRE(std::unique(groups.begin(), groups.end()) - groups.begin() <= 4);
  }
}

TEST_CASE("DeepSeek-V3 bad configuration and input: named errors, nothing written", "[errors][deepseek]") {
  using Sel = moe::GroupLimitedTopKSelector<float>;
  require_error<moe::config_error>([] { Sel(6, {.count = 4, .keep = 4}); }, {"'k'", "= 6", "divisible by groups.keep (4)"});
  require_error<moe::config_error>([] { Sel(4, {.count = 4, .keep = 5}); }, {"groups.keep", "= 5"});
  require_error<moe::config_error>([] { moe::make_deepseek_v3_router<float>(4, 20); },
                                   {"groups.count", "= 8", "divides the number of experts (20)"});
  require_error<moe::config_error>([] { moe::make_deepseek_v3_router<float>(4, 16, 8, 8, 2); },
                                   {"'k'", "= 8", "the kept groups must hold k experts"});
  require_error<moe::config_error>([] { moe::ExpertBiasGate<moe::SoftmaxGate<float>>(8); },
                                   {"SoftmaxGate", "sigmoid or sqrt-softplus"});
  moe::ExpertBiasGate<moe::SqrtSoftplusGate<float>> fine(8);  // allowed
  REQUIRE(fine.bias().isZero(0));
  require_error<moe::shape_error>(
      [] { moe::Router(moe::LinearScorer<float>(4, 8), moe::ExpertBiasGate<moe::SigmoidGate<float>>(6), moe::TopKSelector<float>(2)); },
      {"bias.cols", "= 6", "(8)"});
  SECTION("a selector used on its own: E not divisible, rejected at the batch, routing untouched") {
    Sel selector(2, {.count = 4, .keep = 2});
    const Matrix<float> logits = random_matrix<float>(5, 10, 2);
    moe::SparseRouting<float> r;
    require_error<moe::config_error>([&] { selector.forward({logits, logits, logits, {}}, r); },
                                     {"groups.count", "= 4", "(10)"});
    REQUIRE(r.num_tokens == 0);
    REQUIRE(r.choice_expert.empty());
  }
  SECTION("a bias update of the wrong length leaves the bias alone") {
    auto router = moe::make_deepseek_v3_router<float>(4, 16, 4, 4, 2);
    router.gate().bias().setConstant(0.25f);
    require_error<moe::shape_error>([&] { router.gate().update_bias(std::span<const Index>(std::vector<Index>(15, 1))); },
                                    {"load.size", "= 15", "(16)"});
    REQUIRE((router.gate().bias().array() == 0.25f).all());
    const Matrix<float> x = random_matrix<float>(8, 4, 3);
    const auto before = router.forward(x);
    Matrix<float> bad = x;
    bad(3, 2) = std::numeric_limits<float>::quiet_NaN();
    require_error<moe::value_error>([&] { router.forward(bad); }, {"'x'", "nan at (3, 2)"});
    REQUIRE(router.routing().choice_expert == before.choice_expert);
    REQUIRE(router.routing().slot_weight == before.slot_weight);
  }
}

// ---- noise and randomness (docs/architecture.md, Randomness) ------------------------------------

namespace {
// Standard draws for injection, as torch.rand or DeepSpeed's gumbel_rsample would give them.
template <class S>
Matrix<S> draws(Index rows, Index cols, std::uint64_t seed, moe::Distribution dist) {
  Matrix<S> m(rows, cols);
  const moe::CounterRng rng(seed);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = rng.draw<S>(dist, std::uint64_t(i), std::uint64_t(j));
  return m;
}
template <class S>
Matrix<S> uniform_draws(Index rows, Index cols, std::uint64_t seed) { return draws<S>(rows, cols, seed, moe::Distribution::uniform); }
template <class S>
Matrix<S> gumbel_draws(Index rows, Index cols, std::uint64_t seed) { return draws<S>(rows, cols, seed, moe::Distribution::gumbel); }

template <class S>
std::span<const S> span_of(const Matrix<S>& m) {
  return {m.data(), std::size_t(m.size())};
}

}  // namespace

TEMPLATE_TEST_CASE("input jitter: x times lo + u (hi - lo), in training only", "[scorer][noise]", float, double) {
  using S = TestType;
  const Index T = 7, D = 5, E = 3;
  const double eps = 0.1;
  moe::LinearScorer<S> scorer(D, E, {.seed = 4, .jitter = eps, .jitter_draws = {.seed = 9}});
  const Matrix<S> x = random_matrix<S>(T, D, 5), u = uniform_draws<S>(T, D, 6);
  Matrix<S> logits(T, E), want(T, E);
  // the factor as torch.distributions.Uniform(1 - eps, 1 + eps).rsample computes it
  const S lo = S(1 - eps), hi = S(1 + eps);
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) {
      S sum = 0;
      for (Index j = 0; j < D; ++j) sum += x(t, j) * (lo + u(t, j) * (hi - lo)) * scorer.weight()(e, j);
      want(t, e) = sum;
    }
  scorer.forward(x, {.jitter = span_of(u)}, logits);
  REQUIRE(logits.isApprox(want, forward_tol<S>(D)));
  // generated draws: a pure function of (seed, step); evaluation turns the jitter off
  Matrix<S> a(T, E), b(T, E), c(T, E), clean(T, E);
  scorer.set_draw_state({.training = true, .step = 3});
  scorer.forward(x, {}, a);
  scorer.forward(x, {}, b);
  scorer.set_draw_state({.training = true, .step = 4});
  scorer.forward(x, {}, c);
  REQUIRE(a == b);
  REQUIRE(a != c);
  scorer.set_draw_state({.training = false, .step = 3});
  scorer.forward(x, {}, clean);
  REQUIRE(clean.isApprox(Matrix<S>(x * scorer.weight().transpose()), forward_tol<S>(D)));
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e)  // every factor within [1 - eps, 1 + eps]
      REQUIRE(std::abs(a(t, e) - clean(t, e)) <= S(eps) * (x.row(t).cwiseAbs() * scorer.weight().row(e).cwiseAbs().transpose()).value() * S(1 + 1e-5));
}

TEMPLATE_TEST_CASE("Gumbel-sampled selection: every expert, or the second after the greedy first", "[gate][noise]",
                   float, double) {
  using S = TestType;
  const Index T = 30, E = 6;
  const Matrix<S> logits = random_matrix<S>(T, E, 14, 1.5);
  const Matrix<S> g = gumbel_draws<S>(T, E, 15);
  const Matrix<S> p = softmax_of(logits);
  const moe::TokenInputs<S> tokens{.gumbel = span_of(g)};
  const auto route = [&](moe::Sampled sampled, Index k, bool training) {
    moe::Router router(moe::LinearScorer<S>(2, E), moe::GumbelGate<moe::SoftmaxGate<S>>({.sampled = sampled}),
                       moe::TopKSelector<S>(k, {.weighting = Weighting::raw}));
    router.set_training(training);
    return router.route(logits, tokens);
  };
  const auto argmax = [&](Index t, auto value, Index skip) {
    Index best = skip == 0 ? 1 : 0;
    for (Index e = 0; e < E; ++e)
      if (e != skip && value(t, e) > value(t, best)) best = e;
    return best;
  };
  const auto noisy = [&](Index t, Index e) { return logits(t, e) + g(t, e); };
  const auto clean = [&](Index t, Index e) { return p(t, e); };
  SECTION("all (DeepSpeed RSample): argmax of logits + g, weight the clean probability") {
    const auto r = route(moe::Sampled::all, 1, true);
    Index differs = 0;
    for (Index t = 0; t < T; ++t) {
      const Index e = argmax(t, noisy, -1);
      REQUIRE(r.choice_expert[t] == e);
      REQUIRE(r.slot_weight[r.choice_slot[t]] == Approx(p(t, e)).epsilon(forward_tol<S>(E)));
      differs += e != argmax(t, clean, -1);
    }
    REQUIRE(differs > 0);  // the noise changed some choices: the test can fail
    const auto greedy = route(moe::Sampled::all, 1, false);  // evaluation: no noise
    for (Index t = 0; t < T; ++t) REQUIRE(greedy.choice_expert[t] == argmax(t, clean, -1));
  }
  SECTION("after_first (DeepSpeed top-2, fairseq 'sampling'): first greedy, second sampled among the rest") {
    const auto r = route(moe::Sampled::after_first, 2, true);
    Index differs = 0;
    for (Index t = 0; t < T; ++t) {
      const Index first = argmax(t, clean, -1), second = argmax(t, noisy, first);
      REQUIRE(r.choice_expert[2 * t] == first);
      REQUIRE(r.choice_expert[2 * t + 1] == second);
      differs += second != argmax(t, clean, first);
    }
    REQUIRE(differs > 0);
  }
  SECTION("generated draws sample the softmax: one U(0, 1) per token through the cumulative probabilities") {
    // every token has the same logits, so the sampled experts' frequencies estimate the
    // probabilities; tolerance 5 binomial standard deviations
    const Index N = 20000;
    const Matrix<S> row{{1.0, 0.2, -0.5, 0.7, 0.0, -1.0}};
    const Matrix<S> same = row.replicate(N, 1);
    const Matrix<S> q = softmax_of(row);
    for (const auto sampled : {moe::Sampled::all, moe::Sampled::after_first}) {
      const bool after = sampled == moe::Sampled::after_first;
      moe::Router router(moe::LinearScorer<S>(2, E), moe::GumbelGate<moe::SoftmaxGate<S>>({.sampled = sampled, .draws = {.seed = 7}}),
                         moe::TopKSelector<S>(after ? 2 : 1));
      const auto& r = router.route(same);
      std::vector<double> freq(E, 0.0);
      for (Index t = 0; t < N; ++t) {
        if (after) REQUIRE(r.choice_expert[2 * t] == 0);  // the greedy first
        freq[std::size_t(r.choice_expert[after ? 2 * t + 1 : t])] += 1.0 / double(N);
      }
      const double rest = after ? 1 - double(q(0, 0)) : 1.0;
      for (Index e = after ? 1 : 0; e < E; ++e) {
        const double want = double(q(0, e)) / rest;
        INFO("sampled " << int(sampled) << " expert " << e);
        REQUIRE(std::abs(freq[std::size_t(e)] - want) <= 5 * std::sqrt(want * (1 - want) / double(N)));
      }
      if (after) REQUIRE(freq[0] == 0);
    }
  }
  SECTION("none: the inner gate's ranking") {
    const auto r = route(moe::Sampled::none, 2, true);
    for (Index t = 0; t < T; ++t) REQUIRE(r.choice_expert[2 * t + 1] == argmax(t, clean, argmax(t, clean, -1)));
  }
}

TEMPLATE_TEST_CASE("DeepSpeed presets route as top1gating (RTS) and top2gating (sampled second)", "[router][noise]",
                   float, double) {
  using S = TestType;
  const Index T = 40, E = 5, D = 6;
  const Matrix<S> x = random_matrix<S>(T, D, 21);
  const Matrix<S> u = uniform_draws<S>(T, E, 22);
  const Matrix<S> g = gumbel_draws<S>(T, E, 23);
  const moe::TokenInputs<S> tokens{.gumbel = span_of(g), .uniform = span_of(u)};
  SECTION("k = 1: capacity max(ceil(cf T/E), min), the C highest draws of each expert, token-order slots") {
    auto router = moe::make_deepspeed_topk_router<S>(D, E, 1, 0.5, 3, 24);
    const auto& r = router.forward(x, tokens);
    const Matrix<S> p = softmax_of(Matrix<S>(router.logits()));
    const auto ref = reference_route(Matrix<S>(router.logits()), p, 1, router.selector().options(), {}, u);
    REQUIRE(ref.capacity == 4);  // max(ceil(0.5 * 40 / 5), 3)
    require_matches(r, ref, false);
    REQUIRE(r.num_dropped() > 0);
    // the balance loss of top1gating: E sum_e mean_t(p_te) * (first choices of e before dropping) / T
    double want = 0;
    for (Index e = 0; e < E; ++e) {
      double pe = 0, fe = 0;
      for (Index t = 0; t < T; ++t) pe += double(p(t, e)) / T, fe += (r.choice_expert[t] == e) / double(T);
      want += E * pe * fe;
    }
    REQUIRE(router.loss_values()[0] == Approx(want).epsilon(forward_tol<S>(T * E)));
    // RTS draws at evaluation too, as DeepSpeed's use_rts does
    router.set_training(false);
    const auto& again = router.forward(x, tokens);
    require_matches(again, ref, false);
  }
  SECTION("k = 2: first greedy, second argmax of logits + g among the rest, first choices first") {
    auto router = moe::make_deepspeed_topk_router<S>(D, E, 2, 0.5, 3, 25);
    router.set_training(false);  // top2gating samples at evaluation too
    const auto& r = router.forward(x, tokens);
    const Matrix<S> logits = router.logits(), p = softmax_of(logits);
    Matrix<S> rank(T, E);
    for (Index t = 0; t < T; ++t) {
      Index first = 0;
      for (Index e = 1; e < E; ++e) first = p(t, e) > p(t, first) ? e : first;
      for (Index e = 0; e < E; ++e) rank(t, e) = e == first ? std::numeric_limits<S>::infinity() : logits(t, e) + g(t, e);
    }
    const auto ref = reference_route(logits, p, 2, router.selector().options(), {}, Matrix<S>{}, rank);
    REQUIRE(ref.capacity == 8);  // max(ceil(2 * 0.5 * 40 / 5), 3)
    require_matches(r, ref, false);
    REQUIRE(r.num_dropped() > 0);
    REQUIRE(router.selector().options().capacity.slot_order == SlotOrder::priority);
  }
  SECTION("k = 1 with the Jitter and RSample policies: on in training, off at evaluation") {
    using moe::NoisyGatePolicy;
    for (auto policy : {NoisyGatePolicy::jitter, NoisyGatePolicy::rsample}) {
      auto noisy = moe::make_deepspeed_topk_router<S>(D, E, 1, 2.0, 3, 26, std::nullopt, {.noisy_gate_policy = policy, .seed = 5});
      auto plain = moe::make_deepspeed_topk_router<S>(D, E, 1, 2.0, 3, 26, std::nullopt, {.seed = 5});
      const std::vector<std::int32_t> chosen = noisy.forward(x).choice_expert;
      const auto greedy = plain.forward(x).choice_expert;
      if (policy == NoisyGatePolicy::rsample) REQUIRE(chosen != greedy);
      else REQUIRE_FALSE(noisy.logits().isApprox(plain.logits(), S(0)));
      noisy.set_training(false);
      REQUIRE(noisy.forward(x).choice_expert == greedy);
      REQUIRE(noisy.logits() == plain.logits());
    }
  }
}

TEMPLATE_TEST_CASE("fairseq's random second expert: kept iff 2 g2 > u, a rejected choice takes no slot",
                   "[selector][noise]", float, double) {
  using S = TestType;
  const Index T = 36, E = 4;
  const Matrix<S> logits = random_matrix<S>(T, E, 31, 1.0);
  const Matrix<S> u = uniform_draws<S>(T, 1, 32);
  const Matrix<S> p = softmax_of(logits);
  for (const auto weighting : {Weighting::renormalize_after_drop, Weighting::renormalize_before_drop}) {
    INFO("weighting " << int(weighting));
    moe::Router router(moe::LinearScorer<S>(2, E), moe::SoftmaxGate<S>{},
                       moe::TopKSelector<S, 2>({.weighting = weighting,
                                                .capacity = {.factor = 1.0, .overflow = OverflowOrder::rank_major,
                                                             .slot_order = SlotOrder::priority},
                                                .second = moe::SecondExpert::random}));
    const auto& r = router.route(logits, {.second_uniform = span_of(u)});
    // the reference, written out: rank-major over the accepted choices, first C per expert
    const Index C = 18;  // ceil(2 * 36 / 4)
    REQUIRE(r.capacity == C);
    std::vector<Index> taken(E, 0);
    std::vector<int> first(T), second(T);
    std::vector<bool> accepted(T), kept1(T), kept2(T);
    Index rejected = 0;
    for (Index t = 0; t < T; ++t) {
      first[t] = 0;
      for (int e = 1; e < E; ++e) first[t] = p(t, e) > p(t, first[t]) ? e : first[t];
      second[t] = first[t] == 0 ? 1 : 0;
      for (int e = 0; e < E; ++e)
        if (e != first[t] && p(t, e) > p(t, second[t])) second[t] = e;
      const S g2 = weighting == Weighting::renormalize_before_drop ? p(t, second[t]) / (p(t, first[t]) + p(t, second[t]))
                                                                   : p(t, second[t]);
      accepted[t] = 2 * g2 > u(t, 0);
      rejected += !accepted[t];
      kept1[t] = taken[first[t]] < C;
      taken[first[t]] += kept1[t];
    }
    for (Index t = 0; t < T; ++t) {
      kept2[t] = accepted[t] && taken[second[t]] < C;
      taken[second[t]] += kept2[t];
    }
    REQUIRE(rejected > 0);
    REQUIRE(rejected < T);
    for (Index t = 0; t < T; ++t) {
      INFO("token " << t);
      REQUIRE(r.choice_expert[2 * t] == first[t]);
      REQUIRE(r.choice_expert[2 * t + 1] == second[t]);
      REQUIRE((r.choice_slot[2 * t] >= 0) == kept1[t]);
      REQUIRE((r.choice_slot[2 * t + 1] >= 0) == kept2[t]);
      const S p1 = p(t, first[t]), p2 = p(t, second[t]);
      const bool after = weighting == Weighting::renormalize_after_drop;
      const S z = (after ? (kept1[t] ? p1 : 0) + (kept2[t] ? p2 : 0) : p1 + p2);
      if (kept1[t]) REQUIRE(r.slot_weight[r.choice_slot[2 * t]] == Approx(p1 / z).epsilon(forward_tol<S>(4)));
      if (kept2[t]) REQUIRE(r.slot_weight[r.choice_slot[2 * t + 1]] == Approx(p2 / z).epsilon(forward_tol<S>(4)));
    }
  }
}

TEST_CASE("stochastic routing: the same seed and step give the same bits, the step advances", "[router][noise]") {
  auto make = [] {
    return moe::make_deepspeed_topk_router<float>(8, 6, 1, 0.5, 2, 3, std::nullopt,
                                                  {.noisy_gate_policy = moe::NoisyGatePolicy::jitter, .seed = 11});
  };
  const Matrix<float> x = random_matrix<float>(64, 8, 12);
  auto a = make(), b = make();
  REQUIRE(a.step() == 0);
  const auto first = a.forward(x);
  REQUIRE(a.step() == 1);
  const auto next = a.forward(x);  // step 1: other draws
  REQUIRE(next.slot_token != first.slot_token);
  REQUIRE(b.forward(x).slot_token == first.slot_token);  // another router, same seed and step
  a.set_step(0);
  const auto replay = a.forward(x);
  REQUIRE(replay.slot_token == first.slot_token);
  REQUIRE(replay.slot_weight == first.slot_weight);
  REQUIRE(a.logits() == b.logits());
  // another seed draws otherwise
  auto c = moe::make_deepspeed_topk_router<float>(8, 6, 1, 0.5, 2, 3, std::nullopt, {.seed = 12});
  REQUIRE(c.forward(x).slot_token != first.slot_token);
}

TEST_CASE("router gradients: jitter, sampled selection, random token selection, random second expert",
          "[router][gradient][noise]") {
  using moe::NoisyGatePolicy;
  check_router_gradient(moe::make_deepspeed_topk_router<double>(6, 5, 1, 0.6, 2, 0, std::nullopt,
                                                                {.noisy_gate_policy = NoisyGatePolicy::jitter, .seed = 3}),
                        16, 61);
  check_router_gradient(moe::make_deepspeed_topk_router<double>(6, 5, 1, 0.6, 2, 0, std::nullopt,
                                                                {.noisy_gate_policy = NoisyGatePolicy::rsample, .seed = 4}),
                        16, 62, true, true);
  check_router_gradient(moe::make_deepspeed_topk_router<double>(6, 5, 2, 0.6, 2, 0, std::nullopt, {.seed = 5}), 16, 63);
  check_router_gradient(
      moe::Router(moe::LinearScorer<double>(6, 4, {.jitter = 0.2, .jitter_draws = {.seed = 1}}), moe::SoftmaxGate<double>{},
                  moe::TopKSelector<double, 2>({.weighting = Weighting::renormalize_after_drop,
                                                .capacity = {.factor = 0.75},
                                                .second = moe::SecondExpert::random,
                                                .draws = {.seed = 2}}),
                  moe::LoadBalanceLoss<double>(BalanceNorm::switch_top1, 0.1)),
      16, 64, true);
}

TEST_CASE("noise options: bad configuration and draws of the wrong shape are named errors", "[errors][noise]") {
  require_error<moe::config_error>([] { moe::LinearScorer<float>(4, 3, {.jitter = 1.0}); }, {"'jitter'", "= 1", "jitter < 1"});
  require_error<moe::config_error>([] { moe::TopKSelector<float>(3, {.second = moe::SecondExpert::random}); },
                                   {"'k'", "= 3", "k = 2 for SecondExpert::random"});
  require_error<moe::config_error>(
      [] {
        moe::TopKSelector<float, 2>({.capacity = {.factor = 1.0, .overflow = OverflowOrder::by_masked_logit},
                                     .second = moe::SecondExpert::random});
      },
      {"capacity.overflow", "by_masked_logit"});
  auto router = moe::make_deepspeed_topk_router<float>(4, 6, 2, 1.0, 2);
  const Matrix<float> x = random_matrix<float>(10, 4, 3);
  const auto before = router.forward(x);
  const std::vector<float> short_draws(59, 0.5f), jitter(39, 0.5f);
  require_error<moe::shape_error>([&] { router.forward(x, {.gumbel = short_draws}); }, {"'tokens.gumbel' = 59", "or 60"});
  require_error<moe::shape_error>([&] { router.forward(x, {.uniform = short_draws}); }, {"'tokens.uniform' = 59"});
  require_error<moe::shape_error>([&] { router.forward(x, {.second_uniform = short_draws}); }, {"'tokens.second_uniform' = 59", "or 10"});
  require_error<moe::shape_error>([&] { router.forward(x, {.jitter = jitter}); }, {"'tokens.jitter' = 39", "or 40"});
  REQUIRE(router.routing().choice_expert == before.choice_expert);
  REQUIRE(router.routing().slot_weight == before.slot_weight);
  REQUIRE(router.step() == 1);  // a rejected call does not advance the step
}
