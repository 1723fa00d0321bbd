// A scorer without backward: moe::Router must name the missing member, nothing else.
#include <moe/moe.hpp>

struct NoBackwardScorer {
  using scalar_type = float;
  moe::Index input_dim() const { return 4; }
  moe::Index num_experts() const { return 2; }
  void forward(moe::MatrixIn<float>, const moe::TokenInputs<float>&, moe::MatrixOut<float>) {}
  template <class F>
  void for_each_parameter(F&&) {}
};

int main() {
  moe::Router router(NoBackwardScorer{}, moe::SoftmaxGate<float>{}, moe::TopKSelector<float, 1>{});
  (void)router;
}
