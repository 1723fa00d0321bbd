// A loss term without a coefficient.
#include <moe/moe.hpp>

struct NoCoefficientLoss {
  using scalar_type = float;
  float forward(const moe::LossInput<float>&) const { return 0; }
  void backward(const moe::LossInput<float>&, moe::MatrixOut<float>, moe::MatrixOut<float>) const {}
};

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), moe::SoftmaxGate<float>{},
                     moe::TopKSelector<float, 1>{}, NoCoefficientLoss{});
  (void)router;
}
