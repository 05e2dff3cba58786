#include "core/sandbox.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <ctime>
#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/archive.h"
#include "core/control_client.h"
#include "core/control_protocol.h"
#include "core/images.h"
#include "core/initramfs.h"
#include "core/kernels.h"
#include "core/snapshot.h"
#include "core/test_hooks.h"
#include "guest/protocol/agent_protocol.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "snapstore/name.h"

namespace msb::core {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using snapstore::UniqueFd;

namespace {

constexpr uint64_t kMaxMemoryMib = 1024 * 1024;  // 1 TiB
constexpr uint64_t kMinMemoryMib = 16;
constexpr size_t kConsoleTailLines = 20;

fs::path sandboxes_dir(const Home& home) {
  return home.root() / "sandboxes";
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

// Whether another process holds an flock on `path` (a missing file is not held).
bool lock_held(const fs::path& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return false;
  if (::flock(fd.get(), LOCK_SH | LOCK_NB) == 0) return false;  // released with fd
  return errno == EWOULDBLOCK;
}

// Takes the sandbox's `lock` file: the claim of whoever creates or starts it.
UniqueFd claim(const fs::path& dir, const std::string& name) {
  UniqueFd fd(::open((dir / "lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) snapstore::throw_errno("cannot open " + (dir / "lock").string());
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    throw SandboxError("sandbox " + in_quotes(name) +
                       " is being created or started by another msb");
  }
  return fd;
}

void write_json_file(const fs::path& path, const nlohmann::json& doc) {
  write_file_atomically(path, doc.dump(2) + "\n");
}

std::optional<nlohmann::json> read_json_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  auto doc = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return std::nullopt;
  return doc;
}

int read_pid(const fs::path& dir) {
  std::ifstream in(dir / "pid");
  int pid = 0;
  in >> pid;
  return pid > 0 ? pid : 0;
}

// Whether `pid` is this sandbox's VMM process (and not a stranger that reused the pid).
bool is_vmm_of(int pid, const fs::path& dir) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
  std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The whole argument, NUL-terminated: sandbox "foo" must not match the VMM of "foobar".
  return cmdline.find(std::string("__vmm") + '\0' + dir.string() + '\0') != std::string::npos;
}

bool vmm_running(const fs::path& dir) {
  return lock_held(dir / "vmm.lock");
}

// Kills the VMM process and waits for it to be gone (its vmm.lock released).
void kill_vmm(const fs::path& dir, int pid) {
  if (pid > 0 && is_vmm_of(pid, dir)) {
    ::kill(pid, SIGKILL);
    // This process started it (create, start, run): reap it, or it lingers as a zombie until
    // this process exits. For anyone else's VMM this fails at once with ECHILD.
    ::waitpid(pid, nullptr, 0);
  }
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (vmm_running(dir) && Clock::now() < deadline) {
    if (pid > 0) ::waitpid(pid, nullptr, WNOHANG);  // reaps it if it is this process's child
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (pid > 0) ::waitpid(pid, nullptr, WNOHANG);
}

// `line` without control characters (C0, DEL and UTF-8-encoded C1): guest output goes into error
// messages that land on a terminal, where escape sequences could rewrite what the user sees.
std::string without_controls(std::string_view line) {
  std::string out;
  for (size_t i = 0; i < line.size(); ++i) {
    auto c = static_cast<unsigned char>(line[i]);
    if (c == 0xc2 && i + 1 < line.size() &&
        (static_cast<unsigned char>(line[i + 1]) & 0xe0) == 0x80) {
      ++i;  // U+0080..U+009F
    } else if ((c >= 0x20 && c != 0x7f) || c == '\t') {
      out += char(c);
    }
  }
  return out;
}

// The last lines of the console log (from its last 64 KiB), indented, for error messages.
std::string console_tail(const fs::path& dir) {
  std::string text;
  if (UniqueFd fd{::open((dir / "console.log").c_str(), O_RDONLY | O_CLOEXEC)}) {
    struct stat st;
    if (::fstat(fd.get(), &st) == 0) {
      constexpr off_t kTailBytes = 64 * 1024;
      off_t from = std::max<off_t>(0, st.st_size - kTailBytes);
      text.resize(static_cast<size_t>(st.st_size - from));
      ssize_t n = ::pread(fd.get(), text.data(), text.size(), from);
      text.resize(n > 0 ? static_cast<size_t>(n) : 0);
    }
  }
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r'))
    text.pop_back();
  if (text.empty()) return "\n  (the console log is empty)";
  size_t start = text.size(), lines = 0;
  while (start > 0 && lines < kConsoleTailLines) {
    start = text.rfind('\n', start - 1);
    if (start == std::string::npos) {
      start = 0;
      break;
    }
    ++lines;
  }
  std::string tail = text.substr(start == 0 ? 0 : start + 1), out;
  out = "\nlast lines of the console log:";
  size_t pos = 0;
  while (pos <= tail.size()) {
    size_t end = tail.find('\n', pos);
    if (end == std::string::npos) end = tail.size();
    out += "\n  " + without_controls(std::string_view(tail).substr(pos, end - pos));
    pos = end + 1;
  }
  return out;
}

// Why the VMM process stopped, from exit.json, for messages: "triple-fault: vCPU 0 ...".
std::string exit_reason(const fs::path& dir) {
  auto doc = read_json_file(dir / "exit.json");
  if (!doc) return "the VMM process ended without recording why";
  std::string reason = doc->value("reason", std::string("unknown"));
  std::string detail = doc->value("detail", std::string());
  return detail.empty() ? reason : reason + ": " + detail;
}

fs::path self_executable() {
  return fs::read_symlink("/proc/self/exe");
}

// SIGINT, SIGTERM and SIGHUP: what VmmInterruptGuard handles.
sigset_t interrupt_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int signal : {SIGINT, SIGTERM, SIGHUP})
    sigaddset(&set, signal);
  return set;
}

// Starts `msb __vmm DIR` detached: its own session, stdin from /dev/null, output to vmm.log,
// no descriptor of this process. Returns its pid (a child of this process until it exits).
// It returns with SIGINT, SIGTERM and SIGHUP blocked in this process: a Ctrl-C between the fork
// and the caller's VmmInterruptGuard would otherwise end this process and leave the VMM running.
// The guard unblocks them once its handler is in place, and a pending one then kills the VMM.
int spawn_vmm(const fs::path& dir) {
  std::string exe = self_executable().string();
  std::string dir_arg = dir.string();
  std::string log = (dir / "vmm.log").string();
  const sigset_t interrupts = interrupt_signals();
  sigset_t old_mask;
  ::sigprocmask(SIG_BLOCK, &interrupts, &old_mask);
  pid_t pid = ::fork();
  if (pid < 0) {
    ::sigprocmask(SIG_SETMASK, &old_mask, nullptr);
    snapstore::throw_errno("fork");
  }
  if (pid == 0) {
    ::sigprocmask(SIG_SETMASK, &old_mask, nullptr);
    ::setsid();
    int null_fd = ::open("/dev/null", O_RDONLY);
    int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (null_fd < 0 || log_fd < 0) ::_exit(127);
    ::dup2(null_fd, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::close_range(3, ~0U, 0);
    char* argv[] = {const_cast<char*>("msb"), const_cast<char*>("__vmm"), dir_arg.data(), nullptr};
    ::execv(exe.c_str(), argv);
    ::_exit(127);
  }
  return pid;
}

// Ctrl-C (or SIGTERM, SIGHUP) while a sandbox boots, or during `msb run`, must not leave its VMM
// running with nobody waiting for it: the handler kills the VMM (kill(2) is async-signal-safe);
// the caller then sees it gone and cleans up as for any failed boot or removal.
volatile sig_atomic_t g_vmm_to_kill = 0;
volatile sig_atomic_t g_interrupted_by = 0;
// The VMMs of a restore with --fork (they start together): the handler kills them all.
constexpr size_t kMaxVmmsToKill = 1024;
volatile sig_atomic_t g_more_vmms_to_kill[kMaxVmmsToKill];
volatile sig_atomic_t g_more_vmms = 0;

extern "C" void kill_vmm_on_signal(int signal) {
  g_interrupted_by = signal;
  if (g_vmm_to_kill > 0) ::kill(g_vmm_to_kill, SIGKILL);
  for (sig_atomic_t i = 0; i < g_more_vmms; ++i)
    if (g_more_vmms_to_kill[i] > 0) ::kill(g_more_vmms_to_kill[i], SIGKILL);
}

std::string interrupted_message() {
  return std::string("interrupted by SIG") + ::sigabbrev_np(g_interrupted_by) +
         "; the VMM was stopped";
}

class VmmInterruptGuard {
 public:
  explicit VmmInterruptGuard(int pid) {
    g_interrupted_by = 0;
    g_vmm_to_kill = pid;
    struct sigaction action {};
    action.sa_handler = kill_vmm_on_signal;
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < std::size(kSignals); ++i)
      ::sigaction(kSignals[i], &action, &old_[i]);
    // spawn_vmm left them blocked; one that came meanwhile is handled now.
    const sigset_t interrupts = interrupt_signals();
    ::sigprocmask(SIG_UNBLOCK, &interrupts, nullptr);
  }
  ~VmmInterruptGuard() {
    for (size_t i = 0; i < std::size(kSignals); ++i)
      ::sigaction(kSignals[i], &old_[i], nullptr);
    // The handler killed it: reap it (this process started it), or it stays a zombie.
    if (g_interrupted_by && g_vmm_to_kill > 0) ::waitpid(g_vmm_to_kill, nullptr, 0);
    g_vmm_to_kill = 0;
  }
  VmmInterruptGuard(const VmmInterruptGuard&) = delete;
  VmmInterruptGuard& operator=(const VmmInterruptGuard&) = delete;

 private:
  static constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};
  struct sigaction old_[std::size(kSignals)];
};

// The console log's latest non-empty line (trailing blanks and carriage returns dropped), from
// its last 4 KiB: "" if there is none yet. Raw guest output, for BootProgress.
std::string latest_console_line(const fs::path& dir) {
  UniqueFd fd(::open((dir / "console.log").c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st;
  if (!fd || ::fstat(fd.get(), &st) != 0) return "";
  char buf[4096];
  off_t from = st.st_size > off_t(sizeof buf) ? st.st_size - off_t(sizeof buf) : 0;
  ssize_t n = ::pread(fd.get(), buf, sizeof buf, from);
  if (n <= 0) return "";
  std::string_view text(buf, static_cast<size_t>(n));
  while (!text.empty() && std::strchr(" \t\r\n", text.back()) && text.back() != '\0')
    text.remove_suffix(1);
  size_t newline = text.rfind('\n');
  return std::string(newline == std::string_view::npos ? text : text.substr(newline + 1));
}

// Why a boot failed.
struct BootFailure {
  // For exit.json: "boot-timeout", "boot-failed" or "interrupted"; "" when the VMM process
  // recorded a failure of its own (vmm-error, triple-fault, ...), which `detail` then quotes.
  std::string reason;
  std::string detail;
  bool interrupted = false;  // by SIGINT, SIGTERM or SIGHUP of this process
  // "REASON: DETAIL"; an interrupt's detail says it all ("interrupted by SIGINT; ...").
  std::string text() const {
    return reason.empty() || interrupted ? detail : reason + ": " + detail;
  }
};

// Why the VMM process ended before the guest's agent answered.
BootFailure vmm_exit_failure(const fs::path& dir) {
  auto doc = read_json_file(dir / "exit.json");
  if (!doc) return {"boot-failed", "the VMM process ended without recording why (see vmm.log)"};
  if (doc->value("state", std::string()) == "failed") return {"", exit_reason(dir)};
  // It recorded a clean power-off: the guest reset (a Linux kernel panic with panic=-1 does).
  return {"boot-failed",
          "the guest powered off before its agent answered (" + exit_reason(dir) + ")"};
}

// Waits for the VMM process `pid` (just spawned) to report the guest's agent ready, telling
// `progress` how it goes. On failure, makes sure the process is gone and returns why.
std::optional<BootFailure> wait_ready(const std::string& name, const fs::path& dir, int pid,
                                      const BootProgressFn& progress) {
  VmmInterruptGuard interrupt_guard(pid);
  const auto timeout = boot_timeout();
  const auto started = Clock::now();
  const auto deadline = started + timeout;
  constexpr auto kReportEvery = std::chrono::milliseconds(250);
  auto next_report = started + kReportEvery;
  auto report = [&](bool done) {
    if (!progress) return;
    BootProgress state;
    state.name = name;
    state.waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started);
    state.done = done;
    if (!done) state.console_line = latest_console_line(dir);
    progress(state);
    next_report = Clock::now() + kReportEvery;
  };
  std::optional<BootFailure> failure;
  bool exited = false;
  auto child_exited = [&] {
    if (!exited && ::waitpid(pid, nullptr, WNOHANG) == pid) exited = true;
    return exited;
  };
  try {
    std::optional<ControlConnection> connection;
    while (!connection && !failure) {
      if (child_exited()) {
        failure = vmm_exit_failure(dir);
      } else if (Clock::now() >= deadline) {
        failure =
            BootFailure{"boot-timeout", "the VMM process did not open its control socket within " +
                                            std::to_string(timeout.count()) + " s"};
      } else if (UniqueFd fd = connect_unix(dir / "control.sock")) {
        connection.emplace(std::move(fd));
      } else {
        if (progress && Clock::now() >= next_report) report(false);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    if (connection) {
      try {
        connection->send_request({{"op", "wait_ready"}});
        for (;;) {
          bool timed_out = false;
          // Woken for each report while someone watches; otherwise only by the VMM or the deadline.
          auto wake = progress ? std::min(deadline, next_report) : deadline;
          auto frame = connection->read_frame(wake, &timed_out);
          if (timed_out && Clock::now() < deadline) {
            report(false);
            continue;
          }
          if (frame && frame->type == control::kResponse) {
            auto body = nlohmann::json::parse(frame->payload, nullptr, false);
            if (body.is_object() && body.value("ready", false)) {
              report(true);
              return std::nullopt;
            }
            failure = BootFailure{"boot-failed",
                                  body.is_object()
                                      ? body.value("error", std::string("unexpected response"))
                                      : "unexpected response"};
          } else if (timed_out) {
            failure = BootFailure{"boot-timeout", "the guest's agent did not answer within " +
                                                      std::to_string(timeout.count()) +
                                                      " s (MSB_BOOT_TIMEOUT sets the limit)"};
          } else {
            // The VMM closed the connection: it is exiting, and exit.json says why.
            auto until = Clock::now() + std::chrono::seconds(5);
            while (!child_exited() && vmm_running(dir) && Clock::now() < until)
              std::this_thread::sleep_for(std::chrono::milliseconds(1));
            failure = vmm_exit_failure(dir);
          }
          break;
        }
      } catch (const snapstore::StoreError& e) {
        failure = BootFailure{"boot-failed", e.what()};
      }
    }
  } catch (...) {
    // Whatever went wrong here (the progress display too), no VMM may be left running.
    kill_vmm(dir, pid);
    ::waitpid(pid, nullptr, 0);
    throw;
  }
  kill_vmm(dir, pid);
  ::waitpid(pid, nullptr, 0);
  report(true);
  if (g_interrupted_by) failure = BootFailure{"interrupted", interrupted_message(), true};
  return failure;
}

// Records a failed boot in exit.json, which makes the sandbox "failed" with the reason, unless
// the VMM process recorded a failure of its own (it knows more: vmm-error, triple-fault).
void record_boot_failure(const fs::path& dir, const BootFailure& failure) {
  auto doc = read_json_file(dir / "exit.json");
  if (doc && doc->value("state", std::string()) == "failed" && failure.reason != "interrupted") {
    return;
  }
  write_json_file(dir / "exit.json",
                  {{"state", "failed"},
                   {"reason", failure.reason.empty() ? "boot-failed" : failure.reason},
                   {"detail", failure.detail},
                   {"time", utc_timestamp()}});
}

// The error of a failed boot: one line, with how to look at a kept sandbox, then the console's
// last lines.
std::string boot_error(const std::string& name, const fs::path& dir, const BootFailure& failure,
                       bool kept) {
  std::string message = "sandbox " + in_quotes(name) + " did not boot: " + failure.text();
  if (kept) message += " (kept as failed: msb logs " + name + "; msb rm " + name + ")";
  return message + console_tail(dir);
}

std::string existing_file(std::string_view what, const std::string& path) {
  std::error_code ec;
  auto status = fs::status(path, ec);
  if (ec || !fs::exists(status)) throw SandboxError(std::string(what) + " " + path + ": not found");
  if (!fs::is_regular_file(status) && !fs::is_block_file(status)) {
    throw SandboxError(std::string(what) + " " + path + ": not a regular file");
  }
  if (::access(path.c_str(), R_OK) != 0) {
    throw SandboxError(std::string(what) + " " + path + ": " + std::strerror(errno));
  }
  return fs::absolute(path).lexically_normal().string();
}

// Checks the options and returns the config.json the VMM process reads. A Linux kernel gets
// msb's initramfs (the agent and its modules) and a root image unless told otherwise.
nlohmann::json make_config(const Home& home, const CreateOptions& options) {
  snapstore::check_name(options.name);
  unsigned max_cpus = options.max_cpus.value_or(options.cpus);
  uint64_t max_memory = options.max_memory_mib.value_or(options.memory_mib);
  if (options.cpus == 0) throw SandboxError("--cpus must be at least 1");
  if (max_cpus > kMaxCpus) {
    throw SandboxError("--max-cpus " + std::to_string(max_cpus) + " is over the limit of " +
                       std::to_string(kMaxCpus));
  }
  if (options.cpus > kMaxCpus) {
    throw SandboxError("--cpus " + std::to_string(options.cpus) + " is over the limit of " +
                       std::to_string(kMaxCpus));
  }
  if (options.cpus > max_cpus) {
    throw SandboxError("--cpus " + std::to_string(options.cpus) + " is over --max-cpus " +
                       std::to_string(max_cpus));
  }
  if (options.memory_mib < kMinMemoryMib) {
    throw SandboxError("--memory must be at least " + std::to_string(kMinMemoryMib) + " MiB");
  }
  if (options.memory_mib > max_memory) {
    throw SandboxError("--memory " + std::to_string(options.memory_mib) +
                       " MiB is over --max-memory " + std::to_string(max_memory) + " MiB");
  }
  if (max_memory > kMaxMemoryMib) {
    throw SandboxError("--max-memory " + std::to_string(max_memory) + " MiB is over the limit of " +
                       std::to_string(kMaxMemoryMib) + " MiB");
  }
  if (options.disk.empty() && options.disk_size_mib == 0) {
    throw SandboxError("--disk-size must be at least 1 MiB");
  }
  if (!options.disk.empty() && !options.image.empty()) {
    throw SandboxError("--disk and --image both name the root disk: give one");
  }
  for (const auto& entry : options.env)
    check_env_entry("--env", entry);

  const KernelChoice kernel =
      resolve_kernel(home, options.kernel.empty() ? default_kernel(home) : options.kernel);
  std::string initrd = options.initrd.empty() ? "" : existing_file("initrd", options.initrd);
  std::string disk = options.disk.empty() ? "" : existing_file("disk", options.disk);
  std::string cmdline = options.cmdline;
  std::vector<std::string> env = options.env;
  nlohmann::json image = nullptr;
  if (kernel.linux_guest && initrd.empty()) {
    initrd = build_initramfs(home, agent_binary(), kernel.modules).string();
  }
  if (!options.image.empty() || (kernel.linux_guest && disk.empty())) {
    auto store = home.open_store();
    PreparedImage prepared =
        prepare_image(home, *store, options.image.empty() ? kDefaultImage : options.image);
    disk = prepared.ext4.string();
    env = merge_env(prepared.info.config.env, options.env);
    image = {{"tag", prepared.info.tag},
             {"id", prepared.info.id},
             {"manifest", prepared.manifest.hex()},
             {"workdir", prepared.info.config.workdir},
             {"user", prepared.info.config.user},
             {"entrypoint", prepared.info.config.entrypoint},
             {"cmd", prepared.info.config.cmd}};
  }
  if (cmdline.empty()) {
    cmdline = kernel.linux_guest ? kDefaultLinuxCmdline : kDefaultCmdline;
  }

  // The environment reaches the guest in one agent frame (kSetEnv: a count, then the entries).
  size_t env_bytes = sizeof(uint32_t);
  for (const auto& entry : env) {
    check_env_entry("--env", entry);
    env_bytes += entry.size() + 1;
  }
  if (env_bytes > agent::kMaxPayload) {
    throw SandboxError("--env: the environment is " + std::to_string(env_bytes) +
                       " bytes; at most " + std::to_string(agent::kMaxPayload) + " fit");
  }
  nlohmann::json config = {{"name", options.name},
                           {"kernel", existing_file("kernel", kernel.image.string())},
                           {"kernel_name", kernel.name},
                           {"initrd", initrd},
                           {"disk", disk},
                           {"disk_size_mib", options.disk_size_mib},
                           {"image", image},
                           {"linux", kernel.linux_guest},
                           {"cmdline", cmdline},
                           {"cpus", options.cpus},
                           {"max_cpus", max_cpus},
                           {"memory_mib", options.memory_mib},
                           {"max_memory_mib", max_memory},
                           {"env", env},
                           {"created", utc_timestamp()}};
  return config;
}

std::string random_suffix() {
  std::random_device rd;
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", rd());
  return buf;
}

// "sandbox NAME already exists", saying how to remove a failed one (its name is taken until then).
std::string already_exists(const Home& home, const std::string& name) {
  std::string message = "sandbox " + in_quotes(name) + " already exists";
  try {
    SandboxInfo info = Sandbox::open(home, name).info();
    if (info.state == "failed") {
      message += " (failed: " + info.reason + "; msb rm " + name + " removes it)";
    }
  } catch (const SandboxError&) {
    // Removed meanwhile: the plain message is still true of the moment it was tried.
  }
  return message;
}

// Creates the sandbox `options.name` and boots it. A boot that fails leaves it "failed" with its
// logs when `keep_failed` (msb create); anything else (an interrupt, an error before the boot,
// or any failure of msb run's throwaway sandbox) leaves nothing behind.
void create_sandbox(const Home& home, const CreateOptions& options, const BootProgressFn& progress,
                    bool keep_failed) {
  nlohmann::json config = make_config(home, options);
  boot_timeout();  // a bad MSB_BOOT_TIMEOUT fails before anything is made
  fs::create_directories(sandboxes_dir(home));
  fs::path dir = sandboxes_dir(home) / options.name;
  // mkdir is the claim on the name: of two msb creating it at once, one gets EEXIST.
  if (::mkdir(dir.c_str(), 0700) != 0) {
    if (errno == EEXIST) throw SandboxError(already_exists(home, options.name));
    snapstore::throw_errno("cannot create " + dir.string());
  }
  // The sandbox holds its image (a store name) so that msb image rm and gc leave its disk's base.
  auto image = config["image"].is_object()
                   ? snapstore::Hash128::parse(config["image"].value("manifest", std::string()))
                   : std::nullopt;
  auto discard = [&] {
    std::error_code ec;
    fs::remove_all(dir, ec);
    if (image) home.open_store()->remove_name(image_hold_name(options.name));
  };
  std::optional<BootFailure> failure;
  bool kept = false;
  try {
    UniqueFd lock = claim(dir, options.name);
    if (image) home.open_store()->set_name(image_hold_name(options.name), *image, true);
    write_json_file(dir / "config.json", config);
    int pid = spawn_vmm(dir);
    test_hook("sandbox-vmm-spawned");  // before wait_ready handles interrupts (core/test_hooks.h)
    failure = wait_ready(options.name, dir, pid, progress);
    kept = failure && keep_failed && !failure->interrupted;
    if (kept) record_boot_failure(dir, *failure);
  } catch (...) {
    discard();
    throw;
  }
  if (!failure) return;
  std::string message = boot_error(options.name, dir, *failure, kept);
  if (!kept) discard();
  // Where kernel code is emulated a Linux guest boots slowly, if at all: say so with the failure.
  if (config.value("linux", false) && !host_has_hardware_virtualization()) {
    message +=
        "\n  (this host has no VMX/SVM: a Linux guest's kernel code is emulated and boots slowly; "
        "MSB_BOOT_TIMEOUT sets how long msb waits; --kernel testguest runs msb's test guest)";
  }
  throw SandboxError(message);
}

}  // namespace

std::chrono::seconds boot_timeout(const char* env, bool hardware_virtualization) {
  if (!env || !*env) return std::chrono::seconds(hardware_virtualization ? 60 : 300);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(env, env + std::strlen(env), value);
  if (ec != std::errc() || *end != '\0' || value == 0) {
    throw SandboxError("MSB_BOOT_TIMEOUT=" + in_quotes(env) +
                       " is not a positive number of seconds");
  }
  return std::chrono::seconds(value);
}

std::chrono::seconds boot_timeout() {
  const char* env = std::getenv("MSB_BOOT_TIMEOUT");
  // The host is looked at (a read of /proc/cpuinfo) only when the environment says nothing.
  return boot_timeout(env, env && *env ? true : host_has_hardware_virtualization());
}

uint64_t parse_mib(std::string_view flag, std::string_view text) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  std::string_view unit = text.substr(static_cast<size_t>(end - text.data()));
  uint64_t scale = 0;
  if (unit.empty() || unit == "M" || unit == "MiB") scale = 1;
  if (unit == "G" || unit == "GiB") scale = 1024;
  if (ec != std::errc() || end == text.data() || scale == 0 || value > (UINT64_MAX >> 20) / scale) {
    throw SandboxError(std::string(flag) + " " + in_quotes(text) +
                       ": not a size in MiB (examples: 512, 512M, 2G)");
  }
  return value * scale;
}

unsigned parse_count(std::string_view flag, std::string_view text) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) {
    throw SandboxError(std::string(flag) + " " + in_quotes(text) + ": not a whole number");
  }
  return value;
}

std::vector<std::string> merge_env(const std::vector<std::string>& base,
                                   const std::vector<std::string>& over) {
  std::vector<std::string> out = base;
  for (const auto& entry : over) {
    std::string key = entry.substr(0, entry.find('='));
    std::erase_if(out, [&](const std::string& e) { return e.substr(0, e.find('=')) == key; });
    out.push_back(entry);
  }
  return out;
}

void check_env_entry(std::string_view flag, std::string_view entry) {
  size_t eq = entry.find('=');
  if (eq == std::string_view::npos || eq == 0 || entry.find('\0') != std::string_view::npos) {
    throw SandboxError(std::string(flag) + " " + in_quotes(entry) + ": expected KEY=VALUE");
  }
}

int ExecResult::exit_status() const {
  if (timed_out) return 124;
  if (signal > 0) return 128 + signal;
  return code;
}

Sandbox Sandbox::create(const Home& home, const CreateOptions& options,
                        const BootProgressFn& progress) {
  create_sandbox(home, options, progress, /*keep_failed=*/true);
  return Sandbox(options.name, sandboxes_dir(home) / options.name);
}

void Sandbox::create_restored(const Home& home, const std::vector<nlohmann::json>& configs) {
  boot_timeout();  // a bad MSB_BOOT_TIMEOUT fails before anything is made
  if (configs.size() > kMaxVmmsToKill) {
    throw SandboxError("at most " + std::to_string(kMaxVmmsToKill) + " sandboxes start at once");
  }
  fs::create_directories(sandboxes_dir(home));
  std::vector<std::string> names;
  std::vector<fs::path> dirs;
  std::vector<UniqueFd> locks;
  std::vector<int> pids;
  try {
    for (const auto& config : configs) {
      std::string name = config.at("name").get<std::string>();
      snapstore::check_name(name);
      fs::path dir = sandboxes_dir(home) / name;
      if (::mkdir(dir.c_str(), 0700) != 0) {
        if (errno == EEXIST) throw SandboxError("sandbox " + in_quotes(name) + " already exists");
        snapstore::throw_errno("cannot create " + dir.string());
      }
      names.push_back(name);
      dirs.push_back(dir);
      locks.push_back(claim(dir, name));
      write_json_file(dir / "config.json", config);
    }
    // From the first spawn on, an interrupt kills every VMM of this restore.
    VmmInterruptGuard interrupt_guard(0);
    for (size_t i = 0; i < dirs.size() && !g_interrupted_by; ++i) {
      pids.push_back(spawn_vmm(dirs[i]));
      g_more_vmms_to_kill[i] = pids.back();
      g_more_vmms = static_cast<sig_atomic_t>(i + 1);
    }
    if (g_interrupted_by) throw SandboxError("restore " + interrupted_message());
    // All or nothing: a fork that does not boot takes the others with it (below).
    for (size_t i = 0; i < dirs.size(); ++i) {
      if (auto failure = wait_ready(names[i], dirs[i], pids[i], {})) {
        throw SandboxError(boot_error(names[i], dirs[i], *failure, /*kept=*/false));
      }
    }
  } catch (...) {
    g_more_vmms = 0;
    for (size_t i = 0; i < pids.size(); ++i)
      kill_vmm(dirs[i], pids[i]);
    std::error_code ec;
    for (const auto& dir : dirs)
      fs::remove_all(dir, ec);
    throw;
  }
  g_more_vmms = 0;
}

Sandbox Sandbox::open(const Home& home, const std::string& name) {
  if (snapstore::name_problem(name) || !fs::is_directory(sandboxes_dir(home) / name)) {
    throw SandboxError("no sandbox " + in_quotes(name));
  }
  return Sandbox(name, sandboxes_dir(home) / name);
}

namespace {

// The balloons of the running and paused sandboxes among `infos`, from their VMMs' "status"
// replies: a batch is asked at once and its answers awaited until one deadline, so that a VMM
// busy elsewhere (a snapshot's capture) delays the list by at most that and stays without one.
// Batches bound the descriptors held.
void add_balloons(const Home& home, std::vector<SandboxInfo>& infos) {
  constexpr size_t kBatch = 128;
  constexpr auto kWait = std::chrono::seconds(5);
  for (size_t first = 0; first < infos.size(); first += kBatch) {
    std::vector<std::pair<SandboxInfo*, ControlConnection>> asked;
    for (size_t i = first; i < std::min(infos.size(), first + kBatch); ++i) {
      SandboxInfo& info = infos[i];
      if (info.state != "running" && info.state != "paused") continue;
      UniqueFd fd = connect_unix(sandboxes_dir(home) / info.name / "control.sock");
      if (!fd) continue;
      ControlConnection connection(std::move(fd));
      try {
        connection.send_request({{"op", "status"}});
      } catch (const SandboxError&) {
        continue;  // it stopped meanwhile
      }
      asked.emplace_back(&info, std::move(connection));
    }
    const auto deadline = Clock::now() + kWait;
    for (auto& [info, connection] : asked) {
      std::optional<Frame> frame = connection.read_frame(deadline);
      if (!frame || frame->type != control::kResponse) continue;
      nlohmann::json body = nlohmann::json::parse(frame->payload, nullptr, false);
      if (!body.is_object() || !body.contains("balloon") || !body["balloon"].is_object()) continue;
      const nlohmann::json& balloon = body["balloon"];
      try {
        info->balloon = SandboxBalloon{balloon.at("ram_mib").get<uint64_t>(),
                                       balloon.at("target_mib").get<uint64_t>(),
                                       balloon.at("actual_mib").get<uint64_t>()};
      } catch (const nlohmann::json::exception&) {
        // A VMM of another version: no balloon shown.
      }
    }
  }
}

}  // namespace

std::vector<SandboxInfo> Sandbox::list(const Home& home, bool balloons) {
  std::vector<SandboxInfo> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(sandboxes_dir(home), ec)) {
    std::string name = entry.path().filename().string();
    // Folders being removed are renamed to ".removing-..." first; they are not sandboxes.
    if (snapstore::name_problem(name) || !entry.is_directory()) continue;
    out.push_back(Sandbox(name, entry.path()).info());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  if (balloons) add_balloons(home, out);
  return out;
}

SandboxInfo Sandbox::info() const {
  SandboxInfo info;
  info.name = name_;
  if (auto config = read_json_file(dir_ / "config.json")) {
    info.cpus = config->value("cpus", 0u);
    info.max_cpus = config->value("max_cpus", 0u);
    info.memory_mib = config->value("memory_mib", uint64_t{0});
    info.max_memory_mib = config->value("max_memory_mib", uint64_t{0});
    info.kernel = config->value("kernel_name", std::string());
    if (config->contains("image") && (*config)["image"].is_object()) {
      info.image = (*config)["image"].value("tag", std::string());
    }
    info.created = config->value("created", std::string());
    if (config->contains("restore")) info.parent = (*config)["restore"].value("handle", "");
  }
  bool claimed = lock_held(dir_ / "lock");
  if (vmm_running(dir_)) {
    info.state = claimed ? "starting" : "running";
    info.pid = read_pid(dir_);
    struct stat st;
    if (::stat((dir_ / "pid").c_str(), &st) == 0) {
      timespec now;
      ::clock_gettime(CLOCK_REALTIME, &now);
      info.uptime =
          double(now.tv_sec - st.st_mtim.tv_sec) + double(now.tv_nsec - st.st_mtim.tv_nsec) / 1e9;
    }
    if (info.state == "running" && fs::exists(dir_ / "paused")) info.state = "paused";
  } else if (claimed) {
    info.state = "starting";
  } else if (auto exit = read_json_file(dir_ / "exit.json")) {
    info.state = exit->value("state", std::string("failed"));
    info.reason = exit->value("reason", std::string("unknown"));
    info.detail = exit->value("detail", std::string());
  } else if (int pid = read_pid(dir_)) {
    info.state = "failed";
    info.reason = "killed";
    info.detail = "the VMM process (pid " + std::to_string(pid) +
                  ") ended without recording why: killed by a signal?";
  } else {
    info.state = "failed";
    info.reason = "not-started";
    info.detail = "its VMM process never started (an interrupted msb create?)";
  }
  return info;
}

ExecOptions with_image_defaults(ExecOptions requested, const ImageConfig& image) {
  ExecOptions options = std::move(requested);
  if (options.workdir.empty()) options.workdir = image.workdir;
  if (options.user.empty()) options.user = image.user;
  if (options.argv.empty()) {
    options.argv = image.entrypoint;
    options.argv.insert(options.argv.end(), image.cmd.begin(), image.cmd.end());
  }
  if (options.argv.empty()) throw SandboxError("exec needs a command (the image names none)");
  return options;
}

ExecResult Sandbox::exec(const ExecOptions& requested, const ExecIo& io) const {
  // What the call leaves out comes from the sandbox's image (config.json keeps its config).
  ImageConfig image;
  if (auto config = read_json_file(dir_ / "config.json"); config && config->contains("image")) {
    image = image_config_from_json((*config)["image"]);
  }
  ExecOptions options = with_image_defaults(requested, image);
  for (const auto& entry : options.env)
    check_env_entry("--env", entry);
  UniqueFd fd = connect_unix(dir_ / "control.sock");
  if (!fd) {
    SandboxInfo now = info();
    throw SandboxError("sandbox " + in_quotes(name_) + " is not running (" + now.state +
                       (now.reason.empty() ? "" : ": " + now.reason) + ")");
  }
  ControlConnection connection(std::move(fd));
  auto result = connection.exec(options, io);
  if (!result) {
    // The VMM closed the stream without an exit: it stopped. Give it a moment to say why.
    auto until = Clock::now() + std::chrono::seconds(5);
    while (vmm_running(dir_) && Clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    throw SandboxError("sandbox " + in_quotes(name_) + " stopped while the command ran (" +
                       exit_reason(dir_) + ")");
  }
  return *result;
}

void Sandbox::stop(std::chrono::milliseconds timeout) const {
  if (!vmm_running(dir_)) {
    throw SandboxError("sandbox " + in_quotes(name_) + " is not running (" + info().state + ")");
  }
  int pid = read_pid(dir_);
  if (UniqueFd fd = connect_unix(dir_ / "control.sock")) {
    ControlConnection connection(std::move(fd));
    try {
      connection.send_request({{"op", "stop"}, {"timeout_ms", timeout.count()}});
      // The VMM keeps the connection open until it exits; it stops the machine itself after the
      // timeout, so only a wedged VMM makes this wait run out.
      auto deadline = Clock::now() + timeout + std::chrono::seconds(5);
      while (connection.read_frame(deadline)) {
      }
    } catch (const snapstore::StoreError&) {
      // It went away while we asked: fine, it is stopping.
    }
  }
  auto until = Clock::now() + std::chrono::seconds(2);
  while (vmm_running(dir_) && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  if (vmm_running(dir_)) {
    kill_vmm(dir_, pid);
    write_json_file(dir_ / "exit.json",
                    {{"state", "stopped"},
                     {"reason", "killed-by-stop"},
                     {"detail", "the VMM process did not stop in time; msb stop killed it"},
                     {"time", utc_timestamp()}});
  }
  if (pid > 0) ::waitpid(pid, nullptr, WNOHANG);
}

void Sandbox::start(const BootProgressFn& progress) const {
  boot_timeout();  // a bad MSB_BOOT_TIMEOUT fails before a VMM is started
  UniqueFd lock = claim(dir_, name_);
  if (vmm_running(dir_)) throw SandboxError("sandbox " + in_quotes(name_) + " is already running");
  if (!fs::exists(dir_ / "config.json")) {
    throw SandboxError("sandbox " + in_quotes(name_) +
                       " has no config.json: remove it with msb rm");
  }
  // A restored sandbox boots on its snapshot's disk delta: make sure it is materialized.
  auto config = read_json_file(dir_ / "config.json");
  if (config && config->contains("restore")) {
    Home home = home_of();
    auto store = home.open_store();
    std::string handle = (*config)["restore"].value("handle", "");
    try {
      materialize_snapshot(home, *store, handle, {});
    } catch (const std::exception& e) {
      throw SandboxError("sandbox " + in_quotes(name_) + ": " + e.what());
    }
  }
  std::error_code ec;
  fs::remove(dir_ / "exit.json", ec);
  int pid = spawn_vmm(dir_);
  if (auto failure = wait_ready(name_, dir_, pid, progress)) {
    record_boot_failure(dir_, *failure);
    throw SandboxError(boot_error(name_, dir_, *failure, /*kept=*/true));
  }
}

void Sandbox::remove(bool force) const {
  if (vmm_running(dir_) || lock_held(dir_ / "lock")) {
    if (!force) {
      throw SandboxError("sandbox " + in_quotes(name_) +
                         " is running (stop it first, or use --force)");
    }
    kill_vmm(dir_, read_pid(dir_));
  }
  // Renaming is the claim: of two msb removing it at once, one finds it gone.
  fs::path trash = dir_.parent_path() / (".removing-" + name_ + "-" + random_suffix());
  if (::rename(dir_.c_str(), trash.c_str()) != 0) {
    if (errno == ENOENT) throw SandboxError("no sandbox " + in_quotes(name_));
    snapstore::throw_errno("cannot remove " + dir_.string());
  }
  fs::remove_all(trash);
  // Its unnamed snapshots go with it, and its holds on its image and on the snapshot it was
  // restored from.
  try {
    release_sandbox_snapshots(home_of(), name_);
  } catch (const std::exception&) {
    // The store is busy (gc) or damaged: the names stay until msb store rm; nothing is lost.
  }
}

Home Sandbox::home_of() const {
  return Home::resolve(dir_.parent_path().parent_path());
}

void Sandbox::logs(bool follow, const std::function<void(std::string_view)>& out) const {
  UniqueFd fd(::open((dir_ / "console.log").c_str(), O_RDONLY | O_CLOEXEC));
  char buf[65536];
  for (;;) {
    ssize_t n = fd ? ::read(fd.get(), buf, sizeof buf) : 0;
    if (n > 0) {
      out(std::string_view(buf, static_cast<size_t>(n)));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (!follow) return;
    // At the end for now: wait for more while the sandbox runs (one last read after it stops).
    bool running = vmm_running(dir_) || lock_held(dir_ / "lock");
    if (!fd) fd.reset(::open((dir_ / "console.log").c_str(), O_RDONLY | O_CLOEXEC));
    if (!running) {
      while (fd && (n = ::read(fd.get(), buf, sizeof buf)) > 0)
        out(std::string_view(buf, static_cast<size_t>(n)));
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

ExecResult run_once(const Home& home, CreateOptions options, const ExecOptions& exec,
                    const ExecIo& io, const BootProgressFn& progress) {
  if (options.name.empty()) options.name = "run-" + random_suffix();
  // Without a command the image's entrypoint and command run; a command is needed otherwise.
  if (exec.argv.empty() && options.image.empty()) {
    throw SandboxError("run needs a command (or an --image whose config names one)");
  }
  // Not kept when its boot fails: nobody asked for it by name.
  create_sandbox(home, options, progress, /*keep_failed=*/false);
  Sandbox sandbox = Sandbox::open(home, options.name);
  ExecResult result;
  {
    // The sandbox is removed whatever happens, so an interrupt may simply kill its VMM: the
    // exec then ends and the removal below runs.
    VmmInterruptGuard interrupt_guard(sandbox.info().pid);
    try {
      result = sandbox.exec(exec, io);
    } catch (...) {
      sandbox.remove(/*force=*/true);
      if (g_interrupted_by) {
        throw SandboxError("run of " + in_quotes(options.name) + " " + interrupted_message());
      }
      throw;
    }
  }
  sandbox.remove(/*force=*/true);
  if (g_interrupted_by) {
    throw SandboxError("run of " + in_quotes(options.name) + " " + interrupted_message());
  }
  return result;
}

}  // namespace msb::core
