// CPUID filtering: what each vCPU is told about itself and its machine.
#include <catch2/catch.hpp>

#include "vmm/cpuid.h"

using namespace msb::vmm;

namespace {

kvm_cpuid_entry2 leaf(uint32_t function, uint32_t index = 0) {
  kvm_cpuid_entry2 entry{};
  entry.function = function;
  entry.index = index;
  entry.eax = entry.ebx = entry.ecx = entry.edx = 0xffffffff;
  return entry;
}

const kvm_cpuid_entry2& find(const std::vector<kvm_cpuid_entry2>& entries, uint32_t function,
                             uint32_t index = 0) {
  for (const auto& entry : entries) {
    if (entry.function == function && entry.index == index) return entry;
  }
  FAIL("no leaf " << function << "." << index);
  return entries.front();
}

}  // namespace

TEST_CASE("each vCPU sees its own APIC id, the topology and the hypervisor bit", "[cpuid]") {
  std::vector<kvm_cpuid_entry2> supported = {leaf(1),      leaf(4),          leaf(6),
                                             leaf(0xa),    leaf(0xb, 0),     leaf(0xb, 1),
                                             leaf(0xb, 2), leaf(0x80000008), leaf(7)};
  supported[0].ecx = 0;  // no hypervisor bit from "KVM"
  for (unsigned apic_id : {0u, 2u}) {
    auto entries = cpuid::for_vcpu(supported, apic_id, 3);
    REQUIRE(entries.size() == supported.size());
    const auto& basic = find(entries, 1);
    REQUIRE(basic.ebx >> 24 == apic_id);
    REQUIRE(((basic.ebx >> 16) & 0xff) == 3);
    REQUIRE((basic.ebx & 0xffff) == 0xffff);  // brand index, CLFLUSH size kept
    REQUIRE((basic.ecx & (1u << 31)) != 0);
    REQUIRE((basic.edx & (1u << 28)) != 0);
    REQUIRE(find(entries, 4).eax >> 26 == 2);
    REQUIRE(find(entries, 6).eax == 0);
    REQUIRE(find(entries, 0xa).eax == 0);  // no PMU
    const auto& threads = find(entries, 0xb, 0);
    const auto& cores = find(entries, 0xb, 1);
    REQUIRE(threads.ebx == 1);
    REQUIRE(threads.edx == apic_id);
    REQUIRE(cores.eax == 2);  // two bits number three cores
    REQUIRE(cores.ebx == 3);
    REQUIRE(((cores.ecx >> 8) & 0xff) == 2);
    REQUIRE(find(entries, 0xb, 2).ebx == 0);
    REQUIRE((find(entries, 0x80000008).ecx & 0xff) == 2);
    REQUIRE(find(entries, 7).ebx == 0xffffffff);  // other leaves untouched
  }
  auto single = cpuid::for_vcpu(supported, 0, 1);
  REQUIRE((find(single, 1).edx & (1u << 28)) == 0);
  REQUIRE(find(single, 0xb, 1).eax == 0);
}

TEST_CASE("KVM's hypercall-based PV features are hidden where hypercalls do not work", "[cpuid]") {
  auto signature = leaf(0x40000000);
  signature.eax = 0x40000001;
  signature.ebx = 0x4b4d564b;  // "KVMKVMKVM\0\0\0"
  signature.ecx = 0x564b4d56;
  signature.edx = 0x4d;
  auto features = leaf(0x40000001);
  // kvmclock (0, 3), PV_EOI (6), PV_UNHALT (7), PV_TLB_FLUSH (9), PV_SEND_IPI (11),
  // POLL_CONTROL (12), PV_SCHED_YIELD (13), HC_MAP_GPA_RANGE (16), stable clock (24).
  features.eax = (1u << 0) | (1u << 3) | (1u << 6) | (1u << 7) | (1u << 9) | (1u << 11) |
                 (1u << 12) | (1u << 13) | (1u << 16) | (1u << 24);
  const std::vector<kvm_cpuid_entry2> supported = {leaf(1), signature, features};
  REQUIRE(cpuid::offers_hypercall_features(supported));

  auto working = cpuid::for_vcpu(supported, 0, 1, true);
  REQUIRE(find(working, 0x40000001).eax == features.eax);
  REQUIRE(cpuid::for_vcpu(supported, 0, 1).at(2).eax == features.eax);  // working by default

  auto masked = cpuid::for_vcpu(supported, 0, 1, false);
  const uint32_t eax = find(masked, 0x40000001).eax;
  REQUIRE((eax & ((1u << 7) | (1u << 11) | (1u << 13) | (1u << 16))) == 0);
  REQUIRE(eax == ((1u << 0) | (1u << 3) | (1u << 6) | (1u << 9) | (1u << 12) | (1u << 24)));
  REQUIRE(find(masked, 0x40000001).ebx == 0xffffffff);  // only EAX's features change
  REQUIRE(find(masked, 0x40000000).eax == 0x40000001);
  REQUIRE_FALSE(cpuid::offers_hypercall_features(masked));

  // KVM's leaves after another hypervisor's (at 0x40000100): found by their signature.
  auto moved_signature = signature;
  moved_signature.function = 0x40000100;
  auto moved_features = features;
  moved_features.function = 0x40000101;
  auto other = leaf(0x40000001);  // some other hypervisor's leaf: untouched
  auto moved =
      cpuid::for_vcpu({leaf(0x40000000), other, moved_signature, moved_features}, 0, 1, false);
  REQUIRE(find(moved, 0x40000001).eax == 0xffffffff);
  REQUIRE((find(moved, 0x40000101).eax & cpuid::kHypercallFeatures) == 0);

  // No KVM signature: nothing to hide (Linux would not look for KVM's features).
  const std::vector<kvm_cpuid_entry2> no_kvm = {leaf(1), leaf(0x40000001)};
  REQUIRE_FALSE(cpuid::offers_hypercall_features(no_kvm));
  REQUIRE(cpuid::for_vcpu(no_kvm, 0, 1, false).at(1).eax == 0xffffffff);
  features.eax = 1u << 9;
  REQUIRE_FALSE(cpuid::offers_hypercall_features({signature, features}));
}
