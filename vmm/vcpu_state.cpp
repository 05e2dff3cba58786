#include "vmm/vcpu_state.h"

#include <sys/ioctl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "vmm/kvm.h"

namespace msb::vmm {

namespace {

// IA32_TSC_DEADLINE: writing it arms the LAPIC timer relative to the TSC, so it goes back only
// after the TSC and the LAPIC (its timer mode) are restored.
constexpr uint32_t kMsrTscDeadline = 0x6e0;
constexpr uint32_t kMaxMsrs = 1024;
using MsrTable = kvm::MsrTable<kMaxMsrs>;

void set_msrs(int vcpu_fd, const std::vector<kvm_msr_entry>& entries) {
  if (entries.empty()) return;
  auto table = std::make_unique<MsrTable>();
  table->nmsrs = static_cast<uint32_t>(entries.size());
  std::copy(entries.begin(), entries.end(), table->entries);
  int set = kvm::ioctl_or_throw(vcpu_fd, kvm::kSetMsrs, table.get(), "KVM_SET_MSRS");
  if (static_cast<size_t>(set) != entries.size()) {
    throw VmmError("KVM refused to restore MSR " + std::to_string(entries[set].index));
  }
}

}  // namespace

std::vector<uint32_t> saved_msr_indexes(int kvm_fd) {
  auto list = std::make_unique<kvm::MsrIndexList<kMaxMsrs>>();
  list->nmsrs = kMaxMsrs;
  kvm::ioctl_or_throw(kvm_fd, kvm::kGetMsrIndexList, list.get(), "KVM_GET_MSR_INDEX_LIST");
  return std::vector<uint32_t>(list->indices, list->indices + list->nmsrs);
}

VcpuState capture_vcpu(int kvm_fd, int vcpu_fd, const std::vector<uint32_t>& msr_indexes) {
  VcpuState state;
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_REGS, &state.regs, "KVM_GET_REGS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_SREGS, &state.sregs, "KVM_GET_SREGS");
  const int xsave_size = ::ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  if (xsave_size > static_cast<int>(sizeof(kvm::XsaveRegion))) {
    state.xsave.resize(static_cast<size_t>(xsave_size) / sizeof(uint32_t));
    kvm::ioctl_or_throw(vcpu_fd, kvm::kGetXsave2, state.xsave.data(), "KVM_GET_XSAVE2");
  } else {
    state.xsave.resize(sizeof(kvm::XsaveRegion) / sizeof(uint32_t));
    kvm::ioctl_or_throw(vcpu_fd, kvm::kGetXsave, state.xsave.data(), "KVM_GET_XSAVE");
  }
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_XCRS, &state.xcrs, "KVM_GET_XCRS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_DEBUGREGS, &state.debugregs, "KVM_GET_DEBUGREGS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_LAPIC, &state.lapic, "KVM_GET_LAPIC");

  // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read: such MSRs
  // (listed, but absent on this CPU or for this CPUID) are skipped, the rest read in batches.
  auto table = std::make_unique<MsrTable>();
  for (size_t next = 0; next < msr_indexes.size();) {
    const size_t batch = std::min<size_t>(kMaxMsrs, msr_indexes.size() - next);
    table->nmsrs = static_cast<uint32_t>(batch);
    for (size_t i = 0; i < batch; ++i)
      table->entries[i] = kvm_msr_entry{msr_indexes[next + i], 0, 0};
    int read = kvm::ioctl_or_throw(vcpu_fd, kvm::kGetMsrs, table.get(), "KVM_GET_MSRS");
    state.msrs.insert(state.msrs.end(), table->entries, table->entries + read);
    next += static_cast<size_t>(read) + (static_cast<size_t>(read) < batch ? 1 : 0);
  }

  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_VCPU_EVENTS, &state.events, "KVM_GET_VCPU_EVENTS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_GET_MP_STATE, &state.mp_state, "KVM_GET_MP_STATE");
  int khz = ::ioctl(vcpu_fd, KVM_GET_TSC_KHZ, 0);
  state.tsc_khz = khz > 0 ? static_cast<uint32_t>(khz) : 0;
  return state;
}

void restore_vcpu(int vcpu_fd, const VcpuState& state) {
  if (state.xsave.size() * sizeof(uint32_t) < sizeof(kvm::XsaveRegion)) {
    throw VmmError("the saved XSAVE area is " + std::to_string(state.xsave.size() * 4) +
                   " bytes, less than 4 KiB");
  }
  // The order follows what KVM checks (Firecracker restores in the same order):
  // - the MP state first: it decides whether the vCPU runs or waits for INIT/SIPI;
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_MP_STATE, &state.mp_state, "KVM_SET_MP_STATE");
  // - registers, then special registers (CR0/CR4/EFER, and the APIC base, which the LAPIC
  //   state must come after);
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_REGS, &state.regs, "KVM_SET_REGS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_SREGS, &state.sregs, "KVM_SET_SREGS");
  // - XSAVE and XCR0, checked against the CPUID set before this call;
  kvm::ioctl_or_throw(vcpu_fd, kvm::kSetXsave, state.xsave.data(), "KVM_SET_XSAVE");
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_XCRS, &state.xcrs, "KVM_SET_XCRS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_DEBUGREGS, &state.debugregs, "KVM_SET_DEBUGREGS");
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_LAPIC, &state.lapic, "KVM_SET_LAPIC");
  // - the MSRs, the TSC among them, with the TSC deadline last (see kMsrTscDeadline);
  std::vector<kvm_msr_entry> msrs, deadline;
  for (const auto& entry : state.msrs)
    (entry.index == kMsrTscDeadline ? deadline : msrs).push_back(entry);
  set_msrs(vcpu_fd, msrs);
  set_msrs(vcpu_fd, deadline);
  // - pending exceptions, interrupts and NMIs last, on top of the state they apply to.
  kvm::ioctl_or_throw(vcpu_fd, KVM_SET_VCPU_EVENTS, &state.events, "KVM_SET_VCPU_EVENTS");
}

}  // namespace msb::vmm
