// The linux-guest tier with msb's own guest kernel (guest/kernel/, scripts/build-guest-kernel):
// everything a sandbox needs is built in, so the initramfs holds just the agent. Booted under
// QEMU microvm with TCG, which describes its virtio-mmio devices and CPUs in ACPI as msb does,
// these cases prove the kernel's configuration and patches against a reference VMM: devices
// found through ACPI (with PCI off) and each bound once, what sandbox workloads need (overlayfs,
// cgroup v2, FUSE, namespaces, seccomp, IPv6, /dev/shm), every restore-time call with built-in
// drivers (CPU hotplug, the balloon), and a power-off through ACPI S5.
#include <signal.h>

#include <chrono>
#include <string>
#include <thread>

#include <catch2/catch.hpp>

#include "core/images.h"
#include "tests/linux_guest.h"

using msb::test::Command;
using msb::test::GuestKernel;
using msb::test::GuestResult;
using msb::test::LinuxGuest;
using msb::test::LinuxGuestOptions;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

void prerequisites() {
  msb::test::skip_without_linux_guest(GuestKernel::kMsb);
  msb::test::skip_without_busybox();
}

uint64_t mem_total_kib(LinuxGuest& guest) {
  std::string meminfo = guest.sh("cat /proc/meminfo");
  size_t at = meminfo.find("MemTotal:");
  REQUIRE(at != std::string::npos);
  return std::stoull(meminfo.substr(at + 9));
}

}  // namespace

TEST_CASE("msb's kernel boots with just the agent in its initramfs", "[linux-guest]") {
  prerequisites();
  msb::test::TempDir dir;
  LinuxGuestOptions options;
  options.kernel = GuestKernel::kMsb;
  options.root_image = dir / "root.ext4";
  msb::test::make_busybox_image(options.root_image, {{"tester", 1000, 1000, "/home/tester"}});
  options.hostname = "msb-kernel";
  options.cpus = 2;
  options.memory_mib = 512;
  options.writable_root = true;
  LinuxGuest guest(options);

  // The kernel: msb's 6.1, no module support at all, the root switch done by the agent.
  CHECK(guest.sh("uname -r").starts_with("6.1."));
  CHECK(guest.sh("test -e /proc/modules || echo none") == "none\n");
  CHECK(guest.sh("cat /proc/1/cmdline") == std::string("/init\0", 6));
  CHECK(guest.sh("cat /proc/mounts").find("/dev/vda / ext4 rw") != std::string::npos);
  CHECK(guest.sh("hostname") == "msb-kernel\n");
  CHECK(guest.console().find("msb-agent: cannot") == std::string::npos);
  // Every virtio-mmio device was found through ACPI (with PCI off: guest/kernel/patches/0001)
  // and bound once: console, block, rng and balloon.
  const std::string dmesg = guest.sh("dmesg");
  INFO(dmesg);
  CHECK(dmesg.find("During Region initialization") == std::string::npos);
  CHECK(dmesg.find("probe of") == std::string::npos);
  CHECK(guest.sh("ls /sys/bus/virtio/drivers/virtio_console /sys/bus/virtio/drivers/virtio_blk "
                 "/sys/bus/virtio/drivers/virtio_rng /sys/bus/virtio/drivers/virtio_balloon "
                 "| grep -c '^virtio[0-9]'") == "4\n");
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0-1\n");

  // What sandbox workloads need, built in: overlayfs, cgroup v2 with the memory and pids
  // controllers, FUSE, every namespace (and unshare into new ones), seccomp filters, IPv4 and
  // IPv6, /dev/shm, ptys.
  CHECK(guest.sh("cd /tmp && mkdir lower upper work merged && echo low > lower/f && "
                 "mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work merged "
                 "&& echo up >> merged/f && cat merged/f lower/f && umount merged") ==
        "low\nup\nlow\n");
  const std::string controllers = guest.sh(
      "mkdir -p /tmp/cg && mount -t cgroup2 none /tmp/cg && cat /tmp/cg/cgroup.controllers");
  CHECK(controllers.find("memory") != std::string::npos);
  CHECK(controllers.find("pids") != std::string::npos);
  CHECK(guest.sh("cat /sys/class/misc/fuse/dev") == "10:229\n");
  CHECK(guest.sh("ls /proc/self/ns | tr '\\n' ' '") ==
        "cgroup ipc mnt net pid pid_for_children user uts ");
  CHECK(guest.sh("unshare -u -n -p -f -m sh -c 'hostname inner; hostname; ip -o link | wc -l'") ==
        "inner\n1\n");
  CHECK(guest.sh("hostname") == "msb-kernel\n");
  CHECK(guest.sh("grep -c '^Seccomp_filters:' /proc/self/status") == "1\n");
  CHECK(guest.sh("cat /proc/sys/kernel/seccomp/actions_avail").find("kill_process") !=
        std::string::npos);
  CHECK(guest.sh("ip -6 addr show dev lo").find("::1") != std::string::npos);
  CHECK(guest.sh("ip -4 addr show dev lo").find("127.0.0.1") != std::string::npos);
  CHECK(guest.sh("grep ' /dev/shm ' /proc/mounts | cut -d' ' -f3") == "tmpfs\n");
  CHECK(guest.sh("test -c /dev/ptmx && echo ok") == "ok\n");

  // Exec semantics the agent owes whatever the kernel: exit codes, signals, stdin, users.
  CHECK(guest.exec(Command({"sh", "-c", "exit 3"})).code == 3);
  GuestResult killed = guest.exec(Command({"sh", "-c", "kill -TERM $$"}));
  CHECK(killed.signal == SIGTERM);
  CHECK(guest.exec(Command({"wc", "-c"}), std::string(1 << 20, 'x')).out == "1048576\n");
  CHECK(guest.exec(Command({"id", "-u"}).as("tester")).out == "1000\n");
  CHECK(guest.exec(Command({"sleep", "30"}).timeout(500ms)).timed_out);

  // Restore-time calls with the built-in drivers: a CPU offlined and onlined again (hotplug),
  // the balloon inflated to the grant and deflated back.
  const uint64_t booted_total = mem_total_kib(guest);
  CHECK(booted_total > 400 * 1024);
  guest.qmp("balloon", {{"value", 256ull << 20}});
  msb::agent::RestorePayload restore{};
  restore.wall_clock_ns = 4102444800ull * 1'000'000'000ull;  // 2100-01-01
  restore.memory_mib = 256;
  restore.cpus = 1;
  for (size_t i = 0; i < sizeof restore.entropy; ++i)
    restore.entropy[i] = uint8_t(i * 13 + 7);
  guest.restore(restore, "restored");
  CHECK(guest.sh("hostname") == "restored\n");
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0\n");
  CHECK(mem_total_kib(guest) <= 256 * 1024);
  CHECK(std::stoull(guest.sh("date +%s")) >= 4102444800ull);

  guest.qmp("balloon", {{"value", 512ull << 20}});
  restore.memory_mib = 512;
  restore.cpus = 2;
  restore.entropy[0] ^= 0xff;
  guest.restore(restore, "restored-again");
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0-1\n");
  auto deadline = Clock::now() + 60s;
  while (mem_total_kib(guest) <= 400 * 1024) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(200ms);
  }

  // The disk's data reaches the image; the agent's power-off ends the VM through ACPI S5
  // (QEMU exits 0 only when the guest powered off, not on a halt).
  guest.sh("echo kept > /root/data && sync");
  CHECK(guest.power_off(60s) == 0);
  const std::string debugfs = msb::test::find_on_path("debugfs");
  msb::test::ProcessResult data =
      msb::test::run_process({debugfs.empty() ? "/sbin/debugfs" : debugfs, "-R", "cat /root/data",
                              options.root_image.string()});
  CHECK(data.out == "kept\n");
}

// The console port /dev/hvc0, as msb's own VMM gives it to the agent, with msb's default image.
TEST_CASE("msb's kernel serves the agent on the console port with the default image",
          "[linux-guest]") {
  prerequisites();
  msb::test::TempDir home_dir;
  auto home = msb::core::Home::resolve(home_dir.path());
  auto store = home.open_store();
  auto image = msb::core::prepare_image(home, *store, msb::core::kDefaultImage);
  LinuxGuestOptions options;
  options.kernel = GuestKernel::kMsb;
  options.root_image = image.ext4;
  options.cpus = 1;
  options.memory_mib = 256;
  options.console_port = true;
  LinuxGuest guest(options);
  CHECK(guest.sh("cat /proc/mounts").find("/dev/vda / ext4") != std::string::npos);
  CHECK(guest.exec(Command({"id", "-u"})).out == "0\n");
  CHECK(guest.power_off(60s) == 0);
}
