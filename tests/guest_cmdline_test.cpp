// What msb adds to a Linux guest's command line for its host (core/guest_cmdline.h).
#include <catch2/catch.hpp>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "core/guest_cmdline.h"

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
