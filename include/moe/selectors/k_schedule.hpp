#pragma once
// Schedules of the number of experts per token over training (docs/selectors.md, Schedules of k):
// SMoE-Dropout's and HyperRouter's "dynamic_moe" modes, k moving from k_min to k_max (or back)
// over `total` steps, rounded as Python's round (half to even) and clipped to [k_min, k_max], as
// the references' calculate_gate_number computes it. Feed the result to TopKSelector::set_k.
#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"

namespace moe {

enum class KSchedule {
  linear_increase,  // k_min + (k_max - k_min) step / total
  linear_decrease,  // k_max - (k_max - k_min) step / total
  cosine_decrease,  // k_min + (k_max - k_min) cos(pi step / (2 total))
  cosine_increase,  // k_max - (k_max - k_min) cos(pi step / (2 total))
};

inline Index scheduled_k(KSchedule schedule, Index step, Index total, Index k_min, Index k_max) {
  detail::require<config_error>(k_min >= 1 && k_min <= k_max, "scheduled_k", "k_min", k_min,
                                "1 <= k_min <= k_max (" + std::to_string(k_max) + ")");
  detail::require<config_error>(total >= 1, "scheduled_k", "total", total, "total >= 1 step");
  detail::require<config_error>(step >= 0, "scheduled_k", "step", step, "step >= 0");
  // in the references' order of operations: (span * step) / total, then pi * step / (2 total)
  const Index span = k_max - k_min;
  const double c = std::cos(std::numbers::pi * double(step) / double(2 * total));
  double k = 0;
  switch (schedule) {
    case KSchedule::linear_increase: k = std::nearbyint(double(span * step) / double(total)) + double(k_min); break;
    case KSchedule::linear_decrease: k = std::nearbyint(double(-span * step) / double(total)) + double(k_max); break;
    case KSchedule::cosine_decrease: k = std::nearbyint(double(span) * c) + double(k_min); break;
    case KSchedule::cosine_increase: k = std::nearbyint(double(-span) * c) + double(k_max); break;
  }
  return std::clamp(Index(k), k_min, k_max);
}

}  // namespace moe
