// A gate that does not declare its scalar type.
#include <moe/moe.hpp>

struct UntypedGate {
  void forward(moe::MatrixIn<float>, moe::MatrixOut<float>) {}
};

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), UntypedGate{}, moe::TopKSelector<float, 1>{});
  (void)router;
}
