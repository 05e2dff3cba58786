// virtio-rng (virtio 1.x §5.4): one queue whose writable buffers the device fills with bytes from
// getrandom(2). A request gets at most kMaxBytesPerRequest bytes, so one guest buffer cannot
// make the VMM generate gigabytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "vmm/virtio/device.h"

namespace msb::vmm::virtio {

struct RngState {
  uint64_t bytes_delivered = 0;  // statistics only
};

class VirtioRng : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr size_t kMaxBytesPerRequest = 64 * 1024;

  VirtioRng() = default;

  uint32_t device_id() const override { return kDeviceIdRng; }
  std::string name() const override { return "virtio-rng"; }
  uint64_t device_features() const override { return 0; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize}; }
  void read_config(uint64_t offset, std::span<std::byte> data) override;
  void activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t acked_features,
                InterruptSink& interrupt) override;
  void process_queue(size_t index) override;
  void reset() override;

  const RngState& state() const { return state_; }
  void restore(const RngState& state) { state_ = state; }

 private:
  RngState state_;
  const GuestMemory* memory_ = nullptr;
  std::span<Queue> queues_;
  InterruptSink* interrupt_ = nullptr;
};

}  // namespace msb::vmm::virtio
