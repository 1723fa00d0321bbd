// The learned routers that change what the router is (docs/scorers.md): Yuan 2.0-M32's attention
// router (AttentionScorer, AttentionRouter), GLIDER, task-level MoE (TaskScorer,
// StraightThroughGate, TaskRouter), HyperRouter and Omni-router, checked against oracles written
// from the math in docs/routers.md, finite-difference gradients in double, and the bad-input
// contract.
#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <numbers>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe_test;

namespace {

// logits of the attention router: qkv = x W^T + b; for each head of c tokens,
// S = Q^T K / sqrt(c) [E, E], A = row softmax of S, logits = V A^T.
Matrix<double> attention_oracle(const Matrix<double>& x, const Matrix<double>& w, const Matrix<double>& b, Index E, Index c) {
  Matrix<double> qkv = x * w.transpose();
  for (Index t = 0; t < x.rows(); ++t) qkv.row(t) += b.row(0);
  Matrix<double> logits(x.rows(), E);
  for (Index h = 0; h < x.rows() / c; ++h) {
    Matrix<double> s(E, E);
    for (Index i = 0; i < E; ++i)
      for (Index j = 0; j < E; ++j) {
        double sum = 0;
        for (Index t = h * c; t < (h + 1) * c; ++t) sum += qkv(t, i) * qkv(t, E + j);
        s(i, j) = sum / std::sqrt(double(c));
      }
    const Matrix<double> a = softmax_of(s);
    for (Index t = h * c; t < (h + 1) * c; ++t)
      for (Index i = 0; i < E; ++i) {
        double sum = 0;
        for (Index j = 0; j < E; ++j) sum += a(i, j) * qkv(t, 2 * E + j);
        logits(t, i) = sum;
      }
  }
  return logits;
}

}  // namespace

TEST_CASE("attention router: logits and routing match the oracle, per token and by heads", "[attention]") {
  const Index T = 12, D = 6, E = 5;
  const Matrix<double> x = random_matrix<double>(T, D, 3, 2.0);
  for (const Index chunk : {Index(1), Index(3)})
    for (const bool bias : {false, true}) {
      INFO("chunk " << chunk << ", bias " << bias);
      auto router = moe::AttentionRouter<double>(moe::AttentionScorer<double>(D, E, {.chunk = chunk, .bias = bias, .seed = 4}),
                                                 moe::SoftmaxGate<double>{},
                                                 moe::TopKSelector<double>(2, {.weighting = moe::Weighting::renormalize_before_drop}));
      if (bias) router.scorer().bias() = random_matrix<double>(1, 3 * E, 5);
      const auto& r = router.forward(x);
      const Matrix<double> logits = attention_oracle(x, router.scorer().weight(), router.scorer().bias(), E, chunk);
      require_close(router.logits(), logits, forward_tol<double>(D * E) * (1 + logits.cwiseAbs().maxCoeff()));
      // softmax, top 2 (ties to the lower expert), the two probabilities renormalised
      const Matrix<double> p = softmax_of(logits);
      for (Index t = 0; t < T; ++t) {
        std::vector<Index> order(E);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p(t, a) > p(t, b); });
        const double sum = p(t, order[0]) + p(t, order[1]);
        REQUIRE(r.token_offsets[t + 1] - r.token_offsets[t] == 2);
        for (Index j = 0; j < 2; ++j) {
          const Index c = r.token_offsets[t] + j;
          REQUIRE(r.choice_expert[c] == order[std::size_t(j)]);
          REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(p(t, order[std::size_t(j)]) / sum).epsilon(1e-12));
        }
      }
    }
  // the preset: Yuan 2.0-M32's 32 experts, top 2, one token a head, no bias
  auto preset = moe::make_attention_router<double>(D);
  REQUIRE(preset.num_experts() == 32);
  REQUIRE(preset.scorer().chunk() == 1);
  REQUIRE(preset.scorer().weight().rows() == 96);
  int parameters = 0;
  preset.for_each_parameter([&](std::string_view, auto, auto) { ++parameters; });
  REQUIRE(parameters == 1);
}

TEST_CASE("attention router: logits of a large q k^T stay finite", "[attention]") {
  const Index T = 4, D = 3, E = 8;
  auto router = moe::make_attention_router<float>(D, E);
  router.scorer().weight() *= 1e3f;  // q_i k_j of order 1e6
  const Matrix<float> x = random_matrix<float>(T, D, 7);
  router.forward(x);
  REQUIRE(router.logits().allFinite());
  // each logit is a convex mix of v: within [min v, max v]
  const Matrix<float> v = x * router.scorer().weight().bottomRows(E).transpose();
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < E; ++i) {
      REQUIRE(router.logits()(t, i) <= v.row(t).maxCoeff() * (1 + 1e-5f) + 1e-3f);
      REQUIRE(router.logits()(t, i) >= v.row(t).minCoeff() * (1 + 1e-5f) - 1e-3f);
    }
}

TEST_CASE("attention router layer: gradients by finite differences in double", "[attention][gradient]") {
  const Index T = 6, D = 4, E = 4, H = 5;
  const Matrix<double> R = random_matrix<double>(T, D, 11);
  for (const Index chunk : {Index(1), Index(2)}) {
    INFO("chunk " << chunk);
    Matrix<double> x = random_matrix<double>(T, D, 13);
    moe::MoELayer layer(moe::AttentionRouter<double>(moe::AttentionScorer<double>(D, E, {.chunk = chunk, .bias = true, .seed = 6}),
                                                     moe::SoftmaxGate<double>{},
                                                     moe::TopKSelector<double>(2, {.weighting = moe::Weighting::renormalize_before_drop})),
                        moe::FFNExperts<double>(E, D, H));
    layer.router().scorer().bias() = random_matrix<double>(1, 3 * E, 14, 0.5);
    REQUIRE(check_layer_gradients(layer, x, R).count("router.bias") == 1);
  }
}

TEST_CASE("attention router: bad configuration and input get named errors, nothing written", "[attention][errors]") {
  REQUIRE_THROWS_AS(moe::AttentionScorer<float>(4, 8, {.chunk = 0}), moe::config_error);
  REQUIRE_THROWS_AS(moe::AttentionScorer<float>(4, 0), moe::config_error);
  REQUIRE_THROWS_AS(moe::AttentionScorer<float>(0, 8), moe::config_error);
  REQUIRE_THROWS_AS(moe::make_attention_router<float>(4, 8, 9), moe::config_error);  // k > E
  moe::MoELayer layer(moe::make_attention_router<float>(4, 8, 2, 4), moe::FFNExperts<float>(8, 4, 6));
  const Matrix<float> x = random_matrix<float>(8, 4, 17);
  Matrix<float> y(8, 4);
  layer.forward(x, y);
  const Matrix<float> y_before = y;
  const auto slots = layer.routing().slot_token;
  Matrix<float> y6(6, 4);
  try {
    layer.forward(x.topRows(6), y6);  // 6 tokens in heads of 4
    FAIL("no error");
  } catch (const moe::shape_error& e) {
    REQUIRE(std::string(e.what()).find("x.rows") != std::string::npos);
  }
  REQUIRE(layer.routing().slot_token == slots);
  layer.forward(x, y);
  REQUIRE(y == y_before);  // the state after the rejected batch is the last good one
}

namespace {

// GLIDER's logits: V LN(x_t) / sqrt(D) + alpha cos(u_j, q_seg(t)); LN without affine, eps 1e-5.
Matrix<double> glider_oracle(const Matrix<double>& x, const Matrix<double>& v, const Matrix<double>& u, const Matrix<double>& q,
                             const std::vector<std::int32_t>& segment, double alpha) {
  const Index T = x.rows(), D = x.cols(), E = v.rows();
  Matrix<double> logits(T, E);
  for (Index t = 0; t < T; ++t) {
    const double mean = x.row(t).mean();
    double var = 0;
    for (Index j = 0; j < D; ++j) var += (x(t, j) - mean) * (x(t, j) - mean);
    var /= double(D);
    Matrix<double> n(1, D);
    for (Index j = 0; j < D; ++j) n(0, j) = (x(t, j) - mean) / std::sqrt(var + 1e-5);
    const Index s = segment.empty() ? 0 : segment[std::size_t(t)];
    for (Index e = 0; e < E; ++e) {
      const double cosine = q.row(s).dot(u.row(e)) / (q.row(s).norm() * u.row(e).norm());
      logits(t, e) = n.row(0).dot(v.row(e)) / std::sqrt(double(D)) + alpha * cosine;
    }
  }
  return logits;
}

}  // namespace

TEST_CASE("GLIDER: local LayerNorm router plus alpha times the instruction cosine, per segment", "[glider]") {
  const Index T = 9, D = 6, E = 5, Dq = 4;
  const Matrix<double> x = random_matrix<double>(T, D, 41, 3.0), u = random_matrix<double>(E, Dq, 42),
                       q = random_matrix<double>(3, Dq, 43);
  const std::vector<std::int32_t> segment{2, 2, 0, 0, 0, 1, 1, 1, 1};  // ids name instruction rows, any order
  for (const double alpha : {0.0, 3.0, 100.0}) {
    INFO("alpha " << alpha);
    auto router = moe::make_glider_router<double>(D, E, 2, alpha, 7);
    router.scorer().set_expert_embeddings(u);
    router.scorer().set_instructions(q);
    const auto& r = router.forward(x, {.segment = segment});
    const Matrix<double> logits = glider_oracle(x, router.scorer().weight(), u, q, segment, alpha);
    require_close(router.logits(), logits, forward_tol<double>(D) * (1 + std::abs(alpha)));
    // softmax, top 2, p / (p1 + p2 + 1e-6)
    const Matrix<double> p = softmax_of(logits);
    for (Index t = 0; t < T; ++t) {
      std::vector<Index> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return p(t, a) > p(t, b); });
      const double sum = p(t, order[0]) + p(t, order[1]) + 1e-6;
      for (Index j = 0; j < 2; ++j) {
        const Index c = r.token_offsets[t] + j;
        REQUIRE(r.choice_expert[c] == order[std::size_t(j)]);
        REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(p(t, order[std::size_t(j)]) / sum).epsilon(1e-12));
      }
      REQUIRE(r.slot_weight[r.choice_slot[r.token_offsets[t]]] + r.slot_weight[r.choice_slot[r.token_offsets[t] + 1]] < 1.0);
    }
  }
  // alpha = 0 is the local router: the same logits as without instructions at all
  auto local = moe::make_glider_router<double>(D, E, 2, 0.0, 7), none = moe::make_glider_router<double>(D, E, 2, 100.0, 7);
  local.scorer().set_expert_embeddings(u);
  local.scorer().set_instructions(q);
  local.forward(x, {.segment = segment});
  none.forward(x, {.segment = segment});
  REQUIRE(Matrix<double>(local.logits()) == Matrix<double>(none.logits()));
  // a large alpha routes every token of a segment first to the expert whose instruction it shares
  auto global = moe::make_glider_router<double>(D, E, 2, 1000.0, 7);
  global.scorer().set_expert_embeddings(u);
  Matrix<double> same(2, Dq);
  same.row(0) = u.row(3);
  same.row(1) = u.row(1);
  global.scorer().set_instructions(same);
  const std::vector<std::int32_t> two{0, 0, 0, 0, 1, 1, 1, 1, 1};
  const auto& g = global.forward(x, {.segment = two});
  for (Index t = 0; t < T; ++t) REQUIRE(g.choice_expert[g.token_offsets[t]] == (t < 4 ? 3 : 1));
}

TEST_CASE("GLIDER layer: gradients by finite differences in double", "[glider][gradient]") {
  const Index T = 6, D = 5, E = 4, H = 5, Dq = 3;
  const std::vector<std::int32_t> segment{0, 0, 0, 1, 1, 1};
  Matrix<double> x = random_matrix<double>(T, D, 51);
  const Matrix<double> R = random_matrix<double>(T, D, 52);
  moe::MoELayer layer(moe::make_glider_router<double>(D, E, 2, 0.7, 8), moe::FFNExperts<double>(E, D, H));
  layer.router().scorer().set_expert_embeddings(random_matrix<double>(E, Dq, 53));
  layer.router().scorer().set_instructions(random_matrix<double>(2, Dq, 54));
  REQUIRE(check_layer_gradients(layer, x, R, {.segment = segment}).size() == 3);  // V, experts' w1 and w2
}

TEST_CASE("GLIDER: bad embeddings and segment ids get named errors, nothing written", "[glider][errors]") {
  const Index T = 4, D = 4, E = 3;
  auto router = moe::make_glider_router<float>(D, E);
  REQUIRE_THROWS_AS(router.scorer().set_instructions(random_matrix<float>(2, 5, 1)), moe::config_error);  // no u yet
  REQUIRE_THROWS_AS(router.scorer().set_expert_embeddings(random_matrix<float>(E + 1, 5, 2)), moe::shape_error);
  router.scorer().set_expert_embeddings(random_matrix<float>(E, 5, 3));
  REQUIRE_THROWS_AS(router.scorer().set_instructions(random_matrix<float>(2, 6, 4)), moe::shape_error);  // width
  router.scorer().set_instructions(random_matrix<float>(2, 5, 5));
  REQUIRE_THROWS_AS(moe::GliderScorer<float>(D, E, {.alpha = NAN}), moe::config_error);
  REQUIRE_THROWS_AS(moe::TopKSelector<float>(2, {.renormalize_epsilon = -1e-6}), moe::config_error);
  const Matrix<float> x = random_matrix<float>(T, D, 6);
  router.forward(x, {.segment = std::vector<std::int32_t>{0, 0, 1, 1}});
  const auto slots = router.routing().slot_token;
  const Matrix<float> logits = router.logits();
  try {
    router.forward(x, {.segment = std::vector<std::int32_t>{0, 0, 2, 2}});  // no instruction row 2
    FAIL("no error");
  } catch (const moe::value_error& e) {
    REQUIRE(std::string(e.what()).find("tokens.segment") != std::string::npos);
  }
  REQUIRE(router.routing().slot_token == slots);
  REQUIRE(Matrix<float>(router.logits()) == logits);
}

TEST_CASE("HyperRouter: the router generated by the frozen hypernetwork, top k, softmax over the k", "[hyper]") {
  const Index T = 7, D = 5, E = 6, H = 4;
  const Matrix<double> x = random_matrix<double>(T, D, 61);
  auto router = moe::make_hyper_router<double>(D, E, 3, H, 2);
  auto p = parameters(router);
  REQUIRE(p.size() == 5);
  p.at("router.hypernet.b1") = random_matrix<double>(1, H, 62, 0.1);  // non-zero biases, so the oracle sees them
  p.at("router.hypernet.b2") = random_matrix<double>(1, E * (D + 1), 63, 0.1);
  const auto& r = router.forward(x);
  // theta = W2 relu(W1 e + b1) + b2, rows of [E, D + 1] = [w_j, b_j]
  Matrix<double> z = p.at("router.embedding") * p.at("router.hypernet.w1").transpose() + p.at("router.hypernet.b1");
  z = z.cwiseMax(0.0);
  const Matrix<double> theta = z * p.at("router.hypernet.w2").transpose() + p.at("router.hypernet.b2");
  Matrix<double> logits(T, E);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < E; ++j) logits(t, j) = x.row(t).dot(theta.block(0, j * (D + 1), 1, D).row(0)) + theta(0, j * (D + 1) + D);
  require_close(router.logits(), logits, forward_tol<double>(D * H) * (1 + logits.cwiseAbs().maxCoeff()));
  for (Index t = 0; t < T; ++t) {
    std::vector<Index> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return logits(t, a) > logits(t, b); });
    double z3 = 0;
    for (Index j = 0; j < 3; ++j) z3 += std::exp(logits(t, order[std::size_t(j)]));
    for (Index j = 0; j < 3; ++j) {
      const Index c = r.token_offsets[t] + j;
      REQUIRE(r.choice_expert[c] == order[std::size_t(j)]);
      REQUIRE(r.slot_weight[r.choice_slot[c]] == Approx(std::exp(logits(t, order[std::size_t(j)])) / z3).epsilon(1e-12));
    }
  }
  // the reference's initialisation: e ~ N(0, 1), the hypernetwork's weights ~ N(0, 0.02), biases 0
  auto fresh = moe::make_hyper_router<double>(64, 8, 2, 256, 3);
  auto q = parameters(fresh);
  const auto stddev = [](const Matrix<double>& m) { return std::sqrt(m.array().square().mean()); };
  REQUIRE(stddev(q.at("router.embedding")) == Approx(1.0).epsilon(0.3));
  REQUIRE(stddev(q.at("router.hypernet.w1")) == Approx(0.02).epsilon(0.05));
  REQUIRE(stddev(q.at("router.hypernet.w2")) == Approx(0.02).epsilon(0.05));
  REQUIRE(q.at("router.hypernet.b2").isZero(0));
}

TEST_CASE("HyperRouter and SMoE-Dropout: gradients reach only what learns; training leaves the frozen parts", "[hyper][gradient]") {
  const Index T = 6, D = 4, E = 4, H = 3;
  const Matrix<double> R = random_matrix<double>(T, D, 71);
  {
    Matrix<double> x = random_matrix<double>(T, D, 72);
    moe::MoELayer layer(moe::make_hyper_router<double>(D, E, 2, H, 4), moe::FFNExperts<double>(E, D, 5));
    const auto grads = check_layer_gradients(layer, x, R, {},
                                             {"router.hypernet.w1", "router.hypernet.b1", "router.hypernet.w2", "router.hypernet.b2"});
    REQUIRE(grads.at("router.embedding").cwiseAbs().maxCoeff() > 0);
  }
  const auto train = [&](auto layer, const std::vector<std::string>& frozen, const std::string& learns) {
    std::map<std::string, Matrix<double>> before;
    for (auto& [name, value] : parameters(layer)) before.emplace(name, value);
    moe::Adam<double> adam(1e-2);
    Matrix<double> x = random_matrix<double>(T, D, 73), y(T, D), dx(T, D);
    for (int step = 0; step < 3; ++step) {
      layer.forward(x, y);
      moe::zero_grad(layer);
      layer.backward(R, dx);
      adam.step(layer);
    }
    auto after = parameters(layer);
    for (const auto& name : frozen) {
      INFO(name);
      REQUIRE(Matrix<double>(after.at(name)) == before.at(name));
    }
    REQUIRE(Matrix<double>(after.at(learns)) != before.at(learns));
  };
  train(moe::MoELayer(moe::make_hyper_router<double>(D, E, 2, H, 5), moe::FFNExperts<double>(E, D, 5)),
        {"router.hypernet.w1", "router.hypernet.b1", "router.hypernet.w2", "router.hypernet.b2"}, "router.embedding");
  train(moe::MoELayer(moe::make_smoe_dropout_router<double>(D, E, 2, 6), moe::FFNExperts<double>(E, D, 5)),
        {"router.weight", "router.bias"}, "experts.w1");
  // the frozen router still passes dx, and keeps a zero gradient
  Matrix<double> x = random_matrix<double>(T, D, 74);
  moe::MoELayer dropout(moe::make_smoe_dropout_router<double>(D, E, 2, 7), moe::FFNExperts<double>(E, D, 5));
  check_layer_gradients(dropout, x, R, {}, {"router.weight", "router.bias"});
}

TEST_CASE("scheduled_k: the references' schedules of k, and TopKSelector::set_k", "[hyper]") {
  using moe::KSchedule;
  // linear_increase from 8 to 16 over 400k steps: round((16 - 8) step / 400k) + 8, half to even
  REQUIRE(moe::scheduled_k(KSchedule::linear_increase, 0, 400000, 8, 16) == 8);
  REQUIRE(moe::scheduled_k(KSchedule::linear_increase, 25000, 400000, 8, 16) == 8);   // 0.5 -> 0
  REQUIRE(moe::scheduled_k(KSchedule::linear_increase, 75000, 400000, 8, 16) == 10);  // 1.5 -> 2
  REQUIRE(moe::scheduled_k(KSchedule::linear_increase, 200000, 400000, 8, 16) == 12);
  REQUIRE(moe::scheduled_k(KSchedule::linear_increase, 900000, 400000, 8, 16) == 16);  // clipped
  REQUIRE(moe::scheduled_k(KSchedule::linear_decrease, 100000, 400000, 8, 16) == 14);
  // cosine: round(8 cos(pi step / 800k)) + 8, and its mirror
  REQUIRE(moe::scheduled_k(KSchedule::cosine_decrease, 0, 400000, 8, 16) == 16);
  REQUIRE(moe::scheduled_k(KSchedule::cosine_decrease, 200000, 400000, 8, 16) == 8 + Index(std::nearbyint(8 * std::cos(std::numbers::pi / 4))));
  REQUIRE(moe::scheduled_k(KSchedule::cosine_increase, 200000, 400000, 8, 16) == 16 - Index(std::nearbyint(8 * std::cos(std::numbers::pi / 4))));
  REQUIRE(moe::scheduled_k(KSchedule::cosine_increase, 400000, 400000, 8, 16) == 16);
  REQUIRE_THROWS_AS(moe::scheduled_k(KSchedule::linear_increase, 0, 0, 8, 16), moe::config_error);
  REQUIRE_THROWS_AS(moe::scheduled_k(KSchedule::linear_increase, 0, 10, 9, 8), moe::config_error);
  // set_k moves a runtime-k selector; k > E is caught at the next call
  auto router = moe::make_hyper_router<float>(4, 6, 2, 8);
  router.selector().set_k(4);
  const Matrix<float> x = random_matrix<float>(5, 4, 75);
  REQUIRE(router.forward(x).num_choices() == 20);
  REQUIRE_THROWS_AS(router.selector().set_k(0), moe::config_error);
  router.selector().set_k(7);
  REQUIRE_THROWS_AS(router.forward(x), moe::config_error);
  REQUIRE(router.routing().num_choices() == 20);  // the last good routing
}

TEST_CASE("Omni-router: one shared scorer, its gradient the sum of the layers' (against separate copies)", "[omni]") {
  const Index T = 10, D = 6, E = 4, H = 5, L = 3;
  for (const double jitter : {0.0, 0.05}) {  // jitter: backward needs each layer's own forward state
    INFO("jitter " << jitter);
    auto shared_routers = moe::make_omni_routers<double>(D, E, L, 2.0, 3);
    REQUIRE(shared_routers.front().scorer().owner());
    REQUIRE_FALSE(shared_routers.back().scorer().owner());
    REQUIRE(shared_routers.front().scorer().handles() == L);
    const Matrix<double> w0 = shared_routers.front().scorer().get().weight();
    shared_routers.front().scorer().get() = moe::LinearScorer<double>(D, E, {.jitter = jitter, .jitter_draws = {.seed = 9}});
    shared_routers.front().scorer().get().weight() = w0;
    std::vector<moe::MoELayer<moe::OmniRouter<double>, moe::FFNExperts<double>>> shared;
    std::vector<moe::MoELayer<moe::SwitchRouter<double>, moe::FFNExperts<double>>> separate;
    for (Index l = 0; l < L; ++l) {
      shared.emplace_back(std::move(shared_routers[std::size_t(l)]), moe::FFNExperts<double>(E, D, H, moe::Activation::gelu, 10 + l));
      auto own = moe::make_switch_router<double>(D, E, 2.0, 3);
      own.scorer() = moe::LinearScorer<double>(D, E, {.jitter = jitter, .jitter_draws = {.seed = 9}});
      own.scorer().weight() = w0;
      separate.emplace_back(std::move(own), moe::FFNExperts<double>(E, D, H, moe::Activation::gelu, 10 + l));
    }
    const Matrix<double> x = random_matrix<double>(T, D, 81), R = random_matrix<double>(T, D, 82);
    const auto run = [&](auto& stack) {
      std::vector<Matrix<double>> in{x};
      for (auto& layer : stack) {
        Matrix<double> y(T, D);
        layer.forward(in.back(), y);
        in.push_back(y);
      }
      Matrix<double> d = R, dx(T, D);
      for (auto& layer : stack) moe::zero_grad(layer);  // all first: the layers add to one shared gradient
      for (std::size_t l = stack.size(); l-- > 0;) {
        stack[l].backward(d, dx);
        d = dx;
      }
      return in.back();
    };
    const Matrix<double> y_shared = run(shared), y_separate = run(separate);
    REQUIRE(y_shared == y_separate);
    Matrix<double> sum = Matrix<double>::Zero(E, D), shared_grad;
    for (auto& layer : separate)
      layer.router().for_each_parameter([&](std::string_view, auto, auto grad) { sum += grad; });
    shared.front().router().for_each_parameter([&](std::string_view, auto, auto grad) { shared_grad = grad; });
    require_close(shared_grad, sum, 1e-12 * (1 + sum.cwiseAbs().maxCoeff()));
    REQUIRE(sum.cwiseAbs().maxCoeff() > 0);
    // only the owner shows the shared weight to an optimizer
    int visited = 0;
    for (auto& layer : shared) layer.router().for_each_parameter([&](std::string_view, auto, auto) { ++visited; });
    REQUIRE(visited == 1);
  }
}

TEST_CASE("routing_agreement: first kept expert and Jaccard of the kept sets, over tokens both routed", "[omni]") {
  const Index T = 12, D = 5, E = 4;
  const Matrix<double> x = random_matrix<double>(T, D, 91);
  auto a = moe::make_topk_router<double>(D, E, 2, 1), b = moe::make_topk_router<double>(D, E, 2, 2);
  const auto& ra = a.forward(x);
  const auto& rb = b.forward(x);
  moe::IndexMatrix ea, eb;
  Matrix<double> wa, wb;
  moe::to_topk_form(ra, ea, wa);
  moe::to_topk_form(rb, eb, wb);
  double top1 = 0, jaccard = 0;
  for (Index t = 0; t < T; ++t) {
    top1 += ea(t, 0) == eb(t, 0);
    const std::set<int> sa{ea(t, 0), ea(t, 1)}, sb{eb(t, 0), eb(t, 1)};
    int both = 0;
    for (const int e : sa) both += int(sb.count(e));
    jaccard += double(both) / double(sa.size() + sb.size() - std::size_t(both));
  }
  const auto agreement = moe::routing_agreement(ra, rb);
  REQUIRE(agreement.tokens == T);
  REQUIRE(agreement.top1 == Approx(top1 / T));
  REQUIRE(agreement.jaccard == Approx(jaccard / T));
  REQUIRE(moe::routing_agreement(ra, ra).jaccard == 1.0);
  const auto other = moe::make_topk_router<double>(D, E + 1, 2, 3);
  auto c = other;
  REQUIRE_THROWS_AS(moe::routing_agreement(ra, c.forward(x)), moe::shape_error);
  // a layer of another width cannot take a handle of the shared scorer
  auto routers = moe::make_omni_routers<float>(D, E, 2);
  REQUIRE_THROWS_AS(moe::MoELayer(std::move(routers[1]), moe::FFNExperts<float>(E, D + 1, 3)), moe::shape_error);
}

namespace {

// The task-level router's logits for one task embedding z [1, Dt]: W2 gelu(W1 z + b1) + b2, gelu
// the exact one, x/2 (1 + erf(x / sqrt 2)).
Matrix<double> task_mlp_oracle(const Matrix<double>& z, std::map<std::string, Eigen::Ref<Matrix<double>>>& p) {
  const Matrix<double>& w1 = p.at("router.w1");
  const Matrix<double>& w2 = p.at("router.w2");
  Matrix<double> h(1, w1.rows()), l(1, w2.rows());
  for (Index i = 0; i < w1.rows(); ++i) {
    const double a = w1.row(i).dot(z.row(0)) + p.at("router.b1")(0, i);
    h(0, i) = 0.5 * a * (1 + std::erf(a / std::sqrt(2.0)));
  }
  for (Index e = 0; e < w2.rows(); ++e) l(0, e) = w2.row(e).dot(h.row(0)) + p.at("router.b2")(0, e);
  return l;
}

// A token's choices as (expert, weight) pairs, in rank order.
std::vector<std::pair<Index, double>> choices_of(const moe::SparseRouting<double>& r, Index t) {
  std::vector<std::pair<Index, double>> out;
  for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
    out.emplace_back(r.choice_expert[c], r.choice_slot[c] >= 0 ? r.slot_weight[r.choice_slot[c]] : -1.0);
  return out;
}

// The first token of each run of equal ids.
Index segment_start(const std::vector<std::int32_t>& segment, Index t) {
  while (t > 0 && segment[std::size_t(t - 1)] == segment[std::size_t(t)]) --t;
  return t;
}

}  // namespace

TEST_CASE("task router: the segment's task through the MLP, one Gumbel draw per segment, hard softmax at tau", "[task]") {
  const Index T = 10, D = 4, E = 3, tasks = 4, Dt = 5, H = 6;
  const std::vector<std::int32_t> segment{0, 0, 0, 1, 1, 2, 2, 2, 2, 3};
  const std::vector<std::int32_t> task_of{2, 0, 3, 2};  // segments 0 and 3 share task 2
  const Matrix<double> x = random_matrix<double>(T, D, 101), g = random_matrix<double>(T, E, 102, 2.0);
  const std::vector<double> gumbel(g.data(), g.data() + g.size());
  const double tau = 0.7;
  for (const auto form : {moe::TaskForm::dense, moe::TaskForm::sparse})
    for (const auto hardness : {moe::Hardness::hard, moe::Hardness::soft}) {
      INFO("dense " << (form == moe::TaskForm::dense) << ", hard " << (hardness == moe::Hardness::hard));
      auto router = moe::make_task_router<double>(D, E, tasks, Dt, H, form, 5);
      router.gate() = moe::StraightThroughGate<double>({.temperature = tau, .hardness = hardness});
      router.scorer().set_segment_tasks(task_of);
      auto p = parameters(router);
      REQUIRE(p.size() == 5);
      const auto& r = router.forward(x, {.segment = segment, .gumbel = gumbel});
      REQUIRE(router.scorer().segments().size() == 4);
      for (Index t = 0; t < T; ++t) {
        INFO("token " << t);
        const Index first = segment_start(segment, t);
        const Index task = task_of[std::size_t(segment[std::size_t(t)])];
        const Matrix<double> clean = task_mlp_oracle(p.at("router.task_embedding").row(task), p);
        Matrix<double> logits = clean + g.row(first);  // the draw of the segment's first token
        require_close(router.logits().row(t), logits, forward_tol<double>(Dt * H) * (1 + logits.cwiseAbs().maxCoeff()));
        const Matrix<double> prob = softmax_of<double>(logits / tau);
        Index chosen = 0;
        for (Index e = 1; e < E; ++e) chosen = prob(0, e) > prob(0, chosen) ? e : chosen;
        const auto got = choices_of(r, t);
        REQUIRE(got.size() == std::size_t(form == moe::TaskForm::dense ? E : 1));
        REQUIRE(got[0].first == chosen);
        if (hardness == moe::Hardness::hard) {
          // gumbel_softmax's y_hard - y_soft + y_soft: (1 - p) + p, which rounds to exactly 1
          REQUIRE(got[0].second == 1.0);
          for (std::size_t j = 1; j < got.size(); ++j) {
            REQUIRE(got[j].second == 0.0);  // exactly
            REQUIRE(got[j].first == (Index(j) <= chosen ? Index(j) - 1 : Index(j)));  // the others, by index
          }
        } else {
          for (const auto& [e, w] : got) REQUIRE(w == Approx(prob(0, e)).epsilon(1e-12));
        }
        // every token of a segment routes as its first token, bit for bit
        REQUIRE(got == choices_of(r, first));
        REQUIRE(Matrix<double>(router.logits().row(t)) == Matrix<double>(router.logits().row(first)));
      }
    }
}

TEST_CASE("task router: generated draws keyed by (seed, step, segment id, expert), also at evaluation", "[task]") {
  const Index T = 7, D = 3, E = 4, tasks = 6;
  const Matrix<double> x = random_matrix<double>(T, D, 111);
  auto router = moe::make_task_router<double>(D, E, tasks, 8, 64, moe::TaskForm::sparse, 9);
  const std::vector<std::int32_t> segment{1, 1, 4, 4, 4, 5, 5};
  router.set_step(3);
  router.forward(x, {.segment = segment});
  const moe::CounterRng rng(9, 3, moe::DrawStream::gumbel);
  const auto draws = router.scorer().draws();
  REQUIRE(draws.rows() == 3);
  for (Index s = 0; s < 3; ++s)
    for (Index e = 0; e < E; ++e) REQUIRE(draws(s, e) == rng.gumbel(std::uint64_t(std::array{1, 4, 5}[std::size_t(s)]), std::uint64_t(e)));
  // clean logits + the draw on every token of the segment
  REQUIRE(Matrix<double>(router.logits().row(3)) == Matrix<double>(router.scorer().clean_logits().row(1) + draws.row(1)));
  // segment 4 draws alike at another place in the batch; a batch without ids is segment 0
  router.set_step(3);
  router.forward(x, {.segment = std::vector<std::int32_t>{4, 4, 4, 4, 4, 4, 4}});
  REQUIRE(Matrix<double>(router.scorer().draws()) == Matrix<double>(draws.row(1)));
  router.set_step(3);
  router.forward(x);
  REQUIRE(router.scorer().segments().size() == 1);
  REQUIRE(router.scorer().segments()[0].task == 0);
  REQUIRE(router.scorer().draws()(0, 0) == rng.gumbel(0, 0));
  // the reference samples at evaluation too; a scorer told otherwise routes by the clean logits
  router.set_training(false);
  router.forward(x);
  REQUIRE_FALSE(router.scorer().draws().isZero(0));
  auto quiet = moe::TaskRouter<double>(moe::TaskScorer<double>(D, E, tasks, 8, {.draws = {.seed = 9}}), moe::StraightThroughGate<double>{},
                                       moe::TopKSelector<double>(1));
  quiet.set_training(false);
  quiet.forward(x);
  REQUIRE(quiet.scorer().draws().isZero(0));
  REQUIRE(Matrix<double>(quiet.logits().row(0)) == Matrix<double>(quiet.scorer().clean_logits()));
  auto plain = moe::TaskScorer<double>(D, E, tasks, 8, {.gumbel = false});  // the reference's "softmax" mode
  Matrix<double> logits(T, E);
  plain.forward(x, {}, logits);
  REQUIRE(plain.draws().isZero(0));
}

TEST_CASE("task router: the preset's defaults and initialisation", "[task]") {
  const Index D = 8, E = 3, tasks = 5, Dt = 32;
  auto dense = moe::make_task_router<double>(D, E, tasks, Dt);
  REQUIRE(dense.selector().k() == E);
  REQUIRE(dense.selector().options().weighting == moe::Weighting::raw);
  REQUIRE_FALSE(dense.selector().options().capacity.limited());
  REQUIRE(dense.gate().temperature() == 5.0);
  REQUIRE(dense.gate().options().hardness == moe::Hardness::hard);
  REQUIRE(dense.scorer().hidden() == 64);
  REQUIRE(dense.scorer().options().draws.at_evaluation);
  REQUIRE(dense.causal());
  REQUIRE(moe::make_task_router<double>(D, E, tasks, Dt, 16, moe::TaskForm::sparse).selector().k() == 1);
  // nn.Embedding N(0, 1); nn.Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases
  auto big = moe::make_task_router<double>(D, E, 64, 64, 64, moe::TaskForm::dense, 3);
  auto p = parameters(big);
  const auto rms = [](const Matrix<double>& m) { return std::sqrt(m.array().square().mean()); };
  REQUIRE(rms(p.at("router.task_embedding")) == Approx(1.0).epsilon(0.05));
  for (const char* name : {"router.w1", "router.b1", "router.w2", "router.b2"}) {
    INFO(name);
    const double bound = 1.0 / 8.0;  // fan_in 64 for both layers here
    REQUIRE(p.at(name).cwiseAbs().maxCoeff() <= bound);
    if (p.at(name).size() >= 64) REQUIRE(rms(p.at(name)) == Approx(bound / std::sqrt(3.0)).epsilon(0.25));
  }
  // loaded task vectors replace the table
  const Matrix<double> z = random_matrix<double>(tasks, Dt, 120);
  dense.scorer().set_task_embeddings(z);
  REQUIRE(dense.scorer().task_embedding() == z);
}

TEST_CASE("StraightThroughGate: soft gradient against finite differences, hard forward, straight-through backward", "[task][gradient]") {
  const Index T = 5, E = 4;
  Matrix<double> logits = random_matrix<double>(T, E, 121, 2.0);
  const Matrix<double> G = random_matrix<double>(T, E, 122);
  for (const double tau : {0.3, 1.0, 5.0}) {
    INFO("tau " << tau);
    moe::StraightThroughGate<double> soft({.temperature = tau, .hardness = moe::Hardness::soft}),
        hard({.temperature = 1.0, .hardness = moe::Hardness::hard});
    hard.set_temperature(tau);
    Matrix<double> scores(T, E), hard_scores(T, E);
    const auto f = [&] {
      soft.forward(logits, scores);
      return scores.cwiseProduct(G).sum();
    };
    f();
    require_close(scores, softmax_of<double>(logits / tau), 1e-15);
    Matrix<double> dsoft = Matrix<double>::Zero(T, E), dhard = Matrix<double>::Zero(T, E);
    soft.backward(logits, scores, G, dsoft);
    require_gradient_close(dsoft, numeric_gradient(logits, f));
    hard.forward(logits, hard_scores);
    hard.backward(logits, hard_scores, G, dhard);
    REQUIRE(dhard == dsoft);  // straight-through: the soft gradient
    for (Index t = 0; t < T; ++t) {
      Index chosen = 0;
      scores.row(t).maxCoeff(&chosen);
      REQUIRE(hard_scores(t, chosen) == 1.0);  // (1 - p) + p rounds to 1 for any p in [0, 1]
      REQUIRE(hard_scores.row(t).sum() == hard_scores(t, chosen));  // the others exactly 0
    }
  }
  // (1 - p) + p is 1 in round-to-nearest for every p in [0, 1], in float and double
  int not_one = 0;
  for (int i = 0; i <= 100000; ++i) {
    const double p = double(i) / 100000 * std::pow(2.0, -double(i % 60));
    const float q = float(p);
    not_one += (1 - p) + p != 1.0;
    not_one += (1 - q) + q != 1.0f;
  }
  REQUIRE(not_one == 0);
  // ties go to the lower expert
  moe::StraightThroughGate<double> gate;
  const Matrix<double> tied = Matrix<double>::Constant(1, E, 0.5);
  Matrix<double> out(1, E);
  gate.forward(tied, out);
  REQUIRE(out(0, 0) == 1.0);
  REQUIRE(out.rightCols(E - 1).isZero(0));
}

TEST_CASE("TaskScorer: backward against finite differences of the scorer alone", "[task][gradient]") {
  const Index T = 9, D = 3, E = 4, tasks = 3, Dt = 5, H = 6;
  const std::vector<std::int32_t> segment{0, 0, 1, 1, 1, 2, 2, 3, 3};
  const std::vector<std::uint8_t> valid{1, 1, 1, 0, 1, 1, 1, 1, 0};
  moe::TaskScorer<double> scorer(D, E, tasks, Dt, {.hidden = H, .seed = 4});
  scorer.set_segment_tasks(std::vector<std::int32_t>{1, 0, 1, 2});  // task 1 twice
  scorer.set_draw_state({.training = true, .step = 2});
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = segment};
  const Matrix<double> x = random_matrix<double>(T, D, 131), R = random_matrix<double>(T, E, 132);
  Matrix<double> logits(T, E);
  const auto f = [&] {
    scorer.forward(x, tokens, logits);
    return logits.cwiseProduct(R).sum();
  };
  f();
  moe::zero_grad(scorer);
  Matrix<double> dx = Matrix<double>::Constant(T, D, 7.0);
  scorer.backward(x, tokens, R, dx);
  REQUIRE(dx.isZero(0));  // the router does not read x
  const auto grads = gradients(scorer);
  for (auto& [name, value] : parameters(scorer)) {
    INFO(name);
    require_gradient_close(grads.at(name), numeric_gradient(value, f));
  }
  REQUIRE(grads.at("router.task_embedding").row(1).cwiseAbs().maxCoeff() > 0);
}

TEST_CASE("task router layer: gradients by finite differences in the soft form; the dense hard form passes the same router gradient",
          "[task][gradient]") {
  const Index T = 8, D = 4, E = 3, tasks = 3, Dt = 4, H = 5;
  const std::vector<std::int32_t> segment{0, 0, 0, 1, 1, 2, 2, 2};
  const Matrix<double> g = random_matrix<double>(T, E, 141);
  const std::vector<double> gumbel(g.data(), g.data() + g.size());
  const moe::TokenInputs<double> tokens{.segment = segment, .gumbel = gumbel};
  const Matrix<double> R = random_matrix<double>(T, D, 142);
  const auto make = [&](moe::Hardness hardness, moe::TaskForm form) {
    auto router = moe::make_task_router<double>(D, E, tasks, Dt, H, form, 6);
    router.gate() = moe::StraightThroughGate<double>({.temperature = 0.8, .hardness = hardness});
    return moe::MoELayer(std::move(router), moe::FFNExperts<double>(E, D, 5, moe::Activation::gelu, 7));
  };
  Matrix<double> x = random_matrix<double>(T, D, 143);
  auto soft = make(moe::Hardness::soft, moe::TaskForm::dense);
  const auto soft_grads = check_layer_gradients(soft, x, R, tokens);
  REQUIRE(soft_grads.at("router.task_embedding").cwiseAbs().maxCoeff() > 0);
  // hard and dense: the zero-weight blocks run too, and d w_j = <dy, block_j(x)> reaches the
  // router through them, so its gradient is the soft one exactly (straight-through)
  const auto router_grads = [&](auto& layer) {
    Matrix<double> y(T, D), dx(T, D);
    layer.forward(x, y, tokens);
    moe::zero_grad(layer);
    layer.backward(R, dx);
    auto all = gradients(layer);
    std::erase_if(all, [](const auto& kv) { return kv.first.rfind("router.", 0) != 0; });
    return all;
  };
  auto hard = make(moe::Hardness::hard, moe::TaskForm::dense);
  auto sparse = make(moe::Hardness::hard, moe::TaskForm::sparse);
  const auto hard_grads = router_grads(hard), sparse_grads = router_grads(sparse);
  const auto& r = hard.routing();
  REQUIRE(r.num_slots() == T * E);
  Index zero_slots = 0;
  for (const double w : r.slot_weight) zero_slots += w == 0.0;
  REQUIRE(zero_slots == T * (E - 1));
  REQUIRE(hard_grads.size() == 5);
  for (const auto& [name, grad] : hard_grads) {
    INFO(name);
    require_close(grad, soft_grads.at(name), 1e-14 * (1 + grad.cwiseAbs().maxCoeff()));
  }
  // the sparse form runs the chosen block alone: its router gradient misses the others' part
  REQUIRE((hard_grads.at("router.w2") - sparse_grads.at("router.w2")).cwiseAbs().maxCoeff() > 1e-6);
  REQUIRE(sparse.routing().num_slots() == T);
}

TEST_CASE("task router: bad configuration, segment ids and task vectors get named errors, nothing written", "[task][errors]") {
  const Index T = 6, D = 3, E = 3, tasks = 3, Dt = 4;
  REQUIRE_THROWS_AS(moe::TaskScorer<float>(D, E, tasks, Dt, {.hidden = 0}), moe::config_error);
  REQUIRE_THROWS_AS(moe::TaskScorer<float>(D, E, 0, Dt), moe::config_error);
  REQUIRE_THROWS_AS(moe::TaskScorer<float>(D, E, tasks, 0), moe::config_error);
  REQUIRE_THROWS_AS(moe::TaskScorer<float>(D, 0, tasks, Dt), moe::config_error);
  REQUIRE_THROWS_AS(moe::make_task_router<float>(D, E, 0, Dt), moe::config_error);
  REQUIRE_THROWS_AS(moe::StraightThroughGate<float>({.temperature = 0.0}), moe::config_error);
  REQUIRE_THROWS_AS(moe::StraightThroughGate<float>({.temperature = NAN}), moe::config_error);
  REQUIRE_THROWS_AS(moe::gumbel_temperature(0, 2.0, -1e-4), moe::config_error);
  REQUIRE_THROWS_AS(moe::gumbel_temperature(0, 2.0, 3e-4, 0.0), moe::config_error);
  REQUIRE_THROWS_AS(moe::gumbel_temperature(0, 0.0), moe::config_error);
  auto router = moe::make_task_router<float>(D, E, tasks, Dt);
  REQUIRE_THROWS_AS(router.gate().set_temperature(-1.0), moe::config_error);
  REQUIRE(router.gate().temperature() == 5.0);
  const Matrix<float> x = random_matrix<float>(T, D, 151);
  router.forward(x, {.segment = std::vector<std::int32_t>{0, 0, 1, 1, 2, 2}});
  const auto slots = router.routing().slot_token;
  const auto weights = router.routing().slot_weight;
  const Matrix<float> logits = router.logits(), clean = router.scorer().clean_logits();
  const auto unchanged = [&] {
    REQUIRE(router.routing().slot_token == slots);
    REQUIRE(router.routing().slot_weight == weights);
    REQUIRE(Matrix<float>(router.logits()) == logits);
    REQUIRE(Matrix<float>(router.scorer().clean_logits()) == clean);
    REQUIRE(router.scorer().segments().size() == 3);
  };
  const auto rejects = [&](std::vector<std::int32_t> segment, const std::string& says) {
    INFO(says);
    try {
      router.forward(x, {.segment = segment});
      FAIL("no error");
    } catch (const moe::value_error& e) {
      const std::string what = e.what();
      REQUIRE(what.find("tokens.segment") != std::string::npos);
      REQUIRE(what.find(says) != std::string::npos);
    }
    unchanged();
  };
  rejects({0, 0, 1, 1, 3, 3}, "3 at token 4");       // no task embedding 3
  rejects({0, 0, 2, 2, 1, 1}, "1 at token 4 after 2");  // decreasing
  rejects({-1, 0, 0, 0, 0, 0}, "-1 at token 0");
  // the task map: an entry without a task row is refused and leaves the map; ids past the map are refused
  router.scorer().set_segment_tasks(std::vector<std::int32_t>{2, 0});
  REQUIRE_THROWS_AS(router.scorer().set_segment_tasks(std::vector<std::int32_t>{0, 3}), moe::value_error);
  REQUIRE(router.scorer().segment_tasks().size() == 2);
  REQUIRE(router.scorer().segment_tasks()[0] == 2);
  rejects({0, 0, 1, 1, 2, 2}, "set_segment_tasks");
  // task vectors of the wrong shape, or not finite
  const Matrix<float> z = router.scorer().task_embedding();
  REQUIRE_THROWS_AS(router.scorer().set_task_embeddings(random_matrix<float>(tasks + 1, Dt, 152)), moe::shape_error);
  REQUIRE_THROWS_AS(router.scorer().set_task_embeddings(random_matrix<float>(tasks, Dt - 1, 153)), moe::shape_error);
  Matrix<float> bad = random_matrix<float>(tasks, Dt, 154);
  bad(1, 2) = NAN;
  REQUIRE_THROWS_AS(router.scorer().set_task_embeddings(bad), moe::value_error);
  REQUIRE(router.scorer().task_embedding() == z);
}

TEST_CASE("gumbel_temperature: max(2 exp(-3e-4 step), 0.1), the reference's schedule", "[task]") {
  const auto expected = [](double step) { return std::max(2.0 * std::exp(-0.0003 * step), 0.1); };
  for (const std::uint64_t step : {0ull, 1000ull, 10000ull, 100000ull}) {
    INFO("step " << step);
    REQUIRE(moe::gumbel_temperature(step) == Approx(expected(double(step))).epsilon(1e-15));
  }
  REQUIRE(moe::gumbel_temperature(0) == 2.0);
  REQUIRE(moe::gumbel_temperature(1000) == Approx(1.4816364413634358).epsilon(1e-15));
  REQUIRE(moe::gumbel_temperature(10000) == 0.1);  // 2 e^-3 = 0.0996 is below the floor
  REQUIRE(moe::gumbel_temperature(100000) == 0.1);
  REQUIRE(moe::gumbel_temperature(2000, 1.0, 1e-3, 0.01) == Approx(std::exp(-2.0)).epsilon(1e-15));
}
