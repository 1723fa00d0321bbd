// Depth routing (DepthRouter: Mixture-of-Depths; MindSkipRouter: MindSkip), each checked against
// an oracle written from the math in docs/routers.md (not from the code under test): the scorer's
// logits, the per-segment top C and the threshold, the layer output y = x + w f(x), gradients by
// finite differences in double (for MindSkip's straight-through estimator, of the surrogate whose
// derivative that estimator is), the losses, the edge cases and the bad-input contract.
#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe_test;

namespace {

using Mask = std::vector<std::uint8_t>;
using Segments = std::vector<std::int32_t>;
bool is_valid(const Mask& valid, Index t) { return valid.empty() || valid[std::size_t(t)]; }

double gelu(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }
double sigmoid(double v) { return 1 / (1 + std::exp(-v)); }
double silu(double v) { return v * sigmoid(v); }

// The block f(x) = gelu(x W1) W2 of FFNExperts with one expert.
Matrix<double> ffn(const Matrix<double>& x, const Matrix<double>& w1, const Matrix<double>& w2) {
  Matrix<double> h = x * w1;
  return h.unaryExpr([](double v) { return gelu(v); }) * w2;
}

// The segments as [begin, end) runs; one run over all rows without ids.
std::vector<std::pair<Index, Index>> runs(const Segments& seg, Index T) {
  std::vector<std::pair<Index, Index>> out;
  for (Index b = 0; b < T;) {
    Index e = b + 1;
    while (e < T && !seg.empty() && seg[std::size_t(e)] == seg[std::size_t(b)]) ++e;
    if (seg.empty()) e = T;
    out.emplace_back(b, e);
    b = e;
  }
  return out;
}

// Per token, the mean of r over its segment's counted rows (real ones, or all with `all_rows`).
std::vector<double> segment_means(const std::vector<double>& r, const Segments& seg, const Mask& valid, bool all_rows) {
  std::vector<double> out(r.size(), 0.0);
  for (auto [b, e] : runs(seg, Index(r.size()))) {
    double sum = 0;
    int n = 0;
    for (Index t = b; t < e; ++t)
      if (all_rows || is_valid(valid, t)) sum += r[std::size_t(t)], ++n;
    for (Index t = b; t < e; ++t) out[std::size_t(t)] = n ? sum / n : 0.0;
  }
  return out;
}

std::vector<double> router_scores(const Matrix<double>& x, const Matrix<double>& w) {
  std::vector<double> r(std::size_t(x.rows()));
  for (Index t = 0; t < x.rows(); ++t) r[std::size_t(t)] = x.row(t).dot(w.row(0));
  return r;
}

// Mixture-of-Depths' choice: per segment, the ceil(c n) real tokens of largest r (ties to the
// lower token), all of them when the segment is shorter.
std::vector<bool> top_c_oracle(const std::vector<double>& r, const Segments& seg, const Mask& valid, double c) {
  std::vector<bool> run(r.size(), false);
  for (auto [b, e] : runs(seg, Index(r.size()))) {
    std::vector<Index> real;
    for (Index t = b; t < e; ++t)
      if (is_valid(valid, t)) real.push_back(t);
    std::stable_sort(real.begin(), real.end(), [&](Index a, Index z) { return r[std::size_t(a)] > r[std::size_t(z)]; });
    const auto C = std::size_t(std::ceil(c * double(real.size())));
    for (std::size_t i = 0; i < std::min(C, real.size()); ++i) run[std::size_t(real[i])] = true;
  }
  return run;
}

// y = x + w_t f(x_t) for the tokens that run the block, x for the others.
Matrix<double> skip_layer_oracle(const Matrix<double>& x, const Matrix<double>& f, const std::vector<bool>& run,
                                 const std::vector<double>& weight) {
  Matrix<double> y = x;
  for (Index t = 0; t < x.rows(); ++t)
    if (run[std::size_t(t)]) y.row(t) += weight[std::size_t(t)] * f.row(t);
  return y;
}

template <class Router>
Index slots_in(const Router& router, Index b, Index e) {
  const auto& r = router.routing();
  return Index(std::count_if(r.slot_token.begin(), r.slot_token.end(), [&](std::int32_t t) { return t >= b && t < e; }));
}

}  // namespace

TEST_CASE("depth scorer: r per token, segment means and the predictor match the oracle", "[depth]") {
  const Index T = 9, D = 5, H = 4;
  const Segments seg{0, 0, 0, 0, 3, 3, 7, 7, 7};
  const Mask valid{1, 0, 1, 1, 1, 1, 0, 0, 0};  // the last segment is all padding
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = seg};
  const Matrix<double> x = random_matrix<double>(T, D, 3, 2.0);
  for (const auto pool_padding : {moe::Padding::excluded, moe::Padding::fairseq}) {
    moe::DepthScorer<double> scorer(D, {.pooling = moe::DepthPooling::segment_mean, .pool_padding = pool_padding,
                                        .predictor_hidden = H, .router = {.seed = 4}});
    REQUIRE(scorer.num_experts() == 1);
    REQUIRE(scorer.logit_columns() == 2);
    std::map<std::string, Matrix<double>> p;
    scorer.for_each_parameter([&](std::string_view name, auto value, auto) { p.emplace(std::string(name), value); });
    REQUIRE(p.size() == 5);
    // non-zero biases, so the oracle sees them
    scorer.for_each_parameter([&](std::string_view name, auto value, auto) {
      if (name == "predictor.b1" || name == "predictor.b2") value.setConstant(0.3);
    });
    Matrix<double> logits(T, 2);
    scorer.forward(x, tokens, logits);
    const auto r = segment_means(router_scores(x, p.at("router.weight")), seg, valid, pool_padding == moe::Padding::fairseq);
    for (Index t = 0; t < T; ++t) {
      REQUIRE(logits(t, 0) == Approx(r[std::size_t(t)]).epsilon(1e-12).margin(1e-12));
      double q = 0.3;
      for (Index i = 0; i < H; ++i) q += p.at("predictor.w2")(0, i) * silu(x.row(t).dot(p.at("predictor.w1").row(i)) + 0.3);
      REQUIRE(logits(t, 1) == Approx(q).epsilon(1e-12));
    }
    REQUIRE(logits(6, 0) == (pool_padding == moe::Padding::fairseq ? Approx(r[6]) : Approx(0.0)));
  }
}

TEST_CASE("Mixture-of-Depths: the top C of each segment run the block, y = x + r f(x)", "[depth]") {
  const Index T = 20, D = 6, H = 7;
  const Segments seg{0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 5, 5, 5, 5};
  for (const Mask& valid : {Mask{}, Mask{1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1}}) {
    const moe::TokenInputs<double> tokens{.valid = valid, .segment = seg};
    Matrix<double> x = random_matrix<double>(T, D, 7);
    x.row(4) = x.row(1);  // a tie: the lower token wins
    moe::MoELayer layer(moe::make_depth_router<double>(D, 0.3, moe::DepthInference::top_c, 2),
                        moe::FFNExperts<double>(1, D, H));
    REQUIRE(layer.router().num_experts() == 1);
    Matrix<double> y(T, D);
    layer.forward(x, y, tokens);
    auto params = parameters(layer);
    const auto r = router_scores(x, params.at("router.weight"));
    const auto run = top_c_oracle(r, seg, valid, 0.3);
    const auto& routing = layer.routing();
    // exactly ceil(0.3 n) per segment, in token order, each token once, padding never
    for (auto [b, e] : runs(seg, T)) {
      Index n = 0;
      for (Index t = b; t < e; ++t) n += is_valid(valid, t);
      REQUIRE(slots_in(layer.router(), b, e) == Index(std::ceil(0.3 * double(n))));
    }
    REQUIRE(std::is_sorted(routing.slot_token.begin(), routing.slot_token.end()));
    REQUIRE(std::adjacent_find(routing.slot_token.begin(), routing.slot_token.end()) == routing.slot_token.end());
    for (Index t = 0; t < T; ++t) {
      const bool routed = routing.token_offsets[t + 1] > routing.token_offsets[t];
      REQUIRE(routed == run[std::size_t(t)]);
      if (!is_valid(valid, t)) REQUIRE(!routed);
    }
    for (Index s = 0; s < routing.num_slots(); ++s) REQUIRE(routing.slot_weight[s] == Approx(r[std::size_t(routing.slot_token[s])]).epsilon(1e-12));
    const Matrix<double> f = ffn(x, params.at("experts.w1"), params.at("experts.w2"));
    require_close(y, skip_layer_oracle(x, f, run, r), 1e-12);
  }
}

TEST_CASE("Mixture-of-Depths: a tie at the cut goes to the lower token, -0 ties +0", "[depth]") {
  auto router = moe::Router(moe::DepthScorer<double>(1), moe::IdentityGate<double>{},
                            moe::DepthTopCSelector<double>({.capacity = {.slots = 2}}));
  router.scorer().router().weight().setConstant(1.0);
  Matrix<double> x(8, 1);
  x << 1, 3, 2, 3, 3, 0, -0.0, 0.0;
  const auto& r = router.forward(x);
  REQUIRE(r.slot_token == std::vector<std::int32_t>{1, 3});
  x << -1, -3, -2, -3, -3, -0.0, 0.0, -5;
  REQUIRE(router.forward(x).slot_token == std::vector<std::int32_t>{5, 6});
}

TEST_CASE("Mixture-of-Depths: gradients by finite differences in double", "[depth][gradient]") {
  const Index T = 12, D = 5, H = 4;
  const Segments seg{0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2};
  const Mask valid{1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1};
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = seg};
  Matrix<double> x = random_matrix<double>(T, D, 13);
  const Matrix<double> R = random_matrix<double>(T, D, 14);
  // With the predictor, its loss trains only its own parameters (the input's gradient is
  // stopped); without it, the loss is on r itself and reaches x and w.
  for (const Index hidden : {Index(0), Index(3)}) {
    INFO("predictor_hidden " << hidden);
    moe::MoELayer layer(moe::DepthRouter<double>(moe::DepthScorer<double>(D, {.predictor_hidden = hidden, .router = {.seed = 5}}),
                                                 moe::IdentityGate<double>{},
                                                 moe::DepthTopCSelector<double>({.capacity = {.factor = 0.5, .multiple_of = 1}}),
                                                 moe::DepthPredictorLoss<double>(0.7)),
                        moe::FFNExperts<double>(1, D, H));
    Matrix<double> y(T, D), dx(T, D);
    const auto task = [&] {
      layer.forward(x, y, tokens);
      return y.cwiseProduct(R).sum();
    };
    const auto loss = [&] { return task() + layer.router().aux_loss(); };
    loss();
    REQUIRE(layer.router().loss_values()[0] > 0);
    moe::zero_grad(layer);
    layer.backward(R, dx);
    const auto grads = gradients(layer);
    require_gradient_close(dx, numeric_gradient(x, hidden > 0 ? std::function<double()>(task) : std::function<double()>(loss)));
    auto params = parameters(layer);
    REQUIRE(params.size() == (hidden > 0 ? 7u : 3u));
    for (auto& [name, value] : params) {
      INFO(name);
      require_gradient_close(grads.at(name), numeric_gradient(value, loss));
    }
  }
}

TEST_CASE("Mixture-of-Depths: the predictor's loss and the causal evaluation", "[depth]") {
  const Index T = 10, D = 4;
  const Mask valid{1, 1, 1, 1, 0, 1, 1, 1, 1, 1};
  const moe::TokenInputs<double> tokens{.valid = valid};
  const Matrix<double> x = random_matrix<double>(T, D, 17);
  auto router = moe::make_depth_router<double>(D, 0.25, moe::DepthInference::predictor, 3);
  router.forward(x, tokens);  // training: the top C
  const Matrix<double> logits = router.logits();
  std::vector<double> r(T);
  for (Index t = 0; t < T; ++t) r[std::size_t(t)] = logits(t, 0);
  const auto run = top_c_oracle(r, {}, valid, 0.25);
  double bce = 0;
  for (Index t = 0; t < T; ++t)
    if (is_valid(valid, t)) {
      const double p = logits(t, 1);
      bce += std::log1p(std::exp(p)) - (run[std::size_t(t)] ? p : 0.0);
      REQUIRE((router.routing().token_offsets[t + 1] > router.routing().token_offsets[t]) == run[std::size_t(t)]);
    }
  REQUIRE(router.loss_values()[0] == Approx(bce / 9).epsilon(1e-12));
  REQUIRE(router.routing().num_slots() == 3);  // ceil(0.25 * 9)
  // evaluation: each real token by its own predictor logit, >= 0 runs
  router.set_training(false);
  const auto& e = router.forward(x, tokens);
  for (Index t = 0; t < T; ++t)
    REQUIRE((e.token_offsets[t + 1] > e.token_offsets[t]) == (is_valid(valid, t) && router.logits()(t, 1) >= 0));
  REQUIRE(e.capacity == -1);
  // the predictor logit at exactly 0 runs the block
  router.scorer().for_each_parameter([&](std::string_view name, auto value, auto) {
    if (name == "predictor.w2" || name == "predictor.b2") value.setZero();
  });
  REQUIRE(router.forward(x, tokens).num_slots() == 9);
}

TEST_CASE("MindSkip: a sigmoid of the segment mean, the block runs from 0.5 on, y = x + m f(x)", "[depth][mindskip]") {
  const Index T = 12, D = 5, H = 6;
  const Segments seg{0, 0, 0, 0, 1, 1, 1, 4, 4, 4, 4, 4};
  const Mask valid{1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = seg};
  const Matrix<double> x = random_matrix<double>(T, D, 23);
  for (const auto pooling : {moe::DepthPooling::segment_mean, moe::DepthPooling::token})
    for (const bool training : {true, false}) {
      INFO("segment pooling " << (pooling == moe::DepthPooling::segment_mean) << ", training " << training);
      moe::MoELayer layer(moe::make_mindskip_router<double>(D, pooling, 0.0, std::nullopt, 8), moe::FFNExperts<double>(1, D, H));
      layer.router().set_training(training);
      Matrix<double> y(T, D);
      layer.forward(x, y, tokens);
      auto params = parameters(layer);
      auto r = router_scores(x, params.at("router.weight"));
      if (pooling == moe::DepthPooling::segment_mean) r = segment_means(r, seg, valid, true);  // padding rows counted
      std::vector<bool> m(T);
      std::vector<double> ones(T, 1.0);
      for (Index t = 0; t < T; ++t) m[std::size_t(t)] = is_valid(valid, t) && sigmoid(r[std::size_t(t)]) >= 0.5;
      const Matrix<double> f = ffn(x, params.at("experts.w1"), params.at("experts.w2"));
      require_close(y, skip_layer_oracle(x, f, m, ones), 1e-12);
      // masked form: in training every real token runs, weighted 0 or 1; in evaluation only m = 1
      const auto& routing = layer.routing();
      Index expect = 0;
      for (Index t = 0; t < T; ++t) expect += training ? Index(is_valid(valid, t)) : Index(m[std::size_t(t)]);
      REQUIRE(routing.num_slots() == expect);
      for (Index s = 0; s < routing.num_slots(); ++s)
        REQUIRE(routing.slot_weight[s] == (m[std::size_t(routing.slot_token[s])] ? 1.0 : 0.0));
      if (pooling == moe::DepthPooling::segment_mean)  // one decision per segment
        for (auto [b, e] : runs(seg, T))
          for (Index t = b + 1; t < e; ++t)
            if (is_valid(valid, t) && is_valid(valid, b)) REQUIRE(m[std::size_t(t)] == m[std::size_t(b)]);
    }
  // a score of exactly 0.5 runs the block
  moe::MoELayer layer(moe::make_mindskip_router<double>(D), moe::IdentityExperts<double>(1, D));
  parameters(layer).at("router.weight").setZero();
  layer.router().set_training(false);
  Matrix<double> y(T, D);
  layer.forward(x, y, tokens);
  REQUIRE(layer.routing().num_slots() == 9);
  REQUIRE(layer.router().scores()(0, 0) == 0.5);
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < D; ++j) REQUIRE(y(t, j) == (is_valid(valid, t) ? 2 * x(t, j) : x(t, j)));
}

TEST_CASE("MindSkip: straight-through gradients match the surrogate's finite differences", "[depth][mindskip][gradient]") {
  // The estimator's gradient is the exact gradient of the surrogate in which each 0/1 decision m
  // is replaced by m + sigma(r) - sigma(r0), r0 the score at the point of evaluation: same value
  // there, derivative sigma'(r) dr. Written here from the math, with the capacity loss
  // lambda * mean of the decisions (per segment, or per token).
  const Index T = 10, D = 4, H = 5;
  const Segments seg{0, 0, 0, 2, 2, 2, 2, 3, 3, 3};
  const Mask valid{1, 1, 1, 1, 0, 1, 1, 1, 1, 0};
  const moe::TokenInputs<double> tokens{.valid = valid, .segment = seg};
  const Matrix<double> R = random_matrix<double>(T, D, 29);
  const double lambda = 0.3;
  for (const auto pooling : {moe::DepthPooling::segment_mean, moe::DepthPooling::token})
    for (const auto form : {moe::SkipForm::masked, moe::SkipForm::skipped}) {
      INFO("segment pooling " << (pooling == moe::DepthPooling::segment_mean) << ", skipped form " << (form == moe::SkipForm::skipped));
      const bool per_segment = pooling == moe::DepthPooling::segment_mean;
      Matrix<double> x = random_matrix<double>(T, D, 31);
      moe::MoELayer layer(moe::MindSkipRouter<double>(moe::DepthScorer<double>(D, {.pooling = pooling, .router = {.seed = 6}}),
                                                      moe::SigmoidGate<double>{}, moe::DepthThresholdSelector<double>({.form = form}),
                                                      moe::SkipCapacityLoss<double>(lambda, {.per_segment = per_segment})),
                          moe::FFNExperts<double>(1, D, H));
      Matrix<double> y(T, D), dx(T, D);
      layer.forward(x, y, tokens);
      REQUIRE(layer.routing().num_slots() > 0);
      moe::zero_grad(layer);
      layer.backward(R, dx);
      const auto grads = gradients(layer);
      auto params = parameters(layer);
      Eigen::Ref<Matrix<double>> w = params.at("router.weight"), w1 = params.at("experts.w1"), w2 = params.at("experts.w2");
      const auto scores = [&] {
        auto r = router_scores(x, w);
        if (per_segment) r = segment_means(r, seg, valid, false);
        for (double& v : r) v = sigmoid(v);
        return r;
      };
      const std::vector<double> p0 = scores();
      const auto surrogate = [&] {
        const auto p = scores();
        const Matrix<double> f = ffn(x, w1, w2);
        double sum = 0, cap = 0;
        std::vector<double> mt(T, 0.0);
        for (Index t = 0; t < T; ++t) {
          const auto i = std::size_t(t);
          if (!is_valid(valid, t)) continue;
          const double m = (p0[i] >= 0.5 ? 1.0 : 0.0) + p[i] - p0[i];
          mt[i] = m;
          // the skipped form never runs a skipped token's block: nothing reaches it from the task
          if (p0[i] >= 0.5 || form == moe::SkipForm::masked) sum += m * f.row(t).dot(R.row(t));
        }
        sum += x.cwiseProduct(R).sum();
        if (per_segment) {
          int segments = 0;
          for (auto [b, e] : runs(seg, T)) {
            double s = 0;
            int n = 0;
            for (Index t = b; t < e; ++t)
              if (is_valid(valid, t)) s += mt[std::size_t(t)], ++n;
            if (n) cap += s / n, ++segments;
          }
          cap /= segments;
        } else {
          cap = std::accumulate(mt.begin(), mt.end(), 0.0) / 8;
        }
        return sum + lambda * cap;
      };
      require_gradient_close(dx, numeric_gradient(x, surrogate));
      require_gradient_close(grads.at("router.weight"), numeric_gradient(w, surrogate));
      require_gradient_close(grads.at("experts.w1"), numeric_gradient(w1, surrogate));
      require_gradient_close(grads.at("experts.w2"), numeric_gradient(w2, surrogate));
    }
}

TEST_CASE("MindSkip: the capacity loss in both forms", "[depth][mindskip]") {
  const Index T = 8, D = 3;
  const Segments seg{0, 0, 0, 1, 1, 2, 2, 2};
  const moe::TokenInputs<double> tokens{.segment = seg};
  Matrix<double> x = random_matrix<double>(T, D, 37);
  auto router = moe::make_mindskip_router<double>(D, moe::DepthPooling::segment_mean, 2.0, 0.25);
  router.forward(x, tokens);
  double cap = 0;
  for (auto [b, e] : runs(seg, T)) cap += router.scores()(b, 0) >= 0.5 ? 1.0 : 0.0;
  cap /= 3;
  REQUIRE(router.loss_values()[0] == Approx(std::max(cap - 0.25, 0.0)).margin(1e-15));
  // the original form, per token: the share of tokens that run
  auto tokenwise = moe::make_mindskip_router<double>(D, moe::DepthPooling::token, 2.0);
  tokenwise.forward(x, tokens);
  double share = 0;
  for (Index t = 0; t < T; ++t) share += tokenwise.scores()(t, 0) >= 0.5 ? 1.0 / T : 0.0;
  REQUIRE(tokenwise.loss_values()[0] == Approx(share).margin(1e-15));
  {  // at or below the target nothing is trained: d loss / d logits = 0
    auto capped = moe::make_mindskip_router<double>(D, moe::DepthPooling::token, 2.0, 1.0);
    capped.forward(x, tokens);
    const std::vector<double> dw(std::size_t(capped.routing().num_slots()), 0.0);
    const Matrix<double>& dlogits = capped.backward_logits(tokens, dw);
    REQUIRE(dlogits.isZero(0));
  }
}

TEST_CASE("depth routing: T = 0, all padding, short segments, logits of +-1e3", "[depth]") {
  const Index D = 4;
  {
    moe::MoELayer layer(moe::make_depth_router<float>(D), moe::FFNExperts<float>(1, D, 3));
    Matrix<float> x(0, D), y(0, D), dx(0, D);
    layer.forward(x, y);
    layer.backward(y, dx);
    REQUIRE(layer.routing().num_slots() == 0);
  }
  {  // all padding: nothing runs, y = x
    const Index T = 6;
    const Mask none(T, 0);
    const Matrix<float> x = random_matrix<float>(T, D, 41);
    moe::MoELayer layer(moe::make_depth_router<float>(D), moe::FFNExperts<float>(1, D, 3));
    moe::MoELayer skip(moe::make_mindskip_router<float>(D), moe::FFNExperts<float>(1, D, 3));
    Matrix<float> y(T, D), y2(T, D), dx(T, D);
    layer.forward(x, y, {.valid = none});
    skip.forward(x, y2, {.valid = none});
    REQUIRE(layer.routing().num_slots() == 0);
    REQUIRE(skip.routing().num_slots() == 0);
    REQUIRE(y == x);
    REQUIRE(y2 == x);
    layer.backward(x, dx);
    REQUIRE(dx == x);  // the skip path alone
  }
  {  // a C in slots larger than a segment: all its real tokens run, or a named error
    const Index T = 7;
    const Segments seg{0, 0, 0, 0, 0, 1, 1};
    const Matrix<double> x = random_matrix<double>(T, D, 43);
    const auto make = [&](moe::ShortSegment rule) {
      return moe::Router(moe::DepthScorer<double>(D), moe::IdentityGate<double>{},
                         moe::DepthTopCSelector<double>({.capacity = {.slots = 3}, .short_segment = rule}));
    };
    auto lenient = make(moe::ShortSegment::run_all);
    const auto& r = lenient.forward(x, {.segment = seg});
    REQUIRE(r.num_slots() == 5);
    REQUIRE(slots_in(lenient, 5, 7) == 2);
    REQUIRE(r.capacity == 5);
    auto strict = make(moe::ShortSegment::error);
    REQUIRE_THROWS_AS(strict.forward(x, {.segment = seg}), moe::value_error);
    REQUIRE(strict.forward(x.topRows(5), {.segment = std::span(seg).first(5)}).num_slots() == 3);
  }
  {  // +-1e3 scores: finite outputs, the order still exact
    const Index T = 64;
    Matrix<float> x = random_matrix<float>(T, D, 47, 1e3);
    moe::MoELayer layer(moe::make_depth_router<float>(D, 0.125), moe::IdentityExperts<float>(1, D));
    moe::MoELayer skip(moe::make_mindskip_router<float>(D, moe::DepthPooling::token), moe::IdentityExperts<float>(1, D));
    Matrix<float> y(T, D);
    layer.forward(x, y);
    REQUIRE(y.allFinite());
    REQUIRE(layer.routing().num_slots() == 8);
    const auto& logits = layer.router().logits();
    float lowest_run = INFINITY, highest_skipped = -INFINITY;
    const auto& rt = layer.routing();
    for (Index t = 0; t < T; ++t)
      (rt.token_offsets[t + 1] > rt.token_offsets[t] ? lowest_run = std::min(lowest_run, logits(t, 0))
                                                     : highest_skipped = std::max(highest_skipped, logits(t, 0)));
    REQUIRE(lowest_run >= highest_skipped);
    skip.forward(x, y);
    REQUIRE(y.allFinite());
    const auto& scores = skip.router().scores();
    REQUIRE((scores.array() >= 0 && scores.array() <= 1).all());
    REQUIRE(skip.routing().num_slots() > 0);
  }
}

TEST_CASE("depth routing: bad configuration and input get named errors, nothing written", "[depth][errors]") {
  const Index T = 6, D = 4;
  REQUIRE_THROWS_AS(moe::DepthTopCSelector<float>({.capacity = {.factor = 0.0, .multiple_of = 1}}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthTopCSelector<float>({.capacity = {.factor = 1.5, .multiple_of = 1}}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthTopCSelector<float>({.capacity = {.slots = -1}}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthThresholdSelector<float>({.threshold = NAN}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthScorer<float>(D, {.predictor_hidden = -1}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthScorer<float>(D, {.pool_padding = moe::Padding::megatron}), moe::config_error);
  REQUIRE_THROWS_AS(moe::SkipCapacityLoss<float>(1.0f, {.target = 1.5}), moe::config_error);
  REQUIRE_THROWS_AS(moe::DepthPredictorLoss<float>(-1.0f), moe::config_error);
  REQUIRE_THROWS_AS(moe::make_depth_router<float>(0), moe::config_error);
  // segment ids out of order or negative: named, and neither y nor the routing is touched
  const Matrix<float> x = random_matrix<float>(T, D, 53);
  for (const bool mindskip : {false, true}) {
    const auto check = [&](auto layer) {
      Matrix<float> y(T, D);
      layer.forward(x, y, {.segment = Segments{0, 0, 1, 1, 2, 2}});
      const Matrix<float> y_before = y;
      const auto slots = layer.routing().slot_token;
      for (const Segments& bad : {Segments{0, 0, 2, 1, 2, 2}, Segments{-1, -1, 0, 0, 0, 0}}) {
        try {
          layer.forward(x, y, {.segment = bad});
          FAIL("no error");
        } catch (const moe::value_error& e) {
          REQUIRE(std::string(e.what()).find("tokens.segment") != std::string::npos);
        }
        REQUIRE(y == y_before);
        REQUIRE(layer.routing().slot_token == slots);
      }
    };
    if (mindskip) check(moe::MoELayer(moe::make_mindskip_router<float>(D), moe::FFNExperts<float>(1, D, 3)));
    else check(moe::MoELayer(moe::make_depth_router<float>(D, 0.5), moe::FFNExperts<float>(1, D, 3)));
  }
}

TEST_CASE("for_each_segment: runs of equal ids, in any order, across its 16-id chunks", "[depth][core]") {
  const auto collect = [](const Segments& seg, Index rows) {
    std::vector<std::pair<Index, Index>> out;
    moe::for_each_segment(seg, rows, [&](Index b, Index e) { out.emplace_back(b, e); });
    return out;
  };
  using Runs = std::vector<std::pair<Index, Index>>;
  REQUIRE(collect({7, 7, 3, 3, 3, 9}, 6) == Runs{{0, 2}, {2, 5}, {5, 6}});
  REQUIRE(collect({}, 5) == Runs{{0, 5}});
  REQUIRE(collect({}, 0).empty());
  Segments long_runs(40, 1);
  std::fill(long_runs.begin() + 17, long_runs.end(), 4);
  long_runs[39] = 0;
  REQUIRE(collect(long_runs, 40) == Runs{{0, 17}, {17, 39}, {39, 40}});
}
