// Everything KVM holds for one vCPU, as plain data: what a snapshot saves and a restore puts back
// (Firecracker's vcpu state is the model). Capture runs on a vCPU that is out of KVM_RUN.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <vector>

namespace msb::vmm {

struct VcpuState {
  kvm_regs regs{};
  kvm_sregs sregs{};
  // The XSAVE area: KVM_GET_XSAVE2's size where KVM offers it (AMX and other large states),
  // else the legacy 4 KiB.
  std::vector<uint32_t> xsave;
  kvm_xcrs xcrs{};
  kvm_debugregs debugregs{};
  kvm_lapic_state lapic{};
  std::vector<kvm_msr_entry> msrs;
  kvm_vcpu_events events{};
  kvm_mp_state mp_state{};
  uint32_t tsc_khz = 0;  // 0 where KVM cannot tell
};

// The MSRs a snapshot saves: KVM's index list (KVM_GET_MSR_INDEX_LIST on /dev/kvm).
std::vector<uint32_t> saved_msr_indexes(int kvm_fd);

// Reads the vCPU's state. Throws VmmError naming the call KVM refused.
VcpuState capture_vcpu(int kvm_fd, int vcpu_fd, const std::vector<uint32_t>& msr_indexes);

// Puts `state` into a fresh vCPU whose CPUID is already set (KVM checks MSRs and XSAVE features
// against it). The order is KVM's: see the comments in the code.
void restore_vcpu(int vcpu_fd, const VcpuState& state);

}  // namespace msb::vmm
