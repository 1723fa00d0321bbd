#pragma once
// The experts' inference cache: a copy of each expert's weight matrices in the GEMM kernel's
// packed layout (kernels::PackedB), so that a forward multiplies by them without packing every
// weight block again on every call (an expert's block of ~100 tokens amortises that packing
// poorly). The copy gives the same bits as the weights it was packed from.
//
// Rules, enforced by the experts that own one:
//   - a copy is used only while current: any mutable access to the weights (for_each_parameter,
//     which the optimizers and zero_grad go through, or a mutable weight accessor) marks every
//     copy stale first. A view obtained that way and written *after* a later forward is not
//     seen: obtain it again (each call marks the copies stale) before writing through it;
//   - copies are made by pack_weights(), or by forward itself, expert by expert as it uses them,
//     when automatic (the experts' set_grad_enabled(false), i.e. MoELayer inference mode);
//   - only matrices the GEMM would pack are copied (outputs wider than
//     Gemm::eigen_max_cols), and they take as much memory again as the weights: release()
//     gives it back. Storage is kept when a copy goes stale, so repacking allocates nothing.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe/core/gemm.hpp"
#include "moe/kernels/packed_b.hpp"

namespace moe {

template <class S>
class PackedWeights {
public:
  // `matrices` weight matrices per expert, each packed as the B operand of forward's GEMMs.
  PackedWeights(Index experts, Index matrices)
      : matrices_(matrices), packed_(std::size_t(experts * matrices)), current_(std::size_t(experts), 0) {}

  // Whether forward packs the weights of an expert it uses while they are stale.
  void set_automatic(bool on) { automatic_ = on; }
  bool automatic() const { return automatic_; }
  bool wanted(Index e) const { return automatic_ && !current_[std::size_t(e)]; }

  // The weights may change: no copy is used until packed again.
  void invalidate() { std::fill(current_.begin(), current_.end(), std::uint8_t(0)); }
  // Stale, and the memory freed.
  void release() {
    invalidate();
    for (auto& p : packed_) p.release();
  }

  bool current(Index e) const { return current_[std::size_t(e)] != 0; }
  bool all_current() const {
    return std::all_of(current_.begin(), current_.end(), [](std::uint8_t c) { return c != 0; });
  }

  // Expert e's matrix `which` (B of forward's GEMM, [depth, n]); call for each of them, then
  // mark_current(e). Different experts may be packed on different threads.
  void pack(Index e, Index which, MatrixIn<S> w) {
    auto& p = packed_[std::size_t(e * matrices_ + which)];
    if (Gemm<S>::packs_b(w.cols())) p.template pack<false>(w);
  }
  void mark_current(Index e) { current_[std::size_t(e)] = 1; }

  // Expert e's packed matrix `which` when current, else an empty one (Gemm::run then uses the
  // weights themselves).
  const kernels::PackedB<S>& get(Index e, Index which) const {
    return current(e) ? packed_[std::size_t(e * matrices_ + which)] : none_;
  }

private:
  Index matrices_;
  bool automatic_ = false;
  std::vector<kernels::PackedB<S>> packed_;
  std::vector<std::uint8_t> current_;  // per expert: one thread writes each entry
  kernels::PackedB<S> none_;
};

}  // namespace moe
