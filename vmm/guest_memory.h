// Guest physical memory as the VMM sees it: regions of host memory at guest physical addresses.
//
// Everything here is for reading what a guest wrote, which is untrusted: every access is checked
// against the regions (overflow included) and fails as a value, never as undefined behaviour.
// Another vCPU may change guest memory at any moment, so callers copy a structure out once
// (read_obj) and validate the copy, rather than reading a field twice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace msb::vmm {

// A guest address as errors show it: "0x1000".
std::string hex_address(uint64_t address);

struct MemoryRegion {
  uint64_t guest_address = 0;
  std::span<std::byte> host;
};

class GuestMemory {
 public:
  // Adds a region; throws std::invalid_argument if it overlaps another or wraps around.
  void add_region(uint64_t guest_address, std::span<std::byte> host);
  const std::vector<MemoryRegion>& regions() const { return regions_; }

  // The host bytes backing [address, address + length), or nullopt unless all of it lies in one
  // region. A zero length is valid anywhere inside (or at the end of) a region.
  std::optional<std::span<std::byte>> slice(uint64_t address, uint64_t length) const;

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
  std::vector<MemoryRegion> regions_;  // sorted by guest_address, non-overlapping
};

}  // namespace msb::vmm
