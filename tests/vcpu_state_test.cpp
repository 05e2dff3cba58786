// vCPU state capture and restore on real KVM (vmm tier): a guest stopped mid-loop and restored into
// a fresh VM carries on exactly where it was, with the MSR it wrote.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/mman.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>

#include "tests/support.h"
#include "vmm/cpuid.h"
#include "vmm/io_bus.h"
#include "vmm/kvm.h"
#include "vmm/long_mode.h"
#include "vmm/vcpu.h"
#include "vmm/vcpu_state.h"
#include "vmm/vm_state.h"

using namespace msb;
using namespace msb::vmm;

namespace {

constexpr size_t kMemorySize = 4 << 20;
constexpr uint32_t kMsrLstar = 0xc0000082;

// Records the bytes the guest writes to the serial port; stops the vCPU after `limit` of them.
struct PortRecorder : BusDevice {
  std::atomic<bool>& stopping;
  int limit;
  std::vector<uint8_t> bytes;
  PortRecorder(std::atomic<bool>& stop, int n) : stopping(stop), limit(n) {}
  void read(uint64_t, std::span<std::byte> data) override {
    std::memset(data.data(), 0, data.size());
  }
  void write(uint64_t, std::span<const std::byte> data) override {
    bytes.push_back(static_cast<uint8_t>(data[0]));
    if (static_cast<int>(bytes.size()) >= limit) stopping = true;
  }
};

// Page-aligned guest memory, as KVM's memory slots need.
struct Mapping {
  std::byte* data = static_cast<std::byte*>(
      ::mmap(nullptr, kMemorySize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  Mapping() { REQUIRE(data != MAP_FAILED); }
  ~Mapping() { ::munmap(data, kMemorySize); }
  std::span<std::byte> span() const { return {data, kMemorySize}; }
};

// A VM with an irqchip, a PIT and one memory slot over `memory`.
snapstore::UniqueFd make_vm(int kvm_fd, std::span<std::byte> memory) {
  snapstore::UniqueFd vm(kvm::ioctl_or_throw(kvm_fd, KVM_CREATE_VM, 0ul, "KVM_CREATE_VM"));
  kvm::ioctl_or_throw(vm.get(), KVM_CREATE_IRQCHIP, 0ul, "KVM_CREATE_IRQCHIP");
  kvm_pit_config pit{};
  kvm::ioctl_or_throw(vm.get(), KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");
  kvm_userspace_memory_region region{0, 0, 0, memory.size(),
                                     reinterpret_cast<uint64_t>(memory.data())};
  kvm::ioctl_or_throw(vm.get(), KVM_SET_USER_MEMORY_REGION, &region, "memory slot");
  return vm;
}

std::vector<uint8_t> run_until(Vcpu& vcpu, int writes) {
  std::atomic<bool> stopping = false;
  PortRecorder recorder(stopping, writes);
  IoBus ports, mmio;
  ports.add(0x3f8, 1, &recorder, "recorder");
  auto exit = vcpu.run(ports, mmio, stopping);
  INFO((exit ? exit->detail : std::string("stopped")));
  REQUIRE_FALSE(exit.has_value());
  return recorder.bytes;
}

}  // namespace

TEST_CASE("a vCPU's state restored into a new VM continues where it stopped", "[vcpu_state][kvm]") {
  test::skip_without_kvm();
  snapstore::UniqueFd kvm_fd = kvm::open_system();
  const int run_size = kvm::ioctl_or_throw(kvm_fd.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, "mmap size");
  std::string why_not;
  const auto cpuid = cpuid::supported(kvm_fd.get(), why_not);
  INFO(why_not);
  REQUIRE(cpuid.has_value());

  Mapping first_memory;
  GuestMemory memory;
  memory.add_region(0, first_memory.span());
  long_mode::write_tables(memory);
  // wrmsr LSTAR = 0x12345678; then forever: inc rbx; out 0x3f8, bl
  const uint8_t code[] = {0xb9, 0x82, 0x00, 0x00, 0xc0,  // mov ecx, 0xc0000082
                          0xb8, 0x78, 0x56, 0x34, 0x12,  // mov eax, 0x12345678
                          0x31, 0xd2,                    // xor edx, edx
                          0x0f, 0x30,                    // wrmsr
                          0x48, 0xff, 0xc3,              // loop: inc rbx
                          0x66, 0xba, 0xf8, 0x03,        // mov dx, 0x3f8
                          0x88, 0xd8,                    // mov al, bl
                          0xee,                          // out dx, al
                          0xeb, 0xf4};                   // jmp loop
  REQUIRE(memory.write(0x100000, std::as_bytes(std::span(code))));

  snapstore::UniqueFd first_vm = make_vm(kvm_fd.get(), first_memory.span());
  Vcpu first(first_vm.get(), 0, static_cast<size_t>(run_size));
  first.configure(cpuid, true, 1);
  first.set_boot_registers(0x100000, 0x7000);
  REQUIRE(run_until(first, 3) == std::vector<uint8_t>{1, 2, 3});
  const auto msr_indexes = saved_msr_indexes(kvm_fd.get());
  REQUIRE_FALSE(msr_indexes.empty());
  const VcpuState state = capture_vcpu(kvm_fd.get(), first.fd(), msr_indexes);
  REQUIRE(state.regs.rbx == 3);
  REQUIRE(state.xsave.size() * 4 >= 4096);
  bool saw_lstar = false;
  for (const auto& msr : state.msrs)
    saw_lstar |= msr.index == kMsrLstar && msr.data == 0x12345678;
  REQUIRE(saw_lstar);

  // A fresh VM over a copy of the memory, the vCPU configured as at boot and then restored.
  Mapping second_memory;
  std::memcpy(second_memory.data, first_memory.data, kMemorySize);
  snapstore::UniqueFd second_vm = make_vm(kvm_fd.get(), second_memory.span());
  Vcpu second(second_vm.get(), 0, static_cast<size_t>(run_size));
  second.configure(cpuid, true, 1);
  restore_vcpu(second.fd(), state);
  REQUIRE(run_until(second, 2) == std::vector<uint8_t>{4, 5});
  const VcpuState after = capture_vcpu(kvm_fd.get(), second.fd(), {kMsrLstar});
  REQUIRE(after.msrs.size() == 1);
  REQUIRE(after.msrs[0].data == 0x12345678);  // configure() had cleared it; the restore set it
  REQUIRE(after.regs.rbx == 5);

  // The original, untouched by the restore, goes on from its own state.
  REQUIRE(run_until(first, 1) == std::vector<uint8_t>{4});

  VcpuState truncated = state;
  truncated.xsave.resize(16);
  REQUIRE_THROWS_WITH(restore_vcpu(second.fd(), truncated), Catch::Contains("XSAVE"));
}

TEST_CASE("the VM's interrupt controllers, PIT and clock survive a capture and restore",
          "[vcpu_state][kvm]") {
  test::skip_without_kvm();
  snapstore::UniqueFd kvm_fd = kvm::open_system();
  Mapping first_memory, second_memory;
  snapstore::UniqueFd first = make_vm(kvm_fd.get(), first_memory.span());
  snapstore::UniqueFd second = make_vm(kvm_fd.get(), second_memory.span());

  // Program what a guest would: an IOAPIC redirection entry, the PIC's mask, a PIT count.
  VmState programmed = capture_vm(first.get());
  programmed.ioapic.chip.ioapic.redirtbl[5].bits = 0x0100000000000035ull;  // vector 0x35, to APIC 1
  programmed.pic_master.chip.pic.imr = 0xfa;
  programmed.pit.channels[0].count = 12345;
  programmed.clock.clock = 1'000'000'000'000ull;  // the guest has been up for 1000 s
  restore_vm(first.get(), programmed);

  const VmState saved = capture_vm(first.get());
  REQUIRE(saved.ioapic.chip.ioapic.redirtbl[5].bits == 0x0100000000000035ull);
  REQUIRE(saved.pic_master.chip.pic.imr == 0xfa);
  REQUIRE(saved.pit.channels[0].count == 12345);
  REQUIRE(saved.clock.clock >= 1'000'000'000'000ull);

  restore_vm(second.get(), saved);
  const VmState restored = capture_vm(second.get());
  REQUIRE(restored.ioapic.chip.ioapic.redirtbl[5].bits == 0x0100000000000035ull);
  REQUIRE(restored.pic_master.chip.pic.imr == 0xfa);
  REQUIRE(restored.pit.channels[0].count == 12345);
  // The guest's clock goes on from the saved value, not from the new VM's start near zero.
  REQUIRE(restored.clock.clock >= saved.clock.clock);
  REQUIRE(restored.clock.clock - saved.clock.clock < 1'000'000'000ull);
}
