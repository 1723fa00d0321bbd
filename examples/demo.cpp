// The main demo: one MoE layer per router preset on a synthetic batch, forward and backward,
// then one table row per preset. Options: --tokens T --dim D --experts E --hidden H --reps N.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <moe/moe.hpp>

namespace {

struct Settings {
  moe::Index tokens = 4096, dim = 256, experts = 16, hidden = 512, reps = 3;
};

Settings parse(int argc, char** argv) {
  Settings s;
  for (int i = 1; i + 1 < argc; i += 2) {
    const long v = std::atol(argv[i + 1]);
    if (!std::strcmp(argv[i], "--tokens")) s.tokens = v;
    else if (!std::strcmp(argv[i], "--dim")) s.dim = v;
    else if (!std::strcmp(argv[i], "--experts")) s.experts = v;
    else if (!std::strcmp(argv[i], "--hidden")) s.hidden = v;
    else if (!std::strcmp(argv[i], "--reps")) s.reps = v;
    else { std::fprintf(stderr, "unknown option %s\n", argv[i]); std::exit(2); }
  }
  return s;
}

// Runs forward + backward `reps` times after one warm-up call and prints the preset's row.
template <class Router>
void run(const char* name, Router router, const Settings& s, const moe::Matrix<float>& x) {
  moe::MoELayer layer(std::move(router), moe::FFNExperts<float>(s.experts, s.dim, s.hidden));
  moe::Matrix<float> y(s.tokens, s.dim), dx(s.tokens, s.dim);
  const moe::Matrix<float> dy = moe::Matrix<float>::Ones(s.tokens, s.dim) / float(s.tokens);
  layer.forward(x, y);  // warm-up: sizes every workspace once
  layer.backward(dy, dx);
  const auto start = std::chrono::steady_clock::now();
  for (moe::Index i = 0; i < s.reps; ++i) {
    layer.forward(x, y);
    layer.backward(dy, dx);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto& r = layer.routing();
  std::printf("| %-20s | %12.0f | %9.2f | %7.3f | %16.3f |\n", name,
              double(s.tokens * s.reps) / seconds, 100.0 * moe::drop_fraction(r), moe::load_cv(r),
              moe::experts_per_token(r));
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  std::printf("moe-routers %s demo: T=%ld tokens, D=%ld, E=%ld experts, FFN hidden %ld (GELU), "
              "float, forward + backward\n\n",
              MOE_VERSION_STRING, long(s.tokens), long(s.dim), long(s.experts), long(s.hidden));
  // Tokens from a few clusters, so routing has structure to find (and load is not uniform).
  moe::Matrix<float> x(s.tokens, s.dim);
  const moe::CounterRng rng(42);
  for (moe::Index t = 0; t < s.tokens; ++t)
    for (moe::Index j = 0; j < s.dim; ++j)
      x(t, j) = float(rng.normal(t, j) + 2.0 * rng.normal(t % 5, s.dim + j));

  std::printf("| %-20s | %12s | %9s | %7s | %16s |\n", "preset", "tokens/s", "dropped %", "load CV",
              "experts / token");
  std::printf("|%s|%s|%s|%s|%s|\n", std::string(22, '-').c_str(), std::string(14, '-').c_str(),
              std::string(11, '-').c_str(), std::string(9, '-').c_str(), std::string(18, '-').c_str());
  run("SwitchRouter", moe::make_switch_router<float>(s.dim, s.experts), s, x);
  run("GShardRouter", moe::make_gshard_router<float>(s.dim, s.experts), s, x);
  run("TopKRouter", moe::make_topk_router<float>(s.dim, s.experts, 2), s, x);
  run("DeepSpeedTopKRouter", moe::make_deepspeed_topk_router<float>(s.dim, s.experts, 2), s, x);
  return 0;
}
