#pragma once
// Router z-loss (ST-MoE; docs/losses.md, ZLoss):
// L = mean over real tokens of (logsumexp_e logits)^2.
// Keeps logits small so the fp32 softmax stays accurate. Gradient: 2 lse_t softmax(l_t) / T.
#include <algorithm>
#include <cmath>

#include "moe/concepts.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/softmax.hpp"

namespace moe {

template <scalar S>
class ZLoss {
public:
  using scalar_type = S;
  static constexpr bool reads_score_matrix = false;  // logits only

  explicit ZLoss(S coefficient = S(1e-3)) : coefficient_(coefficient) {
    detail::require<config_error>(coefficient >= 0, "ZLoss", "coefficient", coefficient,
                                  "coefficient >= 0");
  }

  S coefficient() const { return coefficient_; }

  S forward(const LossInput<S>& in) const {
    S sum = 0;
    for (Index t = 0; t < in.logits.rows(); ++t)
      if (in.tokens.is_valid(t)) {
        const S lse = kernels::log_sum_exp(in.logits.row(t).data(), in.logits.cols());
        sum += lse * lse;
      }
    return sum / tokens(in);
  }

  void backward(const LossInput<S>& in, MatrixOut<S> dlogits, MatrixOut<S>) const {
    const S scale = S(2) * coefficient_ / tokens(in);
    for (Index t = 0; t < in.logits.rows(); ++t) {
      if (!in.tokens.is_valid(t)) continue;
      const S lse = kernels::log_sum_exp(in.logits.row(t).data(), in.logits.cols());
      dlogits.row(t).array() += scale * lse * (in.logits.row(t).array() - lse).exp();
    }
  }

private:
  static S tokens(const LossInput<S>& in) { return S(std::max<Index>(in.routing.num_valid_tokens, 1)); }
  S coefficient_;
};

}  // namespace moe
