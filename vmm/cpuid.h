// The CPUID a vCPU sees: KVM's supported set, filtered the way a VMM must so the guest finds a
// consistent machine (Firecracker's cpuid normalisation is the model): the hypervisor bit, the
// vCPU's own APIC id, a topology of `cpu_count` single-thread cores in one package, and no PMU;
// and, where hypercalls do not work (vmm/hypercall_probe.h), none of KVM's hypercall-based
// paravirt features.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace msb::vmm::cpuid {

// KVM_GET_SUPPORTED_CPUID, or nullopt with the reason in `why_not` when this KVM offers none.
std::optional<std::vector<kvm_cpuid_entry2>> supported(int kvm_fd, std::string& why_not);

// KVM's paravirt features (EAX of the leaf after KVM's "KVMKVMKVM" signature leaf, 0x40000001)
// that Linux uses through `vmcall`/`vmmcall`: PV_UNHALT (7, KVM_HC_KICK_CPU), PV_SEND_IPI (11),
// PV_SCHED_YIELD (13), HC_MAP_GPA_RANGE (16). The others (kvmclock, PV_EOI, PV_TLB_FLUSH, steal
// time, async PF, ...) are MSRs and shared memory, which work without hypercalls.
inline constexpr uint32_t kHypercallFeatures = (1u << 7) | (1u << 11) | (1u << 13) | (1u << 16);

// Whether `entries` offer any of kHypercallFeatures (so whether hypercalls need probing at all).
bool offers_hypercall_features(const std::vector<kvm_cpuid_entry2>& entries);

// The table for the vCPU with APIC id `apic_id` out of `cpu_count`. Without `hypercalls_work`,
// kHypercallFeatures are removed.
std::vector<kvm_cpuid_entry2> for_vcpu(std::vector<kvm_cpuid_entry2> entries, unsigned apic_id,
                                       unsigned cpu_count, bool hypercalls_work = true);

}  // namespace msb::vmm::cpuid
