// virtio-console (virtio 1.x §5.3) with a single port and no MULTIPORT: the agent channel.
// Queue 0 (receiveq) carries bytes from the backend to the guest, queue 1 (transmitq) from the
// guest to the backend.
//
// The backend is a stream socket (msb's VMM process holds the other end), used without blocking
// and with backpressure both ways, so memory stays bounded whatever either side does:
// - backend -> guest: the socket is read only into buffers the guest posted; while none is
//   posted the device stops watching the socket for input until the driver posts more.
// - guest -> backend: a transmit chain is copied out (at most kMaxTransmitChain bytes) and
//   returned; what the socket does not take at once is kept and sent when it becomes writable,
//   and no further transmit chain is taken meanwhile.
// EOF or an error on the socket closes the backend: guest output is dropped from then on (the
// chains are still consumed, so the guest never stalls) and nothing more arrives.
//
// Threading: process_queue runs under the transport's lock; the socket's handler runs on the
// loop thread too but outside it, so both take the console's own mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "vmm/event_loop.h"
#include "vmm/virtio/device.h"

namespace msb::vmm::virtio {

struct ConsoleState {
  std::vector<std::byte> pending_output;  // guest bytes the socket has not taken yet
  bool backend_closed = false;
  bool receive_starved = false;  // input is waiting for the guest to post buffers
};

class VirtioConsole : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr size_t kReceiveQueue = 0;
  static constexpr size_t kTransmitQueue = 1;
  static constexpr size_t kMaxTransmitChain = 1 << 20;
  static constexpr size_t kMaxReceiveChunk = 64 * 1024;

  // `backend_fd` (not owned) is a connected stream socket; `loop` (not owned) watches it.
  VirtioConsole(int backend_fd, EventLoop& loop);
  ~VirtioConsole() override;

  uint32_t device_id() const override { return kDeviceIdConsole; }
  std::string name() const override { return "virtio-console"; }
  uint64_t device_features() const override { return 0; }
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize}; }
  void read_config(uint64_t offset, std::span<std::byte> data) override;
  void activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t acked_features,
                InterruptSink& interrupt) override;
  void process_queue(size_t index) override;
  void reset() override;

  ConsoleState save() const;
  // Puts back a saved state, before the transport re-activates the device. The backend socket
  // is a new one (a restored machine's), so it starts open: pending output, if any, goes out on
  // it first. Throws std::invalid_argument for more pending output than one chain can leave.
  void restore(const ConsoleState& state);

 private:
  void on_backend(uint32_t events);
  void receive_locked();
  void transmit_locked();
  bool flush_pending_locked();  // true when everything pending was sent (or dropped)
  void close_backend_locked();
  void update_interest_locked();
  void notify_locked(Queue& queue);

  const int backend_fd_;
  EventLoop& loop_;

  mutable std::mutex mutex_;
  ConsoleState state_;
  bool watching_ = false;  // backend_fd_ is in the loop's epoll set
  uint32_t interest_ = 0;
  const GuestMemory* memory_ = nullptr;
  std::span<Queue> queues_;
  InterruptSink* interrupt_ = nullptr;
};

}  // namespace msb::vmm::virtio
