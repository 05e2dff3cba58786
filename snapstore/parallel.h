// Internal: run a loop body over [0, count) on a few threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "snapstore/store.h"

namespace msb::snapstore::detail {

// Calls body(index, worker) for every index, `workers` threads taking the next index in turn
// (so uneven items balance out). The first exception stops the loop and is rethrown.
template <class Body>
void parallel_for(size_t count, unsigned workers, Body&& body) {
  workers = static_cast<unsigned>(std::clamp<size_t>(workers, 1, std::max<size_t>(count, 1)));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](unsigned worker) {
    for (;;) {
      size_t index = next.fetch_add(1, std::memory_order_relaxed);
      if (index >= count || failed.load(std::memory_order_relaxed)) return;
      try {
        body(index, worker);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  for (unsigned w = 1; w < workers; ++w)
    threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads)
    t.join();
  if (error) std::rethrow_exception(error);
}

// Throttles a ProgressFn shared by worker threads: at most one call every 100 ms, plus the last.
class ProgressReporter {
 public:
  ProgressReporter(const ProgressFn& fn, uint64_t total) : fn_(fn), total_(total) {}

  void add(uint64_t bytes) {
    uint64_t done = done_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    if (!fn_) return;
    // Workers never wait for each other here, except to deliver the final report.
    std::unique_lock lock(mutex_, std::defer_lock);
    if (done >= total_) {
      lock.lock();
    } else if (!lock.try_lock()) {
      return;
    }
    auto now = std::chrono::steady_clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    fn_(done, total_);
  }

 private:
  const ProgressFn& fn_;
  uint64_t total_;
  std::atomic<uint64_t> done_{0};
  std::mutex mutex_;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace msb::snapstore::detail
