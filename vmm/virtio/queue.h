// The split virtqueue (virtio 1.x spec §2.7) as the device side sees it.
//
// The rings and descriptor tables live in guest memory and a guest may write anything there, at
// any moment, from another vCPU. So every ring entry and descriptor is copied out once
// (GuestMemory::read_obj) and only the copy is validated and used; a malformed chain becomes an
// error value on the chain, and a driver that breaks the ring protocol itself marks the queue
// broken (the transport then reports DEVICE_NEEDS_RESET, §2.1.2). Nothing a guest writes may
// crash the VMM or make it touch memory outside the guest's regions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "vmm/guest_memory.h"

namespace msb::vmm::virtio {

// Descriptor flags (§2.7.5).
inline constexpr uint16_t kDescFNext = 1;
inline constexpr uint16_t kDescFWrite = 2;
inline constexpr uint16_t kDescFIndirect = 4;
// Available ring flag asking the device not to interrupt (§2.7.6, §2.7.7).
inline constexpr uint16_t kAvailFNoInterrupt = 1;
// The largest split queue size the spec allows (§2.7: Queue Size is at most 32768).
inline constexpr uint16_t kMaxQueueSize = 32768;

// The layout of the rings in guest memory (§2.7.5, §2.7.6, §2.7.8), needed by drivers in tests
// as well as by the device.
struct VirtqDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VirtqDesc) == 16);
struct VirtqUsedElem {
  uint32_t id;
  uint32_t len;
};
static_assert(sizeof(VirtqUsedElem) == 8);

// Bytes each ring occupies for a queue of `size` entries, the event index fields included: a
// driver lays them out whether or not VIRTIO_F_EVENT_IDX is negotiated (§2.7 table).
inline constexpr uint64_t desc_table_bytes(uint16_t size) {
  return 16ull * size;
}
inline constexpr uint64_t avail_ring_bytes(uint16_t size) {
  return 6ull + 2ull * size;
}
inline constexpr uint64_t used_ring_bytes(uint16_t size) {
  return 6ull + 8ull * size;
}

// One validated buffer of a chain: it lies entirely inside guest memory.
struct Descriptor {
  uint64_t addr = 0;
  uint32_t len = 0;
  bool write_only = false;
};

// Why a chain was rejected. Any of these lets the device drop the request (the spec leaves the
// device's reaction to a malformed chain open); none of them breaks the queue.
enum class ChainError {
  kNone,
  kHeadOutOfRange,         // avail ring names a descriptor >= queue size
  kNextOutOfRange,         // a `next` field >= the size of its table
  kChainTooLong,           // more descriptors than the queue size: a loop or overlong (§2.7.5.3.1)
  kDescriptorUnreadable,   // the descriptor itself could not be read
  kAddressOverflow,        // addr + len wraps around 2^64
  kBufferOutsideMemory,    // a buffer not entirely inside one guest memory region
  kTooManyBytes,           // the buffers add up to more than 2^32 - 1 bytes (§2.7.5.2)
  kReadableAfterWritable,  // device-readable after device-writable (§2.7.4.2)
  kIndirectWithNext,       // INDIRECT together with NEXT (§2.7.5.3.1)
  kNestedIndirect,         // INDIRECT inside an indirect table (§2.7.5.3.1)
  kIndirectBadLength,      // indirect table length zero or not a multiple of 16
  kIndirectTooLong,        // indirect table with more entries than the queue size
  kIndirectOutsideMemory,  // indirect table not inside guest memory
};
std::string_view to_string(ChainError error);

// A request popped from the available ring: the head index (to hand back with Queue::add_used)
// and its buffers, validated in full before the device sees any of them, so that a device never
// acts on half of a chain that turns out to be malformed.
class DescriptorChain {
 public:
  uint16_t head() const { return head_; }
  ChainError error() const { return error_; }
  bool ok() const { return error_ == ChainError::kNone; }

  // Empty unless ok(). Readable descriptors come first, then writable ones.
  std::span<const Descriptor> descriptors() const { return descriptors_; }
  auto begin() const { return descriptors_.begin(); }
  auto end() const { return descriptors_.end(); }

  uint64_t readable_length() const;
  uint64_t writable_length() const;

  // Copies readable bytes, starting `offset` bytes into the readable part, into `out`; returns
  // how many were copied (fewer than out.size() when the readable part ends first).
  size_t gather(const GuestMemory& memory, std::span<std::byte> out, uint64_t offset = 0) const;
  // All readable bytes, but at most `cap` of them: a device bounds what a guest can make it
  // allocate.
  std::vector<std::byte> gather_readable(const GuestMemory& memory, size_t cap) const;
  // Copies `in` into the writable part, starting `offset` bytes into it; returns how many bytes
  // were written (fewer than in.size() when the writable part ends first).
  size_t scatter(const GuestMemory& memory, std::span<const std::byte> in,
                 uint64_t offset = 0) const;

 private:
  friend class Queue;
  template <bool kWritable, class Copy>
  size_t copy_part(uint64_t offset, uint64_t length, Copy copy) const;

  uint16_t head_ = 0;
  ChainError error_ = ChainError::kNone;
  std::vector<Descriptor> descriptors_;
};

// Everything a queue is, as plain data: saved and restored as-is by snapshots.
struct QueueState {
  uint16_t max_size = 0;  // what the device offers (QueueNumMax)
  uint16_t size = 0;      // what the driver chose (QueueNum)
  bool ready = false;
  uint64_t desc_table = 0;  // guest physical addresses (QueueDesc, QueueDriver, QueueDevice)
  uint64_t avail_ring = 0;
  uint64_t used_ring = 0;
  uint16_t next_avail = 0;  // free-running, wraps at 2^16 like the ring indexes (§2.7.6)
  uint16_t next_used = 0;
  bool event_idx = false;  // VIRTIO_F_EVENT_IDX negotiated

  bool operator==(const QueueState&) const = default;
};

// Why `state` cannot be a queue's state in `memory`, or nullopt if it can.
std::optional<std::string> validate_state(const QueueState& state, const GuestMemory& memory);

class Queue {
 public:
  // max_size must be a power of two in [1, 32768]; throws std::invalid_argument otherwise.
  explicit Queue(uint16_t max_size);

  // Back to the state after construction (device reset, §2.4).
  void reset();

  // Configuration as the virtio-mmio transport receives it (§4.2.2). Each returns false and
  // changes nothing when the write is not allowed: while the queue is ready, or (set_size) for a
  // size that is not a power of two in [1, max_size] (§2.7).
  bool set_size(uint16_t size);
  bool set_desc_table_low(uint32_t value) { return set_half(state_.desc_table, value, false); }
  bool set_desc_table_high(uint32_t value) { return set_half(state_.desc_table, value, true); }
  bool set_avail_ring_low(uint32_t value) { return set_half(state_.avail_ring, value, false); }
  bool set_avail_ring_high(uint32_t value) { return set_half(state_.avail_ring, value, true); }
  bool set_used_ring_low(uint32_t value) { return set_half(state_.used_ring, value, false); }
  bool set_used_ring_high(uint32_t value) { return set_half(state_.used_ring, value, true); }
  void set_event_idx(bool enabled) { state_.event_idx = enabled; }
  // QueueReady. Becoming ready requires each ring aligned (16/2/4, §2.7) and entirely inside
  // guest memory; returns false and stays not ready otherwise. Writing false always succeeds.
  bool set_ready(const GuestMemory& memory, bool ready);

  uint16_t max_size() const { return state_.max_size; }
  uint16_t size() const { return state_.size; }
  bool ready() const { return state_.ready; }
  // The driver broke the ring protocol (moved avail idx more than `size` ahead, or a ring became
  // unreadable); pop and add_used do nothing until reset() or restore().
  bool broken() const { return broken_; }
  uint16_t next_avail() const { return state_.next_avail; }
  uint16_t next_used() const { return state_.next_used; }

  // The next available chain, or nullopt when there is none (or the queue is not ready or is
  // broken). A chain that comes back with an error is consumed all the same: the device drops it
  // and, if its head is in range, may return it with add_used(head, 0).
  std::optional<DescriptorChain> pop(const GuestMemory& memory);
  // Puts the last popped chain back, for a device that cannot handle it yet.
  void undo_pop() { --state_.next_avail; }

  // Returns chain `head` to the driver, `len` bytes written into it (§2.7.8). False (and nothing
  // written) for a head out of range or a queue that is not ready or is broken.
  bool add_used(const GuestMemory& memory, uint16_t head, uint32_t len);

  // Whether the driver wants an interrupt for what add_used published since the last call
  // (§2.7.7): with event idx, when used idx passed used_event since then; without, unless the
  // driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
  bool needs_notification(const GuestMemory& memory);

  QueueState save() const { return state_; }
  // Replaces the state with a saved one; throws std::invalid_argument when validate_state
  // rejects it or it was saved from a queue with another max_size.
  void restore(const QueueState& state, const GuestMemory& memory);

 private:
  bool set_half(uint64_t& address, uint32_t value, bool high);
  void parse_chain(const GuestMemory& memory, DescriptorChain& chain) const;

  QueueState state_;
  bool broken_ = false;
  // used idx when needs_notification last ran; unknown after reset and restore, which makes the
  // next call notify (a spurious interrupt is harmless, a missing one hangs the driver).
  std::optional<uint16_t> signalled_used_;
};

}  // namespace msb::vmm::virtio
