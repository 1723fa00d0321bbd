#pragma once
// Capacity of token-choice routers (docs/selectors.md, Capacity): how many slots each expert has,
// which (token, choice) pairs win them when an expert overflows, and in which order the winners
// sit in the expert's buffer. Every reference rule is one setting of this struct:
//   GShard/vmoe:         {.factor = cf, .times_k = true, .multiple_of = 4 (vmoe)}, rank_major
//   (fairseq's 2*ceil(T/E) rounds per expert first: {.factor = 1} matches it when E divides T)
//   DeepSpeed top-k:     {.factor = cf, .times_k = true, .minimum = 8}, by_masked_logit, token slots
//   flaxformer:          {.factor = cf, .times_k = false, .rounding = round, .minimum = 4}
//   Megatron:            {.factor = cf, .times_k = true}, by_weight or token_major, pad optional
//   DeepSpeed top-1:     {.factor = cf, .minimum = 8}, random (RTS), token slots
#include <cmath>
#include <optional>
#include <string>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"
#include "moe/errors.hpp"

namespace moe {

enum class Rounding { ceil, round, floor };

// Which pairs win the slots of an overflowing expert (docs/selectors.md, Capacity).
enum class OverflowOrder {
  rank_major,      // all first choices (token order), then all second choices, ... (GShard)
  token_major,     // token order over all its choices (DeepSpeed/Megatron 'position')
  by_weight,       // highest pre-drop combine weight first, ties to the lower token (Megatron 'probs')
  batch_priority,  // rank-major with tokens by descending top score, stable (BPR, V-MoE)
  by_score,        // highest gate score first, ties to the lower token (DeepSpeed top-k 'probs'
                   // in releases that rank the softmax probabilities)
  by_masked_logit, // per expert, the top C of a column holding the logit of each token that chose
                   // the expert and 0 for each routed token that did not (DeepSpeed top-k
                   // 'probs' as its releases that rank logits do it): a choice with a negative
                   // logit loses to the tokens that did not choose the expert
  random,          // highest U(0, 1) draw first, per (token, expert): random token selection
                   // (DeepSpeed top1gating's use_rts); first come (rank_major) when the
                   // selector's draws are off
  rank_major_by_score,  // all first choices, then all second choices, ..., each rank by
                        // decreasing gate score, ties to the lower token (XMoE threshold gating's
                        // per-expert importance K - rank + score)
};

// Position of a kept token inside its expert's buffer (the output y does not depend on it).
enum class SlotOrder {
  token,     // ascending token index (DeepSpeed, Megatron)
  priority,  // the order in which the slots were won (GShard, flaxformer, vmoe)
};

struct Capacity {
  std::optional<double> factor{};  // absent: dropless, every choice is kept
  bool times_k = true;             // C counts k choices per token (all but flaxformer)
  Rounding rounding = Rounding::ceil;
  Index minimum = 0;               // DeepSpeed min_capacity, flaxformer min_expert_capacity
  Index multiple_of = 1;           // vmoe capacity_multiple_of (rounded up)
  bool pad = false;                // every expert gets exactly C slots; empty ones carry weight 0
  OverflowOrder overflow = OverflowOrder::rank_major;
  SlotOrder slot_order = SlotOrder::token;

  bool limited() const { return factor.has_value(); }

  // Whether the pairs that keep a slot are settled without looking at later tokens, so that a
  // token's routing depends on no later token (docs/selectors.md, Capacity): dropless,
  // token-major, or rank-major when each token holds at most one choice (else a later first
  // choice beats an earlier second one); every other order ranks the pairs of the whole batch.
  // `varying_choices`: tokens hold different numbers of choices, so a C that counts choices
  // (times_k) counts the later tokens' too.
  constexpr bool causal(bool single_choice, bool varying_choices = false) const {
    if (!factor) return true;
    if (varying_choices && times_k) return false;
    return overflow == OverflowOrder::token_major || (overflow == OverflowOrder::rank_major && single_choice);
  }

  // Throws config_error for a rule no batch could satisfy.
  void validate(std::string_view where) const {
    if (factor)
      detail::require<config_error>(std::isfinite(*factor) && *factor > 0, where,
                                    "capacity.factor", *factor, "capacity factor > 0 and finite");
    detail::require<config_error>(minimum >= 0, where, "capacity.minimum", minimum, "minimum >= 0");
    detail::require<config_error>(multiple_of >= 1, where, "capacity.multiple_of", multiple_of,
                                  "multiple_of >= 1");
    detail::require<config_error>(!pad || factor.has_value(), where, "capacity.pad", "true",
                                  "pad-to-capacity needs a capacity factor (dropless has no C)");
  }

  // C for `tokens` real tokens, `experts` experts and k choices per token; -1 when dropless.
  Index slots(Index tokens, Index experts, Index k, std::string_view where) const {
    MOE_ASSERT(k >= 1);
    return slots_for_choices(tokens, tokens * k, experts, where);
  }

  // The same when the tokens hold `choices` choices in all, however many each (dynamic k):
  // times_k then counts the choices, sum_t k_t, in place of T k.
  Index slots_for_choices(Index tokens, Index choices, Index experts, std::string_view where) const {
    MOE_ASSERT(experts >= 1 && choices >= 0);
    if (!factor) return -1;
    if (tokens == 0) return 0;
    // More slots than choices can never fill; the clamp also keeps the conversion defined.
    const double all = double(choices);
    const double base = std::min(all, (times_k ? all : double(tokens)) * *factor / double(experts));
    // round = half to even (nearbyint), as Python's round() in flaxformer/vmoe
    return round_slots(base, rounding, minimum, multiple_of, *factor, tokens, experts, where);
  }

  // base slots -> rounded, at least `minimum`, up to a multiple; 0 slots is a config_error.
  static Index round_slots(double base, Rounding rounding, Index minimum, Index multiple_of, double factor,
                           Index tokens, Index experts, std::string_view where) {
    double c = rounding == Rounding::ceil    ? std::ceil(base)
               : rounding == Rounding::round ? std::nearbyint(base)
                                             : std::floor(base);
    Index cap = std::max(Index(c), minimum);
    cap = (cap + multiple_of - 1) / multiple_of * multiple_of;
    if (cap < 1)
      detail::fail<config_error>(where, "capacity.factor", factor,
                                 "capacity >= 1 slot per expert; " + std::to_string(tokens) + " tokens over " +
                                     std::to_string(experts) + " experts round to 0 (raise the factor or set a minimum)");
    return cap;
  }
};

// Slots per expert of expert-choice routing (docs/selectors.md, ExpertChoiceSelector): C given,
// or from a factor over the real tokens, C = T cf / E rounded, then up to a multiple (vmoe's
// compute_capacity: ceil, multiple of 4). The factor is the average number of experts per token.
struct ExpertCapacity {
  double factor = 1.0;
  Index slots = 0;  // C itself when > 0 (the factor is then unused)
  Rounding rounding = Rounding::ceil;
  Index multiple_of = 4;
  Index minimum = 0;

  void validate(std::string_view where) const {
    detail::require<config_error>(slots >= 0, where, "capacity.slots", slots, "slots >= 0 (0: from the factor)");
    as_capacity().validate(where);
  }

  // C for `tokens` real tokens over `experts` experts (0 for no tokens). It may pass the number
  // of tokens (an expert then takes them all), as the reference computes it; the bound only keeps
  // the conversion defined.
  Index slots_for(Index tokens, Index experts, std::string_view where) const {
    if (tokens == 0) return 0;
    if (slots > 0) return slots;
    const double base = std::min(double(tokens) * factor / double(experts), 1e15);
    return Capacity::round_slots(base, rounding, minimum, multiple_of, factor, tokens, experts, where);
  }

private:
  // The token-choice rule with one choice per token computes the same number.
  Capacity as_capacity() const {
    return {.factor = factor, .times_k = false, .rounding = rounding, .minimum = minimum, .multiple_of = multiple_of};
  }
};

}  // namespace moe
