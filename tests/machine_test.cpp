// The machine on real KVM (vmm tier): tiny hand-assembled kernels prove the boot path, the serial
// log, the i8042 and ACPI power-offs and the stop reasons; the test guest proves the virtio console
// path.
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "tests/guest_agent.h"
#include "tests/support.h"
#include "vmm/cpuid.h"
#include "vmm/machine.h"

using namespace msb;
using namespace msb::vmm;

namespace {

// mov dx, port; mov al, byte; out dx, al
void out_byte(std::vector<uint8_t>& code, uint16_t port, uint8_t byte) {
  code.insert(code.end(), {0x66, 0xba, uint8_t(port), uint8_t(port >> 8), 0xb0, byte, 0xee});
}

// A test machine's host side (tests/guest_agent.h) that boots `kernel` with `cpus` vCPUs,
// `memory_mib` and a disk of `disk_size` bytes, its console log and disk overlay in `dir`.
struct MachineFixture : test::MachineHost {
  MachineFixture(const std::filesystem::path& dir, const std::string& kernel, unsigned cpus,
                 uint64_t memory_mib, uint64_t disk_size)
      : MachineHost(dir / "console.log", dir / "disk.overlay") {
    config.kernel_path = kernel;
    config.cpus = config.max_cpus = cpus;
    config.memory_mib = config.max_memory_mib = memory_mib;
    config.disk_size = disk_size;
  }
};

struct Booted {
  MachineExit exit;
  std::string console;
};

Booted boot(const std::string& kernel_bytes, unsigned cpus = 1) {
  test::TempDir dir;
  test::write_text(dir.path() / "kernel", kernel_bytes);
  Booted booted;
  {
    MachineFixture fixture(dir.path(), dir.path() / "kernel", cpus, 64, 1 << 20);
    auto machine = Machine::create(fixture.config);
    machine->start();
    booted.exit = machine->wait();
  }
  booted.console = test::read_text(dir.path() / "console.log");
  return booted;
}

}  // namespace

TEST_CASE("a guest writes to the serial port and powers off through the i8042", "[machine][kvm]") {
  test::skip_without_kvm();
  std::vector<uint8_t> code;
  for (char c : std::string("hello\n"))
    out_byte(code, 0x3f8, uint8_t(c));
  out_byte(code, 0x64, 0xfe);
  code.insert(code.end(), {0xf4, 0xeb, 0xfd});  // hlt; jmp back: never reached
  auto booted = boot(test::tiny_kernel(code), 2);
  INFO(booted.exit.detail);
  REQUIRE(booted.exit.reason == MachineExit::Reason::kPoweredOff);
  REQUIRE(booted.console == "hello\n");
}

TEST_CASE("a guest powers off through the ACPI sleep control register", "[machine][kvm]") {
  test::skip_without_kvm();
  std::vector<uint8_t> code;
  // What the machine ignores: clearing WAK_STS, S5 without SLP_EN, S3 with it, S5 at the status
  // port. A power-off there would leave "ok" unwritten.
  out_byte(code, 0x601, 0x80);
  out_byte(code, 0x600, 5 << 2);
  out_byte(code, 0x600, 3 << 2 | 0x20);
  out_byte(code, 0x601, 5 << 2 | 0x20);
  for (char c : std::string("ok\n"))
    out_byte(code, 0x3f8, uint8_t(c));
  out_byte(code, 0x600, 5 << 2 | 0x20);  // SLP_TYP 5 (the DSDT's \_S5_) with SLP_EN
  for (char c : std::string("on\n"))
    out_byte(code, 0x3f8, uint8_t(c));
  code.insert(code.end(), {0xf4, 0xeb, 0xfd});  // hlt; jmp back: never reached
  auto booted = boot(test::tiny_kernel(code));
  INFO(booted.exit.detail);
  REQUIRE(booted.exit.reason == MachineExit::Reason::kPoweredOff);
  REQUIRE(booted.exit.detail.find("ACPI S5") != std::string::npos);
  REQUIRE(booted.console == "ok\n");
}

TEST_CASE("a guest that faults with no IDT stops the machine as a triple fault", "[machine][kvm]") {
  test::skip_without_kvm();
  auto booted = boot(test::tiny_kernel({0x0f, 0x0b}));  // ud2
  INFO(booted.exit.detail);
  REQUIRE(booted.exit.reason == MachineExit::Reason::kTripleFault);
  REQUIRE(booted.exit.detail.find("vCPU 0") != std::string::npos);
  REQUIRE(booted.exit.detail.find("rip 0x") != std::string::npos);
}

TEST_CASE("a machine that cannot be built says what is wrong", "[machine][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  MachineConfig config;
  config.disk_overlay_path = dir.path() / "disk.overlay";
  config.disk_size = 1 << 20;
  config.kernel_path = dir.path() / "missing";
  REQUIRE_THROWS_WITH(Machine::create(config),
                      Catch::Contains("kernel") && Catch::Contains("missing"));
  test::write_text(dir.path() / "garbage", std::string(4096, 'x'));
  config.kernel_path = dir.path() / "garbage";
  REQUIRE_THROWS_WITH(Machine::create(config), Catch::Contains("neither a bzImage nor an ELF"));
  config.memory_mib = 512;
  config.max_memory_mib = 256;
  REQUIRE_THROWS_WITH(Machine::create(config), Catch::Contains("memory"));
  config.memory_mib = 256;
  config.cpus = 3;
  config.max_cpus = 2;
  REQUIRE_THROWS_WITH(Machine::create(config), Catch::Contains("vCPU"));
}

TEST_CASE("stop() ends a machine whose guest spins forever", "[machine][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  std::vector<uint8_t> code;
  for (char c : std::string("spinning\n"))
    out_byte(code, 0x3f8, uint8_t(c));
  code.insert(code.end(), {0xeb, 0xfe});  // jmp .
  test::write_text(dir.path() / "kernel", test::tiny_kernel(code));
  MachineFixture fixture(dir.path(), dir.path() / "kernel", 1, 64, 1 << 20);
  auto machine = Machine::create(fixture.config);
  machine->start();
  // Stopped once the guest runs its loop (its line is out), not at some moment before or after.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (test::read_text(fixture.log_path) != "spinning\n" &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(test::read_text(fixture.log_path) == "spinning\n");
  machine->stop();
  auto exit = machine->wait();
  REQUIRE(exit.reason == MachineExit::Reason::kPoweredOff);
  REQUIRE(exit.detail == "stopped by msb");
}

#ifdef MSB_LINUX_KERNEL_DIR
// Debian's cloud kernel on msb, for a bounded time: kernel-mode code is emulated on hosts without
// VMX/SVM (shared/environment.md), so this only checks the first console lines, which prove the
// kernel took msb's command line, e820 map and ACPI tables.
namespace {

bool hardware_virtualization() {
  const std::string cpuinfo = test::read_text("/proc/cpuinfo");
  return cpuinfo.find(" vmx") != std::string::npos || cpuinfo.find(" svm") != std::string::npos;
}

void boot_linux_and_check_console(const std::filesystem::path& kernel) {
  test::skip_without_kvm();
  if (!std::filesystem::exists(kernel)) {
    std::printf("SKIPPED: %s is missing: run scripts/fetch-linux-kernel\n", kernel.c_str());
    std::exit(77);
  }
  {
    // Without a CPUID table in KVM, the guest's CPUID lacks SYSCALL and NX as far as KVM's EFER
    // checks go, and Linux takes a #GP (then a triple fault) on its first EFER write in
    // startup_64, before it prints anything. Nested PVM hosts refuse KVM_SET_CPUID2 outright.
    int kvm_fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    std::string why_not;
    bool has_cpuid = cpuid::supported(kvm_fd, why_not).has_value();
    ::close(kvm_fd);
    if (!has_cpuid) {
      std::printf(
          "SKIPPED: this KVM offers no CPUID table (%s), so a Linux guest faults on its first "
          "EFER write; this test needs a KVM with VMX or SVM\n",
          why_not.c_str());
      std::exit(77);
    }
  }
  test::TempDir dir;
  MachineFixture fixture(dir.path(), kernel, 2, 256, 1 << 20);
  const auto& log_path = fixture.log_path;
  fixture.config.cmdline = "earlyprintk=serial,ttyS0 console=ttyS0 panic=-1 msb.smoke=1";
  auto machine = Machine::create(fixture.config);
  machine->start();
  const std::vector<std::string> wanted = {
      "Command line: earlyprintk=serial,ttyS0 console=ttyS0 panic=-1 msb.smoke=1 "
      "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
      "virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8 msb.cpus=2",
      "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
      "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
      "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
      "ACPI: RSDP 0x00000000000E0000",
      "ACPI: XSDT 0x",
      "ACPI: FACP 0x",
      "ACPI: DSDT 0x",
      "ACPI: APIC 0x",
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  std::string console;
  auto all_seen = [&] {
    for (const auto& line : wanted) {
      if (console.find(line) == std::string::npos) return false;
    }
    return true;
  };
  while (std::chrono::steady_clock::now() < deadline) {
    console = test::read_text(log_path);
    if (all_seen()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  machine->stop();
  auto exit = machine->wait();
  INFO("console:\n" << console << "\nmachine: " << exit.detail);
  for (const auto& line : wanted)
    CHECK(console.find(line) != std::string::npos);
}

}  // namespace

// The uncompressed kernel (ELF vmlinux) reaches these lines in about 25 s even here.
TEST_CASE("Linux (vmlinux) reads msb's command line, e820 map and ACPI tables",
          "[linux-smoke][kvm][needs-hw-virt]") {
  boot_linux_and_check_console(std::filesystem::path(MSB_LINUX_KERNEL_DIR) / "vmlinux");
}

// The bzImage first decompresses itself in kernel mode: minutes where that is emulated.
TEST_CASE("Linux (bzImage) reads msb's command line, e820 map and ACPI tables",
          "[linux-smoke][kvm][needs-hw-virt]") {
  if (!hardware_virtualization()) {
    std::printf(
        "SKIPPED: /proc/cpuinfo shows neither vmx nor svm: the bzImage's decompressor would run "
        "emulated for minutes (the vmlinux test covers the boot path here)\n");
    std::exit(77);
  }
  boot_linux_and_check_console(std::filesystem::path(MSB_LINUX_KERNEL_DIR) / "vmlinuz");
}
#endif

TEST_CASE("the test guest answers the agent protocol over the virtio console", "[machine][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  MachineFixture fixture(dir.path(), MSB_TESTGUEST, 2, 128, 8 << 20);
  fixture.timeout_ms = 60'000;
  auto machine = Machine::create(fixture.config);
  machine->start();

  fixture.wait_ready();
  fixture.next_id = 7;
  REQUIRE(fixture.run({"echo", "over", "virtio"}) == "over virtio\n");
  REQUIRE(fixture.run({"cpus"}) == "2\n");  // the AP came up through INIT-SIPI-SIPI

  fixture.power_off();
  auto exit = machine->wait();
  INFO(exit.detail);
  REQUIRE(exit.reason == MachineExit::Reason::kPoweredOff);
  machine.reset();
  REQUIRE(test::read_text(fixture.log_path).find("testguest") != std::string::npos);
}
