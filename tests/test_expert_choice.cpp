// Expert choice and the transport-plan routers of "Routers in Vision MoE" (ExpertChoiceRouter,
// SinkhornRouter in both modes, S-BASE, SparsityConstrainedECRouter), each checked against an
// oracle written from the math in docs/selectors.md, docs/gates.md and docs/routers.md (not from
// the code under test): the capacity, the tokens each expert takes and their order, the combine
// weights, the plans' marginals and sparsity, finite-difference gradients in double, the edge
// cases (T < C, T = 0, all padding, E = 1, logits of +-1e3) and the bad-input contract.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::Choice;

namespace {

using Mask = std::vector<std::uint8_t>;
using Picks = std::vector<std::vector<int>>;  // per expert, its tokens in slot order

bool is_valid(const Mask& valid, Index t) { return valid.empty() || valid[std::size_t(t)]; }
Index count_valid(const Mask& valid, Index T) {
  return valid.empty() ? T : Index(std::count(valid.begin(), valid.end(), std::uint8_t(1)));
}

// vmoe compute_capacity: ceil(T cf / E), then up to a multiple of 4.
Index vmoe_capacity(Index tokens, Index experts, double cf) {
  const Index c = Index(std::ceil(double(tokens) * cf / double(experts)));
  return (c + 3) / 4 * 4;
}

// Each expert: its real tokens by (value desc, token asc), the first min(C, n).
Picks top_c_oracle(const Matrix<double>& v, Index C, const Mask& valid) {
  Picks picks(std::size_t(v.cols()));
  for (Index e = 0; e < v.cols(); ++e) {
    std::vector<int> tok;
    for (Index t = 0; t < v.rows(); ++t)
      if (is_valid(valid, t)) tok.push_back(int(t));
    std::sort(tok.begin(), tok.end(), [&](int a, int b) { return v(a, e) != v(b, e) ? v(a, e) > v(b, e) : a < b; });
    tok.resize(std::size_t(std::min<Index>(C, Index(tok.size()))));
    picks[std::size_t(e)] = tok;
  }
  return picks;
}

template <class S>
Picks picks_of(const moe::SparseRouting<S>& r) {
  Picks picks(std::size_t(r.num_experts));
  for (Index e = 0; e < r.num_experts; ++e)
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s) picks[std::size_t(e)].push_back(r.slot_token[s]);
  return picks;
}

// The routing's two indexes agree, no token is twice in one expert, padding is never taken, and
// no expert holds more than C.
template <class S>
void require_consistent(const moe::SparseRouting<S>& r, const Mask& valid) {
  for (Index e = 0; e < r.num_experts; ++e) {
    std::set<int> seen;
    REQUIRE(r.slots_of(e) <= r.capacity);
    REQUIRE(r.expert_count[e] == r.slots_of(e));
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s) {
      const int t = r.slot_token[s];
      REQUIRE(seen.insert(t).second);
      REQUIRE(is_valid(valid, t));
    }
  }
  Index choices = 0;
  for (Index t = 0; t < r.num_tokens; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c, ++choices) {
      const auto s = r.choice_slot[c];
      REQUIRE(r.slot_token[s] == t);
      REQUIRE(s >= r.expert_offsets[r.choice_expert[c]]);
      REQUIRE(s < r.expert_offsets[r.choice_expert[c] + 1]);
      if (c > r.token_offsets[t]) REQUIRE(r.choice_expert[c] > r.choice_expert[c - 1]);  // expert order
    }
  REQUIRE(choices == r.num_slots());
}

// Sinkhorn as ott-jax runs it (kernel mode, epsilon 1): u = 1; rounds of v = (n/E) / K^T u,
// u = 1 / K v; plan = u K v. Padding rows: 0.
Matrix<double> ott_plan(const Matrix<double>& l, const Mask& valid, int rounds) {
  const Index T = l.rows(), E = l.cols();
  const double b = double(count_valid(valid, T)) / double(E);
  Matrix<double> K = Matrix<double>::Zero(T, E);
  for (Index t = 0; t < T; ++t)
    if (is_valid(valid, t)) K.row(t) = l.row(t).array().exp().matrix();
  std::vector<double> u(static_cast<std::size_t>(T)), v(static_cast<std::size_t>(E));
  for (Index t = 0; t < T; ++t) u[std::size_t(t)] = is_valid(valid, t) ? 1.0 : 0.0;
  for (int i = 0; i < rounds; ++i) {
    for (Index e = 0; e < E; ++e) {
      double s = 0;
      for (Index t = 0; t < T; ++t) s += K(t, e) * u[std::size_t(t)];
      v[std::size_t(e)] = b / s;
    }
    for (Index t = 0; t < T; ++t) {
      if (!is_valid(valid, t)) continue;
      double s = 0;
      for (Index e = 0; e < E; ++e) s += K(t, e) * v[std::size_t(e)];
      u[std::size_t(t)] = 1.0 / s;
    }
  }
  Matrix<double> P(T, E);
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) P(t, e) = u[std::size_t(t)] * K(t, e) * v[std::size_t(e)];
  return P;
}

// Megatron-Core's sinkhorn(): d0 then d1 with 1e-8 guards until mean |d1 - d1_old| <= tol.
Matrix<double> megatron_plan(const Matrix<double>& l, double tol, int* rounds) {
  const Index T = l.rows(), E = l.cols();
  const Matrix<double> K = l.array().exp().matrix();
  Eigen::VectorXd d0 = Eigen::VectorXd::Ones(T), d1 = Eigen::VectorXd::Ones(E);
  double error = 1e9;
  *rounds = 0;
  while (error > tol) {
    d0 = ((1.0 / double(T)) / ((K * d1).array() + 1e-8)).matrix();
    const Eigen::VectorXd next = ((1.0 / double(E)) / ((K.transpose() * d0).array() + 1e-8)).matrix();
    error = (next - d1).cwiseAbs().mean();
    d1 = next;
    ++*rounds;
  }
  return d0.asDiagonal() * K * d1.asDiagonal();
}

// The top k of each row (ties to the lower expert), as sets per token.
std::vector<std::vector<int>> top_k_rows(const Matrix<double>& v, Index k) {
  std::vector<std::vector<int>> out(std::size_t(v.rows()));
  for (Index t = 0; t < v.rows(); ++t) {
    std::vector<int> idx(std::size_t(v.cols()));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v(t, a) > v(t, b); });
    idx.resize(std::size_t(k));
    out[std::size_t(t)] = idx;
  }
  return out;
}

// Projection onto the k-sparse simplex: the k largest entries (ties to the lower index) onto the
// simplex by sorting (Duchi et al.), the rest 0.
std::vector<double> ksparse_simplex(const std::vector<double>& z, Index k) {
  std::vector<int> idx(z.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return z[std::size_t(a)] > z[std::size_t(b)]; });
  idx.resize(std::size_t(k));
  double tau = 0, sum = 0;
  for (Index j = 0; j < k; ++j) {  // the largest j whose entry stays positive
    sum += z[std::size_t(idx[std::size_t(j)])];
    const double t = (sum - 1) / double(j + 1);
    if (z[std::size_t(idx[std::size_t(j)])] - t > 0) tau = t;
  }
  std::vector<double> p(z.size(), 0.0);
  for (int i : idx) p[std::size_t(i)] = std::max(z[std::size_t(i)] - tau, 0.0);
  return p;
}

// The C-sparse plan of the scores from its semi-dual, by Adam (lr 1e-2, optax's betas and
// epsilon) from alpha = 0 for at most 20 steps, stopping once |gradient| <= 1e-3.
Matrix<double> ksparse_plan(const Matrix<double>& sim, Index k, int* steps) {
  const Index T = sim.rows(), E = sim.cols();
  const double b = double(T) / double(E);
  std::vector<double> alpha(std::size_t(T), 0.0), m(alpha), v(alpha);
  const auto plan_at = [&] {
    Matrix<double> P(T, E);
    for (Index e = 0; e < E; ++e) {
      std::vector<double> z(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) z[std::size_t(t)] = (alpha[std::size_t(t)] + sim(t, e)) / b;
      const auto p = ksparse_simplex(z, k);
      for (Index t = 0; t < T; ++t) P(t, e) = b * p[std::size_t(t)];
    }
    return P;
  };
  double error = INFINITY;
  *steps = 0;
  while (*steps < 20 && error > 1e-3) {
    const Matrix<double> P = plan_at();
    double norm = 0;
    ++*steps;
    for (Index t = 0; t < T; ++t) {
      const double g = P.row(t).sum() - 1;
      norm += g * g;
      m[std::size_t(t)] = 0.9 * m[std::size_t(t)] + 0.1 * g;
      v[std::size_t(t)] = 0.999 * v[std::size_t(t)] + 0.001 * g * g;
      const double mh = m[std::size_t(t)] / (1 - std::pow(0.9, *steps)), vh = v[std::size_t(t)] / (1 - std::pow(0.999, *steps));
      alpha[std::size_t(t)] -= 1e-2 * mh / (std::sqrt(vh) + 1e-8);
    }
    error = std::sqrt(norm);
  }
  return plan_at();
}

// Logits with ties: rounded to quarters, so equal scores in one column are common.
Matrix<double> tied_logits(Index T, Index E, std::uint64_t seed) {
  return (random_matrix<double>(T, E, seed, 1.5).array() * 4).round().matrix() / 4;
}

}  // namespace

TEST_CASE("expert choice: each expert its top C real tokens, ties to the lower token", "[expert_choice]") {
  for (const Index T : {7, 40, 200})
    for (const Index E : {1, 3, 8})
      for (const double cf : {0.5, 1.0, 2.0})
        for (const bool masked : {false, true}) {
          Mask valid;
          if (masked) {
            valid.assign(std::size_t(T), 1);
            for (Index t = 0; t < T; t += 3) valid[std::size_t(t)] = 0;
          }
          const Index n = count_valid(valid, T);
          auto router = moe::make_expert_choice_router<double>(4, E, cf);
          const Matrix<double> l = tied_logits(T, E, std::uint64_t(T + E));
          const auto& r = router.route(l, {.valid = valid});
          INFO("T " << T << " E " << E << " cf " << cf << " masked " << masked);
          const Index C = vmoe_capacity(n, E, cf);
          REQUIRE(r.capacity == C);
          // ties between tokens with equal logits are exact only within one softmax: the oracle
          // ranks the router's scores, which are checked against the softmax
          const Matrix<double> p = softmax_of(l);
          REQUIRE((router.scores() - p).cwiseAbs().maxCoeff() <= forward_tol<double>(E));
          const Picks want = top_c_oracle(router.scores(), C, valid);
          REQUIRE(picks_of(r) == want);
          for (Index e = 0; e < E; ++e) {
            REQUIRE(r.slots_of(e) == std::min(C, n));  // exactly C when there are C real tokens
            for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
              REQUIRE(r.slot_weight[s] == Approx(p(r.slot_token[s], e)).epsilon(forward_tol<double>(E)));
          }
          require_consistent(r, valid);
          REQUIRE(r.num_valid_tokens == n);
          REQUIRE(r.num_dropped() == 0);
        }
}

TEST_CASE("expert choice: slots in token order, a given C, and the tokens no expert took", "[expert_choice]") {
  const Index T = 30, E = 4;
  const Matrix<double> l = tied_logits(T, E, 3);
  moe::Router router(moe::LinearScorer<double>(4, E), moe::SoftmaxGate<double>{},
                     moe::ExpertChoiceSelector<double>({.capacity = {.slots = 5}, .slot_order = moe::SlotOrder::token}));
  const auto& r = router.route(l);
  REQUIRE(r.capacity == 5);
  Picks want = top_c_oracle(router.scores(), 5, {});
  for (auto& tokens : want) std::sort(tokens.begin(), tokens.end());
  REQUIRE(picks_of(r) == want);
  // a token is taken by 0..E experts: count those taken by none from the oracle
  std::vector<int> taken(std::size_t(T), 0);
  for (const auto& tokens : want)
    for (int t : tokens) ++taken[std::size_t(t)];
  Index none = 0;
  for (Index t = 0; t < T; ++t) {
    REQUIRE(r.token_offsets[t + 1] - r.token_offsets[t] == taken[std::size_t(t)]);
    none += taken[std::size_t(t)] == 0;
  }
  REQUIRE(none > 0);  // 20 slots over 30 tokens: some token is left out
  // the statistics count them too: bin j of the histogram holds the tokens taken by j experts
  const auto bins = moe::experts_per_token_histogram(r);
  REQUIRE(bins[0] == none);
  for (Index j = 1; j <= E; ++j) REQUIRE(bins[std::size_t(j)] == Index(std::count(taken.begin(), taken.end(), int(j))));
}

TEST_CASE("expert choice: T < C, T = 0, all padding, E = 1 and logits of +-1e3", "[expert_choice]") {
  auto router = moe::make_expert_choice_router<float>(4, 4, 2.0);
  // T < C: C = 4 (a multiple of 4) but only 3 tokens; every expert takes all three
  Matrix<float> l = random_matrix<float>(3, 4, 1);
  auto& r = router.route(l);
  REQUIRE(r.capacity == 4);
  for (Index e = 0; e < 4; ++e) REQUIRE(r.slots_of(e) == 3);
  // T = 0: an empty routing
  Matrix<float> empty(0, 4);
  REQUIRE(router.route(empty).num_slots() == 0);
  // all padding: nothing taken
  const Mask none(5, 0);
  Matrix<float> five = random_matrix<float>(5, 4, 2);
  const auto& masked = router.route(five, {.valid = none});
  REQUIRE(masked.num_slots() == 0);
  REQUIRE(masked.num_valid_tokens == 0);
  // E = 1: the single expert takes its top C
  auto one = moe::make_expert_choice_router<float>(4, 1, 0.5);
  Matrix<float> col = random_matrix<float>(16, 1, 3);
  REQUIRE(one.route(col).slots_of(0) == 8);
  // logits of +-1e3: finite weights, the right tokens
  Matrix<float> huge = (random_matrix<float>(40, 4, 4).array() * 1000.0f).matrix();
  const auto& rh = router.route(huge);
  for (float w : rh.slot_weight) REQUIRE(std::isfinite(w));
  // (float softmax rounds many of these to exactly 0 or 1: the oracle ranks the router's scores)
  REQUIRE(picks_of(rh) == top_c_oracle(router.scores().cast<double>(), vmoe_capacity(40, 4, 2.0), {}));
}

TEST_CASE("expert choice: gradients by finite differences in double, with and without noise", "[expert_choice][gradient]") {
  const Index T = 12, D = 5, E = 3;
  const Matrix<double> x = random_matrix<double>(T, D, 7), R = random_matrix<double>(T, E, 8);
  for (const bool training : {false, true}) {
    auto router = moe::make_expert_choice_router<double>(D, E, 1.0, 1.0, 3);
    router.set_training(training);
    const moe::TokenInputs<double> tokens{};
    slot_objective(router, x, R, tokens, 4);
    const Matrix<double> dx = slot_backward(router, x, R, tokens);
    Matrix<double> dw(E, D);
    router.for_each_parameter([&](std::string_view, auto, auto grad) { dw = grad; });
    Matrix<double> xv = x;
    require_gradient_close(dx, numeric_gradient(xv, [&] { return slot_objective(router, xv, R, tokens, 4); }));
    require_gradient_close(dw, numeric_gradient(router.scorer().weight(), [&] { return slot_objective(router, x, R, tokens, 4); }));
  }
}

TEST_CASE("Sinkhorn gate: the plan's marginals after 20 rounds, padding excluded", "[sinkhorn]") {
  const Index T = 64, E = 8;
  Mask valid(std::size_t(T), 1);
  valid[3] = valid[40] = 0;
  const Matrix<double> l = random_matrix<double>(T, E, 9);
  moe::SinkhornGate<double> gate;
  Matrix<double> scores(T, E), plan(T, E);
  gate.forward(l, scores);
  gate.rank(l, scores, {.valid = valid}, plan);
  REQUIRE(plan.isApprox(ott_plan(l, valid, 20), 1e-12));
  // rows end exact (the last update is the rows'); columns within 1e-3 of n/E after 20 rounds
  const double b = double(T - 2) / double(E);
  for (Index t = 0; t < T; ++t) REQUIRE(plan.row(t).sum() == Approx(valid[std::size_t(t)] ? 1.0 : 0.0).margin(1e-12));
  for (Index e = 0; e < E; ++e) REQUIRE(plan.col(e).sum() == Approx(b).epsilon(1e-3));
}

TEST_CASE("Sinkhorn token choice: top k of the plan, softmax weights, V-MoE capacity", "[sinkhorn]") {
  const Index T = 48, E = 6, k = 2;
  auto router = moe::make_sinkhorn_router<double>(4, E, k, 4.0);  // cf large: no choice dropped
  const Matrix<double> l = random_matrix<double>(T, E, 10, 2.0);
  const auto& r = router.route(l);
  const Matrix<double> plan = ott_plan(l, {}, 20), p = softmax_of(l);
  const auto want = top_k_rows(plan, k);
  REQUIRE(want != top_k_rows(p, k));  // the plan re-ranks some token: the test can tell them apart
  REQUIRE(r.num_dropped() == 0);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < k; ++j) {
      const Index c = r.token_offsets[t] + j;
      REQUIRE(r.choice_expert[c] == want[std::size_t(t)][std::size_t(j)]);
      REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(p(t, r.choice_expert[c])).epsilon(forward_tol<double>(E)));
    }
  REQUIRE(r.capacity == vmoe_capacity(T * k, E, 4.0));
}

TEST_CASE("Sinkhorn expert choice: each expert the top C tokens of the plan", "[sinkhorn]") {
  const Index T = 60, E = 5, k = 2;
  for (const bool masked : {false, true}) {
    Mask valid;
    if (masked) valid.assign(std::size_t(T), 1), valid[0] = valid[17] = valid[59] = 0;
    auto router = moe::make_sinkhorn_router<double, Choice::expert>(4, E, k, 1.0);
    const Matrix<double> l = random_matrix<double>(T, E, 11, 2.0);
    const auto& r = router.route(l, {.valid = valid});
    const Index n = count_valid(valid, T), C = vmoe_capacity(n, E, double(k));
    REQUIRE(r.capacity == C);
    const Matrix<double> plan = ott_plan(l, valid, 20), p = softmax_of(l);
    REQUIRE(picks_of(r) == top_c_oracle(plan, C, valid));
    REQUIRE(picks_of(r) != top_c_oracle(p, C, valid));
    for (Index e = 0; e < E; ++e)
      for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
        REQUIRE(r.slot_weight[s] == Approx(p(r.slot_token[s], e)).epsilon(forward_tol<double>(E)));
    require_consistent(r, valid);
  }
}

TEST_CASE("S-BASE: Megatron's Sinkhorn in training, the scores in evaluation", "[sinkhorn][sbase]") {
  const Index T = 40, E = 6;
  const Matrix<double> l = random_matrix<double>(T, E, 12, 2.0);
  for (const Index k : {1, 2}) {
    auto router = moe::make_sbase_router<double>(4, E, k);
    int rounds = 0;
    const Matrix<double> plan = megatron_plan(l, 1e-4, &rounds);
    const Matrix<double> scores = k == 1 ? Matrix<double>(l.unaryExpr([](double v) { return 1 / (1 + std::exp(-v)); }))
                                         : softmax_of(l);
    for (const bool training : {true, false}) {
      router.set_training(training);
      const auto& r = router.route(l);
      INFO("k " << k << " training " << training);
      const auto want = top_k_rows(training ? plan : scores, k);
      REQUIRE(r.capacity == -1);  // dropless
      for (Index t = 0; t < T; ++t)
        for (Index j = 0; j < k; ++j) {
          const Index c = r.token_offsets[t] + j;
          REQUIRE(r.choice_expert[c] == want[std::size_t(t)][std::size_t(j)]);
          REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(scores(t, r.choice_expert[c])).epsilon(forward_tol<double>(E)));
        }
      REQUIRE(router.gate().rounds() == (training ? rounds : 0));
    }
    REQUIRE(top_k_rows(plan, k) != top_k_rows(scores, k));
  }
}

TEST_CASE("S-BASE with padding: planned and routed as Megatron does, or left out", "[sinkhorn][sbase]") {
  const Index T = 30, E = 5, k = 2;
  const Matrix<double> l = random_matrix<double>(T, E, 24, 2.0);
  Mask valid(std::size_t(T), 1);
  valid[4] = valid[11] = 0;
  int rounds = 0;
  // Padding::megatron: every row in the plan (Megatron takes no mask), padding routed
  auto megatron = moe::make_sbase_router<double>(4, E, k);
  const auto& rm = megatron.route(l, {.valid = valid});
  const auto all = top_k_rows(megatron_plan(l, 1e-4, &rounds), k);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < k; ++j) REQUIRE(rm.choice_expert[rm.token_offsets[t] + j] == all[std::size_t(t)][std::size_t(j)]);
  // Padding::excluded: the plan of the real rows only, padding unrouted
  auto excluded = moe::make_sbase_router<double>(4, E, k, 0, moe::Padding::excluded);
  const auto& re = excluded.route(l, {.valid = valid});
  Matrix<double> real(T - 2, E);
  for (Index t = 0, i = 0; t < T; ++t)
    if (valid[std::size_t(t)]) real.row(i++) = l.row(t);
  const auto some = top_k_rows(megatron_plan(real, 1e-4, &rounds), k);
  Index moved = 0;  // real tokens whose experts change when padding leaves the plan
  for (Index t = 0, i = 0; t < T; ++t) {
    if (!valid[std::size_t(t)]) {
      REQUIRE(re.token_offsets[t + 1] == re.token_offsets[t]);
      continue;
    }
    for (Index j = 0; j < k; ++j) {
      REQUIRE(re.choice_expert[re.token_offsets[t] + j] == some[std::size_t(i)][std::size_t(j)]);
      moved += re.choice_expert[re.token_offsets[t] + j] != rm.choice_expert[rm.token_offsets[t] + j];
    }
    ++i;
  }
  REQUIRE(moved > 0);  // the two conventions are told apart on this batch
}

TEST_CASE("Sinkhorn routers: logits of +-1e3 stay finite, T = 0 and E = 1", "[sinkhorn]") {
  const Matrix<float> huge = (random_matrix<float>(50, 4, 13).array() * 1000.0f).matrix();
  auto tc = moe::make_sinkhorn_router<float>(4, 4, 2, 1.0);
  auto ec = moe::make_sinkhorn_router<float, Choice::expert>(4, 4, 2, 1.0);
  auto sb = moe::make_sbase_router<float>(4, 4, 2);
  for (float w : tc.route(huge).slot_weight) REQUIRE(std::isfinite(w));
  for (float w : ec.route(huge).slot_weight) REQUIRE(std::isfinite(w));
  for (float w : sb.route(huge).slot_weight) REQUIRE(std::isfinite(w));
  Matrix<float> empty(0, 4);
  REQUIRE(tc.route(empty).num_slots() == 0);
  REQUIRE(ec.route(empty).num_slots() == 0);
  REQUIRE(sb.route(empty).num_slots() == 0);
  auto one = moe::make_sinkhorn_router<float, Choice::expert>(4, 1, 1, 1.0);
  Matrix<float> col = random_matrix<float>(8, 1, 14);
  REQUIRE(one.route(col).slots_of(0) == 8);
}

TEST_CASE("Sinkhorn routers: gradients through the softmax by finite differences", "[sinkhorn][gradient]") {
  const Index T = 12, D = 5, E = 4;
  const Matrix<double> x = random_matrix<double>(T, D, 15), R = random_matrix<double>(T, E, 16);
  const moe::TokenInputs<double> tokens{};
  const auto check = [&](auto router) {
    slot_objective(router, x, R, tokens, 2);
    const Matrix<double> dx = slot_backward(router, x, R, tokens);
    Matrix<double> xv = x;
    require_gradient_close(dx, numeric_gradient(xv, [&] { return slot_objective(router, xv, R, tokens, 2); }));
  };
  check(moe::make_sinkhorn_router<double>(D, E, 2, 1.0, 1.0, 1));
  check(moe::make_sinkhorn_router<double, Choice::expert>(D, E, 2, 1.0, 1.0, 1));
  check(moe::make_sbase_router<double>(D, E, 1, 1));
  check(moe::make_sbase_router<double>(D, E, 2, 1));
}

TEST_CASE("sparsity-constrained expert choice: the C-sparse plan and its top C", "[sparsity_constrained]") {
  for (const Index T : {32, 96})
    for (const double cf : {1.0, 2.0}) {
      const Index E = 8;
      auto router = moe::make_sparsity_constrained_ec_router<double>(4, E, cf);
      const Matrix<double> l = random_matrix<double>(T, E, std::uint64_t(T), 2.0);
      const auto& r = router.route(l);
      const Index C = std::min(vmoe_capacity(T, E, cf), T);
      INFO("T " << T << " cf " << cf << " C " << C);
      REQUIRE(r.capacity == vmoe_capacity(T, E, cf));
      int steps = 0;
      const Matrix<double> p = softmax_of(l), want = ksparse_plan(p, C, &steps);
      const Matrix<double>& plan = router.selector().plan();
      REQUIRE(router.selector().steps() == steps);
      REQUIRE((plan - want).cwiseAbs().maxCoeff() <= 1e-9);
      for (Index e = 0; e < E; ++e) {
        REQUIRE((plan.col(e).array() != 0).count() <= C);       // at most C non-zeros per column
        REQUIRE(plan.col(e).sum() == Approx(double(T) / double(E)).epsilon(1e-12));  // each expert mass n/E
        REQUIRE(plan.col(e).minCoeff() >= 0);
      }
      REQUIRE(picks_of(r) == top_c_oracle(want, C, {}));
      for (Index e = 0; e < E; ++e)
        for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s)
          REQUIRE(r.slot_weight[s] == Approx(p(r.slot_token[s], e)).epsilon(forward_tol<double>(E)));
      require_consistent(r, {});
    }
}

TEST_CASE("sparsity-constrained expert choice: gradients, padding and edge cases", "[sparsity_constrained]") {
  const Index T = 12, D = 5, E = 3;
  const Matrix<double> x = random_matrix<double>(T, D, 17), R = random_matrix<double>(T, E, 18);
  Mask valid(std::size_t(T), 1);
  valid[2] = 0;
  const moe::TokenInputs<double> tokens{.valid = valid};
  auto router = moe::make_sparsity_constrained_ec_router<double>(D, E, 1.0, 2);
  slot_objective(router, x, R, tokens, 0);
  require_consistent(router.routing(), valid);
  REQUIRE(router.selector().plan().row(2).isZero());
  const Matrix<double> dx = slot_backward(router, x, R, tokens);
  Matrix<double> xv = x;
  require_gradient_close(dx, numeric_gradient(xv, [&] { return slot_objective(router, xv, R, tokens, 0); }));
  // +-1e3 logits, T = 0, all padding
  auto f = moe::make_sparsity_constrained_ec_router<float>(4, 4, 1.0);
  const Matrix<float> huge = (random_matrix<float>(20, 4, 19).array() * 1000.0f).matrix();
  for (float w : f.route(huge).slot_weight) REQUIRE(std::isfinite(w));
  REQUIRE(f.selector().plan().allFinite());
  Matrix<float> empty(0, 4);
  REQUIRE(f.route(empty).num_slots() == 0);
  const Mask none(6, 0);
  Matrix<float> six = random_matrix<float>(6, 4, 20);
  REQUIRE(f.route(six, {.valid = none}).num_slots() == 0);
}

TEST_CASE("expert choice and plan routers: bad configuration and input get named errors, nothing written",
          "[expert_choice][errors]") {
  using moe::config_error;
  REQUIRE_THROWS_AS(moe::ExpertChoiceSelector<float>({.capacity = {.factor = 0.0}}), config_error);
  REQUIRE_THROWS_AS(moe::ExpertChoiceSelector<float>({.capacity = {.slots = -1}}), config_error);
  REQUIRE_THROWS_AS(moe::ExpertChoiceSelector<float>({.capacity = {.multiple_of = 0}}), config_error);
  REQUIRE_THROWS_AS(moe::SinkhornGate<float>({.iterations = -1}), config_error);
  REQUIRE_THROWS_AS(moe::SinkhornGate<float>({.epsilon = 0.0}), config_error);
  REQUIRE_THROWS_AS(moe::SinkhornGate<float>({.tolerance = -1.0}), config_error);
  REQUIRE_THROWS_AS(moe::SparsityConstrainedECSelector<float>({.solver = {.learning_rate = 0.0}}), config_error);
  REQUIRE_THROWS_AS(moe::SparsityConstrainedECSelector<float>({.solver = {.max_steps = -1}}), config_error);
  REQUIRE_THROWS_AS((moe::make_sinkhorn_router<float, Choice::expert>(4, 4, 0)), config_error);
  try {
    moe::ExpertChoiceSelector<float>({.capacity = {.factor = -2.0}});
    FAIL("no error");
  } catch (const config_error& e) {
    REQUIRE_THAT(e.what(), Catch::Contains("capacity.factor") && Catch::Contains("-2"));
  }
  // a mask of the wrong length and a NaN logit: errors, and the last routing stays
  auto router = moe::make_expert_choice_router<float>(4, 4, 1.0);
  Matrix<float> l = random_matrix<float>(16, 4, 21);
  const auto before = router.route(l).slot_token;
  const Mask wrong(3, 1);
  REQUIRE_THROWS_AS(router.route(l, {.valid = wrong}), moe::shape_error);
  Matrix<float> bad = l;
  bad(5, 2) = NAN;
  REQUIRE_THROWS_AS(router.route(bad), moe::value_error);
  REQUIRE(router.routing().slot_token == before);
}

TEST_CASE("expert choice through the layer: tokens no expert took get y = 0; gradients to x", "[expert_choice][layer]") {
  const Index T = 20, D = 6, E = 4, H = 5;
  auto layer = moe::MoELayer(moe::make_expert_choice_router<double>(D, E, 0.5, 1.0, 1), moe::FFNExperts<double>(E, D, H, moe::Activation::gelu, 2));
  layer.router().set_training(false);
  const Matrix<double> x = random_matrix<double>(T, D, 22), R = random_matrix<double>(T, D, 23);
  Matrix<double> y(T, D);
  layer.forward(x, y);
  const auto& r = layer.routing();
  Index none = 0;
  for (Index t = 0; t < T; ++t) {
    const bool taken = r.token_offsets[t + 1] > r.token_offsets[t];
    none += !taken;
    REQUIRE(y.row(t).isZero() == !taken);
  }
  REQUIRE(none > 0);  // 4 experts x 4 slots over 20 tokens
  // L = sum(y * R): backward against central differences in x
  moe::zero_grad(layer);
  Matrix<double> dx(T, D);
  layer.backward(R, dx);
  Matrix<double> xv = x;
  require_gradient_close(dx, numeric_gradient(xv, [&] {
    Matrix<double> out(T, D);
    layer.forward(xv, out);
    return (out.array() * R.array()).sum();
  }));
}
