#pragma once
// One scorer referenced by many layers (docs/scorers.md, Shared): the Omni-router's shared router
// (Gu, Likhomanenko, Jaitly 2025). Each layer's router holds a Shared handle; all handles reach
// one scorer, one set of parameters. Every layer scores its own hidden states, and each layer's
// backward adds its part to the one gradient, so the shared gradient is the sum over layers.
//
// The handle built from a scorer owns the parameters for the optimizer: it alone visits them in
// for_each_parameter, so a stack of layers steps them once. Copies are handles that do not.
// A scorer may keep state from its last forward for its backward (the linear scorer's jitter):
// when another layer has run the shared scorer since this handle's forward, backward first runs
// this handle's forward again, at the same step, to restore it.
#include <cstdint>
#include <memory>
#include <utility>

#include "moe/concepts.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/workspace.hpp"

namespace moe {

template <class Scorer>
class Shared {
public:
  using scalar_type = typename Scorer::scalar_type;
  using S = scalar_type;

  explicit Shared(Scorer scorer) : block_(std::make_shared<Block>(std::move(scorer))), owner_(true), id_(block_->handles++) {}
  // Another handle on the same scorer; it does not own the parameters.
  Shared(const Shared& other) : block_(other.block_), owner_(false), id_(block_->handles++) {}
  Shared(Shared&&) noexcept = default;
  Shared& operator=(const Shared& other) {
    if (this != &other) *this = Shared(other);
    return *this;
  }
  Shared& operator=(Shared&&) noexcept = default;

  Index input_dim() const { return block_->scorer.input_dim(); }
  Index num_experts() const { return block_->scorer.num_experts(); }
  Index logit_columns() const { return moe::logit_columns(block_->scorer); }
  bool causal() const { return is_causal(block_->scorer); }
  bool owner() const { return owner_; }
  // How many handles (layers) share the scorer now.
  long handles() const { return block_.use_count(); }
  Scorer& get() { return block_->scorer; }
  const Scorer& get() const { return block_->scorer; }

  void set_draw_state(const DrawState& state) { state_ = state; }

  void forward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    share_state();
    block_->scorer.forward(x, tokens, logits);
    block_->last = id_;
  }

  void backward(MatrixIn<S> x, const TokenInputs<S>& tokens, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    if (block_->last != id_) {  // another layer ran the scorer since: restore this layer's state
      share_state();
      fit(replay_, x.rows(), dlogits.cols());
      block_->scorer.forward(x, tokens, replay_);
      block_->last = id_;
    }
    block_->scorer.backward(x, tokens, dlogits, dx);
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    if (owner_) block_->scorer.for_each_parameter(visit);
  }

private:
  struct Block {
    explicit Block(Scorer s) : scorer(std::move(s)) {}
    Scorer scorer;
    std::uint64_t handles = 0;  // ids given out
    std::uint64_t last = ~std::uint64_t(0);  // the handle whose forward ran last
  };

  void share_state() {
    if constexpr (requires(Scorer& s) { s.set_draw_state(state_); }) block_->scorer.set_draw_state(state_);
  }

  std::shared_ptr<Block> block_;
  bool owner_;
  std::uint64_t id_;
  DrawState state_{};
  Matrix<S> replay_;  // logits of a replayed forward, discarded
};

}  // namespace moe
