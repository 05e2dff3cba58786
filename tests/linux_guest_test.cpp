// The linux-guest tier: msb's agent as PID 1 of msb's initramfs on Debian's cloud kernel, under
// QEMU microvm with TCG (tests/linux_guest.h), driven by msb's own exec multiplexer and control
// client. Each TEST_CASE boots once and checks many things in sequence: a boot costs seconds.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <future>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/images.h"
#include "guest/agent/exec.h"
#include "guest/agent/init.h"
#include "guest/agent/restore.h"
#include "guest/agent/users.h"
#include "tests/linux_guest.h"

namespace {

using msb::test::Command;
using msb::test::GuestResult;
using msb::test::LinuxGuest;
using msb::test::LinuxGuestOptions;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The image most cases boot: busybox, root, and `tester` (1000:1000, also in group `extra`).
std::filesystem::path test_image(const msb::test::TempDir& dir) {
  auto image = dir / "root.ext4";
  msb::test::make_busybox_image(image, {{"tester", 1000, 1000, "/home/tester"}},
                                {"extra:x:2000:tester"});
  return image;
}

void prerequisites() {
  msb::test::skip_without_linux_guest();
  msb::test::skip_without_busybox();
}

std::string trim(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' '))
    text.pop_back();
  return text;
}

// The value of a /proc/meminfo line, in KiB.
uint64_t meminfo_kib(const std::string& meminfo, const std::string& key) {
  size_t at = meminfo.find(key + ":");
  REQUIRE(at != std::string::npos);
  return std::stoull(meminfo.substr(at + key.size() + 1));
}

std::string md5_on_host(const msb::test::TempDir& dir, const std::string& data) {
  auto path = dir / "md5-input";
  msb::test::write_text(path, data);
  auto result = msb::test::run_process({"/usr/bin/md5sum", path.string()});
  REQUIRE(result.exit_code == 0);
  return result.out.substr(0, 32);
}

}  // namespace

TEST_CASE("The agent boots Linux into the root image, loads its modules and runs commands",
          "[linux-guest]") {
  prerequisites();
  msb::test::TempDir dir;
  LinuxGuestOptions options;
  options.root_image = test_image(dir);
  options.hostname = "agent-test";
  options.env = {"A=sandbox", "B=sandbox", "PATH=/bin:/sbin"};
  LinuxGuest guest(options);

  // PID 1's setup: every module of the initramfs loaded, the ext4 image as /, the pseudo
  // filesystems and tmpfs mounts, the hostname from msb.hostname, the initramfs freed.
  std::string modules = guest.sh("cat /proc/modules");
  for (const char* module : {"virtio ", "virtio_ring ", "virtio_mmio ", "virtio_console ",
                             "virtio_blk ", "virtio_rng ", "virtio_balloon "}) {
    INFO(modules);
    CHECK(("\n" + modules).find(std::string("\n") + module) != std::string::npos);
  }
  std::string mounts = guest.sh("cat /proc/mounts");
  CHECK(mounts.find("/dev/vda / ext4 rw") != std::string::npos);
  for (const char* mount : {"proc /proc proc", "sysfs /sys sysfs", "devtmpfs /dev devtmpfs",
                            "devpts /dev/pts devpts", "tmpfs /run tmpfs", "tmpfs /tmp tmpfs"}) {
    INFO(mounts);
    CHECK(mounts.find(mount) != std::string::npos);
  }
  CHECK(guest.sh("hostname") == "agent-test\n");
  CHECK(guest.sh("test -e /newroot || test -e /init || echo gone") == "gone\n");
  CHECK(guest.sh("cat /proc/1/cmdline") == std::string("/init\0", 6));
  CHECK(guest.console().find("msb-agent: cannot") == std::string::npos);

  // Exit codes; a signal that ends a command; commands that cannot start.
  CHECK(guest.exec(Command({"sh", "-c", "exit 3"})).code == 3);
  GuestResult killed = guest.exec(Command({"sh", "-c", "kill -TERM $$"}));
  CHECK(killed.code == -1);
  CHECK(killed.signal == SIGTERM);
  GuestResult missing = guest.exec(Command({"no-such-command"}));
  CHECK(missing.code == 127);
  CHECK(missing.err.find("no-such-command: command not found") != std::string::npos);
  GuestResult not_executable = guest.exec(Command({"/etc/passwd"}));
  CHECK(not_executable.code == 126);
  CHECK(not_executable.err.find("Permission denied") != std::string::npos);
  GuestResult bad_dir = guest.exec(Command({"true"}).in("/no/such/dir"));
  CHECK(bad_dir.code == 126);
  CHECK(bad_dir.err.find("/no/such/dir") != std::string::npos);

  // The environment: the agent's base (HOME), then the sandbox's (kSetEnv), then the exec's.
  GuestResult env =
      guest.exec(Command({"sh", "-c", "echo $A $B $C $HOME $PATH"}).with_env({"B=exec", "C=exec"}));
  CHECK(env.out == "sandbox exec exec /root /bin:/sbin\n");
  // The working directory: "/" by default, else the one asked for.
  CHECK(guest.sh("pwd") == "/\n");
  CHECK(guest.exec(Command({"pwd"}).in("/tmp")).out == "/tmp\n");

  // Users from the image's /etc/passwd and /etc/group.
  GuestResult tester = guest.exec(Command({"sh", "-c", "id -u; id -g; id -G; echo $HOME; pwd"})
                                      .in("/home/tester")
                                      .as("tester"));
  CHECK(tester.code == 0);
  CHECK(tester.out == "1000\n1000\n1000 2000\n/home/tester\n/home/tester\n");
  CHECK(guest.exec(Command({"id", "-u"}).as("1000")).out == "1000\n");
  CHECK(guest.exec(Command({"id", "-g"}).as("tester:extra")).out == "2000\n");
  CHECK(guest.exec(Command({"sh", "-c", "id -u; id -g"}).as("4321:4322")).out == "4321\n4322\n");
  GuestResult no_user = guest.exec(Command({"id"}).as("nobody-here"));
  CHECK(no_user.code == 126);
  CHECK(no_user.err.find("nobody-here") != std::string::npos);
  CHECK(guest.exec(Command({"touch", "/root-only"}).as("tester")).code != 0);

  // Standard input, to its end.
  CHECK(guest.exec(Command({"cat"}), std::string("hello\nworld\n")).out == "hello\nworld\n");
  CHECK(guest.exec(Command({"cat"})).out.empty());
  std::string input(3 * 1024 * 1024 + 17, '\0');
  for (size_t i = 0; i < input.size(); ++i)
    input[i] = static_cast<char>(i * 7 + i / 4096);
  CHECK(guest.exec(Command({"wc", "-c"}), input).out == std::to_string(input.size()) + "\n");
  CHECK(trim(guest.exec(Command({"md5sum"}), input).out).substr(0, 32) == md5_on_host(dir, input));

  // Large output on stdout while stderr carries its checksum.
  auto started = Clock::now();
  GuestResult big = guest.exec(Command({"sh", "-c",
                                        "head -c 8388608 /dev/urandom > /tmp/big && "
                                        "md5sum /tmp/big >&2 && cat /tmp/big"}));
  INFO("8 MiB took " << std::chrono::duration<double>(Clock::now() - started).count() << " s");
  REQUIRE(big.code == 0);
  CHECK(big.out.size() == 8388608);
  CHECK(big.err.substr(0, 32) == md5_on_host(dir, big.out));

  // A timeout kills the command's whole process group (without it the command runs 301 s).
  GuestResult slow = guest.exec(Command({"sh", "-c", "sleep 300 & sleep 301"}).timeout(1500ms));
  CHECK(slow.code == -1);
  CHECK(slow.signal == SIGKILL);
  // (Whether msb calls it a timeout depends on whose deadline fired first: the agent's own, or
  // the mux's kSignal; kExit carries no flag for it.)
  CHECK(guest.sh("pgrep -f '^sleep 30[01]' | wc -l") == "0\n");

  // Several commands at once: each waits, behind a barrier, until all six have started, so they
  // finish only if they run at the same time (one after the other, the first would time out).
  guest.sh("rm -rf /tmp/barrier; mkdir /tmp/barrier");
  std::vector<std::future<GuestResult>> running;
  for (int i = 0; i < 6; ++i) {
    running.push_back(std::async(std::launch::async, [&guest, i] {
      const std::string n = std::to_string(i);
      return guest.exec(Command({"sh", "-c",
                                 "touch /tmp/barrier/" + n +
                                     "; until [ $(ls /tmp/barrier | wc -l) -ge 6 ]; do sleep 0.1; "
                                     "done; echo " +
                                     n})
                            .timeout(120s));
    }));
  }
  for (int i = 0; i < 6; ++i) {
    GuestResult result = running[i].get();
    CHECK_FALSE(result.timed_out);
    CHECK(result.code == 0);
    CHECK(result.out == std::to_string(i) + "\n");
  }

  // A command is over when it exits, even if a background child still holds its output (that
  // child runs 600 s: waiting for it would hit the timeout).
  GuestResult background = guest.exec(Command({"sh", "-c", "sleep 600 & echo bg"}).timeout(120s));
  CHECK_FALSE(background.timed_out);
  CHECK(background.code == 0);
  CHECK(background.out == "bg\n");
  guest.sh("pkill -f '^sleep 600' || true");

  // Orphans are reaped by PID 1: the orphan's /proc entry goes away (a zombie keeps it, state Z).
  guest.sh("sh -c 'sleep 0.2 & echo $! > /tmp/orphan; exit 0'");
  CHECK(guest.sh("pid=$(cat /tmp/orphan); i=0; while [ -e /proc/$pid ] && [ $i -lt 1200 ]; do "
                 "sleep 0.1; i=$((i+1)); done; "
                 "if [ -e /proc/$pid ]; then awk '{print \"left: \" $3}' /proc/$pid/stat; "
                 "else echo reaped; fi") == "reaped\n");

  // msb's mux signals a command whose client went away (kSignal 9 to its process group).
  {
    auto fd = msb::core::connect_unix(guest.dir() / "control.sock");
    REQUIRE(fd);
    msb::core::ControlConnection connection(std::move(fd));
    connection.send_request(
        {{"op", "exec"}, {"argv", {"sh", "-c", "echo started; sleep 400"}}, {"timeout_ms", 0}});
    auto frame = connection.read_frame(Clock::now() + 60s);
    REQUIRE(frame.has_value());
    CHECK(frame->payload == "started\n");
  }
  auto deadline = Clock::now() + 120s;
  while (guest.sh("pgrep -f '^sleep 400' | wc -l") != "0\n") {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(200ms);
  }

  // A clean power-off: QEMU exits 0 (the deadline only catches a hang).
  CHECK(guest.power_off(120s) == 0);
}

TEST_CASE("The agent applies kRestore: entropy, clock, hostname, CPUs and memory",
          "[linux-guest]") {
  prerequisites();
  msb::test::TempDir dir;
  LinuxGuestOptions options;
  options.root_image = test_image(dir);
  options.cpus = 2;
  options.memory_mib = 512;
  options.hostname = "before";
  options.env = {"X=kept"};
  LinuxGuest guest(options);
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0-1\n");
  const uint64_t booted_total = meminfo_kib(guest.sh("cat /proc/meminfo"), "MemTotal");
  CHECK(booted_total > 400 * 1024);

  // The host sets the balloon's target, then tells the guest what it was granted.
  guest.qmp("balloon", {{"value", 256ull << 20}});
  msb::agent::RestorePayload restore{};
  const uint64_t future_s = 4102444800;  // 2100-01-01
  restore.wall_clock_ns = future_s * 1'000'000'000ull;
  restore.memory_mib = 256;
  restore.cpus = 1;
  for (size_t i = 0; i < sizeof restore.entropy; ++i)
    restore.entropy[i] = uint8_t(i * 37 + 1);
  guest.restore(restore, "restored-one");

  CHECK(guest.sh("hostname") == "restored-one\n");
  uint64_t now = std::stoull(guest.sh("date +%s"));
  CHECK(now >= future_s);
  CHECK(now < future_s + 120);
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0\n");
  CHECK(meminfo_kib(guest.sh("cat /proc/meminfo"), "MemTotal") <= 256 * 1024);
  // The balloon keeps inflating to the whole target; QEMU's view agrees.
  auto deadline = Clock::now() + 120s;
  while (guest.qmp("query-balloon")["actual"].get<uint64_t>() != (256ull << 20)) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(100ms);
  }
  std::string log = guest.sh("dmesg | grep 'msb-agent: restored' || true");
  CHECK(log.find("restored as restored-one: entropy credited, 1 CPUs online") != std::string::npos);
  // The sandbox's environment came again after kReady.
  CHECK(guest.exec(Command({"sh", "-c", "echo $X"})).out == "kept\n");

  // Frame-level: what the mux never sends. A malformed kExec is answered with kExit 126, a
  // frame of an unknown type is skipped, kSignal reaches the command's process group. The
  // second restore brings the mux back.
  {
    LinuxGuest::RawAgent raw(guest);
    raw.send(msb::agent::kExec, 7, std::string("\1\0\0\0", 4));
    std::string err;
    auto exit = raw.wait_exit(7, nullptr, &err);
    CHECK(exit.code == 126);
    CHECK(err.find("malformed") != std::string::npos);
    raw.send(999, 0, "ignored");
    msb::core::ExecRequest sleeper;
    sleeper.argv = {"sh", "-c", "echo up; sleep 500"};
    raw.send(msb::agent::kExec, 8, msb::core::encode_exec(sleeper));
    raw.send(msb::agent::kStdin, 8, "");
    auto up = raw.next();
    CHECK(up.id == 8);
    CHECK(up.payload == "up\n");
    raw.send(msb::agent::kSignal, 8, msb::core::encode_signal(SIGTERM));
    exit = raw.wait_exit(8);
    CHECK(exit.code == -1);
    CHECK(exit.signal == SIGTERM);
  }
  // A second restore: more CPUs than the machine has are clamped to what is present, the
  // memory grows back.
  guest.qmp("balloon", {{"value", 512ull << 20}});
  restore.wall_clock_ns = (future_s + 1000) * 1'000'000'000ull;
  restore.memory_mib = 512;
  restore.cpus = 8;
  restore.entropy[0] ^= 0xff;
  guest.restore(restore, "restored-two");
  CHECK(guest.sh("pgrep -f '^sleep 500' | wc -l") == "0\n");
  CHECK(guest.sh("hostname") == "restored-two\n");
  CHECK(std::stoull(guest.sh("date +%s")) >= future_s + 1000);
  CHECK(guest.sh("cat /sys/devices/system/cpu/online") == "0-1\n");
  deadline = Clock::now() + 120s;
  while (guest.qmp("query-balloon")["actual"].get<uint64_t>() != (512ull << 20)) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(100ms);
  }
  CHECK(meminfo_kib(guest.sh("cat /proc/meminfo"), "MemTotal") > 400 * 1024);
  log = guest.sh("dmesg | grep 'msb-agent: restored' || true");
  CHECK(log.find("restored as restored-two: entropy credited, 2 CPUs online") != std::string::npos);

  CHECK(guest.power_off(120s) == 0);
}

// Also the agent on the console port /dev/hvc0 (the other cases use a named port).
TEST_CASE("msb's default image boots under the agent", "[linux-guest]") {
  prerequisites();  // the default image is made of the host's busybox-static
  msb::test::TempDir home_dir;
  auto home = msb::core::Home::resolve(home_dir.path());
  auto store = home.open_store();
  auto image = msb::core::prepare_image(home, *store, msb::core::kDefaultImage);
  LinuxGuestOptions options;
  options.root_image = image.ext4;
  options.cpus = 1;
  options.memory_mib = 256;
  options.console_port = true;  // /dev/hvc0, as under msb
  LinuxGuest guest(options);
  CHECK(guest.sh("cat /proc/mounts").find("/dev/vda / ext4") != std::string::npos);
  CHECK(guest.exec(Command({"id", "-u"})).out == "0\n");
  CHECK(guest.exec(Command({"sh", "-c", "echo $HOME; ls /bin/sh"})).code == 0);
  CHECK(guest.power_off(120s) == 0);
}

TEST_CASE("Without a root disk the agent serves from the initramfs", "[linux-guest]") {
  msb::test::skip_without_linux_guest();
  LinuxGuestOptions options;
  options.cpus = 1;
  options.memory_mib = 256;
  LinuxGuest guest(options);
  // The initramfs holds the agent as /init and the modules, nothing else to run.
  GuestResult agent = guest.exec(Command({"/init"}));
  CHECK(agent.code == 2);
  CHECK(agent.err.find("usage: msb-agent") != std::string::npos);
  GuestResult missing = guest.exec(Command({"sh", "-c", "true"}));
  CHECK(missing.code == 127);
  CHECK(missing.err.find("sh: command not found") != std::string::npos);
  CHECK(guest.console().find("msb-agent: cannot") == std::string::npos);
  CHECK(guest.power_off(std::chrono::seconds(120)) == 0);
}

// The agent's parsing, compiled into this binary: no guest needed (CTest runs these in the unit
// tier).

TEST_CASE("Agent: modules load after their dependencies, each once", "[agent-unit]") {
  // modules.dep lists a module's whole closure, the ones to load first last.
  const std::string dep =
      "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko "
      "kernel/drivers/virtio/virtio_ring.ko\n"
      "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko "
      "kernel/drivers/virtio/virtio_ring.ko\n"
      "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
      "kernel/drivers/virtio/virtio_ring.ko:\n"
      "\n"
      "malformed line without a colon\n";
  auto order = msb::agent::module_load_order(dep);
  REQUIRE(order == std::vector<std::string>{"kernel/drivers/virtio/virtio_ring.ko",
                                            "kernel/drivers/virtio/virtio.ko",
                                            "kernel/drivers/virtio/virtio_mmio.ko",
                                            "kernel/drivers/char/virtio_console.ko"});
  // A dependency that has no line of its own is still loaded first; a cycle ends.
  order = msb::agent::module_load_order("a.ko: b.ko\nc.ko: a.ko\nb.ko: c.ko\n");
  CHECK(order.size() == 3);
  CHECK(msb::agent::module_load_order("x.ko: y.ko\n") == std::vector<std::string>{"y.ko", "x.ko"});
}

TEST_CASE("Agent: the kernel command line", "[agent-unit]") {
  auto options = msb::agent::parse_cmdline(
      "console=ttyS0 msb.root=/dev/vdb msb.rootfstype=xfs "
      "msb.hostname=box quiet msb.port=msb.agent\n");
  CHECK(options.root == "/dev/vdb");
  CHECK(options.rootfstype == "xfs");
  CHECK(options.hostname == "box");
  CHECK(options.port == "msb.agent");
  auto defaults = msb::agent::parse_cmdline("console=ttyS0 root=/dev/sda");
  CHECK(defaults.root == "/dev/vda");
  CHECK(defaults.rootfstype.empty());
  CHECK(defaults.hostname.empty());
  CHECK(defaults.port.empty());
}

TEST_CASE("Agent: users and groups from /etc/passwd and /etc/group", "[agent-unit]") {
  msb::test::TempDir dir;
  msb::test::write_text(dir / "passwd",
                        "root:x:0:0:root:/root:/bin/sh\n"
                        "# a comment\n"
                        "broken line\n"
                        "tester:x:1000:1000:Tester:/home/tester:/bin/sh\n"
                        "nohome:x:1001:1001::::\n");
  msb::test::write_text(
      dir / "group", "root:x:0:\ntester:x:1000:\nextra:x:2000:someone,tester\nwheel:x:10:root\n");
  auto resolve = [&](const std::string& spec, std::string* error = nullptr) {
    std::string why;
    auto creds =
        msb::agent::resolve_user(spec, why, (dir / "passwd").string(), (dir / "group").string());
    if (error) *error = why;
    return creds;
  };
  auto tester = resolve("tester");
  REQUIRE(tester);
  CHECK(tester->uid == 1000);
  CHECK(tester->gid == 1000);
  CHECK(tester->home == "/home/tester");
  CHECK(tester->groups == std::vector<gid_t>{1000, 2000});
  auto by_uid = resolve("1000");
  REQUIRE(by_uid);
  CHECK(by_uid->gid == 1000);
  CHECK(by_uid->home == "/home/tester");
  auto with_group = resolve("tester:wheel");
  REQUIRE(with_group);
  CHECK(with_group->gid == 10);
  auto numeric = resolve("4321:4322");
  REQUIRE(numeric);
  CHECK(numeric->uid == 4321);
  CHECK(numeric->gid == 4322);
  CHECK(numeric->home == "/");
  auto unknown_uid = resolve("5555");
  REQUIRE(unknown_uid);
  CHECK(unknown_uid->gid == 0);
  CHECK(resolve("nohome")->home == "/");
  std::string error;
  CHECK_FALSE(resolve("nobody", &error));
  CHECK(error.find("nobody") != std::string::npos);
  CHECK_FALSE(resolve("tester:nogroup", &error));
  CHECK(error.find("nogroup") != std::string::npos);
  CHECK_FALSE(resolve("tester:"));
  CHECK_FALSE(resolve(":1000"));
}

TEST_CASE("Agent: environment layers, later keys win", "[agent-unit]") {
  auto env = msb::agent::merge_environment(msb::agent::base_environment("/root"),
                                           {"A=sandbox", "B=sandbox", "PATH=/bin", "junk"},
                                           {"B=exec", "=nokey", "C=x=y"});
  CHECK(env == std::vector<std::string>{"PATH=/bin", "HOME=/root", "A=sandbox", "B=exec", "C=x=y"});
}

TEST_CASE("Agent: CPU lists and kRestore payloads", "[agent-unit]") {
  CHECK(msb::agent::parse_cpu_list("0-3,5\n") == std::vector<unsigned>{0, 1, 2, 3, 5});
  CHECK(msb::agent::parse_cpu_list("0\n") == std::vector<unsigned>{0});
  CHECK(msb::agent::parse_cpu_list("\n")->empty());
  CHECK_FALSE(msb::agent::parse_cpu_list("3-1"));
  CHECK_FALSE(msb::agent::parse_cpu_list("a-b"));
  CHECK_FALSE(msb::agent::parse_cpu_list("0-"));

  msb::agent::RestorePayload payload{};
  payload.cpus = 2;
  payload.memory_mib = 300;
  std::string bytes(reinterpret_cast<const char*>(&payload), sizeof payload);
  auto request = msb::agent::decode_restore(bytes + "name" + '\0');
  REQUIRE(request);
  CHECK(request->name == "name");
  CHECK(request->payload.memory_mib == 300);
  CHECK_FALSE(msb::agent::decode_restore(bytes));                                // no name
  CHECK_FALSE(msb::agent::decode_restore(bytes + "name"));                       // no NUL
  CHECK_FALSE(msb::agent::decode_restore(bytes + "a" + '\0' + "b"));             // bytes after it
  CHECK_FALSE(msb::agent::decode_restore(bytes.substr(0, 40)));                  // short
  CHECK_FALSE(msb::agent::decode_restore(bytes + std::string(65, 'h') + '\0'));  // too long
  payload.cpus = 0;
  std::string no_cpus(reinterpret_cast<const char*>(&payload), sizeof payload);
  CHECK_FALSE(msb::agent::decode_restore(no_cpus + "n" + '\0'));
}
