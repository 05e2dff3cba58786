#include "cli/sandbox_commands.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/output.h"
#include "core/sandbox.h"
#include "snapstore/file_util.h"

namespace msb::cli {
namespace {

// Options as typed; sizes and counts are parsed by core so that every bad value gets the same
// one-line error.
struct SandboxArgs {
  std::string name;
  std::vector<std::string> names;
  std::string kernel, image;
  std::string initrd, disk, disk_size, cmdline;
  std::string cpus, memory, max_cpus, max_memory;
  std::vector<std::string> env;  // the sandbox's (create, run) or the command's (exec)
  std::string workdir, user, timeout;
  std::vector<std::string> command;
  bool json = false, follow = false, force = false;
};

core::Home home_of(const GlobalOptions& global) {
  return core::Home::resolve(
      global.home.empty() ? std::nullopt : std::optional<std::filesystem::path>(global.home));
}

// Seconds as typed ("10", "2.5") to milliseconds; positive.
std::chrono::milliseconds parse_seconds(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double seconds = std::strtod(text.c_str(), &end);
  // At most what the agent protocol's 32-bit millisecond field holds (about 49 days).
  constexpr double kMaxSeconds = 4e6;
  if (text.empty() || *end != '\0' || !(seconds > 0) || seconds > kMaxSeconds) {
    throw core::SandboxError(flag + " \"" + text +
                             "\": not a positive number of seconds (at most 4000000)");
  }
  return std::chrono::milliseconds(static_cast<int64_t>(std::ceil(seconds * 1000)));
}

core::CreateOptions create_options(const SandboxArgs& args) {
  core::CreateOptions options;
  options.name = args.name;
  options.kernel = args.kernel;
  options.initrd = args.initrd;
  options.image = args.image;
  options.disk = args.disk;
  if (!args.disk_size.empty()) {
    if (!args.disk.empty()) throw core::SandboxError("--disk-size is for a blank disk, not --disk");
    options.disk_size_mib = core::parse_mib("--disk-size", args.disk_size);
  }
  options.cmdline = args.cmdline;
  if (!args.cpus.empty()) options.cpus = core::parse_count("--cpus", args.cpus);
  if (!args.max_cpus.empty()) options.max_cpus = core::parse_count("--max-cpus", args.max_cpus);
  if (!args.memory.empty()) options.memory_mib = core::parse_mib("--memory", args.memory);
  if (!args.max_memory.empty()) {
    options.max_memory_mib = core::parse_mib("--max-memory", args.max_memory);
  }
  options.env = args.env;
  return options;
}

core::ExecOptions exec_options(const SandboxArgs& args, bool with_env) {
  core::ExecOptions options;
  options.argv = args.command;
  if (with_env) options.env = args.env;
  options.workdir = args.workdir;
  options.user = args.user;
  if (!args.timeout.empty()) options.timeout = parse_seconds("--timeout", args.timeout);
  return options;
}

// Output goes straight to this process's stdout and stderr; stdin is forwarded unless it is a
// terminal (the command would wait for input nobody means to type).
core::ExecIo standard_io() {
  core::ExecIo io;
  io.on_stdout = [](std::string_view bytes) { snapstore::write_all(1, bytes, "standard output"); };
  io.on_stderr = [](std::string_view bytes) { snapstore::write_all(2, bytes, "standard error"); };
  io.stdin_fd = ::isatty(0) ? -1 : 0;
  return io;
}

std::string uptime_text(std::optional<double> uptime) {
  if (!uptime) return "-";
  auto s = static_cast<long long>(*uptime);
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%llds", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", s / 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", s / 3600, s / 60 % 60);
  }
  return buf;
}

int run_create(const GlobalOptions& global, const SandboxArgs& args) {
  auto start = std::chrono::steady_clock::now();
  std::optional<core::Sandbox> sandbox;
  {
    // Scoped so that the progress line is cleared before the result is printed.
    BootProgressLine progress(global.quiet);
    sandbox = core::Sandbox::create(home_of(global), create_options(args), progress.callback());
  }
  if (!global.quiet) {
    std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    std::printf("created %s (ready in %.2f s)\n", sandbox->name().c_str(), took.count());
  }
  return 0;
}

int run_exec(const GlobalOptions& global, const SandboxArgs& args) {
  core::Sandbox sandbox = core::Sandbox::open(home_of(global), args.name);
  core::ExecResult result = sandbox.exec(exec_options(args, true), standard_io());
  if (result.timed_out && !global.quiet) {
    std::fprintf(stderr, "msb: the command timed out after %s s and was killed\n",
                 args.timeout.c_str());
  }
  return result.exit_status();
}

int run_ls(const GlobalOptions& global, const SandboxArgs& args) {
  // The balloons (a question to each running VMM) only where they are shown.
  std::vector<core::SandboxInfo> list = core::Sandbox::list(home_of(global), args.json);
  if (args.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& s : list) {
      nlohmann::json entry = {
          {"name", s.name},
          {"state", s.state},
          {"pid", s.pid ? nlohmann::json(s.pid) : nlohmann::json()},
          {"cpus", s.cpus},
          {"max_cpus", s.max_cpus},
          {"memory_mib", s.memory_mib},
          {"max_memory_mib", s.max_memory_mib},
          {"kernel", s.kernel},
          {"image", s.image},
          {"created", s.created},
          {"uptime_s", s.uptime ? nlohmann::json(*s.uptime) : nlohmann::json()},
          {"reason", s.reason},
          {"detail", s.detail},
          {"parent", s.parent.empty() ? nlohmann::json() : nlohmann::json(s.parent)},
          {"balloon", s.balloon ? nlohmann::json{{"ram_mib", s.balloon->ram_mib},
                                                 {"target_mib", s.balloon->target_mib},
                                                 {"actual_mib", s.balloon->actual_mib}}
                                : nlohmann::json()}};
      out.push_back(entry);
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-24s %-9s %8s %5s %8s %8s  %s\n", "NAME", "STATE", "PID", "CPUS", "MEMORY",
              "UPTIME", "REASON");
  for (const auto& s : list) {
    std::string pid = s.pid ? std::to_string(s.pid) : "-";
    std::string memory = std::to_string(s.memory_mib) + "M";
    std::string reason = s.reason;
    if (s.state == "failed" && !s.detail.empty()) reason += ": " + s.detail;
    char line[256];
    std::snprintf(line, sizeof line, "%-24s %-9s %8s %5u %8s %8s", s.name.c_str(), s.state.c_str(),
                  pid.c_str(), s.cpus, memory.c_str(), uptime_text(s.uptime).c_str());
    std::printf("%s%s\n", line, reason.empty() ? "" : ("  " + reason).c_str());
  }
  return 0;
}

int run_logs(const GlobalOptions& global, const SandboxArgs& args) {
  core::Sandbox sandbox = core::Sandbox::open(home_of(global), args.name);
  sandbox.logs(args.follow,
               [](std::string_view bytes) { snapstore::write_all(1, bytes, "standard output"); });
  return 0;
}

int run_stop(const GlobalOptions& global, const SandboxArgs& args) {
  core::Sandbox sandbox = core::Sandbox::open(home_of(global), args.name);
  auto timeout = args.timeout.empty() ? std::chrono::milliseconds(10'000)
                                      : parse_seconds("--timeout", args.timeout);
  sandbox.stop(timeout);
  if (!global.quiet) {
    core::SandboxInfo info = sandbox.info();
    std::printf("stopped %s (%s)\n", sandbox.name().c_str(), info.reason.c_str());
  }
  return 0;
}

int run_start(const GlobalOptions& global, const SandboxArgs& args) {
  core::Sandbox sandbox = core::Sandbox::open(home_of(global), args.name);
  auto start = std::chrono::steady_clock::now();
  {
    BootProgressLine progress(global.quiet);
    sandbox.start(progress.callback());
  }
  if (!global.quiet) {
    std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    std::printf("started %s (ready in %.2f s)\n", sandbox.name().c_str(), took.count());
  }
  return 0;
}

int run_rm(const GlobalOptions& global, const SandboxArgs& args) {
  core::Home home = home_of(global);
  // Every name is checked before any is removed, so a typo or a running sandbox removes nothing.
  std::vector<core::Sandbox> sandboxes;
  for (const std::string& name : args.names) {
    sandboxes.push_back(core::Sandbox::open(home, name));
    std::string state = sandboxes.back().info().state;
    if (!args.force && (state == "running" || state == "starting")) {
      throw core::SandboxError("sandbox \"" + name + "\" is " + state +
                               " (stop it first, or use --force)");
    }
  }
  for (const core::Sandbox& sandbox : sandboxes)
    sandbox.remove(args.force);
  if (!global.quiet) {
    std::printf("removed %zu sandbox%s\n", sandboxes.size(), sandboxes.size() == 1 ? "" : "es");
  }
  return 0;
}

int run_run(const GlobalOptions& global, const SandboxArgs& args) {
  // The progress line is cleared once the boot is done, before the command's output.
  BootProgressLine progress(global.quiet);
  core::ExecResult result =
      core::run_once(home_of(global), create_options(args), exec_options(args, false),
                     standard_io(), progress.callback());
  if (result.timed_out && !global.quiet) {
    std::fprintf(stderr, "msb: the command timed out after %s s and was killed\n",
                 args.timeout.c_str());
  }
  return result.exit_status();
}

void add_create_options(CLI::App* command, SandboxArgs& args) {
  command->add_option("--kernel", args.kernel,
                      "Kernel: testguest, an installed kernel's name (debian-cloud) or a file "
                      "(default: debian-cloud where installed and the host has VMX/SVM, else "
                      "testguest)");
  command->add_option("--image", args.image,
                      "Root image NAME:TAG for a Linux kernel (default: busybox:latest)");
  command->add_option("--initrd", args.initrd,
                      "Initial ramdisk file (default for Linux: msb's, with its agent)");
  command->add_option("--disk", args.disk,
                      "Base disk image, never modified: writes go to the sandbox's overlay");
  command->add_option("--disk-size", args.disk_size,
                      "Size of the blank disk used without --disk, in MiB (default 1024)");
  command->add_option("--cmdline", args.cmdline,
                      std::string("Kernel command line (default: \"") + core::kDefaultCmdline +
                          "\", for Linux \"" + core::kDefaultLinuxCmdline + "\")");
  command->add_option("--cpus", args.cpus, "vCPUs (default 1, at most 254)");
  command->add_option("--memory", args.memory, "Memory in MiB, or with M/G (default 256)");
  command->add_option("--max-cpus", args.max_cpus, "vCPUs the VM is built for (default: --cpus)");
  command->add_option("--max-memory", args.max_memory,
                      "Memory the VM is built for (default: --memory)");
  command->add_option("--env", args.env, "KEY=VALUE for the sandbox's environment (repeatable)")
      ->allow_extra_args(false);
}

void add_exec_options(CLI::App* command, SandboxArgs& args) {
  command->add_option("--workdir", args.workdir,
                      "Working directory of the command (default: the image's)");
  command->add_option("--user", args.user,
                      "Run as USER, UID, USER:GROUP or UID:GID (default: the image's, else root)");
  command->add_option("--timeout", args.timeout, "Kill the command after SECONDS (exit 124)");
}

}  // namespace

std::function<int()> add_sandbox_commands(CLI::App& app, const GlobalOptions& global) {
  auto args = std::make_shared<SandboxArgs>();

  CLI::App* create = app.add_subcommand("create", "Create a sandbox and boot it");
  create->add_option("NAME", args->name, "Name of the new sandbox")->required();
  add_create_options(create, *args);

  CLI::App* exec = app.add_subcommand("exec", "Run a command in a sandbox");
  exec->add_option("NAME", args->name, "Sandbox")->required();
  exec->add_option("--env", args->env, "KEY=VALUE for the command (repeatable)")
      ->allow_extra_args(false);
  add_exec_options(exec, *args);
  exec->add_option("COMMAND", args->command, "The command and its arguments (after --)")
      ->required();

  CLI::App* ls = app.add_subcommand("ls", "List sandboxes with their state");
  ls->add_flag("--json", args->json, "Print JSON");

  CLI::App* logs = app.add_subcommand("logs", "Print a sandbox's console log");
  logs->add_option("NAME", args->name, "Sandbox")->required();
  logs->add_flag("-f,--follow", args->follow, "Keep printing while the sandbox runs");

  CLI::App* stop = app.add_subcommand("stop", "Power a sandbox off");
  stop->add_option("NAME", args->name, "Sandbox")->required();
  stop->add_option("--timeout", args->timeout,
                   "Seconds to wait for the guest before killing it (default 10)");

  CLI::App* start = app.add_subcommand("start", "Boot a stopped sandbox again");
  start->add_option("NAME", args->name, "Sandbox")->required();

  CLI::App* rm = app.add_subcommand("rm", "Remove sandboxes and everything in their folders");
  rm->add_option("NAME", args->names, "Sandboxes")->required();
  rm->add_flag("-f,--force", args->force, "Remove running sandboxes too (they are killed)");

  CLI::App* run = app.add_subcommand("run", "Create a sandbox, run one command in it, remove it");
  run->add_option("--name", args->name, "Name of the sandbox (default: run-XXXXXXXX)");
  add_create_options(run, *args);
  add_exec_options(run, *args);
  run->add_option("COMMAND", args->command,
                  "The command and its arguments (after --; default: the image's entrypoint and "
                  "command)");

  return [=, &global]() -> int {
    if (create->parsed()) return run_create(global, *args);
    if (exec->parsed()) return run_exec(global, *args);
    if (ls->parsed()) return run_ls(global, *args);
    if (logs->parsed()) return run_logs(global, *args);
    if (stop->parsed()) return run_stop(global, *args);
    if (start->parsed()) return run_start(global, *args);
    if (rm->parsed()) return run_rm(global, *args);
    if (run->parsed()) return run_run(global, *args);
    return -1;
  };
}

}  // namespace msb::cli
