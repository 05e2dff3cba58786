#include "vmm/long_mode.h"

#include <stdexcept>

namespace msb::vmm::long_mode {
namespace {

constexpr uint64_t kPresent = 1 << 0, kWritable = 1 << 1, kHuge = 1 << 7;
constexpr uint64_t kCr0Pe = 1 << 0, kCr0Pg = 1ull << 31;
constexpr uint64_t kCr4Pae = 1 << 5;
constexpr uint64_t kEferLme = 1 << 8, kEferLma = 1 << 10;

// A GDT descriptor from base, limit and the access/flag bits (Intel SDM vol. 3, 3.4.5).
constexpr uint64_t descriptor(uint16_t flags, uint32_t base, uint32_t limit) {
  return (uint64_t{base & 0xff000000} << 32) | (static_cast<uint64_t>(flags & 0xf0ff) << 40) |
         (uint64_t{limit & 0x000f0000} << 32) | (uint64_t{base & 0x00ffffff} << 16) |
         uint64_t{limit & 0x0000ffff};
}

// Present, ring 0: 64-bit code (L bit) and writable data, 4 GiB granular.
constexpr uint64_t kGdt[] = {
    0, 0, descriptor(0xa09b, 0, 0xfffff),  // 0x10 code
    descriptor(0xc093, 0, 0xfffff),        // 0x18 data
};

kvm_segment segment(uint64_t entry, uint16_t selector) {
  kvm_segment s{};
  s.base = ((entry >> 16) & 0xff000000) | ((entry >> 16) & 0x00ffffff);
  s.limit = static_cast<uint32_t>(((entry >> 32) & 0x000f0000) | (entry & 0x0000ffff));
  s.selector = selector;
  s.type = (entry >> 40) & 0xf;
  s.s = (entry >> 44) & 1;
  s.dpl = (entry >> 45) & 3;
  s.present = (entry >> 47) & 1;
  s.avl = (entry >> 52) & 1;
  s.l = (entry >> 53) & 1;
  s.db = (entry >> 54) & 1;
  s.g = (entry >> 55) & 1;
  if (s.g) s.limit = (s.limit << 12) | 0xfff;
  return s;
}

void must(bool ok) {
  if (!ok) throw std::runtime_error("guest memory does not cover the boot page tables and GDT");
}

}  // namespace

void write_tables(const GuestMemory& memory) {
  for (size_t i = 0; i < std::size(kGdt); ++i)
    must(memory.write_obj(kGdtAddress + 8 * i, kGdt[i]));
  must(memory.write_obj(kPml4Address, kPdptAddress | kPresent | kWritable));
  for (uint64_t i = 0; i < 512; ++i) {
    // One PDPT entry per GiB, each to a page directory of 512 2-MiB pages.
    uint64_t pdpt_entry = i < 4 ? (kPdAddress + i * 0x1000) | kPresent | kWritable : 0;
    must(memory.write_obj(kPdptAddress + 8 * i, pdpt_entry));
  }
  for (uint64_t i = 0; i < 4 * 512; ++i) {
    must(memory.write_obj(kPdAddress + 8 * i, (i << 21) | kPresent | kWritable | kHuge));
  }
}

void set_special_registers(kvm_sregs& sregs) {
  sregs.gdt.base = kGdtAddress;
  sregs.gdt.limit = sizeof kGdt - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;  // no IDT until the kernel builds one: any exception is a triple fault
  sregs.cs = segment(kGdt[kCodeSelector / 8], kCodeSelector);
  kvm_segment data = segment(kGdt[kDataSelector / 8], kDataSelector);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.cr3 = kPml4Address;
  sregs.cr4 |= kCr4Pae;
  sregs.cr0 |= kCr0Pe | kCr0Pg;
  sregs.efer |= kEferLme | kEferLma;
}

kvm_regs entry_registers(uint64_t entry, uint64_t zero_page) {
  kvm_regs regs{};
  regs.rip = entry;
  regs.rsi = zero_page;
  regs.rflags = 2;  // bit 1 is reserved and always set; interrupts off
  return regs;
}

}  // namespace msb::vmm::long_mode
