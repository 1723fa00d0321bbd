// A shared expert without output_dim: MoELayer names it, and says nothing about scalar types.
#include "no_output_dim_experts.hpp"

int main() {
  moe::MoELayer layer(moe::make_switch_router<float>(4, 2), moe::FFNExperts<float>(2, 4, 8),
                      NoOutputDimExperts{.experts = 1});
  (void)layer;
}
