// The test guest's kernel part: everything that must run at CPL0, kept short because CPL0 is
// emulated instruction by instruction on msb's development host. It copies the boot information
// out of the loader's structures, sets up the TSS and IDT, masks the 8259, starts the LAPIC timer,
// brings up the APs with INIT-SIPI-SIPI and then enters the agent at CPL3 for good.
#include "common.h"

namespace testguest {

extern "C" {
BootInfo g_boot_info;
uint32_t g_bsp_apic_id;
bool g_aps_startable;
volatile uint64_t g_ticks;
volatile uint64_t g_irq_count;
volatile uint64_t g_device_irqs;
volatile uint32_t g_cpus_online;
volatile uint32_t g_cpu_state[kMaxCpus];
volatile uint32_t g_cpu_offline_request[kMaxCpus];
alignas(16) uint8_t g_ap_stacks[kMaxCpus][4096];

// boot.S
extern uint64_t gdt[];
extern const uint8_t ap_trampoline_start[];
extern const uint8_t ap_trampoline_end[];
extern const uint8_t exception_stubs[];
extern const uint8_t irq_stubs[];
extern const uint8_t syscall_entry[];
[[noreturn]] void enter_user(void (*entry)(), uint64_t stack_top);
[[noreturn]] void do_power_off();
}

namespace {

constexpr uint32_t kLapicTpr = 0x80;
constexpr uint32_t kLapicSvr = 0xf0;
constexpr uint32_t kLapicLvtTimer = 0x320;
constexpr uint32_t kLapicTimerInitial = 0x380;
constexpr uint32_t kLapicTimerDivide = 0x3e0;
// KVM's and QEMU's LAPIC timers count at 1 GHz; divided by 16. boot.S re-arms with the same count.
constexpr uint32_t kLapicTimerHz = 1000000000 / 16;
static_assert(kLapicTimerHz / kTimerHz == 625000);

struct __attribute__((packed)) Tss {
  uint32_t reserved0;
  uint64_t rsp[3];
  uint64_t reserved1;
  uint64_t ist[7];
  uint64_t reserved2;
  uint16_t reserved3;
  uint16_t iomap_base;
};

struct IdtGate {
  uint16_t offset_low;
  uint16_t selector;
  uint8_t ist;
  uint8_t type_attr;
  uint16_t offset_mid;
  uint32_t offset_high;
  uint32_t reserved;
};
static_assert(sizeof(IdtGate) == 16);

struct __attribute__((packed)) DescriptorPointer {
  uint16_t limit;
  uint64_t base;
};

Tss g_tss;
alignas(16) IdtGate g_idt[256];
alignas(16) uint8_t g_kernel_stack[16384];     // RSP0: interrupts and syscalls from the agent
alignas(16) uint8_t g_user_stack[256 * 1024];  // the agent's stack

void set_gate(unsigned vector, const void* handler, uint8_t dpl) {
  uint64_t address = reinterpret_cast<uint64_t>(handler);
  IdtGate& gate = g_idt[vector];
  gate.offset_low = static_cast<uint16_t>(address);
  gate.selector = 0x08;
  gate.ist = 0;
  gate.type_attr = static_cast<uint8_t>(0x8e | (dpl << 5));  // present, 64-bit interrupt gate
  gate.offset_mid = static_cast<uint16_t>(address >> 16);
  gate.offset_high = static_cast<uint32_t>(address >> 32);
  gate.reserved = 0;
}

void load_idt() {
  DescriptorPointer pointer{sizeof(g_idt) - 1, reinterpret_cast<uint64_t>(g_idt)};
  asm volatile("lidt %0" : : "m"(pointer));
}

void copy_cmdline(uint64_t address) {
  if (address == 0 || address >= kMappedLimit) return;
  const char* source = reinterpret_cast<const char*>(address);
  uint32_t n = 0;
  while (n + 1 < sizeof(g_boot_info.cmdline) && source[n] != 0) {
    g_boot_info.cmdline[n] = source[n];
    ++n;
  }
  g_boot_info.cmdline[n] = 0;
  g_boot_info.cmdline_len = n;
}

void add_ram(uint64_t addr, uint64_t size, uint32_t type) {
  if (type != 1 || size == 0) return;
  if (g_boot_info.ram_count == sizeof(g_boot_info.ram) / sizeof(g_boot_info.ram[0])) return;
  g_boot_info.ram[g_boot_info.ram_count++] = MemRegion{addr, size};
}

// Linux boot protocol: struct boot_params ("zero page").
void read_zero_page(uint64_t zero_page) {
  const uint8_t* zp = reinterpret_cast<const uint8_t*>(zero_page);
  uint64_t cmdline = *reinterpret_cast<const uint32_t*>(zp + 0x228) |
                     static_cast<uint64_t>(*reinterpret_cast<const uint32_t*>(zp + 0x0c8)) << 32;
  copy_cmdline(cmdline);
  g_boot_info.rsdp = *reinterpret_cast<const uint64_t*>(zp + 0x070);  // acpi_rsdp_addr
  uint32_t entries = zp[0x1e8];
  if (entries > 128) entries = 128;
  for (uint32_t i = 0; i < entries; ++i) {
    const uint8_t* entry = zp + 0x2d0 + 20 * i;
    add_ram(*reinterpret_cast<const uint64_t*>(entry),
            *reinterpret_cast<const uint64_t*>(entry + 8),
            *reinterpret_cast<const uint32_t*>(entry + 16));
  }
}

// PVH: struct hvm_start_info.
void read_hvm_start_info(uint64_t info) {
  const uint8_t* si = reinterpret_cast<const uint8_t*>(info);
  if (*reinterpret_cast<const uint32_t*>(si) != 0x336ec578) {
    serial_print("testguest: bad hvm_start_info magic\n");
    return;
  }
  copy_cmdline(*reinterpret_cast<const uint64_t*>(si + 24));
  g_boot_info.rsdp = *reinterpret_cast<const uint64_t*>(si + 32);  // rsdp_paddr
  uint32_t version = *reinterpret_cast<const uint32_t*>(si + 4);
  if (version < 1) return;
  uint64_t memmap = *reinterpret_cast<const uint64_t*>(si + 40);
  uint32_t entries = *reinterpret_cast<const uint32_t*>(si + 48);
  if (memmap == 0 || memmap >= kMappedLimit) return;
  if (entries > 128) entries = 128;
  for (uint32_t i = 0; i < entries; ++i) {
    const uint8_t* entry = reinterpret_cast<const uint8_t*>(memmap) + 24 * i;
    add_ram(*reinterpret_cast<const uint64_t*>(entry),
            *reinterpret_cast<const uint64_t*>(entry + 8),
            *reinterpret_cast<const uint32_t*>(entry + 16));
  }
}

// `msb.cpus=N` from the command line; 1 when absent or malformed.
uint32_t requested_cpus() {
  const char* s = g_boot_info.cmdline;
  const char key[] = "msb.cpus=";
  for (uint32_t i = 0; s[i] != 0; ++i) {
    if ((i != 0 && s[i - 1] != ' ') || memcmp(s + i, key, sizeof(key) - 1) != 0) continue;
    uint32_t n = 0;
    const char* p = s + i + sizeof(key) - 1;
    if (*p < '0' || *p > '9') return 1;
    while (*p >= '0' && *p <= '9' && n <= kMaxCpus)
      n = n * 10 + static_cast<uint32_t>(*p++ - '0');
    if (n == 0) return 1;
    return n > kMaxCpus ? kMaxCpus : n;
  }
  return 1;
}

void cpuid(uint32_t leaf, uint32_t* eax, uint32_t* edx) {
  uint32_t ebx, ecx;
  asm volatile("cpuid" : "=a"(*eax), "=b"(ebx), "=c"(ecx), "=d"(*edx) : "a"(leaf), "c"(0));
}

// KVM lets a vCPU set EFER.LME only when its CPUID (set by the VMM) has long mode.
bool cpuid_has_long_mode() {
  uint32_t max_leaf, edx;
  cpuid(0x80000000, &max_leaf, &edx);
  if (max_leaf < 0x80000001) return false;
  uint32_t eax;
  cpuid(0x80000001, &eax, &edx);
  return (edx >> 29) & 1;
}

void wait_ticks(uint64_t n) {
  uint64_t target = g_ticks + n;
  while (g_ticks < target)
    asm volatile("sti; hlt; cli" ::: "memory");
}

// The agent starts APs the same way after a kRestore (agent.cpp, set_online_cpus).
void start_aps(uint32_t cpus) {
  for (uint32_t apic_id = 0; apic_id < cpus; ++apic_id) {
    if (apic_id == g_bsp_apic_id) continue;
    uint32_t expected = g_cpus_online + 1;
    ap_stack_top = reinterpret_cast<uint64_t>(g_ap_stacks[apic_id] + sizeof(g_ap_stacks[apic_id]));
    compiler_barrier();
    send_ipi(apic_id, kIpiInit);
    wait_ticks(1);
    constexpr uint32_t kStartup = kIpiStartup | (kTrampolineAddr >> 12);
    send_ipi(apic_id, kStartup);
    for (uint32_t attempt = 0; attempt < 100 && g_cpus_online < expected; ++attempt) {
      if (attempt == 2) send_ipi(apic_id, kStartup);  // the second SIPI, if the first was lost
      wait_ticks(1);
    }
    if (g_cpus_online < expected) {
      serial_print("testguest: error: vCPU with APIC id ");
      serial_print_dec(apic_id);
      serial_print(" did not start\n");
    }
  }
}

}  // namespace

// An AP, started by INIT-SIPI-SIPI (at boot, or by the agent after a kRestore; also after it was
// offline). It counts itself online and halts; woken with g_cpu_offline_request set, it counts
// itself offline and parks with interrupts off, which only an INIT undoes.
extern "C" [[noreturn]] void ap_main() {
  load_idt();
  lapic_write(kLapicTpr, 0);
  lapic_write(kLapicSvr, 0x1ff);
  uint32_t id = lapic_read(kLapicId) >> 24;
  while (id >= kMaxCpus)  // never: only ids below kMaxCpus are started
    asm volatile("cli; hlt" ::: "memory");
  // Counted before its state says online: whoever waits for the state then sees the count.
  asm volatile("lock incl %0" : "+m"(g_cpus_online));
  g_cpu_state[id] = kCpuOnline;
  for (;;) {
    // Interrupts are off here, so a wake-up that comes after this check is pending at `sti`.
    if (g_cpu_offline_request[id] != 0) {
      asm volatile("lock decl %0" : "+m"(g_cpus_online));
      g_cpu_state[id] = kCpuOffline;
      for (;;)
        asm volatile("cli; hlt" ::: "memory");
    }
    asm volatile("sti; hlt; cli" ::: "memory");
  }
}

struct ExceptionFrame {
  uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
  uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

extern "C" [[noreturn]] void exception_handler(const ExceptionFrame* frame) {
  uint64_t cr2;
  asm volatile("mov %%cr2, %0" : "=r"(cr2));
  serial_print("testguest: error: exception ");
  serial_print_dec(frame->vector);
  serial_print(" error ");
  serial_print_hex(frame->error);
  serial_print(" rip ");
  serial_print_hex(frame->rip);
  serial_print(" cs ");
  serial_print_hex(frame->cs);
  serial_print(" rsp ");
  serial_print_hex(frame->rsp);
  serial_print(" cr2 ");
  serial_print_hex(cr2);
  serial_print("; powering off\n");
  do_power_off();
}

extern "C" void kernel_main(uint64_t boot_pointer, uint32_t kind) {
  // Copy what we need out of the loader's structures before anything below 1 MiB is reused.
  g_boot_info.kind = static_cast<BootKind>(kind);
  if (g_boot_info.kind == BootKind::kLinux64)
    read_zero_page(boot_pointer);
  else
    read_hvm_start_info(boot_pointer);

  // TSS (RSP0 for interrupts and syscalls from CPL3).
  g_tss.rsp[0] = reinterpret_cast<uint64_t>(g_kernel_stack + sizeof(g_kernel_stack));
  g_tss.iomap_base = sizeof(Tss);
  uint64_t tss = reinterpret_cast<uint64_t>(&g_tss);
  gdt[5] = (sizeof(Tss) - 1) | (tss & 0xffffff) << 16 | 0x89ull << 40 | ((tss >> 24) & 0xff) << 56;
  gdt[6] = tss >> 32;
  asm volatile("ltr %w0" : : "r"(0x28));

  for (unsigned v = 0; v < 32; ++v)
    set_gate(v, exception_stubs + 16 * v, 0);
  for (unsigned v = 32; v < 256; ++v)
    set_gate(v, irq_stubs + 16 * (v - 32), 0);
  set_gate(kSyscallVector, syscall_entry, 3);
  load_idt();

  // Mask the 8259s; everything comes through the LAPIC and IOAPIC.
  outb(0x21, 0xff);
  outb(0xa1, 0xff);

  g_bsp_apic_id = lapic_read(kLapicId) >> 24;
  lapic_write(kLapicTpr, 0);
  lapic_write(kLapicSvr, 0x1ff);              // enabled, spurious vector 0xff
  lapic_write(kLapicTimerDivide, 0x3);        // divide by 16
  lapic_write(kLapicLvtTimer, kTimerVector);  // one-shot, re-armed by each tick
  lapic_write(kLapicTimerInitial, kLapicTimerHz / kTimerHz);
  g_cpus_online = 1;
  if (g_bsp_apic_id < kMaxCpus) g_cpu_state[g_bsp_apic_id] = kCpuOnline;
  // The AP trampoline stays there: the agent starts APs with it too.
  memcpy(reinterpret_cast<void*>(kTrampolineAddr), ap_trampoline_start,
         static_cast<size_t>(ap_trampoline_end - ap_trampoline_start));

  g_aps_startable = cpuid_has_long_mode();
  uint32_t cpus = requested_cpus();
  if (cpus > 1 && !g_aps_startable) {
    serial_print(
        "testguest: error: CPUID shows no long mode (did the VMM set CPUID?): APs would triple "
        "fault entering long mode, not starting them\n");
  } else if (cpus > 1) {
    start_aps(cpus);
  }

  enter_user(agent_main, reinterpret_cast<uint64_t>(g_user_stack + sizeof(g_user_stack)));
}

// Serial output is shared with the agent, which goes through a system call.
void serial_write(const char* text, size_t len) {
  uint16_t cs;
  asm volatile("mov %%cs, %0" : "=r"(cs));
  if ((cs & 3) == 3) {
    uint64_t rax = 2;
    asm volatile("int3" : "+a"(rax), "+D"(text), "+S"(len) : : "rdx", "memory");
    return;
  }
  for (size_t i = 0; i < len; ++i) {
    if (text[i] == '\n') outb(kCom1, '\r');
    outb(kCom1, static_cast<uint8_t>(text[i]));
  }
}

size_t str_len(const char* s) {
  size_t n = 0;
  while (s[n] != 0)
    ++n;
  return n;
}

void serial_print(const char* text) {
  serial_write(text, str_len(text));
}

void serial_print_hex(uint64_t value) {
  char text[19] = "0x";
  for (int i = 0; i < 16; ++i)
    text[2 + i] = "0123456789abcdef"[(value >> (60 - 4 * i)) & 0xf];
  text[18] = 0;
  serial_print(text);
}

void serial_print_dec(uint64_t value) {
  char text[21];
  int i = 20;
  text[i] = 0;
  do {
    text[--i] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0);
  serial_print(text + i);
}

}  // namespace testguest
