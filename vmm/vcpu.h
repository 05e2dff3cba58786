// One vCPU: its KVM fd and shared kvm_run page, its boot-time setup (CPUID, MSRs, LAPIC, long-mode
// registers for the boot vCPU), and the run loop that sends I/O exits to the buses.
//
// Only the boot vCPU (index 0) gets registers: with the in-kernel LAPIC the others start in
// KVM_MP_STATE_UNINITIALIZED and wait for the guest's INIT-SIPI-SIPI, as on real hardware.
//
// Where KVM's emulator gives up on an instruction (hosts without VMX/SVM), the run loop completes
// `int3` and `fwait` itself (vmm/emulation.h) and stops the guest on anything else.
#pragma once

#include <linux/kvm.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "snapstore/file_util.h"
#include "vmm/io_bus.h"
#include "vmm/machine.h"

namespace msb::vmm {

class GuestMemory;

// The signal that interrupts a thread's KVM_RUN (EINTR): installs its do-nothing handler, without
// SA_RESTART, once per process, and returns it.
int kick_signal();

// Where a machine's vCPU threads park while it is paused. The machine requests a pause and
// kicks every vCPU; each vCPU thread, once out of KVM_RUN with nothing pending, parks here until
// release() (or the machine stops). The machine counts its live vCPU threads (enter/leave) so
// that wait_parked() knows how many to wait for.
class PauseGate {
 public:
  void request() { requested_.store(true); }
  bool requested() const { return requested_.load(); }
  // Returns once every live vCPU thread is parked (or has ended), or `stopping` is set.
  void wait_parked(const std::atomic<bool>& stopping);
  void release();
  // Wakes parked threads and waiters to look at `stopping` again (after it was set).
  void wake();

  // vCPU threads.
  void enter();
  void leave();
  // Parks the calling vCPU thread until release() or `stopping`.
  void park(const std::atomic<bool>& stopping);

 private:
  std::atomic<bool> requested_{false};
  std::mutex mutex_;
  std::condition_variable changed_;
  unsigned alive_ = 0;
  unsigned parked_ = 0;
};

class Vcpu {
 public:
  // KVM_CREATE_VCPU with id `index` (which is also its APIC id) and maps its kvm_run page.
  Vcpu(int vm_fd, unsigned index, size_t run_size);
  ~Vcpu();
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;

  unsigned index() const { return index_; }
  int fd() const { return fd_.get(); }

  // CPUID (when KVM offers a table), the boot MSRs (when KVM lets userspace set MSRs at all) and
  // the LAPIC's LINT0/LINT1 wiring.
  void configure(const std::optional<std::vector<kvm_cpuid_entry2>>& supported_cpuid, bool set_msrs,
                 unsigned cpu_count);
  // The boot vCPU's state at the kernel's 64-bit entry (vmm/long_mode.h).
  void set_boot_registers(uint64_t entry, uint64_t zero_page);
  // Guest memory, for reading an instruction KVM's emulator failed on when KVM does not give its
  // bytes. Without it such an instruction is reported undecoded. Set before run().
  void set_guest_memory(const GuestMemory* memory) { memory_ = memory; }

  // Runs the vCPU on the calling thread until `stopping` is set (then returns nullopt) or the
  // guest does something that ends the machine (returns why). I/O and MMIO exits go to the
  // buses; an access no device claims reads as all ones and writes are dropped. With a `gate`,
  // a requested pause parks the thread there (after kick()), with no I/O or MMIO pending.
  std::optional<MachineExit> run(const IoBus& ports, const IoBus& mmio,
                                 const std::atomic<bool>& stopping, PauseGate* gate = nullptr);
  // Makes run() return soon (or reach its pause): safe from any thread, before or during run().
  void kick();
  // KVM_KVMCLOCK_CTRL: tells a guest with kvmclock that it was paused (so its soft-lockup
  // watchdog does not fire). Returns 0 or the errno; EINVAL means the guest has no kvmclock.
  int kvmclock_ctrl();
  // Instructions KVM's emulator failed on that this vCPU completed (int3, fwait): none on hosts
  // with VMX/SVM.
  uint64_t emulation_completions() const { return completions_.load(std::memory_order_relaxed); }

 private:
  void set_boot_msrs();
  void set_lapic_lines();
  std::optional<MachineExit> handle_exit(const IoBus& ports, const IoBus& mmio);
  MachineExit internal_error(const std::string& what);
  // KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION: completes int3 and fwait
  // (nullopt: the guest goes on), else says which instruction stopped the guest.
  std::optional<MachineExit> emulation_failure();
  // Up to `length` bytes at linear address `linear` (translated by KVM page by page), fewer where
  // translation or guest memory ends.
  std::vector<uint8_t> read_guest_code(uint64_t linear, size_t length);
  std::string where() const;  // "vCPU 0"

  unsigned index_;
  snapstore::UniqueFd fd_;
  kvm_run* run_ = nullptr;
  size_t run_size_ = 0;
  std::atomic<pthread_t> thread_{};
  std::atomic<bool> running_{false};
  const GuestMemory* memory_ = nullptr;
  std::atomic<uint64_t> completions_{0};
};

}  // namespace msb::vmm
