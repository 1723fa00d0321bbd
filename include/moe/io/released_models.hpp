#pragma once
// The routers (and SwiGLU experts) of released Mixture-of-Experts models, loaded from their
// Hugging Face checkpoints (docs/released_models.md): for each model family, the names its
// checkpoints give each layer's router and experts, which layers are MoE layers, and the fields
// of its config.json that define the router.
//
// - read_released_config: config.json -> ReleasedModelConfig (experts, k, hidden size, the
//   family's routing options, the MoE layers);
// - router_tensor_names / expert_tensor_names / shared_expert_tensor_names: the tensors of a layer;
// - load_router: a layer's router weight (gpt-oss: and bias; DeepSeek-V3: and the selection-only
//   e_score_correction_bias) into a router, converted from BF16/F16/F32/F64 to its scalar;
// - load_experts / load_shared_experts: a layer's per-expert gate/up/down projections, transposed
//   into SwiGLUExperts' blocks (the families that store them one tensor per expert);
// - check_router_config: a config that contradicts a router (E, k, width, renormalisation, groups,
//   scaling) is a config_error.
// - make_released_router / visit_released_router: the family's preset (moe/presets/released.hpp)
//   with the config's values.
//
// Every load is all or nothing: names, shapes and dtypes are checked and every tensor read and
// converted before the first parameter is written. Errors name the checkpoint, the tensor and the
// rule: shape_error for a missing or misshapen tensor, config_error for a router that does not fit
// the family or the config, format_error for a config.json that lacks a field or is not JSON.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"
#include "moe/io/checkpoint.hpp"
#include "moe/io/json.hpp"
#include "moe/io/safetensors.hpp"
#include "moe/layer/sigmoid_gated_expert.hpp"
#include "moe/layer/swiglu_experts.hpp"
#include "moe/presets/papers.hpp"
#include "moe/presets/released.hpp"
#include "moe/selectors/weighting.hpp"

namespace moe {

// The families whose router checkpoints load. The names are Hugging Face's model_type.
enum class ModelFamily : std::uint8_t { mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe, dbrx, gpt_oss, llama4 };

inline constexpr std::array<ModelFamily, 9> all_model_families{
    ModelFamily::mixtral, ModelFamily::qwen2_moe, ModelFamily::qwen3_moe, ModelFamily::deepseek_v2,
    ModelFamily::deepseek_v3, ModelFamily::olmoe, ModelFamily::dbrx, ModelFamily::gpt_oss, ModelFamily::llama4};

constexpr std::string_view family_name(ModelFamily f) {
  switch (f) {
    case ModelFamily::mixtral: return "mixtral";
    case ModelFamily::qwen2_moe: return "qwen2_moe";
    case ModelFamily::qwen3_moe: return "qwen3_moe";
    case ModelFamily::deepseek_v2: return "deepseek_v2";
    case ModelFamily::deepseek_v3: return "deepseek_v3";
    case ModelFamily::olmoe: return "olmoe";
    case ModelFamily::dbrx: return "dbrx";
    case ModelFamily::gpt_oss: return "gpt_oss";
    case ModelFamily::llama4: return "llama4";
  }
  return "?";
}

// The family a name stands for: family_name's, or a config.json's model_type ("llama4_text" is
// Llama 4's text model).
constexpr std::optional<ModelFamily> family_from_name(std::string_view name) {
  for (const ModelFamily f : all_model_families)
    if (family_name(f) == name) return f;
  if (name == "llama4_text") return ModelFamily::llama4;
  return std::nullopt;
}

// What a config.json says about the MoE layers of a model.
struct ReleasedModelConfig {
  ModelFamily family = ModelFamily::mixtral;
  Index hidden_size = 0;  // D: the router's input width (DBRX: d_model)
  Index num_layers = 0;   // decoder layers (DBRX: n_layers)
  Index experts = 0;      // E: routed experts
  Index k = 0;            // experts per token
  // Whether the k chosen weights are renormalised to sum 1 (Qwen, OLMoE, DeepSeek's
  // norm_topk_prob). Mixtral always renormalises; gpt-oss takes a softmax over the k; Llama 4
  // never renormalises; DBRX divides by a p-norm (normalize_p).
  bool norm_topk_prob = false;
  // DBRX's moe_normalize_expert_weights: the k weights divided by their p-norm; none: not divided.
  std::optional<double> normalize_p{};
  // DeepSeek: expert groups, groups kept per token, the weights' factor, the selection method
  // ("greedy", "group_limited_greedy" or V3's "noaux_tc") and the score ("softmax", "sigmoid").
  Index groups = 1;
  Index groups_kept = 1;
  double routed_scaling_factor = 1.0;
  std::string topk_method{};
  std::string scoring_func{};
  // The hidden width of one routed expert, and of the shared expert(s) taken together (0: none).
  Index expert_hidden = 0;
  Index shared_hidden = 0;
  // The layers whose MLP is a MoE block, ascending.
  std::vector<Index> moe_layers{};

  bool is_moe_layer(Index layer) const {
    return std::binary_search(moe_layers.begin(), moe_layers.end(), layer);
  }
};

namespace detail {

// Typed fields of a config.json object, each error naming the file and the field.
struct ConfigFields {
  const JsonValue& object;
  std::string where;
  std::string prefix;  // "text_config." for a nested object, for messages

  const JsonValue* find(std::string_view key) const {
    const JsonValue* v = object.find(key);
    return v && v->kind != JsonValue::Kind::null ? v : nullptr;
  }
  [[noreturn]] void bad(std::string_view key, std::string_view rule) const {
    fail<format_error>(where, prefix + std::string(key), find(key) ? "present" : "absent", rule);
  }
  Index integer(std::string_view key, std::optional<Index> fallback = std::nullopt) const {
    const JsonValue* v = find(key);
    if (!v) {
      if (fallback) return *fallback;
      bad(key, "a non-negative integer in config.json (the router needs it)");
    }
    if (v->kind != JsonValue::Kind::integer || v->integer > std::uint64_t(std::numeric_limits<Index>::max()))
      bad(key, "a non-negative integer");
    return Index(v->integer);
  }
  double number(std::string_view key, double fallback) const {
    const JsonValue* v = find(key);
    if (!v) return fallback;
    if (v->kind != JsonValue::Kind::integer && v->kind != JsonValue::Kind::number) bad(key, "a number");
    return v->number;
  }
  std::optional<double> optional_number(std::string_view key, std::optional<double> fallback) const {
    const JsonValue* v = object.find(key);
    if (!v) return fallback;
    if (v->kind == JsonValue::Kind::null) return std::nullopt;
    if (v->kind != JsonValue::Kind::integer && v->kind != JsonValue::Kind::number) bad(key, "a number or null");
    return v->number;
  }
  bool boolean(std::string_view key, bool fallback) const {
    const JsonValue* v = find(key);
    if (!v) return fallback;
    if (v->kind != JsonValue::Kind::boolean) bad(key, "true or false");
    return v->boolean;
  }
  std::string string(std::string_view key, std::string fallback) const {
    const JsonValue* v = find(key);
    if (!v) return fallback;
    if (v->kind != JsonValue::Kind::string) bad(key, "a string");
    return v->string;
  }
  std::vector<Index> integers(std::string_view key) const {
    std::vector<Index> out;
    const JsonValue* v = find(key);
    if (!v) return out;
    if (v->kind != JsonValue::Kind::array) bad(key, "an array of layer indices");
    for (const JsonValue& item : v->items) {
      if (item.kind != JsonValue::Kind::integer) bad(key, "an array of layer indices");
      out.push_back(Index(item.integer));
    }
    return out;
  }
  const JsonValue* object_field(std::string_view key) const {
    const JsonValue* v = find(key);
    if (v && v->kind != JsonValue::Kind::object) bad(key, "an object");
    return v;
  }
};

}  // namespace detail

// Reads a Hugging Face config.json (`path` is the file or the directory holding it) as the
// family's model code reads it. Fields the router needs (hidden size, layers, experts, k) must be
// present; the others take the defaults of the family's configuration class in transformers.
// A model_type naming another family is a config_error.
inline ReleasedModelConfig read_released_config(const std::filesystem::path& path, ModelFamily family) {
  std::error_code ec;
  const std::filesystem::path file = std::filesystem::is_directory(path, ec) ? path / "config.json" : path;
  const std::string where = detail::call_site("read_released_config", file);
  const std::string text = detail::read_text_file(file, where);
  const detail::JsonValue root = detail::read_json_object(text, where, "config");
  detail::ConfigFields top{root, where, ""};

  const std::string model_type = top.string("model_type", "");
  if (!model_type.empty()) {
    const auto named = family_from_name(model_type);
    detail::require<config_error>(named == family, where, "model_type", detail::quoted(model_type),
                                  "the family asked for, " + std::string(family_name(family)));
  }

  ReleasedModelConfig c;
  c.family = family;
  // Llama 4's checkpoints are multimodal: the text model's fields are under text_config.
  const detail::JsonValue* text_config = family == ModelFamily::llama4 ? top.object_field("text_config") : nullptr;
  const detail::ConfigFields f = text_config ? detail::ConfigFields{*text_config, where, "text_config."} : top;

  const auto every_layer = [&] {
    std::vector<Index> v(std::size_t(c.num_layers));
    for (Index i = 0; i < c.num_layers; ++i) v[std::size_t(i)] = i;
    return v;
  };
  switch (family) {
    case ModelFamily::mixtral:
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("num_local_experts");
      c.k = f.integer("num_experts_per_tok");
      c.norm_topk_prob = true;
      c.expert_hidden = f.integer("intermediate_size", 0);
      c.moe_layers = every_layer();
      break;
    case ModelFamily::qwen2_moe:
    case ModelFamily::qwen3_moe: {
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("num_experts");
      c.k = f.integer("num_experts_per_tok");
      c.norm_topk_prob = f.boolean("norm_topk_prob", false);
      c.expert_hidden = f.integer("moe_intermediate_size", 0);
      if (family == ModelFamily::qwen2_moe) c.shared_hidden = f.integer("shared_expert_intermediate_size", 0);
      const Index step = f.integer("decoder_sparse_step", 1);
      detail::require<format_error>(step >= 1, where, "decoder_sparse_step", step, ">= 1");
      const std::vector<Index> dense = f.integers("mlp_only_layers");
      // Qwen2MoeDecoderLayer: MoE iff not in mlp_only_layers, num_experts > 0 and (i + 1) % step == 0
      for (Index i = 0; i < c.num_layers; ++i)
        if (std::find(dense.begin(), dense.end(), i) == dense.end() && c.experts > 0 && (i + 1) % step == 0)
          c.moe_layers.push_back(i);
      break;
    }
    case ModelFamily::deepseek_v2:
    case ModelFamily::deepseek_v3: {
      const bool v3 = family == ModelFamily::deepseek_v3;
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("n_routed_experts");
      c.k = f.integer("num_experts_per_tok");
      c.norm_topk_prob = f.boolean("norm_topk_prob", v3);
      c.groups = f.integer("n_group", 1);
      c.groups_kept = f.integer("topk_group", 1);
      c.routed_scaling_factor = f.number("routed_scaling_factor", v3 ? 2.5 : 1.0);
      c.topk_method = f.string("topk_method", v3 ? "noaux_tc" : "greedy");
      c.scoring_func = f.string("scoring_func", v3 ? "sigmoid" : "softmax");
      c.expert_hidden = f.integer("moe_intermediate_size", 0);
      c.shared_hidden = f.integer("n_shared_experts", 0) * c.expert_hidden;
      const Index first_dense = f.integer("first_k_dense_replace", 0);
      const Index freq = f.integer("moe_layer_freq", 1);
      detail::require<format_error>(freq >= 1, where, "moe_layer_freq", freq, ">= 1");
      // DeepseekV2/V3DecoderLayer: MoE from layer first_k_dense_replace on (the hub's own code
      // also asks i % moe_layer_freq == 0; every released config has 1)
      for (Index i = first_dense; i < c.num_layers; ++i)
        if (i % freq == 0) c.moe_layers.push_back(i);
      break;
    }
    case ModelFamily::olmoe:
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("num_experts");
      c.k = f.integer("num_experts_per_tok");
      c.norm_topk_prob = f.boolean("norm_topk_prob", false);
      c.expert_hidden = f.integer("intermediate_size", 0);
      c.moe_layers = every_layer();
      break;
    case ModelFamily::dbrx: {
      c.hidden_size = f.integer("d_model");
      c.num_layers = f.integer("n_layers");
      const detail::JsonValue* ffn = f.object_field("ffn_config");
      if (!ffn) f.bad("ffn_config", "an object with moe_num_experts and moe_top_k");
      const detail::ConfigFields g{*ffn, where, "ffn_config."};
      c.experts = g.integer("moe_num_experts");
      c.k = g.integer("moe_top_k");
      c.normalize_p = g.optional_number("moe_normalize_expert_weights", 1.0);
      c.norm_topk_prob = c.normalize_p.has_value();
      c.expert_hidden = g.integer("ffn_hidden_size", 0);
      c.moe_layers = every_layer();
      break;
    }
    case ModelFamily::gpt_oss:
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("num_local_experts");
      c.k = f.integer("num_experts_per_tok");
      c.expert_hidden = f.integer("intermediate_size", 0);
      c.moe_layers = every_layer();
      break;
    case ModelFamily::llama4: {
      c.hidden_size = f.integer("hidden_size");
      c.num_layers = f.integer("num_hidden_layers");
      c.experts = f.integer("num_local_experts");
      c.k = f.integer("num_experts_per_tok");
      c.expert_hidden = f.integer("intermediate_size", 0);
      c.shared_hidden = c.expert_hidden;
      // Llama4TextConfig: moe_layers if given, else every interleave_moe_layer_step-th layer
      const detail::JsonValue* listed = f.find("moe_layers");
      if (listed) {
        c.moe_layers = f.integers("moe_layers");
      } else {
        const Index step = f.integer("interleave_moe_layer_step", 1);
        detail::require<format_error>(step >= 1, where, "interleave_moe_layer_step", step, ">= 1");
        for (Index i = step - 1; i < c.num_layers; i += step) c.moe_layers.push_back(i);
      }
      break;
    }
  }
  std::sort(c.moe_layers.begin(), c.moe_layers.end());
  c.moe_layers.erase(std::unique(c.moe_layers.begin(), c.moe_layers.end()), c.moe_layers.end());
  for (const Index i : c.moe_layers)
    detail::require<format_error>(i >= 0 && i < c.num_layers, where, "moe_layers", i,
                                  "layer indices below num_hidden_layers (" + std::to_string(c.num_layers) + ")");
  detail::require<format_error>(c.experts >= 1 && c.k >= 1 && c.k <= c.experts, where, "num_experts_per_tok", c.k,
                                "1 <= k <= experts (" + std::to_string(c.experts) + ")");
  detail::require<format_error>(c.groups >= 1 && c.groups_kept >= 1 && c.groups_kept <= c.groups, where,
                                "topk_group", c.groups_kept,
                                "1 <= topk_group <= n_group (" + std::to_string(c.groups) + ")");
  return c;
}

// ---- tensor names --------------------------------------------------------------------------

// The prefix of decoder layer `layer`'s tensors in a checkpoint of the family, through the
// trailing dot: "model.layers.3.", DBRX "transformer.blocks.3.", Llama 4's multimodal
// checkpoints "language_model.model.layers.3." (a text-only one: text_only = true).
inline std::string layer_prefix(ModelFamily family, Index layer, bool text_only = false) {
  const std::string i = std::to_string(layer);
  if (family == ModelFamily::dbrx) return "transformer.blocks." + i + ".";
  if (family == ModelFamily::llama4 && !text_only) return "language_model.model.layers." + i + ".";
  return "model.layers." + i + ".";
}

// The tensors of one layer's router. `bias` (gpt-oss) and `expert_bias` (DeepSeek-V3's
// selection-only e_score_correction_bias) are empty for the families without them.
struct RouterTensorNames {
  std::string weight;       // [E, D], as nn.Linear(D, E).weight
  std::string bias;         // [E]
  std::string expert_bias;  // [E]
};

inline RouterTensorNames router_tensor_names(ModelFamily family, Index layer, bool text_only = false) {
  const std::string p = layer_prefix(family, layer, text_only);
  switch (family) {
    case ModelFamily::mixtral: return {p + "block_sparse_moe.gate.weight", "", ""};
    case ModelFamily::qwen2_moe:
    case ModelFamily::qwen3_moe:
    case ModelFamily::olmoe:
    case ModelFamily::deepseek_v2: return {p + "mlp.gate.weight", "", ""};
    case ModelFamily::deepseek_v3: return {p + "mlp.gate.weight", "", p + "mlp.gate.e_score_correction_bias"};
    case ModelFamily::dbrx: return {p + "ffn.router.layer.weight", "", ""};
    case ModelFamily::gpt_oss: return {p + "mlp.router.weight", p + "mlp.router.bias", ""};
    case ModelFamily::llama4: return {p + "feed_forward.router.weight", "", ""};
  }
  return {};
}

// Whether the family's checkpoints store each routed expert as three nn.Linear weights (the
// families load_experts reads). DBRX, gpt-oss and Llama 4 fuse the experts into 3-D tensors.
constexpr bool has_per_expert_tensors(ModelFamily f) {
  return f == ModelFamily::mixtral || f == ModelFamily::qwen2_moe || f == ModelFamily::qwen3_moe ||
         f == ModelFamily::olmoe || f == ModelFamily::deepseek_v2 || f == ModelFamily::deepseek_v3;
}

// The three projections of a SwiGLU expert, as nn.Linear weights: gate [H, D], up [H, D],
// down [D, H]; out = down(silu(gate(x)) * up(x)).
struct ExpertTensorNames {
  std::string gate, up, down;
};

inline ExpertTensorNames expert_tensor_names(ModelFamily family, Index layer, Index expert) {
  detail::require<config_error>(has_per_expert_tensors(family), "expert_tensor_names", "family",
                                family_name(family),
                                "a family storing one tensor per expert (not DBRX, gpt-oss, Llama 4)");
  const std::string p = layer_prefix(family, layer) + (family == ModelFamily::mixtral ? "block_sparse_moe." : "mlp.") +
                        "experts." + std::to_string(expert) + ".";
  if (family == ModelFamily::mixtral) return {p + "w1.weight", p + "w3.weight", p + "w2.weight"};
  return {p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"};
}

// The shared expert of a layer: Qwen2-MoE's shared_expert (gated, see docs), DeepSeek's
// shared_experts (n_shared_experts of them stored as one MLP). Other families have none.
inline ExpertTensorNames shared_expert_tensor_names(ModelFamily family, Index layer) {
  const bool qwen2 = family == ModelFamily::qwen2_moe;
  detail::require<config_error>(qwen2 || family == ModelFamily::deepseek_v2 || family == ModelFamily::deepseek_v3,
                                "shared_expert_tensor_names", "family", family_name(family),
                                "a family with a shared expert stored as one MLP (Qwen2-MoE, DeepSeek)");
  const std::string p = layer_prefix(family, layer) + (qwen2 ? "mlp.shared_expert." : "mlp.shared_experts.");
  return {p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"};
}

namespace detail {

// Llama 4: the text model's tensors are under language_model. in the released (multimodal)
// checkpoints, and not in a text-only one; the checkpoint decides.
inline bool text_only_names(const Checkpoint& ckpt, ModelFamily family, Index layer) {
  return family == ModelFamily::llama4 && !ckpt.contains(router_tensor_names(family, layer).weight) &&
         ckpt.contains(router_tensor_names(family, layer, true).weight);
}

// A tensor the checkpoint must hold, of a float dtype and the given shape, or a shape_error.
// A 1-D shape [n] (a PyTorch vector) may also be stored as [1, n].
inline void require_tensor(const Checkpoint& ckpt, const std::string& name, const std::vector<std::uint64_t>& shape,
                           std::string_view where, std::string_view what) {
  if (!ckpt.contains(name))
    fail<shape_error>(where, name, "absent", "a tensor holding " + std::string(what));
  const TensorInfo& t = ckpt.info(name);
  require<shape_error>(is_float_dtype(t.dtype), where, name, "dtype " + std::string(dtype_name(t.dtype)),
                       "a float dtype (F16, BF16, F32, F64) for " + std::string(what));
  const bool as_row = shape.size() == 1 && t.shape == std::vector<std::uint64_t>{1, shape[0]};
  require<shape_error>(t.shape == shape || as_row, where, name, "shape " + bracketed(t.shape),
                       "shape " + bracketed(shape) + ", " + std::string(what));
}

template <scalar S>
Matrix<S> as_matrix(const StoredTensor& t) {
  return to_matrix<S>(t, {.convert_dtype = true});
}

inline std::string layer_text(ModelFamily family, Index layer) {
  return "layer " + std::to_string(layer) + " of a " + std::string(family_name(family)) + " checkpoint";
}

}  // namespace detail

// ---- routers -------------------------------------------------------------------------------

// What a load read.
struct ReleasedLoadReport {
  std::vector<std::string> tensors;  // the checkpoint's tensors read, in order
};

// Loads decoder layer `layer`'s router of a `family` checkpoint into `router` (a LinearScorer
// router: a preset of moe/presets/released.hpp, or any router with the same parameters):
// router.weight [E, D] from the gate's weight; gpt-oss's bias into router.bias (the router must
// have one, and only gpt-oss's may); DeepSeek-V3's e_score_correction_bias into the
// ExpertBiasGate's bias (selection only: it never enters a combine weight). Tensors of BF16, F16,
// F32 or F64 are converted to the router's scalar. All or nothing.
template <class Router>
ReleasedLoadReport load_router(const Checkpoint& ckpt, ModelFamily family, Index layer, Router& router) {
  using S = typename Router::scalar_type;
  const std::string where = detail::call_site("load_router", ckpt.directory()) + " [" +
                            std::string(family_name(family)) + ", layer " + std::to_string(layer) + "]";
  const RouterTensorNames names = router_tensor_names(family, layer, detail::text_only_names(ckpt, family, layer));
  const auto E = std::uint64_t(router.num_experts()), D = std::uint64_t(router.input_dim());

  // The router's parameters must be exactly what the family stores.
  bool has_weight = false, has_bias = false, other = false;
  router.for_each_parameter([&](std::string_view name, auto, auto) {
    has_weight = has_weight || name == "router.weight";
    has_bias = has_bias || name == "router.bias";
    other = other || (name != "router.weight" && name != "router.bias");
  });
  detail::require<config_error>(has_weight && !other, where, "router", "a router with other parameters",
                                "a LinearScorer router (router.weight [E, D], router.bias for gpt-oss)");
  if (family == ModelFamily::gpt_oss)
    detail::require<config_error>(has_bias, where, "router.bias", "absent",
                                  "a router with a bias (LinearScorer bias = true): gpt-oss's router has one");
  else
    detail::require<config_error>(!has_bias, where, "router.bias", "present",
                                  "no router bias: " + std::string(family_name(family)) +
                                      "'s router has none, and a bias left at its initial value would route");
  constexpr bool gate_has_bias = requires { router.gate().bias(); };
  if (family == ModelFamily::deepseek_v3 && !gate_has_bias)
    detail::fail<config_error>(where, "gate", "a gate without an expert bias",
                               "an ExpertBiasGate: DeepSeek-V3 ranks by score + e_score_correction_bias");

  // 1. Check every tensor, then read and convert them all. Nothing is written.
  const std::string what = "the router of " + detail::layer_text(family, layer);
  detail::require_tensor(ckpt, names.weight, {E, D}, where, what + " [E, D] (is this a MoE layer?)");
  std::vector<std::string> wanted{names.weight};
  if (!names.bias.empty()) {
    detail::require_tensor(ckpt, names.bias, {E}, where, "the router bias of " + detail::layer_text(family, layer));
    wanted.push_back(names.bias);
  }
  if (!names.expert_bias.empty()) {
    detail::require_tensor(ckpt, names.expert_bias, {E}, where,
                           "the selection bias of " + detail::layer_text(family, layer));
    wanted.push_back(names.expert_bias);
  }
  const std::vector<StoredTensor> tensors = ckpt.read(wanted);
  const Matrix<S> weight = detail::as_matrix<S>(tensors[0]);
  const Matrix<S> bias = names.bias.empty() ? Matrix<S>() : detail::as_matrix<S>(tensors[1]);
  const Matrix<S> expert_bias = names.expert_bias.empty() ? Matrix<S>() : detail::as_matrix<S>(tensors.back());

  // 2. Write: copies only.
  router.for_each_parameter([&](std::string_view name, auto value, auto) {
    if (name == "router.weight") value = weight;
    else if (name == "router.bias") value = bias;
  });
  if constexpr (gate_has_bias) {
    if (family == ModelFamily::deepseek_v3) router.gate().bias() = expert_bias;
  }
  return {wanted};
}

template <class Router>
ReleasedLoadReport load_router(const std::filesystem::path& checkpoint, ModelFamily family, Index layer,
                               Router& router) {
  return load_router(Checkpoint(checkpoint), family, layer, router);
}

// ---- experts -------------------------------------------------------------------------------

namespace detail {

// Reads E experts' projections and writes them transposed into SwiGLUExperts' blocks: expert e's
// block of w_gate / w_up is rows e*D .. e*D+D-1 as [D, H] (x W), gate_proj.weight [H, D]
// transposed; its block of w_down is rows e*H .. as [H, D], down_proj.weight [D, H] transposed.
template <scalar S>
ReleasedLoadReport load_swiglu(const Checkpoint& ckpt, const std::vector<ExpertTensorNames>& names,
                               SwiGLUExperts<S>& experts, std::string_view where, const std::string& what) {
  const Index E = experts.num_experts(), D = experts.input_dim(), H = experts.hidden_dim();
  require<shape_error>(Index(names.size()) == E, where, "experts.num_experts", E,
                       std::to_string(names.size()) + ", the experts of " + what);
  const auto d = std::uint64_t(D), h = std::uint64_t(H);
  std::vector<std::string> wanted;
  for (std::size_t e = 0; e < names.size(); ++e) {
    const std::string of = "expert " + std::to_string(e) + " of " + what;
    require_tensor(ckpt, names[e].gate, {h, d}, where, "the gate projection [H, D] of " + of);
    require_tensor(ckpt, names[e].up, {h, d}, where, "the up projection [H, D] of " + of);
    require_tensor(ckpt, names[e].down, {d, h}, where, "the down projection [D, H] of " + of);
    wanted.insert(wanted.end(), {names[e].gate, names[e].up, names[e].down});
  }
  const std::vector<StoredTensor> tensors = ckpt.read(wanted);
  Matrix<S> wg(E * D, H), wu(E * D, H), wd(E * H, D);
  for (Index e = 0; e < E; ++e) {
    wg.middleRows(e * D, D) = as_matrix<S>(tensors[std::size_t(3 * e)]).transpose();
    wu.middleRows(e * D, D) = as_matrix<S>(tensors[std::size_t(3 * e + 1)]).transpose();
    wd.middleRows(e * H, H) = as_matrix<S>(tensors[std::size_t(3 * e + 2)]).transpose();
  }
  experts.for_each_parameter([&](std::string_view name, auto value, auto) {
    if (name == "experts.w_gate") value = wg;
    else if (name == "experts.w_up") value = wu;
    else if (name == "experts.w_down") value = wd;
  });
  return {wanted};
}

}  // namespace detail

// Loads layer `layer`'s routed experts into `experts` (E experts of width D and hidden width H,
// as the checkpoint's): Mixtral's w1/w3/w2, the others' gate_proj/up_proj/down_proj, one tensor
// per expert. DBRX, gpt-oss and Llama 4 store fused expert tensors and are a config_error.
template <scalar S>
ReleasedLoadReport load_experts(const Checkpoint& ckpt, ModelFamily family, Index layer, SwiGLUExperts<S>& experts) {
  const std::string where = detail::call_site("load_experts", ckpt.directory()) + " [" +
                            std::string(family_name(family)) + ", layer " + std::to_string(layer) + "]";
  detail::require<config_error>(has_per_expert_tensors(family), where, "family", family_name(family),
                                "a family storing one tensor per expert (DBRX, gpt-oss and Llama 4 fuse "
                                "their experts: not supported)");
  std::vector<ExpertTensorNames> names;
  for (Index e = 0; e < experts.num_experts(); ++e) names.push_back(expert_tensor_names(family, layer, e));
  return detail::load_swiglu(ckpt, names, experts, where, detail::layer_text(family, layer));
}

// Loads layer `layer`'s shared expert into `shared` (one SwiGLU expert; DeepSeek's
// n_shared_experts are stored as one MLP of n times the width). Qwen2-MoE's shared expert has a
// sigmoid gate: the overload for a SigmoidGatedExpert below loads it too.
template <scalar S>
ReleasedLoadReport load_shared_experts(const Checkpoint& ckpt, ModelFamily family, Index layer,
                                       SwiGLUExperts<S>& shared) {
  const std::string where = detail::call_site("load_shared_experts", ckpt.directory()) + " [" +
                            std::string(family_name(family)) + ", layer " + std::to_string(layer) + "]";
  detail::require<shape_error>(shared.num_experts() == 1, where, "shared.num_experts", shared.num_experts(),
                               "1: the shared experts are stored as one MLP");
  return detail::load_swiglu(ckpt, {shared_expert_tensor_names(family, layer)}, shared, where,
                             "the shared expert of " + detail::layer_text(family, layer));
}

// The name of Qwen2-MoE's shared-expert gate ([1, D]: out = sigmoid(x . w) * shared(x)).
inline std::string shared_expert_gate_name(Index layer) {
  return layer_prefix(ModelFamily::qwen2_moe, layer) + "mlp.shared_expert_gate.weight";
}

// Qwen2-MoE's gated shared expert: the expert as above and its gate into `gate.weight`. All or
// nothing: the gate is checked and read before the expert, and written after it.
template <scalar S>
ReleasedLoadReport load_shared_experts(const Checkpoint& ckpt, ModelFamily family, Index layer,
                                       SigmoidGatedExpert<SwiGLUExperts<S>>& shared) {
  const std::string where = detail::call_site("load_shared_experts", ckpt.directory()) + " [" +
                            std::string(family_name(family)) + ", layer " + std::to_string(layer) + "]";
  detail::require<config_error>(family == ModelFamily::qwen2_moe, where, "family", family_name(family),
                                "qwen2_moe: the family whose shared expert has a sigmoid gate");
  const std::string gate = shared_expert_gate_name(layer);
  detail::require_tensor(ckpt, gate, {1, std::uint64_t(shared.input_dim())}, where,
                         "the shared expert's gate [1, D] of " + detail::layer_text(family, layer));
  const Matrix<S> w = detail::as_matrix<S>(ckpt.read(gate));
  ReleasedLoadReport report = load_shared_experts(ckpt, family, layer, shared.expert());
  shared.for_each_parameter([&](std::string_view name, auto value, auto) {
    if (name == "gate.weight") value = w;
  });
  report.tensors.push_back(gate);
  return report;
}

// ---- a config against a router -------------------------------------------------------------

// Whether `router` routes as the config says: experts, k, width, and the family's weighting
// (renormalisation, DBRX's p-norm, gpt-oss's softmax over the k), DeepSeek's groups and scaling
// factor. A contradiction is a config_error naming the config field, its value and the router's.
template <class Router>
void check_router_config(const ReleasedModelConfig& c, Router& router, std::string_view where = "check_router_config") {
  const auto mismatch = [&](std::string_view field, const auto& config_value, const auto& router_value) {
    std::ostringstream rule;
    rule << "the router's value, " << router_value << " (the config contradicts the router: build the preset "
         << "from this config.json, or load another checkpoint)";
    detail::fail<config_error>(where, field, config_value, rule.str());
  };
  if (router.num_experts() != c.experts) mismatch("experts", c.experts, router.num_experts());
  if (router.input_dim() != c.hidden_size) mismatch("hidden_size", c.hidden_size, router.input_dim());
  auto& sel = router.selector();
  if (sel.k() != c.k) mismatch("num_experts_per_tok", c.k, sel.k());
  if constexpr (requires { sel.options().weighting; sel.options().scale; sel.options().norm_p; }) {
    const auto& opt = sel.options();
    const Weighting w = opt.weighting;
    const bool renormalizes = w == Weighting::renormalize_before_drop || w == Weighting::renormalize_after_drop ||
                              (w == Weighting::p_norm && opt.norm_p == 1.0);
    const auto weighting_text = [&] {
      switch (w) {
        case Weighting::raw: return std::string("weights not renormalised");
        case Weighting::renormalize_before_drop:
        case Weighting::renormalize_after_drop: return std::string("renormalised weights");
        case Weighting::softmax_of_kept_logits: return std::string("a softmax over the k kept logits");
        case Weighting::p_norm: return "weights divided by their " + std::to_string(opt.norm_p) + "-norm";
      }
      return std::string("?");
    };
    switch (c.family) {
      case ModelFamily::mixtral:
        if (!renormalizes) mismatch("(Mixtral renormalises)", "renormalised weights", weighting_text());
        break;
      case ModelFamily::qwen2_moe:
      case ModelFamily::qwen3_moe:
      case ModelFamily::olmoe:
      case ModelFamily::deepseek_v2:
      case ModelFamily::deepseek_v3:
        if (renormalizes != c.norm_topk_prob) mismatch("norm_topk_prob", c.norm_topk_prob ? "true" : "false", weighting_text());
        break;
      case ModelFamily::dbrx:
        if (c.normalize_p ? !(w == Weighting::p_norm && opt.norm_p == *c.normalize_p) &&
                                !(*c.normalize_p == 1.0 && renormalizes)
                          : w != Weighting::raw)
          mismatch("ffn_config.moe_normalize_expert_weights",
                   c.normalize_p ? std::to_string(*c.normalize_p) : std::string("null"), weighting_text());
        break;
      case ModelFamily::gpt_oss:
        if (w != Weighting::softmax_of_kept_logits)
          mismatch("(gpt-oss takes a softmax over the k logits)", "softmax_of_kept_logits", weighting_text());
        break;
      case ModelFamily::llama4:
        if (w != Weighting::raw) mismatch("(Llama 4 weights sigmoid(logit) as it is)", "raw", weighting_text());
        break;
    }
    const bool deepseek = c.family == ModelFamily::deepseek_v2 || c.family == ModelFamily::deepseek_v3;
    const double scale = deepseek ? c.routed_scaling_factor : 1.0;
    if (std::abs(opt.scale - scale) > 1e-12 * std::max(1.0, scale))
      mismatch(deepseek ? "routed_scaling_factor" : "(no scaling factor)", scale, opt.scale);
  }
  if (c.family == ModelFamily::deepseek_v2 || c.family == ModelFamily::deepseek_v3) {
    const bool v3 = c.family == ModelFamily::deepseek_v3;
    const bool grouped = v3 || c.topk_method == "group_limited_greedy";
    if (!v3 && !grouped && c.topk_method != "greedy")
      detail::fail<config_error>(where, "topk_method", detail::quoted(c.topk_method),
                                 "\"greedy\" or \"group_limited_greedy\" for DeepSeek-V2");
    if (v3 && c.topk_method != "noaux_tc")
      detail::fail<config_error>(where, "topk_method", detail::quoted(c.topk_method),
                                 "\"noaux_tc\", DeepSeek-V3's (the only method of its HF router)");
    // V2 scores a group by its maximum, V3 by the sum of its top 2 (Groups::top; 0 is k / keep).
    const Index top = v3 ? 2 : 1;
    if constexpr (requires { sel.groups().count; sel.groups().top; }) {
      const auto& g = sel.groups();
      const Index count = grouped ? c.groups : 1, keep = grouped ? c.groups_kept : 1;
      if (g.count != count) mismatch(grouped ? "n_group" : "topk_method", count, g.count);
      if (g.keep != keep) mismatch("topk_group", keep, g.keep);
      const Index router_top = g.top > 0 ? g.top : sel.k() / g.keep;
      if (grouped && router_top != top)
        mismatch(v3 ? "(a group scores its top 2)" : "(a group scores its maximum)", top, router_top);
    } else if (grouped) {
      detail::fail<config_error>(where, "n_group", c.groups, "a group-limited selector");
    }
    const std::string score = v3 ? "sigmoid" : "softmax";
    if (c.scoring_func != score)
      detail::fail<config_error>(where, "scoring_func", detail::quoted(c.scoring_func),
                                 "\"" + score + "\", the score of the family's preset");
  }
}

// Every MoE layer's router of a checkpoint, each into a copy of `prototype` (a preset built
// from the same config.json, e.g. by make_released_router): the config is checked against the
// prototype first, then each layer loaded. Returns the routers in the order of config.moe_layers.
template <class Router>
std::vector<Router> load_routers(const Checkpoint& ckpt, const ReleasedModelConfig& config, const Router& prototype) {
  Router probe = prototype;
  check_router_config(config, probe, detail::call_site("load_routers", ckpt.directory()));
  std::vector<Router> routers;
  routers.reserve(config.moe_layers.size());
  for (const Index layer : config.moe_layers) {
    routers.push_back(prototype);
    load_router(ckpt, config.family, layer, routers.back());
  }
  return routers;
}

// ---- presets from a config ------------------------------------------------------------------

// The preset type of each family (moe/presets/released.hpp).
template <ModelFamily F, scalar S>
struct released_router {};
template <scalar S> struct released_router<ModelFamily::mixtral, S> { using type = MixtralRouter<S>; };
template <scalar S> struct released_router<ModelFamily::qwen2_moe, S> { using type = Qwen2MoERouter<S>; };
template <scalar S> struct released_router<ModelFamily::qwen3_moe, S> { using type = Qwen3MoERouter<S>; };
template <scalar S> struct released_router<ModelFamily::deepseek_v2, S> { using type = DeepSeekV2Router<S>; };
template <scalar S> struct released_router<ModelFamily::deepseek_v3, S> { using type = DeepSeekV3Router<S>; };
template <scalar S> struct released_router<ModelFamily::olmoe, S> { using type = OLMoERouter<S>; };
template <scalar S> struct released_router<ModelFamily::dbrx, S> { using type = DbrxRouter<S>; };
template <scalar S> struct released_router<ModelFamily::gpt_oss, S> { using type = GptOssRouter<S>; };
template <scalar S> struct released_router<ModelFamily::llama4, S> { using type = Llama4Router<S>; };
template <ModelFamily F, scalar S>
using released_router_t = typename released_router<F, S>::type;

// The family's preset with the config's experts, k, width and routing options; its weights are
// random (seed) until load_router replaces them. A config the preset cannot express (DeepSeek-V2
// with norm_topk_prob, an unknown topk_method or scoring_func) is a config_error.
template <ModelFamily F, scalar S>
released_router_t<F, S> make_released_router(const ReleasedModelConfig& c, std::uint64_t seed = 0) {
  const std::string where = "make_released_router";
  detail::require<config_error>(c.family == F, where, "config.family", family_name(c.family),
                                "the family asked for, " + std::string(family_name(F)));
  const Index D = c.hidden_size, E = c.experts, k = c.k;
  if constexpr (F == ModelFamily::mixtral) {
    return make_mixtral_router<S>(D, E, k, seed);
  } else if constexpr (F == ModelFamily::qwen2_moe) {
    return make_qwen2_moe_router<S>(D, E, k, c.norm_topk_prob, seed);
  } else if constexpr (F == ModelFamily::qwen3_moe) {
    return make_qwen3_moe_router<S>(D, E, k, c.norm_topk_prob, seed);
  } else if constexpr (F == ModelFamily::olmoe) {
    return make_olmoe_router<S>(D, E, k, c.norm_topk_prob, seed);
  } else if constexpr (F == ModelFamily::dbrx) {
    return make_dbrx_router<S>(D, E, k, c.normalize_p, seed);
  } else if constexpr (F == ModelFamily::gpt_oss) {
    return make_gpt_oss_router<S>(D, E, k, seed);
  } else if constexpr (F == ModelFamily::llama4) {
    return make_llama4_router<S>(D, E, k, seed);
  } else if constexpr (F == ModelFamily::deepseek_v2) {
    // The released V2 configs leave norm_topk_prob false, which the preset's weights follow.
    detail::require<config_error>(!c.norm_topk_prob, where, "norm_topk_prob", "true",
                                  "false: DeepSeek-V2's preset does not renormalise (as HF's DeepseekV2Moe)");
    detail::require<config_error>(c.topk_method == "greedy" || c.topk_method == "group_limited_greedy", where,
                                  "topk_method", detail::quoted(c.topk_method), "\"greedy\" or \"group_limited_greedy\"");
    return make_deepseek_v2_router<S>(
        D, E, k, c.groups, c.groups_kept, c.routed_scaling_factor,
        c.topk_method == "greedy" ? DeepSeekV2TopK::greedy : DeepSeekV2TopK::group_limited_greedy, seed);
  } else {
    static_assert(F == ModelFamily::deepseek_v3);
    // make_deepseek_v3_router's parts with the config's renormalisation and scaling factor; a
    // group scores the sum of its top 2 biased scores, whatever k / topk_group is.
    return {LinearScorer<S>(D, E, {.bias = false, .seed = seed}), ExpertBiasGate<SigmoidGate<S>>(E, {.update_rate = 1e-3}),
            GroupLimitedTopKSelector<S>(k, {.count = c.groups, .keep = c.groups_kept, .top = 2},
                                        {.weighting = c.norm_topk_prob ? Weighting::renormalize_before_drop : Weighting::raw,
                                         .scale = c.routed_scaling_factor}),
            NormalizedBalanceLoss<S>(S(1e-4), {.scope = BalanceScope::sequence, .count = BalanceCount::plain_top_k})};
  }
}

// The preset for a config.json (the file or its directory).
template <ModelFamily F, scalar S>
released_router_t<F, S> make_released_router(const std::filesystem::path& config_json, std::uint64_t seed = 0) {
  return make_released_router<F, S>(read_released_config(config_json, F), seed);
}

// Builds the family's preset for a config and hands it to fn: the way to write one piece of code
// for a family chosen at run time (each family's router is its own type).
template <scalar S, class Fn>
void visit_released_router(const ReleasedModelConfig& c, std::uint64_t seed, Fn&& fn) {
  switch (c.family) {
    case ModelFamily::mixtral: return fn(make_released_router<ModelFamily::mixtral, S>(c, seed));
    case ModelFamily::qwen2_moe: return fn(make_released_router<ModelFamily::qwen2_moe, S>(c, seed));
    case ModelFamily::qwen3_moe: return fn(make_released_router<ModelFamily::qwen3_moe, S>(c, seed));
    case ModelFamily::deepseek_v2: return fn(make_released_router<ModelFamily::deepseek_v2, S>(c, seed));
    case ModelFamily::deepseek_v3: return fn(make_released_router<ModelFamily::deepseek_v3, S>(c, seed));
    case ModelFamily::olmoe: return fn(make_released_router<ModelFamily::olmoe, S>(c, seed));
    case ModelFamily::dbrx: return fn(make_released_router<ModelFamily::dbrx, S>(c, seed));
    case ModelFamily::gpt_oss: return fn(make_released_router<ModelFamily::gpt_oss, S>(c, seed));
    case ModelFamily::llama4: return fn(make_released_router<ModelFamily::llama4, S>(c, seed));
  }
}

}  // namespace moe
