// Host-side row parallelism shared by the host kernels (csrc/host/*.cpp): plain std::thread, no
// OpenMP runtime, the calling thread among the workers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace rlhf_fast {

// Runs fn(begin, end) over [0, n_rows) on up to num_threads threads (the caller's among them).
// Rows are handed out in chunks from a shared counter, so cheap rows (ignored, mostly masked)
// don't unbalance the threads. Small work stays on the calling thread: starting a thread costs tens
// of microseconds, so each thread gets at least 2^16 elements (row_elements per row).
template <typename Fn>
void parallel_rows(int64_t n_rows, int64_t row_elements, int num_threads, Fn fn) {
  constexpr int64_t kMinElementsPerThread = int64_t(1) << 16;
  const int64_t elements = n_rows * std::max<int64_t>(row_elements, 1);
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, elements / kMinElementsPerThread));
  threads = std::min(threads, n_rows);
  if (threads <= 1) {
    fn(int64_t(0), n_rows);
    return;
  }
  // About 8 chunks of consecutive rows per thread.
  const int64_t chunk = (n_rows + 8 * threads - 1) / (8 * threads);
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
      if (begin >= n_rows) return;
      fn(begin, std::min(n_rows, begin + chunk));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  try {
    for (int64_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  } catch (...) {
    // Could not start a thread: the ones running and this one still finish every row.
  }
  worker();
  for (std::thread& th : pool) th.join();
}

}  // namespace rlhf_fast
