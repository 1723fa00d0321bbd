// Core pieces: errors, capacity rules, kernels, Gemm, CounterRng, routing conversions and
// statistics, argument checks. Every oracle is written from the math (docs/selectors.md,
// docs/architecture.md) or from a literal worked by hand, never by re-running the code under test.
#include "support.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <moe/core/gemm.hpp>
#include <moe/core/rng.hpp>
#include <moe/core/validate.hpp>
#include <moe/errors.hpp>
#include <moe/kernels/dispatch.hpp>
#include <moe/kernels/softmax.hpp>
#include <moe/kernels/top_k.hpp>
#include <moe/routing.hpp>
#include <moe/selectors/capacity.hpp>

using Catch::Matchers::Contains;
using moe::Index;
using moe::Matrix;
using moe::Vector;
using moe_test::forward_tol;
using moe_test::random_matrix;

namespace {

using Long = long double;  // oracle precision: 64-bit mantissa, exp(1000) does not overflow

template <class S>
constexpr S eps = std::numeric_limits<S>::epsilon();

// ---- a SparseRouting written out by hand ---------------------------------------------------

// One (token, choice) pair: `slot` is its row inside the expert's block, or `dropped`.
constexpr int dropped = -1;
struct Pick {
  int token, expert, slot;
  double weight;
};

// Builds the CSR routing directly from the pairs (listed in token order, rank order inside a
// token), without going through any library code. Expert e owns slots_per_expert[e] rows; a
// row no pick names is a padding slot (token -1, weight 0).
template <class S>
moe::SparseRouting<S> build_routing(Index tokens, const std::vector<Index>& slots_per_expert,
                                    const std::vector<Pick>& picks,
                                    const std::vector<std::uint8_t>& valid, Index capacity) {
  moe::SparseRouting<S> r;
  const Index experts = Index(slots_per_expert.size());
  r.num_tokens = tokens;
  r.num_experts = experts;
  r.num_valid_tokens = Index(std::count(valid.begin(), valid.end(), std::uint8_t(1)));
  r.capacity = capacity;
  r.expert_offsets.assign(std::size_t(experts + 1), 0);
  for (Index e = 0; e < experts; ++e)
    r.expert_offsets[std::size_t(e + 1)] = r.expert_offsets[std::size_t(e)] + slots_per_expert[std::size_t(e)];
  r.slot_token.assign(std::size_t(r.expert_offsets.back()), -1);
  r.slot_weight.assign(std::size_t(r.expert_offsets.back()), S(0));
  r.expert_count.assign(std::size_t(experts), 0);
  r.token_offsets.assign(std::size_t(tokens + 1), 0);
  for (const Pick& p : picks) {
    ++r.token_offsets[std::size_t(p.token + 1)];
    r.choice_expert.push_back(p.expert);
    if (p.slot == dropped) {
      r.choice_slot.push_back(-1);
      continue;
    }
    const Index s = r.expert_offsets[std::size_t(p.expert)] + p.slot;
    r.choice_slot.push_back(std::int32_t(s));
    r.slot_token[std::size_t(s)] = p.token;
    r.slot_weight[std::size_t(s)] = S(p.weight);
    ++r.expert_count[std::size_t(p.expert)];
  }
  std::partial_sum(r.token_offsets.begin(), r.token_offsets.end(), r.token_offsets.begin());
  return r;
}

// The worked example used below: T = 5 tokens, E = 3 experts.
//   token 0: e0 slot 0 (0.6), e1 slot 0 (0.4)
//   token 1: e0 slot 1 (0.7), e2 dropped
//   token 2: masked out (no choices)
//   token 3: e1 slot 1 (0.5), e0 dropped
//   token 4: e1 slot 2 (0.9), e2 slot 0 (0.1)
// Expert 0 has a third, padding slot (pad-to-capacity), expert 1 is full, expert 2 has 1 slot.
// Global slots: e0 -> 0,1,2(pad); e1 -> 3,4,5; e2 -> 6.
template <class S>
moe::SparseRouting<S> worked_routing() {
  return build_routing<S>(5, {3, 3, 1},
                          {{0, 0, 0, 0.6}, {0, 1, 0, 0.4},
                           {1, 0, 1, 0.7}, {1, 2, dropped, 0.0},
                           {3, 1, 1, 0.5}, {3, 0, dropped, 0.0},
                           {4, 1, 2, 0.9}, {4, 2, 0, 0.1}},
                          {1, 1, 0, 1, 1}, 3);
}

// ---- SplitMix64 finalizer and its inverse (to construct adversarial RNG keys) ---------------

constexpr std::uint64_t mul_inverse(std::uint64_t a) {  // Newton: a * x = 1 mod 2^64, a odd
  std::uint64_t x = a;
  for (int i = 0; i < 6; ++i) x *= 2 - a * x;
  return x;
}
constexpr std::uint64_t unmix(std::uint64_t z) {
  z ^= (z >> 31) ^ (z >> 62);
  z *= mul_inverse(0x94d049bb133111ebull);
  z ^= (z >> 27) ^ (z >> 54);
  z *= mul_inverse(0xbf58476d1ce4e5b9ull);
  z ^= (z >> 30) ^ (z >> 60);
  return z;
}
constexpr std::uint64_t mix(std::uint64_t z) {  // the published SplitMix64 finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static_assert(unmix(mix(0x0123456789abcdefull)) == 0x0123456789abcdefull);
static_assert(mix(unmix(~0ull)) == ~0ull);

}  // namespace

// =============================================================================================
// 1. errors.hpp
// =============================================================================================

TEST_CASE("error types derive from moe::error and the documented std exception", "[errors]") {
  // One catch (moe::error) for every library error, one std type per kind (docs/architecture.md,
  // Errors).
  REQUIRE(std::is_base_of_v<moe::error, moe::shape_error>);
  REQUIRE(std::is_base_of_v<moe::error, moe::config_error>);
  REQUIRE(std::is_base_of_v<moe::error, moe::value_error>);
  REQUIRE(std::is_base_of_v<std::invalid_argument, moe::shape_error>);
  REQUIRE(std::is_base_of_v<std::invalid_argument, moe::config_error>);
  REQUIRE(std::is_base_of_v<std::domain_error, moe::value_error>);
  REQUIRE_FALSE(std::is_base_of_v<std::invalid_argument, moe::value_error>);
  REQUIRE(std::is_abstract_v<moe::error>);
  REQUIRE(std::has_virtual_destructor_v<moe::error>);

  // The message is the same whichever base the caller catches by.
  const auto through_both_bases = [](auto thrower) {
    std::string via_moe, via_std;
    try {
      thrower();
    } catch (const moe::error& e) {
      via_moe = e.what();
    }
    try {
      thrower();
    } catch (const std::exception& e) {
      via_std = e.what();
    }
    CHECK(via_moe == "boom");
    CHECK(via_std == "boom");
  };
  through_both_bases([] { throw moe::shape_error("boom"); });
  through_both_bases([] { throw moe::config_error("boom"); });
  through_both_bases([] { throw moe::value_error("boom"); });
  REQUIRE_THROWS_AS(throw moe::config_error("x"), std::logic_error);
  REQUIRE_THROWS_AS(throw moe::value_error("x"), std::domain_error);
}

TEST_CASE("detail::fail and detail::require format 'moe: <where>: argument ...'", "[errors]") {
  REQUIRE_THROWS_AS(moe::detail::fail<moe::config_error>("TopKSelector", "k", 0, "1 <= k <= E"),
                    moe::config_error);
  REQUIRE_THROWS_WITH(moe::detail::fail<moe::config_error>("TopKSelector", "k", 0, "1 <= k <= E"),
                      "moe: TopKSelector: argument 'k' = 0 violates: 1 <= k <= E");
  REQUIRE_THROWS_WITH(moe::detail::fail<moe::value_error>("f", "x", 0.25, "x > 1"),
                      "moe: f: argument 'x' = 0.25 violates: x > 1");
  REQUIRE_THROWS_WITH(moe::detail::fail<moe::shape_error>("g", "y", std::string("[2 x 3]"), "r"),
                      "moe: g: argument 'y' = [2 x 3] violates: r");

  REQUIRE_NOTHROW(moe::detail::require<moe::shape_error>(true, "w", "n", 7, "rule"));
  REQUIRE_THROWS_AS(moe::detail::require<moe::shape_error>(false, "w", "n", 7, "rule"),
                    moe::shape_error);
  REQUIRE_THROWS_WITH(moe::detail::require<moe::shape_error>(false, "w", "n", 7, "rule"),
                      "moe: w: argument 'n' = 7 violates: rule");
}

// =============================================================================================
// 2. Capacity (docs/selectors.md, Capacity)
// =============================================================================================

TEST_CASE("Capacity::slots reproduces each reference rule", "[capacity]") {
  SECTION("DeepSpeed: max(ceil(k cf T / E), min_capacity = 8)") {
    const moe::Capacity ds{.factor = 1.0, .times_k = true, .minimum = 8};
    CHECK(ds.slots(64, 8, 2, "t") == 16);  // 2*1*64/8 = 16 > 8
    CHECK(ds.slots(10, 8, 1, "t") == 8);   // ceil(10/8 = 1.25) = 2, raised to the minimum 8
    const moe::Capacity ds125{.factor = 1.25, .times_k = true, .minimum = 8};
    CHECK(ds125.slots(100, 8, 2, "t") == 32);  // 2*1.25*100/8 = 31.25 -> 32
  }
  SECTION("Megatron: ceil(T k cf / E), no minimum") {
    const moe::Capacity mg{.factor = 1.1};
    CHECK(mg.slots(1000, 64, 2, "t") == 35);  // 1000*2*1.1/64 = 34.375 -> 35
    const moe::Capacity one{.factor = 1.0};
    CHECK(one.slots(6, 4, 2, "t") == 3);  // 12/4 = 3 exactly: ceil must not add a slot
    CHECK(one.slots(3, 8, 1, "t") == 1);  // 3/8 = 0.375 -> 1
    const moe::Capacity mg15{.factor = 1.5};
    CHECK(mg15.slots(8, 8, 1, "t") == 2);  // 1.5 -> 2
  }
  SECTION("flaxformer: max(round(cf T / E), 4), not multiplied by k") {
    const moe::Capacity fx{.factor = 1.25, .times_k = false, .rounding = moe::Rounding::round, .minimum = 4};
    CHECK(fx.slots(256, 8, 2, "t") == 40);  // 1.25*256/8 = 40 (80 if k were counted)
    const moe::Capacity fx1{.factor = 1.0, .times_k = false, .rounding = moe::Rounding::round, .minimum = 4};
    CHECK(fx1.slots(100, 6, 2, "t") == 17);  // 16.67 -> 17
    CHECK(fx1.slots(100, 7, 2, "t") == 14);  // 14.29 -> 14 (round down, unlike ceil)
    CHECK(fx1.slots(10, 8, 2, "t") == 4);    // 1.25 -> 1, raised to the minimum 4
  }
  SECTION("flaxformer ties: Python's round() is round-half-to-even") {
    // flaxformer computes int(round(cf * T / E)) in Python, which rounds halves to even.
    const moe::Capacity fx{.factor = 1.0, .times_k = false, .rounding = moe::Rounding::round, .minimum = 4};
    CHECK(fx.slots(52, 8, 1, "t") == 6);  // 6.5 -> 6 in Python (std::round gives 7)
    CHECK(fx.slots(44, 8, 1, "t") == 6);  // 5.5 -> 6 (both agree)
    CHECK(fx.slots(36, 8, 1, "t") == 4);  // 4.5 -> 4 in Python (std::round gives 5)
  }
  SECTION("vmoe: ceil(T k cf / E) rounded up to a multiple of 4") {
    const moe::Capacity vm{.factor = 1.0, .times_k = true, .multiple_of = 4};
    CHECK(vm.slots(100, 8, 2, "t") == 28);  // 25 -> 28
    CHECK(vm.slots(64, 8, 1, "t") == 8);    // 8 is already a multiple of 4
    CHECK(vm.slots(3, 8, 1, "t") == 4);     // 0.375 -> 1 -> 4
    CHECK(vm.slots(65, 8, 1, "t") == 12);   // 8.125 -> 9 -> 12
  }
  SECTION("floor (int() truncation)") {
    const moe::Capacity fl{.factor = 1.0, .rounding = moe::Rounding::floor};
    CHECK(fl.slots(100, 8, 1, "t") == 12);  // 12.5 -> 12
    CHECK(fl.slots(10, 4, 2, "t") == 5);    // exactly 5
    CHECK(fl.slots(15, 8, 1, "t") == 1);    // 1.875 -> 1
  }
  SECTION("T = 0 gives 0 slots; dropless gives -1") {
    const moe::Capacity fl{.factor = 0.01, .rounding = moe::Rounding::floor};
    CHECK(fl.slots(0, 8, 2, "t") == 0);  // no tokens: nothing to fit, not an error
    const moe::Capacity ds{.factor = 1.0, .minimum = 8};
    CHECK(ds.slots(0, 8, 2, "t") == 0);
    const moe::Capacity dropless{};
    CHECK_FALSE(dropless.limited());
    CHECK(dropless.slots(100, 8, 2, "t") == -1);
    CHECK(dropless.slots(0, 8, 2, "t") == -1);
  }
  SECTION("a rule that rounds to 0 slots for T > 0 is a config_error naming the factor") {
    const moe::Capacity tiny{.factor = 0.5, .rounding = moe::Rounding::floor};
    // 10*1*0.5/8 = 0.625 -> floor 0
    REQUIRE_THROWS_AS(tiny.slots(10, 8, 1, "Sel"), moe::config_error);
    REQUIRE_THROWS_WITH(tiny.slots(10, 8, 1, "Sel"), Contains("moe: Sel: argument 'capacity.factor' = 0.5"));
    // multiple_of cannot rescue 0: 0 is a multiple of 4
    const moe::Capacity tiny4{.factor = 0.5, .rounding = moe::Rounding::floor, .multiple_of = 4};
    REQUIRE_THROWS_AS(tiny4.slots(10, 8, 1, "Sel"), moe::config_error);
    // a minimum does
    const moe::Capacity tiny_min{.factor = 0.5, .rounding = moe::Rounding::floor, .minimum = 1};
    CHECK(tiny_min.slots(10, 8, 1, "Sel") == 1);
  }
}

TEST_CASE("Capacity::validate rejects rules no batch could satisfy", "[capacity]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const auto rejects = [](const moe::Capacity& c, const std::string& name, const std::string& value) {
    INFO(name << " = " << value);
    REQUIRE_THROWS_AS(c.validate("Sel"), moe::config_error);
    REQUIRE_THROWS_WITH(c.validate("Sel"), Contains("moe: Sel: argument '" + name + "' = " + value));
  };
  rejects({.factor = 0.0}, "capacity.factor", "0");
  rejects({.factor = -1.0}, "capacity.factor", "-1");
  rejects({.factor = nan}, "capacity.factor", "nan");
  rejects({.factor = inf}, "capacity.factor", "inf");
  rejects({.factor = 1.0, .minimum = -1}, "capacity.minimum", "-1");
  rejects({.factor = 1.0, .multiple_of = 0}, "capacity.multiple_of", "0");
  rejects({.pad = true}, "capacity.pad", "true");
  REQUIRE_THROWS_WITH(moe::Capacity{.factor = 0.0}.validate("Sel"),
                      "moe: Sel: argument 'capacity.factor' = 0 violates: capacity factor > 0 and finite");

  // Every reference setting and dropless are valid.
  CHECK_NOTHROW(moe::Capacity{}.validate("Sel"));
  CHECK_NOTHROW(moe::Capacity{.factor = 1.0, .minimum = 8}.validate("Sel"));
  CHECK_NOTHROW(moe::Capacity{.factor = 1.25, .times_k = false, .rounding = moe::Rounding::round, .minimum = 4}
                    .validate("Sel"));
  CHECK_NOTHROW(moe::Capacity{.factor = 1.0, .multiple_of = 4}.validate("Sel"));
  CHECK_NOTHROW(moe::Capacity{.factor = 1.0, .pad = true}.validate("Sel"));
  CHECK_NOTHROW(moe::Capacity{.factor = 1e-9}.validate("Sel"));
}

// =============================================================================================
// 3. kernels
// =============================================================================================

TEMPLATE_TEST_CASE("softmax_rows matches a naive extended-precision softmax", "[kernels][softmax]",
                   float, double) {
  using S = TestType;
  for (const Index E : {1, 2, 7, 8, 13, 64, 65}) {
    INFO("E = " << E);
    // 3 * N(0,1) logits, read through a block whose row stride is wider than E.
    const Matrix<S> big = random_matrix<S>(11, E + 3, 100 + std::uint64_t(E), 3.0);
    const auto logits = big.block(1, 2, 9, E);
    Matrix<S> probs = Matrix<S>::Constant(9, E, S(-7));
    moe::kernels::softmax_rows<S>(logits, probs);

    // Each probability carries a few roundings and the row sum E of them.
    const S tol = forward_tol<S>(E);
    for (Index t = 0; t < logits.rows(); ++t) {
      Long z = 0;
      for (Index e = 0; e < E; ++e) z += std::exp(Long(logits(t, e)));
      Long sum = 0;
      for (Index e = 0; e < E; ++e) {
        const Long want = std::exp(Long(logits(t, e))) / z;
        CHECK(std::abs(Long(probs(t, e)) - want) <= tol);
        sum += probs(t, e);
      }
      CHECK(std::abs(sum - 1) <= tol);
    }
  }
}

TEMPLATE_TEST_CASE("softmax_rows: logits near +-1e3 and equal logits", "[kernels][softmax]", float,
                   double) {
  using S = TestType;
  constexpr Index E = 5;
  Matrix<S> logits(4, E);
  logits << 1000, 999, -1000, 0, S(998.5),  // naive exp(1000) overflows float and double
      -1000, -999, -1000, -1000, -1000,     // naive exp(-1000) underflows to 0 / 0
      1000, 1000, 1000, 1000, 1000,         // all equal: 1/E
      3, 3, 3, 3, 3;
  Matrix<S> probs(4, E);
  moe::kernels::softmax_rows<S>(logits, probs);
  REQUIRE(probs.allFinite());

  const S tol = forward_tol<S>(E);
  for (Index t = 0; t < 2; ++t) {
    Long z = 0;  // long double holds exp(+-1000) without over/underflow
    for (Index e = 0; e < E; ++e) z += std::exp(Long(logits(t, e)));
    for (Index e = 0; e < E; ++e) CHECK(std::abs(Long(probs(t, e)) - std::exp(Long(logits(t, e))) / z) <= tol);
    CHECK(std::abs(Long(probs.row(t).sum()) - 1) <= tol);
  }
  // Row 1 by hand: e^1 / (e^1 + 4) for the -999 entry.
  CHECK(std::abs(double(probs(1, 1)) - std::numbers::e / (std::numbers::e + 4)) <= tol);
  for (Index t = 2; t < 4; ++t)
    for (Index e = 0; e < E; ++e) CHECK(std::abs(probs(t, e) - S(1) / S(E)) <= eps<S>);

  // One expert: probability 1 whatever the logit.
  Matrix<S> one(3, 1), p1(3, 1);
  one << -1000, 0, 1000;
  moe::kernels::softmax_rows<S>(one, p1);
  CHECK((p1.array() == S(1)).all());
}

TEMPLATE_TEST_CASE("log_sum_exp matches a naive extended-precision value", "[kernels][softmax]",
                   float, double) {
  using S = TestType;
  const auto oracle = [](const std::vector<S>& row) {
    Long z = 0;
    for (const S v : row) z += std::exp(Long(v));
    return std::log(z);
  };
  const auto check = [&](const std::vector<S>& row) {
    const Long want = oracle(row);
    const S got = moe::kernels::log_sum_exp(row.data(), Index(row.size()));
    // relative to the size of the result (adding the max rounds at |result|), plus the sum
    const Long tol = Long(forward_tol<S>(Index(row.size()))) * std::max<Long>(1, std::abs(want));
    INFO("n = " << row.size() << ", want " << double(want) << ", got " << got);
    CHECK(std::abs(Long(got) - want) <= tol);
  };
  check({1000, 1000});                      // 1000 + ln 2
  check({-1000, -1000, -1000});             // -1000 + ln 3
  check({1000, -1000, 0, 999});             // dominated by the top two
  check({S(0.5)});                          // one entry: itself
  const Matrix<S> r = random_matrix<S>(1, 37, 5, 4.0);
  check(std::vector<S>(r.data(), r.data() + 37));

  // Hand values.
  const std::array<S, 2> two{1000, 1000};
  CHECK(std::abs(double(moe::kernels::log_sum_exp(two.data(), 2)) - (1000 + std::numbers::ln2)) <=
        4 * 1000 * double(eps<S>));
  const S single = S(-3.25);
  CHECK(moe::kernels::log_sum_exp(&single, 1) == S(-3.25));  // x + log(1), exact
}

TEMPLATE_TEST_CASE("top_k_row matches a stable-sort oracle (descending, ties to lowest index)",
                   "[kernels][top_k]", float, double) {
  using S = TestType;
  const auto oracle = [](const std::vector<S>& v, Index k) {
    std::vector<std::int32_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) { return v[std::size_t(a)] > v[std::size_t(b)]; });
    idx.resize(std::size_t(k));
    return idx;
  };
  const auto check = [&](const std::vector<S>& v, Index k) {
    constexpr std::int32_t sentinel = 12345;
    std::vector<std::int32_t> out(std::size_t(k + 1), sentinel);  // one past k: must stay untouched
    moe::kernels::top_k_row(v.data(), Index(v.size()), k, out.data());
    const auto want = oracle(v, k);
    INFO("E = " << v.size() << ", k = " << k);
    CHECK(std::vector<std::int32_t>(out.begin(), out.begin() + k) == want);
    CHECK(out[std::size_t(k)] == sentinel);
  };

  check({S(0.3)}, 1);                                  // E = 1
  check({1, 2, 3, 4, 5}, 5);                           // k = E, ascending input
  check({5, 4, 3, 2, 1}, 5);                           // k = E, already descending
  check(std::vector<S>(8, S(2)), 8);                   // all equal: 0..7
  check(std::vector<S>(13, S(-1)), 3);                 // all equal, k < E: 0, 1, 2
  check({S(0.0), S(-0.0), S(0.0)}, 2);                 // -0 == 0: still the lowest indices
  check({1, 3, 3, 0}, 1);                              // torch argmax case, docs/architecture.md
  check({S(.5), S(.2), S(.5), S(.2), S(.5)}, 4);       // torch stable-sort case, same page
  check({-5, -1, -3, -1, -2, -1}, 2);                  // negative values, ties on the max

  // Random rows on awkward widths, values quantized to halves so ties are frequent.
  const moe::CounterRng rng(9);
  for (const Index E : {2, 3, 7, 9, 13, 17, 31, 33, 64, 65})
    for (const Index k : {1, 2, 3, 4, 8, 17})
      if (k <= E) {
        std::vector<S> v(static_cast<std::size_t>(E));
        for (Index e = 0; e < E; ++e) v[std::size_t(e)] = S(std::floor(2 * rng.normal(std::uint64_t(E * 100 + k), std::uint64_t(e))) / 2);
        check(v, k);
        check(std::vector<S>(v.rbegin(), v.rend()), k);
      }
}

TEST_CASE("top_k_row with k = 0 writes nothing", "[kernels][top_k]") {
  // k = 0 is "choose nothing" (a dynamic-k token with no expert). The kernel must not touch
  // the output at all; out[-1] is a slot we own here so an out-of-bounds write is observable.
  const std::array<float, 3> v{0.f, 1.f, 2.f};
  std::array<std::int32_t, 2> buf{0, 77};
  moe::kernels::top_k_row(v.data(), 3, 0, buf.data() + 1);
  CHECK(buf[0] == 0);
  CHECK(buf[1] == 77);
}

TEMPLATE_TEST_CASE("gather_rows copies (and scales) token rows into slots", "[kernels][dispatch]",
                   float, double) {
  using S = TestType;
  const auto r = worked_routing<S>();
  constexpr Index D = 6;
  const Matrix<S> x = random_matrix<S>(5, D, 21);
  // slot -> token by hand: e0 {0, 1, pad}, e1 {0, 3, 4}, e2 {4}
  const std::array<int, 7> token_of{0, 1, -1, 0, 3, 4, 4};
  const std::array<double, 7> weight_of{0.6, 0.7, 0.0, 0.4, 0.5, 0.9, 0.1};

  SECTION("without scale: exact copies, padding slot zero") {
    Matrix<S> out = Matrix<S>::Constant(7, D, S(42));  // stale data must be overwritten
    moe::kernels::gather_rows<S>(x, r.slot_token, out);
    for (Index s = 0; s < 7; ++s)
      if (token_of[std::size_t(s)] < 0)
        CHECK((out.row(s).array() == S(0)).all());
      else
        CHECK(out.row(s) == x.row(token_of[std::size_t(s)]));
  }
  SECTION("with scale: one product per entry, so exact") {
    Matrix<S> out = Matrix<S>::Constant(7, D, S(42));
    moe::kernels::gather_rows<S>(x, r.slot_token, out, r.slot_weight);
    for (Index s = 0; s < 7; ++s)
      for (Index j = 0; j < D; ++j) {
        const int t = token_of[std::size_t(s)];
        const S want = t < 0 ? S(0) : S(weight_of[std::size_t(s)]) * x(t, j);
        CHECK(out(s, j) == want);
      }
  }
}

TEMPLATE_TEST_CASE("combine_rows adds each token's kept slots back", "[kernels][dispatch]", float,
                   double) {
  using S = TestType;
  const auto r = worked_routing<S>();
  constexpr Index D = 4;
  const Matrix<S> rows = random_matrix<S>(7, D, 31);  // one expert output per slot
  const Matrix<S> prior = random_matrix<S>(5, D, 32);
  const S tol = forward_tol<S>(3);  // at most two products and the prior

  // y by hand from the worked example (dropped choices and the masked token contribute nothing):
  //   y0 = .6 r0 + .4 r3,  y1 = .7 r1,  y2 = 0,  y3 = .5 r4,  y4 = .9 r5 + .1 r6
  const auto expected = [&](bool weighted) {
    const auto w = [&](double v) { return weighted ? Long(S(v)) : Long(1); };
    Matrix<Long> y = Matrix<Long>::Zero(5, D);
    const Matrix<Long> R = rows.template cast<Long>();
    y.row(0) = w(.6) * R.row(0) + w(.4) * R.row(3);
    y.row(1) = w(.7) * R.row(1);
    y.row(3) = w(.5) * R.row(4);
    y.row(4) = w(.9) * R.row(5) + w(.1) * R.row(6);
    return y;
  };
  const auto close = [&](const Matrix<S>& got, const Matrix<Long>& want) {
    const Long err = (got.template cast<Long>() - want).cwiseAbs().maxCoeff();
    INFO("max error " << double(err));
    CHECK(err <= Long(tol) * std::max<Long>(1, want.cwiseAbs().maxCoeff()));
  };

  SECTION("weighted, overwrite") {
    Matrix<S> y = Matrix<S>::Constant(5, D, S(42));
    moe::kernels::combine_rows<S>(r, r.slot_weight, rows, y, false);
    close(y, expected(true));
    CHECK((y.row(2).array() == S(0)).all());  // the masked token is zeroed, not left stale
  }
  SECTION("weighted, accumulate") {
    Matrix<S> y = prior;
    moe::kernels::combine_rows<S>(r, r.slot_weight, rows, y, true);
    close(y, expected(true) + prior.template cast<Long>());
    CHECK(y.row(2) == prior.row(2));
  }
  SECTION("empty weight span means weight 1") {
    Matrix<S> y = Matrix<S>::Constant(5, D, S(42));
    moe::kernels::combine_rows<S>(r, {}, rows, y, false);
    close(y, expected(false));
    Matrix<S> y2 = prior;
    moe::kernels::combine_rows<S>(r, {}, rows, y2, true);
    close(y2, expected(false) + prior.template cast<Long>());
  }
}

// =============================================================================================
// 4. Gemm
// =============================================================================================

namespace {

// C = alpha op(A) op(B) (+ C) on blocks of bigger matrices, against Eigen's own product in
// double (long double would be exact-er but is unvectorized and 5x slower in Debug builds).
// Both sides are within gamma_depth * (|alpha| |op A| |op B| + |C|) of the exact value per
// entry, so 8 depth eps bounds their difference with room to spare. |op A||op B| is bounded by
// the row and column norms (Cauchy-Schwarz), which saves a second product.
template <class S, bool TA, bool TB>
void check_gemm(moe::Gemm<S>& gemm, Index m, Index n, Index depth, S alpha, bool accumulate,
                std::uint64_t seed) {
  INFO("TransA " << TA << " TransB " << TB << ", m " << m << " n " << n << " depth " << depth
                 << ", alpha " << alpha << ", accumulate " << accumulate);
  const Index ar = TA ? depth : m, ac = TA ? m : depth;
  const Index br = TB ? n : depth, bc = TB ? depth : n;
  // A: middleRows (contiguous, offset); B and C: blocks whose row stride exceeds their width.
  const Matrix<S> A = random_matrix<S>(ar + 5, ac, seed);
  const Matrix<S> B = random_matrix<S>(br + 2, bc + 4, seed + 1);
  Matrix<S> C = random_matrix<S>(m + 3, n + 6, seed + 2);
  const Matrix<S> C0 = C;
  const auto a = A.middleRows(2, ar);
  const auto b = B.block(1, 3, br, bc);

  gemm.template run<TA, TB>(a, b, C.block(2, 5, m, n), alpha, accumulate);

  using D = double;
  Matrix<D> opa, opb;
  if constexpr (TA) opa = a.template cast<D>().transpose(); else opa = a.template cast<D>();
  if constexpr (TB) opb = b.template cast<D>().transpose(); else opb = b.template cast<D>();
  const Matrix<D> c0 = C0.block(2, 5, m, n).template cast<D>();
  Matrix<D> want = D(alpha) * (opa * opb);
  const Vector<D> row_norm = opa.rowwise().norm();
  const Vector<D> col_norm = opb.colwise().norm().transpose();
  Matrix<D> bound = std::abs(D(alpha)) * (row_norm * col_norm.transpose());
  if (accumulate) {
    want += c0;
    bound += c0.cwiseAbs();
  }
  const D tol = D(forward_tol<S>(depth));
  Index bad = 0;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j)
      bad += std::abs(D(C(2 + i, 5 + j)) - want(i, j)) > tol * bound(i, j);
  CHECK(bad == 0);

  // Nothing outside the C block was written (row stride respected).
  Index outside = 0;
  for (Index i = 0; i < C.rows(); ++i)
    for (Index j = 0; j < C.cols(); ++j) {
      const bool inside = i >= 2 && i < 2 + m && j >= 5 && j < 5 + n;
      outside += !inside && C(i, j) != C0(i, j);
    }
  CHECK(outside == 0);
}

template <class S>
void check_gemm_all(moe::Gemm<S>& gemm, Index m, Index n, Index depth, S alpha, bool acc,
                    std::uint64_t seed) {
  check_gemm<S, false, false>(gemm, m, n, depth, alpha, acc, seed);
  check_gemm<S, true, false>(gemm, m, n, depth, alpha, acc, seed + 10);
  check_gemm<S, false, true>(gemm, m, n, depth, alpha, acc, seed + 20);
  check_gemm<S, true, true>(gemm, m, n, depth, alpha, acc, seed + 30);
}

}  // namespace

TEMPLATE_TEST_CASE("Gemm matches Eigen's product for every transpose combination", "[gemm]",
                   float, double) {
  using S = TestType;
  moe::Gemm<S> gemm;  // one object for all shapes: its buffers grow and are reused
  struct Shape {
    Index m, n, depth;
  };
  // 300x200x150 splits the rows into several panels, 40x30x1500 splits the depth (Eigen picks
  // kc ~ 750 on a 48 KiB L1): partial sums across depth panels must accumulate with alpha. The
  // small shapes follow the big ones so reused (larger) buffers are exercised too.
  std::uint64_t seed = 1000;
  for (const Shape sh : {Shape{300, 200, 150}, Shape{40, 30, 1500}, Shape{1, 1, 1}, Shape{3, 4, 5},
                         Shape{17, 33, 65}, Shape{2, 3, 4}, Shape{64, 9, 300}}) {
    check_gemm_all<S>(gemm, sh.m, sh.n, sh.depth, S(1), false, seed += 100);
    check_gemm_all<S>(gemm, sh.m, sh.n, sh.depth, S(-0.5), true, seed += 100);
    check_gemm_all<S>(gemm, sh.m, sh.n, sh.depth, S(2.5), false, seed += 100);
  }
}

TEMPLATE_TEST_CASE("Gemm on degenerate shapes", "[gemm]", float, double) {
  using S = TestType;
  moe::Gemm<S> gemm;
  // Through the oracle helper: 0 rows, 0 columns, depth 0, with and without accumulate.
  for (const bool acc : {false, true}) {
    check_gemm_all<S>(gemm, 0, 5, 7, S(1.5), acc, 1);
    check_gemm_all<S>(gemm, 5, 0, 7, S(1.5), acc, 2);
    check_gemm_all<S>(gemm, 5, 7, 0, S(1.5), acc, 3);
  }
  // Depth 0 by hand: the empty sum is 0, so C is zeroed, or left alone when accumulating.
  const Matrix<S> a(4, 0), b(0, 3);
  Matrix<S> c = Matrix<S>::Constant(4, 3, S(9));
  gemm.template run<false, false>(a, b, c, S(2), true);
  CHECK((c.array() == S(9)).all());
  gemm.template run<false, false>(a, b, c, S(2), false);
  CHECK((c.array() == S(0)).all());
  // A tiny product by hand: [1 2; 3 4] * [5; 6] = [17; 39], alpha 2, accumulate onto [1; 1].
  Matrix<S> a2(2, 2), b2(2, 1), c2(2, 1);
  a2 << 1, 2, 3, 4;
  b2 << 5, 6;
  c2 << 1, 1;
  gemm.template run<false, false>(a2, b2, c2, S(2), true);
  CHECK(c2(0, 0) == S(35));
  CHECK(c2(1, 0) == S(79));
  // A^T with A = [1 2; 3 4]: [1 3; 2 4] * [5; 6] = [23; 34]
  gemm.template run<true, false>(a2, b2, c2);
  CHECK(c2(0, 0) == S(23));
  CHECK(c2(1, 0) == S(34));
}

TEMPLATE_TEST_CASE("Gemm with B packed ahead gives the bits of run(a, b, c), or falls back to b",
                   "[gemm]", float, double) {
  using S = TestType;
  moe::Gemm<S> gemm;
  moe::kernels::PackedB<S> packed;
  // 300 columns take the kernel (packed B used); 200 stay on Eigen's product (packed B unused).
  for (const Index n : {Index(300), Index(200)}) {
    INFO("n " << n);
    const Matrix<S> a = random_matrix<S>(37, 260, 7), b = random_matrix<S>(260, n, 8);
    Matrix<S> plain(37, n), ahead(37, n);
    packed.pack(b);
    gemm.run(a, b, plain);
    gemm.run(a, b, packed, ahead);
    CHECK(plain == ahead);
    // accumulating, A transposed
    const Matrix<S> at = a.transpose();
    gemm.template run<true, false>(at, b, plain, S(0.5), true);
    gemm.template run<true, false>(at, b, packed, ahead, S(0.5), true);
    CHECK(plain == ahead);
  }
  // B^T packed (pack<true>), and a packed copy of another shape (b itself is used then)
  const Matrix<S> a = random_matrix<S>(5, 64, 9), bt = random_matrix<S>(290, 64, 10);
  Matrix<S> plain(5, 290), ahead(5, 290), other(5, 290);
  packed.template pack<true>(bt);
  gemm.template run<false, true>(a, bt, plain);
  gemm.template run<false, true>(a, bt, packed, ahead);
  CHECK(plain == ahead);
  packed.pack(random_matrix<S>(65, 290, 11));
  gemm.template run<false, true>(a, bt, packed, other);
  CHECK(plain == other);
}

// =============================================================================================
// 5. CounterRng
// =============================================================================================

TEST_CASE("CounterRng is a pure function of its key", "[rng]") {
  const moe::CounterRng a(42, 3), b(42, 3);
  CHECK(a.bits(5, 6, 7) == b.bits(5, 6, 7));
  CHECK(a.uniform(5, 6) == b.uniform(5, 6));
  CHECK(a.normal(5, 6) == b.normal(5, 6));
  CHECK(a.gumbel(5, 6) == b.gumbel(5, 6));
  // Call order does not matter (no hidden state).
  const double first = a.uniform(1, 2);
  (void)a.uniform(3, 4);
  CHECK(a.uniform(1, 2) == first);

  // Every coordinate of the key matters, and (token, expert) is not symmetric.
  std::set<std::uint64_t> seen;
  std::size_t draws = 0;
  for (std::uint64_t seed = 0; seed < 4; ++seed)
    for (std::uint64_t step = 0; step < 4; ++step) {
      const moe::CounterRng rng(seed, step);
      for (std::uint64_t t = 0; t < 4; ++t)
        for (std::uint64_t e = 0; e < 4; ++e)
          for (std::uint64_t lane = 0; lane < 4; ++lane, ++draws) seen.insert(rng.bits(t, e, lane));
    }
  CHECK(seen.size() == draws);
  CHECK(a.bits(1, 2) != a.bits(2, 1));
  CHECK(moe::CounterRng(1, 0).bits(0, 0) != moe::CounterRng(0, 1).bits(0, 0));
}

TEST_CASE("CounterRng moments on 1e5 draws", "[rng]") {
  constexpr int N = 100000;
  const double sqrtN = std::sqrt(double(N));
  constexpr double z = 5;  // 5 standard errors: a false alarm has probability ~6e-7
  const moe::CounterRng rng(2024, 1);

  SECTION("uniform: in (0, 1), mean 1/2, variance 1/12") {
    double sum = 0, sq = 0;
    int outside = 0;
    for (int i = 0; i < N; ++i) {
      const double u = rng.uniform(std::uint64_t(i), 3);
      outside += !(u > 0 && u < 1);
      sum += u;
      sq += u * u;
    }
    const double mean = sum / N, var = sq / N - mean * mean;
    CHECK(outside == 0);
    CHECK(std::abs(mean - 0.5) <= z * std::sqrt(1.0 / 12) / sqrtN);
    // Var of the sample variance of U(0,1): (mu4 - sigma^4) / N = (1/80 - 1/144) / N = 1/(180 N)
    CHECK(std::abs(var - 1.0 / 12) <= z * std::sqrt(1.0 / 180) / sqrtN);
  }
  SECTION("normal: mean 0, variance 1") {
    double sum = 0, sq = 0;
    for (int i = 0; i < N; ++i) {
      const double x = rng.normal(std::uint64_t(i), 11);
      sum += x;
      sq += x * x;
    }
    const double mean = sum / N, var = sq / N - mean * mean;
    CHECK(std::abs(mean) <= z / sqrtN);
    CHECK(std::abs(var - 1) <= z * std::sqrt(2.0) / sqrtN);  // (mu4 - 1)/N = 2/N
  }
  SECTION("gumbel: mean Euler-Mascheroni, variance pi^2/6") {
    double sum = 0, sq = 0;
    for (int i = 0; i < N; ++i) {
      const double g = rng.gumbel(std::uint64_t(i), 17);
      sum += g;
      sq += g * g;
    }
    const double mean = sum / N, var = sq / N - mean * mean;
    const double sigma2 = std::numbers::pi * std::numbers::pi / 6;
    CHECK(std::abs(mean - std::numbers::egamma) <= z * std::sqrt(sigma2) / sqrtN);
    // Gumbel excess kurtosis is 12/5, so Var(sample variance) = (2 + 12/5) sigma^4 / N
    CHECK(std::abs(var - sigma2) <= z * std::sqrt(2 + 2.4) * sigma2 / sqrtN);
  }
}

TEST_CASE("CounterRng::uniform stays inside the open interval for the extreme bit pattern",
          "[rng]") {
  // uniform() maps 53 random bits x to (x + 0.5) 2^-53. For x = 2^53 - 1 the sum 2^53 - 0.5
  // needs 54 bits and rounds to 2^53, i.e. u == 1.0 and gumbel = -log(-log 1) = +inf. Such a
  // key exists for every (seed, step, token): build the expert that produces all-ones bits,
  // using only that the last two mixing steps are SplitMix64 over (h ^ expert) and (h ^ lane).
  const moe::CounterRng rng(7, 0);
  const std::uint64_t token = 3;
  const std::uint64_t h = unmix(unmix(rng.bits(token, 0, 0)));  // state before the expert is mixed in
  const std::uint64_t expert = unmix(unmix(~0ull)) ^ h;
  REQUIRE(rng.bits(token, expert, 0) == ~0ull);  // the construction itself

  const double u = rng.uniform(token, expert);
  CHECK(u > 0);
  CHECK(u < 1);
  CHECK(std::isfinite(rng.gumbel(token, expert)));
}

// =============================================================================================
// 6. routing.hpp
// =============================================================================================

TEMPLATE_TEST_CASE("conversions of a hand-built SparseRouting", "[routing]", float, double) {
  using S = TestType;
  const auto r = worked_routing<S>();
  REQUIRE(r.num_slots() == 7);
  REQUIRE(r.num_choices() == 8);

  CHECK(moe::max_choices(r) == 2);
  CHECK(moe::dense_capacity(r) == 3);  // experts 0 and 1 have 3 slots
  CHECK(r.num_dropped() == 2);
  CHECK(r.slots_of(0) == 3);
  CHECK(r.slots_of(2) == 1);

  SECTION("to_topk_form") {
    moe::IndexMatrix experts = moe::IndexMatrix::Constant(1, 1, 99);
    Matrix<S> weights = Matrix<S>::Constant(2, 7, S(99));
    moe::to_topk_form(r, experts, weights);
    moe::IndexMatrix want_e(5, 2);
    want_e << 0, 1,  //
        0, 2,        // second choice dropped: expert kept, weight 0
        -1, -1,      // masked token: no choices
        1, 0,        //
        1, 2;
    Matrix<S> want_w(5, 2);
    want_w << S(.6), S(.4), S(.7), 0, 0, 0, S(.5), 0, S(.9), S(.1);
    CHECK(experts == want_e);
    CHECK(weights == want_w);
  }
  SECTION("to_routing_map") {
    moe::IndexMatrix map;
    Matrix<S> probs;
    moe::to_routing_map(r, map, probs);
    moe::IndexMatrix want_map(5, 3);
    want_map << 1, 1, 0,  //
        1, 0, 0,          // the dropped pair (1, e2) is off the map
        0, 0, 0,          //
        0, 1, 0,          //
        0, 1, 1;
    Matrix<S> want_p(5, 3);
    want_p << S(.6), S(.4), 0, S(.7), 0, 0, 0, 0, 0, 0, S(.5), 0, 0, S(.9), S(.1);
    CHECK(map == want_map);
    CHECK(probs == want_p);
  }
  SECTION("to_dispatch_combine") {
    Matrix<S> dispatch, combine;
    moe::to_dispatch_combine(r, dispatch, combine);
    REQUIRE(dispatch.rows() == 5);
    REQUIRE(dispatch.cols() == 3 * 3);  // E * C with C = dense_capacity = 3
    REQUIRE(combine.rows() == 5);
    REQUIRE(combine.cols() == 9);
    // docs/architecture.md (The routing contract): D in {0, 1}, at most one 1 per (e, c), W = D *
    // weight.
    CHECK((dispatch.array() * (dispatch.array() - 1) == 0).all());
    CHECK((dispatch.colwise().sum().array() <= 1).all());
    for (Index t = 0; t < 5; ++t)
      for (Index col = 0; col < 9; ++col) {
        const S w = combine(t, col);
        CHECK(((dispatch(t, col) == 0 && w == 0) || (dispatch(t, col) == 1 && w > 0)));
      }
    // Positions by hand: column e*3 + c.
    Matrix<S> want_c = Matrix<S>::Zero(5, 9);
    want_c(0, 0) = S(.6);  // e0 c0
    want_c(1, 1) = S(.7);  // e0 c1; column 2 is e0's padding slot
    want_c(0, 3) = S(.4);  // e1 c0
    want_c(3, 4) = S(.5);  // e1 c1
    want_c(4, 5) = S(.9);  // e1 c2
    want_c(4, 6) = S(.1);  // e2 c0; columns 7, 8 do not exist for e2
    CHECK(combine == want_c);
    CHECK(dispatch == Matrix<S>((want_c.array() != 0).template cast<S>()));
  }
  SECTION("to_dispatch_combine with expert blocks that are not multiples of C") {
    // e0 has 1 slot, e1 has 2 (C = 2): e1's slots start at global slot 1, not at 1 * C.
    const auto u = build_routing<S>(2, {1, 2}, {{0, 0, 0, 0.25}, {0, 1, 1, 0.75}, {1, 1, 0, 0.5}},
                                    {1, 1}, 2);
    Matrix<S> dispatch, combine;
    moe::to_dispatch_combine(u, dispatch, combine);
    Matrix<S> want_c(2, 4);
    want_c << S(.25), 0, 0, S(.75),  // e0 c0, e1 c1
        0, 0, S(.5), 0;              // e1 c0
    CHECK(combine == want_c);
    CHECK(dispatch == Matrix<S>((want_c.array() != 0).template cast<S>()));
  }
}

TEMPLATE_TEST_CASE("routing statistics of a hand-built SparseRouting", "[routing]", float, double) {
  using S = TestType;
  const auto r = worked_routing<S>();
  // counts per expert: e0 = 2 (tokens 0, 1), e1 = 3 (tokens 0, 3, 4), e2 = 1 (token 4)
  REQUIRE(r.expert_count == std::vector<Index>{2, 3, 1});
  constexpr double tight = 8 * eps<double>;  // a few roundings of double arithmetic

  CHECK(moe::drop_fraction(r) == Approx(2.0 / 8).epsilon(tight));  // 2 of 8 pairs dropped
  // mean 2, deviations (0, 1, -1), population variance 2/3: cv = sqrt(2/3) / 2 = sqrt(1/6)
  CHECK(moe::load_cv(r) == Approx(std::sqrt(1.0 / 6)).epsilon(tight));
  CHECK(moe::max_mean_load(r) == Approx(1.5).epsilon(tight));  // 3 / mean 2
  CHECK(moe::experts_per_token(r) == Approx(6.0 / 4).epsilon(tight));  // 6 kept pairs, 4 real tokens

  SECTION("router_entropy, with and without a mask") {
    Matrix<S> probs(5, 3);
    probs << S(.5), S(.5), 0,        // ln 2 (0 log 0 = 0)
        1, 0, 0,                     // 0
        S(1. / 3), S(1. / 3), S(1. / 3),  // ln 3: masked out below
        S(.25), S(.25), S(.5),       // 1.5 ln 2
        S(.5), S(.25), S(.25);       // 1.5 ln 2
    const std::vector<std::uint8_t> valid{1, 1, 0, 1, 1};
    const double ln2 = std::numbers::ln2, ln3 = std::log(3.0);
    const double tol = 4 * double(eps<S>);  // probabilities rounded to S
    // masked: (ln2 + 0 + 1.5 ln2 + 1.5 ln2) / 4 = ln 2
    CHECK(std::abs(moe::router_entropy<S>(probs, valid) - ln2) <= tol);
    CHECK(std::abs(moe::router_entropy<S>(probs) - (4 * ln2 + ln3) / 5) <= tol);
    // every token masked: no tokens, entropy 0 rather than 0/0
    const std::vector<std::uint8_t> none(5, 0);
    CHECK(moe::router_entropy<S>(probs, none) == 0.0);
  }
}

TEMPLATE_TEST_CASE("reset and the empty routing", "[routing]", float, double) {
  using S = TestType;
  auto r = worked_routing<S>();
  const auto slot_cap = r.slot_token.capacity();

  SECTION("reset keeps an empty routing of the new shape and its memory") {
    r.reset(4, 6);
    CHECK(r.num_tokens == 4);
    CHECK(r.num_experts == 6);
    CHECK(r.num_valid_tokens == 0);
    CHECK(r.capacity == -1);
    CHECK(r.expert_offsets == std::vector<Index>(7, 0));
    CHECK(r.expert_count == std::vector<Index>(6, 0));
    CHECK(r.token_offsets == std::vector<Index>(5, 0));
    CHECK(r.num_slots() == 0);
    CHECK(r.slot_weight.empty());
    CHECK(r.num_choices() == 0);
    CHECK(r.choice_slot.empty());
    CHECK(r.slot_token.capacity() >= slot_cap);  // no memory given back
    CHECK(moe::max_choices(r) == 0);
    CHECK(moe::dense_capacity(r) == 0);
    for (Index e = 0; e < 6; ++e) CHECK(r.slots_of(e) == 0);
  }
  SECTION("T = 0: every statistic is 0, every conversion empty") {
    r.reset(0, 4);
    CHECK(r.token_offsets == std::vector<Index>{0});
    CHECK(r.num_dropped() == 0);
    CHECK(moe::drop_fraction(r) == 0.0);
    CHECK(moe::load_cv(r) == 0.0);
    CHECK(moe::max_mean_load(r) == 0.0);
    CHECK(moe::experts_per_token(r) == 0.0);
    CHECK(moe::max_choices(r) == 0);
    moe::IndexMatrix experts, map;
    Matrix<S> weights, probs, dispatch, combine;
    moe::to_topk_form(r, experts, weights);
    CHECK(experts.size() == 0);
    CHECK(weights.size() == 0);
    moe::to_routing_map(r, map, probs);
    CHECK(map.rows() == 0);
    CHECK(map.cols() == 4);
    CHECK(probs.rows() == 0);
    moe::to_dispatch_combine(r, dispatch, combine);
    CHECK(dispatch.size() == 0);
    CHECK(combine.size() == 0);
    CHECK(moe::router_entropy<S>(Matrix<S>(0, 4)) == 0.0);
    const Matrix<S> rows(0, 3);
    Matrix<S> y(0, 3);
    moe::kernels::combine_rows<S>(r, {}, rows, y, false);  // must not touch anything
  }
  SECTION("a default-constructed routing is empty too") {
    const moe::SparseRouting<S> empty;
    CHECK(moe::max_choices(empty) == 0);
    CHECK(moe::dense_capacity(empty) == 0);
    CHECK(moe::drop_fraction(empty) == 0.0);
    CHECK(moe::load_cv(empty) == 0.0);
    CHECK(moe::max_mean_load(empty) == 0.0);
    CHECK(moe::experts_per_token(empty) == 0.0);
  }
}

// =============================================================================================
// 7. argument checks
// =============================================================================================

TEMPLATE_TEST_CASE("check_shape, check_tokens and check_finite name argument and value",
                   "[validate]", float, double) {
  using S = TestType;

  SECTION("check_shape") {
    const Matrix<S> x(2, 3);
    CHECK_NOTHROW(moe::detail::check_shape("f", "x", x, 2, 3));
    REQUIRE_THROWS_AS(moe::detail::check_shape("f", "x", x, 3, 3), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::detail::check_shape("f", "x", x, 3, 3),
                        "moe: f: argument 'x' = [2 x 3] violates: shape [3 x 3]");
    REQUIRE_THROWS_AS(moe::detail::check_shape("f", "x", x, 2, 4), moe::shape_error);
  }
  SECTION("check_tokens") {
    const std::vector<std::uint8_t> valid3(3, 1), valid4(4, 1);
    const std::vector<std::int32_t> seg5(5, 0), seg4(4, 0);
    const std::vector<S> noise7(7, S(0)), noise8(8, S(0)), jitter12(12, S(0));
    CHECK_NOTHROW(moe::detail::check_tokens("f", moe::TokenInputs<S>{}, 4, 2));  // all absent
    CHECK_NOTHROW(moe::detail::check_tokens(
        "f", moe::TokenInputs<S>{.valid = valid4, .segment = seg4, .normal = noise8, .gumbel = noise8,
                                 .uniform = noise8, .second_uniform = std::span<const S>(noise8).first(4), .jitter = jitter12}, 4, 2, 3));

    const moe::TokenInputs<S> bad_valid{.valid = valid3};
    REQUIRE_THROWS_AS(moe::detail::check_tokens("f", bad_valid, 4, 2), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::detail::check_tokens("f", bad_valid, 4, 2),
                        "moe: f: argument 'tokens.valid' = 3 violates: length 0 (absent) or 4");
    const moe::TokenInputs<S> bad_seg{.segment = seg5};
    REQUIRE_THROWS_WITH(moe::detail::check_tokens("f", bad_seg, 4, 2),
                        Contains("argument 'tokens.segment' = 5") && Contains("or 4"));
    // every draw tensor by its own name and shape: [T, E] = 8, [T] = 4, [T, D] = 12
    const auto rejects = [&](const moe::TokenInputs<S>& in, const char* name, const char* rule) {
      REQUIRE_THROWS_AS(moe::detail::check_tokens("f", in, 4, 2, 3), moe::shape_error);
      REQUIRE_THROWS_WITH(moe::detail::check_tokens("f", in, 4, 2, 3), Contains(name) && Contains(rule));
    };
    rejects({.normal = noise7}, "argument 'tokens.normal' = 7", "or 8");
    rejects({.gumbel = noise7}, "argument 'tokens.gumbel' = 7", "or 8");
    rejects({.uniform = noise7}, "argument 'tokens.uniform' = 7", "or 8");
    rejects({.second_uniform = noise8}, "argument 'tokens.second_uniform' = 8", "or 4");
    rejects({.jitter = noise8}, "argument 'tokens.jitter' = 8", "or 12");
    // without a scorer (dim < 0) the jitter is not read, so not checked
    CHECK_NOTHROW(moe::detail::check_tokens("f", moe::TokenInputs<S>{.jitter = noise8}, 4, 2));
  }
  SECTION("rows() slices each draw tensor by its own width and records the first token") {
    std::vector<S> normal(8), second(4);
    std::iota(normal.begin(), normal.end(), S(0));
    std::iota(second.begin(), second.end(), S(10));
    const moe::TokenInputs<S> all{.normal = normal, .second_uniform = second, .jitter = normal};
    const auto part = all.rows(1, 2, 2);
    REQUIRE(part.normal.size() == 4);
    CHECK(part.normal[0] == S(2));
    CHECK(part.second_uniform.size() == 2);
    CHECK(part.second_uniform[0] == S(11));
    CHECK(part.jitter.empty());
    CHECK(part.first == 1);
    CHECK(part.rows(1, 1, 2).first == 2);
  }
  SECTION("check_finite reports the first offending entry in row-major order") {
    Matrix<S> m = Matrix<S>::Zero(3, 4);
    CHECK_NOTHROW(moe::detail::check_finite<S>("f", "logits", m));
    m(1, 2) = std::numeric_limits<S>::quiet_NaN();
    m(2, 0) = std::numeric_limits<S>::infinity();
    REQUIRE_THROWS_AS(moe::detail::check_finite<S>("f", "logits", m), moe::value_error);
    REQUIRE_THROWS_WITH(moe::detail::check_finite<S>("f", "logits", m),
                        "moe: f: argument 'logits' = nan at (1, 2) violates: every entry finite "
                        "(no NaN or Inf)");
    m(1, 2) = 0;
    REQUIRE_THROWS_WITH(moe::detail::check_finite<S>("f", "logits", m), Contains("'logits' = inf at (2, 0)"));
    m(2, 0) = -std::numeric_limits<S>::infinity();
    REQUIRE_THROWS_WITH(moe::detail::check_finite<S>("f", "logits", m), Contains("= -inf at (2, 0)"));
    // a block of a bigger matrix: coordinates are the block's own
    Matrix<S> big = Matrix<S>::Zero(5, 6);
    big(3, 4) = std::numeric_limits<S>::quiet_NaN();
    REQUIRE_THROWS_WITH(moe::detail::check_finite<S>("f", "logits", big.block(2, 1, 3, 4)),
                        Contains("nan at (1, 3)"));
  }
}
