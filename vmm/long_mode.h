// What a vCPU needs to start in 64-bit long mode, as the Linux 64-bit boot protocol expects:
// paging on with the low 4 GiB identity-mapped, a flat GDT, and RSI pointing at the zero page.
#pragma once

#include <linux/kvm.h>

#include <cstdint>

#include "vmm/guest_memory.h"

namespace msb::vmm::long_mode {

// Below the zero page (0x7000) and the EBDA; see vmm/linux_boot.h for the rest of the layout.
inline constexpr uint64_t kGdtAddress = 0x500;
inline constexpr uint64_t kPml4Address = 0x9000;
inline constexpr uint64_t kPdptAddress = 0xa000;
inline constexpr uint64_t kPdAddress = 0xb000;  // four page directories: 0xb000-0xefff
inline constexpr uint64_t kIdentityMapped = 4ull << 30;

// GDT selectors: the boot protocol wants __BOOT_CS (0x10) and __BOOT_DS (0x18).
inline constexpr uint16_t kCodeSelector = 0x10;
inline constexpr uint16_t kDataSelector = 0x18;

// Writes the GDT and page tables identity-mapping [0, 4 GiB) with 2 MiB pages. Throws
// std::runtime_error if guest memory does not cover [0, 0xf000).
void write_tables(const GuestMemory& memory);

// Sets segments, control registers and EFER for long mode, keeping the rest of `sregs`.
void set_special_registers(kvm_sregs& sregs);

// The registers at the kernel's 64-bit entry.
kvm_regs entry_registers(uint64_t entry, uint64_t zero_page);

}  // namespace msb::vmm::long_mode
