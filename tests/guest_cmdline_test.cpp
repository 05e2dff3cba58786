// The kernel command line msb boots a guest with: what it adds for its host
// (core/guest_cmdline.h), a Linux sandbox's machine (core/vmm_process.h) and the devices named on
// it (vmm/machine.h).
#include <catch2/catch.hpp>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/guest_cmdline.h"
#include "core/vmm_process.h"
#include "vmm/machine.h"

namespace {

std::vector<std::string> words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string word; in >> word;)
    out.push_back(word);
  return out;
}

}  // namespace

TEST_CASE("a host with hardware virtualization gets the command line as it is", "[cmdline]") {
  const std::string cmdline = "console=ttyS0 reboot=k panic=-1 msb.hostname=a";
  CHECK(msb::core::cmdline_for_host(cmdline, false) == cmdline);
  CHECK(msb::core::cmdline_for_host("", false).empty());
}

TEST_CASE("where kernel mode is emulated, the kernel avoids what the emulator cannot run",
          "[cmdline]") {
  const std::string cmdline = "console=ttyS0 msb.hostname=a";
  const std::string got = msb::core::cmdline_for_host(cmdline, true);
  REQUIRE(got.starts_with(cmdline + " "));
  const auto added = words(got.substr(cmdline.size()));
  CHECK(added == words(msb::core::emulated_kernel_mode_cmdline()));
  for (const char* option : {"noxsave", "mitigations=off", "rodata=off", "noreplace-smp", "quiet"})
    CHECK(std::count(added.begin(), added.end(), option) == 1);
  // The instructions shared/environment.md lists as stopping the emulator, by their names in
  // /proc/cpuinfo, which a 6.1 kernel's clearcpuid= takes.
  std::string clear;
  for (const auto& word : added)
    if (word.starts_with("clearcpuid=")) clear = word.substr(11);
  for (const char* feature : {"cx16", "popcnt", "smap", "rdtscp", "invpcid", "fsgsbase"})
    CHECK(("," + clear + ",").find(std::string(",") + feature + ",") != std::string::npos);
  // The kernel keeps 128 bytes of clearcpuid='s argument.
  CHECK(clear.size() < 128);
  // Nothing is added to an empty command line but the options themselves.
  CHECK(msb::core::cmdline_for_host("", true) == msb::core::emulated_kernel_mode_cmdline());
}

TEST_CASE("a Linux sandbox's machine: ACPI devices only, its hostname, the host's options",
          "[cmdline]") {
  nlohmann::json config = {{"name", "box"},       {"kernel", "/k/vmlinux"},
                           {"initrd", "/i.cpio"}, {"cmdline", "console=ttyS0"},
                           {"cpus", 1},           {"max_cpus", 2},
                           {"memory_mib", 256},   {"max_memory_mib", 512},
                           {"linux", true}};
  for (bool emulated : {false, true}) {
    auto machine = msb::core::machine_config(config, 5, 6, emulated);
    CHECK_FALSE(machine.virtio_on_cmdline);
    CHECK(machine.balloon_holds_excess);
    CHECK(machine.cmdline ==
          msb::core::cmdline_for_host("console=ttyS0 msb.hostname=box", emulated));
    CHECK(machine.console_log_fd == 5);
    CHECK(machine.agent_fd == 6);
  }
  // Any other kernel (the test guest) keeps its command line and learns its devices there too.
  config["linux"] = false;
  auto other = msb::core::machine_config(config, 5, 6, true);
  CHECK(other.virtio_on_cmdline);
  CHECK_FALSE(other.balloon_holds_excess);
  CHECK(other.cmdline == "console=ttyS0");
}

TEST_CASE("the kernel command line names virtio-mmio devices only where asked", "[cmdline]") {
  msb::vmm::MachineConfig config;
  config.cmdline = "console=ttyS0";
  config.cpus = 2;
  const std::vector<msb::vmm::acpi::VirtioMmioDevice> devices = {{0xd0000000, 0x1000, 5},
                                                                 {0xd0001000, 0x1000, 6}};
  CHECK(msb::vmm::boot_cmdline(config, devices) ==
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
        "msb.cpus=2");
  config.virtio_on_cmdline = false;
  CHECK(msb::vmm::boot_cmdline(config, devices) == "console=ttyS0 msb.cpus=2");
}
