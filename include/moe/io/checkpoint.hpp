#pragma once
// A checkpoint of one or many safetensors files (docs/saving.md, Reading part of a checkpoint),
// as Hugging Face stores a large model: shards `model-00001-of-00004.safetensors`, ... beside an
// index `model.safetensors.index.json` whose "weight_map" says which shard holds each tensor.
// A Checkpoint reads the index (or the headers) once, and then only the tensors asked for: each
// shard's header is read and checked in full the first time one of its tensors is wanted, and
// each tensor's bytes after a seek to them. The headers are cached inside a const Checkpoint: one
// object is not to be used from several threads at once (open one per thread).
//
// Errors (errors.hpp), each naming the checkpoint and the tensor or shard:
// - io_error: the path, an index's shard ("missing shard") or a shard cannot be opened or read;
// - format_error: an index that is not JSON or has no "weight_map" of strings, a shard name that
//   leaves the directory, a shard whose header does not hold a tensor its index sends there, a
//   tensor in two shards of a directory without an index; and every format_error of the files;
// - shape_error: a tensor the checkpoint does not hold ("tensor absent").
#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "moe/errors.hpp"
#include "moe/io/json.hpp"
#include "moe/io/safetensors.hpp"

namespace moe {

namespace detail {

// A whole small text file (an index, a config.json), or an io_error.
inline std::string read_text_file(const std::filesystem::path& path, std::string_view where) {
  OpenFile f = open_for_reading(path, where);
  std::string text(std::size_t(f.size), '\0');
  read_exactly(f.in, path, where, text.data(), f.size, "the file");
  return text;
}

// A JSON file of the full dialect, its root an object, or a format_error naming the byte.
inline JsonValue read_json_object(const std::string& text, std::string_view where, std::string_view subject) {
  JsonReader json(text, where, 0, JsonDialect::full, subject);
  JsonValue root = json.parse_document();
  if (root.kind != JsonValue::Kind::object) json.fail_at(root.offset, "a JSON object");
  return root;
}

}  // namespace detail

class Checkpoint {
public:
  // The file name Hugging Face gives the index of a sharded checkpoint.
  static constexpr std::string_view index_name = "model.safetensors.index.json";

  // `path` is one of:
  // - a safetensors file: a checkpoint of one shard;
  // - an index (a .json file with a "weight_map"): its shards are named relative to its directory;
  // - a directory: its model.safetensors.index.json if there is one, otherwise every *.safetensors
  //   file in it (their headers say which holds what; a tensor in two of them is an error).
  explicit Checkpoint(const std::filesystem::path& path) : where_(detail::call_site("Checkpoint", path)) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      directory_ = path;
      if (fs::is_regular_file(path / index_name, ec)) {
        read_index(path / index_name);
      } else {
        std::vector<fs::path> files;
        for (const fs::directory_entry& e : fs::directory_iterator(path, ec))
          if (e.is_regular_file() && e.path().extension() == ".safetensors") files.push_back(e.path());
        if (ec)
          detail::fail<io_error>(where_, "path", detail::quoted(path.string()),
                                 "a directory that can be listed (" + ec.message() + ")");
        detail::require<io_error>(!files.empty(), where_, "path", detail::quoted(path.string()),
                                  "a directory holding " + std::string(index_name) + " or *.safetensors files");
        std::sort(files.begin(), files.end());
        for (const fs::path& f : files) add_shard_by_header(f);
      }
    } else if (path.extension() == ".json") {
      directory_ = path.parent_path();
      read_index(path);
    } else {
      directory_ = path.parent_path();
      add_shard_by_header(path);
    }
  }

  // The directory of the checkpoint: where config.json is looked for.
  const std::filesystem::path& directory() const { return directory_; }
  std::filesystem::path config_path() const { return directory_ / "config.json"; }
  // The shard files, in the index's order of first mention (or by name).
  const std::vector<std::filesystem::path>& shards() const { return shards_; }

  bool contains(std::string_view name) const { return shard_of_.count(std::string(name)) != 0; }
  // Every tensor name, sorted.
  std::vector<std::string> tensor_names() const {
    std::vector<std::string> names;
    names.reserve(shard_of_.size());
    for (const auto& [name, shard] : shard_of_) names.push_back(name);
    std::sort(names.begin(), names.end());
    return names;
  }

  // A tensor's dtype, shape and offsets (its shard's header is read if it was not yet), or a
  // shape_error if the checkpoint does not hold it.
  const TensorInfo& info(std::string_view name) const {
    const std::size_t shard = shard_for(name, where_);
    const TensorInfo* t = header(shard).find(name);
    MOE_ASSERT(t != nullptr);  // header() checks every tensor the index sends to the shard
    return *t;
  }

  // The named tensors, in the order asked, each read after a seek into its shard. All or
  // nothing: every name is checked before the first byte of data is read.
  std::vector<StoredTensor> read(std::span<const std::string> names) const {
    const std::string where = where_ + ".read";
    std::vector<std::size_t> shard(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      shard[i] = shard_for(names[i], where);
      (void)header(shard[i]);
    }
    std::vector<StoredTensor> out(names.size());
    for (std::size_t s = 0; s < shards_.size(); ++s) {
      std::unordered_set<std::string_view> wanted;
      for (std::size_t i = 0; i < names.size(); ++i)
        if (shard[i] == s) wanted.insert(names[i]);
      if (wanted.empty()) continue;
      const std::string shard_where = detail::call_site("Checkpoint.read", shards_[s]);
      detail::OpenFile f = detail::open_for_reading(shards_[s], shard_where);
      const SafetensorsHeader& h = header(s);
      detail::require<io_error>(f.size == h.file_size, shard_where, "path", detail::quoted(shards_[s].string()),
                                "a file of " + std::to_string(h.file_size) +
                                    " bytes, as when its header was read (was it changed?)");
      f.in.seekg(std::streamoff(h.data_start));
      SafetensorsHeader selected = h;
      SafetensorsFile file = detail::read_tensors(
          f.in, std::move(selected), [&](std::string_view n) { return wanted.count(n) != 0; }, shard_where);
      for (StoredTensor& t : file.tensors)
        for (std::size_t i = 0; i < names.size(); ++i)
          if (shard[i] == s && names[i] == t.name) out[i] = t;  // a name asked twice gets two copies
    }
    return out;
  }

  StoredTensor read(const std::string& name) const {
    std::vector<StoredTensor> one = read(std::span<const std::string>(&name, 1));
    return std::move(one.front());
  }

private:
  void read_index(const std::filesystem::path& index) {
    const std::string where = detail::call_site("Checkpoint", index);
    const std::string text = detail::read_text_file(index, where);
    const detail::JsonValue root = detail::read_json_object(text, where, "index");
    const detail::JsonValue* map = root.find("weight_map");
    if (!map || map->kind != detail::JsonValue::Kind::object)
      detail::fail<format_error>(where, "weight_map", map ? "not an object" : "absent",
                                 "an object mapping each tensor name to its shard's file name");
    std::unordered_map<std::string, std::size_t> shard_index;
    for (const detail::JsonMember& m : map->members) {
      if (m.value.kind != detail::JsonValue::Kind::string)
        detail::fail<format_error>(where, "weight_map." + m.key, "not a string", "a shard's file name");
      const std::filesystem::path relative(m.value.string);
      bool escapes = relative.empty() || relative.is_absolute() || relative.has_root_name();
      for (const auto& part : relative) escapes = escapes || part == "..";
      if (escapes)
        detail::fail<format_error>(where, "weight_map." + m.key, detail::quoted(m.value.string),
                                   "a file name inside the index's directory");
      auto [it, added] = shard_index.emplace(m.value.string, shards_.size());
      if (added) {
        const std::filesystem::path file = directory_ / relative;
        std::error_code ec;
        if (!std::filesystem::is_regular_file(file, ec))
          detail::fail<io_error>(where, "weight_map." + m.key, detail::quoted(file.string()),
                                 "an existing shard file (missing shard: the index names it, the directory "
                                 "does not hold it)");
        shards_.push_back(file);
        headers_.emplace_back();
        from_index_.push_back(true);
      }
      shard_of_.emplace(m.key, it->second);
    }
  }

  void add_shard_by_header(const std::filesystem::path& file) {
    SafetensorsHeader h = read_safetensors_header(file);
    const std::size_t s = shards_.size();
    for (const TensorInfo& t : h.tensors) {
      auto [it, added] = shard_of_.emplace(t.name, s);
      if (!added)
        detail::fail<format_error>(where_, t.name, "in " + shards_[it->second].filename().string() + " and " +
                                                       file.filename().string(),
                                   "each tensor in one shard only");
    }
    shards_.push_back(file);
    headers_.emplace_back(std::move(h));
    from_index_.push_back(false);
  }

  std::size_t shard_for(std::string_view name, std::string_view where) const {
    const auto it = shard_of_.find(std::string(name));
    if (it == shard_of_.end())
      detail::fail<shape_error>(where, name, "absent",
                                "a tensor the checkpoint holds (tensor absent from " +
                                    std::to_string(shards_.size()) + " shard(s))");
    return it->second;
  }

  // A shard's header, read and checked the first time; every tensor the index sends to the
  // shard must be in it.
  const SafetensorsHeader& header(std::size_t s) const {
    if (!headers_[s]) {
      SafetensorsHeader h = read_safetensors_header(shards_[s]);
      if (from_index_[s]) {
        std::unordered_set<std::string_view> held;
        for (const TensorInfo& t : h.tensors) held.insert(t.name);
        for (const auto& [name, shard] : shard_of_)
          if (shard == s && !held.count(name))
            detail::fail<format_error>(where_, name, "absent from " + shards_[s].filename().string(),
                                       "in the shard the index names for it");
      }
      headers_[s] = std::move(h);
    }
    return *headers_[s];
  }

  std::string where_;
  std::filesystem::path directory_;
  std::vector<std::filesystem::path> shards_;
  std::vector<bool> from_index_;
  std::unordered_map<std::string, std::size_t> shard_of_;
  mutable std::vector<std::optional<SafetensorsHeader>> headers_;
};

}  // namespace moe
