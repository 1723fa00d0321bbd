// Trains a small MoE layer with SwitchRouter on clustered regression: tokens come from C
// clusters and each cluster has its own linear target map, so one expert per cluster is the
// natural solution. Prints the loss falling and, at the end, which expert serves which cluster.
// Options: --steps N, --seed N (router and expert initialisation). Top-1 routing without
// exploration noise can settle with two clusters on one expert and another expert idle: try a
// few seeds to see it (noisy gates are the cure).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <moe/moe.hpp>

int main(int argc, char** argv) {
  long steps = 600, seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--steps")) steps = std::atol(argv[i + 1]);
    if (!std::strcmp(argv[i], "--seed")) seed = std::atol(argv[i + 1]);
  }

  using S = float;
  const moe::Index clusters = 4, experts = 4, dim = 8, hidden = 32, batch = 256;
  const moe::CounterRng rng(7);
  // cluster centres and per-cluster target maps
  moe::Matrix<S> centre(clusters, dim), maps(clusters * dim, dim);
  for (moe::Index c = 0; c < clusters; ++c)
    for (moe::Index j = 0; j < dim; ++j) centre(c, j) = S(3 * rng.normal(1000 + c, j));
  for (moe::Index i = 0; i < maps.rows(); ++i)
    for (moe::Index j = 0; j < dim; ++j) maps(i, j) = S(rng.normal(2000 + i, j) / std::sqrt(double(dim)));

  // one batch of step `step`: x around its cluster's centre, target = x A_cluster
  moe::Matrix<S> x(batch, dim), target(batch, dim);
  std::vector<int> cluster(batch);
  const auto make_batch = [&](long step) {
    const moe::CounterRng draw(9, std::uint64_t(step));
    for (moe::Index t = 0; t < batch; ++t) {
      cluster[t] = int(draw.bits(t, 0) % clusters);
      for (moe::Index j = 0; j < dim; ++j) x(t, j) = centre(cluster[t], j) + S(0.5 * draw.normal(t, j + 1));
      target.row(t) = x.row(t) * maps.middleRows(cluster[t] * dim, dim);
    }
  };

  moe::MoELayer layer(moe::make_switch_router<S>(dim, experts, 1.5, std::uint64_t(seed)),
                      moe::FFNExperts<S>(experts, dim, hidden, moe::Activation::gelu, std::uint64_t(seed) + 1));
  // A stronger balance term than Switch's 1e-2: with 4 experts an unused one is a quarter of the model.
  layer.router().loss<0>() = moe::LoadBalanceLoss<S>(moe::BalanceNorm::switch_top1, S(0.1));
  moe::Adam<S> adam(S(3e-3));
  moe::Matrix<S> y(batch, dim), dy(batch, dim), dx(batch, dim);
  std::printf("step    mse      aux loss\n");
  for (long step = 0; step <= steps; ++step) {
    make_batch(step);
    layer.forward(x, y);
    dy = y - target;
    const double mse = dy.squaredNorm() / double(batch * dim);
    dy *= S(2) / S(batch * dim);
    moe::zero_grad(layer);
    layer.backward(dy, dx);
    adam.step(layer);
    if (step % (steps / 10 > 0 ? steps / 10 : 1) == 0)
      std::printf("%4ld  %8.4f  %8.4f\n", step, mse, double(layer.router().loss_values()[0]));
  }

  // cluster -> expert assignment on a fresh batch
  make_batch(steps + 1);
  layer.forward(x, y);
  moe::Matrix<long> counts = moe::Matrix<long>::Zero(clusters, experts + 1);  // last: dropped
  const auto& r = layer.routing();
  for (moe::Index t = 0; t < batch; ++t) {
    const auto c = r.token_offsets[t];
    counts(cluster[t], r.choice_slot[c] >= 0 ? r.choice_expert[c] : experts) += 1;
  }
  std::printf("\ncluster -> expert (tokens; last column dropped)\n        ");
  for (moe::Index e = 0; e < experts; ++e) std::printf("  e%ld ", long(e));
  std::printf(" drop\n");
  for (moe::Index c = 0; c < clusters; ++c) {
    std::printf("cluster %ld", long(c));
    for (moe::Index e = 0; e <= experts; ++e) std::printf(" %4ld", counts(c, e));
    std::printf("\n");
  }
  return 0;
}
