// One vCPU: its KVM fd and shared kvm_run page, its boot-time setup (CPUID, MSRs, LAPIC, long-mode
// registers for the boot vCPU), and the run loop that sends I/O exits to the buses.
//
// Only the boot vCPU (index 0) gets registers: with the in-kernel LAPIC the others start in
// KVM_MP_STATE_UNINITIALIZED and wait for the guest's INIT-SIPI-SIPI, as on real hardware.
#pragma once

#include <linux/kvm.h>
#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "snapstore/file_util.h"
#include "vmm/io_bus.h"
#include "vmm/machine.h"

namespace msb::vmm {

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

  // Runs the vCPU on the calling thread until `stopping` is set (then returns nullopt) or the
  // guest does something that ends the machine (returns why). I/O and MMIO exits go to the
  // buses; an access no device claims reads as all ones and writes are dropped.
  std::optional<MachineExit> run(const IoBus& ports, const IoBus& mmio,
                                 const std::atomic<bool>& stopping);
  // Makes run() return soon: safe from any thread, before or during run().
  void kick();

 private:
  void set_boot_msrs();
  void set_lapic_lines();
  std::optional<MachineExit> handle_exit(const IoBus& ports, const IoBus& mmio);
  MachineExit internal_error(const std::string& what);
  std::string where() const;  // "vCPU 0"

  unsigned index_;
  snapstore::UniqueFd fd_;
  kvm_run* run_ = nullptr;
  size_t run_size_ = 0;
  std::atomic<pthread_t> thread_{};
  std::atomic<bool> running_{false};
};

}  // namespace msb::vmm
