// vmm tier: sandboxes end to end. Runs the real msb binary, which boots msb's test guest in a
// detached VMM process; every check is on what a user sees (output, exit codes, files). Each test
// exits 77 with the reason printed where /dev/kvm is missing.
#include <fcntl.h>
#include <pty.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "guest/protocol/pattern.h"
#include "tests/msb_cli.h"
#include "tests/support.h"

using msb::test::Background;
using msb::test::checksum_line;
using msb::test::first_difference;
using msb::test::Msb;
using msb::test::pattern_bytes;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
using msb::test::TempDir;
namespace fs = std::filesystem;

namespace {

// The pids of running VMM processes (`msb __vmm DIR`) of sandbox `name` in msb's home.
std::vector<int> vmm_processes(Msb& msb, const std::string& name) {
  std::vector<int> out;
  const std::string home = msb.home.path().filename().string();
  const std::string tail = "/sandboxes/" + name + std::string(1, '\0');
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/proc", ec)) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string cmdline = msb::test::read_text(entry.path() / "cmdline");
    if (cmdline.find(std::string("__vmm") + '\0') != std::string::npos &&
        cmdline.find(home) != std::string::npos && cmdline.find(tail) != std::string::npos) {
      out.push_back(std::stoi(pid));
    }
  }
  return out;
}

// A kernel that writes `text` to the serial console (COM1), then runs `then`.
std::string serial_kernel(const std::string& text, const std::vector<uint8_t>& then) {
  std::vector<uint8_t> code;
  for (char c : text)
    code.insert(code.end(), {0x66, 0xba, 0xf8, 0x03, 0xb0, uint8_t(c), 0xee});  // out 0x3f8, c
  code.insert(code.end(), then.begin(), then.end());
  return msb::test::tiny_kernel(code);
}
const std::vector<uint8_t> kSpin = {0xeb, 0xfe};  // jmp . : never ready
// out 0x64, 0xfe: the i8042 reset, Linux's way to reboot after a panic with panic=-1 reboot=k.
const std::vector<uint8_t> kReset = {0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee, 0xf4, 0xeb, 0xfd};

// `msb ARGS...` with MSB_BOOT_TIMEOUT set.
ProcessResult with_boot_timeout(Msb& msb, const std::string& seconds,
                                std::vector<std::string> args) {
  args.insert(args.begin(), MSB_BINARY);
  return msb::test::run_process(
      args, {{"MSB_HOME", msb.home.path().string()}, {"MSB_BOOT_TIMEOUT", seconds}});
}

std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

// `msb ARGS...` on a terminal `columns` wide, as a user at a terminal runs it.
ProcessResult run_on_terminal(std::vector<std::string> args,
                              const std::map<std::string, std::string>& env,
                              unsigned short columns) {
  args.insert(args.begin(), MSB_BINARY);
  return msb::test::run_on_terminal(args, env, columns);
}

}  // namespace

TEST_CASE("a sandbox boots the test guest and runs every command", "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box", "--cpus", "2", "--memory", "128", "--env", "GREETING=hi"}));

  ProcessResult echo = msb({"exec", "box", "--", "echo", "hello", "world"});
  require_ok(echo);
  REQUIRE(echo.out == "hello world\n");
  REQUIRE(echo.err.empty());

  std::string env = msb.exec({"env"});
  REQUIRE_THAT(env, Catch::Contains("GREETING=hi\n"));
  ProcessResult env2 = msb({"exec", "--env", "EXTRA=1", "box", "--", "env"});
  require_ok(env2);
  REQUIRE_THAT(env2.out, Catch::Contains("GREETING=hi\n") && Catch::Contains("EXTRA=1\n"));

  REQUIRE(msb.exec({"cpus"}) == "2\n");
  // The guest's timer runs. Between two readings of its tick count, a cat whose input never
  // ends runs until its --timeout of a second kills it (msb reports that as 124, and says so).
  const uint64_t ticks1 = std::stoull(msb.exec({"ticks"}));
  {
    msb::test::InputFifo endless;
    Background timed(msb, {"exec", "--timeout", "1", "box", "--", "cat"}, endless.path());
    ProcessResult r = timed.wait();
    REQUIRE(r.exit_code == 124);
    REQUIRE(r.out.empty());
    REQUIRE(r.err == "msb: the command timed out after 1 s and was killed\n");
  }
  const uint64_t ticks2 = std::stoull(msb.exec({"ticks"}));
  REQUIRE(ticks2 > ticks1);

  REQUIRE(msb.exec({"fill", "4", "77"}) == checksum_line(77, 4));
  REQUIRE(msb.exec({"sum", "4"}) == checksum_line(77, 4));
  // load keeps its input in memory: the same bytes as fill's pattern give fill's checksum.
  REQUIRE(msb.exec({"load", "2"}, pattern_bytes(78, 2 << 20)) == checksum_line(78, 2));
  REQUIRE(msb.exec({"sum", "2"}) == checksum_line(78, 2));
  REQUIRE(msb.exec({"disk-write", "2", "5"}) == checksum_line(5, 2));
  REQUIRE(msb.exec({"disk-read", "2"}) == checksum_line(5, 2));

  std::string out = msb.exec({"out", "8", "11"});
  REQUIRE(out.size() == 8u << 20);
  REQUIRE(first_difference(out, pattern_bytes(11, 8 << 20)) == -1);

  // Through a file: run_process writes its input with one blocking write, which would wait for
  // msb to read it all while msb waits for its output to be read.
  std::string input = pattern_bytes(3, 3 * 1024 * 1024 + 13);
  TempDir files;
  msb::test::write_text(files / "input", input);
  ProcessResult cat_run =
      msb.run_process({"/bin/bash", "-c",
                       "'" MSB_BINARY "' exec box -- cat < '" + (files / "input").string() + "'"});
  require_ok(cat_run);
  const std::string& cat = cat_run.out;
  REQUIRE(cat.size() == input.size());
  REQUIRE(first_difference(cat, input) == -1);

  REQUIRE(msb({"exec", "box", "--", "exit", "0"}).exit_code == 0);
  REQUIRE(msb({"exec", "box", "--", "exit", "3"}).exit_code == 3);
  ProcessResult unknown = msb({"exec", "box", "--", "frobnicate"});
  REQUIRE(unknown.exit_code == 127);
  REQUIRE(unknown.out.empty());
  REQUIRE_THAT(unknown.err, Catch::Contains("frobnicate"));

  auto ls = msb.ls();
  REQUIRE(ls.size() == 1);
  REQUIRE(ls[0]["name"] == "box");
  REQUIRE(ls[0]["state"] == "running");
  REQUIRE(ls[0]["cpus"] == 2);
  REQUIRE(ls[0]["memory_mib"] == 128);
  REQUIRE(ls[0]["uptime_s"].get<double>() >= 0);
  int pid = ls[0]["pid"];
  REQUIRE(msb::test::process_alive(pid));
  ProcessResult table = msb({"ls"});
  require_ok(table);
  REQUIRE_THAT(table.out, Catch::Contains("box") && Catch::Contains("running"));

  // The control socket and the folder are the owner's alone.
  REQUIRE((fs::status(msb.dir("box")).permissions() & fs::perms::all) == fs::perms::owner_all);
  REQUIRE((fs::status(msb.dir("box") / "control.sock").permissions() &
           (fs::perms::group_all | fs::perms::others_all)) == fs::perms::none);

  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE(logs.out == msb::test::read_text(msb.dir("box") / "console.log"));
  REQUIRE_FALSE(logs.out.empty());

  require_error(msb({"create", "box"}), "sandbox \"box\" already exists");
  require_error(msb({"start", "box"}), "already running");
  require_error(msb({"rm", "box"}), "is running");
  require_ok(msb({"rm", "--force", "box"}));
  REQUIRE(msb.ls().empty());
  REQUIRE_FALSE(fs::exists(msb.dir("box")));
  // Killed: gone (not necessarily reaped yet by whoever its parent is now).
  REQUIRE(msb::test::eventually([&] { return !msb::test::process_alive(pid); }));
}

TEST_CASE("disk writes survive stop and start while the base image stays unchanged", "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path base = files / "base.img";
  std::string base_bytes = pattern_bytes(99, 8 << 20);
  msb::test::write_text(base, base_bytes);

  require_ok(msb({"create", "box", "--disk", base.string(), "--memory", "64"}));
  REQUIRE(msb.exec({"disk-read", "8"}) == checksum_line(99, 8));  // the base shows through
  REQUIRE(msb.exec({"disk-write", "2", "6"}) == checksum_line(6, 2));

  ProcessResult stop = msb({"stop", "box"});
  require_ok(stop);
  auto ls = msb.ls();
  REQUIRE(ls[0]["state"] == "stopped");
  REQUIRE(ls[0]["reason"] == "powered-off");
  REQUIRE(ls[0]["pid"].is_null());
  require_error(msb({"exec", "box", "--", "echo"}), "sandbox \"box\" is not running (stopped");
  require_error(msb({"stop", "box"}), "is not running");

  require_ok(msb({"start", "box"}));
  REQUIRE(msb.ls()[0]["state"] == "running");
  REQUIRE(msb.exec({"disk-read", "2"}) == checksum_line(6, 2));
  REQUIRE(msb::test::read_text(base) == base_bytes);

  require_ok(msb({"stop", "box"}));
  require_ok(msb({"rm", "box"}));  // stopped: no --force needed
  REQUIRE(msb::test::read_text(base) == base_bytes);
}

// The test guest runs one exec at a time (max_concurrent 1 in its kReady): the VMM queues the
// others and serves them in turn.
TEST_CASE("two execs at once in a one-slot sandbox are served in turn, each with its own output",
          "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box"}));
  REQUIRE(msb.vmm_status("box").at("max_concurrent") == 1);
  auto running_and_queued = [&](int running, int queued) {
    nlohmann::json status = msb.vmm_status("box");
    return status.at("running") == running && status.at("queued") == queued;
  };

  // The first, a cat, holds the slot until its input ends.
  msb::test::InputFifo first_input;
  Background first(msb, {"exec", "box", "--", "cat"}, first_input.path());
  REQUIRE(msb::test::eventually([&] { return first.exited() || running_and_queued(1, 0); }));
  REQUIRE_FALSE(first.exited());
  // The second waits behind it, with nothing of its output yet.
  Background second(msb, {"exec", "box", "--", "out", "4", "2"});
  REQUIRE(msb::test::eventually([&] { return second.exited() || running_and_queued(1, 1); }));
  REQUIRE_FALSE(second.exited());
  REQUIRE(second.result().out.empty());
  // The first's input ends: it finishes, then the second runs.
  const std::string input = pattern_bytes(1, 4000);
  first_input.write(input);
  first_input.close();
  ProcessResult a = first.wait();
  require_ok(a);
  REQUIRE(first_difference(a.out, input) == -1);
  ProcessResult b = second.wait();
  require_ok(b);
  REQUIRE(b.err.empty());
  REQUIRE(first_difference(b.out, pattern_bytes(2, 4 << 20)) == -1);
  REQUIRE(running_and_queued(0, 0));

  // A cat whose input never ends holds the slot, with an echo queued behind it; killing the
  // cat's msb exec kills it in the guest, and the echo runs.
  msb::test::InputFifo endless;
  Background holder(msb, {"exec", "box", "--", "cat"}, endless.path());
  REQUIRE(msb::test::eventually([&] { return holder.exited() || running_and_queued(1, 0); }));
  REQUIRE_FALSE(holder.exited());
  Background next(msb, {"exec", "box", "--", "echo", "next"});
  REQUIRE(msb::test::eventually([&] { return next.exited() || running_and_queued(1, 1); }));
  REQUIRE_FALSE(next.exited());
  REQUIRE(::kill(holder.pid(), SIGKILL) == 0);
  REQUIRE(holder.wait().exit_code == 128 + SIGKILL);
  ProcessResult echoed = next.wait();
  require_ok(echoed);
  REQUIRE(echoed.out == "next\n");
  REQUIRE(msb::test::eventually([&] { return running_and_queued(0, 0); }));
  REQUIRE(msb.exec({"echo", "again"}) == "again\n");
}

TEST_CASE("msb run creates, runs and removes", "[sandbox]") {
  Msb msb;
  ProcessResult hi = msb({"run", "--", "echo", "hi"});
  require_ok(hi);
  REQUIRE(hi.out == "hi\n");
  REQUIRE(msb({"run", "--cpus", "2", "--", "exit", "5"}).exit_code == 5);
  ProcessResult cpus = msb({"run", "--cpus", "3", "--", "cpus"});
  require_ok(cpus);
  REQUIRE(cpus.out == "3\n");
  REQUIRE(msb.ls().empty());
}

TEST_CASE("a killed VMM is reported as failed and rm cleans it up", "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box"}));
  int pid = msb.ls()[0]["pid"];
  REQUIRE(vmm_processes(msb, "box") == std::vector<int>{pid});
  REQUIRE(::kill(pid, SIGKILL) == 0);
  nlohmann::json ls;
  REQUIRE(msb::test::eventually([&] {
    ls = msb.ls();
    return ls[0]["state"] != "running";
  }));
  REQUIRE(ls[0]["state"] == "failed");
  REQUIRE(ls[0]["reason"] == "killed");
  REQUIRE_THAT(ls[0]["detail"].get<std::string>(), Catch::Contains(std::to_string(pid)));
  ProcessResult table = msb({"ls"});
  require_ok(table);
  REQUIRE_THAT(table.out, Catch::Contains("failed") && Catch::Contains("killed"));
  require_error(msb({"exec", "box", "--", "echo"}), "is not running (failed: killed)");

  // A failed sandbox boots again, and is removed without --force once stopped.
  require_ok(msb({"start", "box"}));
  REQUIRE(msb.exec({"echo", "back"}) == "back\n");
  require_ok(msb({"rm", "--force", "box"}));
  REQUIRE_FALSE(fs::exists(msb.dir("box")));
  REQUIRE(msb.ls().empty());
}

TEST_CASE("a kernel that cannot boot leaves its sandbox failed, with its logs, until msb rm",
          "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path not_a_kernel = files / "not-a-kernel";
  msb::test::write_text(not_a_kernel, std::string(4096, 'x'));
  ProcessResult r = msb({"create", "box", "--kernel", not_a_kernel.string()});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err),
               Catch::StartsWith("msb: error: sandbox \"box\" did not boot: vmm-error: ") &&
                   Catch::Contains("neither a bzImage nor an ELF") &&
                   Catch::EndsWith(" (kept as failed: msb logs box; msb rm box)"));
  REQUIRE_THAT(r.err, Catch::Contains("\n  (the console log is empty)"));
  // stderr is no terminal: no progress line.
  REQUIRE(r.err.find_first_of("\r\x1b") == std::string::npos);
  REQUIRE(vmm_processes(msb, "box").empty());

  auto ls = msb.ls();
  REQUIRE(ls.size() == 1);
  REQUIRE(ls[0]["name"] == "box");
  REQUIRE(ls[0]["state"] == "failed");
  REQUIRE(ls[0]["reason"] == "vmm-error");
  REQUIRE_THAT(ls[0]["detail"].get<std::string>(), Catch::Contains("neither a bzImage nor an ELF"));
  REQUIRE(ls[0]["pid"].is_null());
  ProcessResult table = msb({"ls"});
  require_ok(table);
  REQUIRE_THAT(table.out, Catch::Contains("failed") && Catch::Contains("vmm-error"));
  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE(logs.out == msb::test::read_text(msb.dir("box") / "console.log"));
  REQUIRE_THAT(msb::test::read_text(msb.dir("box") / "vmm.log"),
               Catch::Contains("vmm-error") && Catch::Contains("neither a bzImage nor an ELF"));
  REQUIRE(fs::exists(msb.dir("box") / "exit.json"));

  // The name stays taken until msb rm, which needs no --force for a failed sandbox.
  require_error(msb({"create", "box", "--kernel", not_a_kernel.string()}),
                "sandbox \"box\" already exists (failed: vmm-error; msb rm box removes it)");
  require_ok(msb({"rm", "box"}));
  REQUIRE(msb.ls().empty());
  REQUIRE_FALSE(fs::exists(msb.dir("box")));
}

TEST_CASE("a guest that never answers times out, its VMM killed, its sandbox failed", "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path kernel = files / "silent";
  msb::test::write_text(kernel, serial_kernel("msb-test: up, but no agent\n", kSpin));
  // The error names the timeout that fired (not some other failure).
  ProcessResult r = with_boot_timeout(msb, "2", {"create", "box", "--kernel", kernel.string()});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err),
               Catch::StartsWith("msb: error: sandbox \"box\" did not boot: boot-timeout: ") &&
                   Catch::Contains(" within 2 s") &&
                   Catch::EndsWith(" (kept as failed: msb logs box; msb rm box)"));
  REQUIRE_THAT(r.err, Catch::Contains("\nlast lines of the console log:\n"
                                      "  msb: kernel command line: ") &&
                          Catch::EndsWith("\n  msb-test: up, but no agent\n"));
  REQUIRE(r.err.find_first_of("\r\x1b") == std::string::npos);  // no progress line

  // The VMM was killed: its pid is gone, and no VMM of the sandbox runs.
  const int pid = std::stoi(msb::test::read_text(msb.dir("box") / "pid"));
  REQUIRE_FALSE(msb::test::process_alive(pid));
  REQUIRE(vmm_processes(msb, "box").empty());
  auto ls = msb.ls();
  REQUIRE(ls.size() == 1);
  REQUIRE(ls[0]["state"] == "failed");
  REQUIRE(ls[0]["reason"] == "boot-timeout");
  REQUIRE_THAT(ls[0]["detail"].get<std::string>(), Catch::Contains("within 2 s"));
  ProcessResult table = msb({"ls"});
  require_ok(table);
  REQUIRE_THAT(table.out, Catch::Contains("failed") && Catch::Contains("boot-timeout"));
  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE_THAT(logs.out, Catch::StartsWith("msb: kernel command line: ") &&
                             Catch::EndsWith("\nmsb-test: up, but no agent\n"));

  // A start that fails the same way leaves it failed too.
  r = with_boot_timeout(msb, "1", {"start", "box"});
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err),
               Catch::StartsWith("msb: error: sandbox \"box\" did not boot: boot-timeout: ") &&
                   Catch::EndsWith(" (kept as failed: msb logs box; msb rm box)"));
  REQUIRE(vmm_processes(msb, "box").empty());
  REQUIRE(msb.ls()[0]["state"] == "failed");
  REQUIRE(msb.ls()[0]["reason"] == "boot-timeout");
  require_ok(msb({"rm", "box"}));
  REQUIRE(msb.ls().empty());
}

TEST_CASE("a guest that powers off while it boots (a kernel panic) leaves its sandbox failed",
          "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path kernel = files / "panics";
  msb::test::write_text(kernel, serial_kernel("Kernel panic - not syncing: msb test\n", kReset));
  ProcessResult r = msb({"create", "box", "--kernel", kernel.string()});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err),
               Catch::StartsWith("msb: error: sandbox \"box\" did not boot: boot-failed: the "
                                 "guest powered off before its agent answered") &&
                   Catch::EndsWith(" (kept as failed: msb logs box; msb rm box)"));
  REQUIRE_THAT(r.err, Catch::Contains("\n  Kernel panic - not syncing: msb test"));
  REQUIRE(vmm_processes(msb, "box").empty());
  auto ls = msb.ls();
  REQUIRE(ls[0]["state"] == "failed");
  REQUIRE(ls[0]["reason"] == "boot-failed");
  // The VMM's first line, then the guest's.
  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE_THAT(logs.out, Catch::StartsWith("msb: kernel command line: ") &&
                             Catch::EndsWith("\nKernel panic - not syncing: msb test\n"));
  require_ok(msb({"rm", "box"}));
  REQUIRE(msb.ls().empty());
}

TEST_CASE("msb run whose guest does not boot says why and leaves nothing", "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path not_a_kernel = files / "not-a-kernel";
  msb::test::write_text(not_a_kernel, std::string(4096, 'x'));
  fs::path silent = files / "silent";
  msb::test::write_text(silent, serial_kernel("msb-test: up, but no agent\n", kSpin));

  ProcessResult r = msb({"run", "--kernel", not_a_kernel.string(), "--", "echo", "hi"});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err), Catch::StartsWith("msb: error: sandbox \"run-") &&
                                      Catch::Contains("\" did not boot: vmm-error: "));
  REQUIRE_THAT(r.err, !Catch::Contains("kept"));

  r = with_boot_timeout(msb, "1",
                        {"run", "--name", "once", "--kernel", silent.string(), "--", "echo", "hi"});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err),
               Catch::StartsWith("msb: error: sandbox \"once\" did not boot: boot-timeout: "));
  REQUIRE_THAT(r.err,
               !Catch::Contains("kept") && Catch::Contains("\n  msb-test: up, but no agent"));
  REQUIRE(vmm_processes(msb, "once").empty());

  REQUIRE(msb.ls().empty());
  REQUIRE(fs::is_empty(msb.home / "sandboxes"));  // not even a folder being removed
}

TEST_CASE("a slow boot shows one progress line on a terminal", "[sandbox]") {
  Msb msb;
  TempDir files;
  fs::path kernel = files / "silent";
  // The guest's output is untrusted: escape sequences and control characters never reach the
  // terminal, and the line is cut to the terminal's width.
  const std::string text = "[    0.000] slow\tboot " + std::string(100, 'x');
  msb::test::write_text(kernel, serial_kernel("\x1b]0;title\x07\x1b[31m" + text + "\r\n", kSpin));
  // Long enough that the console line shows on a busy host too: the boot never ends anyway.
  ProcessResult r =
      run_on_terminal({"create", "box", "--kernel", kernel.string()},
                      {{"MSB_HOME", msb.home.path().string()}, {"MSB_BOOT_TIMEOUT", "8"}}, 100);
  INFO(r.out);
  REQUIRE(r.exit_code == 1);
  // Each redraw erases the line first; every one fits in the terminal's 100 columns less one.
  std::vector<std::string> lines;
  for (size_t at = r.out.find("\r\x1b[K"); at != std::string::npos;) {
    size_t next = r.out.find("\r\x1b[K", at + 4);
    lines.push_back(r.out.substr(at + 4, next == std::string::npos ? next : next - at - 4));
    at = next;
  }
  REQUIRE(lines.size() >= 2);
  // "booting box: N s...", N the whole seconds waited: a second at least, never before.
  auto seconds_of = [](const std::string& line) {
    const std::string prefix = "booting box: ";
    if (!line.starts_with(prefix)) return -1;
    const size_t digits = line.find_first_not_of("0123456789", prefix.size());
    if (digits == prefix.size() || digits == std::string::npos) return -1;
    return std::stoi(line.substr(prefix.size(), digits - prefix.size()));
  };
  REQUIRE(seconds_of(lines[0]) >= 1);
  bool cut_line_shown = false;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    INFO(lines[i]);
    REQUIRE(seconds_of(lines[i]) >= 1);
    const std::string full = "booting box: " + std::to_string(seconds_of(lines[i])) +
                             " s: [    0.000] slow boot " + std::string(100, 'x');
    cut_line_shown = cut_line_shown || lines[i] == full.substr(0, 96) + "...";
  }
  REQUIRE(cut_line_shown);
  for (size_t i = 0; i + 1 < lines.size(); ++i)
    REQUIRE(lines[i].size() <= 99);
  // Cleared before the error.
  REQUIRE_THAT(r.out, Catch::Contains("\r\x1b[Kmsb: error: sandbox \"box\" did not boot: "));
  // The only escape sequence on the terminal is msb's own "erase the line".
  for (size_t at = r.out.find('\x1b'); at != std::string::npos; at = r.out.find('\x1b', at + 1)) {
    INFO(at);
    REQUIRE(r.out.compare(at, 3, "\x1b[K") == 0);
  }
  require_ok(msb({"rm", "box"}));

  // --quiet: no progress line.
  r = run_on_terminal({"--quiet", "create", "box", "--kernel", kernel.string()},
                      {{"MSB_HOME", msb.home.path().string()}, {"MSB_BOOT_TIMEOUT", "2"}}, 100);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.out, Catch::StartsWith("msb: error: sandbox \"box\" did not boot: "));
  REQUIRE(r.out.find("booting") == std::string::npos);
}

TEST_CASE("an interrupted create stops its VMM and leaves nothing", "[sandbox]") {
  Msb msb;
  TempDir files;
  const fs::path spinning = files / "spinning-kernel";
  msb::test::write_text(spinning, msb::test::tiny_kernel({0xeb, 0xfe}));  // jmp . : never ready
  Background create(msb, {"create", "box", "--kernel", spinning.string()});
  // Ctrl-C once the VMM runs (its pid file names it) and msb waits for it to boot, ready to stop
  // it on an interrupt (it catches SIGINT then, and only then).
  const fs::path pid_file = msb.dir("box") / "pid";
  int vmm = 0;
  REQUIRE(msb::test::eventually([&] {
    if (create.exited()) return true;
    const std::string text = msb::test::read_text(pid_file);
    vmm = text.empty() ? 0 : std::stoi(text);
    return vmm > 0 && vmm_processes(msb, "box") == std::vector<int>{vmm} &&
           msb::test::catches_signal(create.pid(), SIGINT);
  }));
  {
    INFO(create.result().err);
    REQUIRE_FALSE(create.exited());
  }
  REQUIRE(::kill(create.pid(), SIGINT) == 0);
  ProcessResult r = create.wait();
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(first_line(r.err), Catch::StartsWith("msb: error: sandbox \"box\" did not boot: ") &&
                                      Catch::Contains("interrupted by SIGINT"));
  REQUIRE_FALSE(fs::exists(msb.dir("box")));
  REQUIRE(msb.ls().empty());
  // The VMM is gone: msb create killed it (and reaped it, its child).
  REQUIRE(msb::test::eventually([&] { return !msb::test::process_alive(vmm); }));
  REQUIRE(vmm_processes(msb, "box").empty());
}

TEST_CASE("an interrupt right after the VMM is spawned still stops it", "[sandbox]") {
  // msb create stopped (a test hook) between spawning the VMM and waiting for it to boot, when
  // its interrupt handler is not yet in place; a signal then, and it goes on.
  Msb msb;
  TempDir hooks, files;
  msb.env["MSB_TEST_HOOKS"] = hooks.path().string();
  const fs::path spinning = files / "spinning-kernel";
  msb::test::write_text(spinning, msb::test::tiny_kernel({0xeb, 0xfe}));  // jmp . : never ready
  msb::test::write_text(hooks / "sandbox-vmm-spawned.arm", "");
  Background create(msb, {"create", "box", "--kernel", spinning.string()});
  REQUIRE(msb::test::eventually(
      [&] { return fs::exists(hooks / "sandbox-vmm-spawned") || create.exited(); }));
  REQUIRE(fs::exists(hooks / "sandbox-vmm-spawned"));
  REQUIRE(std::stoi(msb::test::read_text(hooks / "sandbox-vmm-spawned")) == create.pid());
  REQUIRE(msb::test::eventually([&] { return msb::test::process_state(create.pid()) == 'T'; }));
  // SIGTERM (as a Ctrl-C does with SIGINT, which a shell's background job may ignore). Without
  // it blocked until the handler is in place, msb dies of it here and the VMM runs on.
  REQUIRE(::kill(create.pid(), SIGTERM) == 0);
  REQUIRE(::kill(create.pid(), SIGCONT) == 0);
  ProcessResult r = create.wait();
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.err, Catch::Contains("interrupted by SIGTERM"));
  REQUIRE_FALSE(fs::exists(msb.dir("box")));
  REQUIRE(msb::test::eventually([&] { return vmm_processes(msb, "box").empty(); }));
}

TEST_CASE("an interrupted run stops and removes its sandbox", "[sandbox]") {
  Msb msb;
  // `out` streams for minutes (to /dev/null) unless interrupted.
  Background run(msb, {"run", "--name", "once", "--", "out", "100000", "1"}, "/dev/null",
                 /*discard_stdout=*/true);
  // Ctrl-C while the command runs: the VMM says it runs one, and msb is ready to stop the VMM
  // on an interrupt.
  REQUIRE(msb::test::eventually([&] {
    if (run.exited()) return true;
    for (const auto& box : msb.ls()) {
      if (box.at("name") == "once" && box.at("state") == "running") {
        return msb.vmm_status("once").at("running") == 1 &&
               msb::test::catches_signal(run.pid(), SIGINT);
      }
    }
    return false;
  }));
  {
    INFO(run.result().err);
    REQUIRE_FALSE(run.exited());
  }
  const int vmm = std::stoi(msb::test::read_text(msb.dir("once") / "pid"));
  REQUIRE(vmm_processes(msb, "once") == std::vector<int>{vmm});
  REQUIRE(::kill(run.pid(), SIGINT) == 0);
  require_error(run.wait(), "run of \"once\" interrupted by SIGINT; the VMM was stopped");
  REQUIRE(msb.ls().empty());
  REQUIRE_FALSE(fs::exists(msb.dir("once")));
  REQUIRE(msb::test::eventually([&] { return !msb::test::process_alive(vmm); }));
  REQUIRE(vmm_processes(msb, "once").empty());
}
