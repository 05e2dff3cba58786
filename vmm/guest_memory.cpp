#include "vmm/guest_memory.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace msb::vmm {

std::string hex_address(uint64_t address) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(address));
  return text;
}

void GuestMemory::add_region(uint64_t guest_address, std::span<std::byte> host) {
  uint64_t size = host.size();
  if (size == 0 || guest_address + size < guest_address) {
    throw std::invalid_argument("guest memory region is empty or wraps around");
  }
  for (const MemoryRegion& r : regions_) {
    bool disjoint =
        guest_address + size <= r.guest_address || r.guest_address + r.host.size() <= guest_address;
    if (!disjoint) throw std::invalid_argument("guest memory regions overlap");
  }
  regions_.push_back({guest_address, host});
  std::sort(regions_.begin(), regions_.end(), [](const MemoryRegion& a, const MemoryRegion& b) {
    return a.guest_address < b.guest_address;
  });
}

std::optional<std::span<std::byte>> GuestMemory::slice(uint64_t address, uint64_t length) const {
  for (const MemoryRegion& r : regions_) {
    if (address < r.guest_address) continue;
    uint64_t offset = address - r.guest_address;
    // Written so that nothing can overflow: offset <= size, then length <= size - offset.
    if (offset > r.host.size() || length > r.host.size() - offset) continue;
    return r.host.subspan(offset, length);
  }
  return std::nullopt;
}

bool GuestMemory::read(uint64_t address, std::span<std::byte> out) const {
  auto source = slice(address, out.size());
  if (!source) return false;
  if (!out.empty()) std::memcpy(out.data(), source->data(), out.size());
  return true;
}

bool GuestMemory::write(uint64_t address, std::span<const std::byte> in) const {
  auto target = slice(address, in.size());
  if (!target) return false;
  if (!in.empty()) std::memcpy(target->data(), in.data(), in.size());
  return true;
}

}  // namespace msb::vmm
