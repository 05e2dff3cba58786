// Sandboxes: microVMs that each live in their own detached VMM process (msb itself in a hidden
// mode, see core/vmm_process.h), found through their folder $MSB_HOME/sandboxes/NAME:
//
//   config.json    what msb create was given (resolved paths, sizes, environment)
//   lock           held (flock) by the msb that is creating or starting the sandbox
//   vmm.lock       held by the VMM process for as long as it lives: "running" means held
//   pid            the VMM process's pid (its mtime is when it started)
//   control.sock   the VMM process's control socket (the folder is 0700, the socket 0600)
//   console.log    the guest's serial output
//   disk.overlay   the sandbox's writable disk layer over the read-only base image
//   exit.json      why the VMM process last stopped: {"state", "reason", "detail", "time"}
//   vmm.log        the VMM process's own messages
//   paused         present while the VMM holds the guest paused (msb pause, msb snapshot create)
//   restored       present once a sandbox made by msb restore has continued its snapshot; later
//                  starts boot (on the snapshot's disk delta and the sandbox's own overlay)
//
// No msb command holds VM state: every command finds the sandbox through its folder.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/home.h"

namespace msb::core {

// A sandbox that cannot be created, found, started or used, with which one and why.
class SandboxError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr unsigned kMaxCpus = 254;
// Serial console; i8042 reset as the way to reboot (msb treats it as power-off); reboot on panic.
inline constexpr const char* kDefaultCmdline = "console=ttyS0 reboot=k panic=-1";
// A Linux guest's: the same, quiet (the console is slow where kernel code is emulated). msb adds
// msb.hostname=NAME for the agent.
inline constexpr const char* kDefaultLinuxCmdline = "console=ttyS0 reboot=k panic=-1 quiet";

// What `msb create` is given. Setters chain: CreateOptions().named("a").with_cpus(2).
struct CreateOptions {
  std::string name;
  std::string kernel;  // a built-in or installed kernel's name, or a path; "": default_kernel()
  std::string initrd;  // "" for none (a Linux kernel: msb's initramfs with the agent)
  std::string image;   // a Linux guest's root image (NAME:TAG); "" for kDefaultImage
  std::string disk;    // base image; "" for a blank disk of disk_size_mib (the test guest)
  uint64_t disk_size_mib = 1024;
  std::string cmdline;  // "": kDefaultCmdline, or kDefaultLinuxCmdline for a Linux kernel
  unsigned cpus = 1;
  std::optional<unsigned> max_cpus;  // default: cpus
  uint64_t memory_mib = 256;
  std::optional<uint64_t> max_memory_mib;  // default: memory_mib
  std::vector<std::string> env;            // "K=V", the sandbox's environment

  CreateOptions& named(std::string value) { return name = std::move(value), *this; }
  CreateOptions& with_kernel(std::string value) { return kernel = std::move(value), *this; }
  CreateOptions& with_disk(std::string value) { return disk = std::move(value), *this; }
  CreateOptions& with_cpus(unsigned value) { return cpus = value, *this; }
  CreateOptions& with_memory_mib(uint64_t value) { return memory_mib = value, *this; }
  CreateOptions& with_env(std::string entry) { return env.push_back(std::move(entry)), *this; }
};

// "512", "512M", "512MiB", "2G", "2GiB" as MiB; throws SandboxError naming `flag` otherwise.
uint64_t parse_mib(std::string_view flag, std::string_view text);
// A whole number; throws SandboxError naming `flag` otherwise.
unsigned parse_count(std::string_view flag, std::string_view text);
// `base` with each entry of `over` added in place of base's entry of the same key (an image's
// environment under a sandbox's, a sandbox's under a restore's overrides).
std::vector<std::string> merge_env(const std::vector<std::string>& base,
                                   const std::vector<std::string>& over);
// "K=V" with a non-empty K; throws SandboxError naming `flag` otherwise.
void check_env_entry(std::string_view flag, std::string_view entry);

struct ExecOptions {
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "K=V", over the sandbox's
  std::string workdir;           // "": the image's working directory, else the agent's default
  std::chrono::milliseconds timeout{0};  // 0: none
  std::string user;  // "": the image's user, else root (NAME, UID, NAME:GROUP, UID:GID)
};

struct ImageConfig;  // core/images.h
// An exec as it runs in a sandbox made from an image with `image`'s config: what the request
// leaves out comes from the image (its working directory, its user and, with no command, its
// entrypoint followed by its command). Throws SandboxError when there is still no command.
ExecOptions with_image_defaults(ExecOptions requested, const ImageConfig& image);

// Where an exec's output goes and its input comes from.
struct ExecIo {
  std::function<void(std::string_view)> on_stdout;
  std::function<void(std::string_view)> on_stderr;
  int stdin_fd = -1;  // read to its end and forwarded; -1: no input (end of input at once)
};

struct ExecResult {
  int code = 0;    // exit code, -1 when a signal ended it
  int signal = 0;  // the signal that ended it, 0 if it exited
  bool timed_out = false;
  // What a shell would report: the code, 128+N for signal N, 124 for a timeout.
  int exit_status() const;
};

// A running sandbox's balloon as its VMM reports it (the "status" reply), in whole MiB (actual
// rounded down): the guest has ram_mib - actual_mib of its RAM; the host asks it to give back
// target_mib (ram_mib minus the granted --memory, none when the grant covers the RAM).
struct SandboxBalloon {
  uint64_t ram_mib = 0;     // the RAM in the guest's memory map (--max-memory for a Linux guest)
  uint64_t target_mib = 0;  // what the host asks the balloon to hold
  uint64_t actual_mib = 0;  // what the guest's driver says it holds (0 without a driver)
};

struct SandboxInfo {
  std::string name;
  std::string state;  // "running", "paused", "starting", "stopped" or "failed"
  int pid = 0;        // while running
  unsigned cpus = 0, max_cpus = 0;
  uint64_t memory_mib = 0, max_memory_mib = 0;
  std::string kernel;
  std::string image;             // the root image's tag, "" for none
  std::string created;           // ISO 8601 UTC
  std::optional<double> uptime;  // seconds, while running
  std::string reason;            // why it stopped: "powered-off", "killed", "triple-fault", ...
  std::string detail;
  std::string parent;  // the snapshot it was restored from, or ""
  // Running or paused sandboxes whose VMM answered in time; filled by Sandbox::list only.
  std::optional<SandboxBalloon> balloon;
};

// How a boot that waits for the guest's agent is going, for a progress display (the CLI draws
// it; the library prints nothing).
struct BootProgress {
  std::string name;                     // the sandbox
  std::chrono::milliseconds waited{0};  // since its VMM process started
  // The console log's latest non-empty line as the guest wrote it: untrusted bytes (control
  // characters, escape sequences) that must be made safe before they are shown.
  std::string console_line;
  bool done = false;  // the last call: the wait is over (ready or failed)
};
// Called every few hundred milliseconds while a boot waits, and once with `done` at its end.
using BootProgressFn = std::function<void(const BootProgress&)>;

// How long create and start wait for the guest's agent: `env` (MSB_BOOT_TIMEOUT's value) when it
// is set, a positive whole number of seconds (SandboxError otherwise); else 60 s on a host with
// hardware virtualization and 300 s without (guest kernel code is emulated there: a Linux guest
// takes 20-60 s to boot, more on a loaded machine).
std::chrono::seconds boot_timeout(const char* env, bool hardware_virtualization);
// The same for this process's MSB_BOOT_TIMEOUT and this host.
std::chrono::seconds boot_timeout();

class Sandbox {
 public:
  // Creates the sandbox's folder, starts its VMM process and returns once the guest's agent
  // answered. If the guest does not boot (the VMM process exits, the agent does not answer
  // within boot_timeout()), its VMM process is killed and the sandbox stays, in state "failed"
  // with its logs and exit.json, for msb logs and msb rm; the error says why, with the console
  // log's last lines. Any other failure, or an interrupt, leaves nothing behind.
  static Sandbox create(const Home& home, const CreateOptions& options,
                        const BootProgressFn& progress = {});
  // An existing sandbox; throws SandboxError if there is none of that name.
  static Sandbox open(const Home& home, const std::string& name);
  // Creates sandboxes from ready-made config.json documents (core/snapshot.cpp's restore: each
  // has "name" and "restore"), starts their VMM processes all at once and returns once every
  // guest answered. On any failure, or an interrupt, none of them is left behind.
  static void create_restored(const Home& home, const std::vector<nlohmann::json>& configs);
  // Every sandbox's info; with `balloons`, also the balloon of each running one (their VMMs
  // asked all at once, for at most a few seconds: a VMM too busy to answer leaves it unknown).
  static std::vector<SandboxInfo> list(const Home& home, bool balloons = false);

  const std::string& name() const { return name_; }
  const std::filesystem::path& dir() const { return dir_; }
  SandboxInfo info() const;

  ExecResult exec(const ExecOptions& options, const ExecIo& io) const;
  // Asks the guest to power off; kills the VMM process if it has not stopped after `timeout`.
  void stop(std::chrono::milliseconds timeout) const;
  // Boots a stopped or failed sandbox again on its own disk overlay; returns once it is ready.
  // A boot that fails leaves it "failed", as create does.
  void start(const BootProgressFn& progress = {}) const;
  // Removes the sandbox's folder. A running sandbox is refused unless `force`, which kills it.
  void remove(bool force) const;

  // The console log; with `follow`, keeps printing what the guest writes until the VMM exits.
  void logs(bool follow, const std::function<void(std::string_view)>& out) const;

 private:
  Sandbox(std::string name, std::filesystem::path dir)
      : name_(std::move(name)), dir_(std::move(dir)) {}
  Home home_of() const;  // the state directory the sandbox's folder is in
  std::string name_;
  std::filesystem::path dir_;
};

// Creates a sandbox (named run-XXXXXXXX when options.name is empty), runs one command in it and
// removes it, whatever happened (a failed boot too: it is not kept). Returns the command's result.
ExecResult run_once(const Home& home, CreateOptions options, const ExecOptions& exec,
                    const ExecIo& io, const BootProgressFn& progress = {});

}  // namespace msb::core
