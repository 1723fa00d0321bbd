#pragma once
// Group-limited top-k: DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437 (node-limited
// routing), as Megatron-Core's `moe_router_num_groups` / `moe_router_group_topk` do it
// (docs/selectors.md, GroupLimitedTopKSelector). The E experts form G contiguous groups of E/G;
// a group scores the sum of its top k/group_topk rank values (or of its top `Groups::top`: 1, its
// maximum, is DeepSeek-V2's group_limited_greedy); each token keeps its group_topk best groups
// (ties to the lower group) and picks its ordinary top-k among their experts. Everything after the
// choice (weights, capacity, slots, backward) is TopKSelector's own.
#include <algorithm>
#include <bit>
#include <limits>
#include <string>
#include <type_traits>

#include "moe/concepts.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/kernels/simd.hpp"
#include "moe/kernels/top_k.hpp"
#include "moe/selectors/top_k.hpp"

namespace moe {

template <scalar S>
class GroupLimitedTopKSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;
  using Options = typename TopKSelector<S>::Options;

  struct Groups {
    Index count = 1;  // G: number of contiguous expert groups (Megatron moe_router_num_groups)
    Index keep = 1;   // group_topk: groups kept per token (Megatron moe_router_group_topk)
    // How many of a group's largest rank values its score sums: 0 for k/keep (Megatron,
    // DeepSeek-V3: 2 of 8/4), 1 for the group maximum (DeepSeek-V2).
    Index top = 0;
  };

  GroupLimitedTopKSelector(Index k, Groups groups, Options opt = {}) : inner_(k, opt), groups_(groups) {
    const char* where = "GroupLimitedTopKSelector";
    detail::require<config_error>(groups.count >= 1, where, "groups.count", groups.count, "groups.count >= 1");
    detail::require<config_error>(groups.keep >= 1 && groups.keep <= groups.count, where, "groups.keep",
                                  groups.keep, "1 <= groups.keep <= groups.count (" + std::to_string(groups.count) + ")");
    detail::require<config_error>(groups.top >= 0, where, "groups.top", groups.top,
                                  "groups.top >= 0 (0: k/groups.keep)");
    if (groups.top == 0)
      detail::require<config_error>(k % groups.keep == 0, where, "k", k,
                                    "k divisible by groups.keep (" + std::to_string(groups.keep) +
                                        "): each kept group scores by its top k/groups.keep values "
                                        "(Groups::top sets another count)");
  }

  Index k() const { return inner_.k(); }
  const Groups& groups() const { return groups_; }
  // The groups are a token's own: causal as TopKSelector is (its capacity).
  bool causal() const { return inner_.causal(); }
  const Options& options() const { return inner_.options(); }

  // E divisible by G, and the kept groups hold at least k experts (and k/keep per group).
  void check_experts(Index experts) const {
    const char* where = "GroupLimitedTopKSelector";
    if (experts % groups_.count != 0)
      detail::fail<config_error>(where, "groups.count", groups_.count,
                                 "divides the number of experts (" + std::to_string(experts) + ")");
    const Index size = experts / groups_.count;
    if (groups_.top > size)
      detail::fail<config_error>(where, "groups.top", groups_.top,
                                 "groups.top <= experts per group (" + std::to_string(size) + ")");
    if (groups_.keep * size < inner_.k())
      detail::fail<config_error>(where, "k", inner_.k(),
                                 "k <= groups.keep * experts per group (" + std::to_string(groups_.keep) + " * " +
                                     std::to_string(size) + "): the kept groups must hold k experts");
    inner_.check_experts(experts);
  }

  void set_draw_state(const DrawState& state) { inner_.set_draw_state(state); }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    detail::check_shape("GroupLimitedTopKSelector", "scores", in.scores, in.logits.rows(), in.logits.cols());
    detail::check_shape("GroupLimitedTopKSelector", "rank", in.rank, in.logits.rows(), in.logits.cols());
    prepare(in.logits, in.tokens);
    select_rows(in, 0);
    finish(in.logits, in.tokens, r);
  }

  void prepare(MatrixIn<S> logits, const TokenInputs<S>& tokens) {
    check_experts(logits.cols());
    inner_.prepare(logits, tokens);
    scratch_.reserve();
  }

  // The kept groups' rank values of each row, side by side, and TopKSelector's own per-row work
  // on them: it ranks keep * E/G columns instead of E.
  void select_rows(const SelectorInput<S>& block, Index begin) {
    const Index rows = block.rank.rows();
    if (rows == 0) return;
    Scratch& scratch = scratch_.local();
    const Index width = padded_width(groups_.keep * (block.rank.cols() / groups_.count));
    fit(scratch.kept, rows, width);
    fit(scratch.column_of, rows * width);
    keep_groups(block.rank, scratch.kept, scratch.column_of.data());
    inner_.select_rows(SelectorInput<S>{block.logits, block.scores, scratch.kept, block.tokens}, begin,
                       scratch.column_of.data());
  }

  void finish(MatrixIn<S> logits, const TokenInputs<S>& tokens, routing_type& r) { inner_.finish(logits, tokens, r); }

  // The weights depend on the scores of the chosen experts only, as in TopKSelector.
  void backward(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S> dlogits) {
    inner_.backward(in, r, dslot_weight, dscores, dlogits);
  }

  // Per row: group scores, the kept groups in increasing order (so equal values keep the lower
  // expert first), their rank values side by side in `kept` and each one's expert in `column_of`.
  void keep_groups(MatrixIn<S> rank, MatrixOut<S> kept, std::int32_t* column_of) const {
    const Index experts = rank.cols(), G = groups_.count, size = experts / G, width = kept.cols();
    const Index per_group = groups_.top > 0 ? groups_.top : inner_.k() / groups_.keep;
    S group_score[max_static_groups];
    std::int32_t top[max_static_groups];
    std::vector<S> heap_score;
    std::vector<std::int32_t> heap_top;
    S* gs = group_score;
    std::int32_t* chosen = top;
    if (G > max_static_groups) {
      heap_score.resize(std::size_t(G));
      heap_top.resize(std::size_t(G));
      gs = heap_score.data();
      chosen = heap_top.data();
    }
    for (Index t = 0; t < rank.rows(); ++t) {
      const S* row = rank.row(t).data();
      for (Index g = 0; g < G; ++g) gs[g] = group_sum(row + g * size, size, per_group);
      kernels::scalar::top_k_row(gs, G, groups_.keep, chosen);  // ties to the lower group
      std::sort(chosen, chosen + groups_.keep);
      S* out = kept.row(t).data();
      std::int32_t* column = column_of + t * width;
      for (Index j = 0; j < groups_.keep; ++j) {
        const Index g = chosen[j];
        std::copy(row + g * size, row + (g + 1) * size, out + j * size);
        for (Index i = 0; i < size; ++i) column[j * size + i] = std::int32_t(g * size + i);
      }
      // padding: below every kept value, and never picked (the kept groups hold k experts)
      std::fill(out + groups_.keep * size, out + width, std::numeric_limits<S>::lowest());
      std::fill(column + groups_.keep * size, column + width, std::int32_t(0));
    }
  }

private:
  static constexpr Index max_static_groups = 64;

  // The kept width rounded up to 1, 2, 4, 8 or 16 whole SIMD registers, the widths the top-k
  // kernel ranks in registers (DeepSeek-V2's 3 groups of 20 become 64 columns: 2.4x faster than
  // 60); wider rows stay as they are.
  static Index padded_width(Index width) {
    if constexpr (!std::is_same_v<S, float>) return width;
    constexpr Index w = Index(kernels::Batch<float>::size);
    for (Index chunks = 1; chunks <= 16; chunks *= 2)
      if (width <= chunks * w) return chunks * w;
    return width;
  }

  // Sum of the m largest of v[0, n), largest first: for m <= 2 on whole SIMD registers, the
  // largest two per lane, then merged; one scalar pass for m = 1, 2 otherwise; a partial sort
  // for larger m.
  static S group_sum(const S* v, Index n, Index m) {
    using B = kernels::Batch<S>;
    constexpr Index w = Index(B::size);
    constexpr S lowest = -std::numeric_limits<S>::infinity();
    if (m <= 2 && n % w == 0) {
      B a = B::load_unaligned(v), b(lowest);  // per lane: largest a, second b
      for (Index i = w; i < n; i += w) {
        const B x = B::load_unaligned(v + i);
        b = xsimd::max(b, xsimd::min(a, x));
        a = xsimd::max(a, x);
      }
      const S top = kernels::reduce_max(a);
      if (m == 1) return top;
      const auto at_top = a == B(top);
      // the second largest: the top again if two lanes hold it, else the best of the other
      // lanes' largest and every lane's second
      const S second = std::popcount(kernels::mask_bits(at_top)) > 1
                           ? top
                           : std::max(kernels::reduce_max(b), kernels::reduce_max(xsimd::select(at_top, B(lowest), a)));
      return top + second;
    }
    if (m == 1) return *std::max_element(v, v + n);
    if (m == 2) {
      S a = std::max(v[0], v[1]), b = std::min(v[0], v[1]);
      for (Index i = 2; i < n; ++i) {
        if (v[i] > a) b = a, a = v[i];
        else if (v[i] > b) b = v[i];
      }
      return a + b;
    }
    S best[max_static_groups];
    std::vector<S> heap;
    S* buf = best;
    if (n > max_static_groups) heap.assign(v, v + n), buf = heap.data();
    else std::copy(v, v + n, buf);
    std::partial_sort(buf, buf + m, buf + n, [](S x, S y) { return x > y; });
    S sum = 0;  // largest first, as a sorted top-k sums them
    for (Index i = 0; i < m; ++i) sum += buf[i];
    return sum;
  }

  struct Scratch {
    Matrix<S> kept;                      // [rows, keep * E/G]
    std::vector<std::int32_t> column_of;  // the expert of each of its entries
  };

  TopKSelector<S> inner_;
  Groups groups_;
  PerThread<Scratch> scratch_;
};

}  // namespace moe
