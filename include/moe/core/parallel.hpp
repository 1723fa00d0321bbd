#pragma once
// The one threading runtime (docs/architecture.md, Threading): optional OpenMP over independent
// index ranges. Work is split into fixed chunks and every result is written by exactly one
// iteration, so outputs are bit-identical for any thread count; reductions stay serial in a fixed
// order.
#include <algorithm>
#include <exception>

#include <vector>

#include "moe/config.hpp"
#include "moe/core/tensor.hpp"

#if defined(_OPENMP)
#  include <omp.h>
#endif

namespace moe {

// Threads a parallel_for may use (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// body(begin, end) over [0, n) in chunks of `grain` rows, the same chunks whatever the thread
// count (a chunk's result may depend on its shape, e.g. a GEMM's blocking). An exception thrown
// by a chunk is rethrown on the calling thread (the first one in chunk order).
template <class F>
void parallel_for(Index n, Index grain, F&& body) {
  if (grain <= 0) grain = std::max<Index>(n, 1);
  const Index chunks = (n + grain - 1) / grain;
#if defined(_OPENMP)
  if (chunks > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
    std::exception_ptr error;
    Index error_chunk = chunks;
#  pragma omp parallel for schedule(static)
    for (Index c = 0; c < chunks; ++c) {
      try {
        body(c * grain, std::min(n, (c + 1) * grain));
      } catch (...) {
#  pragma omp critical(moe_parallel_for_error)
        if (c < error_chunk) error_chunk = c, error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  for (Index c = 0; c < chunks; ++c) body(c * grain, std::min(n, (c + 1) * grain));
}

// One T per thread (GEMM packing buffers, scratch), grown when more threads show up.
template <class T>
class PerThread {
public:
  T& local() {
    MOE_ASSERT(std::size_t(thread_index()) < items_.size());
    return items_[std::size_t(thread_index())];
  }
  // Call outside parallel regions, before the loop that uses local().
  void reserve() {
    if (items_.size() < std::size_t(max_threads())) items_.resize(std::size_t(max_threads()));
  }

private:
  std::vector<T> items_;
};

}  // namespace moe
