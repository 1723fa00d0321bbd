#pragma once
// Counter-based random numbers (docs/architecture.md, Determinism): a draw is a pure function of
// (seed, step, token, expert), so results do not depend on thread count or call order and
// another framework can reproduce the same draws from the same key.
#include <cmath>
#include <cstdint>
#include <numbers>

namespace moe {

class CounterRng {
public:
  constexpr explicit CounterRng(std::uint64_t seed = 0, std::uint64_t step = 0)
      : seed_(seed), step_(step) {}

  // 64 random bits for key (token, expert, lane).
  constexpr std::uint64_t bits(std::uint64_t token, std::uint64_t expert,
                               std::uint64_t lane = 0) const {
    std::uint64_t h = mix(seed_ ^ 0x9e3779b97f4a7c15ull);
    h = mix(h ^ step_);
    h = mix(h ^ token);
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

private:
  // SplitMix64 finalizer: a bijective avalanche mix of 64 bits.
  static constexpr std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  std::uint64_t seed_, step_;
};

}  // namespace moe
