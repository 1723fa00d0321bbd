#pragma once
// Checks shared by every public entry point, run before anything is written (docs/architecture.md,
// Errors).
#include <cmath>
#include <span>
#include <sstream>
#include <string>
#include <string_view>

#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"
#include "moe/kernels/finite.hpp"

namespace moe::detail {

// The shapes a matrix argument must have.
template <class M>
void check_shape(std::string_view where, std::string_view name, const M& m, Index rows, Index cols) {
  if (m.rows() == rows && m.cols() == cols) return;
  std::ostringstream value, rule;
  value << "[" << m.rows() << " x " << m.cols() << "]";
  rule << "shape [" << rows << " x " << cols << "]";
  fail<shape_error>(where, name, value.str(), rule.str());
}

// Optional per-token inputs: each either absent or one entry per token (per token and expert,
// per token and input feature). `dim` < 0: the caller reads no jitter (no scorer runs).
template <class S>
void check_tokens(std::string_view where, const TokenInputs<S>& in, Index tokens, Index experts, Index dim = -1) {
  const auto check = [&](std::string_view name, std::size_t size, Index want) {
    if (size != 0 && Index(size) != want)
      fail<shape_error>(where, name, size, "length 0 (absent) or " + std::to_string(want));
  };
  check("tokens.valid", in.valid.size(), tokens);
  check("tokens.segment", in.segment.size(), tokens);
  check("tokens.normal", in.normal.size(), tokens * experts);
  check("tokens.gumbel", in.gumbel.size(), tokens * experts);
  check("tokens.uniform", in.uniform.size(), tokens * experts);
  check("tokens.second_uniform", in.second_uniform.size(), tokens);
  if (dim >= 0) check("tokens.jitter", in.jitter.size(), tokens * dim);
  check("tokens.importance", in.importance.size(), tokens);
  for (std::size_t t = 0; t < in.importance.size(); ++t)
    if (!(std::isfinite(in.importance[t]) && in.importance[t] >= 0)) {  // the message only on failure
      std::ostringstream value;
      value << in.importance[t] << " at token " << t;
      fail<value_error>(where, "tokens.importance", value.str(), "every entry finite and >= 0");
    }
}

// Segment ids where each segment must be one contiguous run of tokens (depth routing decides per
// segment): every id >= 0 and never smaller than the one before.
inline void check_segments(std::string_view where, std::span<const std::int32_t> segment) {
  bool ok = segment.empty() || segment[0] >= 0;
  for (std::size_t t = 1; t < segment.size(); ++t) ok &= segment[t] >= segment[t - 1];  // no branch: vectorised
  if (ok) return;
  for (std::size_t t = 0; t < segment.size(); ++t)
    if (segment[t] < 0 || (t > 0 && segment[t] < segment[t - 1])) {
      std::ostringstream value;
      value << segment[t] << " at token " << t;
      if (t > 0) value << " after " << segment[t - 1];
      fail<value_error>(where, "tokens.segment", value.str(),
                        "ids >= 0 and non-decreasing: each segment one contiguous run of tokens");
    }
}

// NaN or Inf in a matrix the routing depends on; m may be the block of rows starting at first_row.
template <class S>
void check_finite(std::string_view where, std::string_view name, MatrixIn<S> m, Index first_row = 0) {
  if (kernels::all_finite<S>(m)) return;
  for (Index t = 0; t < m.rows(); ++t)
    for (Index e = 0; e < m.cols(); ++e)
      if (!std::isfinite(m(t, e))) {
        std::ostringstream value;
        value << m(t, e) << " at (" << first_row + t << ", " << e << ")";
        fail<value_error>(where, name, value.str(), "every entry finite (no NaN or Inf)");
      }
}

}  // namespace moe::detail
