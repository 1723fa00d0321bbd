// moe::MoELayer (docs/architecture.md) with FFN (ReLU, GELU) and SwiGLU experts and an optional
// shared expert, over the presets and custom routers of docs/routers.md and docs/selectors.md:
//   1. forward vs an oracle written from the math (float and double)
//   2. finite-difference gradients in double of L = <y, R> + aux for x and every parameter
//   3. routing invariants, masked tokens, determinism, T = 0
//   4. no allocation in steady state (operator new and Eigen's heap both counted)
//   5. bad input: the error, its message, and untouched outputs and state
//   6. training sanity with Adam
#include "alloc_counter.hpp"  // first: it hooks Eigen's allocator before Eigen is included

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "support.hpp"

using namespace moe_test;
using moe::Activation;
using moe::BalanceNorm;
using moe::Capacity;
using moe::OverflowOrder;
using moe::SlotOrder;
using moe::Weighting;
using Catch::Matchers::Contains;

namespace {

// ================================================================================================
// 0. Building blocks: shapes, routers, layers, the oracle
// ================================================================================================

struct Shape {
  Index tokens, dim, experts, hidden, k;
};

// The custom routers of the matrix: every gate with the dynamic-k selector and both aux losses.
template <class S, class Gate>
using CustomRouter = moe::Router<moe::LinearScorer<S>, Gate, moe::TopKSelector<S>,
                                 moe::LoadBalanceLoss<S>, moe::ZLoss<S>>;

// Large enough that a wrong aux-loss gradient stands far above the FD tolerance.
constexpr double balance_coefficient = 0.3;
constexpr double z_coefficient = 0.05;
constexpr double deepseek_scale = 2.5;  // DeepSeek-V3 route_scale: the sigmoid router uses it

template <class S, class Gate>
CustomRouter<S, Gate> make_custom_router(const Shape& s, Weighting weighting, Capacity capacity,
                                         double scale, BalanceNorm norm, std::uint64_t seed) {
  moe::LinearScorer<S> scorer(s.dim, s.experts, {.bias = true, .init_scale = 1.0, .seed = seed});
  scorer.bias() = random_matrix<S>(1, s.experts, seed + 1, 0.3);  // a bias that matters
  return {std::move(scorer), Gate{},
          moe::TopKSelector<S>(s.k, {.weighting = weighting, .scale = scale, .capacity = capacity}),
          moe::LoadBalanceLoss<S>(norm, S(balance_coefficient)), moe::ZLoss<S>(S(z_coefficient))};
}

template <class S, class Gate>
auto make_custom_layer(const Shape& s, Weighting weighting, Capacity capacity, double scale,
                       BalanceNorm norm, std::uint64_t seed) {
  return moe::MoELayer(make_custom_router<S, Gate>(s, weighting, capacity, scale, norm, seed),
                       moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::gelu, seed + 2));
}

// The axes of the matrix (sections 2 and 3). Factor 0.75 gives E*C < 0.75 k T + E slots, fewer
// than the k T choices at these sizes, so every limited variant really drops.
struct CapacityVariant {
  const char* name;
  Capacity capacity;
};
const std::vector<CapacityVariant>& capacity_variants() {
  static const std::vector<CapacityVariant> v = {
      {"dropless", {}},
      {"drop rank_major",
       {.factor = 0.75, .overflow = OverflowOrder::rank_major, .slot_order = SlotOrder::priority}},
      {"drop token_major",
       {.factor = 0.75, .overflow = OverflowOrder::token_major, .slot_order = SlotOrder::token}},
      {"drop by_weight",
       {.factor = 0.75, .overflow = OverflowOrder::by_weight, .slot_order = SlotOrder::token}},
      {"drop batch_priority",
       {.factor = 0.75, .overflow = OverflowOrder::batch_priority, .slot_order = SlotOrder::priority}},
      {"pad", {.factor = 0.75, .pad = true, .overflow = OverflowOrder::by_weight}},
  };
  return v;
}
Capacity capacity_named(std::string_view name) {
  for (const auto& v : capacity_variants())
    if (name == v.name) return v.capacity;
  throw std::logic_error("no capacity variant " + std::string(name));
}
const std::vector<std::pair<const char*, Weighting>>& weightings() {
  static const std::vector<std::pair<const char*, Weighting>> v = {
      {"raw", Weighting::raw},
      {"renormalize_before_drop", Weighting::renormalize_before_drop},
      {"renormalize_after_drop", Weighting::renormalize_after_drop},
      {"softmax_of_kept_logits", Weighting::softmax_of_kept_logits},
  };
  return v;
}
constexpr BalanceNorm balance_norms[] = {BalanceNorm::switch_top1, BalanceNorm::topk_mean,
                                         BalanceNorm::megatron, BalanceNorm::flaxformer,
                                         BalanceNorm::fastmoe_balance};

// 1 = real token; every n-th token (from 1) is padding.
std::vector<std::uint8_t> mask_every(Index tokens, Index n) {
  std::vector<std::uint8_t> valid(std::size_t(tokens), 1);
  for (Index t = 1; t < tokens; t += n) valid[std::size_t(t)] = 0;
  return valid;
}

template <class S>
moe::TokenInputs<S> tokens_of(const std::vector<std::uint8_t>& valid) {
  return {.valid = valid};
}

template <class A, class B>
bool bit_identical(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), std::size_t(a.size()) * sizeof(*a.data())) == 0;
}

// Every parameter gradient of a model, copied in visit order.
template <class Model>
std::vector<Matrix<double>> gradients_of(Model& model) {
  std::vector<Matrix<double>> out;
  model.for_each_parameter([&](std::string_view, auto, auto grad) { out.emplace_back(grad.template cast<double>()); });
  return out;
}

// ---- the oracle: the experts' math written out (docs/experts.md), in double -------------------

enum class Kind { ffn_relu, ffn_gelu, swiglu };

double relu(double v) { return v > 0 ? v : 0; }
double gelu(double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }  // exact erf form
double silu(double v) { return v / (1 + std::exp(-v)); }

class ExpertsOracle {
public:
  // Weights are read by name through for_each_parameter: FFN w1 [E*D, H], w2 [E*H, D];
  // SwiGLU w_gate, w_up [E*D, H], w_down [E*H, D]; expert e owns the e-th row block.
  template <class Experts>
  ExpertsOracle(Experts& experts, Kind kind) : kind_(kind), dim_(experts.input_dim()) {
    experts.for_each_parameter([&](std::string_view name, auto value, auto) {
      w_.emplace(std::string(name), value.template cast<double>());
    });
    hidden_ = w_.at(kind == Kind::swiglu ? "experts.w_gate" : "experts.w1").cols();
  }

  Index dim() const { return dim_; }
  Index hidden() const { return hidden_; }

  // FFN: act(x W1_e) W2_e.  SwiGLU: (silu(x Wg_e) * (x Wu_e)) Wd_e.
  Eigen::RowVectorXd apply(Index e, const Eigen::RowVectorXd& x) const {
    Eigen::RowVectorXd out = Eigen::RowVectorXd::Zero(dim_);
    for (Index h = 0; h < hidden_; ++h) {
      double a;
      if (kind_ == Kind::swiglu) {
        const double g = project(x, "experts.w_gate", e, h), u = project(x, "experts.w_up", e, h);
        a = silu(g) * u;
      } else {
        const double pre = project(x, "experts.w1", e, h);
        a = kind_ == Kind::ffn_relu ? relu(pre) : gelu(pre);
      }
      const auto& w_out = w_.at(kind_ == Kind::swiglu ? "experts.w_down" : "experts.w2");
      for (Index j = 0; j < dim_; ++j) out[j] += a * w_out(e * hidden_ + h, j);
    }
    return out;
  }

  // Smallest |x W1_e| entry over the given (token, expert) pairs: how far ReLU's kink is.
  double kink_margin(const Matrix<double>& x, const std::vector<std::pair<Index, Index>>& pairs) const {
    double margin = INFINITY;
    for (const auto& [t, e] : pairs)
      for (Index h = 0; h < hidden_; ++h)
        margin = std::min(margin, std::abs(project(x.row(t), "experts.w1", e, h)));
    return margin;
  }

private:
  double project(const Eigen::RowVectorXd& x, const char* name, Index e, Index h) const {
    const auto& w = w_.at(name);
    double sum = 0;
    for (Index d = 0; d < dim_; ++d) sum += x[d] * w(e * dim_ + d, h);
    return sum;
  }

  Kind kind_;
  Index dim_, hidden_ = 0;
  std::map<std::string, Matrix<double>> w_;
};

// The kept (token, expert) pairs of a routing, from its per-token view.
template <class S>
std::vector<std::pair<Index, Index>> kept_pairs(const moe::SparseRouting<S>& r) {
  std::vector<std::pair<Index, Index>> out;
  for (Index t = 0; t < r.num_tokens; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      if (r.choice_slot[c] >= 0) out.emplace_back(t, r.choice_expert[c]);
  return out;
}

// y_t = sum over t's kept (expert e, weight w) of w f_e(x_t) (+ shared(x_t)). The pairs come from
// the routing's per-token view; each must agree with the per-expert view the layer computes on.
template <class S>
Matrix<double> oracle_forward(const moe::SparseRouting<S>& r, const Matrix<double>& x,
                              const ExpertsOracle& experts, const ExpertsOracle* shared) {
  Matrix<double> y = Matrix<double>::Zero(x.rows(), experts.dim());
  Index inconsistent = 0;
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) {
      const Index s = r.choice_slot[c], e = r.choice_expert[c];
      if (s < 0) continue;
      inconsistent += s < r.expert_offsets[e] || s >= r.expert_offsets[e + 1] || r.slot_token[s] != t;
      y.row(t) += double(r.slot_weight[s]) * experts.apply(e, x.row(t));
    }
    if (shared) y.row(t) += shared->apply(0, x.row(t));
  }
  INFO("choices whose slot is outside their expert or names another token");
  REQUIRE(inconsistent == 0);
  return y;
}

// Forward of `layer` on x (cast to the layer's scalar) against the oracle. The tolerance: a few
// roundings per term of the longest reduction chain (D, then H, then the k weighted outputs),
// relative to the output's size.
template <class Layer>
void check_forward_against_oracle(Layer& layer, Kind kind, const Matrix<double>& x64,
                                  const std::vector<std::uint8_t>& valid = {}) {
  using S = typename Layer::scalar_type;
  const Matrix<S> x = x64.cast<S>();
  Matrix<S> y(x.rows(), layer.output_dim());
  layer.forward(x, y, tokens_of<S>(valid));

  const ExpertsOracle experts(layer.experts(), kind);
  std::optional<ExpertsOracle> shared;
  if constexpr (Layer::has_shared) shared.emplace(layer.shared_expert(), kind);
  const auto& r = layer.routing();
  const Matrix<double> want =
      oracle_forward(r, x.template cast<double>(), experts, shared ? &*shared : nullptr);

  const Index k = moe::max_choices(r);
  const double tol = double(forward_tol<S>(x.cols() + experts.hidden() + k)) *
                     std::max(1.0, want.cwiseAbs().maxCoeff());
  const double err = (y.template cast<double>() - want).cwiseAbs().maxCoeff();
  INFO("max |y - oracle| = " << err << ", tolerance " << tol);
  REQUIRE(err <= tol);
  REQUIRE(want.cwiseAbs().maxCoeff() > 0);  // the comparison is not vacuous
}

// ---- gradient check harness -------------------------------------------------------------------

// The discrete part of a routing: equal before and after an FD step iff the step crossed no
// top-k or capacity decision (routing is piecewise constant).
template <class S>
bool same_decisions(const moe::SparseRouting<S>& a, const moe::SparseRouting<S>& b) {
  return a.choice_expert == b.choice_expert && a.choice_slot == b.choice_slot &&
         a.slot_token == b.slot_token && a.expert_offsets == b.expert_offsets;
}

// Central differences of L = <y, R> + aux (backward gets dy = R) for x and every parameter the
// layer visits, against the gradients backward accumulated from zero.
template <class Layer>
void check_gradients(Layer& layer, Matrix<double> x, const std::vector<std::uint8_t>& valid = {},
                     std::uint64_t seed = 99) {
  const auto tokens = tokens_of<double>(valid);
  const Matrix<double> R = random_matrix<double>(x.rows(), layer.output_dim(), seed);
  Matrix<double> y(x.rows(), layer.output_dim()), dx(x.rows(), x.cols());
  const auto loss = [&] {
    layer.forward(x, y, tokens);
    return y.cwiseProduct(R).sum() + double(layer.router().aux_loss());
  };

  moe::zero_grad(layer);
  loss();
  const auto base = layer.routing();  // a copy: the decisions every FD step must keep
  layer.backward(R, dx);
  const auto analytic = gradients_of(layer);

  Index flips = 0;
  const std::function<double()> f = [&] {
    const double l = loss();
    flips += !same_decisions(layer.routing(), base);
    return l;
  };
  const auto compare = [&](const std::string& name, const Matrix<double>& want, const Matrix<double>& numeric) {
    INFO("gradient of " << name);
    INFO("an FD step changed the routing: choose data with no decision within the step");
    REQUIRE(flips == 0);
    REQUIRE(numeric.cwiseAbs().maxCoeff() > 0);  // the perturbation reached the loss
    require_gradient_close(want, numeric);
  };

  compare("x", dx, numeric_gradient(x, f));
  std::size_t i = 0;
  layer.for_each_parameter([&](std::string_view name, auto value, auto) {
    Eigen::Map<Matrix<double>, 0, Eigen::OuterStride<>> p(value.data(), value.rows(), value.cols(),
                                                          Eigen::OuterStride<>(value.outerStride()));
    compare(std::string(name), analytic[i++], numeric_gradient(p, f));
  });
  REQUIRE(i == analytic.size());
}

// ================================================================================================
// 1. Forward vs the oracle
// ================================================================================================

TEMPLATE_TEST_CASE("forward: every expert type and preset matches the oracle", "[layer][forward]",
                   float, double) {
  using S = TestType;
  const Shape s{32, 16, 8, 24, 2};
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 1);

  SECTION("switch (top-1, drops) + ReLU FFN") {
    auto layer = moe::MoELayer(moe::make_switch_router<S>(s.dim, s.experts, 0.75, 11),
                               moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::relu, 12));
    check_forward_against_oracle(layer, Kind::ffn_relu, x);
    REQUIRE(layer.routing().num_dropped() > 0);
  }
  SECTION("gshard (top-2, drops, masked tokens) + GELU FFN") {
    auto layer = moe::MoELayer(moe::make_gshard_router<S>(s.dim, s.experts, 0.75, 13),
                               moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::gelu, 14));
    check_forward_against_oracle(layer, Kind::ffn_gelu, x, mask_every(s.tokens, 4));
    REQUIRE(layer.routing().num_dropped() > 0);
  }
  SECTION("top-k (dropless) + SwiGLU + shared SwiGLU") {
    auto layer = moe::MoELayer(moe::make_topk_router<S>(s.dim, s.experts, 3, 15),
                               moe::SwiGLUExperts<S>(s.experts, s.dim, s.hidden, 16),
                               moe::SwiGLUExperts<S>(1, s.dim, s.hidden, 17));
    check_forward_against_oracle(layer, Kind::swiglu, x);
  }
  SECTION("deepspeed top-k (by weight, min capacity) + GELU FFN + shared GELU FFN, masked tokens") {
    // masked tokens get the shared expert's output only
    auto layer = moe::MoELayer(moe::make_deepspeed_topk_router<S>(s.dim, s.experts, 3, 0.5, 6, 18),
                               moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::gelu, 19),
                               moe::FFNExperts<S>(1, s.dim, s.hidden, Activation::gelu, 20));
    check_forward_against_oracle(layer, Kind::ffn_gelu, x, mask_every(s.tokens, 5));
    REQUIRE(layer.routing().capacity == 6);  // max(ceil(3 * 0.5 * 25 / 8), 6): the minimum wins
    REQUIRE(layer.routing().num_dropped() > 0);
  }
}

TEST_CASE("forward/backward: strided user buffers give the same bits as contiguous ones",
          "[layer][forward]") {
  // docs/architecture.md: outputs are Eigen::Ref, so a block of a wider user matrix must work and
  // the columns around it must stay untouched.
  const Shape s{20, 6, 4, 8, 2};
  auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 3),
                             moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 4),
                             moe::FFNExperts<double>(1, s.dim, s.hidden, Activation::gelu, 5));
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 6);
  const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 7);
  Matrix<double> y(s.tokens, s.dim), dx(s.tokens, s.dim);
  layer.forward(x, y);
  layer.backward(dy, dx);

  constexpr double sentinel = -7.25;
  Matrix<double> wide_x = Matrix<double>::Constant(s.tokens, s.dim + 3, sentinel);
  Matrix<double> wide_dy = wide_x, wide_y = wide_x, wide_dx = wide_x;
  wide_x.middleCols(1, s.dim) = x;
  wide_dy.middleCols(2, s.dim) = dy;
  layer.forward(wide_x.middleCols(1, s.dim), wide_y.middleCols(2, s.dim));
  layer.backward(wide_dy.middleCols(2, s.dim), wide_dx.middleCols(1, s.dim));

  REQUIRE(bit_identical(Matrix<double>(wide_y.middleCols(2, s.dim)), y));
  REQUIRE(bit_identical(Matrix<double>(wide_dx.middleCols(1, s.dim)), dx));
  REQUIRE((wide_y.leftCols(2).array() == sentinel).all());
  REQUIRE((wide_y.rightCols(1).array() == sentinel).all());
  REQUIRE((wide_dx.leftCols(1).array() == sentinel).all());
  REQUIRE((wide_dx.rightCols(2).array() == sentinel).all());
}

// ================================================================================================
// 2. Gradients (double, central differences)
// ================================================================================================

// FD sizes: small enough that ~500 parameters x 2 forwards stay cheap.
constexpr Shape fd_shape{16, 6, 4, 8, 2};

template <class Gate>
void gradient_matrix(const char* gate, double scale) {
  std::uint64_t seed = 100;
  for (const auto& cap : capacity_variants())
    for (const auto& [wname, weighting] : weightings()) {
      const BalanceNorm norm = balance_norms[seed % std::size(balance_norms)];
      ++seed;
      DYNAMIC_SECTION(gate << " / " << wname << " / " << cap.name) {
        auto layer = make_custom_layer<double, Gate>(fd_shape, weighting, cap.capacity, scale, norm, seed);
        check_gradients(layer, random_matrix<double>(fd_shape.tokens, fd_shape.dim, seed + 3));
        REQUIRE((layer.routing().num_dropped() > 0) == cap.capacity.limited());
      }
    }
}

TEST_CASE("gradients: custom routers, every weighting x capacity x gate", "[layer][gradient]") {
  gradient_matrix<moe::SoftmaxGate<double>>("softmax", 1.0);
  gradient_matrix<moe::SigmoidGate<double>>("sigmoid", deepseek_scale);
  gradient_matrix<moe::SqrtSoftplusGate<double>>("sqrt-softplus", 1.0);
}

TEST_CASE("gradients: presets, expert types and the shared expert", "[layer][gradient]") {
  const Shape s = fd_shape;
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 31);

  SECTION("switch (top-1, drops) + ReLU FFN") {
    auto layer = moe::MoELayer(moe::make_switch_router<double>(s.dim, s.experts, 0.75, 32),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::relu, 33));
    check_gradients(layer, x);
    REQUIRE(layer.routing().num_dropped() > 0);
    // ReLU is piecewise linear too: no pre-activation may sit within reach of an FD step.
    const ExpertsOracle oracle(layer.experts(), Kind::ffn_relu);
    REQUIRE(oracle.kink_margin(x, kept_pairs(layer.routing())) > 1e3 * fd_step);
  }
  SECTION("gshard (top-2, drops) + GELU FFN, with masked tokens") {
    auto layer = moe::MoELayer(moe::make_gshard_router<double>(s.dim, s.experts, 0.75, 34),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 35));
    check_gradients(layer, x, mask_every(s.tokens, 3));
    REQUIRE(layer.routing().num_dropped() > 0);
  }
  SECTION("top-k (dropless, z-loss) + SwiGLU + shared SwiGLU") {
    auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 36),
                               moe::SwiGLUExperts<double>(s.experts, s.dim, s.hidden, 37),
                               moe::SwiGLUExperts<double>(1, s.dim, s.hidden, 38));
    check_gradients(layer, x);
  }
  SECTION("deepspeed top-k (by weight, min capacity) + GELU FFN + shared GELU FFN, masked tokens") {
    // a masked token's x still reaches the loss, through the shared expert only
    auto layer = moe::MoELayer(moe::make_deepspeed_topk_router<double>(s.dim, s.experts, 3, 0.5, 5, 39),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 40),
                               moe::FFNExperts<double>(1, s.dim, s.hidden, Activation::gelu, 41));
    check_gradients(layer, x, mask_every(s.tokens, 4));
    REQUIRE(layer.routing().num_dropped() > 0);
  }
}

TEST_CASE("parameters: each is visited once, under a name no other parameter has", "[layer][gradient]") {
  // Optimizer state and checkpoints are keyed by these names; the shared expert must not
  // alias the routed experts' names.
  const Shape s = fd_shape;
  auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 1),
                             moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 2),
                             moe::FFNExperts<double>(1, s.dim, s.hidden, Activation::gelu, 3));
  std::vector<std::string> names;
  std::set<const double*> storage;
  layer.for_each_parameter([&](std::string_view name, auto value, auto) {
    names.emplace_back(name);
    storage.insert(value.data());
  });
  CAPTURE(names);
  REQUIRE(names.size() == 5);  // router.weight, experts.w1/w2, the shared expert's w1/w2
  REQUIRE(storage.size() == names.size());
  REQUIRE(std::set<std::string>(names.begin(), names.end()).size() == names.size());
}

// ================================================================================================
// 3. Invariants
// ================================================================================================

struct RoutingSpec {
  Index k;
  Weighting weighting;
  double scale;
  Capacity capacity;
};

// Capacity, uniqueness, consistency of the two views, weight sums, masked tokens unrouted.
template <class S>
void check_routing_invariants(const moe::SparseRouting<S>& r, const Matrix<S>& scores,
                              const RoutingSpec& spec, const std::vector<std::uint8_t>& valid) {
  const Index T = r.num_tokens, E = r.num_experts;
  const auto is_valid = [&](Index t) { return valid.empty() || valid[std::size_t(t)] != 0; };
  Index n_valid = 0;
  for (Index t = 0; t < T; ++t) n_valid += is_valid(t);
  REQUIRE(r.num_valid_tokens == n_valid);

  // capacity: counted over real tokens only; never exceeded; exact with pad
  const auto& cap = spec.capacity;
  if (!cap.limited()) {
    REQUIRE(r.capacity == -1);
    REQUIRE(r.num_dropped() == 0);
    REQUIRE(r.num_slots() == n_valid * spec.k);
  } else {
    REQUIRE(r.capacity == Index(std::ceil(double(spec.k) * *cap.factor * double(n_valid) / double(E))));
  }
  Index kept = 0, over = 0, pad_mismatch = 0, twice = 0, bad_token = 0, bad_padding = 0, bad_count = 0;
  for (Index e = 0; e < E; ++e) {
    kept += r.expert_count[e];
    if (cap.limited()) {
      over += r.expert_count[e] > r.capacity || r.slots_of(e) > r.capacity;
      pad_mismatch += cap.pad && r.slots_of(e) != r.capacity;
    }
    std::set<Index> seen;
    Index real = 0;
    for (Index s = r.expert_offsets[e]; s < r.expert_offsets[e + 1]; ++s) {
      const Index t = r.slot_token[s];
      if (t < 0) {
        bad_padding += !cap.pad || r.slot_weight[s] != S(0);
        continue;
      }
      ++real;
      bad_token += t >= T || !is_valid(t);
      twice += !seen.insert(t).second;
    }
    bad_count += real != r.expert_count[e];
  }
  INFO("experts over capacity " << over << ", pad not exactly C " << pad_mismatch
       << ", token twice in one expert " << twice << ", slot naming a bad token " << bad_token
       << ", padding slot without pad or with a weight " << bad_padding
       << ", expert_count != real slots " << bad_count);
  REQUIRE(over + pad_mismatch + twice + bad_token + bad_padding + bad_count == 0);

  // per-token view: masked tokens have no choices, real ones k distinct experts; kept choices
  // sit in their expert's slots; weights sum to the scale where the weighting says so
  const double tol = double(forward_tol<S>(spec.k)) * spec.scale;
  Index masked_routed = 0, wrong_k = 0, repeated = 0, bad_slot = 0, bad_sum = 0, bad_raw = 0, kept_choices = 0;
  for (Index t = 0; t < T; ++t) {
    const Index lo = r.token_offsets[t], hi = r.token_offsets[t + 1];
    if (!is_valid(t)) {
      masked_routed += hi != lo;
      continue;
    }
    wrong_k += hi - lo != spec.k;
    std::set<Index> experts;
    double sum = 0;
    bool dropped = false;
    for (Index c = lo; c < hi; ++c) {
      const Index e = r.choice_expert[c], s = r.choice_slot[c];
      repeated += !experts.insert(e).second;
      if (s < 0) {
        dropped = true;
        continue;
      }
      ++kept_choices;
      bad_slot += s < r.expert_offsets[e] || s >= r.expert_offsets[e + 1] || r.slot_token[s] != t;
      sum += double(r.slot_weight[s]);
      bad_raw += spec.weighting == Weighting::raw &&
                 std::abs(double(r.slot_weight[s]) - spec.scale * double(scores(t, e))) > tol;
    }
    const bool sums_to_scale =
        (spec.weighting == Weighting::renormalize_after_drop && sum > 0) ||
        ((spec.weighting == Weighting::renormalize_before_drop ||
          spec.weighting == Weighting::softmax_of_kept_logits) && !dropped);
    bad_sum += sums_to_scale && std::abs(sum - spec.scale) > tol;
  }
  INFO("masked tokens routed " << masked_routed << ", tokens without k choices " << wrong_k
       << ", expert chosen twice " << repeated << ", choice/slot mismatch " << bad_slot
       << ", weight sums != scale " << bad_sum << ", raw weights != scale * score " << bad_raw);
  REQUIRE(masked_routed + wrong_k + repeated + bad_slot + bad_sum + bad_raw == 0);
  REQUIRE(kept_choices == kept);
}

template <class Gate>
void invariant_matrix(const char* gate, double scale) {
  const Shape s{24, 6, 4, 8, 2};
  const auto valid = mask_every(s.tokens, 5);
  std::uint64_t seed = 200;
  for (const auto& cap : capacity_variants())
    for (const auto& [wname, weighting] : weightings()) {
      ++seed;
      DYNAMIC_SECTION(gate << " / " << wname << " / " << cap.name) {
        auto layer = make_custom_layer<double, Gate>(s, weighting, cap.capacity, scale,
                                                     BalanceNorm::switch_top1, seed);
        const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, seed);
        const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, seed + 1);
        Matrix<double> y(s.tokens, s.dim), dx(s.tokens, s.dim);
        layer.forward(x, y, tokens_of<double>(valid));
        layer.backward(dy, dx);
        check_routing_invariants(layer.routing(), layer.router().scores(),
                                 {s.k, weighting, scale, cap.capacity}, valid);
        // padding tokens: no output and no gradient (there is no shared expert here)
        for (Index t = 0; t < s.tokens; ++t)
          if (!valid[std::size_t(t)]) {
            INFO("masked token " << t);
            REQUIRE((y.row(t).array() == 0).all());
            REQUIRE((dx.row(t).array() == 0).all());
          }
      }
    }
}

TEST_CASE("invariants: capacity, uniqueness, weight sums, masked tokens", "[layer][invariants]") {
  invariant_matrix<moe::SoftmaxGate<double>>("softmax", 1.0);
  invariant_matrix<moe::SigmoidGate<double>>("sigmoid", deepseek_scale);
  invariant_matrix<moe::SqrtSoftplusGate<double>>("sqrt-softplus", 1.0);
}

TEST_CASE("invariants: every token masked routes nothing and stays finite", "[layer][invariants]") {
  const Shape s{12, 6, 4, 8, 2};
  auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 5, moe::Padding::excluded),
                             moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 6));
  const std::vector<std::uint8_t> none(std::size_t(s.tokens), 0);
  Matrix<double> y = Matrix<double>::Constant(s.tokens, s.dim, 1), dx = y;
  layer.forward(random_matrix<double>(s.tokens, s.dim, 7), y, tokens_of<double>(none));
  layer.backward(random_matrix<double>(s.tokens, s.dim, 8), dx);
  REQUIRE(layer.routing().num_slots() == 0);
  REQUIRE((y.array() == 0).all());
  REQUIRE((dx.array() == 0).all());
  REQUIRE(std::isfinite(layer.router().aux_loss()));
  for (const auto& g : gradients_of(layer)) REQUIRE(g.allFinite());
}

TEST_CASE("invariants: the mask is copied, so its buffer need not outlive forward", "[layer][invariants]") {
  const Shape s{12, 6, 4, 8, 2};
  const auto make = [&] {
    return moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 9),
                         moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 10));
  };
  auto reference = make(), layer = make();
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 11);
  const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 12);
  const auto valid = mask_every(s.tokens, 3);
  Matrix<double> y(s.tokens, s.dim), want(s.tokens, s.dim), dx(s.tokens, s.dim);
  reference.forward(x, y, tokens_of<double>(valid));
  reference.backward(dy, want);

  auto scratch = valid;
  layer.forward(x, y, tokens_of<double>(scratch));
  std::fill(scratch.begin(), scratch.end(), std::uint8_t(1));  // the caller reuses its buffer
  layer.backward(dy, dx);
  REQUIRE(bit_identical(dx, want));
}

TEST_CASE("invariants: the same input gives bit-identical y, dx and gradients", "[layer][invariants]") {
  const Shape s{24, 6, 4, 8, 2};
  const Matrix<double> x1 = random_matrix<double>(s.tokens, s.dim, 21);
  const Matrix<double> x2 = random_matrix<double>(s.tokens, s.dim, 22);
  const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 23);
  const auto check = [&](auto& layer) {
    Matrix<double> y1(s.tokens, s.dim), dx1(s.tokens, s.dim), y(s.tokens, s.dim), dx(s.tokens, s.dim);
    moe::zero_grad(layer);
    layer.forward(x1, y1);
    layer.backward(dy, dx1);
    const auto g1 = gradients_of(layer);
    layer.forward(x2, y);  // a different batch in between must leave no trace
    layer.backward(dy, dx);
    moe::zero_grad(layer);
    layer.forward(x1, y);
    layer.backward(dy, dx);
    REQUIRE(bit_identical(y, y1));
    REQUIRE(bit_identical(dx, dx1));
    const auto g = gradients_of(layer);
    REQUIRE(g.size() == g1.size());
    for (std::size_t i = 0; i < g.size(); ++i) REQUIRE(bit_identical(g[i], g1[i]));
  };
  SECTION("sigmoid, batch priority with drops") {
    auto layer = make_custom_layer<double, moe::SigmoidGate<double>>(
        s, Weighting::renormalize_after_drop, capacity_named("drop batch_priority"), deepseek_scale,
        BalanceNorm::megatron, 24);
    check(layer);
  }
  SECTION("top-k + SwiGLU + shared SwiGLU") {
    auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 25),
                               moe::SwiGLUExperts<double>(s.experts, s.dim, s.hidden, 26),
                               moe::SwiGLUExperts<double>(1, s.dim, s.hidden, 27));
    check(layer);
  }
}

TEST_CASE("invariants: an empty batch (T = 0) works and leaves no trace", "[layer][invariants]") {
  const Shape s{16, 6, 4, 8, 2};
  const auto make = [&] {
    return make_custom_layer<double, moe::SoftmaxGate<double>>(
        s, Weighting::renormalize_after_drop, capacity_named("drop rank_major"), 1.0,
        BalanceNorm::switch_top1, 30);
  };
  auto layer = make();
  Matrix<double> y0(0, s.dim), dx0(0, s.dim);
  layer.forward(Matrix<double>(0, s.dim), y0);
  REQUIRE(y0.size() == 0);
  REQUIRE(layer.routing().num_slots() == 0);
  REQUIRE(layer.router().aux_loss() == 0);
  moe::zero_grad(layer);
  layer.backward(Matrix<double>(0, s.dim), dx0);
  for (const auto& g : gradients_of(layer)) REQUIRE((g.array() == 0).all());

  // the next real batch is computed as by a fresh layer
  auto fresh = make();
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 31);
  const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 32);
  Matrix<double> y(s.tokens, s.dim), dx(s.tokens, s.dim), want_y = y, want_dx = dx;
  layer.forward(x, y);
  layer.backward(dy, dx);
  fresh.forward(x, want_y);
  fresh.backward(dy, want_dx);
  REQUIRE(bit_identical(y, want_y));
  REQUIRE(bit_identical(dx, want_dx));
}

// ================================================================================================
// 4. No allocation in steady state
// ================================================================================================

// A realistic size: the expert and router weight-gradient GEMMs have depth T, large enough that
// Eigen's own product would put its blocking buffers on the heap (checked below).
constexpr Shape big{256, 64, 8, 128, 2};

struct Allocations {
  long news, deletes, eigen_mallocs;
};

// One batch of the steady state: its tokens and (optionally) its padding mask.
struct Batch {
  Matrix<double> x;
  std::vector<std::uint8_t> valid{};
};

// Warm up once on every batch, then count one more forward + backward on each.
template <class Layer>
Allocations steady_state_allocations(Layer& layer, const std::vector<Batch>& batches) {
  const Matrix<double> dy = random_matrix<double>(big.tokens, big.dim, 77);
  Matrix<double> y(big.tokens, big.dim), dx(big.tokens, big.dim);
  for (const auto& b : batches) {
    layer.forward(b.x, y, tokens_of<double>(b.valid));
    layer.backward(dy, dx);
  }
  AllocCounter count;  // no assertion may run while counting: Catch allocates
  for (const auto& b : batches) {
    layer.forward(b.x, y, tokens_of<double>(b.valid));
    layer.backward(dy, dx);
  }
  count.stop();
  return {count.news, count.deletes, count.eigen_mallocs};
}

// Kept slots of each batch, so a section can show its batches really differ.
template <class Layer>
std::set<Index> slot_counts(Layer& layer, const std::vector<Batch>& batches) {
  std::set<Index> counts;
  Matrix<double> y(big.tokens, big.dim);
  for (const auto& b : batches) {
    layer.forward(b.x, y, tokens_of<double>(b.valid));
    counts.insert(layer.routing().num_slots());
  }
  return counts;
}

void require_no_allocation(const Allocations& a) {
  INFO("operator new " << a.news << ", operator delete " << a.deletes << ", Eigen heap "
                       << a.eigen_mallocs);
  REQUIRE(a.news == 0);
  REQUIRE(a.deletes == 0);
  REQUIRE(a.eigen_mallocs == 0);
}

TEST_CASE("no allocation: the detector sees operator new and Eigen's heap GEMM blocking",
          "[layer][alloc]") {
  // Without these, a zero count below could mean a blind detector.
  {
    AllocCounter count;
    void* p = ::operator new(64);
    ::operator delete(p);
    count.stop();
    REQUIRE(count.news == 1);
    REQUIRE(count.deletes == 1);
  }
  {
    // The shared expert's weight-gradient GEMM, x^T dpre [D, T] x [T, H], by Eigen's own product.
    const Matrix<double> x = random_matrix<double>(big.tokens, big.dim, 1);
    const Matrix<double> dpre = random_matrix<double>(big.tokens, big.hidden, 2);
    Matrix<double> grad = Matrix<double>::Zero(big.dim, big.hidden);
    AllocCounter count;
    grad.noalias() += x.transpose() * dpre;
    count.stop();
    REQUIRE(count.eigen_mallocs > 0);
  }
}

TEST_CASE("no allocation: a second forward + backward on the same shapes allocates nothing",
          "[layer][alloc]") {
  const Shape s = big;
  const Matrix<double> x1 = random_matrix<double>(s.tokens, s.dim, 41);
  const Matrix<double> x2 = random_matrix<double>(s.tokens, s.dim, 42);

  SECTION("top-k (dropless) + GELU FFN + shared FFN") {
    auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 43),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 44),
                               moe::FFNExperts<double>(1, s.dim, s.hidden, Activation::gelu, 45));
    SECTION("same input") { require_no_allocation(steady_state_allocations(layer, {{x1}})); }
    SECTION("new input") { require_no_allocation(steady_state_allocations(layer, {{x1}, {x2}})); }
  }
  SECTION("top-k + SwiGLU + shared SwiGLU, masked tokens") {
    auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 46),
                               moe::SwiGLUExperts<double>(s.experts, s.dim, s.hidden, 47),
                               moe::SwiGLUExperts<double>(1, s.dim, s.hidden, 48));
    const auto valid = mask_every(s.tokens, 7);
    require_no_allocation(steady_state_allocations(layer, {{x1, valid}, {x2, valid}}));
  }
  SECTION("pad to capacity (sigmoid, by weight)") {
    auto layer = make_custom_layer<double, moe::SigmoidGate<double>>(
        s, Weighting::renormalize_after_drop, capacity_named("pad"), deepseek_scale,
        BalanceNorm::megatron, 49);
    require_no_allocation(steady_state_allocations(layer, {{x1}, {x2}}));
  }
  SECTION("capacity with drops (softmax, batch priority), same input") {
    auto layer = make_custom_layer<double, moe::SoftmaxGate<double>>(
        s, Weighting::renormalize_before_drop, capacity_named("drop batch_priority"), 1.0,
        BalanceNorm::switch_top1, 50);
    require_no_allocation(steady_state_allocations(layer, {{x1}}));
  }
  // Training sees a new batch every step, and the per-call scratch must still be sized once
  // (docs/architecture.md, Workspace rule), also when the number of kept slots changes from batch
  // to batch.
  SECTION("capacity with drops (gshard), batches with different slot counts") {
    auto layer = moe::MoELayer(moe::make_gshard_router<double>(s.dim, s.experts, 1.0, 51),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 52));
    const std::vector<Batch> batches{{x1}, {x2}};
    REQUIRE(slot_counts(layer, batches).size() == 2);  // the case this section is about
    require_no_allocation(steady_state_allocations(layer, batches));
  }
  SECTION("Soft MoE (two dense GEMMs), batches with different padding") {
    auto layer = moe::MoELayer(moe::make_soft_moe_router<double>(s.dim, s.experts, 2, 55),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 56));
    const std::vector<Batch> batches{{x1, mask_every(s.tokens, 7)}, {x2, mask_every(s.tokens, 3)}, {x1}};
    require_no_allocation(steady_state_allocations(layer, batches));
  }
  SECTION("dropless (top-k), batches with different padding") {
    auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 53, moe::Padding::excluded),
                               moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 54));
    const std::vector<Batch> batches{{x1, mask_every(s.tokens, 7)}, {x2, mask_every(s.tokens, 3)}};
    REQUIRE(slot_counts(layer, batches).size() == 2);
    require_no_allocation(steady_state_allocations(layer, batches));
  }
}

// ================================================================================================
// 5. Bad input
// ================================================================================================

TEST_CASE("bad input: shape errors name the argument and the rule, outputs stay untouched",
          "[layer][errors]") {
  const Shape s{12, 6, 4, 8, 2};
  auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 61),
                             moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 62),
                             moe::FFNExperts<double>(1, s.dim, s.hidden, Activation::gelu, 63));
  constexpr double sentinel = 12345.5;
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 64);
  const auto untouched = [&](const Matrix<double>& m) { return (m.array() == sentinel).all(); };

  SECTION("forward: x of the wrong width") {
    Matrix<double> y = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
    const Matrix<double> wide = random_matrix<double>(s.tokens, s.dim + 1, 65);
    REQUIRE_THROWS_AS(layer.forward(wide, y), moe::shape_error);
    REQUIRE_THROWS_AS(layer.forward(wide, y), moe::error);
    REQUIRE_THROWS_WITH(layer.forward(wide, y),
                        Contains("'x'") && Contains("[12 x 7]") && Contains("shape [12 x 6]"));
    REQUIRE(untouched(y));
  }
  SECTION("forward: y of the wrong shape") {
    Matrix<double> y = Matrix<double>::Constant(s.tokens + 1, s.dim, sentinel);
    REQUIRE_THROWS_AS(layer.forward(x, y), moe::shape_error);
    REQUIRE_THROWS_WITH(layer.forward(x, y), Contains("'y'") && Contains("shape [12 x 6]"));
    REQUIRE(untouched(y));
  }
  SECTION("forward: a mask of the wrong length") {
    Matrix<double> y = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
    const auto valid = mask_every(s.tokens - 1, 3);
    REQUIRE_THROWS_AS(layer.forward(x, y, tokens_of<double>(valid)), moe::shape_error);
    REQUIRE_THROWS_WITH(layer.forward(x, y, tokens_of<double>(valid)),
                        Contains("'tokens.valid'") && Contains("12"));
    REQUIRE(untouched(y));
  }
  SECTION("backward: dy or dx of the wrong shape; no gradient accumulated") {
    Matrix<double> y(s.tokens, s.dim);
    layer.forward(x, y);
    moe::zero_grad(layer);
    const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 66);
    Matrix<double> dx = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
    const Matrix<double> dy_short = random_matrix<double>(s.tokens - 1, s.dim, 67);
    REQUIRE_THROWS_AS(layer.backward(dy_short, dx), moe::shape_error);
    REQUIRE_THROWS_WITH(layer.backward(dy_short, dx), Contains("'dy'") && Contains("shape [12 x 6]"));
    REQUIRE(untouched(dx));
    Matrix<double> dx_wide = Matrix<double>::Constant(s.tokens, s.dim + 2, sentinel);
    REQUIRE_THROWS_AS(layer.backward(dy, dx_wide), moe::error);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx_wide), Contains("'dx'") && Contains("shape [12 x 6]"));
    REQUIRE(untouched(dx_wide));
    for (const auto& g : gradients_of(layer)) REQUIRE((g.array() == 0).all());
  }
  SECTION("forward: a NaN in x is a value_error") {
    Matrix<double> y = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
    Matrix<double> bad = x;
    bad(5, 2) = NAN;
    REQUIRE_THROWS_AS(layer.forward(bad, y), moe::value_error);
    REQUIRE_THROWS_AS(layer.forward(bad, y), moe::error);
    REQUIRE_THROWS_WITH(layer.forward(bad, y), Contains("'x'") && Contains("nan at (5, 2)") && Contains("finite"));
    REQUIRE(untouched(y));
  }
  SECTION("backward before any forward says so") {
    Matrix<double> dx = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
    const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 66);
    REQUIRE_THROWS_AS(layer.backward(dy, dx), moe::config_error);
    REQUIRE_THROWS_WITH(layer.backward(dy, dx), Contains("'forward'") && Contains("not run") &&
                                                    Contains("backward needs a forward before it"));
    REQUIRE(untouched(dx));
  }
}

TEST_CASE("bad input: a rejected forward leaves the last good forward for backward",
          "[layer][errors]") {
  // docs/architecture.md (Errors) and Router::forward: on error the previous state stays. Backward
  // after a rejected batch must still differentiate the last accepted one (top-k uses the logits in
  // backward: softmax of the kept logits and z-loss).
  const Shape s{12, 6, 4, 8, 2};
  auto layer = moe::MoELayer(moe::make_topk_router<double>(s.dim, s.experts, 2, 71),
                             moe::FFNExperts<double>(s.experts, s.dim, s.hidden, Activation::gelu, 72));
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 73);
  const Matrix<double> dy = random_matrix<double>(s.tokens, s.dim, 74);
  Matrix<double> y(s.tokens, s.dim), dx(s.tokens, s.dim), want_dx(s.tokens, s.dim);
  layer.forward(x, y);
  moe::zero_grad(layer);
  layer.backward(dy, want_dx);
  const auto want_grads = gradients_of(layer);

  Matrix<double> bad = random_matrix<double>(s.tokens, s.dim, 75);
  bad(0, 0) = NAN;
  REQUIRE_THROWS_AS(layer.forward(bad, y), moe::value_error);
  moe::zero_grad(layer);
  layer.backward(dy, dx);
  REQUIRE(bit_identical(dx, want_dx));
  const auto grads = gradients_of(layer);
  for (std::size_t i = 0; i < grads.size(); ++i) REQUIRE(bit_identical(grads[i], want_grads[i]));
}

TEST_CASE("inference: with grad disabled forward gives the same y, and backward refuses to run",
          "[layer][errors]") {
  const Shape s{12, 6, 4, 8, 2};
  const auto make = [&] {
    return moe::MoELayer(moe::make_gshard_router<double>(s.dim, s.experts, 1.0, 81),
                         moe::SwiGLUExperts<double>(s.experts, s.dim, s.hidden, 82));
  };
  auto training = make(), inference = make();
  inference.set_grad_enabled(false);
  REQUIRE(training.grad_enabled());
  REQUIRE_FALSE(inference.grad_enabled());
  const Matrix<double> x = random_matrix<double>(s.tokens, s.dim, 83), dy = random_matrix<double>(s.tokens, s.dim, 84);
  Matrix<double> y_train(s.tokens, s.dim), y_infer(s.tokens, s.dim);
  training.forward(x, y_train);
  inference.forward(x, y_infer);
  REQUIRE(bit_identical(y_infer, y_train));
  constexpr double sentinel = 12345.5;
  Matrix<double> dx = Matrix<double>::Constant(s.tokens, s.dim, sentinel);
  moe::zero_grad(inference);
  REQUIRE_THROWS_AS(inference.backward(dy, dx), moe::config_error);
  REQUIRE_THROWS_WITH(inference.backward(dy, dx), Contains("'grad_enabled'") && Contains("with grad enabled"));
  REQUIRE((dx.array() == sentinel).all());
  for (const auto& g : gradients_of(inference)) REQUIRE((g.array() == 0).all());
  // turned back on, the next forward is differentiable again, and matches the training layer
  inference.set_grad_enabled(true);
  inference.forward(x, y_infer);
  moe::zero_grad(training);
  moe::zero_grad(inference);
  Matrix<double> dx_train(s.tokens, s.dim);
  training.backward(dy, dx_train);
  inference.backward(dy, dx);
  REQUIRE(bit_identical(dx, dx_train));
}

TEST_CASE("bad input: experts that do not fit the router are rejected at construction",
          "[layer][errors]") {
  const Shape s{12, 6, 4, 8, 2};
  const auto router = [&] { return moe::make_topk_router<double>(s.dim, s.experts, 2, 81); };
  using FFN = moe::FFNExperts<double>;

  REQUIRE_THROWS_AS(moe::MoELayer(router(), FFN(s.experts + 1, s.dim, s.hidden)), moe::shape_error);
  REQUIRE_THROWS_WITH(moe::MoELayer(router(), FFN(s.experts + 1, s.dim, s.hidden)),
                      Contains("'experts.num_experts' = 5") && Contains("number of experts (4)"));
  REQUIRE_THROWS_AS(moe::MoELayer(router(), FFN(s.experts, s.dim + 1, s.hidden)), moe::error);
  REQUIRE_THROWS_WITH(moe::MoELayer(router(), FFN(s.experts, s.dim + 1, s.hidden)),
                      Contains("'experts.input_dim' = 7") && Contains("input width (6)"));
  REQUIRE_THROWS_AS(moe::MoELayer(router(), FFN(s.experts, s.dim, s.hidden), FFN(2, s.dim, s.hidden)),
                    moe::shape_error);
  REQUIRE_THROWS_WITH(moe::MoELayer(router(), FFN(s.experts, s.dim, s.hidden), FFN(2, s.dim, s.hidden)),
                      Contains("'shared.num_experts' = 2") && Contains("one expert"));
  REQUIRE_THROWS_AS(moe::MoELayer(router(), FFN(s.experts, s.dim, s.hidden), FFN(1, s.dim + 1, s.hidden)),
                    moe::shape_error);
  REQUIRE_THROWS_WITH(moe::MoELayer(router(), FFN(s.experts, s.dim, s.hidden), FFN(1, s.dim + 1, s.hidden)),
                      Contains("'shared.input_dim' = 7") && Contains("widths"));
  // a differently sized hidden layer is fine: only the widths the layer sees must match
  REQUIRE_NOTHROW(moe::MoELayer(router(), FFN(s.experts, s.dim, s.hidden), FFN(1, s.dim, 2 * s.hidden)));
}

// ================================================================================================
// 6. Training sanity
// ================================================================================================

TEST_CASE("training: Adam on a tiny regression lowers the loss", "[layer][training]") {
  // A float layer learns a fixed linear map; the objective is what backward differentiates:
  // mean squared error + the router's aux losses.
  using S = float;
  const Shape s{64, 8, 4, 16, 2};
  auto layer = moe::MoELayer(moe::make_topk_router<S>(s.dim, s.experts, 2, 91),
                             moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::gelu, 92));
  const Matrix<S> x = random_matrix<S>(s.tokens, s.dim, 93);
  const Matrix<S> target = x * random_matrix<S>(s.dim, s.dim, 94, 0.5);
  Matrix<S> y(s.tokens, s.dim), dy(s.tokens, s.dim), dx(s.tokens, s.dim);
  const S n = S(y.size());
  const auto objective = [&] {
    layer.forward(x, y);
    return (y - target).squaredNorm() / n + layer.router().aux_loss();
  };

  moe::Adam<S> adam(S(1e-2));
  const S initial = objective();
  constexpr int steps = 60;
  for (int i = 0; i < steps; ++i) {
    objective();
    dy = S(2) * (y - target) / n;
    moe::zero_grad(layer);
    layer.backward(dy, dx);
    adam.step(layer);
  }
  const S final_loss = objective();
  INFO("objective " << initial << " -> " << final_loss << " after " << steps << " Adam steps");
  REQUIRE(std::isfinite(final_loss));
  // Reaches ~1/40 of the start here; a tenth leaves margin and still needs real learning.
  REQUIRE(final_loss < S(0.1) * initial);
}

}  // namespace

// ================================================================================================
// Identity experts: the layer combines straight from the dispatched rows
// ================================================================================================

TEST_CASE("identity experts: y is the weighted sum of the token's own row, gradients by FD", "[layer][identity]") {
  const Index T = 14, D = 6, E = 4;
  moe::MoELayer layer(moe::make_gshard_router<double>(D, E, 0.75), moe::IdentityExperts<double>(E, D));
  layer.router().scorer().weight() *= 3.0;  // logits O(1): no routing decision near a tie
  const Matrix<double> x = random_matrix<double>(T, D, 61);
  Matrix<double> y(T, D);
  layer.forward(x, y);
  const auto& r = layer.routing();
  REQUIRE(r.num_dropped() > 0);
  for (Index t = 0; t < T; ++t) {  // oracle: sum of the kept weights times x_t
    double w = 0;
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
      if (r.choice_slot[c] >= 0) w += r.slot_weight[r.choice_slot[c]];
    REQUIRE((y.row(t) - w * x.row(t)).cwiseAbs().maxCoeff() <= forward_tol<double>(4));
  }
  check_gradients(layer, x);
}

// ================================================================================================
// Inference cache: the experts' packed weights (PackedWeights)
// ================================================================================================

namespace {

// Widths past Gemm::eigen_max_cols, so that every expert GEMM of forward takes the kernel and
// the cache really packs; 40 tokens top-2 over 3 experts give each expert a block.
constexpr Shape pack_shape{40, 264, 3, 300, 2};

template <class S>
auto make_packing_swiglu(std::uint64_t seed) {
  const Shape s = pack_shape;
  return moe::MoELayer(moe::make_topk_router<S>(s.dim, s.experts, s.k, seed),
                       moe::SwiGLUExperts<S>(s.experts, s.dim, s.hidden, seed + 1),
                       moe::SwiGLUExperts<S>(1, s.dim, s.hidden, seed + 2));
}

template <class S>
auto make_packing_ffn(std::uint64_t seed) {
  const Shape s = pack_shape;
  return moe::MoELayer(moe::make_topk_router<S>(s.dim, s.experts, s.k, seed),
                       moe::FFNExperts<S>(s.experts, s.dim, s.hidden, Activation::gelu, seed + 1),
                       moe::FFNExperts<S>(1, s.dim, s.hidden, Activation::gelu, seed + 2));
}

template <class Layer>
bool packed(Layer& layer) {
  return layer.experts().weights_packed() && layer.shared_expert().weights_packed();
}

// Two layers built alike: `cached` in inference mode (packs its weights), `plain` never packed.
template <class S, class Make>
void check_packed_same_bits(Make make) {
  static_assert(pack_shape.dim > moe::Gemm<S>::eigen_max_cols && pack_shape.hidden > moe::Gemm<S>::eigen_max_cols);
  auto plain = make(), cached = make();
  cached.set_grad_enabled(false);
  const Matrix<S> x1 = random_matrix<S>(pack_shape.tokens, pack_shape.dim, 201);
  const Matrix<S> x2 = random_matrix<S>(pack_shape.tokens, pack_shape.dim, 202);
  Matrix<S> want(pack_shape.tokens, pack_shape.dim), got(pack_shape.tokens, pack_shape.dim);
  REQUIRE_FALSE(packed(cached));
  for (const auto* x : {&x1, &x2, &x1}) {  // packs on the first, reuses the copy after
    plain.forward(*x, want);
    cached.forward(*x, got);
    const auto& offsets = cached.routing().expert_offsets;
    for (Index e = 0; e < pack_shape.experts; ++e) REQUIRE(offsets[e + 1] > offsets[e]);
    REQUIRE(packed(cached));
    REQUIRE(bit_identical(got, want));
  }
  REQUIRE_FALSE(packed(plain));  // grad enabled: forward leaves the weights alone

  // Packed explicitly while training: forward uses the copy, backward is unchanged.
  auto trained = make();
  trained.experts().pack_weights();
  trained.shared_expert().pack_weights();
  REQUIRE(packed(trained));
  const Matrix<S> dy = random_matrix<S>(pack_shape.tokens, pack_shape.dim, 203);
  Matrix<S> dx_want(pack_shape.tokens, pack_shape.dim), dx_got(pack_shape.tokens, pack_shape.dim);
  moe::zero_grad(plain);
  plain.forward(x1, want);
  plain.backward(dy, dx_want);
  trained.forward(x1, got);
  REQUIRE(bit_identical(got, want));
  moe::zero_grad(trained);  // through for_each_parameter: the copy is stale from here on
  REQUIRE_FALSE(packed(trained));
  trained.forward(x1, got);
  trained.backward(dy, dx_got);
  REQUIRE(bit_identical(got, want));
  REQUIRE(bit_identical(dx_got, dx_want));
  const auto grads_want = gradients_of(plain), grads_got = gradients_of(trained);
  for (std::size_t i = 0; i < grads_want.size(); ++i) REQUIRE(bit_identical(grads_got[i], grads_want[i]));
}

// A weight changed through for_each_parameter after an inference forward changes the next
// forward, which then equals that of a layer never packed with the same weights.
template <class S, class Make>
void check_packed_invalidation(Make make) {
  auto plain = make(), cached = make();
  cached.set_grad_enabled(false);
  const Matrix<S> x = random_matrix<S>(pack_shape.tokens, pack_shape.dim, 211);
  Matrix<S> before(pack_shape.tokens, pack_shape.dim), after(pack_shape.tokens, pack_shape.dim),
      want(pack_shape.tokens, pack_shape.dim);
  cached.forward(x, before);
  REQUIRE(packed(cached));
  // one entry of every expert matrix (routed and shared): row 0 of the first expert's block
  const auto nudge = [](auto& layer) {
    layer.for_each_parameter([](std::string_view name, auto value, auto) {
      if (name.find("experts.") != std::string_view::npos) value(0, 0) += S(0.5);
    });
  };
  nudge(cached);
  REQUIRE_FALSE(cached.experts().weights_packed());
  REQUIRE_FALSE(cached.shared_expert().weights_packed());
  nudge(plain);
  cached.forward(x, after);
  plain.forward(x, want);
  REQUIRE_FALSE(bit_identical(after, before));  // the change reached the output
  REQUIRE(bit_identical(after, want));          // through a fresh copy
  REQUIRE(packed(cached));

  // Released, the next inference forward packs again, the same bits.
  cached.experts().release_packed_weights();
  REQUIRE_FALSE(cached.experts().weights_packed());
  cached.forward(x, after);
  REQUIRE(bit_identical(after, want));
  REQUIRE(cached.experts().weights_packed());

  // Back in training mode a stale copy is neither used nor remade.
  cached.set_grad_enabled(true);
  nudge(cached);
  nudge(plain);
  cached.forward(x, after);
  plain.forward(x, want);
  REQUIRE_FALSE(packed(cached));
  REQUIRE(bit_identical(after, want));
}

}  // namespace

TEMPLATE_TEST_CASE("inference cache: packed expert weights give the bits of the weights", "[layer][packed]",
                   float, double) {
  using S = TestType;
  SECTION("SwiGLU + shared SwiGLU") { check_packed_same_bits<S>([] { return make_packing_swiglu<S>(301); }); }
  SECTION("GELU FFN + shared FFN") { check_packed_same_bits<S>([] { return make_packing_ffn<S>(311); }); }
}

TEMPLATE_TEST_CASE("inference cache: a weight changed after a forward changes the next forward", "[layer][packed]",
                   float, double) {
  using S = TestType;
  SECTION("SwiGLU + shared SwiGLU") { check_packed_invalidation<S>([] { return make_packing_swiglu<S>(321); }); }
  SECTION("GELU FFN + shared FFN") { check_packed_invalidation<S>([] { return make_packing_ffn<S>(331); }); }
  SECTION("FFN: writing through the w1 accessor") {
    auto cached = make_packing_ffn<S>(341);
    cached.set_grad_enabled(false);
    const Matrix<S> x = random_matrix<S>(pack_shape.tokens, pack_shape.dim, 342);
    Matrix<S> before(pack_shape.tokens, pack_shape.dim), after(pack_shape.tokens, pack_shape.dim);
    cached.forward(x, before);
    REQUIRE(cached.experts().weights_packed());
    cached.experts().w1(1)(0, 0) += S(0.5);
    REQUIRE_FALSE(cached.experts().weights_packed());
    cached.forward(x, after);
    REQUIRE_FALSE(bit_identical(after, before));
    auto plain = make_packing_ffn<S>(341);
    plain.experts().w1(1)(0, 0) += S(0.5);
    plain.forward(x, before);
    REQUIRE(bit_identical(after, before));
  }
}

TEST_CASE("no allocation: inference forwards with packed weights, also repacking after an update",
          "[layer][alloc][packed]") {
  auto layer = make_packing_swiglu<double>(351);
  layer.set_grad_enabled(false);
  const Matrix<double> x1 = random_matrix<double>(pack_shape.tokens, pack_shape.dim, 352);
  const Matrix<double> x2 = random_matrix<double>(pack_shape.tokens, pack_shape.dim, 353);
  Matrix<double> y(pack_shape.tokens, pack_shape.dim);
  const auto update = [&] {
    layer.for_each_parameter([](std::string_view, auto value, auto) { value(0, 0) *= 0.999; });
  };
  layer.forward(x1, y);  // warm-up: packs, sizes the scratch for both batches
  layer.forward(x2, y);
  update();
  layer.forward(x1, y);
  AllocCounter count;  // no assertion may run while counting: Catch allocates
  layer.forward(x1, y);
  layer.forward(x2, y);
  update();
  layer.forward(x2, y);  // repacks into the storage it has
  layer.forward(x1, y);
  count.stop();
  REQUIRE(packed(layer));
  require_no_allocation({count.news, count.deletes, count.eigen_mallocs});
}
