// Noise on the logits (NoisyLinearScorer), the importance and load losses and the presets built on
// them (NoisyTopKRouter, VMoERouter, BPRRouter), each checked against oracles written from the
// references' math in docs/scorers.md, docs/losses.md and docs/routers.md (not from the code under
// test), plus finite-difference gradients in double with the draws held fixed, the draws' keys,
// evaluation mode and the bad-input contract.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe_test;

namespace {

using Vec = std::vector<double>;

double phi(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

// CV² as each reference writes it.
double cv2_t2t(const Vec& x) {  // tensor2tensor cv_squared
  const double size = double(x.size()) + 1e-10;
  const double mean = std::accumulate(x.begin(), x.end(), 0.0) / size;
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  var /= size;
  return var / (mean * mean + 1e-10);
}
double cv2_port(const Vec& x) {  // davidmrau/mixture-of-experts cv_squared: torch.var is unbiased
  if (x.size() == 1) return 0;
  const double mean = std::accumulate(x.begin(), x.end(), 0.0) / double(x.size());
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  return var / double(x.size() - 1) / (mean * mean + 1e-10);
}
double cv2_vmoe(const Vec& x) {  // vmoe: jnp.var(x) / jnp.mean(x)**2
  const double mean = std::accumulate(x.begin(), x.end(), 0.0) / double(x.size());
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  const double sd = std::sqrt(var / double(x.size()));
  return (sd / mean) * (sd / mean);
}

Vec softmax(const Vec& v) {
  const double top = *std::max_element(v.begin(), v.end());
  Vec p(v.size());
  double sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) sum += p[i] = std::exp(v[i] - top);
  for (auto& q : p) q /= sum;
  return p;
}

Vec row(const Matrix<double>& m, Index t) { return Vec(m.row(t).data(), m.row(t).data() + m.cols()); }

Vec sorted_desc(Vec v) {
  std::sort(v.begin(), v.end(), std::greater<>());
  return v;
}

// Experts of a row by descending value, ties to the lower index.
std::vector<int> ranking(const Vec& v) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] > v[b]; });
  return idx;
}

// tensor2tensor _prob_in_top_k for one token.
Vec shazeer_p(const Vec& clean, const Vec& noisy, const Vec& sd, int k) {
  const Vec top = sorted_desc(noisy);
  Vec p(clean.size());
  for (std::size_t e = 0; e < clean.size(); ++e) {
    const double threshold = noisy[e] > top[k] ? top[k] : top[k - 1];
    p[e] = phi((clean[e] - threshold) / sd[e]);
  }
  return p;
}

// vmoe _load_auxiliary_loss for one token: 1 - Phi((k-th noisy value - clean) / sd).
Vec vmoe_p(const Vec& clean, const Vec& noisy, double sd, int k) {
  const double threshold = sorted_desc(noisy)[k - 1];
  Vec p(clean.size());
  for (std::size_t e = 0; e < clean.size(); ++e) p[e] = 1 - phi((threshold - clean[e]) / sd);
  return p;
}

// vmoe top-experts-per-item routing: top-k of the scores, tokens by descending top score (stable)
// when batch_priority, rank-major, each expert keeps its first C; weight = the score.
struct RefPick {
  int expert;
  bool kept;
  double weight;
};
std::vector<std::vector<RefPick>> vmoe_route(const Matrix<double>& scores, int k, Index C, bool batch_priority) {
  const Index T = scores.rows();
  std::vector<std::vector<RefPick>> picks(T);
  std::vector<int> order(T);
  std::iota(order.begin(), order.end(), 0);
  if (batch_priority)
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores.row(a).maxCoeff() > scores.row(b).maxCoeff(); });
  std::vector<Index> used(scores.cols(), 0);
  for (Index t = 0; t < T; ++t) picks[t].resize(k);
  for (int r = 0; r < k; ++r)
    for (int t : order) {
      const int e = ranking(row(scores, t))[r];
      const bool kept = used[e] < C;
      used[e] += kept;
      picks[t][r] = {e, kept, scores(t, e)};
    }
  return picks;
}

template <class Router>
void require_routing(const Router& router, const std::vector<std::vector<RefPick>>& ref) {
  const auto& r = router.routing();
  for (Index t = 0; t < r.num_tokens; ++t) {
    REQUIRE(r.token_offsets[t + 1] - r.token_offsets[t] == Index(ref[t].size()));
    for (std::size_t i = 0; i < ref[t].size(); ++i) {
      const Index c = r.token_offsets[t] + Index(i);
      INFO("token " << t << " choice " << i);
      REQUIRE(r.choice_expert[c] == ref[t][i].expert);
      REQUIRE((r.choice_slot[c] >= 0) == ref[t][i].kept);
      if (ref[t][i].kept) REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(ref[t][i].weight).epsilon(1e-14));
    }
  }
}

template <class F>
void require_error(F&& f, std::vector<std::string> words) {
  try {
    f();
    FAIL("no exception");
  } catch (const std::exception& e) {
    const std::string what = e.what();
    INFO(what);
    REQUIRE(dynamic_cast<const moe::error*>(&e) != nullptr);
    for (const auto& w : words) REQUIRE(what.find(w) != std::string::npos);
  }
}

double softplus(double r) { return std::log1p(std::exp(r)); }

// Hand-checkable batch: D = E = 4, W_g = I, so the clean logits are x itself.
const Matrix<double>& hand_x() {
  static const Matrix<double> x = [] {
    Matrix<double> m(3, 4);
    m << 2.0, 1.0, 0.0, -1.0,   //
        -0.5, 0.3, 1.2, 0.1,    //
        0.0, 0.9, -0.4, 0.8;
    return m;
  }();
  return x;
}
}  // namespace

// ---- the scorer -------------------------------------------------------------------------------

TEST_CASE("noisy linear scorer: logits = clean + stddev * n with the caller's draws", "[noisy][scorer]") {
  const Matrix<double>& x = hand_x();
  const Index T = 3, E = 4;
  const Matrix<double> n = random_matrix<double>(T, E, 5);
  const moe::TokenInputs<double> tokens{.normal = {n.data(), std::size_t(T * E)}};

  SECTION("learned: stddev = softplus(x W_noise^T) + 1e-2") {
    auto router = moe::make_noisy_topk_router<double>(4, 4, 2);
    REQUIRE(router.scorer().weight().isZero(0));  // tensor2tensor and the port start at 0
    REQUIRE(router.scorer().noise_weight().isZero(0));
    router.scorer().weight().setIdentity();
    const Matrix<double> Wn = random_matrix<double>(E, 4, 9, 0.5);
    router.scorer().noise_weight() = Wn;
    router.forward(x, tokens);
    const auto* noise = router.scorer().logit_noise();
    REQUIRE(noise != nullptr);
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < E; ++e) {
        double raw = 0;
        for (Index j = 0; j < 4; ++j) raw += x(t, j) * Wn(e, j);
        const double sd = softplus(raw) + 1e-2;
        CHECK(noise->clean(t, e) == Approx(x(t, e)).margin(1e-15));
        CHECK(noise->stddev(t, e) == Approx(sd).epsilon(1e-14));
        CHECK(router.logits()(t, e) == Approx(x(t, e) + sd * n(t, e)).epsilon(1e-14));
      }
  }
  SECTION("fixed: stddev = noise_std / E, one number") {
    auto router = moe::make_vmoe_router<double>(4, 4, 2, 1.05, true, 2.0);
    router.scorer().weight().setIdentity();
    router.forward(x, tokens);
    const auto* noise = router.scorer().logit_noise();
    REQUIRE(noise != nullptr);
    REQUIRE(noise->stddev.size() == 1);
    CHECK(noise->stddev(0, 0) == 0.5);
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < E; ++e) CHECK(router.logits()(t, e) == Approx(x(t, e) + 0.5 * n(t, e)).epsilon(1e-15));
    int params = 0;
    router.for_each_parameter([&](std::string_view name, auto, auto) { params += name == "router.weight"; });
    CHECK(params == 1);  // W_noise is a parameter only when learned
  }
  SECTION("evaluation: clean logits, no noise shown to the losses") {
    auto router = moe::make_noisy_topk_router<double>(4, 4, 2);
    router.scorer().weight().setIdentity();
    router.set_training(false);
    router.forward(x, tokens);
    REQUIRE(router.scorer().logit_noise() == nullptr);
    REQUIRE(router.logits() == x);
  }
}

TEST_CASE("noisy linear scorer: generated draws are keyed by (seed, step, token, expert)", "[noisy][scorer][rng]") {
  const Index T = 40, D = 6, E = 5;
  const Matrix<double> x = random_matrix<double>(T, D, 1);
  auto make = [&] {
    auto r = moe::make_vmoe_router<double>(D, E, 2, 1.05, true, 1.0, 17);
    return r;
  };
  auto a = make(), b = make();
  a.forward(x);
  const Matrix<double> step0 = a.logits();
  const Matrix<double> clean = x * a.scorer().weight().transpose();
  const moe::CounterRng rng(17, 0, moe::DrawStream::normal);
  for (Index t = 0; t < T; ++t)
    for (Index e = 0; e < E; ++e) REQUIRE(step0(t, e) == Approx(clean(t, e) + rng.normal(t, e) / double(E)).margin(1e-13));
  a.forward(x);
  REQUIRE(a.logits() != step0);  // step 1 draws afresh
  b.forward(x);
  REQUIRE(b.logits() == step0);  // same seed and step: the same bits
  a.set_step(0);
  a.forward(x);
  REQUIRE(a.logits() == step0);  // a step replayed
  auto c = moe::make_vmoe_router<double>(D, E, 2, 1.05, true, 1.0, 18);
  c.scorer().weight() = a.scorer().weight();
  c.forward(x);
  REQUIRE(c.logits() != step0);  // another seed
  a.set_training(false);
  a.forward(x);
  REQUIRE(a.logits() == clean);
}

// ---- the losses -------------------------------------------------------------------------------

TEST_CASE("CV² conventions: values and gradients", "[noisy][loss]") {
  const Vec x = {1, 2, 3, 6};  // mean 3, squares 14
  using moe::CVSquared;
  const auto cv = [](CVSquared form, const Vec& v) { return moe::detail::cv_squared<double>(form, v); };
  CHECK(cv(CVSquared::tensor2tensor, x) == Approx(3.5 / 9).epsilon(1e-9));
  CHECK(cv(CVSquared::tensor2tensor, x) == Approx(cv2_t2t(x)).epsilon(1e-14));
  CHECK(cv(CVSquared::pytorch_port, x) == Approx(14.0 / 3 / 9).epsilon(1e-9));
  CHECK(cv(CVSquared::pytorch_port, x) == Approx(cv2_port(x)).epsilon(1e-14));
  CHECK(cv(CVSquared::vmoe, x) == Approx(3.5 / 9).epsilon(1e-14));
  CHECK(cv(CVSquared::pytorch_port, Vec{4}) == 0);  // one expert: the port returns 0
  CHECK(cv(CVSquared::vmoe, Vec{0, 0}) == 0);        // nothing routed
  for (const auto form : {CVSquared::tensor2tensor, CVSquared::pytorch_port, CVSquared::vmoe}) {
    Vec grad(x.size());
    moe::detail::cv_squared<double>(form, x, grad);
    Matrix<double> p(1, 4);
    for (Index i = 0; i < 4; ++i) p(0, i) = x[std::size_t(i)];
    const auto f = [&] { return cv(form, Vec(p.data(), p.data() + 4)); };
    const Matrix<double> numeric = numeric_gradient(p, f);
    for (Index i = 0; i < 4; ++i) CHECK(grad[std::size_t(i)] == Approx(numeric(0, i)).margin(1e-8));
  }
}

TEST_CASE("NoisyTopKRouter on a hand-checkable batch: routing, importance and load", "[noisy][preset]") {
  const Matrix<double>& x = hand_x();
  const Index T = 3, E = 4;
  const int k = 2;
  const Matrix<double> n = random_matrix<double>(T, E, 6);
  const moe::TokenInputs<double> tokens{.normal = {n.data(), std::size_t(T * E)}};
  for (const auto form : {moe::CVSquared::tensor2tensor, moe::CVSquared::pytorch_port}) {
    auto router = moe::make_noisy_topk_router<double>(4, 4, k, form);
    router.scorer().weight().setIdentity();  // clean logits = x; W_noise = 0: stddev = log 2 + 1e-2
    const auto& r = router.forward(x, tokens);
    const double sd = std::log(2.0) + 1e-2;
    Vec importance(E, 0.0), load(E, 0.0);
    for (Index t = 0; t < T; ++t) {
      Vec noisy(E);
      for (Index e = 0; e < E; ++e) noisy[e] = x(t, e) + sd * n(t, e);
      const auto order = ranking(noisy);
      const Vec kept = softmax({noisy[order[0]], noisy[order[1]]});  // softmax over the k kept
      REQUIRE(r.capacity == -1);  // dropless
      for (int i = 0; i < k; ++i) {
        const Index c = r.token_offsets[t] + i;
        REQUIRE(r.choice_expert[c] == order[i]);
        REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(kept[i]).epsilon(1e-14));
        importance[order[i]] += kept[i];
      }
      const Vec p = shazeer_p(row(x, t), noisy, Vec(E, sd), k);
      for (Index e = 0; e < E; ++e) load[e] += p[e];
    }
    const auto cv = form == moe::CVSquared::tensor2tensor ? cv2_t2t : cv2_port;
    CHECK(router.loss_values()[0] == Approx(cv(importance)).epsilon(1e-12));
    CHECK(router.loss_values()[1] == Approx(cv(load)).epsilon(1e-12));
    CHECK(router.aux_loss() == Approx(1e-2 * (cv(importance) + cv(load))).epsilon(1e-12));

    // evaluation: no noise; the load is the count of tokens per expert (tensor2tensor, port)
    router.set_training(false);
    router.forward(x, tokens);
    Vec counts(E, 0.0), clean_importance(E, 0.0);
    for (Index t = 0; t < T; ++t) {
      const auto order = ranking(row(x, t));
      const Vec kept = softmax({x(t, order[0]), x(t, order[1])});
      for (int i = 0; i < k; ++i) counts[order[i]] += 1, clean_importance[order[i]] += kept[i];
    }
    CHECK(router.loss_values()[0] == Approx(cv(clean_importance)).epsilon(1e-12));
    CHECK(router.loss_values()[1] == Approx(cv(counts)).epsilon(1e-12));
  }
}

TEST_CASE("VMoERouter on a hand-checkable batch: BPR capacity, raw weights, importance and load", "[noisy][preset]") {
  const Index T = 8, E = 4;
  const int k = 2;
  Matrix<double> x(T, E);  // every token prefers expert 0; capacity ceil(2 * 0.5 * 8 / 4) = 2 -> 4
  x << 3.0, 1.0, 0.0, 0.5,  //
      2.0, 0.2, 1.0, 0.0,   //
      4.0, 0.0, 0.3, 1.0,   //
      2.5, 1.5, 0.0, 0.0,   //
      3.5, 0.0, 0.9, 0.1,   //
      1.8, 0.2, 0.0, 1.1,   //
      2.2, 0.0, 1.4, 0.3,   //
      3.1, 0.6, 0.0, 0.2;
  const Matrix<double> n = random_matrix<double>(T, E, 8);
  const moe::TokenInputs<double> tokens{.normal = {n.data(), std::size_t(T * E)}};
  for (const bool bpr : {true, false}) {
    auto router = moe::make_vmoe_router<double>(E, E, k, 0.5, bpr);
    router.scorer().weight().setIdentity();
    const auto& r = router.forward(x, tokens);
    REQUIRE(r.capacity == 4);  // vmoe rounds C up to a multiple of 4
    const double sd = 1.0 / double(E);
    Matrix<double> noisy = x + sd * n, scores(T, E);
    for (Index t = 0; t < T; ++t) {
      const Vec p = softmax(row(noisy, t));
      for (Index e = 0; e < E; ++e) scores(t, e) = p[e];
    }
    require_routing(router, vmoe_route(scores, k, 4, bpr));
    Vec importance(E, 0.0), load(E, 0.0);
    for (Index t = 0; t < T; ++t) {
      const Vec clean = softmax(row(x, t));  // importance from the clean softmax
      const Vec p = vmoe_p(row(x, t), row(noisy, t), sd, k);
      for (Index e = 0; e < E; ++e) importance[e] += clean[e], load[e] += p[e] / double(T);
    }
    CHECK(router.loss_values()[0] == Approx(cv2_vmoe(importance)).epsilon(1e-12));
    CHECK(router.loss_values()[1] == Approx(cv2_vmoe(load)).epsilon(1e-12));
    CHECK(router.aux_loss() == Approx(0.005 * (cv2_vmoe(importance) + cv2_vmoe(load))).epsilon(1e-12));
  }
  // batch priority: expert 0 keeps the four tokens with the largest top scores, not the first four
  auto router = moe::make_vmoe_router<double>(E, E, k, 0.5);
  router.scorer().weight().setIdentity();
  router.set_training(false);  // evaluation: clean logits, and V-MoE has no load loss then
  const auto& r = router.forward(x);
  std::vector<int> kept_first;
  for (Index t = 0; t < T; ++t)
    if (r.choice_slot[r.token_offsets[t]] >= 0) kept_first.push_back(int(t));
  CHECK(kept_first == std::vector<int>{0, 2, 4, 7});
  CHECK(router.loss_values()[1] == 0);
}

TEST_CASE("BPRRouter: vmoe without noise, importance only", "[noisy][preset]") {
  const Index T = 8, E = 4;
  Matrix<double> logits = random_matrix<double>(T, E, 3, 2.0);
  auto router = moe::make_bpr_router<double>(6, E, 2, 0.5);
  STATIC_REQUIRE(decltype(router)::num_losses == 1);
  router.route(logits);
  Matrix<double> scores(T, E);
  Vec importance(E, 0.0);
  for (Index t = 0; t < T; ++t) {
    const Vec p = softmax(row(logits, t));
    for (Index e = 0; e < E; ++e) scores(t, e) = p[e], importance[e] += p[e];
  }
  REQUIRE(router.routing().capacity == 4);
  require_routing(router, vmoe_route(scores, 2, 4, true));
  CHECK(router.loss_values()[0] == Approx(cv2_vmoe(importance)).epsilon(1e-12));
  CHECK(router.aux_loss() == Approx(0.005 * cv2_vmoe(importance)).epsilon(1e-12));
}

// ---- gradients --------------------------------------------------------------------------------

namespace {
// R_scale = 0 checks the auxiliary losses alone.
template <class Router>
void check_noisy_gradient(Router router, Index T, std::uint64_t seed, bool given, bool masked, double R_scale = 1.0) {
  const Index D = router.input_dim(), E = router.num_experts();
  Matrix<double> x = random_matrix<double>(T, D, seed);
  const Matrix<double> R = R_scale * random_matrix<double>(T, E, seed + 1);
  const Matrix<double> n = random_matrix<double>(T, E, seed + 2);
  std::vector<std::uint8_t> valid(T, 1);
  if (masked) valid[1] = valid[T - 2] = 0;
  moe::TokenInputs<double> tokens{};
  if (masked) tokens.valid = valid;
  if (given) tokens.normal = {n.data(), std::size_t(T * E)};
  router.scorer().weight() = random_matrix<double>(E, D, seed + 3, 1.5);
  const bool learned = router.scorer().options().scale == moe::NoiseScale::learned;
  if (learned) router.scorer().noise_weight() = random_matrix<double>(E, D, seed + 4, 0.7);
  slot_objective(router, x, R, tokens, 7);
  REQUIRE(router.scorer().logit_noise() != nullptr);
  const Matrix<double> dx = slot_backward(router, x, R, tokens);
  Matrix<double> dweight, dnoise;
  router.for_each_parameter([&](std::string_view name, auto, auto grad) {
    if (name == "router.weight") dweight = grad;
    if (name == "router.noise_weight") dnoise = grad;
  });
  REQUIRE(dnoise.size() == (learned ? E * D : 0));
  const auto f = [&] { return slot_objective(router, x, R, tokens, 7); };
  require_gradient_close(dx, numeric_gradient(x, f));
  require_gradient_close(dweight, numeric_gradient(router.scorer().weight(), f));
  if (learned) require_gradient_close(dnoise, numeric_gradient(router.scorer().noise_weight(), f));
  if (masked) REQUIRE(dx.row(1).isZero(0));
}

template <class S = double>
auto aux_router(Index D, Index E, Index k, moe::NoiseScale scale, moe::LoadThreshold threshold, moe::CVSquared cv,
                moe::ImportanceSource source) {
  return moe::Router(moe::NoisyLinearScorer<S>(D, E, {.scale = scale, .noise_std = 3.0}), moe::SoftmaxGate<S>{},
                     moe::TopKSelector<S>(k, {.weighting = moe::Weighting::softmax_of_kept_logits}),
                     moe::ImportanceLoss<S>(S(1), {.source = source, .cv = cv}),
                     moe::NoisyLoadLoss<S>(k, S(1), {.threshold = threshold, .cv = cv}));
}
}  // namespace

TEST_CASE("noisy router gradients to W_g, W_noise and x match finite differences", "[noisy][gradient]") {
  using moe::CVSquared;
  SECTION("NoisyTopKRouter, the caller's draws and the generator's") {
    check_noisy_gradient(moe::make_noisy_topk_router<double>(6, 5, 2), 16, 1, true, false);
    check_noisy_gradient(moe::make_noisy_topk_router<double>(6, 5, 2, CVSquared::pytorch_port, 3), 16, 2, false, false);
    check_noisy_gradient(moe::make_noisy_topk_router<double>(6, 5, 3), 16, 3, true, true);
  }
  SECTION("VMoERouter with capacity and batch priority") {
    check_noisy_gradient(moe::make_vmoe_router<double>(6, 4, 2, 0.6, true, 4.0), 16, 4, true, false);
    check_noisy_gradient(moe::make_vmoe_router<double>(6, 4, 2, 0.6, false, 4.0, 2), 16, 5, false, true);
  }
  SECTION("the auxiliary losses alone, coefficient 1: through the normal CDF and the thresholds") {
    for (const auto cv : {CVSquared::tensor2tensor, CVSquared::pytorch_port, CVSquared::vmoe}) {
      check_noisy_gradient(aux_router(6, 5, 2, moe::NoiseScale::learned, moe::LoadThreshold::shazeer, cv,
                                      moe::ImportanceSource::kept_softmax),
                           14, 11, true, true, 0.0);
      check_noisy_gradient(aux_router(6, 5, 2, moe::NoiseScale::fixed, moe::LoadThreshold::vmoe, cv,
                                      moe::ImportanceSource::clean_softmax),
                           14, 12, true, false, 0.0);
      check_noisy_gradient(aux_router(6, 5, 3, moe::NoiseScale::learned, moe::LoadThreshold::vmoe, cv,
                                      moe::ImportanceSource::clean_softmax),
                           14, 13, false, false, 0.0);
    }
  }
}

TEST_CASE("noisy router: the layer replays the forward's draws in backward", "[noisy][layer]") {
  const Index T = 20, D = 6, E = 4, H = 5;
  moe::MoELayer layer(moe::make_noisy_topk_router<double>(D, E, 2), moe::FFNExperts<double>(E, D, H));
  layer.router().scorer().weight() = random_matrix<double>(E, D, 3);
  const Matrix<double> x = random_matrix<double>(T, D, 1), dy = random_matrix<double>(T, D, 2);
  Matrix<double> y(T, D), dx(T, D);
  layer.forward(x, y);
  moe::zero_grad(layer);
  layer.backward(dy, dx);
  bool noise_grad = false;
  layer.for_each_parameter([&](std::string_view name, auto, auto grad) {
    if (name == "router.noise_weight") noise_grad = !grad.isZero(0);
  });
  CHECK(noise_grad);
  CHECK(dx.allFinite());
}

// ---- errors -----------------------------------------------------------------------------------

TEST_CASE("noisy gating: bad options and draws throw named errors", "[noisy][errors]") {
  require_error([] { moe::NoisyLinearScorer<float>(4, 3, {.noise_std = -1}); },
                {"NoisyLinearScorer", "'noise_std'", "= -1", "noise_std >= 0"});
  require_error([] { moe::NoisyLinearScorer<float>(4, 3, {.noise_epsilon = -0.5}); }, {"'noise_epsilon'", "= -0.5"});
  require_error([] { moe::make_vmoe_router<float>(4, 4, 2, 1.05, true, -2.0); }, {"'noise_std'", "= -2"});
  require_error([] { moe::make_noisy_topk_router<float>(4, 4, 4); },
                {"NoisyLoadLoss", "'k'", "= 4", "k < number of experts (4)"});
  require_error([] { moe::NoisyLoadLoss<float>(0); }, {"NoisyLoadLoss", "'k'", "= 0", "k >= 1"});
  require_error([] { moe::ImportanceLoss<float>(-1); }, {"ImportanceLoss", "'coefficient'", "= -1"});
  // V-MoE's threshold is the k-th value: k = E is allowed
  REQUIRE_NOTHROW(moe::make_vmoe_router<float>(4, 4, 4));
  auto router = moe::make_noisy_topk_router<float>(4, 2, 1);
  const Matrix<float> x = random_matrix<float>(4, 4, 1);
  const std::vector<float> seven(7, 0.0f);
  require_error([&] { router.forward(x, {.normal = seven}); },
                {"Router::forward", "'tokens.normal'", "= 7", "length 0 (absent) or 8"});
  REQUIRE_THROWS_AS(router.forward(x, {.normal = seven}), moe::shape_error);
}
