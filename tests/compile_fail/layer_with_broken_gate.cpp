// A layer around a router whose gate lacks forward: only the gate's diagnosis is printed, no
// follow-on complaint from MoELayer about scalar types.
#include <moe/moe.hpp>

struct NoForwardGate {
  using scalar_type = float;
  void backward(moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixIn<float>, moe::MatrixOut<float>) {}
};

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), NoForwardGate{}, moe::TopKSelector<float, 1>{});
  moe::MoELayer layer(std::move(router), moe::FFNExperts<float>(2, 4, 8));
  (void)layer;
}
