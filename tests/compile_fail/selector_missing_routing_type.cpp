// A selector that does not say what routing it produces.
#include <moe/moe.hpp>

struct NoRoutingTypeSelector {
  using scalar_type = float;
};

int main() {
  moe::Router router(moe::LinearScorer<float>(4, 2), moe::SoftmaxGate<float>{}, NoRoutingTypeSelector{});
  (void)router;
}
