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
inline constexpr uint32_t kMaxCpus = 64;
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
};

// Written by the kernel before it enters user mode, read-only afterwards.
extern "C" BootInfo g_boot_info;
extern "C" uint32_t g_bsp_apic_id;
// Kept by the interrupt handlers (boot.S).
extern "C" volatile uint64_t g_ticks;        // LAPIC timer interrupts on the BSP
extern "C" volatile uint64_t g_irq_count;    // every interrupt on the BSP
extern "C" volatile uint64_t g_device_irqs;  // bit GSI: that device interrupted since last taken
extern "C" volatile uint32_t g_cpus_online;

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
