#pragma once
// Linear logits plus Gaussian noise in training (docs/scorers.md, NoisyLinearScorer):
// logits = x W_g^T + stddev * n, n ~ N(0, 1). Shazeer et al. 2017 learn the deviation,
// stddev = softplus(x W_noise^T) + 1e-2 (NoiseScale::learned); V-MoE fixes it at noise_std / E
// (NoiseScale::fixed). The clean logits and the deviation are shown to the losses
// (moe::LogitNoise), whose gradients to them come back through logit_noise_gradient().
#include <cmath>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/core/math.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/transcendental.hpp"
#include "moe/scorers/linear.hpp"

namespace moe {

enum class NoiseScale {
  fixed,    // stddev = noise_std / E, a constant (V-MoE)
  learned,  // stddev = softplus(x W_noise^T) + noise_epsilon (Shazeer et al. 2017)
};

template <scalar S>
class NoisyLinearScorer {
public:
  using scalar_type = S;

  struct Options {
    NoiseScale scale = NoiseScale::learned;
    double noise_std = 1.0;        // fixed: the deviation is noise_std / E (0: no noise at all)
    double noise_epsilon = 1e-2;   // learned: the floor added to the softplus
    // Var(W_g) = init_scale / D. Absent: the reference's, 0 for learned (tensor2tensor and the
    // PyTorch port start both matrices at zero), 1 for fixed (flax Dense, lecun normal).
    std::optional<double> init_scale{};
    std::uint64_t seed = 0;        // initial W_g
    Draws draws{};                 // the noise: caller's tokens.normal or the generator's
  };

  NoisyLinearScorer(Index input_dim, Index num_experts) : NoisyLinearScorer(input_dim, num_experts, Options{}) {}
  NoisyLinearScorer(Index input_dim, Index num_experts, Options opt)
      : opt_(checked(opt)),
        gate_(input_dim, num_experts,
              {.init_scale = opt.init_scale.value_or(opt.scale == NoiseScale::learned ? 0.0 : 1.0), .seed = opt.seed}),
        noise_(input_dim, num_experts, {.init_scale = 0.0}) {}

  Index input_dim() const { return gate_.input_dim(); }
  Index num_experts() const { return gate_.num_experts(); }
  const Options& options() const { return opt_; }
  Matrix<S>& weight() { return gate_.weight(); }
  const Matrix<S>& weight() const { return gate_.weight(); }
  Matrix<S>& noise_weight() { return noise_.weight(); }  // only a parameter when learned
  LinearScorer<S>& linear() { return gate_; }
  constexpr bool causal() const { return true; }  // per token; the noise is keyed by token

  // The router's mode and step before each forward: evaluation turns the noise off.
  void set_draw_state(const DrawState& state) { state_ = state; }

  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    const Index T = x.rows(), E = num_experts();
    const DrawSource<S> draw(opt_.draws, state_, DrawStream::normal, Distribution::normal, tokens.normal, E,
                             tokens.first);
    const bool noisy = draw.on() && (learned() || opt_.noise_std > 0);
    if (!noisy) {
      gate_.forward(x, tokens, logits);
      commit(false, logits);
      return;
    }
    // a spare set: a batch the router rejects (non-finite logits) leaves the last one in place
    Set& s = sets_[1 - current_];
    fit(s.clean, T, E);
    fit(s.normal, T, E);
    gate_.forward(x, tokens, s.clean);
    if (learned()) {
      fit(s.raw, T, E);
      fit(s.stddev, T, E);
      noise_.forward(x, tokens, s.raw);
    } else {
      fit(s.stddev, 1, 1);
      s.stddev(0, 0) = S(opt_.noise_std / double(E));
    }
    const S eps = S(opt_.noise_epsilon);
    uniforms_.reserve();
    // Row blocks of the contiguous [T, E] matrices: the draws and the softplus run on whole SIMD
    // registers (kernels/transcendental.hpp), the same way on any thread count.
    parallel_for(T, row_block, [&](Index begin, Index end) {
      const Index n = (end - begin) * E;
      S* const normal = s.normal.row(begin).data();
      if (draw.generated()) {  // Box-Muller over the generator's lanes 0 and 1, as CounterRng::normal
        Uniforms& u = uniforms_.local();
        fit(u.first, n);
        fit(u.second, n);
        const CounterRng& rng = draw.generator();
        for (Index t = begin; t < end; ++t)
          for (Index e = 0; e < E; ++e) {
            const auto token = std::uint64_t(tokens.first + t), expert = std::uint64_t(e);
            const auto i = std::size_t((t - begin) * E + e);
            u.first[i] = rng.uniform(token, expert, 0);
            u.second[i] = rng.uniform(token, expert, 1);
          }
        kernels::box_muller(u.first.data(), u.second.data(), normal, n);
      } else {
        for (Index t = begin; t < end; ++t)
          for (Index e = 0; e < E; ++e) s.normal(t, e) = draw(t, e);
      }
      if (learned()) kernels::softplus(s.raw.row(begin).data(), s.stddev.row(begin).data(), n, eps);
      for (Index t = begin; t < end; ++t)
        for (Index e = 0; e < E; ++e)
          logits(t, e) = s.clean(t, e) + (learned() ? s.stddev(t, e) : s.stddev(0, 0)) * s.normal(t, e);
    });
    commit(true, logits);
  }

  // The noise of the last forward, or null when it had none (evaluation, noise_std = 0).
  // (A view rebuilt on each call, so a moved scorer never points into its old self.)
  const LogitNoise<S>* logit_noise() const {
    if (!noisy_) return nullptr;
    const Set& s = sets_[current_];
    view_.emplace(LogitNoise<S>{s.clean, s.stddev});
    return &*view_;
  }

  // Zeroed buffers for the losses' gradients to the clean logits and the deviation; backward
  // takes them through the parameters (the deviation's only when it is learned).
  LogitNoiseGradient<S> logit_noise_gradient() {
    const Set& s = sets_[current_];
    fit(dclean_, s.clean.rows(), s.clean.cols());
    dclean_.setZero();
    fit(dstddev_, learned() ? s.clean.rows() : 0, learned() ? s.clean.cols() : 0);
    dstddev_.setZero();
    pending_ = true;
    return {dclean_, dstddev_};
  }

  // dW_g += (dlogits + dclean)^T x; dW_noise += (((dlogits * n) + dstddev) * sigmoid(x W_noise^T))^T x;
  // dx = both paths' input gradients (written, not added).
  void backward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    const bool pending = std::exchange(pending_, false);
    if (!noisy_) {
      gate_.backward(x, tokens, dlogits, dx);
      return;
    }
    const Set& s = sets_[current_];
    const Index T = dlogits.rows(), E = dlogits.cols();
    fit(dgate_, T, E);
    dgate_ = dlogits;
    if (pending) dgate_ += dclean_;
    gate_.backward(x, tokens, dgate_, dx);
    if (!learned()) return;
    fit(d_raw_, T, E);  // d L / d (x W_noise^T), the deviation's pre-activation
    for (Index t = 0; t < T; ++t)
      for (Index e = 0; e < E; ++e)
        d_raw_(t, e) = (dlogits(t, e) * s.normal(t, e) + (pending ? dstddev_(t, e) : S(0))) * detail::sigmoid(s.raw(t, e));
    fit(dx_noise_, x.rows(), x.cols());
    noise_.backward(x, tokens, d_raw_, dx_noise_);
    dx += dx_noise_;
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    gate_.for_each_parameter(visit);
    if (learned())
      noise_.for_each_parameter([&](std::string_view, MatrixOut<S> p, MatrixOut<S> g) {
        visit(std::string_view("router.noise_weight"), p, g);
      });
  }

private:
  // Clean logits, draws, the deviation and its pre-activation of one forward.
  struct Set {
    Matrix<S> clean, normal, stddev, raw;
  };

  static const Options& checked(const Options& opt) {
    detail::require<config_error>(std::isfinite(opt.noise_std) && opt.noise_std >= 0, "NoisyLinearScorer",
                                  "noise_std", opt.noise_std, "noise_std >= 0 and finite");
    detail::require<config_error>(std::isfinite(opt.noise_epsilon) && opt.noise_epsilon >= 0, "NoisyLinearScorer",
                                  "noise_epsilon", opt.noise_epsilon, "noise_epsilon >= 0 and finite");
    return opt;
  }

  bool learned() const { return opt_.scale == NoiseScale::learned; }

  // Makes this forward's set current, unless its logits are not finite: the router then rejects
  // the batch and keeps the previous one, whose backward must still see its own noise.
  void commit(bool noisy, MatrixIn<S> logits) {
    if (!logits.allFinite()) return;
    noisy_ = noisy;
    if (!noisy) return;
    current_ = 1 - current_;
  }

  struct Uniforms {
    std::vector<double> first, second;  // a row block's generated lanes 0 and 1
  };

  static constexpr Index row_block = 1024;
  PerThread<Uniforms> uniforms_;
  Options opt_;
  LinearScorer<S> gate_, noise_;
  DrawState state_{};
  Set sets_[2];
  int current_ = 0;
  bool noisy_ = false, pending_ = false;
  mutable std::optional<LogitNoise<S>> view_;
  Matrix<S> dclean_, dstddev_, dgate_, d_raw_, dx_noise_;  // backward scratch
};

}  // namespace moe
