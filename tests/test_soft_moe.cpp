// Soft MoE (SoftMoERouter: NormalizedSlotsScorer, IdentityGate, SoftSlotsSelector, and the
// layer's soft path), each checked against an oracle written from the math in docs/routers.md
// (not from the code under test): the logits, the two softmaxes, the layer output with identity
// and FFN experts, finite-difference gradients in double, the edge cases (T = 0, all padding,
// logits of +-1e3 over a long sequence) and the bad-input contract.
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe_test;

namespace {

using Mask = std::vector<std::uint8_t>;
bool is_valid(const Mask& valid, Index t) { return valid.empty() || valid[std::size_t(t)]; }

// v / sqrt(|v|^2 + 1e-6), row by row.
Matrix<double> normalize_rows(const Matrix<double>& m) {
  Matrix<double> out = m;
  for (Index i = 0; i < m.rows(); ++i) out.row(i) /= std::sqrt(m.row(i).squaredNorm() + 1e-6);
  return out;
}

// logits[t, s] = scale <x_t / |x_t|, phi_s / |phi_s|> (phi's columns are the slots)
Matrix<double> logits_oracle(const Matrix<double>& x, const Matrix<double>& phi, double scale) {
  const Matrix<double> phi_t = phi.transpose();
  return scale * normalize_rows(x) * normalize_rows(phi_t).transpose();
}

// dispatch [S, T]: per slot, softmax over the real tokens; combine [T, S]: per real token,
// softmax over the slots; 0 elsewhere.
void softmaxes_oracle(const Matrix<double>& logits, const Mask& valid, Matrix<double>& dispatch, Matrix<double>& combine) {
  const Index T = logits.rows(), N = logits.cols();
  dispatch.setZero(N, T);
  combine.setZero(T, N);
  for (Index s = 0; s < N; ++s) {
    double top = -INFINITY, z = 0;
    for (Index t = 0; t < T; ++t)
      if (is_valid(valid, t)) top = std::max(top, logits(t, s));
    for (Index t = 0; t < T; ++t)
      if (is_valid(valid, t)) z += std::exp(logits(t, s) - top);
    for (Index t = 0; t < T; ++t)
      if (is_valid(valid, t)) dispatch(s, t) = std::exp(logits(t, s) - top) / z;
  }
  for (Index t = 0; t < T; ++t)
    if (is_valid(valid, t)) {
      const double top = logits.row(t).maxCoeff();
      double z = 0;
      for (Index s = 0; s < N; ++s) z += std::exp(logits(t, s) - top);
      for (Index s = 0; s < N; ++s) combine(t, s) = std::exp(logits(t, s) - top) / z;
    }
}

double gelu(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }

// y = combine f(dispatch x), f_e applied to expert e's p slot rows: identity, or
// gelu(x W1_e) W2_e with W1 = w1 rows [e D, (e+1) D), W2 = w2 rows [e H, (e+1) H).
Matrix<double> layer_oracle(const Matrix<double>& x, const Matrix<double>& dispatch, const Matrix<double>& combine,
                            Index E, const Matrix<double>* w1 = nullptr, const Matrix<double>* w2 = nullptr) {
  const Matrix<double> slots_in = dispatch * x;
  Matrix<double> slots_out = slots_in;
  if (w1) {
    const Index D = x.cols(), H = w1->cols(), p = slots_in.rows() / E;
    for (Index e = 0; e < E; ++e) {
      Matrix<double> h = slots_in.middleRows(e * p, p) * w1->middleRows(e * D, D);
      h = h.unaryExpr([](double v) { return gelu(v); });
      slots_out.middleRows(e * p, p) = h * w2->middleRows(e * H, H);
    }
  }
  return combine * slots_out;
}

}  // namespace

TEST_CASE("soft MoE: logits, dispatch and combine match the oracle", "[soft_moe]") {
  const Index T = 7, D = 5, E = 3, p = 2;
  for (const Mask& valid : {Mask{}, Mask{1, 0, 1, 1, 0, 1, 1}}) {
    auto router = moe::make_soft_moe_router<double>(D, E, p, 3);
    router.scorer().scale() = 2.5;
    const Matrix<double> x = random_matrix<double>(T, D, 11, 3.0);
    const moe::TokenInputs<double> tokens{.valid = valid};
    const auto& r = router.forward(x, tokens);
    REQUIRE(router.num_experts() == E);
    REQUIRE(router.logit_columns() == E * p);
    const Matrix<double> logits = logits_oracle(x, router.scorer().phi(), 2.5);
    require_close(router.logits(), logits, forward_tol<double>(D) * 4);
    Matrix<double> dispatch, combine;
    softmaxes_oracle(logits, valid, dispatch, combine);
    require_close(r.dispatch, dispatch, 1e-12);
    require_close(r.combine, combine, 1e-12);
    REQUIRE(r.num_tokens == T);
    REQUIRE(r.num_experts == E);
    REQUIRE(r.slots_per_expert == p);
    REQUIRE(r.num_slots() == E * p);
    REQUIRE(r.num_valid_tokens == (valid.empty() ? T : 5));
    REQUIRE(r.expert_offsets == std::vector<Index>{0, 2, 4, 6});
    // each dispatch row (a slot) sums to 1 over the real tokens, each real combine row to 1
    for (Index s = 0; s < E * p; ++s) REQUIRE(std::abs(r.dispatch.row(s).sum() - 1) < 1e-12);
    for (Index t = 0; t < T; ++t) {
      REQUIRE(std::abs(r.combine.row(t).sum() - (is_valid(valid, t) ? 1.0 : 0.0)) < 1e-12);
      if (!is_valid(valid, t)) REQUIRE(r.dispatch.col(t).isZero(0));
    }
  }
}

TEST_CASE("soft MoE: the scorer normalises as the reference and initialises scale to 1", "[soft_moe]") {
  const moe::NormalizedSlotsScorer<double> scorer(6, 4, 3, {.seed = 9});
  REQUIRE(scorer.scale() == 1.0);
  REQUIRE(scorer.phi().rows() == 6);
  REQUIRE(scorer.phi().cols() == 12);
  // LeCun normal of a [D, E, p] array: |entries| within two standard deviations 1/sqrt(D E)/0.8796
  const double bound = 2.0 / std::sqrt(24.0) / 0.87962566103423978;
  REQUIRE(scorer.phi().cwiseAbs().maxCoeff() <= bound);
  // a zero token gets logits 0 (the 1e-6 under the root), not NaN
  auto router = moe::make_soft_moe_router<double>(6, 4, 3);
  Matrix<double> x = random_matrix<double>(3, 6, 1);
  x.row(1).setZero();
  router.forward(x);
  REQUIRE(router.logits().row(1).isZero(0));
  REQUIRE(router.routing().combine.allFinite());
}

TEST_CASE("soft MoE layer: y matches the oracle with identity and FFN experts", "[soft_moe][layer]") {
  const Index T = 9, D = 6, E = 3, p = 2, H = 5;
  for (const Mask& valid : {Mask{}, Mask{1, 1, 0, 1, 1, 1, 0, 1, 1}}) {
    const moe::TokenInputs<double> tokens{.valid = valid};
    const Matrix<double> x = random_matrix<double>(T, D, 21);
    {
      moe::MoELayer layer(moe::make_soft_moe_router<double>(D, E, p, 1), moe::IdentityExperts<double>(E, D));
      Matrix<double> y(T, D);
      layer.forward(x, y, tokens);
      Matrix<double> dispatch, combine;
      softmaxes_oracle(logits_oracle(x, layer.router().scorer().phi(), 1.0), valid, dispatch, combine);
      require_close(y, layer_oracle(x, dispatch, combine, E), 1e-12);
      for (Index t = 0; t < T; ++t)
        if (!is_valid(valid, t)) REQUIRE(y.row(t).isZero(0));  // padding: combine row 0, y 0
    }
    {
      moe::MoELayer layer(moe::make_soft_moe_router<double>(D, E, p, 2), moe::FFNExperts<double>(E, D, H));
      layer.router().scorer().scale() = 3.0;
      Matrix<double> y(T, D);
      layer.forward(x, y, tokens);
      Matrix<double> dispatch, combine;
      softmaxes_oracle(logits_oracle(x, layer.router().scorer().phi(), 3.0), valid, dispatch, combine);
      auto params = parameters(layer);
      const Matrix<double> w1 = params.at("experts.w1"), w2 = params.at("experts.w2");
      require_close(y, layer_oracle(x, dispatch, combine, E, &w1, &w2), 1e-12);
    }
  }
}

TEST_CASE("soft MoE layer: gradients by finite differences in double", "[soft_moe][gradient]") {
  const Index T = 7, D = 5, E = 3, p = 2, H = 4;
  for (const Mask& valid : {Mask{}, Mask{1, 0, 1, 1, 1, 0, 1}}) {
    const moe::TokenInputs<double> tokens{.valid = valid};
    Matrix<double> x = random_matrix<double>(T, D, 31);
    const Matrix<double> R = random_matrix<double>(T, D, 32);
    const auto check = [&](auto layer) {
      layer.router().scorer().scale() = 1.7;
      const auto grads = check_layer_gradients(layer, x, R, tokens);
      REQUIRE(grads.count("router.phi") == 1);
      REQUIRE(grads.at("router.scale")(0, 0) != 0.0);
    };
    check(moe::MoELayer(moe::make_soft_moe_router<double>(D, E, p, 4), moe::IdentityExperts<double>(E, D)));
    check(moe::MoELayer(moe::make_soft_moe_router<double>(D, E, p, 5), moe::FFNExperts<double>(E, D, H)));
  }
}

TEST_CASE("soft MoE router: backward by the dispatch and combine gradients alone", "[soft_moe][gradient]") {
  // L = sum(dispatch * A) + sum(combine * B): the router's backward takes A and B
  const Index T = 6, D = 4, E = 2, p = 3;
  auto router = moe::make_soft_moe_router<double>(D, E, p, 6);
  Matrix<double> x = random_matrix<double>(T, D, 41);
  const Matrix<double> A = random_matrix<double>(E * p, T, 42), B = random_matrix<double>(T, E * p, 43);
  const auto loss = [&] {
    const auto& r = router.forward(x);
    return r.dispatch.cwiseProduct(A).sum() + r.combine.cwiseProduct(B).sum();
  };
  loss();
  moe::zero_grad(router);
  Matrix<double> dx(T, D);
  router.backward(x, {}, A, B, dx);
  require_gradient_close(dx, numeric_gradient(x, loss));
  Matrix<double> dphi, dscale;
  router.for_each_parameter([&](std::string_view name, auto, auto grad) { (name == "router.phi" ? dphi : dscale) = grad; });
  require_gradient_close(dphi, numeric_gradient(router.scorer().phi(), loss));
  Eigen::Map<Matrix<double>> scale(&router.scorer().scale(), 1, 1);
  require_gradient_close(dscale, numeric_gradient(scale, loss));
}

TEST_CASE("soft MoE: logits of +-1e3 over a long sequence stay finite", "[soft_moe]") {
  const Index T = 5000, D = 8, E = 4;
  auto router = moe::make_soft_moe_router<float>(D, E, 2);
  router.scorer().scale() = 1000.0f;  // logits in [-1e3, 1e3]
  const Matrix<float> x = random_matrix<float>(T, D, 51);
  const auto& r = router.forward(x);
  REQUIRE(r.dispatch.allFinite());
  REQUIRE(r.combine.allFinite());
  for (Index s = 0; s < r.num_slots(); ++s) REQUIRE(std::abs(r.dispatch.row(s).sum() - 1.0f) < 1e-4f);
  for (Index t = 0; t < T; ++t) REQUIRE(std::abs(r.combine.row(t).sum() - 1.0f) < 1e-4f);
  // the same through the route entry point, on logits given directly
  Matrix<float> logits = random_matrix<float>(T, E * 2, 52);
  logits.col(0).setConstant(1000.0f);
  logits(3, 1) = -1000.0f;
  const auto& r2 = router.route(logits);
  REQUIRE(r2.dispatch.allFinite());
  REQUIRE(r2.combine.allFinite());
  REQUIRE(std::abs(r2.dispatch(0, 0) - 1.0f / float(T)) < 1e-6f);  // a constant column: uniform
  moe::MoELayer layer(moe::make_soft_moe_router<float>(D, E, 2), moe::FFNExperts<float>(E, D, 6));
  layer.router().scorer().scale() = -1000.0f;
  Matrix<float> y(T, D), dx(T, D);
  layer.forward(x, y);
  layer.backward(y, dx);
  REQUIRE(y.allFinite());
  REQUIRE(dx.allFinite());
}

TEST_CASE("soft MoE: T = 0 and an all-padding batch", "[soft_moe]") {
  const Index D = 4, E = 3, H = 5;
  moe::MoELayer layer(moe::make_soft_moe_router<double>(D, E, 2), moe::FFNExperts<double>(E, D, H));
  Matrix<double> x(0, D), y(0, D), dx(0, D);
  layer.forward(x, y);
  REQUIRE(layer.routing().num_tokens == 0);
  REQUIRE(layer.routing().dispatch.rows() == 6);
  REQUIRE(layer.routing().dispatch.cols() == 0);
  layer.backward(y, dx);
  // all padding: every weight 0, y = 0, no gradient
  const Index T = 5;
  const Mask none(std::size_t(T), 0);
  const moe::TokenInputs<double> tokens{.valid = none};
  x = random_matrix<double>(T, D, 61);
  y.resize(T, D);
  dx.resize(T, D);
  layer.forward(x, y, tokens);
  REQUIRE(layer.routing().num_valid_tokens == 0);
  REQUIRE(layer.routing().dispatch.isZero(0));
  REQUIRE(layer.routing().combine.isZero(0));
  REQUIRE(y.isZero(0));
  moe::zero_grad(layer);
  layer.backward(random_matrix<double>(T, D, 62), dx);
  REQUIRE(dx.isZero(0));
  for (const auto& [name, grad] : gradients(layer)) REQUIRE(grad.isZero(0));
}

TEST_CASE("soft MoE: slots from a capacity factor as the reference rounds them", "[soft_moe]") {
  REQUIRE(moe::soft_moe_slots_per_expert(196, 128, 1.0) == 2);   // 1.53 -> 2
  REQUIRE(moe::soft_moe_slots_per_expert(196, 256, 1.0) == 1);   // 0.77 -> 1
  REQUIRE(moe::soft_moe_slots_per_expert(20, 8, 1.0) == 2);      // 2.5 -> 2: ties to even
  REQUIRE(moe::soft_moe_slots_per_expert(28, 8, 1.0) == 4);      // 3.5 -> 4
  REQUIRE_THROWS_AS(moe::soft_moe_slots_per_expert(10, 32, 1.0), moe::config_error);  // 0.31 -> 0
  REQUIRE_THROWS_AS(moe::soft_moe_slots_per_expert(10, 2, 0.0), moe::config_error);
}

TEST_CASE("soft MoE: bad configuration and input get named errors, nothing written", "[soft_moe][errors]") {
  REQUIRE_THROWS_AS(moe::make_soft_moe_router<float>(8, 4, 0), moe::config_error);
  REQUIRE_THROWS_AS(moe::make_soft_moe_router<float>(8, 0, 1), moe::config_error);
  REQUIRE_THROWS_AS(moe::SoftSlotsSelector<float>(-1), moe::config_error);
  // a selector whose slots do not match the scorer's columns
  REQUIRE_THROWS_AS(moe::Router(moe::NormalizedSlotsScorer<float>(8, 4, 2), moe::IdentityGate<float>{},
                                moe::SoftSlotsSelector<float>(3)),
                    moe::shape_error);
  const Index T = 6, D = 4, E = 2;
  moe::MoELayer layer(moe::make_soft_moe_router<double>(D, E, 2), moe::FFNExperts<double>(E, D, 3));
  const Matrix<double> x = random_matrix<double>(T, D, 71);
  Matrix<double> y(T, D);
  layer.forward(x, y);
  const Matrix<double> dispatch = layer.routing().dispatch;
  Matrix<double> y_bad = Matrix<double>::Constant(T, D, 7.0);
  Matrix<double> x_nan = x;
  x_nan(2, 1) = NAN;
  REQUIRE_THROWS_AS(layer.forward(x_nan, y_bad), moe::value_error);
  const Matrix<double> wide = random_matrix<double>(T, D + 1, 72);
  Matrix<double> y_wide = Matrix<double>::Constant(T, D, 7.0);
  REQUIRE_THROWS_AS(layer.forward(wide, y_wide), moe::shape_error);
  const Mask short_mask(3, 1);
  REQUIRE_THROWS_AS(layer.forward(x, y_bad, {.valid = short_mask}), moe::shape_error);
  REQUIRE(y_bad.isConstant(7.0));
  REQUIRE(y_wide.isConstant(7.0));
  REQUIRE(layer.routing().dispatch == dispatch);  // the last good routing stays
  // the router's backward: gradients of the wrong shapes
  Matrix<double> dx = Matrix<double>::Constant(T, D, 7.0);
  const Matrix<double> A(E * 2, T + 1), B(T, E * 2);
  REQUIRE_THROWS_AS(layer.router().backward(x, {}, A, B, dx), moe::shape_error);
  REQUIRE(dx.isConstant(7.0));
  // logits given to route with the wrong number of columns
  auto router = moe::make_soft_moe_router<double>(D, E, 2);
  const Matrix<double> logits(T, E);
  REQUIRE_THROWS_AS(router.route(logits), moe::shape_error);
}
