// The C++ half of the released-model router comparison (tests/io/released_models.py,
// docs/released_models.md). Each mode prints one line per result and returns 0 on success.
//
//   released_models route <checkpoint> <family> <hidden.safetensors> <out.safetensors>
//     builds the family's preset from the config.json beside the checkpoint, checks the config
//     against it, loads every MoE layer's router, routes that layer's hidden states
//     ("hidden.<layer>", [T, D]) and writes "chosen.<layer>" (1 where a token chose an expert)
//     and "weights.<layer>" (its combine weight), both [T, E] F32.
//   released_models experts <checkpoint> <family> <layer> <x.safetensors> <out.safetensors>
//     loads the layer's routed experts (and shared expert, if the family has one; Qwen2-MoE's
//     with its sigmoid gate) and writes every expert's output for the tokens "x": "expert.<e>"
//     and "shared", [T, D].
//   released_models expect-error <good checkpoint> <bad checkpoint> <family> <layer>
//     builds the preset from the good checkpoint's config.json, loads the good layer, then checks
//     the bad config against it and loads the bad layer: prints "error <class>: <message>" and
//     "untouched" when the failed load left every parameter (and DeepSeek-V3's selection bias) as
//     it was; returns 0 only then.
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include <moe/moe.hpp>

namespace {

using moe::Index;
using moe::Matrix;
using moe::ModelFamily;

// The family's preset for the config, handed to fn.
template <class Fn>
void with_router(const moe::ReleasedModelConfig& c, Fn&& fn) {
  moe::visit_released_router<float>(c, /*seed=*/7, fn);
}

template <class Router>
std::vector<Matrix<float>> parameters(Router& router) {
  std::vector<Matrix<float>> out;
  router.for_each_parameter([&](std::string_view, auto value, auto) { out.emplace_back(value); });
  if constexpr (requires { router.gate().bias(); }) out.emplace_back(router.gate().bias());
  return out;
}

std::string error_class(const std::exception& e) {
  if (dynamic_cast<const moe::shape_error*>(&e)) return "shape_error";
  if (dynamic_cast<const moe::config_error*>(&e)) return "config_error";
  if (dynamic_cast<const moe::format_error*>(&e)) return "format_error";
  if (dynamic_cast<const moe::io_error*>(&e)) return "io_error";
  if (dynamic_cast<const moe::value_error*>(&e)) return "value_error";
  return "other";
}

ModelFamily family_arg(const std::string& name) {
  const auto f = moe::family_from_name(name);
  if (!f) throw std::invalid_argument("unknown family " + name);
  return *f;
}

int route(const std::string& checkpoint, const std::string& family, const std::string& hidden,
          const std::string& out_path) {
  const moe::Checkpoint ckpt(checkpoint);
  const moe::ReleasedModelConfig config = moe::read_released_config(ckpt.config_path(), family_arg(family));
  const moe::SafetensorsFile in = moe::read_safetensors(hidden);
  std::vector<Matrix<float>> outputs;
  std::vector<std::string> names;
  with_router(config, [&](auto router) {
    moe::check_router_config(config, router);
    for (const Index layer : config.moe_layers) {
      moe::load_router(ckpt, config.family, layer, router);
      const moe::StoredTensor* x = in.find("hidden." + std::to_string(layer));
      if (!x) throw std::invalid_argument("no hidden." + std::to_string(layer) + " in " + hidden);
      const Matrix<float> xs = moe::to_matrix<float>(*x, {.convert_dtype = true});
      const auto& routing = router.forward(xs);
      moe::IndexMatrix map;
      Matrix<float> weights;
      moe::to_routing_map(routing, map, weights);
      outputs.push_back(map.cast<float>());
      names.push_back("chosen." + std::to_string(layer));
      outputs.push_back(weights);
      names.push_back("weights." + std::to_string(layer));
      std::cout << "route: layer " << layer << ": " << xs.rows() << " tokens, " << router.num_experts()
                << " experts, k = " << router.selector().k() << "\n";
    }
  });
  std::vector<moe::TensorView> views;
  for (std::size_t i = 0; i < outputs.size(); ++i) views.emplace_back(names[i], outputs[i]);
  moe::write_safetensors(out_path, views);
  return 0;
}

int experts(const std::string& checkpoint, const std::string& family, Index layer, const std::string& x_path,
            const std::string& out_path) {
  const moe::Checkpoint ckpt(checkpoint);
  const moe::ReleasedModelConfig config = moe::read_released_config(ckpt.config_path(), family_arg(family));
  const Matrix<float> x = moe::to_matrix<float>(*moe::read_safetensors(x_path).find("x"), {.convert_dtype = true});
  const Index T = x.rows(), D = config.hidden_size, E = config.experts;
  moe::SwiGLUExperts<float> routed(E, D, config.expert_hidden);
  moe::load_experts(ckpt, config.family, layer, routed);
  // Every expert sees every token: E blocks of the same T rows.
  Matrix<float> xs(E * T, D), ys(E * T, D);
  std::vector<Index> offsets(std::size_t(E + 1));
  for (Index e = 0; e < E; ++e) xs.middleRows(e * T, T) = x, offsets[std::size_t(e + 1)] = (e + 1) * T;
  routed.forward(xs, offsets, ys);
  std::vector<Matrix<float>> outputs;
  std::vector<std::string> names;
  for (Index e = 0; e < E; ++e) {
    outputs.emplace_back(ys.middleRows(e * T, T));
    names.push_back("expert." + std::to_string(e));
  }
  if (config.shared_hidden > 0) {
    Matrix<float> y(T, D);
    const std::vector<Index> all{0, T};
    if (config.family == ModelFamily::qwen2_moe) {  // sigmoid-gated
      moe::SigmoidGatedExpert<moe::SwiGLUExperts<float>> shared(moe::SwiGLUExperts<float>(1, D, config.shared_hidden));
      moe::load_shared_experts(ckpt, config.family, layer, shared);
      shared.forward(x, all, y);
    } else {
      moe::SwiGLUExperts<float> shared(1, D, config.shared_hidden);
      moe::load_shared_experts(ckpt, config.family, layer, shared);
      shared.forward(x, all, y);
    }
    outputs.push_back(y);
    names.push_back("shared");
  }
  std::vector<moe::TensorView> views;
  for (std::size_t i = 0; i < outputs.size(); ++i) views.emplace_back(names[i], outputs[i]);
  moe::write_safetensors(out_path, views);
  std::cout << "experts: layer " << layer << ": " << E << " experts" << (config.shared_hidden > 0 ? " + shared" : "")
            << "\n";
  return 0;
}

int expect_error(const std::string& good, const std::string& bad, const std::string& family, Index layer) {
  const moe::Checkpoint good_ckpt(good);
  const moe::ReleasedModelConfig config = moe::read_released_config(good_ckpt.config_path(), family_arg(family));
  int status = 1;
  with_router(config, [&](auto router) {
    moe::load_router(good_ckpt, config.family, layer, router);
    const auto before = parameters(router);
    try {
      const moe::Checkpoint bad_ckpt(bad);
      const moe::ReleasedModelConfig bad_config = moe::read_released_config(bad_ckpt.config_path(), config.family);
      moe::check_router_config(bad_config, router);
      moe::load_router(bad_ckpt, config.family, layer, router);
      std::cout << "no error\n";
    } catch (const moe::error& e) {
      std::cout << "error " << error_class(dynamic_cast<const std::exception&>(e)) << ": " << e.what() << "\n";
      const auto after = parameters(router);
      bool same = after.size() == before.size();
      for (std::size_t i = 0; same && i < after.size(); ++i) same = after[i] == before[i];
      std::cout << (same ? "untouched" : "HALF LOADED") << "\n";
      status = same ? 0 : 1;
    }
  });
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv + 1, argv + argc);
  try {
    if (a.size() == 5 && a[0] == "route") return route(a[1], a[2], a[3], a[4]);
    if (a.size() == 6 && a[0] == "experts") return experts(a[1], a[2], std::stol(a[3]), a[4], a[5]);
    if (a.size() == 5 && a[0] == "expect-error") return expect_error(a[1], a[2], a[3], std::stol(a[4]));
  } catch (const std::exception& e) {
    std::cout << "error " << error_class(e) << ": " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: released_models route <checkpoint> <family> <hidden.safetensors> <out.safetensors>\n"
               "       released_models experts <checkpoint> <family> <layer> <x.safetensors> <out.safetensors>\n"
               "       released_models expect-error <good checkpoint> <bad checkpoint> <family> <layer>\n";
  return 2;
}
