#pragma once
// Balance loss on scores renormalised over all experts, per sequence or over the batch: the
// complementary sequence-wise balance loss of DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv
// 2412.19437, §2.1.2, and Megatron-Core's aux loss with sigmoid scores (docs/losses.md,
// NormalizedBalanceLoss). For each sequence s of T_s real tokens:
//   f_se = E / (k T_s) * #{t in s : e among t's top-k}   (no gradient)
//   P_se = 1 / T_s * sum_{t in s} p_te / (sum_j p_tj + 1e-20)
//   L    = 1 / N * sum_s sum_e f_se P_se                  (N sequences; whole batch: N = 1)
// Gradient flows through P only, into the scores.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/top_k.hpp"

namespace moe {

enum class BalanceScope {
  sequence,  // per TokenInputs::segment id, averaged over sequences (Megatron seq_aux_loss)
  batch,     // the whole batch as one sequence (Megatron aux_loss with score_function=sigmoid)
};

enum class BalanceCount {
  plain_top_k,  // top-k of the un-biased scores over all experts (the paper's 1(s in Topk), Megatron)
  routing,      // the choices the selector made (bias and group limit included), before capacity
};

template <scalar S>
class NormalizedBalanceLoss {
public:
  using scalar_type = S;

  struct Options {
    BalanceScope scope = BalanceScope::sequence;
    BalanceCount count = BalanceCount::plain_top_k;
  };

  explicit NormalizedBalanceLoss(S coefficient = S(1e-4), Options opt = {}) : coefficient_(coefficient), opt_(opt) {
    detail::require<config_error>(coefficient >= 0, "NormalizedBalanceLoss", "coefficient", coefficient,
                                  "coefficient >= 0");
  }

  S coefficient() const { return coefficient_; }
  const Options& options() const { return opt_; }

  S forward(const LossInput<S>& in) const {
    const Index E = in.scores.cols();
    if (!tally(in)) return S(0);
    S value = 0;
    for (Index s = 0; s < sequences_; ++s) {
      S seq = 0;
      for (Index e = 0; e < E; ++e) seq += f_(s, e) * p_(s, e);
      value += seq;
    }
    return value / S(sequences_);
  }

  // dL/dp_tj = 1/(N T_s) * (g_j / Z_t - sum_i g_i p_ti / Z_t^2), g = f of t's sequence.
  void backward(const LossInput<S>& in, MatrixOut<S>, MatrixOut<S> dscores) const {
    const Index T = in.scores.rows(), E = in.scores.cols();
    if (!tally(in)) return;
    for (Index t = 0; t < T; ++t) {
      const Index s = seq_of_[std::size_t(t)];
      if (s < 0) continue;
      const auto p = in.scores.row(t);
      const S z = p.sum() + eps();
      const S inner = f_.row(s).dot(p);
      const S c = coefficient_ / (S(sequences_) * S(tokens_[std::size_t(s)]));
      for (Index j = 0; j < E; ++j) dscores(t, j) += c * (f_(s, j) / z - inner / (z * z));
    }
  }

private:
  static constexpr S eps() { return S(1e-20); }

  // Sequence of each real token (-1: padding), per sequence its token count, f (scaled) and P.
  // Returns false when there is no real token.
  bool tally(const LossInput<S>& in) const {
    const auto& r = in.routing;
    const auto& tok = in.tokens;
    const Index T = in.scores.rows(), E = in.scores.cols();
    fit(seq_of_, T);
    // dense sequence indices, in increasing segment id
    ids_.clear();
    const bool per_sequence = opt_.scope == BalanceScope::sequence && !tok.segment.empty();
    for (Index t = 0; t < T; ++t)
      if (tok.is_valid(t)) ids_.push_back(per_sequence ? tok.segment[std::size_t(t)] : 0);
    if (ids_.empty()) return false;
    std::sort(ids_.begin(), ids_.end());
    ids_.erase(std::unique(ids_.begin(), ids_.end()), ids_.end());
    sequences_ = Index(ids_.size());
    for (Index t = 0; t < T; ++t) {
      if (!tok.is_valid(t)) { seq_of_[std::size_t(t)] = -1; continue; }
      const std::int32_t id = per_sequence ? tok.segment[std::size_t(t)] : 0;
      seq_of_[std::size_t(t)] = Index(std::lower_bound(ids_.begin(), ids_.end(), id) - ids_.begin());
    }
    const Index k = r.num_valid_tokens > 0 ? r.num_choices() / r.num_valid_tokens : 1;
    fit(tokens_, sequences_);
    std::fill(tokens_.begin(), tokens_.end(), Index(0));
    fit(f_, sequences_, E);
    fit(p_, sequences_, E);
    f_.setZero();
    p_.setZero();
    const bool plain = opt_.count == BalanceCount::plain_top_k && k > 0;
    if (plain) {  // every row's top-k by the selector's kernel (ties to the lower expert)
      fit(top_, T * k);
      kernels::top_k_rows<S>(in.scores, k, top_.data());
    }
    for (Index t = 0; t < T; ++t) {
      const Index s = seq_of_[std::size_t(t)];
      if (s < 0) continue;
      ++tokens_[std::size_t(s)];
      const auto p = in.scores.row(t);
      const S z = p.sum() + eps();
      p_.row(s) += p / z;
      if (plain) {
        for (Index j = 0; j < k; ++j) f_(s, top_[std::size_t(t * k + j)]) += S(1);
      } else {
        for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) f_(s, r.choice_expert[std::size_t(c)]) += S(1);
      }
    }
    for (Index s = 0; s < sequences_; ++s) {
      const S n = S(tokens_[std::size_t(s)]);
      f_.row(s) *= S(E) / (S(std::max<Index>(k, 1)) * n);
      p_.row(s) /= n;
    }
    return true;
  }

  S coefficient_;
  Options opt_;
  // scratch
  mutable Index sequences_ = 0;
  mutable std::vector<std::int32_t> ids_;
  mutable std::vector<Index> seq_of_, tokens_;
  mutable std::vector<std::int32_t> top_;
  mutable Matrix<S> f_, p_;
};

}  // namespace moe
