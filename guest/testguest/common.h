// What the test guest's kernel part (CPL0, kernel.cpp and boot.S) and its agent part (CPL3,
// agent.cpp and virtio.cpp) share: the boot information the kernel copied out of the loader's
// structures, the counters the interrupt handlers keep, and the machine's fixed addresses.
//
// Everything is identity mapped with the U bit set, so the agent reads these globals directly.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace testguest {

inline constexpr uint64_t kLapicBase = 0xfee00000;
inline constexpr uint64_t kIoapicBase = 0xfec00000;
// QEMU's microvm (with ioapic2) has a second IOAPIC for GSIs 24..47.
inline constexpr uint64_t kIoapic2Base = 0xfec10000;
inline constexpr uint16_t kCom1 = 0x3f8;
inline constexpr uint32_t kTimerHz = 100;
inline constexpr uint8_t kTimerVector = 0x20;
inline constexpr uint8_t kDeviceVectorBase = 0x30;  // vector = base + GSI
inline constexpr uint8_t kSyscallVector = 3;        // int3, see boot.S
// Sent by the agent to an AP it asks to go offline (g_cpu_offline_request): wakes it from `hlt`.
// Vectors from 0xf0 up are not counted in g_irq_count; 0xff is the LAPIC's spurious vector.
inline constexpr uint8_t kWakeVector = 0xf0;
// APIC ids 0..kMaxCpus-1 (xAPIC ids are 8 bits and 0xff is the broadcast id).
inline constexpr uint32_t kMaxCpus = 255;
// The AP trampoline's page below 1 MiB (msb uses 0x500-0xefff, 0x20000 and 0xe0000).
inline constexpr uint64_t kTrampolineAddr = 0x10000;
// Where `fill`/`sum` start: everything the guest itself uses lies below.
inline constexpr uint64_t kFillBase = 32ull << 20;
// Only the first 4 GiB are mapped.
inline constexpr uint64_t kMappedLimit = 4ull << 30;

struct MemRegion {
  uint64_t addr;
  uint64_t size;
};

enum class BootKind : uint32_t { kLinux64 = 1, kPvh = 2 };

struct BootInfo {
  BootKind kind;
  uint32_t ram_count;
  MemRegion ram[64];  // usable RAM (e820 type 1), as the loader reported it
  uint32_t cmdline_len;
  char cmdline[4096];  // NUL-terminated
  uint64_t rsdp;       // the ACPI RSDP's address as the loader gave it; 0: none given
};

// Where a vCPU is, by APIC id. Each AP writes its own entry; the BSP's is kCpuOnline.
enum CpuState : uint32_t { kCpuAbsent = 0, kCpuOnline = 1, kCpuOffline = 2 };

// Written by the kernel before it enters user mode, read-only afterwards.
extern "C" BootInfo g_boot_info;
extern "C" uint32_t g_bsp_apic_id;
// CPUID has long mode, without which an AP would triple fault in the trampoline (see boot.S).
extern "C" bool g_aps_startable;
// Kept by the interrupt handlers (boot.S).
extern "C" volatile uint64_t g_ticks;        // LAPIC timer interrupts on the BSP
extern "C" volatile uint64_t g_irq_count;    // every interrupt on the BSP
extern "C" volatile uint64_t g_device_irqs;  // bit GSI: that device interrupted since last taken
extern "C" volatile uint32_t g_cpus_online;
extern "C" volatile uint32_t g_cpu_state[kMaxCpus];  // CpuState by APIC id
// Set by the agent (then a kWakeVector IPI): that AP marks itself offline and parks with
// interrupts off until an INIT-SIPI-SIPI starts it again. Cleared by the agent before that.
extern "C" volatile uint32_t g_cpu_offline_request[kMaxCpus];
// The next AP to start takes its stack from here (boot.S); one 4 KiB stack per APIC id.
extern "C" uint64_t ap_stack_top;
extern "C" uint8_t g_ap_stacks[kMaxCpus][4096];

// Entered once in user mode (CPL3) on the BSP; never returns.
extern "C" [[noreturn]] void agent_main();

inline void outb(uint16_t port, uint8_t value) {
  asm volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}
inline uint8_t inb(uint16_t port) {
  uint8_t value;
  asm volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
  return value;
}
inline uint32_t mmio_read32(uint64_t addr) {
  return *reinterpret_cast<volatile uint32_t*>(addr);
}
inline void mmio_write32(uint64_t addr, uint32_t value) {
  *reinterpret_cast<volatile uint32_t*>(addr) = value;
}
inline void compiler_barrier() {
  asm volatile("" ::: "memory");
}
// A full fence without SSE2's mfence.
inline void full_barrier() {
  asm volatile("lock addl $0, (%%rsp)" ::: "memory", "cc");
}

// The local APIC, from either level (its page is mapped with the U bit like everything else).
inline constexpr uint32_t kLapicId = 0x20;
inline constexpr uint32_t kLapicIcrLow = 0x300;
inline constexpr uint32_t kLapicIcrHigh = 0x310;
inline constexpr uint32_t kIpiInit = 0x4500;     // INIT, level assert
inline constexpr uint32_t kIpiStartup = 0x4600;  // | the start page (address >> 12)
inline constexpr uint32_t kIpiFixed = 0x4000;    // | the vector
inline uint32_t lapic_read(uint32_t reg) {
  return mmio_read32(kLapicBase + reg);
}
inline void lapic_write(uint32_t reg, uint32_t value) {
  mmio_write32(kLapicBase + reg, value);
}
inline void send_ipi(uint32_t apic_id, uint32_t low) {
  lapic_write(kLapicIcrHigh, apic_id << 24);
  lapic_write(kLapicIcrLow, low);
  while (lapic_read(kLapicIcrLow) & (1u << 12)) {
  }
}

// COM1, polled (from the agent through a system call).
void serial_write(const char* text, size_t len);
void serial_print(const char* text);
void serial_print_hex(uint64_t value);
void serial_print_dec(uint64_t value);

// Freestanding string helpers (boot.S provides memcpy/memset/memmove).
extern "C" void* memcpy(void* dst, const void* src, size_t n);
extern "C" void* memset(void* dst, int c, size_t n);
extern "C" void* memmove(void* dst, const void* src, size_t n);
extern "C" int memcmp(const void* a, const void* b, size_t n);
size_t str_len(const char* s);

}  // namespace testguest
