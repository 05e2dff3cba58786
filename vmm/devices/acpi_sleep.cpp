#include "vmm/devices/acpi_sleep.h"

#include <cstring>

namespace msb::vmm {
namespace {

constexpr uint64_t kControlRegister = 0;

}  // namespace

AcpiSleep::AcpiSleep(std::function<void()> on_power_off) : on_power_off_(std::move(on_power_off)) {}

void AcpiSleep::read(uint64_t, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
}

void AcpiSleep::write(uint64_t offset, std::span<const std::byte> data) {
  // The FADT declares byte registers; a wider access is not a sleep request. A write to the status
  // register (WAK_STS is write-one-to-clear) has nothing to clear.
  if (offset != kControlRegister || data.size() != 1) return;
  const auto value = std::to_integer<uint8_t>(data[0]);
  // Only the SLP_TYP and SLP_EN fields count; the reserved bits are ignored, as hardware would.
  const uint8_t request = value & (kSleepTypeMask | kSleepEnable);
  if (request == kPowerOff && on_power_off_) on_power_off_();
}

}  // namespace msb::vmm
