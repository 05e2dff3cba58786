// What KVM holds for the VM as a whole, beside the vCPUs: the in-kernel interrupt controllers
// (both 8259 PICs and the IOAPIC), the PIT and the kvmclock. Plain data, for snapshots.
#pragma once

#include <linux/kvm.h>

namespace msb::vmm {

struct VmState {
  kvm_irqchip pic_master{};
  kvm_irqchip pic_slave{};
  kvm_irqchip ioapic{};
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};
};

// Reads the VM's state. Throws VmmError naming the call KVM refused.
VmState capture_vm(int vm_fd);

// Puts `state` into a VM that has its irqchip and PIT, before its vCPUs are restored.
void restore_vm(int vm_fd, const VmState& state);

}  // namespace msb::vmm
