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
