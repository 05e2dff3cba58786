#include "vmm/io_bus.h"

#include <stdexcept>

#include "vmm/guest_memory.h"

namespace msb::vmm {

void IoBus::add(uint64_t base, uint64_t size, BusDevice* device, std::string name) {
  if (size == 0 || base + size < base) {
    throw std::invalid_argument(name + ": empty or wrapping range at " + hex_address(base));
  }
  // The first range that starts at or after base, and the one before it.
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + size) {
    throw std::invalid_argument(name + ": range at " + hex_address(base) + " overlaps " +
                                next->second.name);
  }
  if (next != ranges_.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second.size > base) {
      throw std::invalid_argument(name + ": range at " + hex_address(base) + " overlaps " +
                                  previous->second.name);
    }
  }
  ranges_.emplace(base, Range{size, device, std::move(name)});
}

const IoBus::Range* IoBus::find(uint64_t address, uint64_t length, uint64_t& offset) const {
  auto after = ranges_.upper_bound(address);
  if (after == ranges_.begin()) return nullptr;
  const auto& [base, range] = *std::prev(after);
  offset = address - base;
  // The whole access must lie inside the range: offset + length <= size, without overflow.
  if (offset >= range.size || length > range.size - offset) return nullptr;
  return &range;
}

bool IoBus::read(uint64_t address, std::span<std::byte> data) const {
  uint64_t offset = 0;
  const Range* range = find(address, data.size(), offset);
  if (range == nullptr) return false;
  range->device->read(offset, data);
  return true;
}

bool IoBus::write(uint64_t address, std::span<const std::byte> data) const {
  uint64_t offset = 0;
  const Range* range = find(address, data.size(), offset);
  if (range == nullptr) return false;
  range->device->write(offset, data);
  return true;
}

}  // namespace msb::vmm
