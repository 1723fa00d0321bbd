#pragma once
// The contracts of the four pipeline stages and of experts (docs/architecture.md and the policy
// pages). A policy that misses a requirement is reported by the diagnose_* functions: one
// static_assert naming what to add, instead of a page of template noise (Router and MoELayer fall
// back to them).
#include <concepts>
#include <span>
#include <string_view>
#include <utility>

#include "moe/core/tensor.hpp"
#include "moe/routing.hpp"

namespace moe {

// What a selector reads: the logits, the gate's scores (combine weights come from these) and
// the values it ranks by (the scores themselves unless the gate ranks differently).
template <class S>
struct SelectorInput {
  MatrixIn<S> logits;
  MatrixIn<S> scores;
  MatrixIn<S> rank;
  const TokenInputs<S>& tokens;
};

// A scorer that puts Gaussian noise on its logits (docs/scorers.md, Noise on the logits) shows
// the losses what they were made of: logits = clean + stddev * normal, entry by entry.
template <class S>
struct LogitNoise {
  MatrixIn<S> clean;   // [T, E] the logits before the noise
  MatrixIn<S> stddev;  // [T, E], or [1, 1]: one standard deviation for every entry
  S stddev_at(Index t, Index e) const { return stddev.size() == 1 ? stddev(0, 0) : stddev(t, e); }
};

// Where a loss adds its gradient with respect to the clean logits and to the noise's standard
// deviation (its optional `backward(in, dlogits, dscores, LogitNoiseGradient<S>&)`); the scorer
// takes both back through its own parameters.
template <class S>
struct LogitNoiseGradient {
  MatrixOut<S> clean;   // [T, E]
  MatrixOut<S> stddev;  // [T, E], or no entries when the deviation is not trained
};

// What a loss term reads.
template <class S>
struct LossInput {
  MatrixIn<S> logits;
  MatrixIn<S> scores;  // in forward, no rows when no loss reads the matrix (reads_score_matrix)
  const SparseRouting<S>& routing;
  const TokenInputs<S>& tokens;
  // Per expert, the sum of the scores over the real tokens, when the router has it from its
  // gating loop (empty otherwise: a loss then sums the scores itself).
  std::span<const S> score_sums{};
  // The same over every row, padding included, when a loss asks for it with
  // `bool reads_padding_scores() const` (Padding::fairseq); empty otherwise.
  std::span<const S> score_sums_all{};
  // The scorer's noise when this forward put noise on the logits (`logits` are then the noisy
  // ones), null otherwise.
  const LogitNoise<S>* noise = nullptr;
};

namespace detail {
// Stand-in for an optimizer's visitor: (name, parameter, its gradient).
template <class S>
struct parameter_probe {
  void operator()(std::string_view, MatrixOut<S>, MatrixOut<S>) const {}
};

template <class P>
concept has_scalar = requires { typename P::scalar_type; } && scalar<typename P::scalar_type>;

template <class P, class S = typename P::scalar_type>
concept has_parameters = requires(P& p) { p.for_each_parameter(parameter_probe<S>{}); };
}  // namespace detail

template <class P>
concept scorer = detail::has_scalar<P> && detail::has_parameters<P> &&
    requires(P& p, const P& cp, MatrixIn<typename P::scalar_type> in,
             MatrixOut<typename P::scalar_type> out, const TokenInputs<typename P::scalar_type>& tok) {
      { cp.input_dim() } -> std::convertible_to<Index>;
      { cp.num_experts() } -> std::convertible_to<Index>;
      p.forward(in, tok, out);
      p.backward(in, tok, in, out);
    };

// The columns of a scorer's logits: one per expert, unless the scorer says otherwise with
// `Index logit_columns() const` (NormalizedSlotsScorer: one per slot, E p).
template <class P>
Index logit_columns(const P& p) {
  if constexpr (requires { { p.logit_columns() } -> std::convertible_to<Index>; }) return p.logit_columns();
  else return p.num_experts();
}

// Whether a policy is causal (docs/architecture.md, Causality): in evaluation mode, a token's
// routing and output depend on no later token of its group. A policy declares it with
// `bool causal() const`; one that does not is taken as not causal, the safe answer for a decoder.
template <class P>
constexpr bool is_causal(const P& p) {
  if constexpr (requires { { p.causal() } -> std::convertible_to<bool>; }) return p.causal();
  else return false;
}

template <class P>
concept gate = detail::has_scalar<P> &&
    requires(P& p, MatrixIn<typename P::scalar_type> in, MatrixOut<typename P::scalar_type> out) {
      p.forward(in, out);
      p.backward(in, in, in, out);
    };

// A selector's backward takes the gradient of what its routing carries: per slot weight for a
// SparseRouting (dslot_weight), the two dense matrices for a SoftRouting (ddispatch [S, T] and
// dcombine [T, S]). Either way it adds into dscores and dlogits.
template <class P>
concept selector = detail::has_scalar<P> &&
    requires(P& p, const SelectorInput<typename P::scalar_type>& in, typename P::routing_type& r) {
      p.forward(in, r);
    } &&
    (requires(P& p, const SelectorInput<typename P::scalar_type>& in, const typename P::routing_type& r,
              std::span<const typename P::scalar_type> dw, MatrixOut<typename P::scalar_type> out) {
      requires !is_soft_routing<typename P::routing_type>;
      p.backward(in, r, dw, out, out);
    } ||
     requires(P& p, const SelectorInput<typename P::scalar_type>& in, const typename P::routing_type& r,
              MatrixIn<typename P::scalar_type> d, MatrixOut<typename P::scalar_type> out) {
      requires is_soft_routing<typename P::routing_type>;
      p.backward(in, r, d, d, out, out);
    });

// Optional: a selector whose forward splits into three stages, so that the router can run the
// per-token work inside its blocked gating loop, on a block of scores that never leaves cache:
// - prepare(logits, tokens): validate and size the scratch from the shapes and the token mask;
// - select_rows(block, begin): the per-token work of one block of rows, scratch only; `block`
//   holds the rows [begin, begin + block.logits.rows()) of logits, scores, rank and tokens;
// - finish(logits, tokens, routing): writes the routing. It must not need the scores: the router
//   may not keep them (they are recomputed for backward).
// A staged selector that needs blocks of a multiple of n rows (say, to write whole runs of a
// transposed output) says `static constexpr Index min_block_rows = n;`.
template <class P>
concept staged_selector = selector<P> &&
    requires(P& p, const SelectorInput<typename P::scalar_type>& in, typename P::routing_type& r,
             Index i) {
      p.prepare(in.logits, in.tokens);
      p.select_rows(in, i);
      p.finish(in.logits, in.tokens, r);
    };

// Optional: a loss term whose forward reads the scores only through LossInput::score_sums says
// `static constexpr bool reads_score_matrix = false;`. When every loss says so and the selector
// is staged, the router does not write the [T, E] scores in forward at all (LossInput::scores is
// then empty): it recomputes them from the logits when backward or scores() asks.
template <class P>
concept reads_score_matrix = !requires { requires !P::reads_score_matrix; };

template <class P>
concept loss_term = detail::has_scalar<P> &&
    requires(const P& p, const LossInput<typename P::scalar_type>& in,
             MatrixOut<typename P::scalar_type> out) {
      { p.forward(in) } -> std::convertible_to<typename P::scalar_type>;
      { p.coefficient() } -> std::convertible_to<typename P::scalar_type>;
      p.backward(in, out, out);
    };

template <class P>
concept experts = detail::has_scalar<P> && detail::has_parameters<P> &&
    requires(P& p, const P& cp, MatrixIn<typename P::scalar_type> in,
             MatrixOut<typename P::scalar_type> out, std::span<const Index> offsets) {
      { cp.num_experts() } -> std::convertible_to<Index>;
      { cp.input_dim() } -> std::convertible_to<Index>;
      { cp.output_dim() } -> std::convertible_to<Index>;
      p.forward(in, offsets, out);
      p.backward(in, in, out);
    };

// ---- diagnosis: the first missing requirement, in words -----------------------------------

namespace detail {
template <class P>
consteval bool diagnose_scalar() {
  static_assert(requires { typename P::scalar_type; },
                "moe policy: add `using scalar_type = float;` (or double) to the policy");
  if constexpr (requires { typename P::scalar_type; })
    static_assert(scalar<typename P::scalar_type>,
                  "moe policy: `scalar_type` must be float or double");
  return has_scalar<P>;
}

template <class P>
consteval bool diagnose_parameters() {
  static_assert(has_parameters<P>,
                "moe policy: add `template <class F> void for_each_parameter(F&& visit)` calling "
                "visit(name, parameter, gradient) for each parameter (an empty body if none)");
  return true;
}
}  // namespace detail

template <class P>
consteval bool diagnose_scorer() {
  if constexpr (detail::diagnose_scalar<P>()) {
    using S = typename P::scalar_type;
    static_assert(requires(const P& p) { { p.input_dim() } -> std::convertible_to<Index>; },
                  "moe::scorer: add `Index input_dim() const`");
    static_assert(requires(const P& p) { { p.num_experts() } -> std::convertible_to<Index>; },
                  "moe::scorer: add `Index num_experts() const`");
    static_assert(requires(P& p, MatrixIn<S> x, const TokenInputs<S>& tok, MatrixOut<S> l) {
                    p.forward(x, tok, l);
                  },
                  "moe::scorer: add `void forward(MatrixIn<S> x, const TokenInputs<S>&, "
                  "MatrixOut<S> logits)`");
    static_assert(requires(P& p, MatrixIn<S> x, const TokenInputs<S>& tok, MatrixOut<S> dx) {
                    p.backward(x, tok, x, dx);
                  },
                  "moe::scorer: add `void backward(MatrixIn<S> x, const TokenInputs<S>&, "
                  "MatrixIn<S> dlogits, MatrixOut<S> dx)`");
    detail::diagnose_parameters<P>();
  }
  return scorer<P>;
}

template <class P>
consteval bool diagnose_gate() {
  if constexpr (detail::diagnose_scalar<P>()) {
    using S = typename P::scalar_type;
    static_assert(requires(P& p, MatrixIn<S> l, MatrixOut<S> s) { p.forward(l, s); },
                  "moe::gate: add `void forward(MatrixIn<S> logits, MatrixOut<S> scores)`");
    static_assert(requires(P& p, MatrixIn<S> in, MatrixOut<S> dl) { p.backward(in, in, in, dl); },
                  "moe::gate: add `void backward(MatrixIn<S> logits, MatrixIn<S> scores, "
                  "MatrixIn<S> dscores, MatrixOut<S> dlogits)` (adds into dlogits)");
  }
  return gate<P>;
}

template <class P>
consteval bool diagnose_selector() {
  if constexpr (detail::diagnose_scalar<P>()) {
    using S = typename P::scalar_type;
    static_assert(requires { typename P::routing_type; },
                  "moe::selector: add `using routing_type = SparseRouting<S>;`");
    if constexpr (requires { typename P::routing_type; }) {
      using R = typename P::routing_type;
      static_assert(requires(P& p, const SelectorInput<S>& in, R& r) { p.forward(in, r); },
                    "moe::selector: add `void forward(const SelectorInput<S>&, routing_type&)`");
      if constexpr (is_soft_routing<R>)
        static_assert(requires(P& p, const SelectorInput<S>& in, const R& r, MatrixIn<S> dd,
                               MatrixOut<S> d) { p.backward(in, r, dd, dd, d, d); },
                      "moe::selector: add `void backward(const SelectorInput<S>&, const "
                      "routing_type&, MatrixIn<S> ddispatch, MatrixIn<S> dcombine, MatrixOut<S> "
                      "dscores, MatrixOut<S> dlogits)` (adds into dscores and dlogits)");
      else
        static_assert(requires(P& p, const SelectorInput<S>& in, const R& r, std::span<const S> dw,
                               MatrixOut<S> d) { p.backward(in, r, dw, d, d); },
                      "moe::selector: add `void backward(const SelectorInput<S>&, const "
                      "routing_type&, std::span<const S> dslot_weight, MatrixOut<S> dscores, "
                      "MatrixOut<S> dlogits)` (adds into dscores and dlogits)");
    }
  }
  return selector<P>;
}

template <class P>
consteval bool diagnose_loss_term() {
  if constexpr (detail::diagnose_scalar<P>()) {
    using S = typename P::scalar_type;
    static_assert(requires(const P& p, const LossInput<S>& in) {
                    { p.forward(in) } -> std::convertible_to<S>;
                  },
                  "moe::loss_term: add `S forward(const LossInput<S>&) const` returning the "
                  "loss value");
    static_assert(requires(const P& p) { { p.coefficient() } -> std::convertible_to<S>; },
                  "moe::loss_term: add `S coefficient() const` (the weight used in backward)");
    static_assert(requires(const P& p, const LossInput<S>& in, MatrixOut<S> d) {
                    p.backward(in, d, d);
                  },
                  "moe::loss_term: add `void backward(const LossInput<S>&, MatrixOut<S> "
                  "dlogits, MatrixOut<S> dscores) const` (adds coefficient * gradient)");
  }
  return loss_term<P>;
}

template <class P>
consteval bool diagnose_experts() {
  if constexpr (detail::diagnose_scalar<P>()) {
    using S = typename P::scalar_type;
    static_assert(requires(const P& p) { { p.num_experts() } -> std::convertible_to<Index>; },
                  "moe::experts: add `Index num_experts() const`");
    static_assert(requires(const P& p) { { p.input_dim() } -> std::convertible_to<Index>; },
                  "moe::experts: add `Index input_dim() const`");
    static_assert(requires(const P& p) { { p.output_dim() } -> std::convertible_to<Index>; },
                  "moe::experts: add `Index output_dim() const`");
    static_assert(requires(P& p, MatrixIn<S> x, std::span<const Index> off, MatrixOut<S> y) {
                    p.forward(x, off, y);
                  },
                  "moe::experts: add `void forward(MatrixIn<S> blocks, std::span<const Index> "
                  "expert_offsets, MatrixOut<S> out_blocks)`");
    static_assert(requires(P& p, MatrixIn<S> x, MatrixOut<S> dx) { p.backward(x, x, dx); },
                  "moe::experts: add `void backward(MatrixIn<S> blocks, MatrixIn<S> dout_blocks, "
                  "MatrixOut<S> dblocks)` (accumulates parameter gradients)");
    detail::diagnose_parameters<P>();
  }
  return experts<P>;
}

}  // namespace moe
