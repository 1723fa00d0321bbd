#pragma once
// Expert bias that only ranks: the auxiliary-loss-free balancing of DeepSeek-AI, "DeepSeek-V3
// Technical Report", arXiv 2412.19437, §2.1.2 (docs/gates.md, ExpertBiasGate). Wraps a sigmoid or
// square-root-softplus gate; the selector ranks by scores + b, combine weights come from the
// scores alone. b is a buffer, not a parameter: no gradient reaches it, and it moves only when the
// caller asks, by b_e += u * sign(mean load - load_e).
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/gates/sigmoid.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/gates/sqrt_softplus.hpp"
#include "moe/routing.hpp"

namespace moe {

template <class Inner>
class ExpertBiasGate {
public:
  using scalar_type = typename Inner::scalar_type;
  using S = scalar_type;

  struct Options {
    double update_rate = 1e-3;  // u of the sign update (DeepSeek-V3's gamma)
  };

  explicit ExpertBiasGate(Index experts, Options opt = {}, Inner inner = {})
      : inner_(std::move(inner)), opt_(opt) {
    // Megatron-Core allows the expert bias with sigmoid and sqrt-softplus scores only: with a
    // softmax over experts a constant shift of every score would not mean the same thing.
    if constexpr (std::is_same_v<Inner, SoftmaxGate<S>>)
      detail::fail<config_error>("ExpertBiasGate", "gate", "SoftmaxGate",
                                 "an expert bias needs a sigmoid or sqrt-softplus gate (as Megatron-Core requires)");
    detail::require<config_error>(experts >= 1, "ExpertBiasGate", "experts", experts, "experts >= 1");
    detail::require<config_error>(std::isfinite(opt.update_rate) && opt.update_rate >= 0, "ExpertBiasGate",
                                  "update_rate", opt.update_rate, "finite and >= 0");
    bias_ = Matrix<S>::Zero(1, experts);
  }

  Index num_experts() const { return bias_.cols(); }
  // The bias moves only between forwards (update_bias): causal as the inner gate is.
  bool causal() const { return is_causal(inner_); }
  const Options& options() const { return opt_; }
  Inner& inner() { return inner_; }
  // The bias b [1, E]. Not visited by for_each_parameter (see docs/gates.md): save or restore it
  // through this accessor.
  Matrix<S>& bias() { return bias_; }
  const Matrix<S>& bias() const { return bias_; }

  // Called by Router at construction.
  void check_experts(Index experts) const {
    if (experts != bias_.cols())
      detail::fail<shape_error>("ExpertBiasGate", "bias.cols", bias_.cols(),
                                "one bias per expert of the router (" + std::to_string(experts) + ")");
  }

  void forward(MatrixIn<S> logits, MatrixOut<S> scores) { inner_.forward(logits, scores); }
  void backward(MatrixIn<S> logits, MatrixIn<S> scores, MatrixIn<S> dscores, MatrixOut<S> dlogits) {
    inner_.backward(logits, scores, dscores, dlogits);
  }
  // rank = scores + b, row by row; b gets no gradient (nothing in backward reads rank's values
  // beyond the choices they made).
  void rank(MatrixIn<S>, MatrixIn<S> scores, const TokenInputs<S>&, MatrixOut<S> rank) {
    check_experts(scores.cols());
    rank = scores.rowwise() + bias_.row(0);
  }

  // The auxiliary-loss-free step from per-expert loads (token counts, accumulated by the caller
  // over as many batches as it likes): b_e += u * sign(mean_j load_j - load_e), sign(0) = 0.
  template <class Count>
  void update_bias(std::span<const Count> load) {
    if (Index(load.size()) != bias_.cols())
      detail::fail<shape_error>("ExpertBiasGate::update_bias", "load.size", load.size(),
                                "one count per expert (" + std::to_string(bias_.cols()) + ")");
    double total = 0;
    for (const Count c : load) total += double(c);
    const double mean = total / double(load.size());
    const S u = S(opt_.update_rate);
    for (Index e = 0; e < bias_.cols(); ++e) {
      const double c = double(load[std::size_t(e)]);
      bias_(0, e) += u * S((mean > c) - (mean < c));
    }
  }

  // The same from a routing: each expert's load is the number of (real token, choice) pairs that
  // chose it, before capacity. Padding has no choices under the library's and fairseq's
  // conventions; under Padding::megatron it is routed, and `valid` (the batch's mask) leaves it
  // out of the counts, as Megatron-Core does.
  void update_bias(const SparseRouting<S>& r, std::span<const std::uint8_t> valid = {}) {
    if (r.num_experts != bias_.cols())
      detail::fail<shape_error>("ExpertBiasGate::update_bias", "routing.num_experts", r.num_experts,
                                "the gate's number of experts (" + std::to_string(bias_.cols()) + ")");
    if (!valid.empty() && Index(valid.size()) != r.num_tokens)
      detail::fail<shape_error>("ExpertBiasGate::update_bias", "valid.size", valid.size(),
                                "length 0 (absent) or the routing's tokens (" + std::to_string(r.num_tokens) + ")");
    fit(load_, bias_.cols());
    std::fill(load_.begin(), load_.end(), Index(0));
    for (Index t = 0; t < r.num_tokens; ++t)
      if (valid.empty() || valid[std::size_t(t)])
        for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c) ++load_[std::size_t(r.choice_expert[std::size_t(c)])];
    update_bias(std::span<const Index>(load_));
  }

private:
  Inner inner_;
  Options opt_;
  Matrix<S> bias_;
  std::vector<Index> load_;  // scratch
};

}  // namespace moe
