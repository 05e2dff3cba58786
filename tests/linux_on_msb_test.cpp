// The linux-on-msb tier: the seed's walk-through (shared/seed/snapshots-design.md) with Debian's
// cloud kernel, msb's initramfs and agent, and an image, all on msb itself: create, exec,
// snapshot, resume, save-named, restore 10 forks, restore with overrides, list, remove.
//
// It needs hardware virtualization (vmx or svm in /proc/cpuinfo). Elsewhere, as on nested PVM
// hosts where guest kernel code is emulated instruction by instruction, Linux cannot boot in
// useful time, and the test skips saying so (shared/environment.md).
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/msb_cli.h"

using msb::test::Msb;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
namespace fs = std::filesystem;

namespace {

bool cpu_has_hardware_virtualization() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    line += ' ';
    if (line.find(" vmx ") != std::string::npos || line.find(" svm ") != std::string::npos) {
      return true;
    }
  }
  return false;
}

// A private $MSB_HOME with Debian's kernel installed as "debian-cloud" (a link to the one
// scripts/fetch-linux-kernel unpacked for the tests), or a skip with the reason.
void install_kernel_or_skip(Msb& msb) {
  if (!cpu_has_hardware_virtualization()) {
    std::printf(
        "SKIPPED: /proc/cpuinfo shows neither vmx nor svm: without hardware virtualization guest "
        "kernel code is emulated and Linux cannot boot on msb in useful time\n");
    std::exit(77);
  }
  const fs::path kernel = MSB_LINUX_KERNEL_DIR;
  if (!fs::exists(kernel / "vmlinuz") || !fs::is_directory(kernel / "lib" / "modules")) {
    std::printf(
        "SKIPPED: no Debian cloud kernel in %s (scripts/fetch-linux-kernel puts it there)\n",
        kernel.c_str());
    std::exit(77);
  }
  fs::create_directories(msb.home / "kernels");
  fs::create_directory_symlink(kernel, msb.home / "kernels" / "debian-cloud");
}

std::string state_of(Msb& msb, const std::string& name) {
  for (const auto& box : msb.ls())
    if (box.at("name") == name) return box.at("state");
  return "";
}

// "MemTotal: N kB" of the guest, in MiB.
uint64_t mem_total_mib(Msb& msb, const std::string& sandbox) {
  std::string out = msb.exec_in(sandbox, {"sh", "-c", "grep MemTotal /proc/meminfo"});
  return std::stoull(out.substr(out.find(':') + 1)) / 1024;
}

}  // namespace

TEST_CASE("the seed's walk-through runs with Linux on msb", "[linux-on-msb]") {
  Msb msb;
  install_kernel_or_skip(msb);

  // Without --kernel, a host with VMX/SVM and an installed kernel boots Linux, on the default
  // busybox image.
  require_ok(msb({"create", "base", "--cpus", "1", "--max-cpus", "2", "--memory", "512",
                  "--max-memory", "1024", "--env", "STAGE=base"}));
  nlohmann::json boxes = msb.ls();
  REQUIRE(boxes.size() == 1);
  REQUIRE(boxes[0].at("kernel") == "debian-cloud");
  REQUIRE(boxes[0].at("image") == "busybox:latest");
  REQUIRE_THAT(msb.exec_in("base", {"uname", "-r"}), Catch::Contains("cloud-amd64"));
  REQUIRE_THAT(msb.exec_in("base", {"cat", "/proc/mounts"}), Catch::Contains("/dev/vda / ext4"));
  REQUIRE(msb.exec_in("base", {"hostname"}) == "base\n");
  REQUIRE(msb.exec_in("base", {"sh", "-c", "echo $STAGE"}) == "base\n");

  // Exec semantics through msb: exit codes, signals, stdin, workdir, user.
  REQUIRE(msb({"exec", "base", "--", "sh", "-c", "exit 7"}).exit_code == 7);
  REQUIRE(msb({"exec", "base", "--", "sh", "-c", "kill -TERM $$"}).exit_code == 128 + 15);
  REQUIRE(msb.exec_in("base", {"wc", "-c"}, std::string(100000, 'x')) == "100000\n");
  REQUIRE(msb({"exec", "base", "--workdir", "/tmp", "--", "pwd"}).out == "/tmp\n");
  REQUIRE(msb({"exec", "base", "--user", "1000", "--", "id", "-u"}).out == "1000\n");

  // The "install": state in memory (a running process) and on disk.
  msb.exec_in("base", {"sh", "-c", "echo installed > /root/marker && sync"});
  msb.exec_in("base", {"sh", "-c", "sleep 100000 >/dev/null 2>&1 &"});

  nlohmann::json snap = nlohmann::json::parse(msb({"snapshot", "create", "base", "--json"}).out);
  std::string handle = snap.at("handle");
  REQUIRE(state_of(msb, "base") == "paused");
  require_ok(msb({"resume", "base"}));
  REQUIRE(msb.exec_in("base", {"cat", "/root/marker"}) == "installed\n");
  require_ok(msb({"snapshot", "save-named", handle, "ready"}));

  ProcessResult forks = msb({"restore", "ready", "--name", "f", "--fork", "10"});
  require_ok(forks);
  std::set<std::string> randoms;
  for (int i = 0; i < 10; ++i) {
    const std::string name = "f-" + std::to_string(i);
    REQUIRE(state_of(msb, name) == "running");
    REQUIRE(msb.exec_in(name, {"hostname"}) == name + "\n");
    REQUIRE(msb.exec_in(name, {"cat", "/root/marker"}) == "installed\n");
    REQUIRE_THAT(msb.exec_in(name, {"ps"}), Catch::Contains("sleep 100000"));
    randoms.insert(msb.exec_in(name, {"sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"}));
    // Each fork's disk is its own.
    msb.exec_in(name, {"sh", "-c", "echo " + name + " > /root/who"});
  }
  REQUIRE(randoms.size() == 10);
  for (int i = 0; i < 10; ++i) {
    const std::string name = "f-" + std::to_string(i);
    REQUIRE(msb.exec_in(name, {"cat", "/root/who"}) == name + "\n");
  }
  REQUIRE(msb({"exec", "base", "--", "cat", "/root/who"}).exit_code != 0);

  // Overrides within the snapshot's ceilings: CPUs onlined, the balloon sized, the environment.
  require_ok(msb({"restore", "ready", "--name", "big", "--cpus", "2", "--memory", "768", "--env",
                  "STAGE=big"}));
  REQUIRE(msb.exec_in("big", {"nproc"}) == "2\n");
  REQUIRE(msb.exec_in("big", {"sh", "-c", "echo $STAGE"}) == "big\n");
  uint64_t big_mem = mem_total_mib(msb, "big");
  REQUIRE(big_mem <= 768);
  require_ok(msb({"restore", "ready", "--name", "small", "--memory", "384"}));
  REQUIRE(mem_total_mib(msb, "small") <= 384);
  REQUIRE(msb.exec_in("small", {"nproc"}) == "1\n");
  require_error(msb({"restore", "ready", "--name", "x", "--cpus", "3"}), "--max-cpus 2");

  nlohmann::json listed = nlohmann::json::parse(msb({"snapshot", "ls", "--json"}).out);
  REQUIRE(listed.size() >= 1);
  REQUIRE(msb.ls().size() == 13);
  require_ok(msb({"rm", "--force", "base", "big", "small", "f-0", "f-1", "f-2", "f-3", "f-4", "f-5",
                  "f-6", "f-7", "f-8", "f-9"}));
  REQUIRE(msb.ls().empty());
  require_ok(msb({"snapshot", "rm", "ready"}));
  require_ok(msb({"store", "gc"}));
}
