// msb-bench-linux: a Linux guest's figures, for msb's own guest kernel (guest/kernel/).
//
// Under QEMU microvm with TCG (the reference VMM; it runs wherever QEMU is, KVM or not), for
// msb's kernel and Debian's cloud kernel, each with msb's initramfs and agent and msb's default
// busybox image as the root disk, --runs cold boots each:
//   boot   from QEMU's fork to the agent's kReady;
//   exec   the round trip of `true` over the agent protocol (kExec sent to kExit received),
//          median of 20.
// On msb itself (only where /dev/kvm opens; otherwise it says why and skips), through the msb
// binary in a private MSB_HOME with msb's kernel and the default busybox image:
//   create    `msb create` until the agent answered (a cold boot);
//   exec      `msb exec NAME -- true`, median of 10 (a whole msb process each time);
//   snapshot  `msb snapshot create --resume --json`: the guest's paused time and what was stored;
//   restore   `msb restore` and then the first `msb exec -- true` reply.
// The targets for hardware KVM (issue 11): msb's kernel to agent-ready under 150 ms, restore to
// first exec under 10 ms. Figures: docs/benchmarks.md.

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "bench/qemu_guest.h"
#include "core/home.h"
#include "core/images.h"
#include "core/initramfs.h"

namespace fs = std::filesystem;
using namespace msb::bench;

namespace {

struct Options {
  std::string msb = MSB_BINARY_DEFAULT;
  std::string agent = MSB_AGENT_DEFAULT;
  std::string msb_kernel = MSB_GUEST_KERNEL_DEFAULT;
  std::string debian_kernel = MSB_LINUX_KERNEL_DEFAULT;
  std::string qemu = "qemu-system-x86_64";
  int runs = 3;
  uint64_t memory_mib = 256;
  double timeout_s = 300;
};

// The host's TSC rate in kHz: under TCG on a busy host the guest's TSC calibration can fail.
std::string host_tsc_khz() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("cpu MHz", 0) != 0) continue;
    double mhz = std::atof(line.substr(line.find(':') + 1).c_str());
    if (mhz > 100) return std::to_string(static_cast<uint64_t>(mhz * 1000));
  }
  return "2000000";
}

struct QemuFigures {
  double boot_s = 0;
  double exec_s = 0;  // median
};

QemuFigures qemu_boot(const Options& options, const fs::path& kernel, const fs::path& initramfs,
                      const fs::path& root, const fs::path& work) {
  const std::string what = "QEMU TCG with " + kernel.string();
  std::vector<std::string> argv = {options.qemu,
                                   "-M",
                                   "microvm",
                                   "-accel",
                                   "tcg",
                                   "-m",
                                   std::to_string(options.memory_mib),
                                   "-smp",
                                   "1",
                                   "-nodefaults",
                                   "-no-user-config",
                                   "-display",
                                   "none",
                                   "-no-reboot",
                                   "-serial",
                                   "file:" + (work / "serial.log").string(),
                                   "-kernel",
                                   kernel.string(),
                                   "-initrd",
                                   initramfs.string(),
                                   "-append",
                                   "console=ttyS0 panic=-1 quiet msb.hostname=bench "
                                   "tsc_early_khz=" +
                                       host_tsc_khz(),
                                   "-device",
                                   "virtio-serial-device",
                                   "-chardev",
                                   "socket,id=agent,fd=3",
                                   "-device",
                                   "virtconsole,chardev=agent",
                                   "-device",
                                   "virtio-rng-device",
                                   "-device",
                                   "virtio-balloon-device",
                                   "-drive",
                                   "id=root,format=raw,if=none,snapshot=on,file=" + root.string(),
                                   "-device",
                                   "virtio-blk-device,drive=root"};
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) fail_errno("socketpair");
  AgentChannel channel(fds[1]);
  QemuFigures figures;
  const double start = wall_seconds();
  std::optional<QemuProcess> qemu;
  try {
    qemu.emplace(argv, work / "qemu.log", std::vector<int>{fds[0]});
  } catch (...) {
    ::close(fds[0]);
    throw;
  }
  ::close(fds[0]);
  expect_ready(channel.read(start + options.timeout_s, what + ": boot"), what);
  figures.boot_s = wall_seconds() - start;
  std::vector<double> execs;
  for (uint32_t i = 1; i <= 20; ++i) {
    ExecResult result = run_exec(channel, i, {"true"}, options.timeout_s, what + ": exec");
    if (result.code != 0) throw BenchError(what + ": `true` exited " + std::to_string(result.code));
    execs.push_back(result.seconds);
  }
  figures.exec_s = percentile(execs, 0.5);
  qemu->kill();
  return figures;
}

struct Run {
  int exit_code = 0;
  std::string out, err;
  double seconds = 0;
};

Run run_msb(const Options& options, const fs::path& home, const std::vector<std::string>& args) {
  std::string command = "MSB_HOME='" + home.string() + "' '" + options.msb + "'";
  for (const auto& arg : args)
    command += " '" + arg + "'";
  command += " 2>&1";
  Run run;
  const double start = wall_seconds();
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) fail_errno("popen " + options.msb);
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0)
    run.out.append(buffer, n);
  const int status = ::pclose(pipe);
  run.seconds = wall_seconds() - start;
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return run;
}

Run must(const Options& options, const fs::path& home, const std::vector<std::string>& args) {
  Run run = run_msb(options, home, args);
  if (run.exit_code != 0) {
    throw BenchError("msb " + args.front() + " failed (" + std::to_string(run.exit_code) +
                     "): " + run.out);
  }
  return run;
}

void on_msb(const Options& options, const fs::path& work) {
  const int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    println(strf("on msb: not measured: /dev/kvm: %s", std::strerror(errno)));
    return;
  }
  ::close(kvm);
  const fs::path home = work / "home";
  fs::create_directories(home / "kernels");
  fs::create_directory_symlink(fs::absolute(options.msb_kernel), home / "kernels" / "msb");
  const std::string memory = std::to_string(options.memory_mib);
  try {
    Run create = must(options, home, {"create", "b", "--memory", memory});
    std::vector<double> execs;
    for (int i = 0; i < 10; ++i)
      execs.push_back(must(options, home, {"exec", "b", "--", "true"}).seconds);
    Run snapshot = must(options, home, {"snapshot", "create", "b", "--resume", "--json"});
    auto doc = nlohmann::json::parse(snapshot.out);
    const std::string handle = doc.at("handle");
    const double start = wall_seconds();
    must(options, home, {"restore", handle, "--name", "r"});
    must(options, home, {"exec", "r", "--", "true"});
    const double restore_s = wall_seconds() - start;
    println(
        strf("on msb (%s MiB): create to agent-ready %.2f s; exec round trip (msb exec) "
             "median %.1f ms; snapshot paused %.1f ms, stored %.1f MiB; restore to first exec "
             "reply %.0f ms",
             memory.c_str(), create.seconds, percentile(execs, 0.5) * 1e3,
             doc.at("paused_ms").get<double>(), doc.at("stored_bytes").get<double>() / (1 << 20),
             restore_s * 1e3));
  } catch (...) {
    run_msb(options, home, {"rm", "--force", "--quiet", "b", "r"});
    throw;
  }
  run_msb(options, home, {"rm", "--force", "--quiet", "b", "r"});
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app("msb-bench-linux: a Linux guest's boot, exec, snapshot and restore figures");
  app.add_option("--msb", options.msb, "the msb binary");
  app.add_option("--agent", options.agent, "the guest agent binary");
  app.add_option("--msb-kernel", options.msb_kernel, "msb's kernel folder (vmlinux, vmlinuz)");
  app.add_option("--debian-kernel", options.debian_kernel,
                 "Debian's kernel folder (vmlinuz, lib/modules)");
  app.add_option("--qemu", options.qemu, "the QEMU binary");
  app.add_option("--runs", options.runs, "cold boots per kernel under QEMU")
      ->check(CLI::Range(1, 50));
  app.add_option("--memory", options.memory_mib, "guest memory in MiB");
  CLI11_PARSE(app, argc, argv);
  try {
    const fs::path work = fs::temp_directory_path() / strf("msb-bench-linux.%d", int(::getpid()));
    fs::create_directories(work);
    struct Cleanup {
      fs::path dir;
      ~Cleanup() {
        std::error_code ec;
        fs::remove_all(dir, ec);
      }
    } cleanup{work};
    println("msb-bench-linux");
    println("  machine: " + machine_line());
    msb::core::Home home = msb::core::Home::resolve(work / "home-for-qemu");
    auto store = home.open_store();
    const fs::path root = msb::core::prepare_image(home, *store, msb::core::kDefaultImage).ext4;
    struct Kernel {
      const char* label;
      fs::path dir;
      fs::path modules;
    };
    std::vector<Kernel> kernels = {{"msb's kernel", options.msb_kernel, {}},
                                   {"Debian's cloud kernel", options.debian_kernel, {}}};
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(kernels[1].dir / "lib" / "modules", ec))
      if (entry.is_directory()) kernels[1].modules = entry.path();
    for (const auto& kernel : kernels) {
      if (!fs::exists(kernel.dir / "vmlinuz")) {
        println(
            strf("QEMU TCG, %s: not measured: no %s/vmlinuz", kernel.label, kernel.dir.c_str()));
        continue;
      }
      const fs::path initramfs = msb::core::build_initramfs(home, options.agent, kernel.modules);
      std::vector<double> boots, execs;
      for (int run = 0; run < options.runs; ++run) {
        QemuFigures f = qemu_boot(options, kernel.dir / "vmlinuz", initramfs, root, work);
        boots.push_back(f.boot_s);
        execs.push_back(f.exec_s);
      }
      println(
          strf("QEMU TCG, %s (%llu MiB, 1 vCPU, %d boots): boot to agent-ready median %.2f s "
               "(%.2f-%.2f); exec round trip median %.1f ms",
               kernel.label, static_cast<unsigned long long>(options.memory_mib), options.runs,
               percentile(boots, 0.5), *std::min_element(boots.begin(), boots.end()),
               *std::max_element(boots.begin(), boots.end()), percentile(execs, 0.5) * 1e3));
    }
    on_msb(options, work);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "msb-bench-linux: %s\n", e.what());
    return 1;
  }
  return 0;
}
