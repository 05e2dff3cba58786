// The linux-on-msb tier: the seed's walk-through (shared/seed/snapshots-design.md) with msb's own
// guest kernel (scripts/build-guest-kernel), msb's initramfs and agent, and an image, all on msb
// itself: create, exec, snapshot, resume, save-named, restore 10 forks, restore with overrides,
// list, remove; and a Linux guest's power-off, stop and start.
//
// It needs /dev/kvm. With hardware virtualization (VMX/SVM) the guest runs natively; on nested
// PVM hosts its kernel code is emulated, slowly but completely (docs/linux-guests.md): the boot
// takes 20-30 s there and the tier some minutes. Where /dev/kvm is missing it skips, saying so.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "tests/msb_cli.h"

using msb::test::balloon;
using msb::test::entry_of;
using msb::test::Msb;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
using msb::test::settled_balloon;
using msb::test::vmm_rss_mib;
namespace fs = std::filesystem;

namespace {

// A private $MSB_HOME with msb's kernel installed as "msb" (a link to the one
// scripts/build-guest-kernel put where the tests look), or a skip with the reason.
void install_kernel_or_skip(Msb& msb) {
  const int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    std::printf("SKIPPED: /dev/kvm cannot be opened (%s): msb needs KVM to run Linux\n",
                std::strerror(errno));
    std::exit(77);
  }
  ::close(kvm);
  const fs::path kernel = MSB_GUEST_KERNEL_DIR;
  if (!fs::exists(kernel / "vmlinux")) {
    std::printf("SKIPPED: msb's kernel is not in %s (scripts/build-guest-kernel puts it there)\n",
                kernel.c_str());
    std::exit(77);
  }
  fs::create_directories(msb.home / "kernels");
  fs::create_directory_symlink(kernel, msb.home / "kernels" / "msb");
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

// `msb ARGS...`, which must succeed; its standard output.
std::string out_of(Msb& msb, const std::vector<std::string>& args) {
  ProcessResult r = msb(args);
  require_ok(r);
  return r.out;
}

}  // namespace

TEST_CASE("the seed's walk-through runs with Linux on msb", "[linux-on-msb]") {
  Msb msb;
  install_kernel_or_skip(msb);

  // Without --kernel, msb's kernel boots, on the default busybox image.
  require_ok(msb({"create", "base", "--cpus", "1", "--max-cpus", "2", "--memory", "512",
                  "--max-memory", "1024", "--env", "STAGE=base"}));
  nlohmann::json boxes = msb.ls();
  REQUIRE(boxes.size() == 1);
  REQUIRE(boxes[0].at("kernel") == "msb");
  REQUIRE(boxes[0].at("image") == "busybox:latest");
  REQUIRE_THAT(msb.exec_in("base", {"uname", "-r"}), Catch::StartsWith("6.1."));
  REQUIRE_THAT(msb.exec_in("base", {"cat", "/proc/mounts"}), Catch::Contains("/dev/vda / ext4"));
  REQUIRE(msb.exec_in("base", {"hostname"}) == "base\n");
  REQUIRE(msb.exec_in("base", {"sh", "-c", "echo $STAGE"}) == "base\n");
  // Its memory map holds --max-memory and its balloon what is above --memory, from the boot on.
  REQUIRE(settled_balloon(msb, "base", std::chrono::minutes(5)) == balloon(1024, 512, 512));
  const uint64_t base_mem = mem_total_mib(msb, "base");
  REQUIRE(base_mem <= 512);
  REQUIRE(base_mem > 384);

  // Exec semantics through msb: exit codes, signals, stdin, workdir, user.
  REQUIRE(msb({"exec", "base", "--", "sh", "-c", "exit 7"}).exit_code == 7);
  REQUIRE(msb({"exec", "base", "--", "sh", "-c", "kill -TERM $$"}).exit_code == 128 + 15);
  REQUIRE(msb.exec_in("base", {"wc", "-c"}, std::string(100000, 'x')) == "100000\n");
  REQUIRE(out_of(msb, {"exec", "base", "--workdir", "/tmp", "--", "pwd"}) == "/tmp\n");
  REQUIRE(out_of(msb, {"exec", "base", "--user", "1000", "--", "id", "-u"}) == "1000\n");

  // The "install": state in memory (a running process) and on disk.
  msb.exec_in("base", {"sh", "-c", "echo installed > /root/marker && sync"});
  msb.exec_in("base", {"sh", "-c", "sleep 100000 >/dev/null 2>&1 &"});

  nlohmann::json snap =
      nlohmann::json::parse(out_of(msb, {"snapshot", "create", "base", "--json"}));
  std::string handle = snap.at("handle");
  REQUIRE(state_of(msb, "base") == "paused");
  require_ok(msb({"resume", "base"}));
  REQUIRE(msb.exec_in("base", {"cat", "/root/marker"}) == "installed\n");
  require_ok(msb({"snapshot", "save-named", handle, "ready"}));

  // A second snapshot of the running guest stores only what changed since the first.
  msb.exec_in("base", {"sh", "-c", "head -c 1048576 /dev/urandom > /root/delta && sync"});
  nlohmann::json second =
      nlohmann::json::parse(out_of(msb, {"snapshot", "create", "base", "--resume", "--json"}));
  REQUIRE(second.at("parent") == handle);
  // Incremental: only the chunks the guest dirtied were read and stored.
  REQUIRE(second.at("memory_chunks_read").get<uint64_t>() * 4 <
          second.at("memory_chunks").get<uint64_t>());
  REQUIRE(second.at("stored_bytes").get<uint64_t>() < (64u << 20));

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
  ProcessResult missing = msb({"exec", "base", "--", "cat", "/root/who"});
  REQUIRE(missing.exit_code == 1);
  REQUIRE_THAT(missing.err, Catch::Contains("/root/who"));

  // Overrides within the snapshot's ceilings: CPUs onlined, the balloon sized, the environment.
  require_ok(msb({"restore", "ready", "--name", "big", "--cpus", "2", "--memory", "768", "--env",
                  "STAGE=big"}));
  REQUIRE(msb.exec_in("big", {"nproc"}) == "2\n");
  REQUIRE(msb.exec_in("big", {"sh", "-c", "echo $STAGE"}) == "big\n");
  // The balloon deflates from the snapshot's 512 MiB to 256: the machine asks for it, the
  // guest's driver gives the pages back, and MemTotal grows by them (a guest that kept the
  // snapshot's balloon would stay at base_mem).
  REQUIRE(settled_balloon(msb, "big", std::chrono::minutes(5)) == balloon(1024, 256, 256));
  const uint64_t big_mem = mem_total_mib(msb, "big");
  INFO("MemTotal: " << base_mem << " MiB in the snapshot, " << big_mem << " MiB after the restore");
  REQUIRE(big_mem > base_mem + 200);
  REQUIRE(big_mem <= 768);
  // Less than the snapshot had: the balloon inflates by 128 MiB and MemTotal shrinks by them.
  require_ok(msb({"restore", "ready", "--name", "small", "--memory", "384"}));
  REQUIRE(settled_balloon(msb, "small", std::chrono::minutes(5)) == balloon(1024, 640, 640));
  const uint64_t small_mem = mem_total_mib(msb, "small");
  INFO("MemTotal: " << small_mem << " MiB with --memory 384");
  REQUIRE(small_mem <= 384);
  REQUIRE(small_mem + 100 < base_mem);
  REQUIRE(msb.exec_in("small", {"nproc"}) == "1\n");
  // The host holds no more than the grant for it (and its own few MiB): whatever the guest
  // touched of the 640 MiB the balloon took went back to the host. (That the host frees
  // inflated pages is measured with the test guest, whose driver writes every page it gives:
  // tests/balloon_kvm_test.cpp.)
  REQUIRE(vmm_rss_mib(msb, "small") < 384 + 96);
  require_error(msb({"restore", "ready", "--name", "x", "--cpus", "3"}), "--max-cpus 2");

  nlohmann::json listed = nlohmann::json::parse(out_of(msb, {"snapshot", "ls", "--json"}));
  REQUIRE(listed.size() >= 1);
  REQUIRE(msb.ls().size() == 13);
  require_ok(msb({"rm", "--force", "base", "big", "small", "f-0", "f-1", "f-2", "f-3", "f-4", "f-5",
                  "f-6", "f-7", "f-8", "f-9"}));
  REQUIRE(msb.ls().empty());
  require_ok(msb({"snapshot", "rm", "ready"}));
  require_ok(msb({"store", "gc"}));
}

TEST_CASE("a Linux guest on msb: exec semantics, concurrent execs, power-off, stop and start",
          "[linux-on-msb]") {
  Msb msb;
  install_kernel_or_skip(msb);
  require_ok(msb({"create", "box", "--cpus", "2", "--memory", "256"}));

  // Exec semantics: exit codes, signals, stdin and stdout sizes, env, user, workdir, timeout.
  REQUIRE(msb({"exec", "box", "--", "sh", "-c", "exit 42"}).exit_code == 42);
  REQUIRE(msb({"exec", "box", "--", "sh", "-c", "kill -KILL $$"}).exit_code == 128 + 9);
  REQUIRE(msb({"exec", "box", "--", "no-such-command"}).exit_code == 127);
  const std::string big(4 << 20, 'y');
  // The host's md5sum, by path (run_process does not search PATH).
  const ProcessResult host_md5 = msb::test::run_process({"/usr/bin/md5sum"}, {}, big);
  REQUIRE(host_md5.exit_code == 0);
  REQUIRE(msb.exec_in("box", {"md5sum"}, big) == host_md5.out.substr(0, 32) + "  -\n");
  REQUIRE(msb.exec_in("box", {"sh", "-c", "head -c 8388608 /dev/zero | wc -c"}) == "8388608\n");
  REQUIRE(out_of(msb, {"exec", "box", "--env", "K=v", "--", "sh", "-c", "echo $K"}) == "v\n");
  REQUIRE(out_of(msb, {"exec", "box", "--user", "1000:1000", "--", "id", "-g"}) == "1000\n");
  REQUIRE(out_of(msb, {"exec", "box", "--workdir", "/tmp", "--", "pwd"}) == "/tmp\n");
  // 124: the timeout killed it (a `sleep` left to finish would exit 0).
  REQUIRE(msb({"exec", "box", "--timeout", "2", "--", "sleep", "60"}).exit_code == 124);

  // Concurrent execs each get their own output and status.
  std::vector<ProcessResult> results(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      results[i] = msb({"exec", "box", "--", "sh", "-c",
                        "sleep 2; echo run-" + std::to_string(i) + "; exit " + std::to_string(i)});
    });
  }
  for (auto& thread : threads)
    thread.join();
  for (int i = 0; i < 4; ++i) {
    REQUIRE(results[i].exit_code == i);
    REQUIRE(results[i].out == "run-" + std::to_string(i) + "\n");
  }

  // msb stop powers the guest off through ACPI S5: it stops by itself, well before msb would
  // kill it, and the disk's data survives into the next boot.
  msb.exec_in("box", {"sh", "-c", "echo kept > /root/data && sync"});
  require_ok(msb({"stop", "--timeout", "60", "box"}));
  nlohmann::json boxes = msb.ls();
  REQUIRE(boxes[0].at("state") == "stopped");
  REQUIRE(boxes[0].at("reason") == "powered-off");
  require_ok(msb({"start", "box"}));
  REQUIRE(msb.exec_in("box", {"cat", "/root/data"}) == "kept\n");
  require_ok(msb({"rm", "--force", "box"}));
}
