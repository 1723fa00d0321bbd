#pragma once
// Tensor aliases (docs/architecture.md, Pipeline): a routing group is a row-major [T, D] matrix,
// one token a row.
#include "moe/config.hpp"  // first: it includes the intrinsics header before Eigen does

#include <Eigen/Core>
#include <concepts>
#include <cstdint>
#include <span>

namespace moe {

using Index = Eigen::Index;

template <class S>
using Matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using Vector = Eigen::Matrix<S, Eigen::Dynamic, 1>;

// Views: inputs are read through MatrixIn, outputs written through MatrixOut. Both accept a
// moe::Matrix, a block of one, or an Eigen::Map over a user buffer without copying.
template <class S>
using MatrixIn = Eigen::Ref<const Matrix<S>>;
template <class S>
using MatrixOut = Eigen::Ref<Matrix<S>>;

template <class S>
concept scalar = std::same_as<S, float> || std::same_as<S, double>;

// How the padding tokens of a mask (TokenInputs::valid) count, as the reference systems differ
// (docs/selectors.md, Padding). Every token-choice selector and balance loss takes one.
enum class Padding {
  excluded,  // never routed, never counted in capacity or in a loss (the library's convention)
  fairseq,   // not routed, but capacity and the balance loss's means are over all T tokens
             // (fairseq, DeepSpeed top-1 `used_token`): P_e includes padding rows' scores
  megatron,  // routed like any token (they take capacity); left out of the aux losses only
             // (Megatron-Core's padding mask)
};

// The real tokens of a mask (TokenInputs::valid) over `rows` rows: all of them when it is absent.
inline Index count_valid(std::span<const std::uint8_t> valid, Index rows) {
  if (valid.empty()) return rows;
  Index n = 0;
  for (const std::uint8_t v : valid) n += v != 0;
  return n;
}

// Calls visit(begin, end) for each segment of `rows` rows: each run of equal ids in `segment`
// (the depth policies also require the ids non-decreasing: detail::check_segments), or all rows
// as one segment when the ids are absent. Nothing is visited for 0 rows.
template <class F>
void for_each_segment(std::span<const std::int32_t> segment, Index rows, F&& visit) {
  if (segment.empty()) {
    if (rows > 0) visit(Index(0), rows);
    return;
  }
  constexpr Index chunk = 16;  // compared whole, without a branch per id
  for (Index b = 0; b < rows;) {
    const std::int32_t id = segment[std::size_t(b)];
    Index e = b + 1;
    for (;;) {
      if (e + chunk <= rows) {
        bool same = true;
        for (Index k = 0; k < chunk; ++k) same &= segment[std::size_t(e + k)] == id;
        if (same) {
          e += chunk;
          continue;
        }
      }
      if (e == rows || segment[std::size_t(e)] != id) break;
      ++e;
    }
    visit(b, e);
    b = e;
  }
}

// Optional per-token inputs that travel with a batch (docs/architecture.md, Per-token inputs).
// Empty spans mean "absent".
template <class S>
struct TokenInputs {
  // 1 = a real token, 0 = padding: never routed, never counted in capacity or in a loss.
  std::span<const std::uint8_t> valid{};
  // Which sequence / task each token belongs to (sequence-level losses, task routers).
  std::span<const std::int32_t> segment{};
  // Caller-provided random draws (docs/architecture.md, Randomness), row-major, each absent or
  // whole: a stochastic option reads its draws here when they are given and from its
  // counter-based generator otherwise, so another framework's draws can be replayed exactly.
  std::span<const S> normal{};          // [T, E] standard normal: noise on the logits
  std::span<const S> gumbel{};          // [T, E] standard Gumbel: sampled selection
  std::span<const S> uniform{};         // [T, E] uniform (0, 1): random token selection
  std::span<const S> second_uniform{};  // [T] uniform (0, 1): fairseq's random second expert
  std::span<const S> jitter{};          // [T, D] uniform (0, 1): multiplicative input jitter
  // [T] how important each token is, finite and >= 0: DynamicKSelector gives the more important
  // tokens more experts (DA-MoE takes it from the attention a token receives).
  std::span<const S> importance{};
  // The batch row of this view's first token: rows() sets it, so a policy that sees a block
  // keys its generated draws by the token's place in the batch.
  Index first = 0;

  bool is_valid(Index t) const { return valid.empty() || valid[static_cast<std::size_t>(t)] != 0; }

  // The inputs of tokens [first, first + count) of a batch routed over `experts` experts. The
  // scorer's jitter ([T, D]) stays with the whole batch: a slice does not carry it.
  TokenInputs rows(Index from, Index count, Index experts) const {
    const auto part = [](auto span, Index at, Index n) { return span.empty() ? span : span.subspan(std::size_t(at), std::size_t(n)); };
    return {.valid = part(valid, from, count),
            .segment = part(segment, from, count),
            .normal = part(normal, from * experts, count * experts),
            .gumbel = part(gumbel, from * experts, count * experts),
            .uniform = part(uniform, from * experts, count * experts),
            .second_uniform = part(second_uniform, from, count),
            .jitter = {},
            .importance = part(importance, from, count),
            .first = first + from};
  }
};

}  // namespace moe
