// Thin checked wrappers over the KVM ioctls: every failure becomes a VmmError that names the call
// (and the vCPU or device it was for), so a sandbox's failure reason says what KVM refused.
#pragma once

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "snapstore/file_util.h"
#include "vmm/machine.h"

namespace msb::vmm::kvm {

// The ioctls whose argument ends in a flexible array. Debian 12's linux-libc-dev (6.1) declares
// those arrays with __DECLARE_FLEX_ARRAY, which in C++ wraps them in a struct after an empty
// member: sizeof grows and the entries move (kvm_cpuid2's from offset 8 to 12, kvm_msrs's from 8
// to 16), so both the request numbers and the layouts in <linux/kvm.h> are wrong in C++ and KVM
// answers EINVAL. These tables have the kernel's C layout, with room for `N` entries.
inline constexpr uint32_t kMaxCpuidEntries = 256;  // KVM_MAX_CPUID_ENTRIES
struct CpuidTable {
  uint32_t nent = 0;
  uint32_t padding = 0;
  kvm_cpuid_entry2 entries[kMaxCpuidEntries];
};
template <uint32_t N>
struct MsrTable {
  uint32_t nmsrs = 0;
  uint32_t pad = 0;
  kvm_msr_entry entries[N];
};
template <uint32_t N>
struct MsrIndexList {
  uint32_t nmsrs = 0;
  uint32_t indices[N];
};
namespace abi {
struct CountAndPadding {  // the header of kvm_cpuid2 and kvm_msrs
  uint32_t count;
  uint32_t padding;
};
struct Count {  // the header of kvm_msr_list
  uint32_t count;
};
}  // namespace abi
static_assert(offsetof(CpuidTable, entries) == sizeof(abi::CountAndPadding));
static_assert(offsetof(MsrTable<1>, entries) == sizeof(abi::CountAndPadding));
static_assert(offsetof(MsrIndexList<1>, indices) == sizeof(abi::Count));
inline constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, abi::CountAndPadding);
inline constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, abi::CountAndPadding);
inline constexpr unsigned long kGetCpuid2 = _IOWR(KVMIO, 0x91, abi::CountAndPadding);
inline constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, abi::Count);
inline constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, abi::CountAndPadding);
inline constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, abi::CountAndPadding);
// kvm_xsave ends in a flexible array too (`extra`, beyond the legacy 4 KiB region): its sizeof is
// 4100 in C++ rather than 4096, so KVM_GET/SET_XSAVE(2) are encoded from the 4 KiB region.
struct XsaveRegion {
  uint32_t region[1024];
};
inline constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, XsaveRegion);
inline constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, XsaveRegion);
inline constexpr unsigned long kGetXsave2 = _IOR(KVMIO, 0xcf, XsaveRegion);

// ioctl(fd, request, arg); throws VmmError("<what>: <strerror>") when it fails. Retries EINTR.
int ioctl_or_throw(int fd, unsigned long request, const void* arg, const std::string& what);
inline int ioctl_or_throw(int fd, unsigned long request, unsigned long arg,
                          const std::string& what) {
  return ioctl_or_throw(fd, request, reinterpret_cast<const void*>(arg), what);
}

// /dev/kvm, checked for API version 12 and the capabilities msb cannot work without.
snapstore::UniqueFd open_system();

}  // namespace msb::vmm::kvm
