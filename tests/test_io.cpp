// Saving and loading (moe/io/safetensors.hpp, docs/saving.md):
//   1. round trips of every parameterised part, float and double: bit-identical parameters and
//      forward outputs, metadata, the experts' packed weights made stale
//   2. the low-level reader and writer: strided views, escapes, names and metadata checks
//   3. loading options: name map, 1-D tensors, dtype conversion, missing and unexpected tensors
//   4. bad files, each written byte by byte here (never by the code under test): the error
//      class, a message naming the file and the tensor, and every parameter left as it was
//   5. a failed save leaves neither a partial file nor a temporary behind
//   6. half floats (F16, BF16) against bit patterns worked out by hand; reading part of a file;
//      sharded checkpoints and their errors; config.json of released models (moe/io/checkpoint.hpp,
//      moe/io/released_models.hpp)
// The PyTorch comparisons are tests/io/torch_interop.py (ctest io.torch_interop) and
// tests/io/released_models.py (ctest io.released_models: each family's router against its gate
// re-implemented in PyTorch).
#include "support.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <moe/io/checkpoint.hpp>
#include <moe/io/released_models.hpp>
#include <moe/io/safetensors.hpp>

using namespace moe_test;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system's temporary directory, removed with its contents.
class TempDir {
public:
  TempDir() {
    std::random_device device;
    path_ = fs::temp_directory_path() / ("moe_test_io_" + std::to_string(device()) + std::to_string(device()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  fs::path operator/(const std::string& name) const { return path_ / name; }
  const fs::path& path() const { return path_; }

private:
  fs::path path_;
};

template <class A, class B>
bool bit_identical(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), std::size_t(a.size()) * sizeof(*a.data())) == 0;
}

// Every parameter of a model, copied in visit order with its name.
template <class S>
struct Snapshot {
  std::vector<std::string> names;
  std::vector<Matrix<S>> values;
};

template <class Model, class S = typename Model::scalar_type>
Snapshot<S> snapshot(Model& model) {
  Snapshot<S> out;
  model.for_each_parameter([&](std::string_view name, auto value, auto) {
    out.names.emplace_back(name);
    out.values.emplace_back(value);
  });
  return out;
}

template <class S>
bool same_parameters(const Snapshot<S>& a, const Snapshot<S>& b) {
  if (a.names != b.names) return false;
  for (std::size_t i = 0; i < a.values.size(); ++i)
    if (!bit_identical(a.values[i], b.values[i])) return false;
  return true;
}

template <class S>
bool all_differ(const Snapshot<S>& a, const Snapshot<S>& b) {
  for (std::size_t i = 0; i < a.values.size(); ++i)
    if (bit_identical(a.values[i], b.values[i])) return false;
  return true;
}

// ---- files written byte by byte ------------------------------------------------------------

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[std::size_t(i)] = char((n >> (8 * i)) & 0xFF);
  return s;
}

template <class T>
std::string raw_bytes(const std::vector<T>& values) {
  std::string s(values.size() * sizeof(T), '\0');
  std::memcpy(s.data(), values.data(), s.size());
  return s;
}

// A header entry as the format spells it, e.g. "a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// size + header + data
std::string safetensors_bytes(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// ---- the models ----------------------------------------------------------------------------

constexpr Index D = 6, E = 4, H = 5, T = 24;

template <class S>
moe::LinearScorer<S> make_scorer(std::uint64_t seed) {
  moe::LinearScorer<S> scorer(D, E, {.bias = true, .seed = seed});
  scorer.bias() = random_matrix<S>(1, E, seed + 100, 0.3);
  return scorer;
}

template <class S>
auto make_layer(std::uint64_t seed) {
  return moe::MoELayer(moe::make_topk_router<S>(D, E, 2, seed), moe::SwiGLUExperts<S>(E, D, H, seed + 1),
                       moe::SwiGLUExperts<S>(1, D, H, seed + 2));
}

// Expert e gets rows [6e, 6e + 6) of a 24-row batch.
const std::vector<Index> even_offsets{0, 6, 12, 18, 24};

template <class Model, class S = typename Model::scalar_type>
Matrix<S> forward_of(Model& model, const Matrix<S>& x) {
  if constexpr (requires { model.forward(x, moe::TokenInputs<S>{}, std::declval<moe::MatrixOut<S>>()); }) {
    Matrix<S> logits(x.rows(), model.num_experts());
    model.forward(x, {}, logits);  // a scorer
    return logits;
  } else if constexpr (requires(std::span<const Index> offsets, moe::MatrixOut<S> y) {
                         model.forward(x, offsets, y);
                       }) {
    Matrix<S> y(x.rows(), model.output_dim());
    model.forward(x, even_offsets, y);  // experts
    return y;
  } else {
    Matrix<S> y(x.rows(), model.output_dim());
    model.forward(x, y);  // a layer
    return y;
  }
}

// Saves `a`, loads the file into `b` (built alike, other seeds): same parameters, same output.
template <class Model>
void check_round_trip(Model& a, Model& b, const std::vector<std::string>& expected_names) {
  using S = typename Model::scalar_type;
  TempDir dir;
  const fs::path file = dir / "model.safetensors";
  const moe::Metadata metadata{{"step", "1200"}, {"note", "quote \" backslash \\ newline \n tab \t é 😀"}};
  const auto sa = snapshot(a);
  REQUIRE(sa.names == expected_names);
  REQUIRE(all_differ(sa, snapshot(b)));  // the load has something to do

  moe::save(file, a, metadata);
  const moe::LoadReport report = moe::load(file, b);
  CHECK(report.metadata == metadata);
  CHECK(report.loaded == expected_names);
  CHECK(report.kept.empty());
  CHECK(report.ignored.empty());
  REQUIRE(same_parameters(snapshot(b), sa));

  const Matrix<S> x = random_matrix<S>(T, D, 42);
  REQUIRE(bit_identical(forward_of(b, x), forward_of(a, x)));

  // The file itself: names, dtype, [rows, cols], the header padded to 8 bytes, the data as the
  // parameters' row-major bytes (read here from the raw file, at the header's offsets).
  const std::string bytes = read_bytes(file);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK((8 + n) % 8 == 0);
  const moe::SafetensorsFile f = moe::read_safetensors(file);
  CHECK(f.metadata == metadata);
  REQUIRE(f.tensors.size() == expected_names.size());
  std::uint64_t offset = 8 + n;
  for (std::size_t i = 0; i < expected_names.size(); ++i) {
    const moe::StoredTensor& t = f.tensors[i];
    CHECK(t.name == expected_names[i]);
    CHECK(t.dtype == moe::dtype_of<S>);
    const auto rows = std::uint64_t(sa.values[i].rows()), cols = std::uint64_t(sa.values[i].cols());
    CHECK(t.shape == std::vector<std::uint64_t>{rows, cols});
    const std::size_t size = std::size_t(sa.values[i].size()) * sizeof(S);
    REQUIRE(std::memcmp(bytes.data() + offset, sa.values[i].data(), size) == 0);
    offset += size;
  }
  CHECK(offset == bytes.size());
}

}  // namespace

// ================================================================================================
// 1. Round trips
// ================================================================================================

TEMPLATE_TEST_CASE("round trip: every parameter and forward output bit-identical, metadata kept",
                   "[io]", float, double) {
  using S = TestType;
  SECTION("linear scorer with bias") {
    auto a = make_scorer<S>(1), b = make_scorer<S>(2);
    check_round_trip(a, b, {"router.weight", "router.bias"});
  }
  SECTION("FFN experts") {
    moe::FFNExperts<S> a(E, D, H, moe::Activation::gelu, 3), b(E, D, H, moe::Activation::gelu, 4);
    check_round_trip(a, b, {"experts.w1", "experts.w2"});
  }
  SECTION("SwiGLU experts") {
    moe::SwiGLUExperts<S> a(E, D, H, 5), b(E, D, H, 6);
    check_round_trip(a, b, {"experts.w_gate", "experts.w_up", "experts.w_down"});
  }
  SECTION("MoE layer: top-k router, SwiGLU experts, shared SwiGLU expert") {
    auto a = make_layer<S>(7), b = make_layer<S>(17);
    check_round_trip(a, b,
                     {"router.weight", "experts.w_gate", "experts.w_up", "experts.w_down",
                      "shared.experts.w_gate", "shared.experts.w_up", "shared.experts.w_down"});
  }
}

TEST_CASE("round trip: a load makes the experts' packed weights stale", "[io]") {
  // Wide enough that forward really multiplies by packed copies (Gemm packs B above 256 columns).
  constexpr Index dim = 264, hidden = 300, experts = 3, tokens = 40;
  static_assert(dim > moe::Gemm<float>::eigen_max_cols && hidden > moe::Gemm<float>::eigen_max_cols);
  const auto make = [&](std::uint64_t seed) {
    return moe::MoELayer(moe::make_topk_router<float>(dim, experts, 2, seed),
                         moe::SwiGLUExperts<float>(experts, dim, hidden, seed + 1),
                         moe::SwiGLUExperts<float>(1, dim, hidden, seed + 2));
  };
  auto source = make(1), target = make(11);
  TempDir dir;
  moe::save(dir / "layer.safetensors", source);

  const Matrix<float> x = random_matrix<float>(tokens, dim, 3);
  Matrix<float> before(tokens, dim), after(tokens, dim), want(tokens, dim);
  target.set_grad_enabled(false);  // inference: forward packs its weights
  target.forward(x, before);
  REQUIRE(target.experts().weights_packed());
  REQUIRE(target.shared_expert().weights_packed());
  moe::load(dir / "layer.safetensors", target);
  REQUIRE_FALSE(target.experts().weights_packed());
  REQUIRE_FALSE(target.shared_expert().weights_packed());
  target.forward(x, after);
  source.forward(x, want);
  REQUIRE_FALSE(bit_identical(after, before));
  REQUIRE(bit_identical(after, want));
}

// ================================================================================================
// 2. The reader and writer
// ================================================================================================

TEST_CASE("write_safetensors: any strides, written row-major, and read_safetensors gives them back", "[io]") {
  TempDir dir;
  const fs::path file = dir / "views.safetensors";
  const Matrix<double> full = random_matrix<double>(5, 7, 1);
  const Eigen::MatrixXf col_major = random_matrix<float>(3, 4, 2);  // column-major storage
  const auto block = full.block(1, 2, 3, 4);                          // strided rows
  const Matrix<float> empty(0, 3);
  const std::vector<moe::TensorView> views{{"full", full}, {"col_major", col_major},
                                           {"block", block}, {"empty", empty}};
  const moe::Metadata metadata{{"", "empty key"}, {"ctl", std::string("\x01\x1f", 2)}};
  moe::write_safetensors(file, views, metadata);

  const moe::SafetensorsFile f = moe::read_safetensors(file);
  REQUIRE(f.metadata == metadata);
  REQUIRE(f.tensors.size() == 4);
  CHECK(f.find("absent") == nullptr);
  REQUIRE(f.find("block") == &f.tensors[2]);
  CHECK(f.tensors[0].dtype == moe::Dtype::f64);
  CHECK(f.tensors[1].dtype == moe::Dtype::f32);
  CHECK(f.tensors[2].shape == std::vector<std::uint64_t>{3, 4});
  CHECK(f.tensors[3].shape == std::vector<std::uint64_t>{0, 3});
  CHECK(f.tensors[3].bytes.empty());
  CHECK(bit_identical(moe::to_matrix<double>(f.tensors[0]), full));
  CHECK(bit_identical(moe::to_matrix<float>(f.tensors[1]), Matrix<float>(col_major)));
  CHECK(bit_identical(moe::to_matrix<double>(f.tensors[2]), Matrix<double>(block)));
  // element (r, c) of a row-major [3, 4] tensor is at byte 4 (4 r + c): checked on the raw bytes
  float v;
  std::memcpy(&v, f.tensors[1].bytes.data() + 4 * (4 * 2 + 1), 4);
  CHECK(v == col_major(2, 1));

  REQUIRE_THROWS_AS(moe::to_matrix<float>(f.tensors[0]), moe::shape_error);
  REQUIRE_THROWS_WITH(moe::to_matrix<float>(f.tensors[0]), Contains("'full'") && Contains("dtype F64"));
}

TEST_CASE("write_safetensors: names repeated or reserved, and invalid UTF-8, are rejected before writing",
          "[io][errors]") {
  TempDir dir;
  const fs::path file = dir / "bad.safetensors";
  write_bytes(file, "previous contents");
  const Matrix<float> m = random_matrix<float>(2, 2, 1);
  const std::vector<moe::TensorView> repeated{{"a", m}, {"a", m}};
  REQUIRE_THROWS_AS(moe::write_safetensors(file, repeated), moe::config_error);
  REQUIRE_THROWS_WITH(moe::write_safetensors(file, repeated), Contains("\"a\"") && Contains("unique"));
  const std::vector<moe::TensorView> reserved{{"__metadata__", m}};
  REQUIRE_THROWS_WITH(moe::write_safetensors(file, reserved), Contains("__metadata__") && Contains("reserves"));
  const std::vector<moe::TensorView> bad_utf8{{"a\xff", m}};
  REQUIRE_THROWS_AS(moe::write_safetensors(file, bad_utf8), moe::config_error);
  const std::vector<moe::TensorView> good{{"a", m}};
  REQUIRE_THROWS_AS(moe::write_safetensors(file, good, {{"k", "\xc3"}}), moe::config_error);
  CHECK(read_bytes(file) == "previous contents");
}

// ================================================================================================
// 3. Loading options
// ================================================================================================

TEST_CASE("load: a name map reads a checkpoint written under other names", "[io]") {
  TempDir dir;
  const fs::path file = dir / "torch_names.safetensors";
  auto a = make_layer<float>(1), b = make_layer<float>(2);
  // the names a PyTorch module might use, written with the low-level writer
  std::vector<moe::TensorView> views;
  a.for_each_parameter([&](std::string_view name, auto value, auto) {
    views.emplace_back("model.moe." + std::string(name == "router.weight" ? "gate.weight" : name), value);
  });
  moe::write_safetensors(file, views);

  const auto before = snapshot(b);
  REQUIRE_THROWS_AS(moe::load(file, b), moe::shape_error);  // 'router.weight' is not in the file
  REQUIRE(same_parameters(snapshot(b), before));

  moe::LoadOptions options;
  options.name_map = [](std::string_view name) {
    return "model.moe." + std::string(name == "router.weight" ? "gate.weight" : name);
  };
  const moe::LoadReport report = moe::load(file, b, options);
  CHECK(report.loaded.size() == 7);
  REQUIRE(same_parameters(snapshot(b), snapshot(a)));
}

TEST_CASE("load: 1-D tensors, dtype conversion, missing, unexpected and skipped tensors", "[io]") {
  TempDir dir;
  const fs::path file = dir / "f.safetensors";
  auto model = make_scorer<float>(1);
  const std::vector<float> w{1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12,
                             13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24};
  const std::vector<float> bias{-1, -2, -3, -4};
  const std::string w_entry = entry("router.weight", "F32", "[4,6]", 0, 96);

  SECTION("a 1-D bias [4] loads into the [1, 4] parameter only with vector_as_row") {
    write_bytes(file, safetensors_bytes("{" + w_entry + "," + entry("router.bias", "F32", "[4]", 96, 112) + "}",
                                        raw_bytes(w) + raw_bytes(bias)));
    const auto before = snapshot(model);
    REQUIRE_THROWS_AS(moe::load(file, model), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::load(file, model), Contains("'router.bias' = shape [4]") && Contains("vector_as_row"));
    REQUIRE(same_parameters(snapshot(model), before));
    moe::load(file, model, {.vector_as_row = true});
    CHECK(model.bias() == Eigen::Map<const Matrix<float>>(bias.data(), 1, 4));
    CHECK(model.weight() == Eigen::Map<const Matrix<float>>(w.data(), 4, 6));
  }
  SECTION("F64 into a float model only with convert_dtype; beyond float's range is a value_error") {
    std::vector<double> wd(w.begin(), w.end());
    wd[5] = 0.1;  // rounds
    const std::vector<double> bd(bias.begin(), bias.end());
    const std::string header = "{" + entry("router.weight", "F64", "[4,6]", 0, 192) + "," +
                               entry("router.bias", "F64", "[1,4]", 192, 224) + "}";
    write_bytes(file, safetensors_bytes(header, raw_bytes(wd) + raw_bytes(bd)));
    const auto before = snapshot(model);
    REQUIRE_THROWS_AS(moe::load(file, model), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::load(file, model), Contains("'router.weight' = dtype F64") && Contains("convert_dtype"));
    REQUIRE(same_parameters(snapshot(model), before));
    moe::load(file, model, {.convert_dtype = true});
    CHECK(model.weight()(0, 5) == 0.1f);
    CHECK(model.weight()(3, 5) == 24.0f);
    CHECK(model.bias()(0, 3) == -4.0f);

    auto fresh = make_scorer<float>(2);
    const auto fresh_before = snapshot(fresh);
    wd[7] = 1e300;
    write_bytes(file, safetensors_bytes(header, raw_bytes(wd) + raw_bytes(bd)));
    REQUIRE_THROWS_AS(moe::load(file, fresh, {.convert_dtype = true}), moe::value_error);
    REQUIRE_THROWS_WITH(moe::load(file, fresh, {.convert_dtype = true}),
                        Contains("'router.weight' = 1e+300 at element 7"));
    REQUIRE(same_parameters(snapshot(fresh), fresh_before));
  }
  SECTION("F32 into a double model with convert_dtype is exact") {
    auto d = make_scorer<double>(3);
    write_bytes(file, safetensors_bytes("{" + w_entry + "," + entry("router.bias", "F32", "[1,4]", 96, 112) + "}",
                                        raw_bytes(w) + raw_bytes(bias)));
    REQUIRE_THROWS_AS(moe::load(file, d), moe::shape_error);
    moe::load(file, d, {.convert_dtype = true});
    CHECK(d.weight()(2, 3) == 16.0);
    CHECK(d.bias()(0, 1) == -2.0);
  }
  SECTION("missing and unexpected tensors, and parameters the name map skips") {
    write_bytes(file, safetensors_bytes("{" + w_entry + "," + entry("extra", "F32", "[4]", 96, 112) + "}",
                                        raw_bytes(w) + raw_bytes(bias)));
    const auto before = snapshot(model);
    REQUIRE_THROWS_AS(moe::load(file, model), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::load(file, model), Contains("'router.bias' = absent") && Contains("allow_missing"));
    REQUIRE_THROWS_WITH(moe::load(file, model, {.allow_missing = true}),
                        Contains("'extra'") && Contains("allow_unexpected"));
    REQUIRE(same_parameters(snapshot(model), before));
    const auto report = moe::load(file, model, {.allow_missing = true, .allow_unexpected = true});
    CHECK(report.loaded == std::vector<std::string>{"router.weight"});
    CHECK(report.kept == std::vector<std::string>{"router.bias"});
    CHECK(report.ignored == std::vector<std::string>{"extra"});
    CHECK(model.weight() == Eigen::Map<const Matrix<float>>(w.data(), 4, 6));
    CHECK(bit_identical(model.bias(), before.values[1]));

    moe::LoadOptions skip_bias;
    skip_bias.name_map = [](std::string_view name) {
      return name == "router.bias" ? std::string() : std::string(name);
    };
    skip_bias.allow_unexpected = true;
    const auto skipped = moe::load(file, model, skip_bias);
    CHECK(skipped.kept == std::vector<std::string>{"router.bias"});
  }
  SECTION("a name map that sends two parameters to one tensor is a config_error") {
    write_bytes(file, safetensors_bytes("{" + w_entry + "}", raw_bytes(w)));
    moe::LoadOptions same;
    same.name_map = [](std::string_view) { return std::string("router.weight"); };
    const auto before = snapshot(model);
    REQUIRE_THROWS_AS(moe::load(file, model, same), moe::config_error);
    REQUIRE_THROWS_WITH(moe::load(file, model, same),
                        Contains("'name_map'") && Contains("'router.weight' and 'router.bias'"));
    REQUIRE(same_parameters(snapshot(model), before));
  }
}

// ================================================================================================
// 4. Bad files
// ================================================================================================

namespace {

// A scorer [4, 6] + bias [1, 4] and a valid file for it, with values no seed gives: a loader
// that wrote router.weight before finding a fault in router.bias would show.
struct BadFileFixture {
  TempDir dir;
  fs::path file = dir / "ckpt.safetensors";
  moe::LinearScorer<float> model = make_scorer<float>(5);
  std::vector<float> w = std::vector<float>(24, 0.25f);
  std::vector<float> bias = std::vector<float>(4, -0.5f);
  std::string weight_entry = entry("router.weight", "F32", "[4,6]", 0, 96);
  std::string data = raw_bytes(w) + raw_bytes(bias);

  std::string with_bias(const std::string& bias_entry) const {
    return "{" + weight_entry + "," + bias_entry + "}";
  }

  // load fails with Error, the message starts with "moe: load("<file>")" and holds every
  // fragment, and the model is untouched.
  template <class Error>
  void require_fails(const std::string& bytes, const std::vector<std::string>& fragments,
                     const moe::LoadOptions& options = {}) {
    write_bytes(file, bytes);
    require_fails_on_file<Error>(fragments, options);
  }

  template <class Error>
  void require_fails_on_file(const std::vector<std::string>& fragments, const moe::LoadOptions& options = {}) {
    const auto before = snapshot(model);
    std::string message;
    bool thrown = false;
    try {
      moe::load(file, model, options);
    } catch (const Error& e) {
      thrown = true;
      message = e.what();
    } catch (const std::exception& e) {
      FAIL("another error class: " << e.what());
    }
    REQUIRE(thrown);
    CAPTURE(message);
    CHECK_THAT(message, StartsWith("moe: load(\"" + file.string() + "\"): argument '"));
    CHECK_THAT(message, Contains(" violates: "));
    for (const std::string& f : fragments) CHECK_THAT(message, Contains(f));
    REQUIRE(same_parameters(snapshot(model), before));
  }
};

}  // namespace

TEST_CASE("bad files: the hand-written good file loads (the cases below differ from it in one fault)",
          "[io][errors]") {
  BadFileFixture f;
  // padding after the JSON, escapes in names and metadata, and a surrogate pair
  const std::string header = "{\"__metadata__\":{\"k\\u00e9y\":\"\\ud83d\\ude00 \\\"q\\\" \\/ \\n\"}, " +
                             f.weight_entry + " , " + entry("router.bias", "F32", "[1,4]", 96, 112) + "}    ";
  write_bytes(f.file, safetensors_bytes(header, f.data));
  const auto report = moe::load(f.file, f.model);
  CHECK(report.metadata == moe::Metadata{{"k\xc3\xa9y", "\xf0\x9f\x98\x80 \"q\" / \n"}});
  CHECK(f.model.weight() == Matrix<float>::Constant(4, 6, 0.25f));
  CHECK(f.model.bias() == Matrix<float>::Constant(1, 4, -0.5f));
}

TEST_CASE("bad files: unreadable, truncated, absurd header size", "[io][errors]") {
  BadFileFixture f;
  const std::string good_header = f.with_bias(entry("router.bias", "F32", "[1,4]", 96, 112));
  SECTION("no such file") {
    f.require_fails_on_file<moe::io_error>({"'path'", "no such file"});
  }
  SECTION("a directory") {
    fs::create_directory(f.file);
    f.require_fails_on_file<moe::io_error>({"'path'", "not a regular file"});
  }
  SECTION("empty, or shorter than the size field") {
    f.require_fails<moe::format_error>("", {"'header_size'", "the file has 0 bytes", "truncated"});
    f.require_fails<moe::format_error>(std::string("\x10\0\0", 3), {"'header_size'", "the file has 3 bytes"});
  }
  SECTION("an absurd header size") {
    f.require_fails<moe::format_error>(le64(std::uint64_t(1) << 62) + good_header + f.data,
                                       {"'header_size' = 4611686018427387904", "at most 100000000"});
  }
  SECTION("a header size past the end of the file") {
    const std::string bytes = safetensors_bytes(good_header, f.data);
    f.require_fails<moe::format_error>(le64(bytes.size()) + good_header + f.data,
                                       {"'header_size'", "truncated"});
  }
  SECTION("the header cut short") {
    f.require_fails<moe::format_error>(safetensors_bytes(good_header, f.data).substr(0, 40),
                                       {"'header_size'", "truncated"});
  }
  SECTION("the data cut short: shorter than the largest end offset") {
    f.require_fails<moe::format_error>(safetensors_bytes(good_header, f.data.substr(0, 100)),
                                       {"'router.bias.data_offsets' = [96, 112]", "end <= 100", "truncated"});
  }
}

TEST_CASE("bad files: malformed JSON names the byte", "[io][errors]") {
  BadFileFixture f;
  const std::string w = f.weight_entry;
  const std::string b = entry("router.bias", "F32", "[1,4]", 96, 112);
  const auto json_fails = [&](const std::string& header, std::size_t byte, const std::string& rule) {
    INFO(header);
    f.require_fails<moe::format_error>(safetensors_bytes(header, f.data),
                                       {"'header' = byte " + std::to_string(8 + byte), rule});
  };
  json_fails("{" + w + "," + b, w.size() + b.size() + 2, "or '}' in an object");     // not closed
  json_fails("{" + w + "," + b + ",}", w.size() + b.size() + 3, "a JSON string (an object key)");  // trailing comma
  json_fails("[" + w + "," + b + "]", 16, "',' or ']'");                                  // not an object
  json_fails("[]", 0, "a JSON object");
  json_fails("{" + w + "," + b + "} x", w.size() + b.size() + 4, "only whitespace");
  json_fails("{\"a\\q\":1}", 4, "one of the escapes");
  json_fails("{\"a\nb\":1}", 3, "control characters");
  json_fails("{\"a\xff\":1}", 3, "UTF-8");
  json_fails("{\"\\ud83d\":1}", 8, "a high surrogate followed by");
  json_fails("{" + w + "," + b + ",\"x\":01}", w.size() + b.size() + 7, "leading zeros");
  json_fails("{" + w + "," + b + ",\"x\":-1}", w.size() + b.size() + 7, "non-negative");
  json_fails("{" + w + "," + b + ",\"x\":1.5}", w.size() + b.size() + 8, "no fraction");
  json_fails("{" + w + "," + b + ",\"x\":true}", w.size() + b.size() + 7, "string, integer, array or object");
  json_fails("{" + w + "," + b + ",\"x\":99999999999999999999}", w.size() + b.size() + 7, "below 2^64");
  json_fails("{" + w + "," + w + "}", w.size() + 2, "\"router.weight\" is repeated");
  json_fails(std::string(40, '[') + std::string(40, ']'), 33, "nested at most 32 deep");
}

TEST_CASE("bad files: entries that are not tensors", "[io][errors]") {
  BadFileFixture f;
  const auto fails = [&](const std::string& bias_entry, const std::vector<std::string>& fragments) {
    INFO(bias_entry);
    f.require_fails<moe::format_error>(safetensors_bytes(f.with_bias(bias_entry), f.data), fragments);
  };
  fails("\"router.bias\":[1]", {"'router.bias' = byte", "an object with \"dtype\""});
  fails("\"router.bias\":{\"dtype\":\"F32\",\"shape\":[1,4]}", {"'router.bias'", "an entry with \"data_offsets\""});
  fails("\"router.bias\":{\"dtype\":\"F32\",\"shape\":[1,4],\"data_offsets\":[96,112],\"x\":1}",
        {"'router.bias.x'", "only \"dtype\""});
  fails("\"router.bias\":{\"dtype\":32,\"shape\":[1,4],\"data_offsets\":[96,112]}", {"'router.bias.dtype'", "a string"});
  fails(entry("router.bias", "F4", "[1,4]", 96, 112), {"'router.bias.dtype' = \"F4\"", "one of BOOL"});
  fails(entry("router.bias", "F32", "[1,\"4\"]", 96, 112), {"'router.bias.shape'", "an array of integers"});
  fails("\"router.bias\":{\"dtype\":\"F32\",\"shape\":[1,4],\"data_offsets\":[96]}",
        {"'router.bias.data_offsets' = [96]", "two integers"});
  fails(entry("router.bias", "F32", "[4294967296,4294967296]", 96, 112), {"'router.bias.shape'", "below 2^64"});
  const std::string header = "{\"__metadata__\":{\"step\":3}," + f.weight_entry + "," +
                             entry("router.bias", "F32", "[1,4]", 96, 112) + "}";
  f.require_fails<moe::format_error>(safetensors_bytes(header, f.data), {"'__metadata__.step'", "a string"});
}

TEST_CASE("bad files: offsets that lie", "[io][errors]") {
  BadFileFixture f;
  const auto fails = [&](const std::string& header, const std::string& data,
                         const std::vector<std::string>& fragments) {
    INFO(header);
    f.require_fails<moe::format_error>(safetensors_bytes(header, data), fragments);
  };
  SECTION("end < begin") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,4]", 112, 96)), f.data,
          {"'router.bias.data_offsets' = [112, 96]", "begin <= end"});
  }
  SECTION("a size other than numel x dtype size") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,3]", 96, 112)), f.data,
          {"'router.bias.data_offsets' = [96, 112]", "end - begin = 12 bytes", "[1, 3] of F32"});
    fails(f.with_bias(entry("router.bias", "F64", "[1,4]", 96, 112)), f.data,
          {"'router.bias.data_offsets'", "end - begin = 32 bytes"});
  }
  SECTION("past the end of the data") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,4]", 112, 128)), f.data,
          {"'router.bias.data_offsets' = [112, 128]", "end <= 112"});
  }
  SECTION("overlapping tensors") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,4]", 88, 104)), f.data + std::string(8, '\0'),
          {"'router.bias.data_offsets' = [88, 104]", "no overlap with tensor 'router.weight' at [0, 96]"});
  }
  SECTION("bytes between tensors that no tensor covers") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,4]", 104, 120)), f.data + std::string(8, '\0'),
          {"'router.bias.data_offsets' = [104, 120]", "begin = 96", "bytes [96, 104) belong to no tensor"});
  }
  SECTION("bytes before the first tensor") {
    const std::string header = "{" + entry("router.weight", "F32", "[4,6]", 8, 104) + "," +
                               entry("router.bias", "F32", "[1,4]", 104, 120) + "}";
    fails(header, std::string(8, '\0') + f.data, {"'router.weight.data_offsets' = [8, 104]", "the start of the data"});
  }
  SECTION("bytes after the last tensor") {
    fails(f.with_bias(entry("router.bias", "F32", "[1,4]", 96, 112)), f.data + "tail",
          {"'router.bias.data_offsets' = [96, 112]", "end = 116", "bytes [112, 116) belong to no tensor"});
  }
  SECTION("data but no tensor") {
    fails("{}", "data", {"'header' = no tensors", "4 bytes of data"});
  }
}

TEST_CASE("bad files: a valid file that does not fit the model", "[io][errors]") {
  BadFileFixture f;
  SECTION("wrong dtype") {
    f.require_fails<moe::shape_error>(
        safetensors_bytes(f.with_bias(entry("router.bias", "I32", "[1,4]", 96, 112)), f.data),
        {"'router.bias' = dtype I32", "dtype F32, as parameter 'router.bias'"});
  }
  SECTION("wrong shape") {
    f.require_fails<moe::shape_error>(
        safetensors_bytes(f.with_bias(entry("router.bias", "F32", "[4,1]", 96, 112)), f.data),
        {"'router.bias' = shape [4, 1]", "shape [1, 4], as parameter 'router.bias'"});
    f.require_fails<moe::shape_error>(
        safetensors_bytes(f.with_bias(entry("router.bias", "F32", "[1,2,2]", 96, 112)), f.data),
        {"'router.bias' = shape [1, 2, 2]"});
  }
  SECTION("a missing tensor") {
    f.require_fails<moe::shape_error>(safetensors_bytes("{" + f.weight_entry + "}", f.data.substr(0, 96)),
                                      {"'router.bias' = absent", "a tensor for parameter 'router.bias'"});
  }
  SECTION("an unexpected tensor") {
    const std::string header = f.with_bias(entry("router.bias", "F32", "[1,4]", 96, 112) + "," +
                                           entry("router.scale", "F32", "[1]", 112, 116));
    f.require_fails<moe::shape_error>(safetensors_bytes(header, f.data + raw_bytes(std::vector<float>{2.0f})),
                                      {"'router.scale' = a tensor of shape [1]", "some parameter reads"});
  }
  SECTION("a mapped name names the file's tensor and our parameter") {
    moe::LoadOptions options;
    options.name_map = [](std::string_view name) { return "gate." + std::string(name.substr(7)); };
    const std::string header = "{" + entry("gate.weight", "F32", "[4,6]", 0, 96) + "," +
                               entry("gate.bias", "F32", "[2,2]", 96, 112) + "}";
    f.require_fails<moe::shape_error>(safetensors_bytes(header, f.data),
                                      {"'gate.bias' = shape [2, 2]", "as parameter 'router.bias'"}, options);
  }
}

// ================================================================================================
// 5. A failed save
// ================================================================================================

TEST_CASE("save: replaces a file whole, and a failed save leaves no partial file and no temporary",
          "[io][errors]") {
  TempDir dir;
  auto model = make_scorer<double>(1);
  const auto no_temporaries = [&] {
    for (const auto& e : fs::directory_iterator(dir.path()))
      if (e.path().filename().string().find(".tmp-") != std::string::npos) return false;
    return true;
  };
  SECTION("over an existing file") {
    write_bytes(dir / "m.safetensors", std::string(1000, 'x'));
    moe::save(dir / "m.safetensors", model);
    auto other = make_scorer<double>(2);
    moe::load(dir / "m.safetensors", other);
    CHECK(same_parameters(snapshot(other), snapshot(model)));
    CHECK(no_temporaries());
  }
  SECTION("into a directory that does not exist") {
    REQUIRE_THROWS_AS(moe::save(dir / "absent" / "m.safetensors", model), moe::io_error);
    REQUIRE_THROWS_WITH(moe::save(dir / "absent" / "m.safetensors", model),
                        StartsWith("moe: save(\"" + (dir / "absent" / "m.safetensors").string() + "\")") &&
                            Contains("temporary file"));
    CHECK_FALSE(fs::exists(dir / "absent"));
  }
  SECTION("onto a path the file cannot be renamed to: the temporary is removed") {
    fs::create_directories(dir / "m.safetensors" / "occupied");
    REQUIRE_THROWS_AS(moe::save(dir / "m.safetensors", model), moe::io_error);
    REQUIRE_THROWS_WITH(moe::save(dir / "m.safetensors", model), Contains("renamed"));
    CHECK(no_temporaries());
    CHECK(fs::is_directory(dir / "m.safetensors" / "occupied"));
  }
  SECTION("a rejected request writes nothing") {
    write_bytes(dir / "m.safetensors", "old");
    REQUIRE_THROWS_AS(moe::save(dir / "m.safetensors", model, {{"bad", "\xff"}}), moe::config_error);
    CHECK(read_bytes(dir / "m.safetensors") == "old");
    CHECK(no_temporaries());
  }
}

// ================================================================================================
// 6. Half floats, reading part of a file, sharded checkpoints, config.json of released models
// ================================================================================================

namespace {

std::uint32_t float_bits(float f) { return std::bit_cast<std::uint32_t>(f); }

template <class T>
std::string le_bytes(std::initializer_list<T> values) {
  return raw_bytes(std::vector<T>(values));
}

}  // namespace

TEST_CASE("half floats: every F16 class and BF16 decode to the float bits worked out by hand", "[io][half]") {
  // F16: sign | 5 exponent bits (bias 15) | 10 fraction bits; float: sign | 8 (bias 127) | 23.
  struct Case {
    std::uint16_t half;
    std::uint32_t single;
    const char* what;
  };
  const Case f16[] = {
      {0x0000, 0x00000000, "+0"},
      {0x8000, 0x80000000, "-0"},
      {0x0001, 0x33800000, "smallest subnormal 2^-24: float exponent 127 - 24 = 103"},
      {0x8001, 0xB3800000, "-2^-24"},
      {0x0200, 0x38000000, "subnormal 2^-15: fraction bit 9 becomes the implicit bit"},
      {0x03FF, 0x387FC000, "largest subnormal 1023 x 2^-24 = 1.998046875 x 2^-15"},
      {0x0400, 0x38800000, "smallest normal 2^-14"},
      {0x3C00, 0x3F800000, "1"},
      {0xC000, 0xC0000000, "-2"},
      {0x3555, 0x3EAAA000, "0.333251953125: exponent 13 - 15 = -2, fraction 0x155 << 13"},
      {0x7BFF, 0x477FE000, "max 65504"},
      {0x7C00, 0x7F800000, "+inf"},
      {0xFC00, 0xFF800000, "-inf"},
      {0x7E00, 0x7FC00000, "quiet NaN"},
      {0x7C01, 0x7F802000, "signalling NaN, payload 1 kept (<< 13)"},
      {0xFE01, 0xFFC02000, "negative quiet NaN with payload"},
  };
  for (const Case& c : f16) {
    CAPTURE(c.what, c.half);
    CHECK(float_bits(moe::f16_to_float(c.half)) == c.single);
  }
  // The same values from the definitions, as a second opinion on the hand-written bits.
  CHECK(moe::f16_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(moe::f16_to_float(0x03FF) == 1023.0f * std::ldexp(1.0f, -24));
  CHECK(moe::f16_to_float(0x7BFF) == 65504.0f);
  CHECK(moe::f16_to_float(0x3555) == 0.333251953125f);

  // BF16: the top 16 bits of a float.
  const Case bf16[] = {
      {0x0000, 0x00000000, "+0"},         {0x8000, 0x80000000, "-0"},
      {0x3F80, 0x3F800000, "1"},          {0xC049, 0xC0490000, "-3.140625"},
      {0x0001, 0x00010000, "a subnormal"}, {0x7F7F, 0x7F7F0000, "max"},
      {0x7F80, 0x7F800000, "+inf"},       {0xFF80, 0xFF800000, "-inf"},
      {0x7FC1, 0x7FC10000, "NaN, payload kept"},
  };
  for (const Case& c : bf16) {
    CAPTURE(c.what, c.half);
    CHECK(float_bits(moe::bf16_to_float(c.half)) == c.single);
  }
  CHECK(moe::bf16_to_float(0xC049) == -3.140625f);
}

TEST_CASE("half floats: load and to_matrix convert F16 and BF16 when asked, and only then", "[io][half]") {
  TempDir dir;
  const fs::path file = dir / "half.safetensors";
  // router.weight [4, 6] in F16: 1, -0.5, 2^-24 (subnormal), 65504, then zeros; bias [4] in BF16.
  std::vector<std::uint16_t> w(24, 0x0000);
  w[0] = 0x3C00, w[1] = 0xB800, w[2] = 0x0001, w[23] = 0x7BFF;
  const std::vector<std::uint16_t> b{0x3F80, 0xC049, 0x8000, 0x4000};
  const std::string header = "{" + entry("router.weight", "F16", "[4,6]", 0, 48) + "," +
                             entry("router.bias", "BF16", "[4]", 48, 56) + "}";
  write_bytes(file, safetensors_bytes(header, raw_bytes(w) + raw_bytes(b)));

  Matrix<double> want_w = Matrix<double>::Zero(4, 6);
  want_w(0, 0) = 1, want_w(0, 1) = -0.5, want_w(0, 2) = std::ldexp(1.0, -24), want_w(3, 5) = 65504;
  Matrix<double> want_b(1, 4);
  want_b << 1, -3.140625, -0.0, 2;

  auto f = make_scorer<float>(1);
  auto d = make_scorer<double>(1);
  const auto before = snapshot(f);
  REQUIRE_THROWS_AS(moe::load(file, f, {.vector_as_row = true}), moe::shape_error);
  REQUIRE_THROWS_WITH(moe::load(file, f, {.vector_as_row = true}), Contains("F16") && Contains("convert_dtype"));
  CHECK(same_parameters(snapshot(f), before));

  moe::load(file, f, {.vector_as_row = true, .convert_dtype = true});
  moe::load(file, d, {.vector_as_row = true, .convert_dtype = true});
  CHECK(f.weight() == want_w.cast<float>());
  CHECK(d.weight() == want_w);
  CHECK(f.bias() == want_b.cast<float>());
  CHECK(d.bias() == want_b);
  CHECK(std::signbit(d.bias()(0, 2)));  // -0 kept

  const moe::SafetensorsFile read = moe::read_safetensors(file);
  REQUIRE_THROWS_AS(moe::to_matrix<float>(*read.find("router.weight")), moe::shape_error);
  CHECK(moe::to_matrix<double>(*read.find("router.weight"), {.convert_dtype = true}) == want_w);
  CHECK(moe::to_matrix<float>(*read.find("router.bias"), {.convert_dtype = true}) == want_b.cast<float>());
  // integers are not floats: no conversion
  write_bytes(file, safetensors_bytes("{" + entry("i", "I32", "[2]", 0, 8) + "}", le_bytes<std::int32_t>({1, 2})));
  REQUIRE_THROWS_AS(moe::to_matrix<float>(*moe::read_safetensors(file).find("i"), {.convert_dtype = true}),
                    moe::shape_error);
}

TEST_CASE("read_safetensors(path, select) and read_safetensors_header: part of a file, the header checked in full",
          "[io][partial]") {
  TempDir dir;
  const fs::path file = dir / "three.safetensors";
  const std::string header = "{\"__metadata__\":{\"m\":\"v\"}," + entry("c", "F32", "[2]", 16, 24) + "," +
                             entry("a", "F64", "[1,1]", 0, 8) + "," + entry("b", "I64", "[1]", 8, 16) + "}";
  const std::string data = le_bytes<double>({1.5}) + le_bytes<std::int64_t>({-7}) + le_bytes<float>({2.5f, -4.0f});
  write_bytes(file, safetensors_bytes(header, data));

  const moe::SafetensorsHeader h = moe::read_safetensors_header(file);
  CHECK(h.metadata == moe::Metadata{{"m", "v"}});
  REQUIRE(h.tensors.size() == 3);
  CHECK(h.tensors[0].name == "c");
  CHECK(h.tensors[0].begin == 16);
  CHECK(h.tensors[0].end == 24);
  CHECK(h.find("b")->dtype == moe::Dtype::i64);
  CHECK(h.data_start == 8 + header.size());
  CHECK(h.file_size == 8 + header.size() + data.size());

  const moe::SafetensorsFile part =
      moe::read_safetensors(file, [](std::string_view name) { return name == "c" || name == "a"; });
  REQUIRE(part.tensors.size() == 2);
  CHECK(part.tensors[0].name == "c");  // header order
  CHECK(part.tensors[1].name == "a");
  CHECK(part.find("b") == nullptr);
  CHECK(moe::to_matrix<float>(*part.find("c")) == (Matrix<float>(1, 2) << 2.5f, -4.0f).finished());
  CHECK(moe::to_matrix<double>(*part.find("a"))(0, 0) == 1.5);

  // A fault in a tensor not selected is still found.
  const std::string gap = "{" + entry("a", "F64", "[1,1]", 0, 8) + "," + entry("c", "F32", "[2]", 16, 24) + "}";
  write_bytes(file, safetensors_bytes(gap, data));
  REQUIRE_THROWS_AS(moe::read_safetensors(file, [](std::string_view n) { return n == "a"; }), moe::format_error);
  REQUIRE_THROWS_AS(moe::read_safetensors_header(file), moe::format_error);
  // Truncated inside a selected tensor: format_error from the offsets, before any read.
  write_bytes(file, safetensors_bytes(header, data.substr(0, 20)));
  REQUIRE_THROWS_AS(moe::read_safetensors(file, [](std::string_view n) { return n == "c"; }), moe::format_error);
}

namespace {

// Two shards and an index, as Hugging Face writes a sharded checkpoint.
struct ShardedFixture {
  TempDir dir;
  Matrix<float> a = random_matrix<float>(2, 3, 1), b = random_matrix<float>(4, 1, 2);
  Matrix<double> c = random_matrix<double>(1, 5, 3);

  ShardedFixture() {
    const std::vector<moe::TensorView> first{{"a", a}, {"b", b}};
    const std::vector<moe::TensorView> second{{"c", c}};
    moe::write_safetensors(dir / "model-00001-of-00002.safetensors", first);
    moe::write_safetensors(dir / "model-00002-of-00002.safetensors", second);
  }
  void write_index(const std::string& weight_map) const {
    write_bytes(dir / "model.safetensors.index.json",
                "{\"metadata\": {\"total_size\": 72}, \"weight_map\": {" + weight_map + "}}\n");
  }
  void write_good_index() const {
    write_index("\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00001-of-00002.safetensors\", "
                "\"c\": \"model-00002-of-00002.safetensors\"");
  }
};

void check_reads_all(const moe::Checkpoint& ckpt, const ShardedFixture& f) {
  CHECK(ckpt.tensor_names() == std::vector<std::string>{"a", "b", "c"});
  CHECK(ckpt.contains("c"));
  CHECK_FALSE(ckpt.contains("d"));
  CHECK(ckpt.info("c").shape == std::vector<std::uint64_t>{1, 5});
  const std::vector<std::string> names{"c", "a", "b"};
  const std::vector<moe::StoredTensor> t = ckpt.read(names);
  REQUIRE(t.size() == 3);
  CHECK(t[0].name == "c");
  CHECK(moe::to_matrix<double>(t[0]) == f.c);
  CHECK(moe::to_matrix<float>(t[1]) == f.a);
  CHECK(moe::to_matrix<float>(t[2]) == f.b);
}

}  // namespace

TEST_CASE("Checkpoint: shards through an index, a directory of shards, one file", "[io][checkpoint]") {
  ShardedFixture f;
  SECTION("the directory's index") {
    f.write_good_index();
    const moe::Checkpoint ckpt(f.dir.path());
    CHECK(ckpt.shards().size() == 2);
    check_reads_all(ckpt, f);
  }
  SECTION("the index file itself") {
    f.write_good_index();
    check_reads_all(moe::Checkpoint(f.dir / "model.safetensors.index.json"), f);
  }
  SECTION("a directory without an index: the headers say who holds what") {
    check_reads_all(moe::Checkpoint(f.dir.path()), f);
  }
  SECTION("one file") {
    const moe::Checkpoint ckpt(f.dir / "model-00002-of-00002.safetensors");
    CHECK(ckpt.tensor_names() == std::vector<std::string>{"c"});
    CHECK(moe::to_matrix<double>(ckpt.read(std::string("c"))) == f.c);
  }
}

TEST_CASE("Checkpoint: missing shard, tensor absent, an index that lies", "[io][checkpoint][errors]") {
  ShardedFixture f;
  SECTION("an index naming a shard the directory does not hold") {
    f.write_index("\"a\": \"model-00001-of-00002.safetensors\", \"c\": \"model-00003-of-00003.safetensors\"");
    REQUIRE_THROWS_AS(moe::Checkpoint(f.dir.path()), moe::io_error);
    REQUIRE_THROWS_WITH(moe::Checkpoint(f.dir.path()),
                        Contains("weight_map.c") && Contains("model-00003-of-00003") && Contains("missing shard"));
  }
  SECTION("a tensor the checkpoint does not hold") {
    f.write_good_index();
    const moe::Checkpoint ckpt(f.dir.path());
    const std::vector<std::string> names{"a", "gate"};
    REQUIRE_THROWS_AS(ckpt.read(names), moe::shape_error);
    REQUIRE_THROWS_WITH(ckpt.read(names), Contains("'gate' = absent") && Contains("tensor absent"));
    REQUIRE_THROWS_AS(ckpt.info("gate"), moe::shape_error);
  }
  SECTION("an index sending a tensor to a shard without it") {
    f.write_index("\"a\": \"model-00002-of-00002.safetensors\", \"c\": \"model-00002-of-00002.safetensors\"");
    const moe::Checkpoint ckpt(f.dir.path());
    REQUIRE_THROWS_AS(ckpt.read(std::string("c")), moe::format_error);
    REQUIRE_THROWS_WITH(ckpt.read(std::string("c")), Contains("'a' = absent from model-00002-of-00002"));
  }
  SECTION("a shard name leaving the directory") {
    f.write_index("\"a\": \"../model-00001-of-00002.safetensors\"");
    REQUIRE_THROWS_AS(moe::Checkpoint(f.dir.path()), moe::format_error);
  }
  SECTION("an index without a weight_map, or not JSON") {
    write_bytes(f.dir / "model.safetensors.index.json", "{\"metadata\": {}}");
    REQUIRE_THROWS_WITH(moe::Checkpoint(f.dir.path()), Contains("'weight_map' = absent"));
    write_bytes(f.dir / "model.safetensors.index.json", "{\"weight_map\": {\"a\": 1}}");
    REQUIRE_THROWS_AS(moe::Checkpoint(f.dir.path()), moe::format_error);
    write_bytes(f.dir / "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"x\",}}");
    REQUIRE_THROWS_WITH(moe::Checkpoint(f.dir.path()), Contains("argument 'index' = byte 25: '}'"));
  }
  SECTION("a directory without an index where two files hold one tensor") {
    const std::vector<moe::TensorView> again{{"a", f.a}};
    moe::write_safetensors(f.dir / "model-extra.safetensors", again);
    REQUIRE_THROWS_AS(moe::Checkpoint(f.dir.path()), moe::format_error);
    REQUIRE_THROWS_WITH(moe::Checkpoint(f.dir.path()), Contains("each tensor in one shard only"));
  }
  SECTION("nothing to read") {
    TempDir empty;
    REQUIRE_THROWS_AS(moe::Checkpoint(empty.path()), moe::io_error);
    REQUIRE_THROWS_AS(moe::Checkpoint(f.dir / "absent.safetensors"), moe::io_error);
  }
}

TEST_CASE("read_released_config: each family's fields, its MoE layers, JSON beyond a header's", "[io][released]") {
  TempDir dir;
  const fs::path file = dir / "config.json";
  using F = moe::ModelFamily;
  SECTION("Qwen2-MoE: decoder_sparse_step and mlp_only_layers; numbers, booleans and null") {
    write_bytes(file, R"({"model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 6,
      "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": false, "decoder_sparse_step": 2,
      "mlp_only_layers": [3], "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "bos_token_id": -1, "rope_scaling": null,
      "tie_word_embeddings": false, "architectures": ["Qwen2MoeForCausalLM"], "nested": {"x": [1.5, -2, true]}})");
    const moe::ReleasedModelConfig c = moe::read_released_config(dir.path(), F::qwen2_moe);
    CHECK(c.hidden_size == 64);
    CHECK(c.experts == 60);
    CHECK(c.k == 4);
    CHECK_FALSE(c.norm_topk_prob);
    CHECK(c.expert_hidden == 16);
    CHECK(c.shared_hidden == 32);
    // (i + 1) % 2 == 0 gives 1, 3, 5; mlp_only_layers takes 3 away
    CHECK(c.moe_layers == std::vector<Index>{1, 5});
    CHECK(c.is_moe_layer(5));
    CHECK_FALSE(c.is_moe_layer(3));
  }
  SECTION("DeepSeek-V3: groups, scaling, first_k_dense_replace, the V3 defaults") {
    write_bytes(file, R"({"model_type": "deepseek_v3", "hidden_size": 32, "num_hidden_layers": 3,
      "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
      "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "n_shared_experts": 1,
      "moe_intermediate_size": 8})");
    const moe::ReleasedModelConfig c = moe::read_released_config(file, F::deepseek_v3);
    CHECK(c.groups == 4);
    CHECK(c.groups_kept == 2);
    CHECK(c.routed_scaling_factor == 2.5);
    CHECK(c.norm_topk_prob);  // DeepseekV3Config's default
    CHECK(c.topk_method == "noaux_tc");
    CHECK(c.scoring_func == "sigmoid");
    CHECK(c.shared_hidden == 8);
    CHECK(c.moe_layers == std::vector<Index>{1, 2});
  }
  SECTION("Llama 4: the text model's fields under text_config, every interleave_moe_layer_step-th layer") {
    write_bytes(file, R"({"model_type": "llama4", "text_config": {"model_type": "llama4_text",
      "hidden_size": 16, "num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 1,
      "interleave_moe_layer_step": 2, "intermediate_size": 8}, "vision_config": {"hidden_size": 3}})");
    moe::ReleasedModelConfig c = moe::read_released_config(file, F::llama4);
    CHECK(c.hidden_size == 16);
    CHECK(c.moe_layers == std::vector<Index>{1, 3});
    write_bytes(file, R"({"text_config": {"hidden_size": 16, "num_hidden_layers": 4, "num_local_experts": 8,
      "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "moe_layers": [0, 2]}})");
    c = moe::read_released_config(file, F::llama4);
    CHECK(c.moe_layers == std::vector<Index>{0, 2});
  }
  SECTION("DBRX: d_model, n_layers and ffn_config; a null p-norm means no division") {
    write_bytes(file, R"({"model_type": "dbrx", "d_model": 24, "n_layers": 2, "ffn_config":
      {"moe_num_experts": 16, "moe_top_k": 4, "moe_normalize_expert_weights": null}})");
    moe::ReleasedModelConfig c = moe::read_released_config(file, F::dbrx);
    CHECK(c.hidden_size == 24);
    CHECK(c.experts == 16);
    CHECK_FALSE(c.normalize_p.has_value());
    CHECK(c.moe_layers == std::vector<Index>{0, 1});
    write_bytes(file, R"({"d_model": 24, "n_layers": 2, "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}})");
    c = moe::read_released_config(file, F::dbrx);
    CHECK(c.normalize_p == 1.0);  // DbrxFFNConfig's default
  }
  SECTION("errors: a missing field, another family, malformed JSON") {
    write_bytes(file, R"({"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2, "num_experts_per_tok": 2})");
    REQUIRE_THROWS_AS(moe::read_released_config(file, F::mixtral), moe::format_error);
    REQUIRE_THROWS_WITH(moe::read_released_config(file, F::mixtral), Contains("'num_local_experts' = absent"));
    REQUIRE_THROWS_AS(moe::read_released_config(file, F::olmoe), moe::config_error);
    write_bytes(file, R"({"hidden_size": 8, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 5})");
    REQUIRE_THROWS_AS(moe::read_released_config(file, F::mixtral), moe::format_error);
    write_bytes(file, R"({"hidden_size": 8.5e, "x": 1})");
    REQUIRE_THROWS_WITH(moe::read_released_config(file, F::mixtral),
                        Contains("argument 'config' = byte 20") && Contains("exponent"));
    write_bytes(file, R"({"hidden_size": tru})");
    REQUIRE_THROWS_AS(moe::read_released_config(file, F::mixtral), moe::format_error);
  }
}

TEST_CASE("load_router: DeepSeek-V3's weight and selection bias, all or nothing; config checks", "[io][released]") {
  TempDir dir;
  using F = moe::ModelFamily;
  write_bytes(dir / "config.json", R"({"model_type": "deepseek_v3", "hidden_size": 6, "num_hidden_layers": 2,
    "n_routed_experts": 8, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5})");
  const Matrix<float> w = random_matrix<float>(8, 6, 3);
  const Matrix<double> b = random_matrix<double>(1, 8, 4);  // F64 in the file: converted to float
  const std::vector<moe::TensorView> tensors{{"model.layers.1.mlp.gate.weight", w},
                                             {"model.layers.1.mlp.gate.e_score_correction_bias", b}};
  moe::write_safetensors(dir / "model.safetensors", tensors);
  const moe::Checkpoint ckpt(dir.path());
  const moe::ReleasedModelConfig config = moe::read_released_config(ckpt.config_path(), F::deepseek_v3);
  REQUIRE(config.moe_layers == std::vector<Index>{1});

  auto router = moe::make_released_router<F::deepseek_v3, float>(config, 5);
  moe::check_router_config(config, router);
  CHECK(router.selector().groups().top == 2);
  CHECK(router.selector().options().scale == 2.5);
  const auto report = moe::load_router(ckpt, F::deepseek_v3, 1, router);
  CHECK(report.tensors.size() == 2);
  CHECK(router.scorer().weight() == w);
  CHECK(router.gate().bias() == b.cast<float>());

  SECTION("a layer without a gate: shape_error, nothing written") {
    auto fresh = moe::make_released_router<F::deepseek_v3, float>(config, 6);
    const auto before = snapshot(fresh);
    const Matrix<float> bias_before = fresh.gate().bias();
    REQUIRE_THROWS_AS(moe::load_router(ckpt, F::deepseek_v3, 0, fresh), moe::shape_error);
    REQUIRE_THROWS_WITH(moe::load_router(ckpt, F::deepseek_v3, 0, fresh),
                        Contains("'model.layers.0.mlp.gate.weight' = absent"));
    CHECK(same_parameters(snapshot(fresh), before));
    CHECK(fresh.gate().bias() == bias_before);
  }
  SECTION("the weight present, the selection bias absent: the weight is not written either") {
    const std::vector<moe::TensorView> only_weight{{"model.layers.1.mlp.gate.weight", w}};
    moe::write_safetensors(dir / "model.safetensors", only_weight);
    auto fresh = moe::make_released_router<F::deepseek_v3, float>(config, 6);
    const auto before = snapshot(fresh);
    REQUIRE_THROWS_AS(moe::load_router(moe::Checkpoint(dir.path()), F::deepseek_v3, 1, fresh), moe::shape_error);
    CHECK(same_parameters(snapshot(fresh), before));
  }
  SECTION("a router the family does not fit, a config that contradicts it") {
    auto no_bias_gate = moe::make_released_router<F::qwen3_moe, float>(
        moe::ReleasedModelConfig{.family = F::qwen3_moe, .hidden_size = 6, .num_layers = 2, .experts = 8, .k = 4});
    REQUIRE_THROWS_WITH(moe::load_router(ckpt, F::deepseek_v3, 1, no_bias_gate),
                        Contains("ExpertBiasGate"));
    auto oss = moe::make_gpt_oss_router<float>(6, 8, 4);
    REQUIRE_THROWS_AS(moe::load_router(ckpt, F::deepseek_v3, 1, oss), moe::config_error);  // a bias V3 lacks
    moe::ReleasedModelConfig other = config;
    other.k = 2;
    REQUIRE_THROWS_WITH(moe::check_router_config(other, router), Contains("'num_experts_per_tok' = 2"));
    other = config;
    other.routed_scaling_factor = 1.0;
    REQUIRE_THROWS_WITH(moe::check_router_config(other, router), Contains("'routed_scaling_factor' = 1"));
    other = config;
    other.groups_kept = 1;
    REQUIRE_THROWS_AS(moe::check_router_config(other, router), moe::config_error);
  }
}
