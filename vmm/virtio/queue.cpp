#include "vmm/virtio/queue.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <stdexcept>

namespace msb::vmm::virtio {
namespace {

constexpr bool is_power_of_two(uint32_t n) {
  return n != 0 && (n & (n - 1)) == 0;
}

// Field offsets inside the rings (§2.7.6, §2.7.8).
constexpr uint64_t kRingIdxOffset = 2;
constexpr uint64_t kRingEntriesOffset = 4;
uint64_t avail_entry(uint64_t avail_ring, uint16_t index) {
  return avail_ring + 4 + 2ull * index;
}
uint64_t used_event_address(uint64_t avail_ring, uint16_t size) {
  return avail_ring + 4 + 2ull * size;
}
uint64_t used_entry(uint64_t used_ring, uint16_t index) {
  return used_ring + 4 + 8ull * index;
}
uint64_t avail_event_address(uint64_t used_ring, uint16_t size) {
  return used_ring + 4 + 8ull * size;
}

// vring_need_event (§2.7.7, and the spec's virtio_ring.h): whether moving used idx from `old_idx`
// to `new_idx` crossed `event_idx`, all in wrapping 16-bit arithmetic.
bool need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event_idx - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

std::optional<std::string> check_ring(const GuestMemory& memory, const char* name, uint64_t address,
                                      uint64_t alignment, uint64_t length) {
  if (address % alignment != 0) {
    return std::string(name) + " is not " + std::to_string(alignment) + "-byte aligned";
  }
  if (!memory.slice(address, length)) return std::string(name) + " is not inside guest memory";
  return std::nullopt;
}

}  // namespace

std::string_view to_string(ChainError error) {
  switch (error) {
    case ChainError::kNone:
      return "no error";
    case ChainError::kHeadOutOfRange:
      return "head index out of range";
    case ChainError::kNextOutOfRange:
      return "next index out of range";
    case ChainError::kChainTooLong:
      return "chain longer than the queue size (or a loop)";
    case ChainError::kDescriptorUnreadable:
      return "descriptor unreadable";
    case ChainError::kAddressOverflow:
      return "buffer address + length overflows";
    case ChainError::kBufferOutsideMemory:
      return "buffer outside guest memory";
    case ChainError::kTooManyBytes:
      return "chain longer than 2^32 - 1 bytes";
    case ChainError::kReadableAfterWritable:
      return "readable descriptor after a writable one";
    case ChainError::kIndirectWithNext:
      return "indirect descriptor with NEXT";
    case ChainError::kNestedIndirect:
      return "nested indirect descriptor";
    case ChainError::kIndirectBadLength:
      return "indirect table length not a multiple of 16";
    case ChainError::kIndirectTooLong:
      return "indirect table longer than the queue size";
    case ChainError::kIndirectOutsideMemory:
      return "indirect table outside guest memory";
  }
  return "unknown error";
}

// ---- DescriptorChain ----

uint64_t DescriptorChain::readable_length() const {
  uint64_t total = 0;
  for (const Descriptor& d : descriptors_) {
    if (!d.write_only) total += d.len;
  }
  return total;
}

uint64_t DescriptorChain::writable_length() const {
  uint64_t total = 0;
  for (const Descriptor& d : descriptors_) {
    if (d.write_only) total += d.len;
  }
  return total;
}

// Walks the readable (or writable) descriptors, calling copy(guest_address, position, count)
// for each piece of [offset, offset + length) of that part; stops early when copy fails.
template <bool kWritable, class Copy>
size_t DescriptorChain::copy_part(uint64_t offset, uint64_t length, Copy copy) const {
  uint64_t done = 0;
  for (const Descriptor& d : descriptors_) {
    if (d.write_only != kWritable) continue;
    if (done == length) break;
    if (offset >= d.len) {
      offset -= d.len;
      continue;
    }
    uint64_t count = std::min<uint64_t>(d.len - offset, length - done);
    if (!copy(d.addr + offset, done, count)) break;
    done += count;
    offset = 0;
  }
  return static_cast<size_t>(done);
}

size_t DescriptorChain::gather(const GuestMemory& memory, std::span<std::byte> out,
                               uint64_t offset) const {
  return copy_part<false>(offset, out.size(), [&](uint64_t address, uint64_t at, uint64_t count) {
    return memory.read(address, out.subspan(at, count));
  });
}

std::vector<std::byte> DescriptorChain::gather_readable(const GuestMemory& memory,
                                                        size_t cap) const {
  std::vector<std::byte> bytes(std::min<uint64_t>(readable_length(), cap));
  bytes.resize(gather(memory, bytes));
  return bytes;
}

size_t DescriptorChain::scatter(const GuestMemory& memory, std::span<const std::byte> in,
                                uint64_t offset) const {
  return copy_part<true>(offset, in.size(), [&](uint64_t address, uint64_t at, uint64_t count) {
    return memory.write(address, in.subspan(at, count));
  });
}

// ---- QueueState ----

std::optional<std::string> validate_state(const QueueState& state, const GuestMemory& memory) {
  if (!is_power_of_two(state.max_size) || state.max_size > kMaxQueueSize) {
    return "maximum queue size " + std::to_string(state.max_size) +
           " is not a power of two in [1, 32768]";
  }
  if (!is_power_of_two(state.size) || state.size > state.max_size) {
    return "queue size " + std::to_string(state.size) + " is not a power of two in [1, " +
           std::to_string(state.max_size) + "]";
  }
  // A queue that is not ready has not been checked yet: the driver may still be writing its
  // addresses, so only a ready one must point at valid rings.
  if (!state.ready) return std::nullopt;
  if (auto e = check_ring(memory, "descriptor table", state.desc_table, 16,
                          desc_table_bytes(state.size))) {
    return e;
  }
  if (auto e =
          check_ring(memory, "available ring", state.avail_ring, 2, avail_ring_bytes(state.size))) {
    return e;
  }
  return check_ring(memory, "used ring", state.used_ring, 4, used_ring_bytes(state.size));
}

// ---- Queue ----

Queue::Queue(uint16_t max_size) {
  if (!is_power_of_two(max_size) || max_size > kMaxQueueSize) {
    throw std::invalid_argument("virtqueue maximum size must be a power of two in [1, 32768]");
  }
  state_.max_size = max_size;
  reset();
}

void Queue::reset() {
  // The size defaults to the maximum, so that a driver that never writes QueueNum gets the
  // device's queue.
  state_ = QueueState{.max_size = state_.max_size, .size = state_.max_size};
  broken_ = false;
  signalled_used_.reset();
}

bool Queue::set_size(uint16_t size) {
  if (state_.ready || !is_power_of_two(size) || size > state_.max_size) return false;
  state_.size = size;
  return true;
}

bool Queue::set_half(uint64_t& address, uint32_t value, bool high) {
  if (state_.ready) return false;
  if (high) {
    address = (address & 0xffff'ffffull) | (uint64_t{value} << 32);
  } else {
    address = (address & ~0xffff'ffffull) | value;
  }
  return true;
}

bool Queue::set_ready(const GuestMemory& memory, bool ready) {
  if (!ready) {
    state_.ready = false;
    return true;
  }
  QueueState candidate = state_;
  candidate.ready = true;
  if (validate_state(candidate, memory)) return false;
  state_.ready = true;
  return true;
}

void Queue::restore(const QueueState& state, const GuestMemory& memory) {
  if (state.max_size != state_.max_size) {
    throw std::invalid_argument("virtqueue state is for a queue of maximum size " +
                                std::to_string(state.max_size) + ", not " +
                                std::to_string(state_.max_size));
  }
  if (auto error = validate_state(state, memory)) {
    throw std::invalid_argument("invalid virtqueue state: " + *error);
  }
  state_ = state;
  broken_ = false;
  signalled_used_.reset();
}

std::optional<DescriptorChain> Queue::pop(const GuestMemory& memory) {
  if (!state_.ready || broken_) return std::nullopt;
  const uint16_t size = state_.size;

  // avail idx is read once; what the driver writes after that is seen on the next pop.
  auto avail_idx = memory.read_obj<uint16_t>(state_.avail_ring + kRingIdxOffset);
  if (!avail_idx) {
    broken_ = true;
    return std::nullopt;
  }
  uint16_t pending = *avail_idx - state_.next_avail;
  if (pending == 0 && state_.event_idx) {
    // About to go idle: ask for a notification at the next entry (avail_event, §2.7.10), then
    // look again, since the driver may have added one before it saw the new avail_event and so
    // decided not to notify. The full fence orders our store before the re-read of avail idx,
    // pairing with the driver's fence between its avail idx store and its avail_event load.
    memory.write_obj<uint16_t>(avail_event_address(state_.used_ring, size), state_.next_avail);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    avail_idx = memory.read_obj<uint16_t>(state_.avail_ring + kRingIdxOffset);
    if (!avail_idx) {
      broken_ = true;
      return std::nullopt;
    }
    pending = *avail_idx - state_.next_avail;
  }
  if (pending == 0) return std::nullopt;
  if (pending > size) {
    // The driver claims more new entries than the ring's `size` slots can hold (§2.7.6): it is
    // not following the protocol, and some entries we would read were already overwritten.
    // Reporting it (DEVICE_NEEDS_RESET) beats guessing which requests it meant.
    broken_ = true;
    return std::nullopt;
  }
  // The ring entry and the descriptors it leads to were written before avail idx was published
  // (§2.7.13.3); the acquire fence keeps our reads of them after our read of avail idx.
  std::atomic_thread_fence(std::memory_order_acquire);

  auto head = memory.read_obj<uint16_t>(avail_entry(state_.avail_ring, state_.next_avail % size));
  if (!head) {
    broken_ = true;
    return std::nullopt;
  }
  ++state_.next_avail;

  DescriptorChain chain;
  chain.head_ = *head;
  parse_chain(memory, chain);
  if (!chain.ok()) chain.descriptors_.clear();
  return chain;
}

void Queue::parse_chain(const GuestMemory& memory, DescriptorChain& chain) const {
  const uint16_t size = state_.size;
  // The table being walked: the descriptor table, or an indirect table (§2.7.5.3).
  uint64_t table = state_.desc_table;
  uint32_t table_entries = size;
  bool in_indirect = false;
  uint32_t index = chain.head_;
  if (index >= table_entries) {
    chain.error_ = ChainError::kHeadOutOfRange;
    return;
  }
  uint32_t count = 0;
  uint64_t total_bytes = 0;
  bool seen_writable = false;
  for (;;) {
    // Each descriptor visited counts, indirect ones included, and no chain may be longer than
    // the queue (§2.7.5.3.1): this bounds the walk, so a loop ends here too.
    if (++count > size) {
      chain.error_ = ChainError::kChainTooLong;
      return;
    }
    auto desc = memory.read_obj<VirtqDesc>(table + 16ull * index);
    if (!desc) {
      chain.error_ = ChainError::kDescriptorUnreadable;
      return;
    }
    if (desc->flags & kDescFIndirect) {
      // Not within an indirect table, not with NEXT (§2.7.5.3.1); its write flag is ignored
      // (§2.7.5.3.2).
      if (in_indirect) {
        chain.error_ = ChainError::kNestedIndirect;
        return;
      }
      if (desc->flags & kDescFNext) {
        chain.error_ = ChainError::kIndirectWithNext;
        return;
      }
      if (desc->len == 0 || desc->len % 16 != 0) {
        chain.error_ = ChainError::kIndirectBadLength;
        return;
      }
      if (desc->len / 16 > size) {
        chain.error_ = ChainError::kIndirectTooLong;
        return;
      }
      if (!memory.slice(desc->addr, desc->len)) {
        chain.error_ = ChainError::kIndirectOutsideMemory;
        return;
      }
      // The indirect descriptor itself is no buffer; its table's first entry comes next.
      --count;
      table = desc->addr;
      table_entries = desc->len / 16;
      in_indirect = true;
      index = 0;
      continue;
    }
    if (desc->len != 0 && desc->addr + desc->len < desc->addr) {
      chain.error_ = ChainError::kAddressOverflow;
      return;
    }
    if (!memory.slice(desc->addr, desc->len)) {
      chain.error_ = ChainError::kBufferOutsideMemory;
      return;
    }
    total_bytes += desc->len;
    if (total_bytes > std::numeric_limits<uint32_t>::max()) {
      chain.error_ = ChainError::kTooManyBytes;
      return;
    }
    const bool write_only = desc->flags & kDescFWrite;
    if (seen_writable && !write_only) {
      chain.error_ = ChainError::kReadableAfterWritable;
      return;
    }
    seen_writable = write_only;
    chain.descriptors_.push_back({desc->addr, desc->len, write_only});
    if (!(desc->flags & kDescFNext)) return;
    index = desc->next;
    if (index >= table_entries) {
      chain.error_ = ChainError::kNextOutOfRange;
      return;
    }
  }
}

bool Queue::add_used(const GuestMemory& memory, uint16_t head, uint32_t len) {
  if (!state_.ready || broken_ || head >= state_.size) return false;
  const VirtqUsedElem elem{head, len};
  if (!memory.write_obj(used_entry(state_.used_ring, state_.next_used % state_.size), elem)) {
    broken_ = true;
    return false;
  }
  // The driver reads the entry once it sees used idx move (§2.7.8): the release fence makes
  // the entry visible no later than the new idx.
  std::atomic_thread_fence(std::memory_order_release);
  ++state_.next_used;
  if (!memory.write_obj<uint16_t>(state_.used_ring + kRingIdxOffset, state_.next_used)) {
    broken_ = true;
    return false;
  }
  return true;
}

bool Queue::needs_notification(const GuestMemory& memory) {
  if (!state_.ready) return false;
  // Our used idx store must be visible before we read the driver's suppression fields, or the
  // driver might re-enable interrupts after seeing the old idx while we read the old flags
  // (§2.7.7); only a full fence orders a store before a later load.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint16_t new_used = state_.next_used;
  const std::optional<uint16_t> old_used = signalled_used_;
  signalled_used_ = new_used;
  if (state_.event_idx) {
    // With VIRTIO_F_EVENT_IDX the device ignores the avail flags and uses used_event (§2.7.7).
    auto used_event = memory.read_obj<uint16_t>(used_event_address(state_.avail_ring, state_.size));
    if (!used_event || !old_used) return true;
    return need_event(*used_event, new_used, *old_used);
  }
  auto flags = memory.read_obj<uint16_t>(state_.avail_ring);
  return !flags || !(*flags & kAvailFNoInterrupt);
}

}  // namespace msb::vmm::virtio
