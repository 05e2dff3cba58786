// The hardware-reduced ACPI sleep registers (ACPI 6.5 sections 4.8.3.7 and 4.8.3.8), only as far
// as powering off: the FADT points SLEEP_CONTROL_REG and SLEEP_STATUS_REG here, and the DSDT's
// \_S5_ names acpi::kS5SleepType. Linux's poweroff (reboot(RB_POWER_OFF)) clears WAK_STS, then
// writes SLP_TYP << 2 | SLP_EN to the control register and spins until WAK_STS is set; a write of
// S5 with SLP_EN calls the machine's callback, which ends the machine, so that spin never starts.
//
// Ports (offsets from 0x600, the device claims 0x600..0x601), one byte each: 0 sleep control,
// 1 sleep status. Other sleep types are not offered in the DSDT and are ignored. Both registers
// read as zero: SLP_EN is write-only, SLP_TYP is not kept (nothing reads it back), and WAK_STS is
// never set because the machine never sleeps, so it never wakes. The device has no state, hence
// nothing to snapshot and no lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

#include "vmm/acpi.h"
#include "vmm/io_bus.h"

namespace msb::vmm {

inline constexpr uint64_t kAcpiSleepBase = acpi::kSleepControlPort;
inline constexpr uint64_t kAcpiSleepPorts = 2;
static_assert(acpi::kSleepStatusPort == kAcpiSleepBase + 1);

class AcpiSleep : public BusDevice {
 public:
  // Register bits (ACPI 6.5 sections 4.8.3.7 and 4.8.3.8).
  static constexpr uint8_t kSleepTypeShift = 2;
  static constexpr uint8_t kSleepTypeMask = 0x7 << kSleepTypeShift;  // SLP_TYPx, bits 4:2
  static constexpr uint8_t kSleepEnable = 1 << 5;                    // SLP_EN
  static constexpr uint8_t kWakeStatus = 1 << 7;                     // WAK_STS
  // What a guest writes to power off.
  static constexpr uint8_t kPowerOff = acpi::kS5SleepType << kSleepTypeShift | kSleepEnable;

  // `on_power_off` runs on the vCPU thread that wrote the register.
  explicit AcpiSleep(std::function<void()> on_power_off);

  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

 private:
  std::function<void()> on_power_off_;
};

}  // namespace msb::vmm
