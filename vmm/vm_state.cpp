#include "vmm/vm_state.h"

#include "vmm/kvm.h"

namespace msb::vmm {

namespace {

kvm_irqchip get_chip(int vm_fd, uint32_t chip_id, const char* name) {
  kvm_irqchip chip{};
  chip.chip_id = chip_id;
  kvm::ioctl_or_throw(vm_fd, KVM_GET_IRQCHIP, &chip, std::string("KVM_GET_IRQCHIP ") + name);
  return chip;
}

}  // namespace

VmState capture_vm(int vm_fd) {
  VmState state;
  state.pic_master = get_chip(vm_fd, KVM_IRQCHIP_PIC_MASTER, "(PIC master)");
  state.pic_slave = get_chip(vm_fd, KVM_IRQCHIP_PIC_SLAVE, "(PIC slave)");
  state.ioapic = get_chip(vm_fd, KVM_IRQCHIP_IOAPIC, "(IOAPIC)");
  kvm::ioctl_or_throw(vm_fd, KVM_GET_PIT2, &state.pit, "KVM_GET_PIT2");
  kvm::ioctl_or_throw(vm_fd, KVM_GET_CLOCK, &state.clock, "KVM_GET_CLOCK");
  return state;
}

void restore_vm(int vm_fd, const VmState& state) {
  // The PIT and the clock first, then the interrupt controllers, as Firecracker restores them:
  // the controllers' state may hold interrupts the timers raised. KVM_SET_CLOCK takes only the
  // clock value (and, where supported, its realtime base); the flags KVM reported are not input.
  kvm::ioctl_or_throw(vm_fd, KVM_SET_PIT2, &state.pit, "KVM_SET_PIT2");
  kvm_clock_data clock{};
  clock.clock = state.clock.clock;
  kvm::ioctl_or_throw(vm_fd, KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK");
  for (const auto* chip : {&state.pic_master, &state.pic_slave, &state.ioapic}) {
    kvm::ioctl_or_throw(vm_fd, KVM_SET_IRQCHIP, chip,
                        "KVM_SET_IRQCHIP (chip " + std::to_string(chip->chip_id) + ")");
  }
}

}  // namespace msb::vmm
