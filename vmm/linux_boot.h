// The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): where guest RAM goes, loading a
// bzImage or an ELF vmlinux, and the zero page (boot_params) with the e820 map, command line,
// initrd and ACPI RSDP address. vCPU register setup for the long-mode entry is elsewhere.
//
// Guest physical layout (all below 1 MiB is reserved for these structures):
//   0x7000      zero page (boot_params)
//   0x20000     command line
//   0xe0000     ACPI RSDP (the BIOS area where Linux also searches for it)
//   0x100000    the kernel (bzImage protected-mode part, or where an ELF's segments say)
//   ...         the initrd, as high in low RAM as the kernel allows
//   3 GiB-4 GiB no RAM: MMIO devices, IOAPIC, LAPIC; RAM beyond 3 GiB continues at 4 GiB
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "vmm/guest_memory.h"

namespace msb::vmm::boot {

inline constexpr uint64_t kZeroPageAddress = 0x7000;
inline constexpr uint64_t kCmdlineAddress = 0x20000;
inline constexpr uint64_t kCmdlineMax = 0xe0000 - kCmdlineAddress;
inline constexpr uint64_t kRsdpAddress = 0xe0000;
inline constexpr uint64_t kKernelAddress = 0x100000;
inline constexpr uint64_t kMmioGapStart = 0xc0000000;
inline constexpr uint64_t kMmioGapEnd = 0x100000000;
// The e820 map keeps [kEbdaStart, 1 MiB) reserved, as PC firmware does.
inline constexpr uint64_t kEbdaStart = 0x9fc00;

class BootError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RamRange {
  uint64_t start = 0;
  uint64_t size = 0;
  bool operator==(const RamRange&) const = default;
};

// Where `memory_size` bytes of guest RAM go: one range below the MMIO gap, the rest above 4 GiB.
std::vector<RamRange> ram_ranges(uint64_t memory_size);

struct KernelImage {
  enum class Format { kBzImage, kElf } format = Format::kBzImage;
  uint64_t entry = 0;  // guest physical address of the 64-bit entry point
  uint64_t end = 0;    // first byte above what the kernel occupies (init_size included)
  // bzImage only: the setup header, copied into the zero page.
  std::vector<std::byte> setup_header;
  uint16_t protocol = 0;
};

// Detects the format of `file`, checks it can be booted in 64-bit mode, and copies it into guest
// memory. Throws BootError naming what is wrong with the file.
KernelImage load_kernel(const GuestMemory& memory, std::span<const std::byte> file);

struct BootConfig {
  std::string cmdline;
  std::span<const std::byte> initrd;  // empty: none
  uint64_t rsdp_address = kRsdpAddress;
  std::vector<RamRange> ram;
};

struct BootInfo {
  uint64_t zero_page = kZeroPageAddress;  // goes in RSI at entry
  uint64_t entry = 0;
  uint64_t initrd_address = 0;  // 0 without an initrd
};

// Writes the command line, the initrd and the zero page. Throws BootError if the command line is
// too long for the kernel or the initrd does not fit.
BootInfo write_boot_params(const GuestMemory& memory, const KernelImage& kernel,
                           const BootConfig& config);

}  // namespace msb::vmm::boot
