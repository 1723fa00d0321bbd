// A float scorer with a double gate: every policy is fine alone, the mix is not.
#include <moe/moe.hpp>

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), moe::SoftmaxGate<double>{},
                     moe::TopKSelector<float, 1>{});
  (void)router;
}
