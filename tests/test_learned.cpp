// The learned routers that change what the router is (docs/scorers.md): Yuan 2.0-M32's attention
// router (AttentionScorer, AttentionRouter), checked against an oracle written from the math in
// docs/routers.md, finite-difference gradients in double, and the bad-input contract.
#include <algorithm>
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
