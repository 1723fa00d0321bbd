// Dynamic-k routing (docs/selectors.md TopPSelector / DynamicKSelector, docs/losses.md
// EntropyLoss, docs/routers.md TopPRouter / XMoEThresholdRouter / DynamicKRouter): scalar oracles
// written from the math, exact boundaries, capacity, gradients, edge cases and errors.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::OverflowOrder;
using moe::TopPBoundary;
using moe::Weighting;

namespace {

using Catch::Matchers::Contains;

// Experts by (score desc, index asc): the order every dynamic-k oracle walks.
template <class S>
std::vector<int> by_score(const Matrix<S>& scores, Index t) {
  std::vector<int> order(std::size_t(scores.cols()));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores(t, a) > scores(t, b); });
  return order;
}

// Top-p from the definition: expert j of that order is taken iff the mass of the experts before
// it is <= p (exceeds) or < p (reaches); the first always. The mass is summed in S, in order.
template <class S>
std::vector<int> top_p_oracle(const Matrix<S>& scores, Index t, double p, TopPBoundary boundary) {
  const auto order = by_score(scores, t);
  std::vector<int> kept;
  S before = 0;
  for (int e : order) {
    const bool take = kept.empty() || (boundary == TopPBoundary::exceeds ? before <= S(p) : before < S(p));
    if (!take) break;
    kept.push_back(e);
    before += scores(t, e);
  }
  return kept;
}

template <class S>
std::vector<int> choices_of(const moe::SparseRouting<S>& r, Index t) {
  return {r.choice_expert.begin() + r.token_offsets[t], r.choice_expert.begin() + r.token_offsets[t + 1]};
}

template <class S>
S weight_of(const moe::SparseRouting<S>& r, Index c) {
  return r.choice_slot[c] >= 0 ? r.slot_weight[r.choice_slot[c]] : S(0);
}

// What every sparse routing must satisfy: C respected, no (token, expert) twice, masked tokens
// absent, slots and choices agree.
template <class S>
void require_routing_invariants(const moe::SparseRouting<S>& r, std::span<const std::uint8_t> valid = {}) {
  REQUIRE(Index(r.token_offsets.size()) == r.num_tokens + 1);
  REQUIRE(r.expert_offsets[r.num_experts] == r.num_slots());
  for (Index e = 0; e < r.num_experts; ++e) {
    if (r.capacity >= 0) REQUIRE(r.expert_count[e] <= r.capacity);
    std::set<int> tokens;
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
      if (r.slot_token[s] >= 0) REQUIRE(tokens.insert(r.slot_token[s]).second);  // no token twice
  }
  for (Index t = 0; t < r.num_tokens; ++t) {
    if (!valid.empty() && !valid[std::size_t(t)]) REQUIRE(r.token_offsets[t + 1] == r.token_offsets[t]);
    std::set<int> experts;
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      REQUIRE(experts.insert(r.choice_expert[c]).second);
      if (const auto s = r.choice_slot[c]; s >= 0) {
        REQUIRE(r.slot_token[s] == t);
        REQUIRE(s >= r.expert_offsets[r.choice_expert[c]]);
        REQUIRE(s < r.expert_offsets[r.choice_expert[c] + 1]);
      }
    }
  }
}

template <class S>
Matrix<S> softmax_rows(const Matrix<S>& logits) {
  Matrix<S> p(logits.rows(), logits.cols());
  for (Index t = 0; t < logits.rows(); ++t) {
    const S top = logits.row(t).maxCoeff();
    p.row(t) = (logits.row(t).array() - top).exp().matrix();
    p.row(t) /= p.row(t).sum();
  }
  return p;
}

template <class S>
moe::SparseRouting<S> select(moe::TopPSelector<S>& sel, const Matrix<S>& scores, const moe::TokenInputs<S>& tokens = {}) {
  moe::SparseRouting<S> r;
  const Matrix<S> logits = scores.array().max(S(1e-30)).log().matrix();
  sel.forward({logits, scores, scores, tokens}, r);
  return r;
}

}  // namespace

// ---- top-p ----------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("top-p keeps the smallest prefix passing p, at least one expert, raw weights", "[top_p]", float, double) {
  using S = TestType;
  const Index T = 200, E = 13;  // 13: the SIMD kernel's fallback; 16 and 64 below fill registers
  for (const Index experts : {E, Index(16), Index(64)})
    for (const double p : {0.05, 0.4, 0.9, 1.0})
      for (const auto boundary : {TopPBoundary::exceeds, TopPBoundary::reaches}) {
        const Matrix<S> scores = softmax_rows<S>(random_matrix<S>(T, experts, 3, 2.0));
        moe::TopPSelector<S> sel({.p = p, .boundary = boundary});
        const auto r = select(sel, scores);
        require_routing_invariants(r);
        REQUIRE(r.capacity == -1);
        REQUIRE(r.num_dropped() == 0);
        for (Index t = 0; t < T; ++t) {
          INFO("E " << experts << " p " << p << " token " << t);
          REQUIRE(choices_of(r, t) == top_p_oracle(scores, t, p, boundary));
          for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
            REQUIRE(weight_of(r, c) == scores(t, r.choice_expert[c]));  // the raw probability
        }
      }
}

TEST_CASE("top-p boundary: a cumulative sum equal to p, exactly (powers of two)", "[top_p]") {
  using S = float;
  Matrix<S> scores(3, 4);
  scores << 0.5f, 0.25f, 0.125f, 0.125f,   // c = 0.5, 0.75, 0.875, 1
            0.125f, 0.25f, 0.125f, 0.5f,   // same values, permuted: ties 0 before 2
            0.25f, 0.25f, 0.25f, 0.25f;    // all tied: lower expert first
  const auto run = [&](double p, TopPBoundary b) {
    moe::TopPSelector<S> sel({.p = p, .boundary = b});
    const auto r = select(sel, scores);
    return std::vector<std::vector<int>>{choices_of(r, 0), choices_of(r, 1), choices_of(r, 2)};
  };
  using V = std::vector<std::vector<int>>;
  // Dynamic_MoE (cum > p stops): at c = 0.75 = p the next expert is still taken
  REQUIRE(run(0.75, TopPBoundary::exceeds) == V{{0, 1, 2}, {3, 1, 0}, {0, 1, 2, 3}});
  // XMoE / GLIDER (cum >= p stops)
  REQUIRE(run(0.75, TopPBoundary::reaches) == V{{0, 1}, {3, 1}, {0, 1, 2}});
  REQUIRE(run(0.5, TopPBoundary::exceeds) == V{{0, 1}, {3, 1}, {0, 1, 2}});
  REQUIRE(run(0.5, TopPBoundary::reaches) == V{{0}, {3}, {0, 1}});
  // p = 1: exceeds never stops (the mass never passes 1): every expert, as Dynamic_MoE keeps all
  REQUIRE(run(1.0, TopPBoundary::exceeds) == V{{0, 1, 2, 3}, {3, 1, 0, 2}, {0, 1, 2, 3}});
  REQUIRE(run(1.0, TopPBoundary::reaches) == V{{0, 1, 2, 3}, {3, 1, 0, 2}, {0, 1, 2, 3}});
  // a tiny p: exactly one expert, the best
  REQUIRE(run(1e-6, TopPBoundary::exceeds) == V{{0}, {3}, {0}});
}

TEST_CASE("top-p kernel: SIMD rows equal the scalar twin", "[top_p][kernel]") {
  // E = 128 and 256 fill 8 and 16 registers (the wide path under AVX-512); the rounded logits
  // tie, so equal maxima in different registers must go to the lower expert
  for (const Index E : {Index(4), Index(8), Index(16), Index(24), Index(32), Index(64), Index(80), Index(128), Index(256)}) {
    for (const bool tied : {false, true}) {
      Matrix<float> l = random_matrix<float>(64, E, 11, 3.0);
      if (tied) l = l.array().round().matrix();
      const Matrix<float> p = softmax_rows<float>(l);
      std::vector<std::int32_t> a(static_cast<std::size_t>(E)), b(static_cast<std::size_t>(E));
      std::vector<float> va(static_cast<std::size_t>(E)), vb(static_cast<std::size_t>(E));
      for (Index t = 0; t < p.rows(); ++t)
        for (const bool reaches : {false, true})
          for (const float mass : {0.2f, 0.4f, 0.9f, 1.0f}) {
            const Index n = moe::kernels::top_p_row<float>(p.row(t).data(), E, mass, reaches, a.data(), va.data());
            const Index m = moe::kernels::scalar::top_p_row<float>(p.row(t).data(), E, mass, reaches, b.data(), vb.data());
            REQUIRE(n == m);
            for (Index j = 0; j < n; ++j) REQUIRE((a[std::size_t(j)] == b[std::size_t(j)] && va[std::size_t(j)] == vb[std::size_t(j)]));
          }
    }
  }
}

TEMPLATE_TEST_CASE("top-p renormalised weights (GLIDER / PHATGOOSE form)", "[top_p]", float, double) {
  using S = TestType;
  const Index T = 64, E = 8;
  const Matrix<S> scores = softmax_rows<S>(random_matrix<S>(T, E, 5, 1.5));
  for (const auto w : {Weighting::renormalize_before_drop, Weighting::renormalize_after_drop}) {
    moe::TopPSelector<S> sel({.p = 0.6, .boundary = TopPBoundary::reaches, .weighting = w, .scale = 2.0});
    const auto r = select(sel, scores);
    for (Index t = 0; t < T; ++t) {
      S z = 0;
      for (int e : choices_of(r, t)) z += scores(t, e);
      for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
        REQUIRE(weight_of(r, c) == Approx(2.0 * double(scores(t, r.choice_expert[c]) / z)).epsilon(forward_tol<S>(E)));
    }
  }
}

TEST_CASE("top-p with capacity: C from the number of choices, first choices first, survivors renormalised", "[top_p][capacity]") {
  using S = double;
  const Index T = 120, E = 6;
  const Matrix<S> scores = softmax_rows<S>(random_matrix<S>(T, E, 7, 1.0));
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  for (Index t = 0; t < T; t += 7) valid[std::size_t(t)] = 0;
  const moe::TokenInputs<S> tokens{.valid = valid};
  for (const auto overflow : {OverflowOrder::rank_major, OverflowOrder::token_major, OverflowOrder::by_weight,
                              OverflowOrder::by_score, OverflowOrder::rank_major_by_score})
    for (const auto slots : {moe::SlotOrder::token, moe::SlotOrder::priority}) {
      moe::TopPSelector<S> sel({.p = 0.7, .weighting = Weighting::renormalize_after_drop,
                                .capacity = {.factor = 0.8, .overflow = overflow, .slot_order = slots}});
      const auto r = select(sel, scores, tokens);
      require_routing_invariants<S>(r, valid);
      // the oracle: the choices of the real tokens, C = ceil(0.8 * choices / E)
      struct Choice { Index token, rank; int expert; S score; };
      std::vector<Choice> all;
      Index real = 0;
      for (Index t = 0; t < T; ++t) {
        if (!valid[std::size_t(t)]) continue;
        ++real;
        const auto kept = top_p_oracle(scores, t, 0.7, TopPBoundary::exceeds);
        REQUIRE(choices_of(r, t) == kept);
        for (std::size_t j = 0; j < kept.size(); ++j) all.push_back({t, Index(j), kept[j], scores(t, kept[j])});
      }
      REQUIRE(r.num_valid_tokens == real);
      const Index C = Index(std::ceil(0.8 * double(all.size()) / double(E)));
      REQUIRE(r.capacity == C);
      const auto key = [&](const Choice& c) {
        switch (overflow) {
          case OverflowOrder::rank_major: return std::make_tuple(double(c.rank), 0.0, double(c.token));
          case OverflowOrder::token_major: return std::make_tuple(double(c.token), double(c.rank), 0.0);
          case OverflowOrder::by_score: return std::make_tuple(-double(c.score), double(c.token), double(c.rank));
          case OverflowOrder::rank_major_by_score: return std::make_tuple(double(c.rank), -double(c.score), double(c.token));
          default: break;
        }
        // by_weight: the pre-drop weight, renormalised over the token's choices
        S z = 0;
        for (int e : top_p_oracle(scores, c.token, 0.7, TopPBoundary::exceeds)) z += scores(c.token, e);
        return std::make_tuple(-double(c.score / z), double(c.token), double(c.rank));
      };
      std::stable_sort(all.begin(), all.end(), [&](const auto& a, const auto& b) { return key(a) < key(b); });
      std::map<int, Index> taken;
      std::set<std::pair<Index, int>> kept;
      for (const auto& c : all)
        if (taken[c.expert] < C) ++taken[c.expert], kept.insert({c.token, c.expert});
      for (Index t = 0; t < T; ++t) {
        S z = 0;
        for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
          REQUIRE((r.choice_slot[c] >= 0) == bool(kept.count({t, r.choice_expert[c]})));
          if (r.choice_slot[c] >= 0) z += scores(t, r.choice_expert[c]);
        }
        for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
          if (r.choice_slot[c] >= 0) REQUIRE(weight_of(r, c) == Approx(scores(t, r.choice_expert[c]) / z).epsilon(forward_tol<S>(E)));
      }
    }
}

// ---- XMoE threshold -------------------------------------------------------------------------

TEST_CASE("XMoEThresholdRouter: threshold 0.9, C = max(ceil(cf T / E), min), rank then probability, priority slots", "[xmoe_threshold]") {
  using S = double;
  const Index T = 300, E = 8, D = 6;
  const double cf = 0.5;
  const Index min_capacity = 4;
  auto router = moe::make_xmoe_threshold_router<S>(D, E, 0.9, cf, min_capacity, 3);
  const Matrix<S> logits = random_matrix<S>(T, E, 13, 1.5);
  const auto& r = router.route(logits);
  require_routing_invariants(r);
  const Matrix<S>& p = router.scores();
  REQUIRE(r.capacity == std::max<Index>(Index(std::ceil(cf * double(T) / double(E))), min_capacity));
  // per expert, its choosers by (rank asc, probability desc, token asc): the first C keep a slot,
  // in that order
  std::map<int, std::vector<std::tuple<Index, double, Index>>> wants;
  for (Index t = 0; t < T; ++t) {
    const auto kept = top_p_oracle(p, t, 0.9, TopPBoundary::reaches);
    REQUIRE(choices_of(r, t) == kept);
    for (std::size_t j = 0; j < kept.size(); ++j) wants[kept[j]].emplace_back(Index(j), -p(t, kept[j]), t);
  }
  for (Index e = 0; e < E; ++e) {
    auto& w = wants[int(e)];
    std::sort(w.begin(), w.end());
    const Index n = std::min<Index>(Index(w.size()), r.capacity);
    REQUIRE(r.expert_count[e] == n);
    for (Index i = 0; i < n; ++i) {
      const Index s = r.expert_offsets[e] + i, t = std::get<2>(w[std::size_t(i)]);
      REQUIRE(r.slot_token[s] == t);
      REQUIRE(r.slot_weight[s] == p(t, e));  // raw probability
    }
  }
  // l_aux = E sum_e mean_t p_te * (first-choice fraction of e)
  double aux = 0;
  for (Index e = 0; e < E; ++e) {
    double first = 0;
    for (Index t = 0; t < T; ++t) first += r.choice_expert[r.token_offsets[t]] == e;
    aux += p.col(e).mean() * first / double(T);
  }
  REQUIRE(router.loss_values()[0] == Approx(double(E) * aux).epsilon(forward_tol<S>(T)));
}

// ---- DA-MoE per-token k ---------------------------------------------------------------------

TEMPLATE_TEST_CASE("DynamicKSelector: k_t = clamp(ceil(k_max I_t / max I), 1, k_max), top-k_t, C from sum k_t", "[dynamic_k]", float, double) {
  using S = TestType;
  const Index T = 150, E = 10, k_max = 4;
  const Matrix<S> logits = random_matrix<S>(T, E, 17, 2.0);
  const Matrix<S> scores = softmax_rows<S>(logits);
  std::vector<S> importance(static_cast<std::size_t>(T));
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  for (Index t = 0; t < T; ++t) importance[std::size_t(t)] = S(std::abs(std::sin(0.37 * double(t))) * 3);
  importance[5] = 0;           // -> k = 1
  valid[9] = valid[40] = 0;
  importance[9] = S(100);      // masked: not the maximum
  const moe::TokenInputs<S> tokens{.valid = valid, .importance = importance};
  moe::DynamicKSelector<S> sel(k_max, {.weighting = Weighting::raw, .capacity = {.factor = 1.0}});
  moe::SparseRouting<S> r;
  sel.forward({logits, scores, scores, tokens}, r);
  require_routing_invariants<S>(r, valid);
  S largest = 0;
  for (Index t = 0; t < T; ++t)
    if (valid[std::size_t(t)]) largest = std::max(largest, importance[std::size_t(t)]);
  Index choices = 0;
  for (Index t = 0; t < T; ++t) {
    if (!valid[std::size_t(t)]) continue;
    const Index k = std::clamp(Index(std::ceil(double(k_max) * double(importance[std::size_t(t)]) / double(largest))), Index(1), k_max);
    auto order = by_score(scores, t);
    order.resize(std::size_t(k));
    REQUIRE(choices_of(r, t) == order);
    choices += k;
  }
  REQUIRE(choices_of(r, 5).size() == 1);
  REQUIRE(r.num_choices() == choices);
  REQUIRE(r.capacity == Index(std::ceil(double(choices) / double(E))));
  // rank-major: every dropped choice lost to C earlier ones (rank, token) of its expert
  for (Index t = 0; t < T; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      if (r.choice_slot[c] >= 0) continue;
      REQUIRE(r.expert_count[r.choice_expert[c]] == r.capacity);
    }
}

// ---- gradients ------------------------------------------------------------------------------

TEST_CASE("gradients: top-p raw and renormalised weights, dynamic k, entropy loss (finite differences, double)", "[gradient]") {
  using S = double;
  const Index T = 24, D = 5, E = 6;
  const Matrix<S> R = random_matrix<S>(T, E, 21);
  Matrix<S> x = random_matrix<S>(T, D, 22, 1.5);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  valid[3] = valid[17] = 0;
  std::vector<S> importance(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) importance[std::size_t(t)] = S(1 + t % 5);
  const moe::TokenInputs<S> tokens{.valid = valid, .importance = importance};
  const auto check = [&](auto router) {
    const auto f = [&] { return slot_objective(router, x, R, tokens); };
    f();
    const Matrix<S> dx = slot_backward(router, x, R, tokens);
    require_gradient_close(dx, numeric_gradient(x, f));
  };
  for (const auto w : {Weighting::raw, Weighting::renormalize_before_drop, Weighting::renormalize_after_drop}) {
    check(moe::Router(moe::LinearScorer<S>(D, E, {.seed = 1}), moe::SoftmaxGate<S>{},
                      moe::TopPSelector<S>({.p = 0.6, .weighting = w, .capacity = {.factor = 0.9}}),
                      moe::LoadBalanceLoss<S>(moe::BalanceNorm::flaxformer, 0.1), moe::EntropyLoss<S>(0.3)));
    check(moe::Router(moe::LinearScorer<S>(D, E, {.seed = 2}), moe::SoftmaxGate<S>{},
                      moe::DynamicKSelector<S>(3, {.weighting = w, .capacity = {.factor = 1.0}}),
                      moe::LoadBalanceLoss<S>(moe::BalanceNorm::megatron, 0.1)));
  }
  check(moe::make_top_p_router<S>(D, E, 0.5, 4));
  check(moe::make_xmoe_threshold_router<S>(D, E, 0.9, 1.0, 2, 5));
}

TEST_CASE("EntropyLoss: value is the mean router entropy over real tokens; gradient by finite differences", "[loss][entropy]") {
  using S = double;
  const Index T = 20, E = 7;
  Matrix<S> logits = random_matrix<S>(T, E, 31, 2.0);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  valid[2] = valid[11] = 0;
  const moe::TokenInputs<S> tokens{.valid = valid};
  moe::Router router(moe::LinearScorer<S>(3, E), moe::SoftmaxGate<S>{}, moe::TopPSelector<S>({.p = 0.5}),
                     moe::EntropyLoss<S>(1.0));
  router.route(logits, tokens);
  // oracle: -sum p log p per real token, mean over the 18 real tokens
  const Matrix<S> p = softmax_rows<S>(logits);
  double h = 0;
  for (Index t = 0; t < T; ++t)
    if (valid[std::size_t(t)])
      for (Index e = 0; e < E; ++e) h -= p(t, e) * std::log(p(t, e));
  REQUIRE(router.loss_values()[0] == Approx(h / 18).epsilon(forward_tol<S>(T * E)));
  std::vector<S> zero(std::size_t(router.routing().num_slots()), 0.0);
  const Matrix<S> dlogits = router.backward_logits(tokens, zero);
  const auto f = [&] {
    router.route(logits, tokens);
    return double(router.aux_loss());
  };
  require_gradient_close(dlogits, numeric_gradient(logits, f));
  REQUIRE(dlogits.row(2).isZero());
  REQUIRE_THROWS_AS(moe::EntropyLoss<S>(-1), moe::config_error);
}

// ---- edge cases -----------------------------------------------------------------------------

TEMPLATE_TEST_CASE("dynamic k edge cases: logits near +-1e3, T = 0, all masked, E = 1", "[edge]", float, double) {
  using S = TestType;
  const Index E = 8, D = 4;
  Matrix<S> logits = random_matrix<S>(6, E, 41, 1.0);
  logits(0, 3) = S(1000);
  logits(1, 2) = S(-1000);
  logits.row(2).setConstant(S(1000));
  logits.row(3).setConstant(S(-1000));
  std::vector<S> importance = {1, 2, 3, 4, 5, 6};
  const moe::TokenInputs<S> tokens{.importance = importance};
  auto top_p = moe::make_top_p_router<S>(D, E);
  auto dyn = moe::make_dynamic_k_router<S>(D, E, 3);
  for (const auto* r : {&top_p.route(logits, tokens), &dyn.route(logits, tokens)}) {
    require_routing_invariants(*r);
    for (const S w : r->slot_weight) REQUIRE(std::isfinite(w));
  }
  REQUIRE(choices_of(top_p.routing(), 0) == std::vector<int>{3});  // all mass on one expert
  REQUIRE(choices_of(top_p.routing(), 2).size() == 4);             // uniform: 0.125 each, passes 0.4 at the 4th
  REQUIRE(std::isfinite(top_p.loss_values()[1]));
  std::vector<S> zero(std::size_t(top_p.routing().num_slots()), S(1));
  REQUIRE(top_p.backward_logits(tokens, zero).allFinite());

  // T = 0
  const Matrix<S> none(0, E);
  REQUIRE(top_p.route(none).num_choices() == 0);
  REQUIRE(dyn.route(none).num_slots() == 0);
  REQUIRE(moe::experts_per_token_histogram(dyn.routing()) == std::vector<Index>(std::size_t(E + 1), 0));

  // all masked: no choices, losses 0
  const std::vector<std::uint8_t> masked(6, 0);
  const auto& rm = top_p.route(logits, {.valid = masked});
  REQUIRE(rm.num_choices() == 0);
  REQUIRE(rm.num_valid_tokens == 0);
  REQUIRE(top_p.loss_values()[0] == 0);
  REQUIRE(top_p.loss_values()[1] == 0);
  REQUIRE(dyn.route(logits, {.valid = masked, .importance = importance}).num_slots() == 0);

  // E = 1: every token takes the one expert at weight 1
  auto one = moe::make_top_p_router<S>(D, 1);
  const Matrix<S> single = random_matrix<S>(5, 1, 2);
  const auto& r1 = one.route(single);
  REQUIRE(r1.num_choices() == 5);
  for (const S w : r1.slot_weight) REQUIRE(w == S(1));
  auto one_k = moe::make_dynamic_k_router<S>(D, 1, 1);
  REQUIRE(one_k.route(single, {.importance = std::span<const S>(importance).first(5)}).num_choices() == 5);
}

TEST_CASE("dynamic k errors: named, thrown before anything is written", "[errors]") {
  using S = float;
  const Index T = 10, E = 6, D = 4;
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH(moe::TopPSelector<S>({.p = 0.0}), Contains("'p' = 0") && Contains("0 < p <= 1"));
  REQUIRE_THROWS_AS(moe::TopPSelector<S>({.p = 1.5}), moe::config_error);
  REQUIRE_THROWS_AS(moe::TopPSelector<S>({.p = std::nan("")}), moe::config_error);
  REQUIRE_THROWS_WITH(moe::TopPSelector<S>({.weighting = Weighting::softmax_of_kept_logits}), Contains("weighting"));
  REQUIRE_THROWS_WITH(moe::TopPSelector<S>({.capacity = {.factor = 1.0, .overflow = OverflowOrder::random}}),
                      Contains("capacity.overflow") && Contains("random"));
  REQUIRE_THROWS_WITH(moe::DynamicKSelector<S>(0), Contains("'k_max' = 0") && Contains("k_max >= 1"));
  REQUIRE_THROWS_WITH(moe::make_dynamic_k_router<S>(D, E, 7), Contains("'k_max' = 7") && Contains("number of experts (6)"));

  auto router = moe::make_dynamic_k_router<S>(D, E, 3);
  const Matrix<S> x = random_matrix<S>(T, D, 1);
  std::vector<S> importance(static_cast<std::size_t>(T), 1.0f);
  router.forward(x, {.importance = importance});
  const auto before = router.routing();
  const auto same = [&] {
    REQUIRE(router.routing().choice_expert == before.choice_expert);
    REQUIRE(router.routing().slot_weight == before.slot_weight);
  };
  REQUIRE_THROWS_WITH(router.forward(x), Contains("tokens.importance") && Contains("length 10"));
  same();
  REQUIRE_THROWS_WITH(router.forward(x, {.importance = std::span<const S>(importance).first(9)}),
                      Contains("tokens.importance") && Contains("length 0 (absent) or 10"));
  same();
  importance[4] = std::nanf("");
  REQUIRE_THROWS_AS(router.forward(x, {.importance = importance}), moe::value_error);
  same();
  importance[4] = -1;
  REQUIRE_THROWS_WITH(router.forward(x, {.importance = importance}), Contains("at token 4") && Contains("finite and >= 0"));
  same();
  // a capacity no batch of this size can meet (floor rounds to 0): thrown by finish, routing kept
  moe::Router tight(moe::LinearScorer<S>(D, E), moe::SoftmaxGate<S>{},
                    moe::TopPSelector<S>({.p = 0.1, .capacity = {.factor = 0.01, .rounding = moe::Rounding::floor}}));
  const auto& ok = tight.forward(random_matrix<S>(2000, D, 3));
  const auto kept = ok.slot_token;
  REQUIRE_THROWS_AS(tight.forward(x), moe::config_error);
  REQUIRE(tight.routing().slot_token == kept);
}

// ---- variable k through conversions, statistics and the layer --------------------------------

TEST_CASE("variable k: conversions, experts_per_token_histogram, and the layer (0 experts -> y = 0)", "[layer][dynamic_k]") {
  using S = double;
  const Index T = 40, D = 6, E = 5;
  std::vector<S> importance(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) importance[std::size_t(t)] = S(t % 4);
  std::vector<std::uint8_t> valid(static_cast<std::size_t>(T), 1);
  valid[7] = 0;
  const moe::TokenInputs<S> tokens{.valid = valid, .importance = importance};
  // tight capacity so that some tokens lose every choice
  moe::MoELayer layer(moe::make_dynamic_k_router<S>(D, E, 3, 0.4), moe::IdentityExperts<S>(E, D));
  const Matrix<S> x = random_matrix<S>(T, D, 51);
  Matrix<S> y(T, D);
  layer.forward(x, y, tokens);
  const auto& r = layer.routing();
  require_routing_invariants<S>(r, valid);
  const auto hist = moe::experts_per_token_histogram(r, valid);
  REQUIRE(Index(hist.size()) == E + 1);
  REQUIRE(std::accumulate(hist.begin(), hist.end(), Index(0)) == T - 1);
  REQUIRE(hist[0] > 0);  // some real tokens processed by no expert
  REQUIRE(moe::experts_per_token_histogram(r)[0] == hist[0] + 1);  // + the masked token
  REQUIRE_THROWS_AS(moe::experts_per_token_histogram(r, std::span<const std::uint8_t>(valid).first(3)), moe::shape_error);
  Index zero_rows = 0;
  for (Index t = 0; t < T; ++t) {
    S w = 0;
    Index kept = 0;
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) w += weight_of(r, c), kept += r.choice_slot[c] >= 0;
    // identity experts: y_t = (sum of kept weights) x_t, exactly 0 with no expert
    if (kept == 0) {
      REQUIRE(y.row(t).isZero(0));
      ++zero_rows;
    } else {
      REQUIRE((y.row(t) - w * x.row(t)).cwiseAbs().maxCoeff() <= forward_tol<S>(E));
    }
  }
  REQUIRE(zero_rows == hist[0] + 1);
  // the layer's backward runs through the variable lists too
  Matrix<S> dx(T, D);
  layer.backward(y, dx);
  REQUIRE(dx.allFinite());
  REQUIRE(dx.row(7).isZero(0));

  // conversions: dense [T, max k] with -1 past a token's last choice; map and tensors agree
  moe::IndexMatrix idx, map;
  Matrix<S> w, probs, dispatch, combine;
  moe::to_topk_form(r, idx, w);
  REQUIRE(idx.cols() == moe::max_choices(r));
  REQUIRE(idx.cols() == 3);
  moe::to_routing_map(r, map, probs);
  moe::to_dispatch_combine(r, dispatch, combine);
  for (Index t = 0; t < T; ++t) {
    const Index n = r.token_offsets[t + 1] - r.token_offsets[t];
    for (Index j = 0; j < idx.cols(); ++j) {
      if (j >= n) {
        REQUIRE(idx(t, j) == -1);
        REQUIRE(w(t, j) == 0);
        continue;
      }
      const Index c = r.token_offsets[t] + j;
      REQUIRE(idx(t, j) == r.choice_expert[c]);
      REQUIRE(w(t, j) == weight_of(r, c));
      REQUIRE(map(t, r.choice_expert[c]) == (r.choice_slot[c] >= 0));
      REQUIRE(probs(t, r.choice_expert[c]) == weight_of(r, c));
    }
    REQUIRE(combine.row(t).sum() == Approx(probs.row(t).sum()));
    REQUIRE(dispatch.row(t).sum() == double(map.row(t).sum()));
  }
}
