#pragma once
// Experts that model moe::experts except for output_dim (shared by the compile-fail tests).
#include <moe/moe.hpp>

struct NoOutputDimExperts {
  using scalar_type = float;
  moe::Index experts = 2;
  moe::Index num_experts() const { return experts; }
  moe::Index input_dim() const { return 4; }
  void forward(moe::MatrixIn<float>, std::span<const moe::Index>, moe::MatrixOut<float>) {}
  void backward(moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixOut<float>) {}
  template <class F>
  void for_each_parameter(F&&) {}
};
