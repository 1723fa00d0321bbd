// The released models' routers (moe/presets/released.hpp), part of the test_routers binary: each
// preset against its model's gate written here from the model's math (softmax or not, top-k of
// what, which weights), ties and saturated sigmoids, DeepSeek-V2's group maximum, DBRX's p-norm,
// Llama 4's input-side weights and Qwen2's sigmoid-gated shared expert, gradients by finite
// differences in double, and the named errors.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::Weighting;

namespace {

enum class Score { softmax, logits };  // what the model's top-k ranks
enum class Rule { raw, renormalize, p_norm, softmax_of_kept, sigmoid };

// A model's gate, from its logits, in double: top-k (ties to the lower expert) of the softmax or
// of the logits, optionally among the best `keep` of `groups` groups scored by their maximum
// (DeepSeek-V2), then the weights by the model's rule, times `scale`.
struct ModelGate {
  Index k;
  Score score = Score::softmax;
  Rule rule = Rule::raw;
  double scale = 1.0, p = 1.0;
  Index groups = 1, keep = 1;
};

struct Choices {
  std::vector<int> expert;
  std::vector<double> weight;
  double margin = 0;  // gap between the k-th and (k+1)-th ranked value (for ties in float)
};

Choices model_route(const ModelGate& g, const double* logit, Index E) {
  std::vector<double> prob(logit, logit + E);
  if (g.score == Score::softmax) {
    const double top = *std::max_element(prob.begin(), prob.end());
    double z = 0;
    for (double& v : prob) z += (v = std::exp(v - top));
    for (double& v : prob) v /= z;
  }
  std::vector<int> candidates;
  const Index size = E / g.groups;
  std::vector<int> group(g.groups);
  std::iota(group.begin(), group.end(), 0);
  std::stable_sort(group.begin(), group.end(), [&](int a, int b) {
    return *std::max_element(&prob[a * size], &prob[a * size] + size) >
           *std::max_element(&prob[b * size], &prob[b * size] + size);
  });
  for (Index j = 0; j < g.keep; ++j)
    for (Index e = group[j] * size; e < (group[j] + 1) * size; ++e) candidates.push_back(int(e));
  std::sort(candidates.begin(), candidates.end());
  std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return prob[a] > prob[b]; });
  Choices out;
  out.expert.assign(candidates.begin(), candidates.begin() + g.k);
  out.margin = Index(candidates.size()) > g.k ? prob[candidates[g.k - 1]] - prob[candidates[g.k]] : 1.0;
  double norm = 0, top = -INFINITY;
  for (const int e : out.expert) {
    norm += std::pow(prob[e], g.p);
    top = std::max(top, logit[e]);
  }
  norm = std::pow(norm, 1.0 / g.p);
  double kept_sum = 0;
  for (const int e : out.expert) kept_sum += std::exp(logit[e] - top);
  for (const int e : out.expert) {
    double w = prob[e];
    if (g.rule == Rule::renormalize || g.rule == Rule::p_norm) w /= norm;
    if (g.rule == Rule::softmax_of_kept) w = std::exp(logit[e] - top) / kept_sum;
    if (g.rule == Rule::sigmoid) w = 1.0 / (1.0 + std::exp(-logit[e]));
    out.weight.push_back(g.scale * w);
  }
  return out;
}

// Routes x through the router and compares every token with the model's gate on the router's
// logits. In float, a token whose k-th and (k+1)-th values are nearer than the softmax's
// rounding may legitimately differ; it is counted, and there must be few.
template <class Router>
void require_routes_as_model(Router& router, const ModelGate& gate, std::uint64_t seed) {
  using S = typename Router::scalar_type;
  const Index T = 96, D = router.input_dim(), E = router.num_experts();
  router.scorer().weight() *= S(3);  // logits of O(3): decisive choices, varied weights
  const Matrix<S> x = random_matrix<S>(T, D, seed);
  const auto& r = router.forward(x);
  const Matrix<double> logits = router.logits().template cast<double>();
  Index near_ties = 0;
  for (Index t = 0; t < T; ++t) {
    INFO("token " << t);
    const Choices want = model_route(gate, logits.row(t).data(), E);
    if (want.margin < 64 * double(std::numeric_limits<S>::epsilon())) {
      ++near_ties;
      continue;
    }
    REQUIRE(r.token_offsets[t + 1] - r.token_offsets[t] == gate.k);
    for (Index j = 0; j < gate.k; ++j) {
      const Index c = r.token_offsets[t] + j;
      REQUIRE(r.choice_expert[c] == want.expert[j]);
      REQUIRE(double(r.slot_weight[r.choice_slot[c]]) ==
              Approx(want.weight[j]).epsilon(forward_tol<S>(4 * E)).margin(forward_tol<S>(4 * E)));
    }
  }
  REQUIRE(near_ties <= 2);
}

}  // namespace

TEMPLATE_TEST_CASE("released presets route as their models' gates", "[router][released]", float, double) {
  using S = TestType;
  const Index D = 12;
  SECTION("Mixtral: softmax, top-2, renormalised") {
    auto router = moe::make_mixtral_router<S>(D, 8, 2, 1);
    require_routes_as_model(router, {.k = 2, .rule = Rule::renormalize}, 11);
  }
  SECTION("Qwen2-MoE: norm_topk_prob false and true") {
    auto raw = moe::make_qwen2_moe_router<S>(D, 12, 4, false, 2);
    require_routes_as_model(raw, {.k = 4}, 12);
    auto normed = moe::make_qwen2_moe_router<S>(D, 12, 4, true, 2);
    require_routes_as_model(normed, {.k = 4, .rule = Rule::renormalize}, 12);
  }
  SECTION("Qwen3-MoE and OLMoE") {
    auto qwen3 = moe::make_qwen3_moe_router<S>(D, 32, 8, true, 3);
    require_routes_as_model(qwen3, {.k = 8, .rule = Rule::renormalize}, 13);
    auto olmoe = moe::make_olmoe_router<S>(D, 16, 8, false, 4);
    require_routes_as_model(olmoe, {.k = 8}, 14);
  }
  SECTION("DBRX: the k probabilities over their p-norm, p = 1, 2 and none") {
    auto p1 = moe::make_dbrx_router<S>(D, 16, 4, 1.0, 5);
    require_routes_as_model(p1, {.k = 4, .rule = Rule::p_norm, .p = 1.0}, 15);
    auto p2 = moe::make_dbrx_router<S>(D, 16, 4, 2.0, 5);
    require_routes_as_model(p2, {.k = 4, .rule = Rule::p_norm, .p = 2.0}, 15);
    auto none = moe::make_dbrx_router<S>(D, 16, 4, std::nullopt, 5);
    require_routes_as_model(none, {.k = 4}, 15);
  }
  SECTION("DeepSeek-V2: group maximum, 3 of 8 groups, scaled, not renormalised; V2-Lite greedy") {
    auto v2 = moe::make_deepseek_v2_router<S>(D, 32, 6, 8, 3, 16.0, moe::DeepSeekV2TopK::group_limited_greedy, 6);
    require_routes_as_model(v2, {.k = 6, .scale = 16.0, .groups = 8, .keep = 3}, 16);
    auto lite = moe::make_deepseek_v2_router<S>(D, 32, 6, 8, 3, 1.0, moe::DeepSeekV2TopK::greedy, 6);
    require_routes_as_model(lite, {.k = 6}, 16);
  }
  SECTION("gpt-oss: biased logits, top-4 of the logits, softmax over the four") {
    auto router = moe::make_gpt_oss_router<S>(D, 16, 4, 7);
    router.scorer().bias().setConstant(S(0.25));
    router.scorer().bias()(0, 3) = S(-1.5);
    require_routes_as_model(router, {.k = 4, .score = Score::logits, .rule = Rule::softmax_of_kept}, 17);
  }
  SECTION("Llama 4: top-1 (and top-2) of the logits, sigmoid of the chosen") {
    auto top1 = moe::make_llama4_router<S>(D, 16, 1, 8);
    require_routes_as_model(top1, {.k = 1, .score = Score::logits, .rule = Rule::sigmoid}, 18);
    auto top2 = moe::make_llama4_router<S>(D, 16, 2, 8);
    require_routes_as_model(top2, {.k = 2, .score = Score::logits, .rule = Rule::sigmoid}, 18);
  }
}

TEST_CASE("released presets: ties go to the lower expert, saturated sigmoids still rank by the logit",
          "[router][released]") {
  // Llama 4 ranks the logits: 20 and 30 both have sigmoid 1.0f, but expert 3 is the model's choice
  auto llama = moe::make_llama4_router<float>(4, 4, 1);
  Matrix<float> saturated(2, 4);
  saturated << 20.f, -1.f, 0.f, 30.f,  //
      2.f, 2.f, -3.f, 1.f;             // an exact tie: expert 0
  const auto& r = llama.route(saturated);
  REQUIRE(r.choice_expert[0] == 3);
  REQUIRE(r.slot_weight[r.choice_slot[0]] == 1.0f);
  REQUIRE(r.choice_expert[1] == 0);
  // gpt-oss likewise: far-apart logits whose softmax underflows to 0 still rank by logit
  auto oss = moe::make_gpt_oss_router<float>(4, 6, 2);
  Matrix<float> spread(1, 6);
  spread << -200.f, 0.f, -150.f, -300.f, -120.f, -250.f;
  const auto& o = oss.route(spread);
  REQUIRE(o.choice_expert[0] == 1);
  REQUIRE(o.choice_expert[1] == 4);
  // Mixtral with three equal probabilities: experts 1 and 2, the lower indices
  auto mixtral = moe::make_mixtral_router<double>(4, 5, 2);
  Matrix<double> tied(1, 5);
  tied << 0.0, 1.0, 1.0, 1.0, -2.0;
  const auto& m = mixtral.route(tied);
  REQUIRE(std::vector<int>(m.choice_expert.begin(), m.choice_expert.end()) == std::vector<int>{1, 2});
  REQUIRE(m.slot_weight[m.choice_slot[0]] == 0.5);
}

TEST_CASE("DeepSeek-V2 groups score their maximum, not the sum of their top two", "[selector][released]") {
  // groups of 3: {0.30, 0.02, 0.01} max 0.30, {0.20, 0.19, 0.01} max 0.20 (its top two sum to
  // 0.39, the best under DeepSeek-V3's rule), {0.24, 0.02, 0.01} max 0.24; keep 2, k = 4
  moe::GroupLimitedTopKSelector<double> selector(4, {.count = 3, .keep = 2, .top = 1});
  Matrix<double> p(1, 9);
  p << 0.30, 0.02, 0.01, 0.20, 0.19, 0.01, 0.24, 0.02, 0.01;
  moe::SparseRouting<double> r;
  selector.forward({p, p, p, {}}, r);
  // groups 0 and 2; then 0.02 twice (experts 1 and 7): the lower index
  REQUIRE(std::vector<int>(r.choice_expert.begin(), r.choice_expert.end()) == std::vector<int>{0, 6, 1, 7});
  moe::GroupLimitedTopKSelector<double> v3_rule(4, {.count = 3, .keep = 2});  // top 4/2 = 2 per group
  v3_rule.forward({p, p, p, {}}, r);
  REQUIRE(std::vector<int>(r.choice_expert.begin(), r.choice_expert.end()) == std::vector<int>{0, 3, 4, 1});
}

TEST_CASE("DeepSeek-V2's sequence-wise loss counts the group-limited choices", "[loss][released]") {
  // seq_aux of its MoEGate: per sequence, ce_e = count_e E / (L k) over the experts chosen,
  // times the mean score of e over the sequence, summed over e, averaged over sequences, times alpha
  const Index T = 40, D = 6, E = 16, k = 4, L = 10;
  auto router = moe::make_deepseek_v2_router<double>(D, E, k, 4, 2, 16.0, moe::DeepSeekV2TopK::group_limited_greedy, 3);
  router.scorer().weight() *= 3.0;
  const Matrix<double> x = random_matrix<double>(T, D, 4);
  std::vector<std::int32_t> segment(T);
  for (Index t = 0; t < T; ++t) segment[t] = std::int32_t(t / L);
  const auto& r = router.forward(x, {.segment = segment});
  const Matrix<double> p = softmax_of<double>(router.logits());
  double want = 0;
  for (Index b = 0; b < T / L; ++b) {
    std::vector<double> ce(E, 0.0), mean(E, 0.0);
    for (Index t = b * L; t < (b + 1) * L; ++t) {
      const Choices c = model_route({.k = k, .groups = 4, .keep = 2}, router.logits().row(t).data(), E);
      for (const int e : c.expert) ce[e] += double(E) / double(L * k);
      for (Index e = 0; e < E; ++e) mean[e] += p(t, e) / double(L);
    }
    for (Index e = 0; e < E; ++e) want += ce[e] * mean[e] / double(T / L);
  }
  REQUIRE(r.num_choices() == T * k);
  REQUIRE(router.loss_values()[0] == Approx(want).epsilon(forward_tol<double>(E * L)));
  REQUIRE(router.aux_loss() == Approx(3e-3 * want).epsilon(forward_tol<double>(E * L)));
}

TEST_CASE("released presets: gradients match finite differences", "[router][released][gradient]") {
  const auto check = [](auto router, std::uint64_t seed) {
    const Index T = 12, D = router.input_dim(), E = router.num_experts();
    router.scorer().weight() *= 3.0;
    const Matrix<double> x0 = random_matrix<double>(T, D, seed);
    const Matrix<double> R = random_matrix<double>(T, E, seed + 1);
    Matrix<double> x = x0;
    slot_objective(router, x, R, {});
    const Matrix<double> dx = slot_backward(router, x, R, {});
    Matrix<double> dweight;
    router.for_each_parameter([&](std::string_view name, auto, auto grad) {
      if (name == "router.weight") dweight = grad;
    });
    const auto f = [&] { return slot_objective(router, x, R, {}); };
    require_gradient_close(dx, numeric_gradient(x, f));
    require_gradient_close(dweight, numeric_gradient(router.scorer().weight(), f));
  };
  check(moe::make_mixtral_router<double>(6, 8, 2), 1);
  check(moe::make_qwen2_moe_router<double>(6, 8, 3), 2);
  check(moe::make_dbrx_router<double>(6, 8, 3, 1.0), 3);
  check(moe::make_dbrx_router<double>(6, 8, 3, 2.0), 4);
  check(moe::make_dbrx_router<double>(6, 8, 3, 0.5), 5);
  check(moe::make_deepseek_v2_router<double>(6, 8, 2, 4, 2, 16.0), 6);
  check(moe::make_gpt_oss_router<double>(6, 8, 3), 7);
  check(moe::make_llama4_router<double>(6, 8, 2), 8);
}

namespace {
// One SwiGLU expert e of the layer on a row: silu(x Wg) * (x Wu) Wd, from the layer's parameters.
Eigen::RowVectorXd swiglu_row(std::map<std::string, Eigen::Ref<Matrix<double>>>& p, const std::string& prefix, Index e,
                              const Eigen::RowVectorXd& x) {
  const Index D = x.size(), H = p.at(prefix + "w_gate").cols();
  const Eigen::RowVectorXd g = x * p.at(prefix + "w_gate").middleRows(e * D, D);
  const Eigen::RowVectorXd u = x * p.at(prefix + "w_up").middleRows(e * D, D);
  Eigen::RowVectorXd h(H);
  for (Index j = 0; j < H; ++j) h[j] = g[j] / (1.0 + std::exp(-g[j])) * u[j];
  return h * p.at(prefix + "w_down").middleRows(e * H, H);
}
}  // namespace

TEST_CASE("Llama 4 layer: the weight scales the expert's input; the shared expert is added", "[layer][released]") {
  const Index T = 10, D = 6, H = 5, E = 4;
  moe::MoELayer layer(moe::make_llama4_router<double>(D, E, 1, 3), moe::SwiGLUExperts<double>(E, D, H, 4),
                      moe::SwiGLUExperts<double>(1, D, H, 5));
  layer.set_weighted_at(moe::WeightedAt::input);
  layer.router().scorer().weight() *= 3.0;
  Matrix<double> x = random_matrix<double>(T, D, 6);
  Matrix<double> y(T, D);
  layer.forward(x, y);
  auto p = parameters(layer);
  const Matrix<double> logits = x * p.at("router.weight").transpose();
  for (Index t = 0; t < T; ++t) {
    Index e = 0;
    logits.row(t).maxCoeff(&e);
    const double w = 1.0 / (1.0 + std::exp(-logits(t, e)));
    const Eigen::RowVectorXd want = swiglu_row(p, "experts.", e, w * x.row(t)) + swiglu_row(p, "shared.experts.", 0, x.row(t));
    require_close(y.row(t), want, forward_tol<double>(D * H));
  }
  const Matrix<double> R = random_matrix<double>(T, D, 7);
  check_layer_gradients(layer, x, R);
}

TEST_CASE("Qwen2-MoE layer: the shared expert scaled by sigmoid(x . w)", "[layer][released]") {
  const Index T = 9, D = 6, H = 4, E = 6;
  // Qwen2's gate without its balance loss, which check_layer_gradients' objective leaves out
  moe::MoELayer layer(moe::Router(moe::LinearScorer<double>(D, E, {.seed = 3}), moe::SoftmaxGate<double>{},
                                  moe::TopKSelector<double>(2)),
                      moe::SwiGLUExperts<double>(E, D, H, 4),
                      moe::SigmoidGatedExpert(moe::SwiGLUExperts<double>(1, D, H, 5), 6));
  Matrix<double> x = random_matrix<double>(T, D, 8);
  Matrix<double> y(T, D);
  layer.forward(x, y);
  auto p = parameters(layer);
  REQUIRE(p.count("shared.gate.weight") == 1);
  const Matrix<double> probs = softmax_of<double>(x * p.at("router.weight").transpose());
  for (Index t = 0; t < T; ++t) {
    const Choices top = model_route({.k = 2}, Matrix<double>(x.row(t) * p.at("router.weight").transpose()).data(), E);
    Eigen::RowVectorXd want = Eigen::RowVectorXd::Zero(D);
    for (Index j = 0; j < 2; ++j) {
      REQUIRE(top.weight[j] == Approx(probs(t, top.expert[j])));
      want += top.weight[j] * swiglu_row(p, "experts.", top.expert[j], x.row(t));
    }
    const double gate = 1.0 / (1.0 + std::exp(-x.row(t).dot(p.at("shared.gate.weight").row(0))));
    want += gate * swiglu_row(p, "shared.experts.", 0, x.row(t));
    require_close(y.row(t), want, forward_tol<double>(D * H));
  }
  const Matrix<double> R = random_matrix<double>(T, D, 9);
  check_layer_gradients(layer, x, R);
}

TEST_CASE("released presets: bad configuration is a named error", "[errors][released]") {
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH(moe::make_dbrx_router<double>(6, 8, 2, 0.0), Contains("norm_p") && Contains("> 0"));
  REQUIRE_THROWS_WITH(moe::TopPSelector<double>({.weighting = Weighting::p_norm}), Contains("p_norm"));
  // a group maximum needs nothing of k; more values per group than a group holds is refused
  REQUIRE_NOTHROW(moe::make_deepseek_v2_router<double>(6, 16, 5, 4, 2));
  REQUIRE_THROWS_WITH(moe::Router(moe::LinearScorer<double>(6, 8), moe::SoftmaxGate<double>{},
                                  moe::GroupLimitedTopKSelector<double>(2, {.count = 4, .keep = 2, .top = 3})),
                      Contains("groups.top") && Contains("experts per group (2)"));
  REQUIRE_THROWS_WITH(moe::make_deepseek_v2_router<double>(6, 16, 7, 4, 1), Contains("k <= groups.keep"));
  moe::MoELayer depth(moe::make_depth_router<double>(6), moe::SwiGLUExperts<double>(1, 6, 4, 1));
  REQUIRE_THROWS_WITH(depth.set_weighted_at(moe::WeightedAt::input), Contains("WeightedAt::output"));
}
