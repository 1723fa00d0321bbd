// Every SIMD kernel against its scalar twin on awkward sizes: one token, expert counts that are
// not a multiple of the SIMD width, k = E, all-equal values, values near +-1e3.
#include <cfloat>
#include <cstring>
#include <numbers>
#include <numeric>
#include <string>
#include <vector>

#include "support.hpp"

using namespace moe_test;
namespace k = moe::kernels;

namespace {
const std::vector<Index> awkward_widths = {1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 33, 64, 100, 128, 256};  // 128, 256: whole AVX-512 registers

// Logits of the chosen flavour: random, all equal, large, or rounded to integers.
template <class S>
Matrix<S> logits_of(Index T, Index E, int flavour, std::uint64_t seed) {
  Matrix<S> m = random_matrix<S>(T, E, seed, 2.0);
  if (flavour == 1) m.setConstant(S(0.25));
  if (flavour == 2) m = (m.array() * S(300)).matrix();  // entries reach +-1e3
  if (flavour == 3) m = m.array().round().matrix();      // a few levels: ties below the top too
  return m;
}

// max |a - b| relative to max(1, |b|).
template <class S>
double max_rel(const Matrix<S>& a, const Matrix<S>& b) {
  return ((a - b).cwiseAbs().array() / b.cwiseAbs().array().max(S(1))).maxCoeff();
}
}  // namespace

TEST_CASE("simd_target names the instruction set the compiler flags select", "[kernel]") {
  const std::string target = moe::simd_target();
  // the widest set the predefined macros announce, in xsimd's names
#if defined(__AVX512BW__)
  REQUIRE(target == "avx512bw");
#elif defined(__AVX512F__)
  REQUIRE(target.rfind("avx512", 0) == 0);
#elif defined(__AVX2__) && defined(__FMA__)
  REQUIRE(target == "fma3+avx2");
#elif defined(__AVX2__)
  REQUIRE(target == "avx2");
#elif defined(__SSE2__)
  REQUIRE(target.find("sse") != std::string::npos);
#else
  REQUIRE_FALSE(target.empty());
#endif
  REQUIRE(target == xsimd::default_arch::name());
  REQUIRE((k::width<float> * sizeof(float) == xsimd::default_arch::alignment() || k::width<float> == 1));
}

TEMPLATE_TEST_CASE("softmax kernel matches its twin", "[kernel]", float, double) {
  using S = TestType;
  for (Index T : {1, 5, 37})  // 37: whole token-parallel blocks (E below the SIMD width) and a tail
    for (Index E : awkward_widths)
      for (int flavour : {0, 1, 2}) {
        const Matrix<S> l = logits_of<S>(T, E, flavour, E);
        Matrix<S> simd(T, E), twin(T, E);
        k::softmax_rows<S>(l, simd);
        k::scalar::softmax_rows<S>(l, twin);
        Matrix<S> wide_in(T, E + 3), wide_out(T, E + 3);  // strided rows: gathered, not transposed
        wide_in.leftCols(E) = l;
        k::softmax_rows<S>(wide_in.leftCols(E), wide_out.leftCols(E));
        REQUIRE(Matrix<S>(wide_out.leftCols(E)) == simd);
        INFO("T " << T << " E " << E << " flavour " << flavour);
        // exp to ~1 ulp per term, a sum of E terms in a different order
        REQUIRE(max_rel(simd, twin) <= forward_tol<S>(E));
        for (Index t = 0; t < T; ++t) REQUIRE(std::abs(double(simd.row(t).sum()) - 1.0) <= forward_tol<S>(E));
      }
}

TEMPLATE_TEST_CASE("streamed softmax matches its twin", "[kernel]", float, double) {
  using S = TestType;
  std::vector<S> scratch;
  // short rows (the in-register kernels), and rows of 16 batches and more (streamed)
  for (Index E : {Index(3), Index(64), Index(255), Index(256), Index(300), Index(512)})
    for (int flavour : {0, 1, 2}) {
      const Matrix<S> l = logits_of<S>(37, E, flavour, E);
      Matrix<S> simd(37, E), twin(37, E);
      k::softmax_rows_streamed<S>(l, simd, scratch);
      k::scalar::softmax_rows<S>(l, twin);
      INFO("E " << E << " flavour " << flavour);
      REQUIRE(max_rel(simd, twin) <= forward_tol<S>(E));
    }
}

TEMPLATE_TEST_CASE("column softmax into the transpose matches its twin, by blocks of row groups", "[kernel]", float, double) {
  using S = TestType;
  constexpr Index G = k::column_group<S>;
  for (Index T : {Index(1), Index(5), G - 1, G, 2 * G + 7, 3 * G})
    for (Index N : {1, 3, 16, 17, 33, 64})
      for (int flavour : {0, 1, 2})
        for (int mask : {0, 1, 2}) {  // none; every third row padding; and the second group all padding
          const Matrix<S> x = logits_of<S>(T, N, flavour, std::uint64_t(T * 100 + N));
          std::vector<std::uint8_t> valid(std::size_t(T), 1);
          for (Index t = 0; t < T; ++t)
            if ((mask == 1 && t % 3 == 0) || (mask == 2 && t / G == 1)) valid[std::size_t(t)] = 0;
          const std::uint8_t* v = mask ? valid.data() : nullptr;
          const Index groups = (T + G - 1) / G;
          // the whole batch at once, and in blocks of one group's rows and of one batch's columns
          // (as the selector runs it): the same bits
          Matrix<S> top(groups, N), sum(groups, N), out(N, T), twin(N, T);
          k::column_softmax_groups<S>(x, v, top, sum, out);
          k::column_softmax_scale<S>(top, sum, out);
          Matrix<S> top2(groups, N), sum2(groups, N), out2(N, T);
          for (Index g = 0; g < groups; ++g) {
            const Index n = std::min(G, T - g * G);
            k::column_softmax_groups<S>(x.middleRows(g * G, n), v ? v + g * G : nullptr, top2.middleRows(g, 1),
                                        sum2.middleRows(g, 1), out2.middleCols(g * G, n));
          }
          constexpr Index w = Index(k::width<S>);  // column blocks of whole batches, as the selector's
          for (Index s = 0; s < N; s += w) {
            const Index n = std::min(w, N - s);
            k::column_softmax_scale<S>(top2.middleCols(s, n), sum2.middleCols(s, n), out2.middleRows(s, n));
          }
          k::scalar::column_softmax_transposed<S>(x, v, twin);
          INFO("T " << T << " N " << N << " flavour " << flavour << " mask " << mask);
          REQUIRE(out2 == out);
          // exp to ~1 ulp, the group's factor to ~2 more, a sum of T terms in another order
          REQUIRE(max_rel(out, twin) <= forward_tol<S>(T + 4));
          for (Index t = 0; t < T; ++t)
            if (!valid[std::size_t(t)] && mask) REQUIRE(out.col(t).isZero(0));
          if (std::count(valid.begin(), valid.end(), std::uint8_t(1)) > 0)
            for (Index s = 0; s < N; ++s) REQUIRE(std::abs(double(out.row(s).sum()) - 1.0) <= forward_tol<S>(T + 4));
        }
}

TEST_CASE("exp_approx is within 2 float epsilons (relative) of exp over the float range", "[kernel]") {
  for (float x = -87.0f; x < 88.7f; x += 0.173f) {
    const double want = std::exp(double(x));
    REQUIRE(std::abs(double(k::exp_approx(x)) - want) <= 2 * FLT_EPSILON * want);
  }
  // below FLT_MIN the result is a denormal: within one denormal step plus the relative error
  for (float x = -103.9f; x < -87.0f; x += 0.0731f) {
    const double want = std::exp(double(x));
    REQUIRE(std::abs(double(k::exp_approx(x)) - want) <= 2 * FLT_EPSILON * want + FLT_TRUE_MIN);
  }
  REQUIRE(k::exp_approx(-200.0f) == 0.0f);
  REQUIRE(k::exp_approx(-std::numeric_limits<float>::infinity()) == 0.0f);
  REQUIRE(std::isinf(k::exp_approx(89.0f)));
  REQUIRE(std::isinf(k::exp_approx(std::numeric_limits<float>::infinity())));
  REQUIRE(std::isnan(k::exp_approx(std::numeric_limits<float>::quiet_NaN())));
  REQUIRE(std::isfinite(k::exp_approx(88.72f)));  // just below FLT_MAX
}

TEST_CASE("a block of short rows loads and stores as columns (in-register transpose or gathers)", "[kernel]") {
  using B = k::Batch<float>;
  constexpr Index w = Index(B::size);
  const auto check = [&]<int N>() {
    for (Index stride : {Index(N), Index(N + 3)}) {  // contiguous rows (transposed), strided (gathered)
      std::vector<float> rows(std::size_t(w * stride)), back(rows.size(), -1.0f);
      std::iota(rows.begin(), rows.end(), 0.0f);
      const k::RowBlock<B, N> block(stride);
      REQUIRE(block.usable());
      B columns[N];
      block.load(rows.data(), columns);
      INFO("N " << N << " stride " << stride);
      for (int e = 0; e < N; ++e)
        for (Index i = 0; i < w; ++i) REQUIRE(columns[e].get(std::size_t(i)) == rows[std::size_t(i * stride + e)]);
      block.store(columns, back.data());
      for (Index i = 0; i < w; ++i)
        for (Index e = 0; e < stride; ++e)  // the row, and nothing written past it
          REQUIRE(back[std::size_t(i * stride + e)] == (e < N ? rows[std::size_t(i * stride + e)] : -1.0f));
    }
  };
  [&]<int... N>(std::integer_sequence<int, N...>) { (check.template operator()<N + 1>(), ...); }(std::make_integer_sequence<int, 16>{});
}

TEMPLATE_TEST_CASE("top-k kernel matches its twin, ties to the lowest index", "[kernel]", float, double) {
  using S = TestType;
  for (Index E : awkward_widths)
    for (int flavour : {0, 1, 2, 3})
      for (Index kk : {Index(1), Index(2), std::min<Index>(E, 8), E}) {
        if (kk > E) continue;
        Matrix<S> v = logits_of<S>(3, E, flavour, 100 + E);
        if (flavour == 0 && E > 4) v(1, E - 1) = v(1, 0) = v.row(1).maxCoeff();  // a tie at the top
        for (Index t = 0; t < 3; ++t) {
          std::vector<std::int32_t> simd(kk), twin(kk);
          k::top_k_row(v.row(t).data(), E, kk, simd.data());
          k::scalar::top_k_row(v.row(t).data(), E, kk, twin.data());
          INFO("E " << E << " k " << kk << " flavour " << flavour << " row " << t);
          REQUIRE(simd == twin);
        }
      }
}

TEST_CASE("top-k kernel: rows holding -inf fall back to the twin", "[kernel]") {
  Matrix<float> v = Matrix<float>::Constant(1, 16, -std::numeric_limits<float>::infinity());
  v(0, 5) = 1;
  std::vector<std::int32_t> simd(3), twin(3);
  k::top_k_row(v.row(0).data(), 16, 3, simd.data());
  k::scalar::top_k_row(v.row(0).data(), 16, 3, twin.data());
  REQUIRE(simd == twin);
  REQUIRE(simd == std::vector<std::int32_t>{5, 0, 1});
}

TEMPLATE_TEST_CASE("top-k over whole rows (paired and token-parallel) matches the twin row by row", "[kernel]", float, double) {
  using S = TestType;
  const S lowest = -std::numeric_limits<S>::infinity();
  for (Index T : {1, 2, 15, 16, 17, 37})  // odd counts: the unpaired last row, a partial group
    for (Index E : awkward_widths)
      for (int flavour : {0, 1, 2, 3})
        for (Index kk : {Index(1), Index(2), std::min<Index>(E, 8), E}) {
          if (kk > E) continue;
          // a view with a stride wider than its rows, as the router's blocks are
          Matrix<S> wide = logits_of<S>(T, E + 3, flavour, 200 + E);
          if (flavour == 0 && E > 4) wide(T / 2, E - 1) = wide(T / 2, 0) = wide.row(T / 2).head(E).maxCoeff();
          if (flavour == 2 && T > 3) wide.row(T - 2).head(E).setConstant(lowest), wide(T - 2, E / 2) = 0;  // -inf rows
          const auto v = wide.leftCols(E);
          const Matrix<S> packed = v;  // contiguous rows (short ones are transposed in registers)
          std::vector<std::int32_t> simd(std::size_t(T * kk)), twin(std::size_t(T * kk)), simd_packed(simd.size());
          k::top_k_rows<S>(v, kk, simd.data());
          k::top_k_rows<S>(packed, kk, simd_packed.data());
          for (Index t = 0; t < T; ++t) k::scalar::top_k_row(v.row(t).data(), E, kk, &twin[std::size_t(t * kk)]);
          INFO("T " << T << " E " << E << " k " << kk << " flavour " << flavour);
          REQUIRE(simd == twin);
          REQUIRE(simd_packed == twin);
        }
}

TEMPLATE_TEST_CASE("column sums match their twin", "[kernel]", float, double) {
  using S = TestType;
  for (Index T : {1, 3, 37, 1000})
    for (Index E : awkward_widths) {
      const Matrix<S> m = random_matrix<S>(T, E, 7).cwiseAbs();
      const auto n = static_cast<std::size_t>(E);
      std::vector<S> simd(n), twin(n), strided(n);
      k::column_sums<S>(m, simd.data());
      k::scalar::column_sums<S>(m, twin.data());
      const Matrix<S> wide = random_matrix<S>(T, E + 5, 7);
      k::column_sums<S>(wide.leftCols(E), strided.data());  // a strided view
      // nonnegative terms added in another order: each sum within T eps of its own size
      const double tol = double(T) * std::numeric_limits<S>::epsilon();
      INFO("T " << T << " E " << E);
      std::vector<std::uint8_t> valid(static_cast<std::size_t>(T));
      for (Index t = 0; t < T; ++t) valid[std::size_t(t)] = t % 3 != 1;
      std::vector<S> masked(n);
      k::column_sums<S>(m, masked.data(), valid);
      for (Index e = 0; e < E; ++e) {
        REQUIRE(std::abs(double(simd[e]) - double(twin[e])) <= tol * double(twin[e]));
        REQUIRE(std::abs(double(strided[e]) - double(wide.col(e).sum())) <= tol * double(wide.col(e).cwiseAbs().sum()));
        double kept = 0;  // the masked rows left out
        for (Index t = 0; t < T; ++t) kept += valid[std::size_t(t)] ? double(m(t, e)) : 0.0;
        REQUIRE(std::abs(double(masked[e]) - kept) <= tol * kept);
      }
    }
}

TEMPLATE_TEST_CASE("all_finite matches its twin", "[kernel]", float, double) {
  using S = TestType;
  for (Index E : awkward_widths) {
    Matrix<S> m = random_matrix<S>(4, E, 3);
    REQUIRE(k::all_finite<S>(m));
    for (S bad : {std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity(), -std::numeric_limits<S>::infinity()}) {
      Matrix<S> b = m;
      b(3, E - 1) = bad;
      REQUIRE(k::all_finite<S>(b) == k::scalar::all_finite<S>(b));
      REQUIRE_FALSE(k::all_finite<S>(b));
    }
  }
}

namespace {
// A routing with dropped choices and a padding slot, from a real selector.
moe::SparseRouting<float> sample_routing(Index T, Index E, Index kk, bool pad) {
  const Matrix<float> logits = random_matrix<float>(T, E, 8, 2.0);
  Matrix<float> scores(T, E);
  moe::SoftmaxGate<float>{}.forward(logits, scores);
  moe::TopKSelector<float> sel(kk, {.capacity = {.factor = 0.7, .pad = pad}});
  moe::SparseRouting<float> r;
  const moe::TokenInputs<float> tokens;
  sel.forward({logits, scores, scores, tokens}, r);
  return r;
}
}  // namespace

TEST_CASE("gather and combine kernels match their twins", "[kernel]") {
  for (Index D : {1, 7, 16, 33}) {
    const auto r = sample_routing(40, 5, 2, true);
    REQUIRE(r.num_dropped() > 0);
    const Matrix<float> x = random_matrix<float>(40, D, 2);
    Matrix<float> simd(r.num_slots(), D), twin(r.num_slots(), D);
    k::gather_rows<float>(x, r.slot_token, simd, r.slot_weight);
    k::scalar::gather_rows<float>(x, r.slot_token, twin, r.slot_weight);
    REQUIRE(simd == twin);  // one product per element: exact
    Matrix<float> y = random_matrix<float>(40, D, 4), y_twin = y;
    k::combine_rows<float>(r, r.slot_weight, simd, y, true);
    k::scalar::combine_rows<float>(r, r.slot_weight, twin, y_twin, true);
    REQUIRE(max_rel(y, y_twin) <= forward_tol<float>(3));
  }
}

TEST_CASE("gather with streaming stores (destination beyond the cache) matches its twin", "[kernel]") {
  const Index T = 3500, D = 2048;  // 70% of 2 choices per token kept: 4900 rows of 8 KiB > 32 MiB
  const auto r = sample_routing(T, 4, 2, false);
  const Matrix<float> x = random_matrix<float>(T, D, 3);
  Matrix<float> simd(r.num_slots(), D), twin(r.num_slots(), D);
  REQUIRE(std::size_t(simd.size()) * sizeof(float) > k::detail::streaming_threshold_bytes);
  k::gather_rows<float>(x, r.slot_token, simd);
  k::scalar::gather_rows<float>(x, r.slot_token, twin);
  REQUIRE(simd == twin);
}

TEST_CASE("slot assignment matches its twin for every order and capacity", "[kernel]") {
  // E = 6: the experts' offsets fit registers in the SIMD placing pass; E = 40: they are gathered
  const Index T = 50, kk = 2;
  const Index E = GENERATE(6, 40);
  auto r = sample_routing(T, E, kk, false);
  std::vector<std::int32_t> token(std::size_t(r.num_choices())), order(token.size());
  for (Index t = 0; t < T; ++t)
    for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) token[c] = std::int32_t(t);
  moe::CounterRng rng(5);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](auto a, auto b) { return rng.bits(a, 0) < rng.bits(b, 0); });  // a random priority
  std::vector<std::int32_t> identity(token.size()), by_rank;
  std::iota(identity.begin(), identity.end(), 0);
  for (Index rank = 0; rank < kk; ++rank)  // every token's first choice, then every second one
    for (Index t = 0; t < T; ++t) by_rank.push_back(std::int32_t(t * kk + rank));
  std::vector<float> weight(token.size());
  for (std::size_t c = 0; c < weight.size(); ++c) weight[c] = 1.0f + float(c);  // every slot's is its own
  for (Index cap : {Index(-1), Index(3), Index(17), Index(100)})
    for (bool pad : {false, true})
      for (bool token_order : {false, true})
        for (int sequence : {0, 1, 2})  // a random priority; implicit: choice order, rank by rank
          for (bool weighted : {false, true}) {
            if (pad && cap < 0) continue;
            const k::SlotRequest<float> q{.choice_token = token, .order = order,
                                          .weight = weighted ? std::span<const float>(weight) : std::span<const float>(),
                                          .capacity = cap, .pad = pad, .token_order = token_order};
            k::SlotRequest<float> implicit = q, spelled = q;
            implicit.order = {};
            implicit.ranks = sequence == 2 ? kk : 1;
            spelled.order = sequence == 2 ? by_rank : identity;
            auto a = r, b = r;
            std::vector<Index> cursor;
            k::assign_slots<float>(sequence == 0 ? q : implicit, a, cursor);
            k::scalar::assign_slots<float>(sequence == 0 ? q : spelled, b);
            INFO("capacity " << cap << " pad " << pad << " token order " << token_order << " sequence " << sequence
                              << " weighted " << weighted);
            REQUIRE(a.choice_slot == b.choice_slot);
            REQUIRE(a.slot_token == b.slot_token);
            REQUIRE(a.slot_weight == b.slot_weight);
            REQUIRE(a.expert_offsets == b.expert_offsets);
            REQUIRE(a.expert_count == b.expert_count);
          }
}

TEMPLATE_TEST_CASE("Sinkhorn kernels match their twins and balance the plan", "[kernel]", float, double) {
  using S = TestType;
  for (Index E : {1, 3, 8, 17})
    for (bool masked : {false, true}) {
      const Index T = 4 * E + 3;
      const Matrix<S> l = random_matrix<S>(T, E, 12, 1.5);
      std::vector<std::uint8_t> valid;
      if (masked) {
        valid.assign(std::size_t(T), 1);
        valid[1] = valid[std::size_t(T - 1)] = 0;
      }
      Matrix<S> simd(T, E), twin(T, E);
      k::SinkhornScratch<S> scratch;
      k::sinkhorn<S>(l, valid, 20, simd, scratch);
      k::scalar::sinkhorn<S>(l, valid, 20, twin);
      INFO("E " << E << " masked " << masked);
      // 20 rounds of products and sums of T or E terms: a loose multiple of the forward tolerance
      REQUIRE(max_rel(simd, twin) <= 20 * forward_tol<S>(T));
      for (Index t = 0; t < T; ++t) {
        const double want = masked && !valid[std::size_t(t)] ? 0.0 : 1.0;  // rows exact after the last u update
        REQUIRE(double(simd.row(t).sum()) == Approx(want).epsilon(forward_tol<S>(E)).margin(0));
      }
      // Megatron's form: the same rounds, so the same plan and the same count
      Matrix<S> msimd(T, E), mtwin(T, E);
      const int rounds = k::sinkhorn_until<S>(l, valid, 1e-4, 1000, msimd, scratch);
      REQUIRE(rounds == k::scalar::sinkhorn_until<S>(l, valid, 1e-4, 1000, mtwin));
      REQUIRE(max_rel(msimd, mtwin) <= 20 * forward_tol<S>(T));
    }
  // balance: columns approach n/E on separable logits after enough iterations
  const Matrix<S> l = random_matrix<S>(64, 4, 13, 0.5);
  Matrix<S> plan(64, 4);
  k::SinkhornScratch<S> scratch;
  k::sinkhorn<S>(l, {}, 200, plan, scratch);
  for (Index e = 0; e < 4; ++e) REQUIRE(double(plan.col(e).sum()) == Approx(16.0).epsilon(1e-3));
  // Megatron's marginals: rows 1/n, columns 1/E, once converged
  const int rounds = k::sinkhorn_until<S>(l, {}, 1e-7, 10000, plan, scratch);
  REQUIRE(rounds > 1);
  for (Index e = 0; e < 4; ++e) REQUIRE(double(plan.col(e).sum()) == Approx(0.25).epsilon(1e-4));
  for (Index t = 0; t < 64; ++t) REQUIRE(double(plan.row(t).sum()) == Approx(1.0 / 64).epsilon(1e-3));
  // logits of +-1e3: finite plans (the reference's exp overflows to NaN there)
  Matrix<S> huge = (random_matrix<S>(32, 4, 14).array() * S(1000)).matrix();
  k::sinkhorn<S>(huge, {}, 20, plan.topRows(32), scratch);
  REQUIRE(plan.topRows(32).allFinite());
  k::sinkhorn_until<S>(huge, {}, 1e-4, 1000, plan.topRows(32), scratch);
  REQUIRE(plan.topRows(32).allFinite());
}

TEMPLATE_TEST_CASE("codebook distances match their twin", "[kernel]", float, double) {
  using S = TestType;
  for (Index D : {1, 5, 16, 40}) {
    const Matrix<S> x = random_matrix<S>(9, D, 1), c = random_matrix<S>(6, D, 2);
    Matrix<S> simd(9, 6), twin(9, 6), norms;
    moe::Gemm<S> gemm;
    k::squared_distances<S>(x, c, simd, gemm, norms);
    k::scalar::squared_distances<S>(x, c, twin);
    // |x|^2 + |c|^2 - 2<x,c> cancels: the error scales with the norms, not with the distance
    const double scale = std::max(x.rowwise().squaredNorm().maxCoeff(), c.rowwise().squaredNorm().maxCoeff());
    REQUIRE((simd - twin).cwiseAbs().maxCoeff() <= 4 * scale * forward_tol<S>(D));
    REQUIRE(simd.minCoeff() >= 0);
    Matrix<S> negative(9, 6);  // the negated form (VQScorer's logits) is the same numbers, sign flipped
    k::squared_distances<S, true>(x, c, negative, gemm, norms);
    REQUIRE(negative == -simd);
  }
  Matrix<float> same = random_matrix<float>(3, 8, 4), d(3, 3), norms;  // a token on a code: distance 0, never negative
  moe::Gemm<float> gemm;
  k::squared_distances<float>(same, same, d, gemm, norms);
  for (Index i = 0; i < 3; ++i) REQUIRE(d(i, i) >= 0.0f);
}

TEMPLATE_TEST_CASE("per-column top-C matches its twin, ties to the lowest token", "[kernel]", float, double) {
  using S = TestType;
  // Small batches and large C take the exact path, T = 9000 with a small C the sampled candidates
  // (with an E that is not a whole number of registers); flavours 1 and 3 tie, so the candidate
  // path has to break ties among more than C equal entries exactly as the twin does. Every other
  // row of the mask is padding. At T = 9000 only the small C (the candidate path) are tried: a large
  // C takes the exact path that the small batches already cover, and costs the twin most.
  for (Index T : {1, 7, 40, 9000})
    for (Index C : T > 1000 ? std::vector<Index>{1, T / 64 + 1} : std::vector<Index>{1, T / 64 + 1, T / 2 + 1, T})
      for (int flavour : {0, 1, 3}) {
        const Index E = T > 1000 ? 67 : 5;
        const Matrix<S> v = logits_of<S>(T, E, flavour, 21);
        for (bool masked : {false, true})
          for (bool token_order : {false, true}) {
            std::vector<std::uint8_t> valid;
            Index n = T;
            if (masked) {
              valid.resize(std::size_t(T));
              for (Index t = 0; t < T; ++t) valid[std::size_t(t)] = std::uint8_t(t % 2 == 0);
              n = (T + 1) / 2;
            }
            const Index c = std::min(C, n);
            std::vector<std::int32_t> simd(std::size_t(E * c)), twin(simd.size());
            k::TopCScratch<S> scratch;
            k::top_c_per_column<S>(v, c, valid, n, simd, scratch, token_order);
            k::scalar::top_c_per_column<S>(v, c, valid, twin, token_order);
            INFO("T " << T << " C " << c << " flavour " << flavour << " masked " << masked << " token order " << token_order);
            REQUIRE(simd == twin);
          }
      }
}

TEMPLATE_TEST_CASE("small-E logits kernel matches its twin", "[kernel]", float, double) {
  using S = TestType;
  for (Index E : {4, 8, 16})
    for (Index T : {1, 2, 3, 7})
      for (Index D : {1, 15, 16, 37}) {
        const Matrix<S> x = random_matrix<S>(T, D, 31), w = random_matrix<S>(E, D, 32);
        Matrix<S> simd(T, E), twin(T, E);
        k::small_logits<S>(x, w, simd);
        k::scalar::small_logits<S>(x, w, twin);
        INFO("E " << E << " T " << T << " D " << D);
        REQUIRE(max_rel(simd, twin) <= forward_tol<S>(D) * std::sqrt(double(D)));
      }
}

namespace {
// C = alpha op(A) op(B) (+ C) through the GEBP kernel and through its twin, on views with an
// outer stride larger than their width (blocks of bigger matrices); C is NaN before an
// overwrite, so reading it would show, and the entries around the view must stay untouched.
template <class S, bool TransA, bool TransB>
void check_gemm(Index M, Index N, Index K, S alpha, bool accumulate, k::GemmBuffers<S>& buffers,
                k::PackedB<S>* packed = nullptr) {
  const Index ar = TransA ? K : M, ac = TransA ? M : K, br = TransB ? N : K, bc = TransB ? K : N;
  static Matrix<S> pool;  // the views are blocks of it: generated once, regrown only when too small
  const Index side = std::max({Index(1400), ar + 10, ac + 10, br + 10, bc + 10, M + 10, N + 10});
  if (pool.rows() < side) pool = random_matrix<S>(side, side, 41);
  const auto a = pool.block(1, 2, ar, ac);
  const auto b = pool.block(7, 3, br, bc);
  Matrix<S> c_all = pool.block(5, 1, M + 4, N + 6);
  if (!accumulate) c_all.block(3, 1, M, N).setConstant(std::numeric_limits<S>::quiet_NaN());
  const Matrix<S> c_before = c_all;
  Matrix<S> twin = c_all;
  if (packed) {  // B packed ahead (PackedB) rather than by the call
    packed->template pack<TransB>(b);
    k::gemm<TransA, S>(a, *packed, c_all.block(3, 1, M, N), alpha, accumulate, buffers);
  } else {
    k::gemm<TransA, TransB, S>(a, b, c_all.block(3, 1, M, N), alpha, accumulate, buffers);
  }
  k::scalar::gemm<TransA, TransB, S>(a, b, twin.block(3, 1, M, N), alpha, accumulate);
  // Each entry is a sum of K products plus C: kernel and twin are each within
  // gamma_(K+2) ~ (K + 2) eps of |alpha| sum_p |a_ip| |b_pj| + |c_ij| (Higham, eq. 3.5).
  Matrix<S> bound = accumulate ? Matrix<S>(c_before.block(3, 1, M, N).cwiseAbs()) : Matrix<S>::Zero(M, N);
  k::scalar::gemm<TransA, TransB, S>(a.cwiseAbs(), b.cwiseAbs(), bound, std::abs(alpha), true);
  const double gemm_tol = 2.0 * double(K + 2) * double(std::numeric_limits<S>::epsilon());
  INFO("M " << M << " N " << N << " K " << K << " transA " << TransA << " transB " << TransB << " accumulate "
              << accumulate << " packed B " << (packed != nullptr));
  double worst = 0;  // largest error in units of the entry's tolerance
  bool outside_kept = true;
  for (Index i = 0; i < M + 4; ++i)
    for (Index j = 0; j < N + 6; ++j) {
      if (i < 3 || i >= M + 3 || j < 1 || j >= N + 1) {
        outside_kept = outside_kept && c_all(i, j) == c_before(i, j);
        continue;
      }
      const double err = std::abs(double(c_all(i, j)) - double(twin(i, j)));
      const double limit = gemm_tol * double(bound(i - 3, j - 1)) + std::numeric_limits<S>::min();
      worst = std::isnan(err) ? INFINITY : std::max(worst, err / limit);
    }
  REQUIRE(outside_kept);
  REQUIRE(worst <= 1.0);
}
}  // namespace

TEMPLATE_TEST_CASE("GEMM kernel matches its twin on edge tiles, strides and transposes", "[kernel]", float, double) {
  using S = TestType;
  k::GemmBuffers<S> buffers;  // shared across shapes, as moe::Gemm reuses them
  int n_case = 0;
  for (Index M : {1, 2, 13, 14, 15, 29, 160})
    for (Index N : {1, 3, 17, 31, 32, 33, 100})
      for (Index K : {1, 3, 257, 1000}) {
        const bool accumulate = (n_case++ % 2) == 1;
        const S alpha = accumulate ? S(-0.75) : S(1.5);
        check_gemm<S, false, false>(M, N, K, alpha, accumulate, buffers);
        check_gemm<S, true, false>(M, N, K, alpha, !accumulate, buffers);
        check_gemm<S, false, true>(M, N, K, alpha, accumulate, buffers);
        check_gemm<S, true, true>(M, N, K, alpha, !accumulate, buffers);
      }
}

TEST_CASE("GEMM kernel: several row and depth blocks, and repeat calls give the same bits", "[kernel]") {
  using K = k::gebp::Blocking<float>;
  k::GemmBuffers<float> buffers;
  // A blocks hold the whole depth unless that leaves fewer than rows_min rows: a depth of 389
  // leaves room for a_elements / 389 rows (two row blocks here); rows_min rows leave room for a
  // depth of a_elements / rows_min (two depth blocks here).
  const Index tall = K::a_elements / 389 + 20, deep = K::a_elements / K::rows_min + 130;
  check_gemm<float, false, false>(tall, 40, 389, 1.0f, false, buffers);
  check_gemm<float, true, true>(tall, 40, 389, 1.0f, true, buffers);
  check_gemm<float, false, true>(K::rows_min + 5, 50, deep, 0.5f, false, buffers);
  check_gemm<float, true, false>(K::rows_min + 5, 50, deep, 0.5f, true, buffers);
  const Matrix<float> a = random_matrix<float>(29, 300, 5), b = random_matrix<float>(300, 70, 6);
  Matrix<float> first(29, 70), again(29, 70);
  k::gemm<false, false, float>(a, b, first, 1.0f, false, buffers);
  k::gemm<false, false, float>(a, b, again, 1.0f, false, buffers);
  REQUIRE(first == again);
}

namespace {
// op(B) packed once (PackedB) against B packed by each call, on the same A and C: the same bits.
template <class S, bool TransA, bool TransB>
void check_packed_same_bits(Index M, Index N, Index K, S alpha, bool accumulate, k::PackedB<S>& packed,
                            k::GemmBuffers<S>& buffers) {
  INFO("M " << M << " N " << N << " K " << K << " transA " << TransA << " transB " << TransB << " accumulate " << accumulate);
  const Matrix<S> a = random_matrix<S>(TransA ? K : M, TransA ? M : K, 51);
  const Matrix<S> b_all = random_matrix<S>((TransB ? N : K) + 3, (TransB ? K : N) + 5, 52);
  const auto b = b_all.block(1, 2, TransB ? N : K, TransB ? K : N);  // a strided view
  Matrix<S> per_call = random_matrix<S>(M, N, 53), ahead = per_call;
  k::gemm<TransA, TransB, S>(a, b, per_call, alpha, accumulate, buffers);
  packed.template pack<TransB>(b);
  REQUIRE(packed.fits(K, N));
  k::gemm<TransA, S>(a, packed, ahead, alpha, accumulate, buffers);
  REQUIRE(std::memcmp(per_call.data(), ahead.data(), std::size_t(M * N) * sizeof(S)) == 0);
}
}  // namespace

TEMPLATE_TEST_CASE("GEMM kernel with B packed ahead gives the bits of packing per call", "[kernel]", float, double) {
  using S = TestType;
  using K = k::gebp::Blocking<S>;
  k::GemmBuffers<S> buffers;
  k::PackedB<S> packed;  // one for all shapes: repacking reuses (or grows) its storage
  // Several column blocks (N > nc_max), widths off the nr grid, depths off the kc grid, one row;
  // rows_min + 5 rows of a deep product split the depth into A blocks (kd), whose boundaries the
  // packed B does not know about: only the kc boundaries fix the sums.
  const Index deep = K::a_elements / K::rows_min + 130;
  int n_case = 0;
  for (Index M : {Index(1), Index(13), Index(15), Index(128), K::rows_min + 5})
    for (Index N : {Index(1), Index(33), Index(300), Index(2 * K::nc_max + 17)})
      for (Index depth : {Index(1), Index(3), K::kc_max + 1, Index(1000), deep}) {
        // keeps the Debug run short, but not the case of several A depth blocks
        if (M * N * depth > Index(3'000'000) && !(depth == deep && M > K::rows_min && N == 33)) continue;
        const bool accumulate = (n_case++ % 2) == 1;
        const S alpha = accumulate ? S(-0.75) : S(1.5);
        check_packed_same_bits<S, false, false>(M, N, depth, alpha, accumulate, packed, buffers);
        check_packed_same_bits<S, true, false>(M, N, depth, alpha, !accumulate, packed, buffers);
        check_packed_same_bits<S, false, true>(M, N, depth, alpha, accumulate, packed, buffers);
        check_packed_same_bits<S, true, true>(M, N, depth, alpha, !accumulate, packed, buffers);
      }
}

TEMPLATE_TEST_CASE("GEMM kernel with B packed ahead matches the twin", "[kernel]", float, double) {
  using S = TestType;
  k::GemmBuffers<S> buffers;
  k::PackedB<S> packed;
  int n_case = 0;
  for (Index M : {1, 14, 29})
    for (Index N : {1, 31, 33, 300})
      for (Index K : {1, 257, 1000}) {
        const bool accumulate = (n_case++ % 2) == 1;
        const S alpha = accumulate ? S(-0.75) : S(1.5);
        check_gemm<S, false, false>(M, N, K, alpha, accumulate, buffers, &packed);
        check_gemm<S, true, false>(M, N, K, alpha, !accumulate, buffers, &packed);
        check_gemm<S, false, true>(M, N, K, alpha, accumulate, buffers, &packed);
        check_gemm<S, true, true>(M, N, K, alpha, !accumulate, buffers, &packed);
      }
  // released, it fits nothing
  packed.release();
  REQUIRE_FALSE(packed.fits(1000, 300));
}

TEST_CASE("float log and cos(2 pi u) kernels against the C library", "[kernel]") {
  using B = moe::kernels::Batch<float>;
  // relative error of a few float ulps away from log's zero at 1; absolute near it
  const float tol = 4 * std::numeric_limits<float>::epsilon();
  for (float x : {1e-30f, 1.17549435e-38f, 1e-7f, 0.001f, 0.25f, 0.7071f, 0.7072f, 0.999f, 1.0f, 1.001f, 1.4142f,
                  1.4143f, 2.0f, 3.0f, 1e5f, 3e38f}) {
    INFO("x " << x);
    const float got = moe::kernels::log_approx(B(x)).get(0), want = std::log(x);
    REQUIRE(std::abs(got - want) <= tol * std::max(1.0f, std::abs(want)));
  }
  for (int i = 0; i <= 4096; ++i) {  // u over [0, 1], through every octant
    const float u = float(i) / 4096.0f;
    INFO("u " << u);
    REQUIRE(std::abs(moe::kernels::cos_2pi_approx(B(u)).get(0) - float(std::cos(2 * std::numbers::pi * double(u)))) <= tol);
  }
}

TEMPLATE_TEST_CASE("softplus, normal CDF and Box-Muller kernels match their twins, body and tail alike", "[kernel]", float, double) {
  using S = TestType;
  // float: the polynomials against the C library; double: the C library itself
  const S tol = std::is_same_v<S, float> ? S(8) * std::numeric_limits<float>::epsilon() : S(0);
  for (Index n : awkward_widths) {
    INFO("n " << n);
    std::vector<S> x(static_cast<std::size_t>(n)), got(x.size()), want(x.size());
    for (Index i = 0; i < n; ++i) x[std::size_t(i)] = S(-30.0 + 60.0 * double(i) / double(std::max<Index>(n - 1, 1)));
    k::softplus(x.data(), got.data(), n, S(0.01));
    k::scalar::softplus(x.data(), want.data(), n, S(0.01));
    for (Index i = 0; i < n; ++i) REQUIRE(std::abs(got[std::size_t(i)] - want[std::size_t(i)]) <= tol * std::max(S(1), want[std::size_t(i)]));
    std::vector<double> u1(x.size()), u2(x.size());
    const moe::CounterRng rng(3);
    for (Index i = 0; i < n; ++i) u1[std::size_t(i)] = rng.uniform(std::uint64_t(i), 0), u2[std::size_t(i)] = rng.uniform(std::uint64_t(i), 1);
    std::vector<S> z(x.size());  // [-9, 9]: Phi from 1e-19 to 1
    for (Index i = 0; i < n; ++i) z[std::size_t(i)] = x[std::size_t(i)] * S(0.3);
    k::normal_cdf(z.data(), got.data(), n);
    k::scalar::normal_cdf(z.data(), want.data(), n);
    // relative, growing with z^2: exp(-z^2/2) inherits the rounding of its argument
    for (Index i = 0; i < n; ++i) {
      const S zi = z[std::size_t(i)];
      REQUIRE(std::abs(got[std::size_t(i)] - want[std::size_t(i)]) <= tol / 2 * (1 + zi * zi) * want[std::size_t(i)]);
    }
    k::box_muller(u1.data(), u2.data(), got.data(), n);
    k::scalar::box_muller(u1.data(), u2.data(), want.data(), n);
    // a draw of size up to ~6: a few float ulps of 6, the rounding of u to float included
    for (Index i = 0; i < n; ++i) REQUIRE(std::abs(got[std::size_t(i)] - want[std::size_t(i)]) <= tol * S(16) * S(6));
  }
}
