#pragma once
// Counter-based random numbers (docs/architecture.md, Determinism): a draw is a pure function of
// (seed, step, token, expert), so results do not depend on thread count or call order and
// another framework can reproduce the same draws from the same key.
#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>

#include "moe/core/tensor.hpp"

namespace moe {

enum class Distribution { normal, gumbel, uniform };

// The library's stochastic options draw from separate streams, so two of them under one seed
// stay independent (stream 0 is the parameters' initialisation).
enum class DrawStream : std::uint64_t { init = 0, jitter, normal, gumbel, uniform, second_uniform };

class CounterRng {
public:
  constexpr explicit CounterRng(std::uint64_t seed = 0, std::uint64_t step = 0,
                                DrawStream stream = DrawStream::init)
      : prefix_(mix(mix((stream == DrawStream::init ? seed : mix(seed ^ (std::uint64_t(stream) * 0xd1b54a32d192ed03ull))) ^
                        0x9e3779b97f4a7c15ull) ^
                    step)) {}

  // 64 random bits for key (token, expert, lane).
  constexpr std::uint64_t bits(std::uint64_t token, std::uint64_t expert,
                               std::uint64_t lane = 0) const {
    std::uint64_t h = mix(prefix_ ^ token);  // the (seed, step) part is mixed once, at construction
    h = mix(h ^ expert);
    return mix(h ^ lane);
  }

  // Uniform in the open interval (0, 1): 52 bits plus a half step, so both ends are exact
  // doubles short of 0 and 1 (log(u) and log(1 - u) stay finite).
  double uniform(std::uint64_t token, std::uint64_t expert, std::uint64_t lane = 0) const {
    return (static_cast<double>(bits(token, expert, lane) >> 12) + 0.5) * 0x1.0p-52;
  }

  // Standard normal by Box-Muller over two independent lanes.
  double normal(std::uint64_t token, std::uint64_t expert) const {
    const double u1 = uniform(token, expert, 0), u2 = uniform(token, expert, 1);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

  // Standard Gumbel(0, 1).
  double gumbel(std::uint64_t token, std::uint64_t expert) const {
    return -std::log(-std::log(uniform(token, expert)));
  }

  // The draw of `dist` for key (token, expert).
  template <class S>
  S draw(Distribution dist, std::uint64_t token, std::uint64_t expert) const {
    switch (dist) {
      case Distribution::normal: return S(normal(token, expert));
      case Distribution::gumbel: return S(gumbel(token, expert));
      case Distribution::uniform: break;
    }
    return S(uniform(token, expert));
  }

private:
  // SplitMix64 finalizer: a bijective avalanche mix of 64 bits.
  static constexpr std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::uint64_t prefix_;
};

// When and under which key a stochastic option draws (docs/architecture.md, Randomness).
struct Draws {
  std::uint64_t seed = 0;
  bool at_evaluation = false;  // most references draw in training only
};

// The router's mode, handed to every stochastic policy before each forward
// (`void set_draw_state(const DrawState&)`): evaluation turns noise off, and the step keys the
// draws, so each step draws afresh and any step can be replayed.
struct DrawState {
  bool training = true;
  std::uint64_t step = 0;
};

// One option's draws for a batch: the caller's tensor ([T, width], row-major) when given, else
// the generator's, keyed by the token's place in the batch.
template <class S>
class DrawSource {
public:
  DrawSource(const Draws& draws, const DrawState& state, DrawStream stream, Distribution dist,
             std::span<const S> given, Index width, Index first_token = 0)
      : on_(state.training || draws.at_evaluation), rng_(draws.seed, state.step, stream), dist_(dist),
        given_(given), width_(width), first_(first_token) {}

  bool on() const { return on_; }
  // Whether the draws come from the generator (the caller gave none), and the generator itself,
  // for a caller that wants the raw uniforms of a whole block at once.
  bool generated() const { return given_.empty(); }
  const CounterRng& generator() const { return rng_; }
  // The draw for row t of the view (its token first_token + t) and column j.
  S operator()(Index t, Index j) const {
    if (!given_.empty()) return given_[std::size_t(t * width_ + j)];
    return rng_.draw<S>(dist_, std::uint64_t(first_ + t), std::uint64_t(j));
  }

private:
  bool on_;
  CounterRng rng_;
  Distribution dist_;
  std::span<const S> given_;
  Index width_, first_;
};

}  // namespace moe
