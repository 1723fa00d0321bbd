// A float router with double experts: each part is fine alone, the mix is not.
#include <moe/moe.hpp>

int main() {
  moe::MoELayer layer(moe::make_switch_router<float>(4, 2), moe::FFNExperts<double>(2, 4, 8));
  (void)layer;
}
