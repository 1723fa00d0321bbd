#pragma once
// The error hierarchy of docs/architecture.md (Errors). Every public entry point validates its
// arguments before writing anything, and throws one of these with a message naming argument, value
// and rule.
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace moe {

// Common base so callers can catch every library error at once.
class error {
public:
  virtual ~error() = default;
  virtual const char* what() const noexcept = 0;
};

namespace detail {
// A library error on top of the standard exception class that says what kind of mistake it is.
template <class Standard>
class error_on : public Standard, public error {
public:
  using Standard::Standard;
  const char* what() const noexcept override { return Standard::what(); }
};
}  // namespace detail

// Shapes that do not fit together (width mismatch, mask length, buffer sizes), and a valid
// checkpoint that does not fit the model it is loaded into (a tensor's shape or dtype, a tensor
// missing or unexpected).
class shape_error final : public detail::error_on<std::invalid_argument> {
public:
  using detail::error_on<std::invalid_argument>::error_on;
};

// Hyper-parameters outside their domain (k = 0, k > E, capacity factor <= 0, ...).
class config_error final : public detail::error_on<std::invalid_argument> {
public:
  using detail::error_on<std::invalid_argument>::error_on;
};

// Data values the math cannot take (NaN or Inf logits).
class value_error final : public detail::error_on<std::domain_error> {
public:
  using detail::error_on<std::domain_error>::error_on;
};

// A file that cannot be opened, read, written or renamed into place (the operating system's
// reason is in the message). Not the caller's mistake in the way the classes above are, so a
// runtime_error: a retry, another disk or another path may succeed.
class io_error final : public detail::error_on<std::runtime_error> {
public:
  using detail::error_on<std::runtime_error>::error_on;
};

// Bytes that are not a valid file of the format read (moe/io/safetensors.hpp): truncated, an
// absurd header size, malformed JSON, or a header whose offsets do not describe its data. The
// message names the file, the tensor or header byte, and the rule broken.
class format_error final : public detail::error_on<std::runtime_error> {
public:
  using detail::error_on<std::runtime_error>::error_on;
};

namespace detail {
// "moe: <where>: argument '<name>' = <value> violates: <rule>"
template <class Error, class Value>
[[noreturn]] void fail(std::string_view where, std::string_view name, const Value& value,
                       std::string_view rule) {
  std::ostringstream os;
  os << "moe: " << where << ": argument '" << name << "' = " << value << " violates: " << rule;
  throw Error(os.str());
}

template <class Error, class Value>
void require(bool ok, std::string_view where, std::string_view name, const Value& value,
             std::string_view rule) {
  if (!ok) fail<Error>(where, name, value, rule);
}
}  // namespace detail
}  // namespace moe
