// Guest physical memory as the VMM sees it: regions of host memory at guest physical addresses.
//
// Everything here is for reading what a guest wrote, which is untrusted: every access is checked
// against the regions (overflow included) and fails as a value, never as undefined behaviour.
// Another vCPU may change guest memory at any moment, so callers copy a structure out once
// (read_obj) and validate the copy, rather than reading a field twice.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace msb::vmm {

// A guest address as errors show it: "0x1000".
std::string hex_address(uint64_t address);

// Dirty-page bitmaps, in the layout KVM_GET_DIRTY_LOG uses and snapshots keep: bit i of word i / 64
// is page i (4 KiB) of a span of memory.
inline constexpr uint64_t kPageSize = 4096;
inline constexpr size_t bitmap_words(uint64_t pages) {
  return static_cast<size_t>((pages + 63) / 64);
}
// ORs `from` (pages [0, from_pages) of some slot) into `into` starting at page `first_page`.
void bitmap_or(std::vector<uint64_t>& into, uint64_t first_page, std::span<const uint64_t> from,
               uint64_t from_pages);
// Sets pages [first, first + count).
void bitmap_set(std::vector<uint64_t>& bitmap, uint64_t first, uint64_t count);
uint64_t bitmap_count(std::span<const uint64_t> bitmap);

// The pages of a span of host memory the VMM itself wrote (what KVM's dirty log cannot see, since
// those writes never go through the guest's page tables). Off until enable(); marking is
// lock-free, so device threads mark as they write.
class DirtyBitmap {
 public:
  explicit DirtyBitmap(uint64_t pages = 0) { reset(pages); }
  // A fresh, disabled bitmap of `pages`; not while anything marks it.
  void reset(uint64_t pages);
  uint64_t pages() const { return pages_; }
  void enable() { enabled_.store(true); }
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  // Marks the pages that [offset, offset + length) of the span touches (when enabled).
  void mark(uint64_t offset, uint64_t length);
  // The pages marked since the last call, cleared.
  std::vector<uint64_t> take();

 private:
  uint64_t pages_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
  std::atomic<bool> enabled_{false};
};

struct MemoryRegion {
  uint64_t guest_address = 0;
  std::span<std::byte> host;
};

class GuestMemory {
 public:
  // Adds a region; throws std::invalid_argument if it overlaps another or wraps around.
  void add_region(uint64_t guest_address, std::span<std::byte> host);
  const std::vector<MemoryRegion>& regions() const { return regions_; }
  // Every later write() and writable_slice() marks what it touches in `bitmap`, whose page 0 is
  // the host byte `base` (guest RAM's whole mapping). Set it before any device runs.
  void track_writes(DirtyBitmap* bitmap, const std::byte* base) {
    dirty_ = bitmap;
    dirty_base_ = base;
  }

  // The host bytes backing [address, address + length), or nullopt unless all of it lies in one
  // region. A zero length is valid anywhere inside (or at the end of) a region.
  std::optional<std::span<std::byte>> slice(uint64_t address, uint64_t length) const;
  // slice() for a caller that will write into the bytes: marks them dirty (see track_writes).
  std::optional<std::span<std::byte>> writable_slice(uint64_t address, uint64_t length) const;

  bool read(uint64_t address, std::span<std::byte> out) const;
  bool write(uint64_t address, std::span<const std::byte> in) const;

  template <class T>
  std::optional<T> read_obj(uint64_t address) const {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    if (!read(address, std::as_writable_bytes(std::span(&value, 1)))) return std::nullopt;
    return value;
  }
  template <class T>
  bool write_obj(uint64_t address, const T& value) const {
    static_assert(std::is_trivially_copyable_v<T>);
    return write(address, std::as_bytes(std::span(&value, 1)));
  }

 private:
  void mark_dirty(std::span<const std::byte> host) const;

  std::vector<MemoryRegion> regions_;  // sorted by guest_address, non-overlapping
  DirtyBitmap* dirty_ = nullptr;
  const std::byte* dirty_base_ = nullptr;
};

}  // namespace msb::vmm
