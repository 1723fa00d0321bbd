// A shared expert without output_dim: MoELayer names it, and says nothing about scalar types.
#include <moe/moe.hpp>

struct NoOutputDimExperts {
  using scalar_type = float;
  moe::Index num_experts() const { return 1; }
  moe::Index input_dim() const { return 4; }
  void forward(moe::MatrixIn<float>, std::span<const moe::Index>, moe::MatrixOut<float>) {}
  void backward(moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixOut<float>) {}
  template <class F>
  void for_each_parameter(F&&) {}
};

int main() {
  moe::MoELayer layer(moe::make_switch_router<float>(4, 2), moe::FFNExperts<float>(2, 4, 8),
                      NoOutputDimExperts{});
  (void)layer;
}
