#pragma once
// Cosine scorer of X-MoE (Chi et al., "On the Representation Collapse of Sparse Mixture of
// Experts", NeurIPS 2022; docs/scorers.md, CosineScorer): the tokens are projected to a small
// dimension r and compared with one embedding per expert by cosine similarity. Two forms:
// the paper's (both sides L2-normalised, divided by a learned temperature) and the torchscale
// reference's (only the expert embeddings normalised, no temperature, embeddings rescaled to a
// fixed norm before each forward).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>

#include <Eigen/QR>

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"

namespace moe {

enum class CosineForm {
  paper,       // <h/|h|, e/|e|> / tau, tau learned (Chi et al. 2022)
  torchscale,  // <h, e/|e|>, no temperature, embeddings rescaled before each forward
};

template <scalar S>
class CosineScorer {
public:
  using scalar_type = S;

  struct Options {
    CosineForm form = CosineForm::paper;
    Index proj_dim = 16;             // r: rows of W_proj, columns of the expert embeddings
    double temperature = 0.07;       // paper form: initial tau
    bool learn_temperature = true;   // paper form: tau is a parameter (router.temperature)
    double min_temperature = 1e-4;   // paper form: tau is used as max(tau, min_temperature)
    double eps = 1e-4;               // every norm is clamped below at eps before dividing
    bool rescale_each_forward = true;  // torchscale form: rescale_embeddings() before each forward
    double embedding_norm = 1.5;     // the norm rescale_embeddings() gives each embedding
    double embedding_gain = 0.32;    // orthogonal init of the embeddings, times this gain
    std::uint64_t seed = 0;
  };

  CosineScorer(Index input_dim, Index num_experts) : CosineScorer(input_dim, num_experts, Options{}) {}
  CosineScorer(Index input_dim, Index num_experts, Options opt) : opt_(opt) {
    constexpr std::string_view where = "CosineScorer";
    detail::require<config_error>(input_dim >= 1, where, "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, where, "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(opt.proj_dim >= 1, where, "proj_dim", opt.proj_dim, "proj_dim >= 1");
    detail::require<config_error>(std::isfinite(opt.eps) && opt.eps > 0, where, "eps", opt.eps,
                                  "eps > 0 and finite");
    detail::require<config_error>(std::isfinite(opt.min_temperature) && opt.min_temperature > 0, where,
                                  "min_temperature", opt.min_temperature, "min_temperature > 0 and finite");
    detail::require<config_error>(std::isfinite(opt.temperature) && opt.temperature >= opt.min_temperature,
                                  where, "temperature", opt.temperature,
                                  "temperature >= min_temperature (> 0) and finite");
    detail::require<config_error>(std::isfinite(opt.embedding_norm) && opt.embedding_norm > 0, where,
                                  "embedding_norm", opt.embedding_norm, "embedding_norm > 0 and finite");
    detail::require<config_error>(std::isfinite(opt.embedding_gain) && opt.embedding_gain > 0, where,
                                  "embedding_gain", opt.embedding_gain, "embedding_gain > 0 and finite");
    const CounterRng rng(opt.seed);
    // W_proj ~ U(-1/sqrt(D), 1/sqrt(D)): the bound of torch.nn.Linear's default initialisation.
    proj_.resize(opt.proj_dim, input_dim);
    const double bound = 1.0 / std::sqrt(double(input_dim));
    for (Index i = 0; i < opt.proj_dim; ++i)
      for (Index j = 0; j < input_dim; ++j) proj_(i, j) = S(bound * (2 * rng.uniform(i, j) - 1));
    embedding_ = orthogonal(num_experts, opt.proj_dim, opt.embedding_gain, CounterRng(opt.seed, 1));
    temperature_.setConstant(1, 1, S(opt.temperature));
    proj_grad_.setZero(proj_.rows(), proj_.cols());
    embedding_grad_.setZero(embedding_.rows(), embedding_.cols());
    temperature_grad_.setZero(1, 1);
  }

  Index input_dim() const { return proj_.cols(); }
  Index num_experts() const { return embedding_.rows(); }
  Index proj_dim() const { return proj_.rows(); }
  const Options& options() const { return opt_; }
  bool normalizes_tokens() const { return opt_.form == CosineForm::paper; }
  constexpr bool causal() const { return true; }  // per token (each token normalised alone)
  bool has_temperature() const { return opt_.form == CosineForm::paper; }
  bool learns_temperature() const { return has_temperature() && opt_.learn_temperature; }

  Matrix<S>& proj() { return proj_; }
  Matrix<S>& embedding() { return embedding_; }
  S& temperature() { return temperature_(0, 0); }
  const Matrix<S>& proj() const { return proj_; }
  const Matrix<S>& embedding() const { return embedding_; }
  S temperature() const { return temperature_(0, 0); }

  // The temperature the logits are divided by: max(tau, min_temperature) in the paper form, 1
  // in the torchscale form.
  S effective_temperature() const {
    return has_temperature() ? std::max(temperature_(0, 0), S(opt_.min_temperature)) : S(1);
  }

  // Rescales every expert embedding to norm `embedding_norm`, outside autograd (the torchscale
  // reference does this before each forward). The logits do not change (they see e / |e|), the
  // gradient does (it scales with 1 / |e|). An embedding whose norm is below eps is left as is
  // (the reference would divide by zero and fill it with NaN).
  void rescale_embeddings() {
    for (Index j = 0; j < embedding_.rows(); ++j) {
      const S n = embedding_.row(j).norm();
      if (n >= S(opt_.eps)) embedding_.row(j) *= S(opt_.embedding_norm) / n;
    }
  }

  void forward(MatrixIn<S> x, const TokenInputs<S>&, MatrixOut<S> logits) {
    if (opt_.form == CosineForm::torchscale && opt_.rescale_each_forward) rescale_embeddings();
    const S inv_tau = S(1) / effective_temperature();
    normalize_embeddings(inv_tau);
    fit(h_, x.rows(), proj_dim());
    gemms_.reserve();
    parallel_for(x.rows(), row_block, [&](Index t, Index end) {
      auto h = h_.middleRows(t, end - t);
      auto out = logits.middleRows(t, end - t);
      auto& gemm = gemms_.local();
      gemm.template run<false, true>(x.middleRows(t, end - t), proj_, h);
      gemm.template run<false, true>(h, scaled_unit_, out);
      if (normalizes_tokens())
        for (Index i = 0; i < h.rows(); ++i) out.row(i) *= S(1) / std::max(h.row(i).norm(), S(opt_.eps));
    });
  }

  // With c = u ê^T (u = h / max(|h|, eps) or h, ê = e / max(|e|, eps)) and logits = c / tau:
  // dc = G / tau, dtau = -sum(G c) / tau^2 (0 while tau is clamped), du = dc ê, dê = dc^T u,
  // then each normalisation v = w / max(|w|, eps): dw = (dv - v (v . dv)) / |w| when |w| >= eps,
  // dv / eps otherwise; dW_proj += dh^T x, dx = dh W_proj.
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const S inv_tau = S(1) / effective_temperature();
    normalize_embeddings(S(1));  // unit_ = ê
    const Index T = x.rows(), r = proj_dim();
    fit(h_, T, r);
    fit(dh_, T, r);
    fit(token_norm_, T, 1);
    fit(partial_tau_, (T + row_block - 1) / row_block, 1);
    const bool tau_grad = learns_temperature() && temperature_(0, 0) >= S(opt_.min_temperature);
    gemms_.reserve();
    parallel_for(T, row_block, [&](Index t, Index end) {
      auto h = h_.middleRows(t, end - t);  // becomes u
      auto dh = dh_.middleRows(t, end - t);
      const auto g = dlogits.middleRows(t, end - t);
      auto& gemm = gemms_.local();
      gemm.template run<false, true>(x.middleRows(t, end - t), proj_, h);
      if (normalizes_tokens())
        for (Index i = 0; i < h.rows(); ++i) {
          const S n = h.row(i).norm();
          h.row(i) *= S(1) / std::max(n, S(opt_.eps));
          token_norm_(t + i, 0) = n;
        }
      gemm.run(g, unit_, dh, inv_tau);  // du = (G / tau) ê
      if (tau_grad) {
        // sum over the block of G . c, c = u ê^T (one small GEMM's worth, in block order)
        S acc = 0;
        for (Index i = 0; i < g.rows(); ++i) acc += dh.row(i).dot(h.row(i));  // = sum_j G_ij c_ij / tau
        partial_tau_(t / row_block, 0) = acc;
      }
      if (normalizes_tokens())
        for (Index i = 0; i < h.rows(); ++i) {
          const S n = token_norm_(t + i, 0);
          if (n >= S(opt_.eps)) dh.row(i) = (dh.row(i) - h.row(i) * h.row(i).dot(dh.row(i))) / n;
          else dh.row(i) /= S(opt_.eps);
        }
      gemm.run(dh, proj_, dx.middleRows(t, end - t));
    });
    auto& gemm = gemms_.local();
    // Reductions over T: one thread, a fixed order.
    gemm.template run<true, false>(dh_, x, proj_grad_, S(1), true);
    fit(dunit_, num_experts(), r);
    gemm.template run<true, false>(dlogits, h_, dunit_, inv_tau);  // dê = (G / tau)^T u
    for (Index j = 0; j < num_experts(); ++j) {
      const S n = embedding_norm_(j, 0);
      if (n >= S(opt_.eps))
        embedding_grad_.row(j) += (dunit_.row(j) - unit_.row(j) * unit_.row(j).dot(dunit_.row(j))) / n;
      else
        embedding_grad_.row(j) += dunit_.row(j) / S(opt_.eps);
    }
    if (tau_grad) {
      S sum = 0;
      for (Index b = 0; b < partial_tau_.rows(); ++b) sum += partial_tau_(b, 0);
      temperature_grad_(0, 0) -= sum * inv_tau;  // -sum(G c) / tau^2
    }
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.proj"), MatrixOut<S>(proj_), MatrixOut<S>(proj_grad_));
    visit(std::string_view("router.expert_embedding"), MatrixOut<S>(embedding_), MatrixOut<S>(embedding_grad_));
    if (learns_temperature())
      visit(std::string_view("router.temperature"), MatrixOut<S>(temperature_), MatrixOut<S>(temperature_grad_));
  }

private:
  // rows x cols with orthonormal columns (rows >= cols) or orthonormal rows (rows < cols), times
  // gain: the QR of a standard normal matrix, signs fixed by the diagonal of R (as
  // torch.nn.init.orthogonal_ does, from CounterRng draws instead of torch's generator).
  static Matrix<S> orthogonal(Index rows, Index cols, double gain, const CounterRng& rng) {
    const bool tall = rows >= cols;
    const Index m = tall ? rows : cols, n = tall ? cols : rows;
    Eigen::MatrixXd a(m, n);
    for (Index i = 0; i < m; ++i)
      for (Index j = 0; j < n; ++j) a(i, j) = rng.normal(i, j);
    const Eigen::HouseholderQR<Eigen::MatrixXd> qr(a);
    Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(m, n);
    const Eigen::MatrixXd rr = qr.matrixQR();
    for (Index j = 0; j < n; ++j)
      if (rr(j, j) < 0) q.col(j) *= -1.0;
    Matrix<S> out(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) out(i, j) = S(gain * (tall ? q(i, j) : q(j, i)));
    return out;
  }

  // unit_ = ê (rows e_j / max(|e_j|, eps)), scaled_unit_ = scale · ê, embedding_norm_ = |e_j|.
  void normalize_embeddings(S scale) {
    fit(unit_, embedding_.rows(), embedding_.cols());
    fit(scaled_unit_, embedding_.rows(), embedding_.cols());
    fit(embedding_norm_, embedding_.rows(), 1);
    for (Index j = 0; j < embedding_.rows(); ++j) {
      const S n = embedding_.row(j).norm();
      embedding_norm_(j, 0) = n;
      unit_.row(j) = embedding_.row(j) * (S(1) / std::max(n, S(opt_.eps)));
      scaled_unit_.row(j) = unit_.row(j) * scale;
    }
  }

  Options opt_;
  Matrix<S> proj_, embedding_, temperature_, proj_grad_, embedding_grad_, temperature_grad_;
  Matrix<S> h_, dh_, unit_, scaled_unit_, dunit_, embedding_norm_, token_norm_, partial_tau_;
  static constexpr Index row_block = 4096;
  PerThread<Gemm<S>> gemms_;
};

}  // namespace moe
