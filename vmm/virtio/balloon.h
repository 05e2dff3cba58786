// virtio-balloon (virtio 1.x §5.5): how the host takes memory back from a guest. The host sets a
// target (num_pages, in 4 KiB pages) in the configuration space and raises a configuration
// change; the guest's driver allocates that many pages and hands their page frame numbers to the
// device on the inflate queue, and the device drops their host memory (MADV_DONTNEED: anonymous
// memory is freed, a MAP_PRIVATE file mapping's private copies are dropped). When the target
// falls, the driver takes pages back through the deflate queue, which needs nothing of the
// device: the pages refill on the guest's next touch. The driver reports what it holds in
// `actual`.
//
// No feature bits beyond VERSION_1: not MUST_TELL_HOST (nothing to tell before reuse), not
// STATS_VQ, and on purpose not DEFLATE_ON_OOM, so that the pages a guest gives up stay given up
// and its MemTotal shrinks by them (Linux adjusts totalram as it inflates without that feature).
//
// Every PFN is checked: a buffer must be whole 32-bit PFNs, at most kMaxPfnsPerRequest of them,
// each naming a page wholly inside guest RAM; a request with any bad part is returned untouched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "vmm/virtio/device.h"

namespace msb::vmm::virtio {

inline constexpr uint32_t kDeviceIdBalloon = 5;

// The device's state as plain data. num_pages and actual are the configuration space; the rest
// is statistics.
struct BalloonState {
  uint32_t num_pages = 0;  // the target, set by the host
  uint32_t actual = 0;     // what the driver says it holds
  uint64_t pages_inflated = 0;
  uint64_t pages_deflated = 0;
  uint64_t bad_requests = 0;  // requests returned untouched

  bool operator==(const BalloonState&) const = default;
};

class VirtioBalloon : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 128;
  static constexpr size_t kInflateQueue = 0;
  static constexpr size_t kDeflateQueue = 1;
  // Linux sends at most 256 PFNs per buffer (VIRTIO_BALLOON_ARRAY_PFNS_MAX); this bounds what
  // one request can make the VMM copy.
  static constexpr size_t kMaxPfnsPerRequest = 4096;
  static constexpr uint64_t kPageSize = 4096;  // the balloon's page, whatever the guest's
  static constexpr size_t kConfigSize = 8;     // num_pages, actual (le32 each)

  VirtioBalloon() = default;

  uint32_t device_id() const override { return kDeviceIdBalloon; }
  std::string name() const override { return "virtio-balloon"; }
  uint64_t device_features() const override { return 0; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize}; }
  void read_config(uint64_t offset, std::span<std::byte> data) override;
  void write_config(uint64_t offset, std::span<const std::byte> data) override;
  void activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t acked_features,
                InterruptSink& interrupt) override;
  void process_queue(size_t index) override;
  void reset() override;

  // The host's side, from any thread: sets num_pages and, when it changed and a driver is
  // active, raises a configuration change so the driver looks at it.
  void set_target_pages(uint32_t pages);

  BalloonState state() const;
  void restore(const BalloonState& state);

 private:
  // Validates a request's PFNs into guest page addresses; false if any part is bad.
  bool read_pages(const DescriptorChain& chain, std::vector<uint64_t>& pages) const;
  // Gives the host memory behind (validated) guest pages back.
  void release(const std::vector<uint64_t>& pages);

  // Guards state_ and interrupt_: set_target_pages runs on the host's thread, everything else
  // under the transport's lock (taken before this one).
  mutable std::mutex mutex_;
  BalloonState state_;
  const GuestMemory* memory_ = nullptr;
  std::span<Queue> queues_;
  InterruptSink* interrupt_ = nullptr;
};

}  // namespace msb::vmm::virtio
