#pragma once
// GLIDER's scorer (Li et al., "Glider: Global and Local Instruction-Driven Expert Router", EMNLP
// 2025; docs/scorers.md, GliderScorer): a local, per-token router plus a global, per-instruction
// bias,
//   logits_t = V LN(x_t) / sqrt(D) + alpha cos(u, q_seg(t)),
// LN a LayerNorm without affine parameters, V the experts' gate vectors (PHATGOOSE's), u_j the
// embedding of expert j's task instruction and q_s that of segment s's instruction (one per
// query or task, from a sentence embedder). The bias is the same for every token of a segment.
// alpha = 0 leaves the local router (PHATGOOSE).
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

#include "moe/core/gemm.hpp"
#include "moe/core/layer_norm.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class GliderScorer {
public:
  using scalar_type = S;

  struct Options {
    double alpha = 100.0;           // bias_routing_scale (the paper's T0 held-in runs; 1000 held-out, 3 FLAN)
    double layer_norm_eps = 1e-5;   // nn.LayerNorm's default
    double init_scale = 1.0;        // V ~ N(0, init_scale / D) until the trained gates are loaded
    std::uint64_t seed = 0;
  };

  GliderScorer(Index input_dim, Index num_experts) : GliderScorer(input_dim, num_experts, Options{}) {}
  GliderScorer(Index input_dim, Index num_experts, Options opt) : opt_(opt) {
    constexpr std::string_view where = "GliderScorer";
    detail::require<config_error>(input_dim >= 1, where, "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, where, "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(std::isfinite(opt.alpha), where, "alpha", opt.alpha, "finite");
    detail::require<config_error>(opt.layer_norm_eps > 0, where, "layer_norm_eps", opt.layer_norm_eps, "> 0");
    detail::require<config_error>(opt.init_scale >= 0, where, "init_scale", opt.init_scale, "init_scale >= 0");
    weight_.resize(num_experts, input_dim);
    const CounterRng rng(opt.seed);
    const double std_dev = std::sqrt(opt.init_scale / double(input_dim));
    for (Index e = 0; e < num_experts; ++e)
      for (Index j = 0; j < input_dim; ++j) weight_(e, j) = S(std_dev * rng.normal(e, j));
    weight_grad_.setZero(num_experts, input_dim);
  }

  Index input_dim() const { return weight_.cols(); }
  Index num_experts() const { return weight_.rows(); }
  // V [E, D]: the local gate vectors (trainable).
  Matrix<S>& weight() { return weight_; }
  double alpha() const { return opt_.alpha; }
  // The bias is an input of the segment, not of its other tokens: each token's logits read it alone.
  constexpr bool causal() const { return true; }

  // u [E, Dq]: the embedding of each expert's task instruction. Clears the instructions.
  void set_expert_embeddings(MatrixIn<S> u) {
    detail::require<shape_error>(u.rows() == num_experts(), "GliderScorer::set_expert_embeddings", "u.rows", u.rows(),
                                 "one row per expert (" + std::to_string(num_experts()) + ")");
    detail::require<shape_error>(u.cols() >= 1, "GliderScorer::set_expert_embeddings", "u.cols", u.cols(), ">= 1");
    detail::check_finite<S>("GliderScorer::set_expert_embeddings", "u", u);
    experts_ = u;
    bias_.resize(0, 0);
  }

  // q [segments, Dq]: segment s's instruction embedding in row s (row 0 serves a batch without
  // segment ids). Computes each segment's bias cos(u_j, q_s) once, as the reference does per task.
  void set_instructions(MatrixIn<S> q) {
    constexpr std::string_view where = "GliderScorer::set_instructions";
    detail::require<config_error>(experts_.size() > 0, where, "expert embeddings", "not set",
                                  "set_expert_embeddings before set_instructions");
    detail::require<shape_error>(q.cols() == experts_.cols(), where, "q.cols", q.cols(),
                                 "the expert embeddings' width (" + std::to_string(experts_.cols()) + ")");
    detail::check_finite<S>(where, "q", q);
    bias_.resize(q.rows(), num_experts());
    for (Index s = 0; s < q.rows(); ++s)
      for (Index j = 0; j < num_experts(); ++j) {
        // torch.nn.functional.cosine_similarity: x.y / max(|x| |y|, 1e-8)
        const S dot = q.row(s).dot(experts_.row(j)), norms = q.row(s).norm() * experts_.row(j).norm();
        bias_(s, j) = dot / std::max(norms, S(1e-8));
      }
  }
  // [segments, E] the cosines, or no rows before set_instructions (no global term then).
  const Matrix<S>& instruction_bias() const { return bias_; }

  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    check_segments(tokens);
    const Index T = x.rows(), D = x.cols();
    detail::layer_norm_rows<S>(x, normalized_, inv_std_, opt_.layer_norm_eps);
    gemm_.template run<false, true>(normalized_, weight_, logits, S(1) / std::sqrt(S(D)));
    if (bias_.rows() > 0 && opt_.alpha != 0)
      for (Index t = 0; t < T; ++t)
        logits.row(t) += S(opt_.alpha) * bias_.row(tokens.segment.empty() ? 0 : tokens.segment[std::size_t(t)]);
  }

  // dV += dlogits^T LN(x) / sqrt(D); dx through the LayerNorm (the bias does not depend on x).
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const S scale = S(1) / std::sqrt(S(x.cols()));
    gemm_.template run<true, false>(dlogits, normalized_, weight_grad_, scale, true);  // a reduction over T: one thread
    gemm_.run(dlogits, weight_, dx, scale);  // d LN(x)
    detail::layer_norm_backward_rows<S>(dx, normalized_, inv_std_);
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.weight"), MatrixOut<S>(weight_), MatrixOut<S>(weight_grad_));
  }

private:
  // Every segment id names an instruction row (when the global term is on).
  void check_segments(const TokenInputs<S>& tokens) const {
    if (bias_.rows() == 0 || opt_.alpha == 0) return;
    for (std::size_t t = 0; t < tokens.segment.size(); ++t)
      if (tokens.segment[t] < 0 || tokens.segment[t] >= bias_.rows()) {
        std::ostringstream value;
        value << tokens.segment[t] << " at token " << t;
        detail::fail<value_error>("GliderScorer", "tokens.segment", value.str(),
                                  "an instruction row: 0 <= id < " + std::to_string(bias_.rows()) + " (set_instructions)");
      }
  }

  Options opt_;
  Matrix<S> weight_, weight_grad_;
  Matrix<S> experts_, bias_;         // u [E, Dq]; cos(u_j, q_s) [segments, E]
  Matrix<S> normalized_, inv_std_;  // LN(x) and 1 / sigma per row, kept for backward
  Gemm<S> gemm_;
};

}  // namespace moe
