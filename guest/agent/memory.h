// kRestore's memory step as pure decisions (restore.cpp acts on them; tests/agent_test.cpp tests
// them): whether to free the guest's memory for the balloon, and how long to wait for it.
#pragma once

#include <chrono>
#include <cstdint>

namespace msb::agent {

// Whether the guest must free memory (sync, drop caches, compact) for the balloon: only when the
// grant is below what the guest has now (MemTotal), i.e. when the balloon inflates. Otherwise a
// restored guest would lose its page cache for nothing and every fork would start cold (where
// kernel code is emulated, python's first run took 11 s instead of 5 s).
inline bool must_free_memory(uint64_t granted_mib, uint64_t mem_total_kib) {
  return mem_total_kib > granted_mib * 1024;
}

// Waiting for the balloon to bring MemTotal within the grant. The driver inflates at its own pace
// (3-4 MiB/s where kernel code is emulated: 512 -> 256 MiB took about a minute), so the wait lasts
// while MemTotal keeps moving towards the grant: it gives up once MemTotal has not gone below its
// lowest value for `stall`, or after `cap` in all.
class BalloonWait {
 public:
  using Duration = std::chrono::milliseconds;
  static constexpr Duration kStall = std::chrono::seconds(10);
  static constexpr Duration kCap = std::chrono::seconds(300);

  enum class Verdict {
    kDone,      // MemTotal is within the grant
    kWait,      // not yet, and the balloon is making progress
    kStalled,   // no progress for `stall`
    kTimedOut,  // `cap` has passed
  };

  // `total_kib`: MemTotal when the wait starts (elapsed 0).
  BalloonWait(uint64_t granted_mib, uint64_t total_kib, Duration stall = kStall,
              Duration cap = kCap)
      : limit_kib_(granted_mib * 1024), lowest_kib_(total_kib), stall_(stall), cap_(cap) {}

  // MemTotal read `elapsed` after the start: what to do next.
  Verdict next(Duration elapsed, uint64_t total_kib) {
    if (total_kib <= limit_kib_) return Verdict::kDone;
    if (total_kib < lowest_kib_) {
      lowest_kib_ = total_kib;
      last_progress_ = elapsed;
    }
    if (elapsed >= cap_) return Verdict::kTimedOut;
    if (elapsed - last_progress_ >= stall_) return Verdict::kStalled;
    return Verdict::kWait;
  }

 private:
  uint64_t limit_kib_;
  uint64_t lowest_kib_;
  Duration stall_;
  Duration cap_;
  Duration last_progress_{0};
};

}  // namespace msb::agent
