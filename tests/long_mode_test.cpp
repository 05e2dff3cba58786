// Long-mode entry: the tables in fake memory (unit tier), and a real vCPU on /dev/kvm running a few
// instructions from them (vmm tier; skipped with the reason where KVM is missing).
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "tests/support.h"
#include "vmm/long_mode.h"

using namespace msb::vmm;

TEST_CASE("the boot page tables identity-map 4 GiB and the GDT is flat", "[long_mode]") {
  std::vector<std::byte> ram(1 << 20);
  GuestMemory memory;
  memory.add_region(0, ram);
  long_mode::write_tables(memory);
  // Walk the tables for a few addresses as the MMU would.
  for (uint64_t address :
       {0ull, 0x1fffffull, 0x100000ull, 0x40000000ull, 0xfee00000ull, 0xffffffffull}) {
    uint64_t pml4e =
        *memory.read_obj<uint64_t>(long_mode::kPml4Address + 8 * ((address >> 39) & 511));
    REQUIRE((pml4e & 1) == 1);
    uint64_t pdpte = *memory.read_obj<uint64_t>((pml4e & ~0xfffull) + 8 * ((address >> 30) & 511));
    REQUIRE((pdpte & 1) == 1);
    uint64_t pde = *memory.read_obj<uint64_t>((pdpte & ~0xfffull) + 8 * ((address >> 21) & 511));
    REQUIRE((pde & 0x83) == 0x83);  // present, writable, 2 MiB page
    REQUIRE((pde & ~0x1fffffull) + (address & 0x1fffff) == address);
  }
  REQUIRE(*memory.read_obj<uint64_t>(long_mode::kPdptAddress + 8 * 4) == 0);  // nothing above 4 GiB

  kvm_sregs sregs{};
  long_mode::set_special_registers(sregs);
  REQUIRE(sregs.cs.l == 1);
  REQUIRE(sregs.cs.db == 0);
  REQUIRE(sregs.cs.selector == 0x10);
  REQUIRE(sregs.ds.selector == 0x18);
  REQUIRE(sregs.cs.limit == 0xffffffff);
  REQUIRE((sregs.efer & 0x500) == 0x500);
  REQUIRE(sregs.cr3 == long_mode::kPml4Address);

  std::vector<std::byte> small(0x8000);
  GuestMemory too_small;
  too_small.add_region(0, small);
  REQUIRE_THROWS(long_mode::write_tables(too_small));
}

namespace {

int ioctl_or_fail(int fd, unsigned long request, void* arg, const char* what) {
  int rc = ::ioctl(fd, request, arg);
  if (rc < 0) FAIL(what << ": " << std::strerror(errno));
  return rc;
}

}  // namespace

TEST_CASE("a vCPU starts in 64-bit mode from the boot tables", "[long_mode][kvm]") {
  msb::test::skip_without_kvm();
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  REQUIRE(kvm >= 0);
  int vm = ioctl_or_fail(kvm, KVM_CREATE_VM, nullptr, "KVM_CREATE_VM");
  const size_t size = 4 << 20;
  void* host = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(host != MAP_FAILED);
  GuestMemory memory;
  memory.add_region(0, {static_cast<std::byte*>(host), size});
  long_mode::write_tables(memory);
  // movabs rax, 0x1122334455667788 (in 32-bit mode 0x48 would decode as dec eax);
  // mov dx, 0x3f8; mov al, 'A'; out dx, al; hlt
  const uint8_t code[] = {0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
                          0x11, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee, 0xf4};
  REQUIRE(memory.write(0x100000, std::as_bytes(std::span(code))));

  kvm_userspace_memory_region region{0, 0, 0, size, reinterpret_cast<uint64_t>(host)};
  ioctl_or_fail(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
  int vcpu = ioctl_or_fail(vm, KVM_CREATE_VCPU, nullptr, "KVM_CREATE_VCPU");

  // Where KVM offers its CPUID, give it to the guest: KVM refuses EFER.LME unless the guest's CPUID
  // has long mode. (The nested PVM host this is developed on does not offer one, and accepts LME.)
  constexpr int kMaxEntries = 256;
  std::vector<std::byte> cpuid_buffer(sizeof(kvm_cpuid2) + kMaxEntries * sizeof(kvm_cpuid_entry2));
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(cpuid_buffer.data());
  cpuid->nent = kMaxEntries;
  if (::ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0) {
    ioctl_or_fail(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
  }

  kvm_sregs sregs;
  ioctl_or_fail(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
  long_mode::set_special_registers(sregs);
  ioctl_or_fail(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
  kvm_regs regs = long_mode::entry_registers(0x100000, 0x7000);
  ioctl_or_fail(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

  int run_size = ioctl_or_fail(kvm, KVM_GET_VCPU_MMAP_SIZE, nullptr, "KVM_GET_VCPU_MMAP_SIZE");
  auto* run =
      static_cast<kvm_run*>(::mmap(nullptr, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0));
  REQUIRE(run != MAP_FAILED);

  ioctl_or_fail(vcpu, KVM_RUN, nullptr, "KVM_RUN");
  INFO("exit reason " << run->exit_reason);
  REQUIRE(run->exit_reason == KVM_EXIT_IO);
  REQUIRE(run->io.direction == KVM_EXIT_IO_OUT);
  REQUIRE(run->io.port == 0x3f8);
  REQUIRE(run->io.size == 1);
  REQUIRE(reinterpret_cast<const char*>(run)[run->io.data_offset] == 'A');
  ioctl_or_fail(vcpu, KVM_RUN, nullptr, "KVM_RUN");
  REQUIRE(run->exit_reason == KVM_EXIT_HLT);
  ioctl_or_fail(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
  REQUIRE(regs.rax == 0x1122334455667741);  // the 64-bit immediate, low byte replaced by 'A'
  REQUIRE(regs.rsi == 0x7000);

  ::munmap(run, run_size);
  ::close(vcpu);
  ::close(vm);
  ::munmap(host, size);
  ::close(kvm);
}
