// Router::route keeps a view of the logits until backward: an expression (or a column-major
// matrix) would be routed from a temporary copy that dies with the call, so it must not compile.
#include <moe/moe.hpp>

int main() {
  auto router = moe::make_topk_router<float>(4, 3, 2);
  const moe::Matrix<float> logits = moe::Matrix<float>::Random(5, 3);
  router.route(2.0f * logits);
}
