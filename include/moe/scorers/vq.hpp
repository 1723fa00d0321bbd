#pragma once
// Vector-quantised routing (Do, Pham, Le, Tran, "On the Role of Discrete Representation in Sparse
// Mixture of Experts", TMLR 2025; docs/scorers.md, VQScorer): a codebook of K codes c_j; a token's
// logits are its negative squared distances to the codes, logits_tj = -|x_t - c_j|^2, so the
// nearest code has the largest logit (NearestCodeSelector routes token t to code j mod E).
//
// The quantiser owns its loss, as the reference's does, because its two terms differentiate two
// stop-gradient views of one distance, which no function of the logits can express:
//   loss = coefficient (|q - sg(x)|^2 + beta |sg(q) - x|^2) / (N D),  q = c_{code(t)},
// summed over the N real tokens: the codebook term moves the chosen codes toward their tokens,
// the commitment term (beta) pulls the tokens toward their codes. Router::aux_loss adds it and
// backward adds its gradient. A gradient that reaches the logits from a gate or selector (none
// does with the VQ router's identity gate and nearest-code selector) flows through the distance
// to both x and the codebook.
//
// Dead codes (optional, Reinit): an exponential moving average of each code's share of the
// tokens; after each training forward, code j moves toward an anchor token by
// a_j = exp(-u_j K 10 / (1 - decay) - 1e-3): c_j <- (1 - a_j) c_j + a_j anchor_j, so a code no
// token uses is re-initialised near the data and a used one does not move.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moe/core/gemm.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/codebook.hpp"
#include "moe/kernels/top_k.hpp"

namespace moe {

// Which token a dead code is re-initialised toward.
enum class Reinit {
  none,        // no re-initialisation
  closest,     // the token nearest to the code (ties to the lower token)
  probrandom,  // a token drawn with probability softmax over tokens of -|x_t - c_j|^2 (seeded)
};

template <scalar S>
class VQScorer {
public:
  using scalar_type = S;

  struct Options {
    double commitment = 0.25;    // beta (commitment_cost)
    double coefficient = 1.0;    // the loss's weight in the total (the reference scripts: beta_vq = 0.08)
    Reinit reinit = Reinit::none;
    double usage_decay = 0.99;   // the moving average of code usage that drives Reinit
    Draws draws{};               // Reinit::probrandom's generator key (training only)
    std::uint64_t seed = 0;      // codebook ~ U(-1/K, 1/K)
  };

  VQScorer(Index input_dim, Index num_experts, Index codes) : VQScorer(input_dim, num_experts, codes, Options{}) {}
  VQScorer(Index input_dim, Index num_experts, Index codes, Options opt) : experts_(num_experts), opt_(opt) {
    constexpr std::string_view where = "VQScorer";
    detail::require<config_error>(input_dim >= 1, where, "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, where, "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(codes >= 1, where, "codes", codes, "codes >= 1 (a codebook of size 0 has no nearest code)");
    detail::require<config_error>(std::isfinite(opt.commitment) && opt.commitment >= 0, where, "commitment",
                                  opt.commitment, "finite and >= 0");
    detail::require<config_error>(std::isfinite(opt.coefficient) && opt.coefficient >= 0, where, "coefficient",
                                  opt.coefficient, "finite and >= 0");
    detail::require<config_error>(opt.usage_decay >= 0 && opt.usage_decay < 1, where, "usage_decay", opt.usage_decay,
                                  "0 <= usage_decay < 1");
    codebook_.resize(codes, input_dim);
    const CounterRng rng(opt.seed);
    const double bound = 1.0 / double(codes);  // nn.Embedding's weight.uniform_(-1/K, 1/K)
    for (Index j = 0; j < codes; ++j)
      for (Index i = 0; i < input_dim; ++i) codebook_(j, i) = S(bound * (2 * rng.uniform(j, i) - 1));
    codebook_grad_.setZero(codes, input_dim);
    usage_.assign(std::size_t(codes), 0.0);
  }

  Index input_dim() const { return codebook_.cols(); }
  Index num_experts() const { return experts_; }
  Index num_codes() const { return codebook_.rows(); }
  Index logit_columns() const { return num_codes(); }
  constexpr bool causal() const { return true; }  // per token (Reinit changes the codebook only after the batch)
  const Options& options() const { return opt_; }

  // c [K, D] (trainable). Writing it is how a trained codebook is loaded.
  Matrix<S>& codebook() { return codebook_; }
  // The last forward: each token's code (-1 for padding), the codebook it was quantised against
  // (q_t = row codes()[t]; a copy only when re-initialisation has moved the codebook since), and
  // the loss before the coefficient, |q - x|^2 (1 + beta) / (N D).
  std::span<const std::int32_t> codes() const { return codes_; }
  const Matrix<S>& forward_codebook() const { return reinitialised_ ? snapshot_ : codebook_; }
  S loss() const { return loss_; }
  // The term Router::aux_loss adds: coefficient * loss().
  S aux_loss() const { return S(opt_.coefficient) * loss_; }
  // Each code's moving share of the tokens (Reinit's usage), updated by training forwards.
  std::span<const double> usage() const { return usage_; }

  void set_draw_state(const DrawState& state) { state_ = state; }

  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    const Index T = x.rows(), D = x.cols(), K = num_codes();
    // Re-initialisation writes x into the codebook: a bad x must be refused before, not after.
    if (state_.training && opt_.reinit != Reinit::none) detail::check_finite<S>("VQScorer::forward", "x", x);
    kernels::squared_distances<S, true>(x, codebook_, logits, gemm_, code_norms_);
    fit(codes_, T);
    double sum = 0;  // the loss as the reference computes it, from q - x (not the expanded distance)
    Index real = 0;
    for (Index t = 0; t < T; ++t) {
      if (!tokens.is_valid(t)) {
        codes_[t] = -1;
        continue;
      }
      kernels::top_k_row(logits.data() + t * logits.outerStride(), K, 1, &codes_[t]);  // ties to the lower code
      const Index j = codes_[t];
      sum += double((codebook_.row(j) - x.row(t)).squaredNorm());
      ++real;
    }
    real_ = real;
    loss_ = real == 0 ? S(0) : S(sum * (1 + opt_.commitment) / (double(real) * double(D)));
    reinitialised_ = false;
    if (state_.training && opt_.reinit != Reinit::none && real > 0) {
      fit(snapshot_, K, D);
      snapshot_ = codebook_;
      reinitialised_ = true;
      reinitialise(x, tokens, logits);
    }
  }

  // The loss's gradient (codebook term to the codes, commitment term to the tokens), then any
  // gradient that reached the logits, through the distance.
  void backward(MatrixIn<S> x, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const Index T = x.rows(), D = x.cols();
    dx.setZero();
    if (real_ > 0 && opt_.coefficient != 0) {
      const S scale = S(2 * opt_.coefficient / (double(real_) * double(D)));
      const Matrix<S>& q = forward_codebook();
      for (Index t = 0; t < T; ++t) {
        if (codes_[t] < 0) continue;
        const auto diff = q.row(codes_[t]) - x.row(t);  // q - x, an expression: nothing allocated
        codebook_grad_.row(codes_[t]) += scale * diff;
        dx.row(t) -= S(opt_.commitment) * scale * diff;
      }
    }
    if (dlogits.isZero(0)) return;
    // logits = -(|x|^2 + |c|^2 - 2 x c^T): dx = 2 (g C - rowsum(g) x), dC = 2 (g^T X - colsum(g) C)
    fit(row_sums_, T, 1);
    row_sums_ = dlogits.rowwise().sum();
    gemm_.run(dlogits, codebook_, dx, S(2), true);
    for (Index t = 0; t < T; ++t) dx.row(t) -= S(2) * row_sums_(t, 0) * x.row(t);
    gemm_.template run<true, false>(dlogits, x, codebook_grad_, S(2), true);
    fit(col_sums_, 1, dlogits.cols());
    col_sums_ = dlogits.colwise().sum();
    for (Index j = 0; j < num_codes(); ++j) codebook_grad_.row(j) -= S(2) * col_sums_(0, j) * codebook_.row(j);
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.codebook"), MatrixOut<S>(codebook_), MatrixOut<S>(codebook_grad_));
  }

private:
  // The usage average, then each code toward its anchor token (the reference's online
  // re-initialisation, run after the batch is quantised: this batch's codes and loss are unchanged).
  void reinitialise(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixIn<S> logits) {
    const Index T = x.rows(), K = num_codes();
    std::vector<double>& share = share_;
    share.assign(std::size_t(K), 0.0);
    for (Index t = 0; t < T; ++t)
      if (codes_[t] >= 0) share[std::size_t(codes_[t])] += 1.0 / double(real_);
    const double decay = opt_.usage_decay;
    const DrawSource<S> draw(opt_.draws, state_, DrawStream::uniform, Distribution::uniform, {}, 1);
    for (Index j = 0; j < K; ++j) {
      usage_[std::size_t(j)] = usage_[std::size_t(j)] * decay + share[std::size_t(j)] * (1 - decay);
      const double a = std::exp(-(usage_[std::size_t(j)] * double(K) * 10) / (1 - decay) - 1e-3);
      const Index anchor = opt_.reinit == Reinit::closest ? closest_token(tokens, logits, j)
                                                          : drawn_token(tokens, logits, j, double(draw(j, 0)));
      codebook_.row(j) = S(1 - a) * codebook_.row(j) + S(a) * x.row(anchor);  // entry by entry: no aliasing
    }
  }

  static Index closest_token(const TokenInputs<S>& tokens, MatrixIn<S> logits, Index j) {
    Index best = -1;
    for (Index t = 0; t < logits.rows(); ++t)
      if (tokens.is_valid(t) && (best < 0 || logits(t, j) > logits(best, j))) best = t;
    return best;
  }

  // Inverse CDF of softmax over the real tokens of -distance to code j, at u in (0, 1).
  static Index drawn_token(const TokenInputs<S>& tokens, MatrixIn<S> logits, Index j, double u) {
    const Index top = closest_token(tokens, logits, j);
    double total = 0;
    for (Index t = 0; t < logits.rows(); ++t)
      if (tokens.is_valid(t)) total += std::exp(double(logits(t, j)) - double(logits(top, j)));
    double sum = 0;
    Index last = top;
    for (Index t = 0; t < logits.rows(); ++t) {
      if (!tokens.is_valid(t)) continue;
      sum += std::exp(double(logits(t, j)) - double(logits(top, j)));
      last = t;
      if (sum > u * total) return t;
    }
    return last;  // rounding past the end
  }

  Index experts_;
  Options opt_;
  Matrix<S> codebook_, codebook_grad_;
  std::vector<std::int32_t> codes_;
  Matrix<S> snapshot_;  // the codebook this forward quantised against, when re-initialisation moved it
  bool reinitialised_ = false;
  S loss_ = 0;
  Index real_ = 0;
  std::vector<double> usage_, share_;
  DrawState state_{};
  Gemm<S> gemm_;
  Matrix<S> code_norms_, row_sums_, col_sums_;
};

}  // namespace moe
