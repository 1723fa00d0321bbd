#pragma once
// The JSON of the files the library reads (docs/saving.md). A safetensors header needs only
// objects, arrays, strings with escapes and non-negative integers, and the strict dialect accepts
// nothing else; the full dialect (a Hugging Face config.json, an index of shards) adds negative
// and fractional numbers, true, false and null. Anything malformed is a format_error naming the
// byte where reading stopped. Files are untrusted, so the reader checks UTF-8, rejects duplicate
// keys and bounds its nesting depth instead of trusting the text.
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "moe/errors.hpp"

namespace moe::detail {

struct JsonMember;

// A parsed value with the byte where it starts, so a later check can still point at it.
struct JsonValue {
  // integer: a non-negative integer (`number` holds it too); number: any other number (full
  // dialect only).
  enum class Kind : std::uint8_t { string, integer, array, object, number, boolean, null };
  Kind kind = Kind::integer;
  std::size_t offset = 0;
  std::string string;
  std::uint64_t integer = 0;
  double number = 0;
  bool boolean = false;
  std::vector<JsonValue> items;      // array
  std::vector<JsonMember> members;   // object, in text order, keys unique

  const JsonValue* find(std::string_view key) const;
};

struct JsonMember {
  std::string key;
  JsonValue value;
};

inline const JsonValue* JsonValue::find(std::string_view key) const {
  for (const JsonMember& m : members)
    if (m.key == key) return &m.value;
  return nullptr;
}

// Length of the well-formed UTF-8 sequence starting at s[i] (1 to 4), or 0 if it is not one:
// no overlong forms, no surrogates, nothing above U+10FFFF.
inline std::size_t utf8_sequence(std::string_view s, std::size_t i) {
  const auto at = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = at(i);
  if (c < 0x80) return 1;
  std::size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;        // overlong
    if (c == 0xED) hi = 0x9F;        // surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;        // overlong
    if (c == 0xF4) hi = 0x8F;        // above U+10FFFF
  } else return 0;
  if (s.size() - i < n) return 0;
  if (at(i + 1) < lo || at(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k)
    if (at(i + k) < 0x80 || at(i + k) > 0xBF) return 0;
  return n;
}

// Offset of the first byte that is not well-formed UTF-8, or npos.
inline std::size_t utf8_error(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// A string as a JSON string literal: quotes, backslashes and control characters escaped, the
// rest (valid UTF-8, checked by the caller) as it is.
inline void append_json_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xF];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

enum class JsonDialect : std::uint8_t {
  safetensors_header,  // strings, non-negative integers, arrays, objects
  full,                // also negative and fractional numbers, true, false, null
};

// Reads one JSON document. `where` names the file for messages; `base` is the offset of the
// text inside the file, so positions are reported as file bytes (and header bytes).
class JsonReader {
public:
  // A safetensors header nests three deep (header, entry, shape), a config.json a few more.
  static constexpr int max_depth = 32;

  // `base`: the text's offset in its file; `subject`: what messages call the text ("header").
  JsonReader(std::string_view text, std::string_view where, std::size_t base,
             JsonDialect dialect = JsonDialect::safetensors_header, std::string_view subject = "header")
      : text_(text), where_(where), base_(base), dialect_(dialect), subject_(subject) {}

  // One value, then nothing but whitespace (writers pad the header with spaces).
  JsonValue parse_document() {
    skip_space();
    JsonValue v = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail_at(pos_, "only whitespace after the JSON value");
    return v;
  }

  // A byte position, as messages show it.
  std::string describe(std::size_t pos) const {
    std::ostringstream os;
    os << "byte " << base_ + pos;
    if (base_ != 0) os << " (" << subject_ << " byte " << pos << ")";
    if (pos >= text_.size()) {
      os << ": end of " << subject_;
    } else {
      const auto c = static_cast<unsigned char>(text_[pos]);
      if (c >= 0x20 && c < 0x7F) os << ": '" << char(c) << "'";
      else os << ": 0x" << std::hex << unsigned(c);
    }
    return os.str();
  }

  [[noreturn]] void fail_at(std::size_t pos, std::string_view rule) const {
    fail<format_error>(where_, subject_, describe(pos), rule);
  }

private:
  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }

  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r')) ++pos_;
  }

  void expect(char c, std::string_view rule) {
    if (peek() != c || at_end()) fail_at(pos_, rule);
    ++pos_;
  }

  JsonValue parse_value(int depth) {
    if (depth > max_depth) fail_at(pos_, "JSON nested at most 32 deep");
    JsonValue v;
    v.offset = pos_;
    if (at_end()) fail_at(pos_, "a JSON value (the header ends early)");
    const char c = peek();
    if (c == '{') {
      v.kind = JsonValue::Kind::object;
      parse_object(v, depth);
    } else if (c == '[') {
      v.kind = JsonValue::Kind::array;
      parse_array(v, depth);
    } else if (c == '"') {
      v.kind = JsonValue::Kind::string;
      v.string = parse_string();
    } else if (dialect_ == JsonDialect::full && (c == '-' || (c >= '0' && c <= '9'))) {
      parse_number(v);
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = JsonValue::Kind::integer;
      v.integer = parse_integer();
      v.number = double(v.integer);
    } else if (dialect_ == JsonDialect::full && (c == 't' || c == 'f' || c == 'n')) {
      const std::string_view word = c == 't' ? "true" : c == 'f' ? "false" : "null";
      if (text_.substr(pos_, word.size()) != word) fail_at(pos_, "true, false or null");
      pos_ += word.size();
      v.kind = c == 'n' ? JsonValue::Kind::null : JsonValue::Kind::boolean;
      v.boolean = c == 't';
    } else {
      fail_at(pos_, dialect_ == JsonDialect::full
                        ? "a JSON value"
                        : "a JSON string, integer, array or object (nothing else belongs in a "
                          "safetensors header)");
    }
    return v;
  }

  // The full dialect's numbers: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? by the grammar,
  // read by strtod; a non-negative integer below 2^64 is also kept exactly as `integer`.
  void parse_number(JsonValue& v) {
    const std::size_t start = pos_;
    const auto digits = [&] {
      const std::size_t from = pos_;
      while (!at_end() && peek() >= '0' && peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    const std::size_t int_start = pos_;
    const std::size_t n = digits();
    if (n == 0) fail_at(pos_, "a digit in a number");
    if (n > 1 && text_[int_start] == '0') fail_at(int_start, "a number without leading zeros");
    bool integral = true;
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (digits() == 0) fail_at(pos_, "a digit after the decimal point");
      integral = false;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (digits() == 0) fail_at(pos_, "a digit in the exponent");
      integral = false;
    }
    const std::string literal(text_.substr(start, pos_ - start));
    errno = 0;
    v.number = std::strtod(literal.c_str(), nullptr);
    if (errno == ERANGE && std::abs(v.number) > 1) fail_at(start, "a number within double's range");
    v.kind = JsonValue::Kind::number;
    if (integral && text_[start] != '-' && n <= 19) {  // below 10^19 < 2^64
      v.kind = JsonValue::Kind::integer;
      v.integer = std::strtoull(literal.c_str(), nullptr, 10);
    }
  }

  void parse_object(JsonValue& v, int depth) {
    ++pos_;  // '{'
    skip_space();
    if (peek() == '}' && !at_end()) {
      ++pos_;
      return;
    }
    std::unordered_set<std::string> keys;  // a header may hold many thousand tensors
    while (true) {
      skip_space();
      if (peek() != '"' || at_end()) fail_at(pos_, "a JSON string (an object key)");
      const std::size_t key_pos = pos_;
      std::string key = parse_string();
      if (!keys.insert(key).second)
        fail_at(key_pos, "unique keys in a JSON object (\"" + key + "\" is repeated)");
      skip_space();
      expect(':', "':' after an object key");
      skip_space();
      JsonValue value = parse_value(depth + 1);
      v.members.push_back({std::move(key), std::move(value)});
      skip_space();
      if (peek() == ',' && !at_end()) {
        ++pos_;
        continue;
      }
      expect('}', "',' or '}' in an object");
      return;
    }
  }

  void parse_array(JsonValue& v, int depth) {
    ++pos_;  // '['
    skip_space();
    if (peek() == ']' && !at_end()) {
      ++pos_;
      return;
    }
    while (true) {
      skip_space();
      v.items.push_back(parse_value(depth + 1));
      skip_space();
      if (peek() == ',' && !at_end()) {
        ++pos_;
        continue;
      }
      expect(']', "',' or ']' in an array");
      return;
    }
  }

  std::uint32_t parse_hex4() {
    std::uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = peek();
      std::uint32_t d;
      if (at_end()) fail_at(pos_, "4 hex digits after \\u");
      if (c >= '0' && c <= '9') d = std::uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') d = std::uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = std::uint32_t(c - 'A' + 10);
      else fail_at(pos_, "4 hex digits after \\u");
      cp = cp * 16 + d;
      ++pos_;
    }
    return cp;
  }

  std::string parse_string() {
    ++pos_;  // '"'
    std::string out;
    while (true) {
      if (at_end()) fail_at(pos_, "a closing '\"' (the string runs past the header)");
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail_at(pos_, "control characters in strings escaped (\\n, \\u001f, ...)");
      if (c == '\\') {
        const std::size_t escape_pos = pos_++;
        if (at_end()) fail_at(pos_, "an escape after '\\'");
        const char e = text_[pos_++];
        switch (e) {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          case 'u': {
            std::uint32_t cp = parse_hex4();
            if (cp >= 0xDC00 && cp <= 0xDFFF)
              fail_at(escape_pos, "a low surrogate (\\udc00-\\udfff) only after a high one");
            if (cp >= 0xD800 && cp <= 0xDBFF) {  // a pair encodes one code point above U+FFFF
              if (text_.substr(pos_, 2) != "\\u")
                fail_at(pos_, "a high surrogate followed by \\u and a low surrogate");
              pos_ += 2;
              const std::uint32_t low = parse_hex4();
              if (low < 0xDC00 || low > 0xDFFF)
                fail_at(pos_ - 6, "a high surrogate followed by a low surrogate (\\udc00-\\udfff)");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            append_utf8(out, cp);
            break;
          }
          default: fail_at(pos_ - 1, "one of the escapes \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX");
        }
        continue;
      }
      const std::size_t n = utf8_sequence(text_, pos_);
      if (n == 0) fail_at(pos_, "UTF-8 text");
      out.append(text_.substr(pos_, n));
      pos_ += n;
    }
  }

  std::uint64_t parse_integer() {
    if (peek() == '-') fail_at(pos_, "a non-negative integer (shapes and offsets are never negative)");
    const std::size_t start = pos_;
    std::uint64_t value = 0;
    constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
    while (!at_end() && peek() >= '0' && peek() <= '9') {
      const auto d = std::uint64_t(peek() - '0');
      if (value > (max - d) / 10) fail_at(start, "an integer below 2^64");
      value = value * 10 + d;
      ++pos_;
    }
    if (pos_ - start > 1 && text_[start] == '0') fail_at(start, "an integer without leading zeros");
    if (peek() == '.' || peek() == 'e' || peek() == 'E')
      fail_at(pos_, "an integer (no fraction or exponent)");
    return value;
  }

  std::string_view text_;
  std::string_view where_;
  std::size_t base_;
  JsonDialect dialect_;
  std::string subject_;
  std::size_t pos_ = 0;
};

}  // namespace moe::detail
