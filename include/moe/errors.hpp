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

// Shapes that do not fit together (width mismatch, mask length, buffer sizes).
class shape_error final : public std::invalid_argument, public error {
public:
  using std::invalid_argument::invalid_argument;
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

// Hyper-parameters outside their domain (k = 0, k > E, capacity factor <= 0, ...).
class config_error final : public std::invalid_argument, public error {
public:
  using std::invalid_argument::invalid_argument;
  const char* what() const noexcept override { return std::invalid_argument::what(); }
};

// Data values the math cannot take (NaN or Inf logits).
class value_error final : public std::domain_error, public error {
public:
  using std::domain_error::domain_error;
  const char* what() const noexcept override { return std::domain_error::what(); }
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
