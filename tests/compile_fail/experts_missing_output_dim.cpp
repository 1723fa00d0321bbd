// Experts without output_dim: moe::MoELayer must name it.
#include "no_output_dim_experts.hpp"

int main() {
  moe::MoELayer layer(moe::make_switch_router<float>(4, 2), NoOutputDimExperts{});
  (void)layer;
}
