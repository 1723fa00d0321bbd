// Routes hidden states through every MoE layer's router of a released model's checkpoint
// (docs/released_models.md) and prints, per layer, how the router spreads the tokens:
//   load      tokens per expert: min, max and coefficient of variation (std / mean)
//   entropy   mean entropy of softmax(logits) per token, in nats (log E = uniform)
//   margin    mean gap between each token's k-th and (k+1)-th ranking value (the gate's scores,
//             plus DeepSeek-V3's selection bias): how firmly the k-th expert was chosen
//   dead      experts no token chose
//
//   route_checkpoint <checkpoint file or dir> <family> [--hidden FILE.safetensors] [--tokens N]
//                    [--seed S] [--config FILE] [--k K] [--groups G] [--groups-kept G2]
//                    [--scale F] [--norm-topk-prob 0|1]
//   route_checkpoint --write-example <dir> <family>
//
// The preset comes from the config.json beside the checkpoint (or --config). Without one, the
// flags give k and the routing options (the family's defaults otherwise), the router tensors'
// shape gives E and D, and the layers holding a router are the MoE layers. Hidden states are
// the tensors "hidden.<layer>" of --hidden (or its only tensor, for every layer), otherwise N
// synthetic Gaussian tokens (default 1024). --write-example writes a tiny random checkpoint and
// config.json of the family, for trying the program without downloading a model.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <moe/moe.hpp>

namespace {

using moe::Index;
using moe::Matrix;
using moe::ModelFamily;
namespace fs = std::filesystem;

struct Settings {
  fs::path checkpoint, hidden, config;
  ModelFamily family = ModelFamily::mixtral;
  long tokens = 1024, seed = 1;
  bool write_example = false;
  // without a config.json
  long k = 0, groups = 0, groups_kept = 0, norm_topk_prob = -1;
  double scale = 0;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "route_checkpoint: %s\n"
               "usage: route_checkpoint <checkpoint file or dir> <family> [--hidden FILE.safetensors] [--tokens N]"
               " [--seed S] [--config FILE]\n"
               "                        [--k K] [--groups G] [--groups-kept G2] [--scale F] [--norm-topk-prob 0|1]\n"
               "       route_checkpoint --write-example <dir> <family>\n"
               "families: mixtral qwen2_moe qwen3_moe deepseek_v2 deepseek_v3 olmoe dbrx gpt_oss llama4\n",
               why);
  std::exit(2);
}

ModelFamily family_arg(const char* name) {
  const auto f = moe::family_from_name(name);
  if (!f) usage((std::string("unknown family '") + name + "'").c_str());
  return *f;
}

Settings parse(int argc, char** argv) {
  Settings s;
  int i = 1;
  if (argc >= 2 && !std::strcmp(argv[1], "--write-example")) {
    if (argc != 4) usage("--write-example takes a directory and a family");
    s.write_example = true;
    s.checkpoint = argv[2];
    s.family = family_arg(argv[3]);
    return s;
  }
  if (argc < 3) usage("a checkpoint and a family are needed");
  s.checkpoint = argv[1];
  s.family = family_arg(argv[2]);
  for (i = 3; i < argc; i += 2) {
    if (i + 1 >= argc) usage((std::string("option ") + argv[i] + " has no value").c_str());
    const std::string option = argv[i], value = argv[i + 1];
    if (option == "--hidden") s.hidden = value;
    else if (option == "--config") s.config = value;
    else if (option == "--scale") {
      char* end = nullptr;
      s.scale = std::strtod(value.c_str(), &end);
      if (*end != '\0' || !(s.scale > 0)) usage("--scale takes a positive number");
    } else if (option == "--tokens" || option == "--seed" || option == "--k" || option == "--groups" ||
               option == "--groups-kept" || option == "--norm-topk-prob") {
      char* end = nullptr;
      const long v = std::strtol(value.c_str(), &end, 10);
      const long least = option == "--seed" || option == "--norm-topk-prob" ? 0 : 1;
      if (*end != '\0' || v < least || (option == "--norm-topk-prob" && v > 1))
        usage((option + " takes a whole number").c_str());
      if (option == "--tokens") s.tokens = v;
      else if (option == "--seed") s.seed = v;
      else if (option == "--k") s.k = v;
      else if (option == "--groups") s.groups = v;
      else if (option == "--groups-kept") s.groups_kept = v;
      else s.norm_topk_prob = v;
    } else {
      usage(("unknown option " + option).c_str());
    }
  }
  return s;
}

// ---- the tiny example checkpoint ---------------------------------------------------------------

// A config.json of the family with 3 layers, width 32, 16 experts (DeepSeek: 4 groups), k 4 (Llama 4: 1).
std::string example_config(ModelFamily f) {
  const std::string type = "\"model_type\": \"" + std::string(moe::family_name(f)) + "\"";
  const std::string common = "\"hidden_size\": 32, \"num_hidden_layers\": 3, \"num_experts_per_tok\": ";
  switch (f) {
    case ModelFamily::mixtral:
    case ModelFamily::gpt_oss:
      return "{" + type + ", " + common + "4, \"num_local_experts\": 16}";
    case ModelFamily::qwen2_moe:
    case ModelFamily::qwen3_moe:
    case ModelFamily::olmoe:
      return "{" + type + ", " + common + "4, \"num_experts\": 16, \"norm_topk_prob\": true}";
    case ModelFamily::deepseek_v2:
      return "{" + type + ", " + common +
             "4, \"n_routed_experts\": 16, \"n_group\": 4, \"topk_group\": 2, \"topk_method\": "
             "\"group_limited_greedy\", \"routed_scaling_factor\": 16.0, \"first_k_dense_replace\": 1}";
    case ModelFamily::deepseek_v3:
      return "{" + type + ", " + common +
             "4, \"n_routed_experts\": 16, \"n_group\": 4, \"topk_group\": 2, \"routed_scaling_factor\": 2.5, "
             "\"norm_topk_prob\": true, \"first_k_dense_replace\": 1}";
    case ModelFamily::dbrx:
      return "{" + type + ", \"d_model\": 32, \"n_layers\": 3, \"ffn_config\": {\"moe_num_experts\": 16, "
             "\"moe_top_k\": 4, \"moe_normalize_expert_weights\": 1}}";
    case ModelFamily::llama4:
      return "{" + type + ", \"text_config\": {\"hidden_size\": 32, \"num_hidden_layers\": 3, "
             "\"num_local_experts\": 16, \"num_experts_per_tok\": 1, \"interleave_moe_layer_step\": 1}}";
  }
  return "{}";
}

void write_example(const Settings& s) {
  fs::create_directories(s.checkpoint);
  {
    std::ofstream out(s.checkpoint / "config.json");
    out << example_config(s.family) << "\n";
    if (!out) throw std::runtime_error("cannot write " + (s.checkpoint / "config.json").string());
  }
  const moe::ReleasedModelConfig c = moe::read_released_config(s.checkpoint, s.family);
  std::vector<Matrix<float>> values;
  std::vector<std::string> names;
  const moe::CounterRng rng(std::uint64_t(s.seed), 11);
  Index key = 0;
  const auto add = [&](const std::string& name, Index rows, Index cols, double sigma, double shift = 0) {
    if (name.empty()) return;
    Matrix<float> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = float(shift + sigma * rng.normal(key, i * cols + j));
    ++key;
    values.push_back(std::move(m));
    names.push_back(name);
  };
  for (const Index layer : c.moe_layers) {
    const moe::RouterTensorNames n = moe::router_tensor_names(c.family, layer);
    add(n.weight, c.experts, c.hidden_size, 1 / std::sqrt(double(c.hidden_size)));
    add(n.bias, 1, c.experts, 0.1);
    add(n.expert_bias, 1, c.experts, 0.05);
  }
  std::vector<moe::TensorView> views;
  for (std::size_t i = 0; i < values.size(); ++i) views.emplace_back(names[i], values[i]);
  moe::write_safetensors(s.checkpoint / "model.safetensors", views, {{"format", "pt"}});
  std::printf("wrote a %s checkpoint: %zu tensors, config.json with %zu MoE layers, into %s\n",
              std::string(moe::family_name(c.family)).c_str(), views.size(), c.moe_layers.size(),
              s.checkpoint.string().c_str());
}

// ---- routing statistics ------------------------------------------------------------------------

struct LayerStats {
  Index min_load = 0, max_load = 0, dead = 0;
  double cv = 0, entropy = 0, margin = 0;
};

template <class Router>
LayerStats statistics(Router& router, const moe::SparseRouting<float>& r) {
  LayerStats st;
  const auto& load = r.expert_count;
  st.min_load = *std::min_element(load.begin(), load.end());
  st.max_load = *std::max_element(load.begin(), load.end());
  st.dead = Index(std::count(load.begin(), load.end(), Index(0)));
  st.cv = moe::load_cv(r);
  const auto logits = router.logits();
  Matrix<float> rank = router.scores();
  if constexpr (requires { router.gate().bias(); }) rank.rowwise() += router.gate().bias().row(0);
  const Index T = logits.rows(), E = logits.cols(), k = router.selector().k();
  std::vector<float> row(static_cast<std::size_t>(E));
  for (Index t = 0; t < T; ++t) {
    // entropy of softmax(logits), in double
    double top = logits(t, 0), z = 0, h = 0;
    for (Index e = 1; e < E; ++e) top = std::max(top, double(logits(t, e)));
    for (Index e = 0; e < E; ++e) z += std::exp(double(logits(t, e)) - top);
    for (Index e = 0; e < E; ++e) {
      const double p = std::exp(double(logits(t, e)) - top) / z;
      if (p > 0) h -= p * std::log(p);
    }
    st.entropy += h;
    if (k < E) {
      for (Index e = 0; e < E; ++e) row[std::size_t(e)] = rank(t, e);
      std::nth_element(row.begin(), row.begin() + (k - 1), row.end(), std::greater<>());
      const float kth = row[std::size_t(k - 1)];
      const float next = *std::max_element(row.begin() + k, row.end());
      st.margin += double(kth) - double(next);
    }
  }
  st.entropy /= double(std::max<Index>(T, 1));
  st.margin /= double(std::max<Index>(T, 1));
  return st;
}

// A config from the checkpoint and the flags, when there is no config.json: the family's defaults
// (those of an empty config.json), E and D from the first router weight, and as MoE layers
// every layer whose router the checkpoint holds.
moe::ReleasedModelConfig config_from_flags(const moe::Checkpoint& ckpt, const Settings& s) {
  if (s.k < 1) throw std::invalid_argument("no config.json beside the checkpoint: give --config FILE or --k K");
  const fs::path empty = fs::temp_directory_path() / ("route_checkpoint_" + std::to_string(std::random_device{}()) + ".json");
  std::ofstream(empty) << (s.family == ModelFamily::dbrx ? R"({"d_model": 1, "n_layers": 1, "ffn_config": {"moe_num_experts": 1, "moe_top_k": 1}})"
                           : s.family == ModelFamily::llama4 ? R"({"text_config": {"hidden_size": 1, "num_hidden_layers": 1, "num_local_experts": 1, "num_experts_per_tok": 1}})"
                           : R"({"hidden_size": 1, "num_hidden_layers": 1, "num_local_experts": 1, "num_experts": 1, "n_routed_experts": 1, "num_experts_per_tok": 1})");
  moe::ReleasedModelConfig c = moe::read_released_config(empty, s.family);
  fs::remove(empty);
  c.moe_layers.clear();
  // the layers: every index whose router weight is present, up to the largest layer number seen
  Index last = -1;
  for (const std::string& name : ckpt.tensor_names())
    for (const std::string prefix : {"model.layers.", "transformer.blocks.", "language_model.model.layers."})
      if (name.rfind(prefix, 0) == 0) last = std::max<Index>(last, std::atol(name.c_str() + prefix.size()));
  for (Index i = 0; i <= last; ++i) {
    const bool text_only = !ckpt.contains(moe::router_tensor_names(s.family, i).weight);
    const std::string weight = moe::router_tensor_names(s.family, i, text_only).weight;
    if (!ckpt.contains(weight)) continue;
    if (c.moe_layers.empty()) {
      const auto& shape = ckpt.info(weight).shape;
      if (shape.size() != 2) throw std::invalid_argument(weight + " is not a matrix");
      c.experts = Index(shape[0]);
      c.hidden_size = Index(shape[1]);
    }
    c.moe_layers.push_back(i);
  }
  if (c.moe_layers.empty()) throw std::invalid_argument("the checkpoint holds no router of the family");
  c.num_layers = last + 1;
  c.k = s.k;
  if (s.groups > 0) c.groups = s.groups, c.groups_kept = s.groups_kept > 0 ? s.groups_kept : 1;
  if (s.groups > 0 && s.family == ModelFamily::deepseek_v2) c.topk_method = "group_limited_greedy";
  if (s.scale > 0) c.routed_scaling_factor = s.scale;
  if (s.norm_topk_prob >= 0) c.norm_topk_prob = s.norm_topk_prob == 1;
  return c;
}

int run(const Settings& s) {
  const moe::Checkpoint ckpt(s.checkpoint);
  const fs::path config_path = s.config.empty() ? ckpt.config_path() : s.config;
  const bool from_flags = s.config.empty() && !fs::exists(config_path);
  const moe::ReleasedModelConfig config =
      from_flags ? config_from_flags(ckpt, s) : moe::read_released_config(config_path, s.family);
  std::optional<moe::SafetensorsFile> hidden;
  if (!s.hidden.empty()) hidden = moe::read_safetensors(s.hidden);

  std::printf("%s: %zu shard(s), %zu tensors; config %s: D = %ld, E = %ld, k = %ld, %zu MoE layer(s) of %ld\n",
              s.checkpoint.string().c_str(), ckpt.shards().size(), ckpt.tensor_names().size(),
              from_flags ? "from the flags" : config_path.string().c_str(), long(config.hidden_size), long(config.experts), long(config.k),
              config.moe_layers.size(), long(config.num_layers));
  std::printf("%6s %8s %8s %7s %9s %9s %6s\n", "layer", "min load", "max load", "load CV", "entropy", "margin",
              "dead");
  moe::visit_released_router<float>(config, std::uint64_t(s.seed), [&](auto router) {
    moe::check_router_config(config, router);
    for (const Index layer : config.moe_layers) {
      moe::load_router(ckpt, config.family, layer, router);
      Matrix<float> x;
      if (hidden) {
        const moe::StoredTensor* t = hidden->find("hidden." + std::to_string(layer));
        if (!t && hidden->tensors.size() == 1) t = &hidden->tensors.front();
        if (!t) throw std::invalid_argument("no hidden." + std::to_string(layer) + " in " + s.hidden.string());
        x = moe::to_matrix<float>(*t, {.convert_dtype = true});
      } else {
        const moe::CounterRng rng(std::uint64_t(s.seed), 100 + std::uint64_t(layer));
        x.resize(s.tokens, config.hidden_size);
        for (Index i = 0; i < x.rows(); ++i)
          for (Index j = 0; j < x.cols(); ++j) x(i, j) = float(rng.normal(i, j));
      }
      const auto& routing = router.forward(x);
      const LayerStats st = statistics(router, routing);
      std::printf("%6ld %8ld %8ld %7.3f %9.3f %9.4f %6ld\n", long(layer), long(st.min_load), long(st.max_load), st.cv,
                  st.entropy, st.margin, long(st.dead));
    }
  });
  std::printf("entropy of a uniform router: log E = %.3f nats\n", std::log(double(config.experts)));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  try {
    if (s.write_example) {
      write_example(s);
      return 0;
    }
    return run(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "route_checkpoint: %s\n", e.what());
    return 1;
  }
}
