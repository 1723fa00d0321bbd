// A gate with only backward: moe::Router must ask for forward.
#include <moe/moe.hpp>

struct NoForwardGate {
  using scalar_type = float;
  void backward(moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixOut<float>) {}
};

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), NoForwardGate{}, moe::TopKSelector<float, 1>{});
  (void)router;
}
