#pragma once
// E identity experts: y = x for every expert. The skip path of depth routing (Mixture-of-Depths,
// MindSkip), and the way to measure the data path (route, dispatch, combine) without expert math.
#include <span>

#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class IdentityExperts {
public:
  using scalar_type = S;
  // MoELayer combines straight from the dispatched rows instead of copying them through here.
  static constexpr bool is_identity = true;

  IdentityExperts(Index num_experts, Index dim) : experts_(num_experts), dim_(dim) {
    detail::require<config_error>(num_experts >= 1, "IdentityExperts", "num_experts", num_experts,
                                  "num_experts >= 1");
    detail::require<config_error>(dim >= 1, "IdentityExperts", "dim", dim, "dim >= 1");
  }

  Index num_experts() const { return experts_; }
  Index input_dim() const { return dim_; }
  Index output_dim() const { return dim_; }
  constexpr bool causal() const { return true; }  // each row is processed alone

  void forward(MatrixIn<S> x, std::span<const Index>, MatrixOut<S> y) { y = x; }
  void backward(MatrixIn<S>, MatrixIn<S> dy, MatrixOut<S> dx) { dx = dy; }

  template <class F>
  void for_each_parameter(F&&) {}

private:
  Index experts_, dim_;
};

}  // namespace moe
