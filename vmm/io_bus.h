// Where a vCPU's port I/O and MMIO exits go: each bus maps address ranges to devices.
//
// A device is a small object with read and write operations on offsets into its own range
// (kvmtool's model). vCPU threads call the bus concurrently, so every device locks its own state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>

namespace msb::vmm {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // `offset` is relative to the start of the device's range; data.size() is 1, 2, 4 or 8.
  // A read of a register the device does not have fills `data` with zeros (or 0xff for ports,
  // as unclaimed ISA ports read); a write to one is ignored.
  virtual void read(uint64_t offset, std::span<std::byte> data) = 0;
  virtual void write(uint64_t offset, std::span<const std::byte> data) = 0;
};

class IoBus {
 public:
  // Claims [base, base + size) for `device` (not owned). Throws std::invalid_argument on an
  // overlap or an empty range; `name` appears in that error.
  void add(uint64_t base, uint64_t size, BusDevice* device, std::string name);
  // False when no device claims the whole access (the caller then ignores the write, or returns
  // all-ones for a read).
  bool read(uint64_t address, std::span<std::byte> data) const;
  bool write(uint64_t address, std::span<const std::byte> data) const;

 private:
  struct Range {
    uint64_t size;
    BusDevice* device;
    std::string name;
  };
  // Keyed by base. Ranges are only added before the vCPUs start, so reads need no lock.
  std::map<uint64_t, Range> ranges_;
  const Range* find(uint64_t address, uint64_t length, uint64_t& offset) const;
};

}  // namespace msb::vmm
