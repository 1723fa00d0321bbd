// The downstream project of the packaging tests: whatever it uses must work for a consumer that
// got moe::routers via find_package, add_subdirectory or FetchContent.
#include <moe/moe.hpp>

#include <cstdio>

int main() {
  const moe::Index tokens = 32, dim = 8, experts = 4;
  moe::MoELayer layer(moe::make_switch_router<float>(dim, experts), moe::FFNExperts<float>(experts, dim, 16));
  const moe::Matrix<float> x = moe::Matrix<float>::Random(tokens, dim);
  moe::Matrix<float> y(tokens, dim), dx(tokens, dim);
  layer.forward(x, y);
  layer.backward(y, dx);
  std::printf("moe-routers %s: %ld slots, drop %.3f\nSIMD target %s\n", MOE_VERSION_STRING,
              long(layer.routing().num_slots()), moe::drop_fraction(layer.routing()), moe::simd_target());
  return y.allFinite() && dx.allFinite() && layer.routing().num_slots() > 0 ? 0 : 1;
}
