// Shared by jaxquant's native CPU kernels: the XLA FFI API, and a loop that runs blocks
// of work on the calling thread and XLA's intra-op thread pool.
#ifndef JAXQUANT_FFI_H_
#define JAXQUANT_FFI_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxquant {
// Runs fn(b) for every block b in [0, n_blocks) on this thread and the pool's threads, and
// returns once all are done. A pool task that starts after the last block was claimed
// returns without touching fn, which (with what it refers to) lives on the caller's stack.
template <typename Fn>
void ParallelBlocks(ffi::ThreadPool& pool, int64_t n_blocks, const Fn& fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto sh = std::make_shared<Counters>();
  auto work = [sh, &fn, n_blocks] {
    for (int64_t b; (b = sh->next.fetch_add(1)) < n_blocks;) {
      fn(b);
      sh->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t n_tasks = std::min<int64_t>(pool.num_threads(), n_blocks - 1);
  for (int64_t t = 0; t < n_tasks; ++t) pool.Schedule([work] { work(); });
  work();
  while (sh->done.load(std::memory_order_acquire) < n_blocks) std::this_thread::yield();
}

}  // namespace jaxquant

// Short names for the handler bindings: buffer types, and a binding that starts with
// XLA's intra-op thread pool.
namespace jaxquant::bind {
using F32 = ffi::Buffer<ffi::F32>;
using S32 = ffi::Buffer<ffi::S32>;
using U8 = ffi::Buffer<ffi::U8>;
using Any = ffi::AnyBuffer;
inline auto Plain() { return ffi::Ffi::Bind(); }
inline auto Pooled() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(); }
}  // namespace jaxquant::bind

#endif  // JAXQUANT_FFI_H_
