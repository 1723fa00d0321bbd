#pragma once
// Sparsity-constrained expert choice (Liu et al. 2024, "Routers in Vision MoE", with the solver
// of Liu, Puigcerver, Blondel 2023, "Sparsity-Constrained Optimal Transport"; docs/selectors.md,
// SparsityConstrainedECSelector): each expert takes its top C tokens of a transport plan whose
// columns have at most C non-zeros, instead of the scores themselves. The plan moves mass 1 per
// real token and n/E per expert at cost -scores, regularised by gamma/2 |P|^2; it is found on the
// semi-dual over a per-token potential alpha,
//   F(alpha) = sum_e b max_e(alpha + scores[:, e]) - sum_t alpha_t,   b = n / E,
// where max_e projects (alpha + scores[:, e]) / (gamma b) onto the C-sparse simplex (its top C
// entries onto the simplex, the rest 0) and the column of the plan is b times that projection.
// dF/dalpha = the plan's row sums - 1, minimised by Adam from alpha = 0 as jaxopt's OptaxSolver
// runs it (vmoe's settings: lr 1e-2, at most 20 steps, stop once |dF/dalpha| <= 1e-3).
// Combine weights are the scores of the taken pairs, as in expert choice.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/selectors/expert_choice.hpp"

namespace moe {

namespace detail {
// Projects the k values `sorted` (descending) onto the simplex in place (Duchi et al.'s
// threshold, as jaxopt's projection_simplex): rho = the number of j with
// u_j - (sum_{i<=j} u_i - 1) / j > 0, tau = (sum_{i<=rho} u_i - 1) / rho, u_i <- max(u_i - tau, 0).
template <class S>
void project_sorted_onto_simplex(std::span<S> sorted) {
  S sum = 0, tau_sum = 0;
  Index rho = 0;
  for (std::size_t j = 0; j < sorted.size(); ++j) {
    sum += sorted[j];
    if (sorted[j] - (sum - S(1)) / S(j + 1) > 0) rho = Index(j + 1), tau_sum = sum;
  }
  const S tau = (tau_sum - S(1)) / S(rho);
  for (S& u : sorted) u = std::max(u - tau, S(0));
}
}  // namespace detail

template <scalar S>
class SparsityConstrainedECSelector {
public:
  using scalar_type = S;
  using routing_type = SparseRouting<S>;

  struct Solver {
    double learning_rate = 1e-2;  // Adam (beta 0.9, 0.999, epsilon 1e-8: optax's defaults)
    int max_steps = 20;
    double tolerance = 1e-3;      // stop once the gradient's L2 norm is at most this
    double gamma = 1.0;           // the quadratic regulariser's weight
  };
  struct Options {
    ExpertCapacity capacity{};  // C: the tokens an expert takes and the plan's non-zeros per column
    SlotOrder slot_order = SlotOrder::priority;
    Solver solver{};
  };

  explicit SparsityConstrainedECSelector(Options opt = {})
      : opt_(opt), choose_({.capacity = opt.capacity, .slot_order = opt.slot_order}) {
    const Solver& s = opt.solver;
    detail::require<config_error>(std::isfinite(s.learning_rate) && s.learning_rate > 0, "SparsityConstrainedECSelector",
                                  "solver.learning_rate", s.learning_rate, "learning_rate > 0 and finite");
    detail::require<config_error>(s.max_steps >= 0, "SparsityConstrainedECSelector", "solver.max_steps", s.max_steps,
                                  "max_steps >= 0");
    detail::require<config_error>(std::isfinite(s.tolerance) && s.tolerance >= 0, "SparsityConstrainedECSelector",
                                  "solver.tolerance", s.tolerance, "tolerance >= 0 and finite");
    detail::require<config_error>(std::isfinite(s.gamma) && s.gamma > 0, "SparsityConstrainedECSelector", "solver.gamma",
                                  s.gamma, "gamma > 0 and finite");
  }

  const Options& options() const { return opt_; }
  // Not causal: the plan and each expert's top C couple every token of the batch.
  constexpr bool causal() const { return false; }
  // The plan of the last forward ([T, E], padding rows 0) and the Adam steps it took.
  const Matrix<S>& plan() const { return plan_; }
  int steps() const { return steps_; }

  void forward(const SelectorInput<S>& in, routing_type& r) {
    const Index T = in.logits.rows(), E = in.logits.cols();
    detail::check_shape("SparsityConstrainedECSelector", "scores", in.scores, T, E);
    detail::check_tokens("SparsityConstrainedECSelector", in.tokens, T, E);
    const auto& valid = in.tokens.valid;
    const Index n = count_valid(valid, T);
    const Index k = std::min(choose_.capacity(n, E), n);  // throws before anything is written
    solve(in.scores, valid, n, k);
    choose_.forward({in.logits, in.scores, plan_, in.tokens}, r);
  }

  void backward(const SelectorInput<S>& in, const routing_type& r, std::span<const S> dslot_weight,
                MatrixOut<S> dscores, MatrixOut<S> dlogits) {
    choose_.backward(in, r, dslot_weight, dscores, dlogits);
  }

private:
  // Adam on the semi-dual, then the plan at the final potential.
  void solve(MatrixIn<S> scores, std::span<const std::uint8_t> valid, Index n, Index k) {
    const Index T = scores.rows(), E = scores.cols();
    fit(plan_, T, E);
    plan_.setZero();
    steps_ = 0;
    if (k == 0) return;
    const S b = S(n) / S(E), scale = S(opt_.solver.gamma) * b;
    const auto is_valid = [&](Index t) { return valid.empty() || valid[std::size_t(t)] != 0; };
    fit(alpha_, T);
    fit(grad_, T);
    fit(m_, T);
    fit(v_, T);
    std::fill(alpha_.begin(), alpha_.end(), S(0));
    std::fill(m_.begin(), m_.end(), S(0));
    std::fill(v_.begin(), v_.end(), S(0));
    fit(shifted_, T, E);
    fit(top_, E * k);
    fit(column_, k);
    // plan_ <- b * the C-sparse projection of each column of (alpha + scores) / (gamma b)
    const auto plan_at_alpha = [&] {
      for (Index t = 0; t < T; ++t) shifted_.row(t) = (scores.row(t).array() + alpha_[t]).matrix();
      kernels::top_c_per_column<S>(shifted_, k, valid, n, top_, top_scratch_);
      plan_.setZero();
      for (Index e = 0; e < E; ++e) {
        const std::int32_t* tok = top_.data() + e * k;
        for (Index i = 0; i < k; ++i) column_[i] = shifted_(tok[i], e) / scale;
        detail::project_sorted_onto_simplex<S>(column_);
        for (Index i = 0; i < k; ++i) plan_(tok[i], e) = b * column_[i];
      }
    };
    const S lr = S(opt_.solver.learning_rate), beta1 = S(0.9), beta2 = S(0.999), eps = S(1e-8);
    double error = std::numeric_limits<double>::infinity();
    while (steps_ < opt_.solver.max_steps && error > opt_.solver.tolerance) {
      plan_at_alpha();
      double norm = 0;
      for (Index t = 0; t < T; ++t) {
        grad_[t] = is_valid(t) ? plan_.row(t).sum() - S(1) : S(0);
        norm += double(grad_[t]) * double(grad_[t]);
      }
      ++steps_;
      const S correct1 = S(1) - S(std::pow(double(beta1), steps_)), correct2 = S(1) - S(std::pow(double(beta2), steps_));
      for (Index t = 0; t < T; ++t) {
        m_[t] = beta1 * m_[t] + (S(1) - beta1) * grad_[t];
        v_[t] = beta2 * v_[t] + (S(1) - beta2) * grad_[t] * grad_[t];
        alpha_[t] -= lr * ((m_[t] / correct1) / (std::sqrt(v_[t] / correct2) + eps));
      }
      error = std::sqrt(norm);
    }
    plan_at_alpha();
  }

  Options opt_;
  ExpertChoiceSelector<S> choose_;
  Matrix<S> plan_, shifted_;
  std::vector<S> alpha_, grad_, m_, v_, column_;
  std::vector<std::int32_t> top_;
  kernels::TopCScratch<S> top_scratch_;
  int steps_ = 0;
};

}  // namespace moe
