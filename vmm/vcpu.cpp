#include "vmm/vcpu.h"

#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>

#include "vmm/cpuid.h"
#include "vmm/emulation.h"
#include "vmm/guest_memory.h"
#include "vmm/hypercall_probe.h"
#include "vmm/kvm.h"
#include "vmm/long_mode.h"

namespace msb::vmm {

int kick_signal() {
  // Its handler does nothing: the point is the EINTR.
  static const int signal = [] {
    const int number = SIGRTMIN + 1;
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must come back with EINTR
    ::sigaction(number, &action, nullptr);
    return number;
  }();
  return signal;
}

namespace {

// MSRs every vCPU starts with, as Firecracker and QEMU set them: syscall MSRs cleared, fast string
// operations enabled, and write-back as the default memory type with MTRRs on.
constexpr uint32_t kMsrIa32SysenterCs = 0x174;
constexpr uint32_t kMsrIa32SysenterEsp = 0x175;
constexpr uint32_t kMsrIa32SysenterEip = 0x176;
constexpr uint32_t kMsrStar = 0xc0000081;
constexpr uint32_t kMsrLstar = 0xc0000082;
constexpr uint32_t kMsrCstar = 0xc0000083;
constexpr uint32_t kMsrSyscallMask = 0xc0000084;
constexpr uint32_t kMsrKernelGsBase = 0xc0000102;
constexpr uint32_t kMsrIa32Tsc = 0x10;
constexpr uint32_t kMsrIa32MiscEnable = 0x1a0;
constexpr uint64_t kMiscEnableFastString = 1;
constexpr uint32_t kMsrMtrrDefType = 0x2ff;
constexpr uint64_t kMtrrEnableWriteBack = (1u << 11) | 6;

// LAPIC register offsets and delivery modes for the local interrupt pins.
constexpr size_t kApicLvtLint0 = 0x350;
constexpr size_t kApicLvtLint1 = 0x360;
constexpr uint32_t kApicModeExtInt = 7;
constexpr uint32_t kApicModeNmi = 4;

uint32_t set_delivery_mode(uint32_t lvt, uint32_t mode) {
  return (lvt & ~0x700u) | (mode << 8);
}

constexpr uint64_t kCr0Pe = 1u << 0;
constexpr uint64_t kCr0Mp = 1u << 1;
constexpr uint64_t kCr0Ts = 1u << 3;
constexpr uint64_t kEferLma = 1u << 10;
constexpr uint64_t kRflagsVm = 1u << 17;
constexpr uint8_t kBreakpointVector = 3;

emulation::CodeMode code_mode(const kvm_sregs& sregs) {
  if ((sregs.efer & kEferLma) && sregs.cs.l) return emulation::CodeMode::k64;
  return sregs.cs.db ? emulation::CodeMode::k32 : emulation::CodeMode::k16;
}

unsigned current_privilege_level(const kvm_sregs& sregs, const kvm_regs& regs) {
  if (!(sregs.cr0 & kCr0Pe)) return 0;
  if (regs.rflags & kRflagsVm) return 3;
  return sregs.cs.selector & 3;
}

// RIP wraps at the code segment's operand size.
uint64_t advance_rip(uint64_t rip, size_t length, emulation::CodeMode mode) {
  const uint64_t next = rip + length;
  switch (mode) {
    case emulation::CodeMode::k64:
      return next;
    case emulation::CodeMode::k32:
      return next & 0xffffffff;
    case emulation::CodeMode::k16:
      break;
  }
  return next & 0xffff;
}

}  // namespace

Vcpu::Vcpu(int vm_fd, unsigned index, size_t run_size) : index_(index), run_size_(run_size) {
  kick_signal();
  fd_.reset(kvm::ioctl_or_throw(vm_fd, KVM_CREATE_VCPU, static_cast<unsigned long>(index),
                                where() + ": KVM_CREATE_VCPU"));
  void* page = ::mmap(nullptr, run_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (page == MAP_FAILED) {
    throw VmmError(where() + ": mapping kvm_run: " + std::strerror(errno));
  }
  run_ = static_cast<kvm_run*>(page);
}

Vcpu::~Vcpu() {
  if (run_) ::munmap(run_, run_size_);
}

std::string Vcpu::where() const {
  return "vCPU " + std::to_string(index_);
}

void Vcpu::configure(const std::optional<std::vector<kvm_cpuid_entry2>>& supported_cpuid,
                     bool set_msrs, unsigned cpu_count) {
  if (supported_cpuid) {
    // Probed (once per process, only without VMX/SVM) only when there is something to hide.
    const bool hypercalls_work =
        !cpuid::offers_hypercall_features(*supported_cpuid) || hypercall_probe::hypercalls_work();
    auto entries = cpuid::for_vcpu(*supported_cpuid, index_, cpu_count, hypercalls_work);
    if (entries.size() > kvm::kMaxCpuidEntries) throw VmmError(where() + ": CPUID table too large");
    auto table = std::make_unique<kvm::CpuidTable>();
    table->nent = static_cast<uint32_t>(entries.size());
    std::copy(entries.begin(), entries.end(), table->entries);
    kvm::ioctl_or_throw(fd_.get(), kvm::kSetCpuid2, table.get(), where() + ": KVM_SET_CPUID2");
  }

  if (set_msrs) set_boot_msrs();
  set_lapic_lines();
}

void Vcpu::set_boot_msrs() {
  struct Msr {
    uint32_t index;
    uint64_t value;
  };
  const Msr boot_msrs[] = {
      {kMsrIa32SysenterCs, 0},
      {kMsrIa32SysenterEsp, 0},
      {kMsrIa32SysenterEip, 0},
      {kMsrStar, 0},
      {kMsrCstar, 0},
      {kMsrKernelGsBase, 0},
      {kMsrSyscallMask, 0},
      {kMsrLstar, 0},
      {kMsrIa32Tsc, 0},
      {kMsrIa32MiscEnable, kMiscEnableFastString},
      {kMsrMtrrDefType, kMtrrEnableWriteBack},
  };
  constexpr size_t kCount = std::size(boot_msrs);
  kvm::MsrTable<kCount> msrs{};
  msrs.nmsrs = kCount;
  for (size_t i = 0; i < kCount; ++i) {
    msrs.entries[i].index = boot_msrs[i].index;
    msrs.entries[i].data = boot_msrs[i].value;
  }
  // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set.
  int set = kvm::ioctl_or_throw(fd_.get(), kvm::kSetMsrs, &msrs, where() + ": KVM_SET_MSRS");
  if (static_cast<size_t>(set) != kCount) {
    char index[16];
    std::snprintf(index, sizeof index, "%#x", boot_msrs[set].index);
    throw VmmError(where() + ": KVM refused to set MSR " + index);
  }
}

void Vcpu::set_lapic_lines() {
  // LINT0 takes the legacy PIC's interrupts (ExtINT), LINT1 is the NMI pin: what firmware sets up
  // and what Linux expects to find before it switches to the IOAPIC.
  kvm_lapic_state lapic{};
  kvm::ioctl_or_throw(fd_.get(), KVM_GET_LAPIC, &lapic, where() + ": KVM_GET_LAPIC");
  auto lvt = [&](size_t offset) -> uint32_t& {
    return *reinterpret_cast<uint32_t*>(lapic.regs + offset);
  };
  lvt(kApicLvtLint0) = set_delivery_mode(lvt(kApicLvtLint0), kApicModeExtInt);
  lvt(kApicLvtLint1) = set_delivery_mode(lvt(kApicLvtLint1), kApicModeNmi);
  kvm::ioctl_or_throw(fd_.get(), KVM_SET_LAPIC, &lapic, where() + ": KVM_SET_LAPIC");
}

void Vcpu::set_boot_registers(uint64_t entry, uint64_t zero_page) {
  kvm_sregs sregs{};
  kvm::ioctl_or_throw(fd_.get(), KVM_GET_SREGS, &sregs, where() + ": KVM_GET_SREGS");
  long_mode::set_special_registers(sregs);
  kvm::ioctl_or_throw(fd_.get(), KVM_SET_SREGS, &sregs, where() + ": KVM_SET_SREGS");
  kvm_regs regs = long_mode::entry_registers(entry, zero_page);
  kvm::ioctl_or_throw(fd_.get(), KVM_SET_REGS, &regs, where() + ": KVM_SET_REGS");
  // The x87 and SSE control words as after FNINIT and at reset.
  kvm_fpu fpu{};
  fpu.fcw = 0x37f;
  fpu.mxcsr = 0x1f80;
  kvm::ioctl_or_throw(fd_.get(), KVM_SET_FPU, &fpu, where() + ": KVM_SET_FPU");
}

void PauseGate::wait_parked(const std::atomic<bool>& stopping) {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return parked_ >= alive_ || stopping.load(); });
}

void PauseGate::release() {
  {
    std::lock_guard lock(mutex_);
    requested_.store(false);
  }
  changed_.notify_all();
}

void PauseGate::wake() {
  // Taking the lock orders this notify after any waiter's check of the predicate.
  { std::lock_guard lock(mutex_); }
  changed_.notify_all();
}

void PauseGate::enter() {
  std::lock_guard lock(mutex_);
  ++alive_;
}

void PauseGate::leave() {
  {
    std::lock_guard lock(mutex_);
    --alive_;
  }
  changed_.notify_all();
}

void PauseGate::park(const std::atomic<bool>& stopping) {
  std::unique_lock lock(mutex_);
  ++parked_;
  changed_.notify_all();
  changed_.wait(lock, [&] { return !requested_.load() || stopping.load(); });
  --parked_;
}

int Vcpu::kvmclock_ctrl() {
  if (::ioctl(fd_.get(), KVM_KVMCLOCK_CTRL, 0) == 0) return 0;
  return errno;
}

void Vcpu::kick() {
  // immediate_exit covers a kick that lands before KVM_RUN is entered; the signal one that lands
  // while the vCPU is inside it.
  __atomic_store_n(&run_->immediate_exit, 1, __ATOMIC_SEQ_CST);
  if (running_.load()) ::pthread_kill(thread_.load(), kick_signal());
}

std::optional<MachineExit> Vcpu::run(const IoBus& ports, const IoBus& mmio,
                                     const std::atomic<bool>& stopping, PauseGate* gate) {
  thread_.store(::pthread_self());
  running_.store(true);
  struct Running {
    std::atomic<bool>& flag;
    ~Running() { flag.store(false); }
  } running{running_};
  // Whoever started this thread may have blocked signals; the kick must get through.
  sigset_t kick_set;
  sigemptyset(&kick_set);
  sigaddset(&kick_set, kick_signal());
  ::pthread_sigmask(SIG_UNBLOCK, &kick_set, nullptr);

  while (!stopping.load()) {
    if (gate && gate->requested()) {
      // A pause. KVM finishes an I/O or MMIO exit (stores an IN's data into RAX, advances RIP
      // past a string I/O chunk, ...) only when KVM_RUN is next entered, and that part of a
      // vCPU's state is in no register KVM_GET_* returns. So enter once more with immediate_exit
      // set: KVM completes what is pending and returns EINTR before running any guest
      // instruction (KVM's API doc on immediate_exit). Only then is the state whole.
      __atomic_store_n(&run_->immediate_exit, 1, __ATOMIC_SEQ_CST);
      if (::ioctl(fd_.get(), KVM_RUN, 0) == 0) {
        // The completion itself needed userspace again (the next chunk of a string I/O): serve
        // it and come back here.
        if (auto exit = handle_exit(ports, mmio)) return exit;
        continue;
      }
      if (errno != EINTR && errno != EAGAIN) {
        return MachineExit{MachineExit::Reason::kVmmError,
                           where() + ": KVM_RUN: " + std::strerror(errno)};
      }
      __atomic_store_n(&run_->immediate_exit, 0, __ATOMIC_SEQ_CST);
      gate->park(stopping);
      continue;
    }
    if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) {
      if (errno == EINTR || errno == EAGAIN) {
        // Cleared before the loop looks at the pause request again: a pause() that sets its
        // request after that look sets immediate_exit after this store, so it is not lost.
        __atomic_store_n(&run_->immediate_exit, 0, __ATOMIC_SEQ_CST);
        continue;
      }
      return MachineExit{MachineExit::Reason::kVmmError,
                         where() + ": KVM_RUN: " + std::strerror(errno)};
    }
    if (auto exit = handle_exit(ports, mmio)) return exit;
  }
  return std::nullopt;
}

MachineExit Vcpu::internal_error(const std::string& what) {
  std::string detail = where() + ": " + what;
  kvm_regs regs{};
  if (::ioctl(fd_.get(), KVM_GET_REGS, &regs) == 0) detail += " at rip " + hex_address(regs.rip);
  return MachineExit{MachineExit::Reason::kInternalError, detail};
}

std::vector<uint8_t> Vcpu::read_guest_code(uint64_t linear, size_t length) {
  std::vector<uint8_t> code;
  if (!memory_) return code;
  length = std::min(length, emulation::kMaxInstructionLength);
  while (code.size() < length) {
    kvm_translation translation{};
    translation.linear_address = linear;
    if (::ioctl(fd_.get(), KVM_TRANSLATE, &translation) != 0 || !translation.valid) break;
    // One page at a time: the next page may map anywhere, or nowhere.
    const size_t chunk = static_cast<size_t>(
        std::min<uint64_t>(length - code.size(), kPageSize - linear % kPageSize));
    std::byte buffer[emulation::kMaxInstructionLength];
    if (!memory_->read(translation.physical_address, std::span(buffer, chunk))) break;
    for (size_t i = 0; i < chunk; ++i)
      code.push_back(static_cast<uint8_t>(buffer[i]));
    linear += chunk;
  }
  return code;
}

std::optional<MachineExit> Vcpu::emulation_failure() {
  const auto& failure = run_->emulation_failure;
  std::vector<uint8_t> bytes;
  // Flags and the instruction bytes are KVM's data words 0-2, when it had the bytes.
  if (failure.ndata >= 3 && (failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
    const size_t size = std::min<size_t>(failure.insn_size, sizeof failure.insn_bytes);
    bytes.assign(failure.insn_bytes, failure.insn_bytes + size);
  }
  kvm_regs regs{};
  kvm_sregs sregs{};
  if (::ioctl(fd_.get(), KVM_GET_REGS, &regs) != 0 ||
      ::ioctl(fd_.get(), KVM_GET_SREGS, &sregs) != 0) {
    return internal_error(std::string("the CPU could not emulate an instruction (") +
                          emulation::hex_bytes(bytes) +
                          ") and its registers are unreadable: " + std::strerror(errno));
  }
  const auto mode = code_mode(sregs);
  auto decoded = emulation::decode(bytes, mode);
  if (bytes.empty() || decoded.truncated) {
    // KVM gave too few bytes: read the instruction from guest memory, and use it only if it
    // still starts with what KVM fetched (another vCPU may be rewriting this code).
    const uint64_t linear =
        mode == emulation::CodeMode::k64 ? regs.rip : (sregs.cs.base + regs.rip) & 0xffffffff;
    auto code = read_guest_code(linear, emulation::kMaxInstructionLength);
    if (code.size() > bytes.size() && std::equal(bytes.begin(), bytes.end(), code.begin())) {
      bytes = std::move(code);
      decoded = emulation::decode(bytes, mode);
    }
  }
  auto fail = [&](const std::string& why) {
    return internal_error("the CPU could not emulate " + emulation::describe(bytes, decoded) + why);
  };

  switch (decoded.action) {
    case emulation::Action::kInjectBreakpoint: {
      // Only kernel code is emulated; a breakpoint from user mode would need the gate's DPL
      // check, which an injected exception skips.
      if (current_privilege_level(sregs, regs) != 0) return fail(" (not at CPL 0)");
      kvm_vcpu_events events{};
      if (::ioctl(fd_.get(), KVM_GET_VCPU_EVENTS, &events) != 0) {
        return fail(std::string(" (KVM_GET_VCPU_EVENTS: ") + std::strerror(errno) + ")");
      }
      if (events.exception.injected || events.exception.pending || events.nmi.injected ||
          events.interrupt.injected) {
        return fail(" (another event was being delivered)");
      }
      // RIP first: KVM_SET_REGS drops a pending exception.
      regs.rip = advance_rip(regs.rip, decoded.length, mode);
      if (::ioctl(fd_.get(), KVM_SET_REGS, &regs) != 0) {
        return fail(std::string(" (KVM_SET_REGS: ") + std::strerror(errno) + ")");
      }
      // #BP is a trap: delivered with RIP past the int3, the frame holds the next instruction.
      events.exception.injected = 1;
      events.exception.nr = kBreakpointVector;
      events.exception.has_error_code = 0;
      events.exception.error_code = 0;
      events.interrupt.shadow = 0;  // the instruction completed, so any STI/MOV SS shadow ended
      if (::ioctl(fd_.get(), KVM_SET_VCPU_EVENTS, &events) != 0) {
        return fail(std::string(" (KVM_SET_VCPU_EVENTS: ") + std::strerror(errno) + ")");
      }
      completions_.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    case emulation::Action::kSkipWait: {
      // fwait raises #NM with CR0.TS and CR0.MP, #MF with an unmasked x87 exception pending;
      // otherwise it does nothing. The VMM completes only the nothing.
      if ((sregs.cr0 & kCr0Ts) && (sregs.cr0 & kCr0Mp)) return fail(" (CR0.TS and CR0.MP: #NM)");
      kvm_fpu fpu{};
      if (::ioctl(fd_.get(), KVM_GET_FPU, &fpu) != 0) {
        return fail(std::string(" (KVM_GET_FPU: ") + std::strerror(errno) + ")");
      }
      if (emulation::x87_exception_pending(fpu.fsw, fpu.fcw)) {
        return fail(" (an unmasked x87 exception is pending, FSW " + hex_address(fpu.fsw) + ")");
      }
      regs.rip = advance_rip(regs.rip, decoded.length, mode);
      if (::ioctl(fd_.get(), KVM_SET_REGS, &regs) != 0) {
        return fail(std::string(" (KVM_SET_REGS: ") + std::strerror(errno) + ")");
      }
      completions_.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    case emulation::Action::kFail:
      break;
  }
  return fail("");
}

std::optional<MachineExit> Vcpu::handle_exit(const IoBus& ports, const IoBus& mmio) {
  switch (run_->exit_reason) {
    case KVM_EXIT_IO: {
      const auto& io = run_->io;
      const uint64_t bytes = uint64_t{io.size} * io.count;
      if (io.size == 0 || io.data_offset > run_size_ || bytes > run_size_ - io.data_offset) {
        return internal_error("KVM reported an I/O exit outside the kvm_run page");
      }
      auto* data = reinterpret_cast<std::byte*>(run_) + io.data_offset;
      for (uint32_t i = 0; i < io.count; ++i) {
        std::span<std::byte> item(data + i * io.size, io.size);
        if (io.direction == KVM_EXIT_IO_OUT) {
          ports.write(io.port, item);
        } else if (!ports.read(io.port, item)) {
          std::memset(item.data(), 0xff, item.size());
        }
      }
      return std::nullopt;
    }
    case KVM_EXIT_MMIO: {
      auto& access = run_->mmio;
      if (access.len == 0 || access.len > sizeof access.data) {
        return internal_error("KVM reported an MMIO exit of " + std::to_string(access.len) +
                              " bytes");
      }
      std::span<std::byte> data(reinterpret_cast<std::byte*>(access.data), access.len);
      if (access.is_write) {
        mmio.write(access.phys_addr, data);
      } else if (!mmio.read(access.phys_addr, data)) {
        std::memset(data.data(), 0xff, data.size());
      }
      return std::nullopt;
    }
    case KVM_EXIT_SHUTDOWN:
      return MachineExit{MachineExit::Reason::kTripleFault,
                         internal_error("the guest triple-faulted (KVM_EXIT_SHUTDOWN)").detail};
    case KVM_EXIT_SYSTEM_EVENT:
      if (run_->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN ||
          run_->system_event.type == KVM_SYSTEM_EVENT_RESET) {
        return MachineExit{MachineExit::Reason::kPoweredOff, where() + ": the guest powered off"};
      }
      return internal_error("system event " + std::to_string(run_->system_event.type));
    case KVM_EXIT_INTERNAL_ERROR:
      if (run_->internal.suberror == KVM_INTERNAL_ERROR_EMULATION) return emulation_failure();
      return internal_error("KVM internal error, suberror " +
                            std::to_string(run_->internal.suberror));
    case KVM_EXIT_FAIL_ENTRY:
      return internal_error("KVM could not enter the guest, hardware reason " +
                            hex_address(run_->fail_entry.hardware_entry_failure_reason));
    case KVM_EXIT_INTR:
      return std::nullopt;
    default:
      return internal_error("unexpected KVM exit reason " + std::to_string(run_->exit_reason));
  }
}

}  // namespace msb::vmm
