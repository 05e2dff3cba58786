// msb-bench-vmm: msb's VMM next to QEMU on the same guest, msb's own test guest
// (guest/testguest), booted by both in the same run.
//
// For each configuration (msb in-process with 1 and 2 vCPUs; `qemu-system-x86_64 -M microvm`
// with KVM, or with TCG when KVM does not work for it) and each of --runs cold boots it measures:
//   boot   from the start (Machine::create, or QEMU's fork) to the guest's kReady frame;
//   exec   the round trip of `echo hi` (kExec sent to kExit received), --exec-iterations times:
//          median and p90 of that boot;
//   out    `out MIB SEED`: stdout bytes per second from kExec to kExit, the bytes checked
//          against guest/protocol/pattern.h;
//   fill   `fill MIB 1`: the guest writing MIB MiB of memory at CPL3 (its first touch), checked
//          by the checksum it prints;
//   off    kPowerOff until the VMM has stopped (QEMU: the process has exited).
// Configurations are interleaved run by run so that the machine's noise spreads over all of them.
// The summary gives each figure's median over the runs and its spread (min-max), then the issue's
// goals: msb's boot and exec round trip at least 2x faster than QEMU's on the same guest.
//
// QEMU runs as a child process, killed when a step passes --timeout (and, through
// PR_SET_PDEATHSIG, if this program dies), so none is ever left behind.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/bench_util.h"
#include "bench/qemu_guest.h"
#include "guest/protocol/agent_protocol.h"
#include "guest/protocol/pattern.h"
#include "vmm/machine.h"

#ifndef MSB_TESTGUEST_DEFAULT
#define MSB_TESTGUEST_DEFAULT "testguest"
#endif

namespace {

namespace fs = std::filesystem;
namespace agent = msb::agent;
using msb::vmm::Machine;
using msb::vmm::MachineConfig;
using msb::vmm::MachineExit;
using namespace msb::bench;

constexpr uint64_t kMiB = 1024 * 1024;

struct Options {
  unsigned runs = 5;
  unsigned exec_iterations = 200;
  unsigned out_mib = 64;
  unsigned fill_mib = 64;
  unsigned memory_mib = 256;
  double timeout_s = 120;
  std::string testguest = MSB_TESTGUEST_DEFAULT;
  std::string qemu = "qemu-system-x86_64";
  bool no_qemu = false;
  bool qemu_tcg = false;  // also measure QEMU with TCG, next to KVM
};

// --- One boot's figures, and the guests that produce them -------------------------------------

constexpr double kNotMeasured = std::numeric_limits<double>::quiet_NaN();

struct RunFigures {
  double boot_s = 0;
  double create_s = 0;  // msb only: Machine::create
  double exec_median_s = 0;
  double exec_p90_s = 0;
  double out_mib_per_s = kNotMeasured;
  double fill_s = 0;
  double off_s = kNotMeasured;
  std::string notes;  // figures this run could not take, and why
};

// The part of a run after kReady, the same for every VMM. False when `out` failed and left the
// channel unusable (recorded in the figures' notes).
bool measure_guest(AgentChannel& channel, const Options& options, const std::string& what,
                   RunFigures& figures) {
  uint32_t id = 1;
  std::vector<double> round_trips;
  round_trips.reserve(options.exec_iterations);
  for (unsigned i = 0; i < options.exec_iterations; ++i) {
    ExecResult r = run_exec(channel, id++, {"echo", "hi"}, options.timeout_s, what + ": echo hi");
    if (r.code != 0 || r.stdout_text != "hi\n")
      throw BenchError(
          strf("%s: echo hi exited %d with \"%s\"", what.c_str(), r.code, r.stdout_text.c_str()));
    round_trips.push_back(r.seconds);
  }
  figures.exec_median_s = percentile(round_trips, 0.5);
  figures.exec_p90_s = percentile(round_trips, 0.9);

  const uint64_t fill_seed = 1;
  ExecResult fill =
      run_exec(channel, id++, {"fill", std::to_string(options.fill_mib), std::to_string(fill_seed)},
               options.timeout_s, what + ": fill");
  std::string want =
      strf("%016llx\n", static_cast<unsigned long long>(msb::pattern::pattern_checksum(
                            fill_seed, options.fill_mib * kMiB / 8)));
  if (fill.code != 0 || fill.stdout_text != want)
    throw BenchError(strf("%s: fill %u exited %d printing \"%s\" (want \"%s\"): %s", what.c_str(),
                          options.fill_mib, fill.code, fill.stdout_text.c_str(), want.c_str(),
                          fill.stderr_text.c_str()));
  figures.fill_s = fill.seconds;
  // Last, because QEMU may lose output here (its virtconsole drops what its chardev cannot take
  // at once), which breaks the frame stream for good.
  const uint64_t out_seed = 5;
  const uint64_t want_bytes = options.out_mib * kMiB;
  try {
    ExecResult out =
        run_exec(channel, id++, {"out", std::to_string(options.out_mib), std::to_string(out_seed)},
                 options.timeout_s, what + ": out");
    if (out.code != 0 || out.stdout_bytes != want_bytes)
      throw BenchError(strf("out %u exited %d after %llu of %llu bytes (%s)", options.out_mib,
                            out.code, static_cast<unsigned long long>(out.stdout_bytes),
                            static_cast<unsigned long long>(want_bytes), out.stderr_text.c_str()));
    if (out.stdout_checksum != msb::pattern::pattern_checksum(out_seed, want_bytes / 8))
      throw BenchError("out's bytes are not the pattern: the channel lost or reordered data");
    figures.out_mib_per_s = static_cast<double>(options.out_mib) / out.seconds;
  } catch (const BenchError& e) {
    figures.notes += std::string(figures.notes.empty() ? "" : "; ") + e.what();
    return false;
  }
  return true;
}

// msb: the VMM in this process, as msb's VMM process runs it.
RunFigures run_msb(const Options& options, unsigned cpus) {
  const std::string what = strf("msb, %u vCPU%s", cpus, cpus == 1 ? "" : "s");
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) fail_errno("socketpair");
  AgentChannel channel(fds[1]);
  // Declared before the machine, so closed after it is gone.
  ScopedFd vmm_end{fds[0]};
  ScopedFd log{::open("/dev/null", O_WRONLY | O_CLOEXEC)};
  if (log.fd < 0) fail_errno("cannot open /dev/null");

  MachineConfig config;
  config.kernel_path = options.testguest;
  config.cmdline = "";
  config.cpus = config.max_cpus = cpus;
  config.memory_mib = config.max_memory_mib = options.memory_mib;
  config.disk_size = 0;  // no disk: QEMU gets none either
  config.console_log_fd = log.fd;
  config.agent_fd = vmm_end.fd;

  RunFigures figures;
  double start = wall_seconds();
  std::unique_ptr<Machine> machine = Machine::create(config);
  figures.create_s = wall_seconds() - start;
  machine->start();
  // wait() runs on its own thread so that a guest that never stops is stopped after the timeout.
  auto exited = std::async(std::launch::async, [&machine] { return machine->wait(); });
  auto finish = [&]() -> MachineExit {
    if (exited.wait_for(std::chrono::duration<double>(options.timeout_s)) !=
        std::future_status::ready)
      machine->stop();
    return exited.get();
  };
  try {
    expect_ready(channel.read(start + options.timeout_s, what + ": boot"), what);
    figures.boot_s = wall_seconds() - start;
    if (!measure_guest(channel, options, what, figures)) {
      machine->stop();
      finish();
      return figures;
    }
    double off_start = wall_seconds();
    channel.write(agent::kPowerOff, 0, "", what);
    MachineExit exit = finish();
    figures.off_s = wall_seconds() - off_start;
    if (exit.reason != MachineExit::Reason::kPoweredOff)
      throw BenchError(what + ": the machine stopped abnormally: " + exit.detail);
  } catch (...) {
    machine->stop();
    if (exited.valid()) exited.wait();
    throw;
  }
  return figures;
}

enum class Accel { kKvm, kTcg };

// How long QEMU gets to exit after kPowerOff before it is killed and the figure left out.
constexpr double kQemuPowerOffWait_s = 5;

RunFigures run_qemu(const Options& options, Accel accel, const fs::path& work) {
  const std::string what = accel == Accel::kKvm ? "QEMU KVM" : "QEMU TCG";
  const fs::path log = work / "qemu.log";
  std::vector<std::string> argv =
      qemu_testguest_args(options.qemu, accel == Accel::kKvm, options.memory_mib, options.testguest,
                          work / "serial.log");

  // The agent channel is a socketpair, as for msb, whose end QEMU gets as an already connected
  // chardev socket (fd=3). QEMU's virtconsole drops whatever a write to its chardev does not
  // take at once (guest/testguest/README.md), so QEMU's end gets a send buffer that holds all of
  // `out` (SO_SNDBUFFORCE passes net.core.wmem_max; it needs root).
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) fail_errno("socketpair");
  AgentChannel channel(fds[1]);
  int qemu_end = fds[0];
  int big = static_cast<int>(std::min<uint64_t>(options.out_mib * kMiB + kMiB, 1u << 30));
  if (::setsockopt(qemu_end, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) != 0)
    ::setsockopt(qemu_end, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);

  RunFigures figures;
  double start = wall_seconds();
  std::optional<QemuProcess> qemu;
  try {
    qemu.emplace(argv, log, std::vector<int>{qemu_end});
  } catch (...) {
    ::close(qemu_end);
    throw;
  }
  ::close(qemu_end);
  try {
    expect_ready(channel.read(start + options.timeout_s, what + ": boot"), what);
  } catch (const BenchError& e) {
    std::string detail = tail_of_file(log);
    throw BenchError(std::string(e.what()) + (detail.empty() ? "" : "; QEMU said: " + detail));
  }
  figures.boot_s = wall_seconds() - start;
  if (!measure_guest(channel, options, what, figures)) return figures;  // QEMU is killed
  double off_start = wall_seconds();
  channel.write(agent::kPowerOff, 0, "", what);
  // Power off is a triple fault under microvm, which -no-reboot turns into QEMU's exit.
  if (qemu->wait_exit(kQemuPowerOffWait_s)) {
    figures.off_s = wall_seconds() - off_start;
  } else {
    std::string serial = tail_of_file(work / "serial.log", 200);
    figures.notes += std::string(figures.notes.empty() ? "" : "; ") +
                     strf("QEMU had not exited %.0f s after kPowerOff: killed (serial: %s)",
                          kQemuPowerOffWait_s, serial.c_str());
  }
  return figures;
}

// --- Summary ----------------------------------------------------------------------------------

struct Config {
  std::string label;
  std::vector<RunFigures> runs;
  std::string failure;  // why it could not be measured, if so
};

struct Spread {
  double median = 0, min = 0, max = 0;
  size_t count = 0;  // runs that measured it
};

Spread spread_of(const std::vector<RunFigures>& runs, double RunFigures::*field) {
  std::vector<double> values;
  for (const auto& r : runs) {
    if (!std::isnan(r.*field)) values.push_back(r.*field);
  }
  Spread s;
  s.count = values.size();
  if (values.empty()) return s;
  s.median = percentile(values, 0.5);
  s.min = *std::min_element(values.begin(), values.end());
  s.max = *std::max_element(values.begin(), values.end());
  return s;
}

int run(const Options& options) {
  if (::access(options.testguest.c_str(), R_OK) != 0)
    throw BenchError("test guest " + options.testguest +
                     " cannot be read: build the testguest target or pass --testguest");
  println("msb-bench-vmm: msb's VMM and QEMU booting the same test guest");
  println("  machine:   " + machine_line());
  println("  guest:     " + options.testguest +
          strf(" (%.0f KiB), %u MiB RAM, no disk",
               static_cast<double>(fs::file_size(options.testguest)) / 1024.0, options.memory_mib));
  if (!options.no_qemu) println("  QEMU:      " + qemu_version(options.qemu));
  println(
      strf("  per boot:  cold boot to kReady; %u x `echo hi`; `out %u 5`; `fill %u 1`; "
           "kPowerOff to stopped",
           options.exec_iterations, options.out_mib, options.fill_mib));
  println(strf("  runs:      %u per configuration, interleaved; timeout %.0f s per step",
               options.runs, options.timeout_s));
  println();

  char pattern[] = "/tmp/msb-bench-vmm.XXXXXX";
  if (::mkdtemp(pattern) == nullptr) fail_errno("cannot create a temporary directory");
  const fs::path work = pattern;
  struct RemoveWork {
    fs::path path;
    ~RemoveWork() {
      std::error_code ignored;
      fs::remove_all(path, ignored);
    }
  } remove_work{work};

  std::vector<Config> configs = {{"msb, 1 vCPU", {}, ""}, {"msb, 2 vCPUs", {}, ""}};
  std::optional<size_t> qemu_kvm, qemu_tcg;
  if (!options.no_qemu) {
    qemu_kvm = configs.size();
    configs.push_back({"QEMU microvm -enable-kvm", {}, ""});
    if (options.qemu_tcg) {
      qemu_tcg = configs.size();
      configs.push_back({"QEMU microvm -accel tcg", {}, ""});
    }
  }

  const CpuAccount run_start = cpu_account();
  println(strf("  %-26s %3s  %9s  %9s  %9s  %9s  %9s  %9s  %8s", "configuration", "run", "boot ms",
               "create ms", "exec us", "exec p90", "out MiB/s", "fill ms", "off ms"));
  for (unsigned run = 1; run <= options.runs; ++run) {
    for (size_t c = 0; c < configs.size(); ++c) {
      Config& config = configs[c];
      if (!config.failure.empty()) continue;
      RunFigures f;
      try {
        if (c == 0 || c == 1) {
          f = run_msb(options, c == 0 ? 1 : 2);
        } else {
          f = run_qemu(options, qemu_kvm && c == *qemu_kvm ? Accel::kKvm : Accel::kTcg, work);
        }
      } catch (const std::exception& e) {
        config.failure = e.what();
        println(strf("  %-26s %3u  FAILED: %s", config.label.c_str(), run, e.what()));
        // QEMU that cannot use KVM: measure it with TCG instead, labelled as such.
        if (qemu_kvm && c == *qemu_kvm && !qemu_tcg) {
          qemu_tcg = configs.size();
          configs.push_back({"QEMU microvm -accel tcg", {}, ""});
          println("  (QEMU with KVM failed: measuring QEMU with TCG instead)");
        }
        continue;
      }
      config.runs.push_back(f);
      auto figure = [](double value, double scale) {
        return std::isnan(value) ? std::string("-") : strf("%.1f", value * scale);
      };
      println(strf("  %-26s %3u  %9s  %9s  %9s  %9s  %9s  %9s  %8s", config.label.c_str(), run,
                   figure(f.boot_s, 1e3).c_str(), c <= 1 ? figure(f.create_s, 1e3).c_str() : "-",
                   figure(f.exec_median_s, 1e6).c_str(), figure(f.exec_p90_s, 1e6).c_str(),
                   figure(f.out_mib_per_s, 1).c_str(), figure(f.fill_s, 1e3).c_str(),
                   figure(f.off_s, 1e3).c_str()));
      if (!f.notes.empty()) println(strf("  %-26s      (%s)", "", f.notes.c_str()));
    }
  }
  println();

  const CpuAccount run_end = cpu_account();
  const double wall = std::max(1e-9, run_end.wall_s - run_start.wall_s);
  const double others = other_cores(run_start, run_end);
  const double steal = (run_end.steal_s - run_start.steal_s) / wall;
  println(
      strf("  Measuring took %.0f s; other processes kept %.2f of %ld cores busy on average, "
           "hypervisor steal %.2f cores%s",
           wall, others, ::sysconf(_SC_NPROCESSORS_ONLN), steal,
           others + steal > 0.2 ? ": expect noisier, slower figures" : ""));
  println();
  println("Summary: median over the runs [min-max]");
  // Every figure is printed with one decimal: "median [min-max]", "-" when no run measured it.
  auto cell = [&](double RunFigures::*field, double scale, const std::vector<RunFigures>& runs) {
    Spread sp = spread_of(runs, field);
    if (sp.count == 0) return std::string("-");
    return strf("%.1f [%.1f-%.1f]", sp.median * scale, sp.min * scale, sp.max * scale);
  };
  println(strf("  %-26s %4s  %-22s  %-22s  %-22s  %-22s  %-22s  %-16s", "configuration", "runs",
               "boot to kReady, ms", "exec round trip, us", "exec p90, us", "out, MiB/s",
               "fill, ms", "power off, ms"));
  for (const auto& config : configs) {
    if (config.runs.empty()) {
      println(
          strf("  %-26s %4u  not measured: %s", config.label.c_str(), 0u, config.failure.c_str()));
      continue;
    }
    const auto& r = config.runs;
    println(strf(
        "  %-26s %4zu  %-22s  %-22s  %-22s  %-22s  %-22s  %-16s", config.label.c_str(), r.size(),
        cell(&RunFigures::boot_s, 1e3, r).c_str(), cell(&RunFigures::exec_median_s, 1e6, r).c_str(),
        cell(&RunFigures::exec_p90_s, 1e6, r).c_str(),
        cell(&RunFigures::out_mib_per_s, 1, r).c_str(), cell(&RunFigures::fill_s, 1e3, r).c_str(),
        cell(&RunFigures::off_s, 1e3, r).c_str()));
    if (!config.failure.empty())
      println(strf("  %-26s       (then failed: %s)", "", config.failure.c_str()));
  }
  println();

  println("Goals (the issue's): msb, 1 vCPU, at least 2x faster than QEMU on the same guest");
  const Config& msb1 = configs[0];
  for (std::optional<size_t> q : {qemu_kvm, qemu_tcg}) {
    if (!q) continue;
    const Config& qemu = configs[*q];
    for (auto [name, field] : {std::pair{"boot to kReady", &RunFigures::boot_s},
                               std::pair{"exec round trip", &RunFigures::exec_median_s}}) {
      std::string label = strf("%s vs %s", name, qemu.label.c_str());
      if (msb1.runs.empty() || qemu.runs.empty()) {
        println(strf("  %-50s  not measured", label.c_str()));
        continue;
      }
      double ratio = spread_of(qemu.runs, field).median / spread_of(msb1.runs, field).median;
      println(strf("  %-50s  %6.2fx  %s", label.c_str(), ratio, ratio >= 2 ? "met" : "NOT met"));
    }
  }
  if (options.no_qemu) println("  (QEMU skipped: --no-qemu)");
  // A failed QEMU is a figure (it is printed); msb failing is the program failing.
  return msb1.runs.empty() || configs[1].runs.empty() ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app{
      "Measures msb's VMM next to QEMU microvm on msb's test guest: cold boot to agent-ready, "
      "exec round trip, exec output throughput and guest memory fill.",
      "msb-bench-vmm"};
  app.add_option("--runs", options.runs, "Cold boots per configuration")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--exec-iterations", options.exec_iterations, "`echo hi` round trips per boot")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--out-mib", options.out_mib, "MiB of `out` for the throughput figure")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.add_option("--fill-mib", options.fill_mib, "MiB of guest memory for `fill`")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.add_option("--memory", options.memory_mib, "Guest RAM, MiB (fill needs 32 MiB + --fill-mib)")
      ->capture_default_str()
      ->check(CLI::Range(64, 65536));
  app.add_option("--timeout", options.timeout_s,
                 "Seconds one step (a boot, one exec, a power off) may take before the guest is "
                 "stopped and its configuration reported as failed")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 3600.0));
  app.add_option("--testguest", options.testguest, "The test guest kernel")->capture_default_str();
  app.add_option("--qemu", options.qemu, "The QEMU binary")->capture_default_str();
  app.add_flag("--no-qemu", options.no_qemu, "Measure msb only");
  app.add_flag("--qemu-tcg", options.qemu_tcg,
               "Also measure QEMU with TCG (it is measured anyway when QEMU cannot use KVM)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "msb-bench-vmm: error: %s\n", e.what());
    return 1;
  }
  if (options.memory_mib < 32 + options.fill_mib) {
    std::fprintf(stderr, "msb-bench-vmm: error: --memory must be at least 32 + --fill-mib\n");
    return 1;
  }
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "msb-bench-vmm: error: %s\n", e.what());
    return 1;
  }
}
