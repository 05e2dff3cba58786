// ACPI tables for the guest: RSDP, XSDT, FADT, MADT and a DSDT.
//
// The Linux kernels msb boots (Debian's cloud kernel) have neither MP tables (no X86_MPPARSE) nor
// virtio-mmio devices on the command line (no VIRTIO_MMIO_CMDLINE_DEVICES), so ACPI is the only way
// they learn about the vCPUs, the interrupt controllers, the serial port and the virtio-mmio
// devices. The machine is "hardware-reduced" (no PM timer, no SCI, no fixed-feature registers) as
// in Firecracker and Cloud Hypervisor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "vmm/guest_memory.h"

namespace msb::vmm::acpi {

// A virtio-mmio transport: its register window and the IOAPIC pin (GSI) it raises. The window must
// lie below 4 GiB because the DSDT describes it with Memory32Fixed.
struct VirtioMmioDevice {
  uint64_t base = 0;
  uint32_t size = 0x1000;
  uint32_t gsi = 0;
};

// An ISA interrupt routed to a different GSI or with non-ISA polarity/trigger (MADT type 2).
// `flags` is the MPS INTI flags word of the ACPI spec (0: conforms to the bus, edge/active high).
struct InterruptOverride {
  uint8_t isa_irq = 0;
  uint32_t gsi = 0;
  uint16_t flags = 0;
};

struct Config {
  // The MADT gets this many Local APIC entries, ids and processor UIDs 0..cpus-1, all enabled: the
  // guest boots them all and may offline some later. 1..254 (0xff is the broadcast APIC id).
  unsigned cpus = 1;
  bool serial = true;  // COM1 (0x3f8, IRQ 4) in the DSDT
  std::vector<VirtioMmioDevice> virtio;
  // Only needed where the VMM's IRQ routing differs from the ISA identity mapping that Linux
  // assumes otherwise.
  std::vector<InterruptOverride> interrupt_overrides;
  uint64_t ioapic_address = 0xfec00000;
  uint64_t lapic_address = 0xfee00000;
};

// KVM's in-kernel IOAPIC has 24 pins, GSIs 0..23.
inline constexpr uint32_t kIoapicPins = 24;
inline constexpr uint16_t kSerialPort = 0x3f8;
inline constexpr uint32_t kSerialIrq = 4;
inline constexpr uint32_t kRsdpLength = 36;

// Power-off, the hardware-reduced way (ACPI 6.5 sections 4.8.3.7 and 4.8.3.8): the FADT's
// SLEEP_CONTROL_REG and SLEEP_STATUS_REG are one-byte I/O ports, and the DSDT's \_S5_ gives the
// SLP_TYP that means "soft off". A guest powers off by writing SLP_TYP << 2 | SLP_EN to the control
// register; vmm/devices/acpi_sleep.h is the device behind both ports.
inline constexpr uint16_t kSleepControlPort = 0x600;
inline constexpr uint16_t kSleepStatusPort = 0x601;
inline constexpr uint8_t kS5SleepType = 5;

struct TableLocation {
  uint64_t address = 0;
  uint32_t length = 0;
};

// Where each table went. `tables_end` is the first byte after the last table (which the caller
// must reserve in the E820 map along with the RSDP).
struct Result {
  TableLocation rsdp, xsdt, fadt, madt, dsdt;
  uint64_t tables_end = 0;
};

// Builds the tables and writes them into guest memory: the RSDP at `rsdp_address` (16-byte
// aligned, e.g. 0xe0000 in the legacy BIOS search area), the other tables one after another from
// `tables_address`. Throws std::invalid_argument for an invalid config or if the tables do not fit
// in guest memory; nothing is written then.
Result write_tables(const GuestMemory& memory, const Config& config, uint64_t rsdp_address,
                    uint64_t tables_address);

// The AML encoder is exposed for its unit tests.
namespace aml {
// The PkgLength encoding for a package whose contents (after the PkgLength) are `payload` bytes:
// the length it encodes includes the encoding's own 1..4 bytes. Throws above 2^28 - 1.
std::vector<uint8_t> pkg_length(size_t payload);
}  // namespace aml

}  // namespace msb::vmm::acpi
