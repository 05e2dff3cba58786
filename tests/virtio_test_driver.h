// Test support: the guest side of virtio-mmio, played against fake guest memory (a std::vector
// registered with GuestMemory). It negotiates features, lays out split rings, posts chains and
// reads the used rings the way Linux's virtio_mmio and virtio_ring drivers do, through the
// transport's register interface only.
#pragma once

#include <sys/epoll.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <stdexcept>
#include <vector>

#include "vmm/event_loop.h"
#include "vmm/guest_memory.h"
#include "vmm/interrupt.h"
#include "vmm/virtio/mmio.h"
#include "vmm/virtio/queue.h"

namespace msb::test {

// Guest RAM starts above 0 so that low addresses are outside it.
inline constexpr uint64_t kGuestRamBase = 0x100000;
inline constexpr uint64_t kGuestRamSize = 4 << 20;

struct FakeGuest {
  std::vector<std::byte> ram = std::vector<std::byte>(kGuestRamSize);
  vmm::GuestMemory memory;
  FakeGuest() { memory.add_region(kGuestRamBase, ram); }
  std::byte* at(uint64_t address) { return ram.data() + (address - kGuestRamBase); }
};

// What a virtio-mmio transport runs on in these tests: fake guest memory, the event loop pumped by
// hand and an interrupt line. A test fixture (TEST_CASE_METHOD) or the base of a device's rig;
// the transport, declared after it, goes first.
struct FakeVirtioHost {
  FakeGuest guest;
  vmm::EventLoop loop;
  vmm::Interrupt irq;
};

struct Buffer {
  uint64_t addr;
  uint32_t len;
  bool writable;
};

// Runs the loop's ready handlers until none is left.
inline void pump(vmm::EventLoop& loop) {
  for (int rounds = 0; rounds < 1000 && loop.run_once(0) > 0; ++rounds) {
  }
}

class VirtioDriver {
 public:
  // Rings of queue q at kRings + q * 0x4000; buffers are handed out from kData upwards.
  static constexpr uint64_t kRings = kGuestRamBase;
  static constexpr uint64_t kData = kGuestRamBase + 0x40000;

  VirtioDriver(vmm::virtio::VirtioMmioTransport& transport, FakeGuest& guest)
      : transport_(transport), guest_(guest) {}

  uint32_t read32(uint64_t offset) {
    uint32_t value = 0;
    transport_.read(offset, std::as_writable_bytes(std::span(&value, 1)));
    return value;
  }
  void write32(uint64_t offset, uint32_t value) {
    transport_.write(offset, std::as_bytes(std::span(&value, 1)));
  }

  uint64_t device_features() {
    write32(0x14, 0);
    uint64_t low = read32(0x10);
    write32(0x14, 1);
    return low | (uint64_t{read32(0x10)} << 32);
  }

  // Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (§3.1.1). True if the device accepted.
  bool negotiate(uint64_t features) {
    write32(0x70, 0);
    write32(0x70, vmm::virtio::kStatusAcknowledge);
    write32(0x70, vmm::virtio::kStatusAcknowledge | vmm::virtio::kStatusDriver);
    write32(0x24, 0);
    write32(0x20, static_cast<uint32_t>(features));
    write32(0x24, 1);
    write32(0x20, static_cast<uint32_t>(features >> 32));
    write32(0x70, vmm::virtio::kStatusAcknowledge | vmm::virtio::kStatusDriver |
                      vmm::virtio::kStatusFeaturesOk);
    event_idx_ = (features & vmm::virtio::kFeatureRingEventIdx) != 0;
    return (read32(0x70) & vmm::virtio::kStatusFeaturesOk) != 0;
  }

  // Configures queue `index` with `size` entries; true if QueueReady reads back 1.
  bool setup_queue(uint32_t index, uint16_t size) {
    write32(0x30, index);
    write32(0x38, size);
    const uint64_t base = kRings + index * 0x4000ull;
    std::memset(guest_.at(base), 0, 0x4000);  // fresh rings, as a driver allocates them
    write32(0x80, static_cast<uint32_t>(base));
    write32(0x84, static_cast<uint32_t>(base >> 32));
    write32(0x90, static_cast<uint32_t>(base + 0x1000));
    write32(0x94, 0);
    write32(0xa0, static_cast<uint32_t>(base + 0x2000));
    write32(0xa4, 0);
    write32(0x44, 1);
    if (queues_.size() <= index) queues_.resize(index + 1);
    queues_[index] = QueueSide{base, base + 0x1000, base + 0x2000, size};
    // Ask for an interrupt after every used buffer (used_event = 0 follows used idx closely
    // enough for tests that take the interrupt count as "at least one").
    return read32(0x44) == 1;
  }

  void driver_ok() { write32(0x70, read32(0x70) | vmm::virtio::kStatusDriverOk); }

  // Full initialization with every offered feature and every queue at `size`.
  void init(uint16_t size = 64) {
    if (!negotiate(device_features())) throw std::runtime_error("features refused");
    const uint32_t queues = count_queues();
    for (uint32_t q = 0; q < queues; ++q) {
      if (!setup_queue(q, size)) throw std::runtime_error("queue setup refused");
    }
    driver_ok();
  }

  uint32_t count_queues() {
    uint32_t count = 0;
    for (;; ++count) {
      write32(0x30, count);
      if (read32(0x34) == 0) return count;
    }
  }

  // A fresh guest buffer (not reused until reset_allocator).
  uint64_t alloc(uint32_t length) {
    uint64_t address = next_data_;
    next_data_ += (length + 15ull) & ~15ull;
    if (next_data_ > kGuestRamBase + kGuestRamSize) throw std::runtime_error("guest RAM full");
    return address;
  }
  void reset_allocator() { next_data_ = kData; }

  // Writes a chain into the descriptor table and makes it available; returns its head.
  uint16_t post(uint32_t queue, const std::vector<Buffer>& buffers) {
    QueueSide& side = queues_.at(queue);
    const uint16_t head = side.next_desc;
    for (size_t i = 0; i < buffers.size(); ++i) {
      const uint16_t index = static_cast<uint16_t>((head + i) % side.size);
      uint16_t flags = buffers[i].writable ? vmm::virtio::kDescFWrite : 0;
      if (i + 1 < buffers.size()) flags |= vmm::virtio::kDescFNext;
      const vmm::virtio::VirtqDesc desc{buffers[i].addr, buffers[i].len, flags,
                                        static_cast<uint16_t>((index + 1) % side.size)};
      guest_.memory.write_obj(side.desc + 16ull * index, desc);
    }
    side.next_desc = static_cast<uint16_t>((head + buffers.size()) % side.size);
    guest_.memory.write_obj<uint16_t>(side.avail + 4 + 2ull * (side.avail_idx % side.size), head);
    ++side.avail_idx;
    guest_.memory.write_obj<uint16_t>(side.avail + 2, side.avail_idx);
    return head;
  }
  void notify(uint32_t queue) { write32(vmm::virtio::kNotifyOffset, queue); }

  // The next used element of `queue`, if the device returned one since the last call.
  std::optional<vmm::virtio::VirtqUsedElem> take_used(uint32_t queue) {
    QueueSide& side = queues_.at(queue);
    const uint16_t used_idx = *guest_.memory.read_obj<uint16_t>(side.used + 2);
    if (used_idx == side.used_seen) return std::nullopt;
    auto element = guest_.memory.read_obj<vmm::virtio::VirtqUsedElem>(
        side.used + 4 + 8ull * (side.used_seen % side.size));
    ++side.used_seen;
    // Keep interrupts coming for every buffer (used_event = what we have seen).
    if (event_idx_) {
      guest_.memory.write_obj<uint16_t>(side.avail + 4 + 2ull * side.size, side.used_seen);
    }
    return element;
  }

  void write_bytes(uint64_t address, std::span<const std::byte> bytes) {
    std::memcpy(guest_.at(address), bytes.data(), bytes.size());
  }
  std::vector<std::byte> read_bytes(uint64_t address, size_t length) {
    return {guest_.at(address), guest_.at(address) + length};
  }

 private:
  struct QueueSide {
    uint64_t desc = 0, avail = 0, used = 0;
    uint16_t size = 0;
    uint16_t avail_idx = 0;
    uint16_t used_seen = 0;
    uint16_t next_desc = 0;
  };

  vmm::virtio::VirtioMmioTransport& transport_;
  FakeGuest& guest_;
  std::vector<QueueSide> queues_;
  uint64_t next_data_ = kData;
  bool event_idx_ = false;
};

}  // namespace msb::test
