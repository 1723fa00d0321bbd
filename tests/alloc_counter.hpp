#pragma once
// Heap-allocation counting for the no-allocation tests (docs/architecture.md, Workspace rule:
// per-call scratch is sized once). Include FIRST, before any Eigen or moe header, in exactly one
// translation unit of a test binary: it replaces the global operator new/delete (replacements may
// not be inline) and turns Eigen's runtime no-malloc check into a counter.
//
//   moe_test::AllocCounter count;   // counts from here ...
//   ...                             // ... code under test, no assertions in between
//   count.stop();                   // ... to here; then check count.news, count.eigen_mallocs
//
// Eigen allocates with std::malloc (aligned_malloc), not operator new, so it needs its own hook:
// with EIGEN_RUNTIME_NO_MALLOC every Eigen heap allocation asserts is_malloc_allowed(); our
// eigen_assert counts that one failure and keeps every other Eigen assertion fatal.
#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#ifdef EIGEN_CORE_H
#  error "alloc_counter.hpp must be included before any Eigen header"
#endif
#define EIGEN_RUNTIME_NO_MALLOC

namespace moe_test::alloc_detail {
inline std::atomic<bool> counting{false};
inline std::atomic<long> news{0}, deletes{0}, eigen_mallocs{0};

inline void eigen_assert_failed(const char* expr, const char* file, int line) {
  if (std::strstr(expr, "heap allocation is forbidden") != nullptr) {
    ++eigen_mallocs;  // the allocation then proceeds: we only count it
    return;
  }
  std::fprintf(stderr, "Eigen assertion failed: %s (%s:%d)\n", expr, file, line);
  std::abort();
}
}  // namespace moe_test::alloc_detail

#define eigen_assert(x)                                                       \
  do {                                                                        \
    if (!static_cast<bool>(x))                                                \
      ::moe_test::alloc_detail::eigen_assert_failed(#x, __FILE__, __LINE__);  \
  } while (false)

#include <Eigen/Core>

namespace moe_test {

// Counts operator new/delete calls and forbidden Eigen mallocs while alive (until stop()).
class AllocCounter {
public:
  AllocCounter() {
    alloc_detail::news = 0;
    alloc_detail::deletes = 0;
    alloc_detail::eigen_mallocs = 0;
    Eigen::internal::set_is_malloc_allowed(false);
    alloc_detail::counting = true;
  }
  ~AllocCounter() { stop(); }
  AllocCounter(const AllocCounter&) = delete;
  AllocCounter& operator=(const AllocCounter&) = delete;

  void stop() {
    if (!alloc_detail::counting) return;
    alloc_detail::counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
    news = alloc_detail::news;
    deletes = alloc_detail::deletes;
    eigen_mallocs = alloc_detail::eigen_mallocs;
  }

  long news = 0, deletes = 0, eigen_mallocs = 0;
};

}  // namespace moe_test

// ---- the replaced global allocation functions ---------------------------------------------

namespace moe_test::alloc_detail {
inline void* allocate(std::size_t n, std::size_t align) {
  if (counting) ++news;
  if (n == 0) n = 1;
  void* p = align <= alignof(std::max_align_t)
                ? std::malloc(n)
                : std::aligned_alloc(align, (n + align - 1) / align * align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
inline void release(void* p) noexcept {
  if (p == nullptr) return;
  if (counting) ++deletes;
  std::free(p);
}
}  // namespace moe_test::alloc_detail

void* operator new(std::size_t n) { return moe_test::alloc_detail::allocate(n, 0); }
void* operator new[](std::size_t n) { return moe_test::alloc_detail::allocate(n, 0); }
void* operator new(std::size_t n, std::align_val_t a) {
  return moe_test::alloc_detail::allocate(n, std::size_t(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return moe_test::alloc_detail::allocate(n, std::size_t(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try { return moe_test::alloc_detail::allocate(n, 0); } catch (...) { return nullptr; }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  try { return moe_test::alloc_detail::allocate(n, 0); } catch (...) { return nullptr; }
}
void operator delete(void* p) noexcept { moe_test::alloc_detail::release(p); }
void operator delete[](void* p) noexcept { moe_test::alloc_detail::release(p); }
void operator delete(void* p, std::size_t) noexcept { moe_test::alloc_detail::release(p); }
void operator delete[](void* p, std::size_t) noexcept { moe_test::alloc_detail::release(p); }
void operator delete(void* p, std::align_val_t) noexcept { moe_test::alloc_detail::release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { moe_test::alloc_detail::release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  moe_test::alloc_detail::release(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  moe_test::alloc_detail::release(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { moe_test::alloc_detail::release(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { moe_test::alloc_detail::release(p); }
