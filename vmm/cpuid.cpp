#include "vmm/cpuid.h"

#include <sys/ioctl.h>

#include "vmm/kvm.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

namespace msb::vmm::cpuid {

namespace {

constexpr uint32_t kLeaf1EcxHypervisor = 1u << 31;
constexpr uint32_t kLeaf1EdxHtt = 1u << 28;

// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX of KVM's signature leaf.
constexpr uint32_t kKvmSignatureEbx = 0x4b4d564b;
constexpr uint32_t kKvmSignatureEcx = 0x564b4d56;
constexpr uint32_t kKvmSignatureEdx = 0x0000004d;

// KVM's features leaf: the one after its signature leaf, which sits at 0x40000000 or, beside
// other hypervisors' leaves, at a further multiple of 0x100.
std::optional<uint32_t> kvm_features_leaf(const std::vector<kvm_cpuid_entry2>& entries) {
  for (const auto& entry : entries) {
    if (entry.function >= 0x40000000 && entry.function < 0x40010000 &&
        (entry.function & 0xff) == 0 && entry.ebx == kKvmSignatureEbx &&
        entry.ecx == kKvmSignatureEcx && entry.edx == kKvmSignatureEdx) {
      return entry.function + 1;
    }
  }
  return std::nullopt;
}

// Bits needed to number `count` things: the x2APIC id shift of a topology level.
unsigned id_bits(unsigned count) {
  unsigned bits = 0;
  while ((1u << bits) < count)
    ++bits;
  return bits;
}

}  // namespace

std::optional<std::vector<kvm_cpuid_entry2>> supported(int kvm_fd, std::string& why_not) {
  auto table = std::make_unique<kvm::CpuidTable>();
  table->nent = kvm::kMaxCpuidEntries;
  if (::ioctl(kvm_fd, kvm::kGetSupportedCpuid, table.get()) != 0) {
    why_not = std::string("KVM_GET_SUPPORTED_CPUID: ") + std::strerror(errno);
    return std::nullopt;
  }
  return std::vector<kvm_cpuid_entry2>(table->entries, table->entries + table->nent);
}

bool offers_hypercall_features(const std::vector<kvm_cpuid_entry2>& entries) {
  const auto features = kvm_features_leaf(entries);
  if (!features) return false;
  for (const auto& entry : entries) {
    if (entry.function == *features && (entry.eax & kHypercallFeatures) != 0) return true;
  }
  return false;
}

std::vector<kvm_cpuid_entry2> for_vcpu(std::vector<kvm_cpuid_entry2> entries, unsigned apic_id,
                                       unsigned cpu_count, bool hypercalls_work) {
  const unsigned core_bits = id_bits(cpu_count);
  const auto kvm_features = kvm_features_leaf(entries);
  for (auto& entry : entries) {
    if (!hypercalls_work && kvm_features && entry.function == *kvm_features) {
      // A guest that issues a hypercall here never comes back from it.
      entry.eax &= ~kHypercallFeatures;
      continue;
    }
    switch (entry.function) {
      case 1:
        // EBX: initial APIC id in 31:24, logical processors per package in 23:16.
        entry.ebx = (entry.ebx & 0x0000ffff) | (apic_id << 24) | ((cpu_count & 0xff) << 16);
        entry.ecx |= kLeaf1EcxHypervisor;
        if (cpu_count > 1) {
          entry.edx |= kLeaf1EdxHtt;
        } else {
          entry.edx &= ~kLeaf1EdxHtt;
        }
        break;
      case 4:
        // Deterministic cache parameters: cores per package - 1 in 31:26; each cache is private
        // to one thread (25:14 = 0).
        entry.eax = (entry.eax & 0x3fff) | (std::min(cpu_count - 1, 63u) << 26);  // 6 bits
        break;
      case 6:
        // No power management the guest could try to drive (APERF/MPERF, HWP, ...).
        entry.eax = entry.ebx = entry.ecx = entry.edx = 0;
        break;
      case 0xa:
        // No architectural PMU: counters are not virtualized consistently across hosts, and
        // would leak host activity into snapshots.
        entry.eax = entry.ebx = entry.ecx = entry.edx = 0;
        break;
      case 0xb:
      case 0x1f:
        // Extended topology: level 0 = SMT (one thread per core), level 1 = cores.
        if (entry.index == 0) {
          entry.eax = 0;
          entry.ebx = 1;
          entry.ecx = (1u << 8) | 0;
        } else if (entry.index == 1) {
          entry.eax = core_bits;
          entry.ebx = cpu_count;
          entry.ecx = (2u << 8) | 1;
        } else {
          entry.eax = entry.ebx = 0;
          entry.ecx = entry.index;
        }
        entry.edx = apic_id;
        break;
      case 0x80000008:
        // AMD: number of threads in the package - 1 (7:0) and the APIC id size (15:12).
        entry.ecx = (entry.ecx & ~0xf0ffu) | (core_bits << 12) | ((cpu_count - 1) & 0xff);
        break;
      default:
        break;
    }
  }
  return entries;
}

}  // namespace msb::vmm::cpuid
