// The virtio-mmio transport, version 2 ("modern", virtio 1.x §4.2.2): the register block a
// VirtioDevice is reached through, on the MMIO bus.
//
// The guest's driver negotiates features (VERSION_1 is required), configures each queue
// through QueueSel/QueueNum/QueueDesc/.../QueueReady (Queue validates sizes, alignment and that
// the rings lie in guest memory) and sets DRIVER_OK, which activates the device. From then on
// queue configuration writes are ignored until a reset (writing 0 to Status).
//
// Notifications: the transport owns one eventfd per queue. The machine registers each as a KVM
// ioeventfd on base + kNotifyOffset with datamatch = the queue index, so a QueueNotify write
// never exits to the VMM; one that does reach the transport (no ioeventfd) signals the same
// eventfd. The transport watches the eventfds on the EventLoop and runs process_queue there.
//
// Interrupts: InterruptStatus bits are set atomically and the transport's Interrupt (an irqfd)
// is triggered; the driver clears bits through InterruptACK.
//
// Everything here is reached from vCPU threads (registers) and the loop thread (queues) and is
// guarded by one mutex; InterruptStatus and ConfigGeneration are atomics so that a device may
// raise an interrupt from its own backend handler without the transport's lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "snapstore/file_util.h"
#include "vmm/event_loop.h"
#include "vmm/guest_memory.h"
#include "vmm/interrupt.h"
#include "vmm/io_bus.h"
#include "vmm/virtio/device.h"
#include "vmm/virtio/queue.h"

namespace msb::vmm::virtio {

inline constexpr uint64_t kMmioSize = 0x200;  // registers 0x000-0x0ff, config space 0x100-0x1ff
inline constexpr uint64_t kNotifyOffset = 0x50;
inline constexpr uint32_t kMmioMagic = 0x74726976;  // "virt"
inline constexpr uint32_t kMmioVersion = 2;
inline constexpr uint32_t kMmioVendorId = 0x0062736d;  // "msb"

// Device status bits (§2.1).
inline constexpr uint32_t kStatusAcknowledge = 1;
inline constexpr uint32_t kStatusDriver = 2;
inline constexpr uint32_t kStatusDriverOk = 4;
inline constexpr uint32_t kStatusFeaturesOk = 8;
inline constexpr uint32_t kStatusDeviceNeedsReset = 64;
inline constexpr uint32_t kStatusFailed = 128;

// InterruptStatus bits (§4.2.2).
inline constexpr uint32_t kInterruptUsedBuffer = 1;
inline constexpr uint32_t kInterruptConfigChange = 2;

// A queue's notification eventfd, for KVM_IOEVENTFD at `base + offset` with `datamatch`.
struct NotifyEventFd {
  int fd = -1;
  uint64_t offset = kNotifyOffset;
  uint32_t datamatch = 0;  // the queue index
};

// The transport's registers as plain data (queue states are saved from the queues).
struct MmioState {
  uint32_t status = 0;
  uint32_t device_features_select = 0;
  uint32_t driver_features_select = 0;
  uint64_t driver_features = 0;
  uint32_t queue_select = 0;
  bool activated = false;
  bool needs_reset = false;
};

class VirtioMmioTransport : public BusDevice, private InterruptSink {
 public:
  // `memory`, `loop` and `interrupt` are not owned and must outlive the transport; the loop must
  // not be running handlers when the transport is destroyed (stop it first). Throws
  // std::system_error when an eventfd cannot be made or watched.
  VirtioMmioTransport(std::unique_ptr<VirtioDevice> device, const GuestMemory& memory,
                      EventLoop& loop, Interrupt& interrupt);
  ~VirtioMmioTransport() override;

  // Register access from a vCPU (offsets from the transport's base).
  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  std::vector<NotifyEventFd> notify_eventfds() const;
  VirtioDevice& device() { return *device_; }
  // Features offered to the driver: the device's plus VERSION_1, EVENT_IDX and INDIRECT_DESC.
  uint64_t offered_features() const { return offered_features_; }

  MmioState save() const;
  std::vector<QueueState> save_queues() const;
  uint32_t interrupt_status() const { return interrupt_status_.load(); }
  uint32_t config_generation() const { return config_generation_.load(); }

  // Puts back what save(), save_queues(), interrupt_status() and config_generation() returned
  // from a transport of the same device, possibly in another process. Everything is checked
  // first (a state file is untrusted: features the transport did not offer, a status that
  // contradicts `activated`, queues that Queue::restore rejects) and std::invalid_argument says
  // what is wrong; nothing changes then. An activated device is activated again with the saved
  // features, as DRIVER_OK did. For a transport whose machine has not run yet; restore the
  // device's own state before this (activation may start using it).
  void restore(const MmioState& state, const std::vector<QueueState>& queues,
               uint32_t interrupt_status, uint32_t config_generation);
  // For a restored machine once its device thread runs: notifications in flight when the
  // state was captured are not part of it (an ioeventfd's count is KVM's), so every queue of an
  // activated device is looked at once; and a pending interrupt is raised again, since the
  // irqfd edge that raised it belonged to the old VM.
  void resume_after_restore();

 private:
  uint32_t read_register(uint64_t offset);
  void write_register(uint64_t offset, uint32_t value);
  void write_status(uint32_t value);
  void reset_locked();
  Queue* selected_queue();
  void notified(size_t index);

  // InterruptSink, for the device.
  void used_buffers() override;
  void config_changed() override;
  void needs_reset() override;

  std::unique_ptr<VirtioDevice> device_;
  const GuestMemory& memory_;
  EventLoop& loop_;
  Interrupt& interrupt_;
  const uint64_t offered_features_;

  mutable std::mutex mutex_;
  MmioState state_;
  std::vector<Queue> queues_;
  std::vector<snapstore::UniqueFd> notify_fds_;
  std::atomic<uint32_t> interrupt_status_{0};
  std::atomic<uint32_t> config_generation_{0};
  std::atomic<bool> device_needs_reset_{false};
};

}  // namespace msb::vmm::virtio
