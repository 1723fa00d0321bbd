#pragma once
// Parameters saved and loaded as safetensors (docs/saving.md), the Hugging Face format PyTorch
// reads and writes: an 8-byte little-endian header size N, N bytes of JSON naming each tensor's
// dtype, shape and byte range, then the raw little-endian, row-major data.
//
// - write_safetensors / read_safetensors: named 2-D float or double tensors and string
//   metadata to a file; a whole file, validated, into memory; or only the tensors a filter
//   selects (each read after a seek), or only the header (read_safetensors_header).
// - F16 and BF16 (and F32 <-> F64) convert to a parameter's or a matrix's scalar on request
//   (LoadOptions::convert_dtype, MatrixOptions::convert_dtype): f16_to_float, bf16_to_float.
// - save / load: anything with for_each_parameter (routers, experts, MoELayer), each tensor
//   named as for_each_parameter names the parameter and shaped [rows, cols] as stored.
//
// Errors (errors.hpp), each naming the file and the tensor (or the header byte):
// - io_error: the file cannot be opened, read, written or renamed into place;
// - format_error: not a valid safetensors file: shorter than its header or offsets say, an
//   absurd header size, malformed JSON, an unknown dtype, offsets that lie (end < begin, past
//   the data, a size other than numel x dtype size, overlapping tensors, bytes no tensor covers);
// - shape_error: a valid file that does not fit the model: a tensor's shape or dtype, a
//   parameter without a tensor (missing), a tensor no parameter reads (unexpected);
// - config_error: a bad request: tensor names to write that repeat or are reserved, a name map
//   sending two parameters to one tensor;
// - value_error: an F64 value beyond float's range when LoadOptions::convert_dtype converts.
// A write goes to a temporary file in the target's directory, renamed over the target once
// complete, so a failed save never leaves a partial file. load validates and stages every tensor
// before it writes the first parameter, so a failed load leaves every parameter as it was.
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "moe/concepts.hpp"
#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"
#include "moe/io/json.hpp"

namespace moe {

static_assert(std::endian::native == std::endian::little,
              "moe/io/safetensors.hpp copies tensors between memory and file as they are: the "
              "format is little-endian, so a big-endian host would need a byte swap");

// The element types of the format. F32 and F64 load into parameters, and F16 and BF16 with
// conversion; the others are recognised so a file holding them is read, validated and reported
// by name.
enum class Dtype : std::uint8_t {
  boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, f16, bf16, i32, u32, f32, i64, u64, f64
};

namespace detail {
struct DtypeInfo {
  Dtype dtype;
  std::string_view name;
  std::size_t size;
};
inline constexpr std::array<DtypeInfo, 15> dtype_table{{
    {Dtype::boolean, "BOOL", 1}, {Dtype::u8, "U8", 1}, {Dtype::i8, "I8", 1},
    {Dtype::f8_e5m2, "F8_E5M2", 1}, {Dtype::f8_e4m3, "F8_E4M3", 1}, {Dtype::i16, "I16", 2},
    {Dtype::u16, "U16", 2}, {Dtype::f16, "F16", 2}, {Dtype::bf16, "BF16", 2},
    {Dtype::i32, "I32", 4}, {Dtype::u32, "U32", 4}, {Dtype::f32, "F32", 4},
    {Dtype::i64, "I64", 8}, {Dtype::u64, "U64", 8}, {Dtype::f64, "F64", 8},
}};
}  // namespace detail

// The format's name of a dtype ("F32") and its size in bytes.
constexpr std::string_view dtype_name(Dtype d) { return detail::dtype_table[std::size_t(d)].name; }
constexpr std::size_t dtype_size(Dtype d) { return detail::dtype_table[std::size_t(d)].size; }
// The dtype a name stands for, if the format has it.
constexpr std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (const auto& info : detail::dtype_table)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}
template <scalar S>
inline constexpr Dtype dtype_of = std::same_as<S, float> ? Dtype::f32 : Dtype::f64;

// The two 16-bit float formats of checkpoints, from their bits to float: exact, since float holds
// every value of both. bfloat16 is the top half of a float. IEEE binary16 has 5 exponent bits
// (bias 15) and 10 fraction bits: zeros, subnormals (fraction x 2^-24), normals, infinities, and
// NaNs with their payload and quiet bit kept.
constexpr float bf16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(std::uint32_t(bits) << 16);
}

constexpr float f16_to_float(std::uint16_t bits) {
  const std::uint32_t sign = std::uint32_t(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1Fu;
  std::uint32_t fraction = bits & 0x3FFu;
  if (exponent == 0x1F) return std::bit_cast<float>(sign | 0x7F800000u | (fraction << 13));  // inf, NaN
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 127 - 15) << 23) | (fraction << 13));
  if (fraction == 0) return std::bit_cast<float>(sign);  // +-0
  // Subnormal: fraction x 2^-24. Shift the leading 1 up to the implicit bit (bit 10); each
  // shift lowers the exponent from -14 by one.
  std::uint32_t shifts = 0;
  while ((fraction & 0x400u) == 0) {
    fraction <<= 1;
    ++shifts;
  }
  return std::bit_cast<float>(sign | ((127 - 14 - shifts) << 23) | ((fraction & 0x3FFu) << 13));
}

// Whether a dtype is one of the float formats LoadOptions::convert_dtype converts.
constexpr bool is_float_dtype(Dtype d) {
  return d == Dtype::f16 || d == Dtype::bf16 || d == Dtype::f32 || d == Dtype::f64;
}

// The header's "__metadata__": free-form strings (a step count, a config, a format tag).
using Metadata = std::map<std::string, std::string>;

// One tensor's entry in a header: its dtype, shape and where its bytes are, without the bytes.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::f32;
  std::vector<std::uint64_t> shape;  // outermost first; empty for a scalar
  std::uint64_t begin = 0, end = 0;  // data_offsets: bytes [begin, end) of the data part

  std::uint64_t num_elements() const {
    std::uint64_t n = 1;
    for (const std::uint64_t d : shape) n *= d;
    return n;
  }
};

// One tensor of a file, as read: validated, its bytes copied out of the file.
struct StoredTensor : TensorInfo {
  std::vector<std::byte> bytes;  // little-endian, row-major: numel x dtype_size bytes
};

// A whole file, as read_safetensors returns it.
struct SafetensorsFile {
  std::filesystem::path path;
  Metadata metadata;
  std::vector<StoredTensor> tensors;  // in header order

  const StoredTensor* find(std::string_view name) const {
    for (const StoredTensor& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
};


// A file's header, as read_safetensors_header returns it: validated as a whole file is.
struct SafetensorsHeader {
  std::filesystem::path path;
  Metadata metadata;
  std::vector<TensorInfo> tensors;  // in header order
  std::uint64_t data_start = 0;     // 8 + header size: the file offset of the data part
  std::uint64_t file_size = 0;

  const TensorInfo* find(std::string_view name) const {
    for (const TensorInfo& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
};

// A named 2-D float or double matrix to write. A view: the matrix must outlive the write. Any
// Eigen object with direct access to its storage (a Matrix of either storage order, a block, a
// Map, a Ref) is written row-major whatever its strides.
class TensorView {
public:
  template <class Derived>
    requires scalar<typename Derived::Scalar> && (bool(Derived::Flags & Eigen::DirectAccessBit))
  TensorView(std::string name, const Eigen::DenseBase<Derived>& m)
      : name_(std::move(name)), dtype_(dtype_of<typename Derived::Scalar>), rows_(m.rows()),
        cols_(m.cols()), row_stride_(m.derived().rowStride()),
        col_stride_(m.derived().colStride()), data_(m.derived().data()) {}

  const std::string& name() const { return name_; }
  Dtype dtype() const { return dtype_; }
  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  // Element (r, c), as bytes: strides count elements.
  const std::byte* element(Index r, Index c) const {
    return static_cast<const std::byte*>(data_) +
           std::size_t(r * row_stride_ + c * col_stride_) * dtype_size(dtype_);
  }
  bool rows_contiguous() const { return col_stride_ == 1 || cols_ <= 1; }

private:
  std::string name_;
  Dtype dtype_;
  Index rows_, cols_, row_stride_, col_stride_;
  const void* data_;
};

namespace detail {

// A header larger than this is not taken for a safetensors file (the reference reader's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

// "load(\"path\")": where an error happened, with the file it concerns.
inline std::string call_site(std::string_view function, const std::filesystem::path& path) {
  std::string s(function);
  s += "(\"";
  s += path.string();
  s += "\")";
  return s;
}

inline std::string quoted(std::string_view s) { return "\"" + std::string(s) + "\""; }

inline std::string os_reason(int err) {
  return err == 0 ? std::string("no reason given") : std::error_code(err, std::generic_category()).message();
}

template <class Range>
std::string bracketed(const Range& values) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (const auto& v : values) {
    os << (first ? "" : ", ") << v;
    first = false;
  }
  os << "]";
  return os.str();
}

inline std::string offsets_text(std::uint64_t begin, std::uint64_t end) {
  return bracketed(std::array<std::uint64_t, 2>{begin, end});
}

// Bytes [begin, end), end excluded as in data_offsets.
inline std::string byte_range(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + ")";
}

// The header JSON, padded with spaces so the data starts 8-byte aligned in the file (a reader
// that maps the file can then use F64 data in place).
inline std::string make_header(std::span<const TensorView> tensors, const Metadata& metadata,
                               std::string_view where) {
  std::unordered_set<std::string_view> names;
  for (const TensorView& t : tensors) {
    require<config_error>(t.name() != "__metadata__", where, "tensor name", quoted(t.name()),
                          "not \"__metadata__\", the key the format reserves for metadata");
    require<config_error>(names.insert(t.name()).second, where, "tensor name", quoted(t.name()),
                          "unique among the tensors written");
    require<config_error>(utf8_error(t.name()) == std::string_view::npos, where, "tensor name",
                          quoted(t.name()), "valid UTF-8");
  }
  for (const auto& [key, value] : metadata) {
    require<config_error>(utf8_error(key) == std::string_view::npos, where, "metadata key",
                          quoted(key), "valid UTF-8");
    require<config_error>(utf8_error(value) == std::string_view::npos, where, "metadata",
                          quoted(key), "a value in valid UTF-8");
  }
  std::string h = "{";
  if (!metadata.empty()) {
    append_json_string(h, "__metadata__");
    h += ":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      if (!first) h += ',';
      first = false;
      append_json_string(h, key);
      h += ':';
      append_json_string(h, value);
    }
    h += '}';
  }
  std::uint64_t offset = 0;
  for (const TensorView& t : tensors) {
    if (h.size() > 1) h += ',';
    const std::uint64_t bytes = std::uint64_t(t.rows()) * std::uint64_t(t.cols()) * dtype_size(t.dtype());
    append_json_string(h, t.name());
    h += ":{\"dtype\":";
    append_json_string(h, dtype_name(t.dtype()));
    h += ",\"shape\":[" + std::to_string(t.rows()) + "," + std::to_string(t.cols()) + "]";
    h += ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]}";
    offset += bytes;
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  return h;
}

// A fresh name in the target's directory: the rename that publishes the file stays within
// one file system, and concurrent writers (threads or processes) do not share a temporary.
inline std::filesystem::path temporary_beside(const std::filesystem::path& path) {
  static const std::uint64_t process_key = [] {
    std::random_device device;
    return (std::uint64_t(device()) << 32) ^ std::uint64_t(device()) ^
           std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  }();
  static std::atomic<std::uint64_t> counter{0};
  std::ostringstream name;
  name << "." << path.filename().string() << ".tmp-" << std::hex << process_key << "-" << counter++;
  return path.parent_path() / name.str();
}

inline void write_file(const std::filesystem::path& path, std::span<const TensorView> tensors,
                       const Metadata& metadata, std::string_view where) {
  require<config_error>(path.has_filename(), where, "path", quoted(path.string()),
                        "a path naming a file, not a directory");
  const std::string header = make_header(tensors, metadata, where);
  const std::filesystem::path temporary = temporary_beside(path);
  // Removes the temporary on every way out but success (an error, a bad_alloc).
  struct Cleanup {
    const std::filesystem::path& file;
    bool armed = true;
    ~Cleanup() {
      std::error_code ignored;
      if (armed) std::filesystem::remove(file, ignored);
    }
  } cleanup{temporary};
  {
    errno = 0;
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out)
      fail<io_error>(where, "path", quoted(temporary.string()),
                     "a temporary file created in the target's directory (" + os_reason(errno) + ")");
    std::array<unsigned char, 8> size{};
    for (std::size_t i = 0; i < 8; ++i) size[i] = static_cast<unsigned char>(header.size() >> (8 * i));
    out.write(reinterpret_cast<const char*>(size.data()), 8);
    out.write(header.data(), std::streamsize(header.size()));
    std::vector<std::byte> row;
    for (const TensorView& t : tensors) {
      const std::size_t elem = dtype_size(t.dtype()), row_bytes = std::size_t(t.cols()) * elem;
      if (row_bytes == 0) continue;
      for (Index r = 0; r < t.rows(); ++r) {
        const std::byte* src = t.element(r, 0);
        if (!t.rows_contiguous()) {  // gather a strided row
          row.resize(row_bytes);
          for (Index c = 0; c < t.cols(); ++c)
            std::memcpy(row.data() + std::size_t(c) * elem, t.element(r, c), elem);
          src = row.data();
        }
        out.write(reinterpret_cast<const char*>(src), std::streamsize(row_bytes));
      }
    }
    out.flush();
    const int err = errno;
    out.close();
    if (out.fail())
      fail<io_error>(where, "path", quoted(temporary.string()),
                     "a temporary file written in full (" + os_reason(err) + ")");
  }
  std::error_code ec;
  std::filesystem::rename(temporary, path, ec);
  if (ec)
    fail<io_error>(where, "path", quoted(path.string()),
                   "a path the written file can be renamed to (" + ec.message() + ")");
  cleanup.armed = false;
}

// The named integer array `field` of a tensor's entry, or a format_error.
inline std::vector<std::uint64_t> read_integers(const JsonValue& entry, std::string_view tensor,
                                                std::string_view field, const JsonReader& json,
                                                std::string_view where) {
  const std::string arg = std::string(tensor) + "." + std::string(field);
  const JsonValue* v = entry.find(field);
  if (!v) fail<format_error>(where, tensor, json.describe(entry.offset),
                             "an entry with \"" + std::string(field) + "\"");
  if (v->kind != JsonValue::Kind::array)
    fail<format_error>(where, arg, json.describe(v->offset), "an array of integers");
  std::vector<std::uint64_t> out;
  for (const JsonValue& item : v->items) {
    if (item.kind != JsonValue::Kind::integer)
      fail<format_error>(where, arg, json.describe(item.offset), "an array of integers");
    out.push_back(item.integer);
  }
  return out;
}

// An open file and its size, or an io_error.
struct OpenFile {
  std::ifstream in;
  std::uint64_t size = 0;
};

inline OpenFile open_for_reading(const std::filesystem::path& path, std::string_view where) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::is_regular_file(status)) {
    const std::string why = !std::filesystem::exists(status) ? "no such file"
                            : ec                             ? ec.message()
                                                             : "not a regular file";
    fail<io_error>(where, "path", quoted(path.string()), "an existing file (" + why + ")");
  }
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec)
    fail<io_error>(where, "path", quoted(path.string()),
                   "a file whose size can be read (" + ec.message() + ")");
  errno = 0;
  OpenFile f{std::ifstream(path, std::ios::binary), file_size};
  if (!f.in) fail<io_error>(where, "path", quoted(path.string()), "a readable file (" + os_reason(errno) + ")");
  return f;
}

// Exactly n bytes from the stream, or an io_error saying what ended early.
inline void read_exactly(std::ifstream& in, const std::filesystem::path& path, std::string_view where, void* to,
                         std::uint64_t n, std::string_view what) {
  in.read(static_cast<char*>(to), std::streamsize(n));
  if (std::uint64_t(in.gcount()) != n)
    fail<io_error>(where, "path", quoted(path.string()),
                   "a file read in full (" + std::string(what) +
                       " ended early: was it changed while being read?)");
}

// Reads and validates the header of an open file, positioned at its start: header size, JSON,
// dtypes, and that the tensors' byte ranges tile the data exactly. Reads no tensor data.
inline SafetensorsHeader scan_header(std::ifstream& in, const std::filesystem::path& path, std::uint64_t file_size,
                                     std::string_view where) {
  const auto read_exactly = [&](void* to, std::uint64_t n, std::string_view what) {
    detail::read_exactly(in, path, where, to, n, what);
  };
  if (file_size < 8)
    fail<format_error>(where, "header_size", "absent: the file has " + std::to_string(file_size) + " bytes",
                       "8 bytes of header size (the file is truncated)");
  std::array<unsigned char, 8> size_bytes{};
  read_exactly(size_bytes.data(), 8, "the header size");
  std::uint64_t n = 0;
  for (std::size_t i = 0; i < 8; ++i) n |= std::uint64_t(size_bytes[i]) << (8 * i);
  require<format_error>(n <= max_header_bytes, where, "header_size", n,
                        "at most " + std::to_string(max_header_bytes) +
                            " bytes (no safetensors header is that large)");
  require<format_error>(n <= file_size - 8, where, "header_size", n,
                        "at most " + std::to_string(file_size - 8) +
                            ", the bytes after the size field (the file is truncated)");
  std::string text(n, '\0');
  read_exactly(text.data(), n, "the header");
  JsonReader json(text, where, 8);
  const JsonValue root = json.parse_document();
  if (root.kind != JsonValue::Kind::object) json.fail_at(root.offset, "a JSON object");

  SafetensorsHeader file;
  file.path = path;
  file.data_start = 8 + n;
  file.file_size = file_size;
  const std::uint64_t data_size = file_size - 8 - n;
  struct Range {
    std::uint64_t begin, end;
    std::size_t tensor;
  };
  std::vector<Range> ranges;
  for (const JsonMember& m : root.members) {
    const JsonValue& v = m.value;
    if (m.key == "__metadata__") {
      if (v.kind != JsonValue::Kind::object)
        fail<format_error>(where, "__metadata__", json.describe(v.offset), "an object of strings");
      for (const JsonMember& kv : v.members) {
        if (kv.value.kind != JsonValue::Kind::string)
          fail<format_error>(where, "__metadata__." + kv.key, json.describe(kv.value.offset), "a string");
        file.metadata.emplace(kv.key, kv.value.string);
      }
      continue;
    }
    const std::string& name = m.key;
    if (v.kind != JsonValue::Kind::object)
      fail<format_error>(where, name, json.describe(v.offset),
                         "an object with \"dtype\", \"shape\" and \"data_offsets\"");
    for (const JsonMember& field : v.members)
      if (field.key != "dtype" && field.key != "shape" && field.key != "data_offsets")
        fail<format_error>(where, name + "." + field.key, json.describe(field.value.offset),
                           "only \"dtype\", \"shape\" and \"data_offsets\" in a tensor's entry");
    TensorInfo t;
    t.name = name;
    const JsonValue* dtype = v.find("dtype");
    if (!dtype) fail<format_error>(where, name, json.describe(v.offset), "an entry with \"dtype\"");
    if (dtype->kind != JsonValue::Kind::string)
      fail<format_error>(where, name + ".dtype", json.describe(dtype->offset), "a string");
    const auto known = dtype_from_name(dtype->string);
    if (!known) {
      std::string all;
      for (const auto& info : dtype_table) all += (all.empty() ? "" : ", ") + std::string(info.name);
      fail<format_error>(where, name + ".dtype", quoted(dtype->string), "one of " + all);
    }
    t.dtype = *known;
    t.shape = read_integers(v, name, "shape", json, where);
    const std::vector<std::uint64_t> offsets = read_integers(v, name, "data_offsets", json, where);
    if (offsets.size() != 2)
      fail<format_error>(where, name + ".data_offsets", bracketed(offsets), "two integers, [begin, end]");
    // numel x dtype size, refusing to wrap around
    std::uint64_t bytes = dtype_size(t.dtype);
    for (const std::uint64_t d : t.shape) {
      if (d != 0 && bytes > std::numeric_limits<std::uint64_t>::max() / d)
        fail<format_error>(where, name + ".shape", bracketed(t.shape), "a size in bytes below 2^64");
      bytes *= d;
    }
    const std::uint64_t begin = offsets[0], end = offsets[1];
    const std::string arg = name + ".data_offsets";
    require<format_error>(begin <= end, where, arg, offsets_text(begin, end), "begin <= end");
    require<format_error>(end - begin == bytes, where, arg, offsets_text(begin, end),
                          "end - begin = " + std::to_string(bytes) + " bytes, what shape " +
                              bracketed(t.shape) + " of " + std::string(dtype_name(t.dtype)) + " takes");
    require<format_error>(end <= data_size, where, arg, offsets_text(begin, end),
                          "end <= " + std::to_string(data_size) +
                              ", the size of the data in the file (the file is truncated, or the "
                              "offsets are wrong)");
    t.begin = begin;
    t.end = end;
    ranges.push_back({begin, end, file.tensors.size()});
    file.tensors.push_back(std::move(t));
  }

  // The tensors must tile the data exactly: no overlap, no byte that no tensor covers.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  for (std::size_t i = 0; i < ranges.size(); ++i) {
    const Range& r = ranges[i];
    const std::string& name = file.tensors[r.tensor].name;
    if (r.begin < covered) {
      const Range& prev = ranges[i - 1];
      fail<format_error>(where, name + ".data_offsets", offsets_text(r.begin, r.end),
                         "no overlap with tensor '" + file.tensors[prev.tensor].name + "' at " +
                             offsets_text(prev.begin, prev.end));
    }
    if (r.begin > covered)
      fail<format_error>(where, name + ".data_offsets", offsets_text(r.begin, r.end),
                         "begin = " + std::to_string(covered) +
                             (i == 0 ? ", the start of the data" : ", where the previous tensor ends") +
                             " (bytes " + byte_range(covered, r.begin) + " belong to no tensor)");
    covered = r.end;
  }
  if (covered != data_size) {
    if (ranges.empty())
      fail<format_error>(where, "header", "no tensors",
                         "tensors covering the " + std::to_string(data_size) + " bytes of data");
    const Range& last = ranges.back();
    fail<format_error>(where, file.tensors[last.tensor].name + ".data_offsets",
                       offsets_text(last.begin, last.end),
                       "end = " + std::to_string(data_size) +
                           ", the end of the data, for the last tensor (bytes " +
                           byte_range(covered, data_size) + " belong to no tensor)");
  }

  return file;
}

// Reads the data of the tensors of `header` that `select` keeps (all when empty), in file
// order, each straight into place after a seek to it.
inline SafetensorsFile read_tensors(std::ifstream& in, SafetensorsHeader header,
                                    const std::function<bool(std::string_view)>& select, std::string_view where) {
  SafetensorsFile file;
  file.path = header.path;
  file.metadata = std::move(header.metadata);
  std::vector<std::size_t> order;  // indices into file.tensors, sorted by offset below
  for (TensorInfo& info : header.tensors) {
    if (select && !select(info.name)) continue;
    StoredTensor t{std::move(info), {}};
    t.bytes.resize(t.end - t.begin);
    order.push_back(file.tensors.size());
    file.tensors.push_back(std::move(t));
  }
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return file.tensors[a].begin < file.tensors[b].begin; });
  std::uint64_t position = header.data_start;  // the stream is just past the header
  for (const std::size_t i : order) {
    StoredTensor& t = file.tensors[i];
    const std::uint64_t at = header.data_start + t.begin;
    if (at != position) {
      in.seekg(std::streamoff(at));
      if (!in)
        fail<io_error>(where, "path", quoted(header.path.string()),
                       "a file that can be read at byte " + std::to_string(at) + " (tensor '" + t.name + "')");
    }
    read_exactly(in, header.path, where, t.bytes.data(), t.bytes.size(), "tensor '" + t.name + "'");
    position = at + t.bytes.size();
  }
  return file;
}

// Reads and validates a whole file, or the tensors `select` keeps; `where` names the caller and
// the file in messages. The header is checked in full either way.
inline SafetensorsFile read_file(const std::filesystem::path& path, std::string_view where,
                                 const std::function<bool(std::string_view)>& select = {}) {
  OpenFile f = open_for_reading(path, where);
  SafetensorsHeader header = scan_header(f.in, path, f.size, where);
  return read_tensors(f.in, std::move(header), select, where);
}

}  // namespace detail

// Writes `tensors` and `metadata` to `path` as a safetensors file, replacing any file there.
// The data goes to a temporary file in the same directory, renamed to `path` once complete.
inline void write_safetensors(const std::filesystem::path& path, std::span<const TensorView> tensors,
                              const Metadata& metadata = {}) {
  detail::write_file(path, tensors, metadata, detail::call_site("write_safetensors", path));
}

// Reads a whole safetensors file, after checking all of it: header size, JSON, dtypes, and that
// the tensors' byte ranges tile the data exactly.
inline SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  return detail::read_file(path, detail::call_site("read_safetensors", path));
}

// Reads only the tensors `select` keeps (by name), each after a seek to its bytes: the way to take
// a few tensors out of a checkpoint of many gigabytes. The header is still checked in full; the
// result lists the selected tensors in header order.
inline SafetensorsFile read_safetensors(const std::filesystem::path& path,
                                        const std::function<bool(std::string_view)>& select) {
  const std::string where = detail::call_site("read_safetensors", path);
  detail::require<config_error>(bool(select), where, "select", "an empty function",
                                "a function choosing tensors by name (or the overload without it)");
  return detail::read_file(path, where, select);
}

// Reads and checks the header only: names, dtypes, shapes and offsets of every tensor, and the
// metadata. No tensor data is read.
inline SafetensorsHeader read_safetensors_header(const std::filesystem::path& path) {
  const std::string where = detail::call_site("read_safetensors_header", path);
  detail::OpenFile f = detail::open_for_reading(path, where);
  return detail::scan_header(f.in, path, f.size, where);
}

namespace detail {

// The elements of a float tensor (F16, BF16, F32, F64) as V: exact but for F64 -> float, which
// rounds to nearest and is a value_error where a finite value overflows.
template <scalar V>
std::vector<std::byte> convert_float(const StoredTensor& t, std::string_view where, std::string_view source,
                                     std::string_view param) {
  const std::size_t n = std::size_t(t.num_elements());
  std::vector<std::byte> out(n * sizeof(V));
  const std::byte* in = t.bytes.data();
  for (std::size_t i = 0; i < n; ++i) {
    V v;
    switch (t.dtype) {
      case Dtype::f64: {
        double d;
        std::memcpy(&d, in + i * sizeof(double), sizeof(double));
        v = V(d);
        if (std::isfinite(d) && !std::isfinite(v)) {
          std::ostringstream text;
          text << d << " at element " << i;
          fail<value_error>(where, source, text.str(),
                            "within float's range to convert F64 -> F32 for " + std::string(param));
        }
        break;
      }
      case Dtype::f32: {
        float f;
        std::memcpy(&f, in + i * sizeof(float), sizeof(float));
        v = V(f);
        break;
      }
      case Dtype::f16:
      case Dtype::bf16: {
        std::uint16_t h;
        std::memcpy(&h, in + i * 2, 2);
        v = V(t.dtype == Dtype::f16 ? f16_to_float(h) : bf16_to_float(h));
        break;
      }
      default:
        fail<shape_error>(where, source, "dtype " + std::string(dtype_name(t.dtype)),
                          "a float dtype (F16, BF16, F32, F64) to convert for " + std::string(param));
    }
    std::memcpy(out.data() + i * sizeof(V), &v, sizeof(V));
  }
  return out;
}

}  // namespace detail

// How to_matrix treats a tensor of another dtype than the matrix's.
struct MatrixOptions {
  // F16, BF16, F32 and F64 converted to the matrix's scalar (as LoadOptions::convert_dtype does)
  // instead of being a shape_error.
  bool convert_dtype = false;
};

// A stored tensor of shape [rows, cols] (or [n], read as [1, n]) as a matrix: of the same dtype,
// or, with options.convert_dtype, of any float dtype converted. A shape_error otherwise: no
// silent conversion.
template <scalar S>
Matrix<S> to_matrix(const StoredTensor& t, const MatrixOptions& options = {}) {
  constexpr std::string_view where = "to_matrix";
  const bool convert = options.convert_dtype && is_float_dtype(t.dtype) && t.dtype != dtype_of<S>;
  detail::require<shape_error>(t.dtype == dtype_of<S> || convert, where, t.name,
                               "dtype " + std::string(dtype_name(t.dtype)),
                               "dtype " + std::string(dtype_name(dtype_of<S>)) + ", the matrix's" +
                                   (is_float_dtype(t.dtype) ? " (MatrixOptions::convert_dtype converts)" : ""));
  detail::require<shape_error>(t.shape.size() == 1 || t.shape.size() == 2, where, t.name,
                               "shape " + detail::bracketed(t.shape), "a 2-D shape [rows, cols] or 1-D [n]");
  for (const std::uint64_t d : t.shape)
    detail::require<shape_error>(d <= std::uint64_t(std::numeric_limits<Index>::max()), where, t.name,
                                 "shape " + detail::bracketed(t.shape), "dimensions an Index can hold");
  const Index rows = t.shape.size() == 2 ? Index(t.shape[0]) : 1;
  const Index cols = Index(t.shape.back());
  Matrix<S> m(rows, cols);
  if (m.size() == 0) return m;
  if (convert) {
    const std::vector<std::byte> converted = detail::convert_float<S>(t, where, t.name, "the matrix");
    std::memcpy(m.data(), converted.data(), converted.size());
  } else {
    std::memcpy(m.data(), t.bytes.data(), t.bytes.size());
  }
  return m;
}

// ---- parameters of a model ---------------------------------------------------------------

// Writes every parameter of `model` (anything with for_each_parameter), named as
// for_each_parameter names it, shaped [rows, cols], in the model's scalar type (F32 or F64).
template <class Model>
  requires detail::has_scalar<Model> && detail::has_parameters<Model>
void save(const std::filesystem::path& path, Model& model, const Metadata& metadata = {}) {
  std::vector<TensorView> views;  // views into the model: it is not copied
  model.for_each_parameter([&](std::string_view name, auto value, auto) {
    views.emplace_back(std::string(name), value);
  });
  detail::write_file(path, views, metadata, detail::call_site("save", path));
}

// How load matches a file to a model. The defaults are strict: every parameter reads a tensor
// of its own name, dtype and shape, and every tensor is read.
struct LoadOptions {
  // Our parameter name -> the name of its tensor in the file, for checkpoints named otherwise
  // (identity when empty). Return "" to leave a parameter as it is.
  std::function<std::string(std::string_view)> name_map{};
  // A 1-D tensor [n] loads into a [1, n] parameter (PyTorch stores a bias as [n]).
  bool vector_as_row = false;
  // A tensor of another float dtype (F16, BF16, F32, F64) is converted to the parameter's instead
  // of rejected: exactly but for F64 -> F32, which rounds to nearest, and a finite value beyond
  // float's range is a value_error.
  bool convert_dtype = false;
  // A parameter whose tensor the file lacks keeps its value instead of being an error.
  bool allow_missing = false;
  // A tensor no parameter reads is ignored instead of being an error.
  bool allow_unexpected = false;
};

// What load did.
struct LoadReport {
  Metadata metadata;                 // the file's
  std::vector<std::string> loaded;   // parameters written, in visit order
  std::vector<std::string> kept;     // parameters left as they were (name_map gave "", or allow_missing)
  std::vector<std::string> ignored;  // tensors no parameter read (allow_unexpected)
};

namespace detail {

// Row-major bytes into a matrix view of any strides. Cannot fail.
template <class View>
void copy_rows(View& value, const std::byte* src) noexcept {
  using V = typename View::Scalar;
  const std::size_t row_bytes = std::size_t(value.cols()) * sizeof(V);
  if (row_bytes == 0) return;
  for (Index r = 0; r < value.rows(); ++r) {
    const std::byte* row = src + std::size_t(r) * row_bytes;
    if (value.colStride() == 1) {
      std::memcpy(&value.coeffRef(r, 0), row, row_bytes);
    } else {
      for (Index c = 0; c < value.cols(); ++c)
        std::memcpy(&value.coeffRef(r, c), row + std::size_t(c) * sizeof(V), sizeof(V));
    }
  }
}

}  // namespace detail

// Loads every parameter of `model` from a safetensors file. All or nothing: the file is read
// and checked in full, and every tensor matched, checked and converted, before the first
// parameter is written. Writing goes through for_each_parameter, so caches of the weights
// (the experts' packed copies) are marked stale.
template <class Model>
  requires detail::has_scalar<Model> && detail::has_parameters<Model>
LoadReport load(const std::filesystem::path& path, Model& model, const LoadOptions& options = {}) {
  const std::string where = detail::call_site("load", path);
  const SafetensorsFile file = detail::read_file(path, where);

  std::unordered_map<std::string_view, std::size_t> by_name;
  for (std::size_t i = 0; i < file.tensors.size(); ++i) by_name.emplace(file.tensors[i].name, i);
  std::vector<std::string> read_by(file.tensors.size());  // which parameter reads each tensor

  struct Staged {
    std::string parameter;
    const StoredTensor* tensor = nullptr;  // none: the parameter is kept
    std::vector<std::byte> converted;      // the tensor in the parameter's dtype, if it differs
  };
  std::vector<Staged> staged;
  LoadReport report;
  report.metadata = file.metadata;

  // 1. Match and check every parameter, and convert what needs converting. Nothing is written.
  model.for_each_parameter([&](std::string_view name, auto value, auto) {
    using V = typename std::remove_cvref_t<decltype(value)>::Scalar;
    Staged& s = staged.emplace_back(Staged{std::string(name), nullptr, {}});
    const std::string source = options.name_map ? options.name_map(name) : std::string(name);
    const std::string param = "parameter '" + s.parameter + "'";
    if (source.empty()) {
      report.kept.push_back(s.parameter);
      return;
    }
    const auto found = by_name.find(source);
    if (found == by_name.end()) {
      if (!options.allow_missing)
        detail::fail<shape_error>(where, source, "absent", "a tensor for " + param +
                                  " (LoadOptions::allow_missing keeps such a parameter as it is)");
      report.kept.push_back(s.parameter);
      return;
    }
    std::string& reader = read_by[found->second];
    if (!reader.empty())  // two parameters of one name, or a name map that merges two
      detail::fail<config_error>(where, options.name_map ? "name_map" : "parameter names",
                                 detail::quoted(source) + " for '" + reader + "' and '" + s.parameter + "'",
                                 "a tensor of its own for each parameter");
    reader = s.parameter;

    const StoredTensor& t = file.tensors[found->second];
    const bool is_float = is_float_dtype(t.dtype);
    if (t.dtype != dtype_of<V> && !(options.convert_dtype && is_float))
      detail::fail<shape_error>(where, source, "dtype " + std::string(dtype_name(t.dtype)),
                                "dtype " + std::string(dtype_name(dtype_of<V>)) + ", as " + param +
                                    (is_float ? " (LoadOptions::convert_dtype converts F16, BF16, F32, F64)" : ""));
    const auto rows = std::uint64_t(value.rows()), cols = std::uint64_t(value.cols());
    const bool same_shape = t.shape == std::vector<std::uint64_t>{rows, cols};
    const bool as_row = t.shape.size() == 1 && rows == 1 && t.shape[0] == cols;
    if (!same_shape && !(as_row && options.vector_as_row))
      detail::fail<shape_error>(where, source, "shape " + detail::bracketed(t.shape),
                                "shape " + detail::bracketed(std::array{rows, cols}) + ", as " + param +
                                    (as_row ? " (LoadOptions::vector_as_row reads [n] as [1, n])" : ""));
    if (t.dtype != dtype_of<V>) s.converted = detail::convert_float<V>(t, where, source, param);
    s.tensor = &t;
    report.loaded.push_back(s.parameter);
  });
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    if (!read_by[i].empty()) continue;
    const StoredTensor& t = file.tensors[i];
    if (!options.allow_unexpected)
      detail::fail<shape_error>(where, t.name,
                                "a tensor of shape " + detail::bracketed(t.shape) + " and dtype " +
                                    std::string(dtype_name(t.dtype)),
                                "a tensor some parameter reads (LoadOptions::allow_unexpected ignores "
                                "the others)");
    report.ignored.push_back(t.name);
  }

  // 2. Write: only copies from here on, so nothing can fail half-way.
  std::size_t next = 0;
  model.for_each_parameter([&](std::string_view name, auto value, auto) {
    using V = typename std::remove_cvref_t<decltype(value)>::Scalar;
    MOE_ASSERT(next < staged.size() && staged[next].parameter == name);
    (void)name;
    const Staged& s = staged[next++];
    if (s.tensor)
      detail::copy_rows(value, s.tensor->dtype == dtype_of<V> ? s.tensor->bytes.data() : s.converted.data());
  });
  return report;
}

}  // namespace moe
