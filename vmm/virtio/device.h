// A virtio device as the virtio-mmio transport (vmm/virtio/mmio.h) drives it: the device type,
// features, configuration space and queues are the device's; the registers, feature negotiation,
// status and interrupt status are the transport's.
//
// Threading: read_config, write_config, activate and reset run on the vCPU thread that accessed
// the register, under the transport's lock; process_queue runs on the event-loop thread, also
// under the transport's lock. A device that does work of its own on the loop thread (a backend
// fd becoming ready) guards it, and its use of the queues, with its own lock, taken after the
// transport's. The InterruptSink takes no lock, so a device may call it holding its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "vmm/guest_memory.h"
#include "vmm/virtio/queue.h"

namespace msb::vmm::virtio {

// Device IDs (virtio 1.x §5).
inline constexpr uint32_t kDeviceIdBlock = 2;
inline constexpr uint32_t kDeviceIdConsole = 3;
inline constexpr uint32_t kDeviceIdRng = 4;

// Feature bits common to all devices (§6).
inline constexpr uint64_t kFeatureVersion1 = 1ull << 32;
inline constexpr uint64_t kFeatureRingEventIdx = 1ull << 29;
inline constexpr uint64_t kFeatureRingIndirectDesc = 1ull << 28;

// What the transport gives a device to tell the driver something happened.
class InterruptSink {
 public:
  virtual ~InterruptSink() = default;
  // Sets the "used buffer" bit of InterruptStatus and raises the interrupt.
  virtual void used_buffers() = 0;
  // Sets the "configuration change" bit and raises the interrupt.
  virtual void config_changed() = 0;
  // The device cannot go on (a queue broke, a backend failed): sets DEVICE_NEEDS_RESET in Status
  // and signals a configuration change (§2.1.2). The device then does nothing until reset.
  virtual void needs_reset() = 0;
};

// Reports a queue the driver broke (Queue::broken) as DEVICE_NEEDS_RESET; true if one did.
inline bool report_broken_queues(std::span<const Queue> queues, InterruptSink& interrupt) {
  for (const Queue& queue : queues) {
    if (queue.broken()) {
      interrupt.needs_reset();
      return true;
    }
  }
  return false;
}

class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;

  virtual uint32_t device_id() const = 0;
  virtual std::string name() const = 0;  // in errors and logs: "virtio-blk"
  // Device-specific feature bits offered; the transport adds VERSION_1, EVENT_IDX and
  // INDIRECT_DESC, which the queues implement.
  virtual uint64_t device_features() const = 0;
  // QueueNumMax of each queue; its size is the number of queues.
  virtual std::vector<uint16_t> queue_max_sizes() const = 0;

  // Configuration space (§4.2.2 offset 0x100 onwards). Out-of-range reads give zeros; writes to
  // read-only fields are ignored.
  virtual void read_config(uint64_t offset, std::span<std::byte> data) = 0;
  virtual void write_config(uint64_t offset, std::span<const std::byte> data) {
    (void)offset, (void)data;
  }

  // The driver set DRIVER_OK: `queues` (owned by the transport, valid until reset) are
  // configured and `acked_features` is what was negotiated. The device may start using its
  // backends.
  virtual void activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t acked_features,
                        InterruptSink& interrupt) = 0;
  // The driver notified queue `index` (through ioeventfd or a QueueNotify write). Only after
  // activate. A device pops and handles what it can; a malformed chain is dropped (returned
  // with length 0), never fatal to the VMM.
  virtual void process_queue(size_t index) = 0;
  // Device reset (status written 0): forget the queues, stop using backends' readiness.
  virtual void reset() = 0;
};

}  // namespace msb::vmm::virtio
