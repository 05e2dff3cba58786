// The CPUID a vCPU sees: KVM's supported set, filtered the way a VMM must so the guest finds a
// consistent machine (Firecracker's cpuid normalisation is the model): the hypervisor bit, the
// vCPU's own APIC id, a topology of `cpu_count` single-thread cores in one package, and no PMU.
#pragma once

#include <linux/kvm.h>

#include <optional>
#include <string>
#include <vector>

namespace msb::vmm::cpuid {

// KVM_GET_SUPPORTED_CPUID, or nullopt with the reason in `why_not` when this KVM offers none.
std::optional<std::vector<kvm_cpuid_entry2>> supported(int kvm_fd, std::string& why_not);

// The table for the vCPU with APIC id `apic_id` out of `cpu_count`.
std::vector<kvm_cpuid_entry2> for_vcpu(std::vector<kvm_cpuid_entry2> entries, unsigned apic_id,
                                       unsigned cpu_count);

}  // namespace msb::vmm::cpuid
