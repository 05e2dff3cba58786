// The linux-guest tier's plumbing: Debian's cloud kernel, msb's initramfs (the agent as PID 1)
// and an ext4 root image booted under QEMU microvm with TCG (shared/environment.md: Linux cannot
// boot under this machine's KVM), with the same device kinds msb gives a guest (virtio-mmio
// console, block, rng and balloon), driven by msb's own host side: a core::ExecMux on the
// agent's socket, and commands through core::ControlConnection as `msb exec` runs them.
//
//   msb::test::skip_without_linux_guest();
//   msb::test::LinuxGuestOptions options;
//   options.root_image = image;
//   msb::test::LinuxGuest guest(options);
//   auto result = guest.exec(msb::test::Command({"id", "-u"}).as("tester"));
//   guest.power_off();
//
// Needs MSB_LINUX_KERNEL_DIR (vmlinuz, lib/modules/VERSION), MSB_GUEST_KERNEL_DIR (msb's
// kernel: vmlinuz) and MSB_AGENT (the agent binary).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/control_client.h"
#include "core/control_protocol.h"
#include "core/exec_mux.h"
#include "core/frames.h"
#include "core/home.h"
#include "core/initramfs.h"
#include "core/sandbox.h"
#include "guest/protocol/agent_protocol.h"
#include "tests/support.h"

namespace msb::test {

// A program found on $PATH, or "" if there is none.
inline std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  size_t start = 0;
  for (;;) {
    size_t end = dirs.find(':', start);
    std::filesystem::path candidate = std::filesystem::path(dirs.substr(start, end - start)) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    if (end == std::string::npos) return {};
    start = end + 1;
  }
}

// The kernels the tier boots: Debian's cloud kernel (its virtio drivers are modules, which the
// initramfs carries) and msb's own (scripts/build-guest-kernel: everything built in, so the
// initramfs holds just the agent).
enum class GuestKernel { kDebianCloud, kMsb };

inline std::filesystem::path guest_kernel_dir(GuestKernel kernel) {
  return kernel == GuestKernel::kMsb ? MSB_GUEST_KERNEL_DIR : MSB_LINUX_KERNEL_DIR;
}

// A kernel's lib/modules/VERSION folder, or "" if there is none.
inline std::filesystem::path linux_modules_dir(GuestKernel kernel = GuestKernel::kDebianCloud) {
  std::error_code ec;
  for (const auto& entry :
       std::filesystem::directory_iterator(guest_kernel_dir(kernel) / "lib" / "modules", ec)) {
    if (entry.is_directory()) return entry.path();
  }
  return {};
}

// The host's TSC rate in kHz as /proc/cpuinfo's first "cpu MHz" gives it (2 GHz without one).
inline std::string host_tsc_khz() {
  std::istringstream lines(read_text("/proc/cpuinfo"));
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("cpu MHz", 0) != 0) continue;
    double mhz = std::atof(line.substr(line.find(':') + 1).c_str());
    if (mhz > 100) return std::to_string(static_cast<uint64_t>(mhz * 1000));
  }
  return "2000000";
}

// Prints "SKIPPED: ..." and exits 77 (CTest's skip) without QEMU, the kernel or the agent.
inline void skip_without_linux_guest(GuestKernel kernel = GuestKernel::kDebianCloud) {
  std::string missing;
  const std::filesystem::path dir = guest_kernel_dir(kernel);
  if (find_on_path("qemu-system-x86_64").empty()) {
    missing = "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)";
  } else if (kernel == GuestKernel::kDebianCloud &&
             (!std::filesystem::exists(dir / "vmlinuz") || linux_modules_dir(kernel).empty())) {
    missing = "no kernel in " + dir.string() + " (scripts/fetch-linux-kernel)";
  } else if (kernel == GuestKernel::kMsb && !std::filesystem::exists(dir / "vmlinuz")) {
    missing = "no kernel in " + dir.string() + " (scripts/build-guest-kernel)";
  } else if (::access(MSB_AGENT, X_OK) != 0) {
    missing = std::string("the agent ") + MSB_AGENT + " is not built";
  }
  if (!missing.empty()) {
    std::printf("SKIPPED: %s: the linux-guest tests need it\n", missing.c_str());
    std::exit(77);
  }
}

// Skips the same way without Debian's busybox-static at /bin/busybox.
inline void skip_without_busybox() {
  if (::access("/bin/busybox", X_OK) != 0) {
    std::printf("SKIPPED: /bin/busybox is missing (Debian package busybox-static)\n");
    std::exit(77);
  }
}

// A user for a test image's /etc/passwd.
struct ImageUser {
  std::string name;
  unsigned uid = 0, gid = 0;
  std::string home;
};

// Lays out, in the folder `root`, the host's static busybox with its applets as links in /bin,
// /etc/passwd with root and `users`, /etc/group with their groups plus `groups` lines
// ("NAME:x:GID:MEMBERS"), and the mount points the agent uses.
inline void lay_out_busybox_root(const std::filesystem::path& root,
                                 const std::vector<ImageUser>& users,
                                 const std::vector<std::string>& groups = {}) {
  namespace fs = std::filesystem;
  for (const char* dir : {"bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "tmp",
                          "proc", "sys", "dev", "run"}) {
    fs::create_directories(root / dir);
  }
  fs::permissions(root / "tmp", fs::perms::all | fs::perms::sticky_bit);
  fs::copy_file("/bin/busybox", root / "bin" / "busybox");
  ProcessResult applets = run_process({"/bin/busybox", "--list"});
  REQUIRE(applets.exit_code == 0);
  std::istringstream names(applets.out);
  for (std::string name; std::getline(names, name);) {
    if (!name.empty() && name != "busybox" && !fs::exists(root / "bin" / name))
      fs::create_symlink("busybox", root / "bin" / name);
  }
  std::string passwd = "root:x:0:0:root:/root:/bin/sh\n";
  std::string group = "root:x:0:\n";
  for (const auto& user : users) {
    passwd += user.name + ":x:" + std::to_string(user.uid) + ":" + std::to_string(user.gid) + ":" +
              user.name + ":" + user.home + ":/bin/sh\n";
    group += user.name + ":x:" + std::to_string(user.gid) + ":\n";
    fs::create_directories(root / user.home.substr(1));
    fs::permissions(root / user.home.substr(1), fs::perms::all);
  }
  for (const auto& line : groups)
    group += line + "\n";
  write_text(root / "etc" / "passwd", passwd);
  write_text(root / "etc" / "group", group);
}

// Builds `image` (ext4, 64 MiB) from the folder `root` with mke2fs -d.
inline void make_ext4_image(const std::filesystem::path& image, const std::filesystem::path& root) {
  ProcessResult made =
      run_process({find_on_path("mke2fs").empty() ? "/sbin/mke2fs" : find_on_path("mke2fs"), "-q",
                   "-t", "ext4", "-d", root.string(), "-F", image.string(), "64M"});
  INFO(made.err);
  REQUIRE(made.exit_code == 0);
}

// Builds `image` (ext4, 64 MiB) holding lay_out_busybox_root's tree.
inline void make_busybox_image(const std::filesystem::path& image,
                               const std::vector<ImageUser>& users,
                               const std::vector<std::string>& groups = {}) {
  TempDir tree;
  const std::filesystem::path root = tree / "root";
  lay_out_busybox_root(root, users, groups);
  make_ext4_image(image, root);
}

struct LinuxGuestOptions {
  GuestKernel kernel = GuestKernel::kDebianCloud;
  std::filesystem::path root_image;  // ext4; empty: no root disk (msb.root=none)
  unsigned cpus = 2;
  uint64_t memory_mib = 512;
  std::string hostname = "linux-guest";
  std::vector<std::string> env;  // the sandbox's environment (kSetEnv after every kReady)
  std::string extra_cmdline;
  bool writable_root = false;  // false: QEMU's snapshot=on keeps the image unchanged
  // The agent's channel: a named virtio-serial port (msb.port=msb.agent), or with
  // `console_port` the virtio console port /dev/hvc0 that msb's own VMM gives the agent. QEMU's
  // virtconsole drops what the guest writes while the host is not reading (no backpressure for
  // console ports), so only commands with little output are safe on it.
  bool console_port = false;
  std::chrono::seconds boot_timeout{120};  // TCG on a busy 2-core machine is slow
};

// An exec's options, built up: Command({"id", "-u"}).as("tester").in("/tmp").
struct Command {
  core::ExecOptions options;
  Command(std::vector<std::string> argv) { options.argv = std::move(argv); }  // NOLINT
  Command& with_env(std::vector<std::string> env) { return options.env = std::move(env), *this; }
  Command& in(std::string workdir) { return options.workdir = std::move(workdir), *this; }
  Command& as(std::string user) { return options.user = std::move(user), *this; }
  Command& timeout(std::chrono::milliseconds limit) { return options.timeout = limit, *this; }
  operator const core::ExecOptions&() const { return options; }  // NOLINT
};

// What a command did.
struct GuestResult {
  int code = 0;    // exit code, -1 when a signal ended it
  int signal = 0;  // the signal that ended it
  bool timed_out = false;
  std::string out, err;
};

class LinuxGuest {
 public:
  explicit LinuxGuest(LinuxGuestOptions options) : options_(std::move(options)) {
    try {
      boot();
    } catch (...) {
      shut_down();
      throw;
    }
  }

  ~LinuxGuest() { shut_down(); }
  LinuxGuest(const LinuxGuest&) = delete;
  LinuxGuest& operator=(const LinuxGuest&) = delete;

  const std::filesystem::path& dir() const { return dir_.path(); }
  std::filesystem::path console_path() const { return dir_ / "console.log"; }
  std::string console() const { return read_text(console_path()); }
  // The console's last lines, for failure messages.
  std::string console_tail(size_t bytes = 3000) const {
    std::string text = console();
    return text.size() > bytes ? text.substr(text.size() - bytes) : text;
  }

  // Runs a command through the VMM's control socket, as `msb exec` does. `input`: its stdin
  // (none: end of input at once).
  GuestResult exec(const core::ExecOptions& options,
                   const std::optional<std::string>& input = std::nullopt) {
    std::optional<snapstore::UniqueFd> stdin_file;
    if (input) {
      auto path = dir_ / ("stdin-" + std::to_string(++inputs_));
      write_text(path, *input);
      stdin_file.emplace(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      REQUIRE(stdin_file->get() >= 0);
    }
    auto fd = core::connect_unix(dir_ / "control.sock");
    REQUIRE(fd);
    core::ControlConnection connection(std::move(fd));
    GuestResult result;
    core::ExecIo io;
    io.on_stdout = [&](std::string_view data) { result.out.append(data); };
    io.on_stderr = [&](std::string_view data) { result.err.append(data); };
    io.stdin_fd = stdin_file ? stdin_file->get() : -1;
    auto exit = connection.exec(options, io);
    INFO("command " << options.argv.at(0) << "; mux: " << mux_log() << "; console:\n"
                    << console_tail());
    REQUIRE(exit.has_value());
    result.code = exit->code;
    result.signal = exit->signal;
    result.timed_out = exit->timed_out;
    return result;
  }

  // Runs `sh -c script`, which must exit 0; returns its stdout.
  std::string sh(const std::string& script) {
    GuestResult result = exec(Command({"sh", "-c", script}));
    INFO("sh -c " << script << "\nstderr: " << result.err);
    REQUIRE(result.code == 0);
    return result.out;
  }

  // A QMP command's "return" (REQUIREs that there was no "error").
  nlohmann::json qmp(const std::string& command, const nlohmann::json& arguments = nullptr) {
    if (!qmp_) {
      qmp_ = core::connect_unix(qmp_socket_);
      REQUIRE(qmp_);
      qmp_line();  // the greeting
      qmp_send({{"execute", "qmp_capabilities"}});
    }
    return qmp_send(arguments.is_null()
                        ? nlohmann::json{{"execute", command}}
                        : nlohmann::json{{"execute", command}, {"arguments", arguments}});
  }

  // Continues the guest as msb continues a restored one: a fresh mux whose first frame is
  // kRestore (wall clock, memory, cpus, entropy, name); returns once the agent answered kReady.
  void restore(const agent::RestorePayload& payload, const std::string& name) {
    stop_mux();
    std::string frame(reinterpret_cast<const char*>(&payload), sizeof payload);
    frame.append(name).push_back('\0');
    start_mux(frame);
    wait_ready();
  }

  // The agent's stream without a mux, for frame-level checks: frames go out with send() and
  // come back with next(). The mux is stopped for good: restore() starts a fresh one (a new mux
  // needs the kReady that answers kRestore).
  class RawAgent {
   public:
    explicit RawAgent(LinuxGuest& guest) : guest_(guest) { guest_.stop_mux(); }
    RawAgent(const RawAgent&) = delete;
    RawAgent& operator=(const RawAgent&) = delete;

    void send(uint16_t type, uint32_t id, std::string_view payload) {
      std::string bytes;
      core::append_frame(bytes, type, id, payload);
      std::string_view rest = bytes;
      while (!rest.empty()) {
        pollfd pfd{guest_.agent_.get(), POLLOUT, 0};
        REQUIRE(::poll(&pfd, 1, 10'000) == 1);
        ssize_t n = ::write(guest_.agent_.get(), rest.data(), rest.size());
        REQUIRE((n > 0 || errno == EAGAIN));
        if (n > 0) rest.remove_prefix(static_cast<size_t>(n));
      }
    }
    core::Frame next(int timeout_ms = 60'000) {
      for (;;) {
        if (auto frame = in_.next()) return *frame;
        REQUIRE_FALSE(in_.broken());
        pollfd pfd{guest_.agent_.get(), POLLIN, 0};
        INFO("console:\n" << guest_.console_tail());
        REQUIRE(::poll(&pfd, 1, timeout_ms) == 1);
        char buf[65536];
        ssize_t n = ::read(guest_.agent_.get(), buf, sizeof buf);
        REQUIRE((n > 0 || (n < 0 && errno == EAGAIN)));
        if (n > 0) in_.feed(std::string_view(buf, static_cast<size_t>(n)));
      }
    }
    // Collects exec `id`'s output until its kExit, which it returns.
    agent::ExitPayload wait_exit(uint32_t id, std::string* out = nullptr,
                                 std::string* err = nullptr) {
      for (;;) {
        core::Frame frame = next();
        REQUIRE(frame.id == id);
        if (frame.type == agent::kStdout && out) out->append(frame.payload);
        if (frame.type == agent::kStderr && err) err->append(frame.payload);
        if (frame.type == agent::kExit) {
          auto exit = core::decode_exit(frame.payload);
          REQUIRE(exit.has_value());
          return *exit;
        }
      }
    }

   private:
    LinuxGuest& guest_;
    core::FrameParser in_;
  };

  // Asks the agent to power off (the mux's "stop", as msb stop does) and waits up to `limit`
  // for QEMU to exit; returns QEMU's exit status.
  int power_off(std::chrono::seconds limit = std::chrono::seconds(30)) {
    auto fd = core::connect_unix(dir_ / "control.sock");
    REQUIRE(fd);
    core::ControlConnection connection(std::move(fd));
    connection.send_request({{"op", "stop"}, {"timeout_ms", 60'000}});
    auto deadline = std::chrono::steady_clock::now() + limit;
    int status = 0;
    for (;;) {
      pid_t done = ::waitpid(qemu_, &status, WNOHANG);
      if (done == qemu_) break;
      INFO("console:\n" << console_tail());
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    qemu_ = -1;
    stop_mux();
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  std::string mux_log() {
    std::lock_guard<std::mutex> lock(log_mutex_);
    return mux_log_;
  }

 private:
  void boot() {
    namespace fs = std::filesystem;
    const fs::path kernel_dir = guest_kernel_dir(options_.kernel);
    // One state directory per test process: the initramfs is cached there by content.
    static TempDir home_dir;
    core::Home home = core::Home::resolve(home_dir.path());
    const fs::path initramfs =
        core::build_initramfs(home, MSB_AGENT, linux_modules_dir(options_.kernel));

    // tsc_early_khz: under TCG on a busy host the kernel's TSC calibration against the PIT
    // fails, and the boot then hangs (seen with 5 processes on 2 cores); the host's rate (TCG's
    // TSC is the host's) skips the calibration and keeps the guest's clock at real speed.
    std::string cmdline = "console=ttyS0 panic=-1 tsc_early_khz=" + host_tsc_khz() +
                          " msb.hostname=" + options_.hostname;
    if (options_.root_image.empty()) cmdline += " msb.root=none";
    if (!options_.console_port) cmdline += " msb.port=msb.agent";
    if (!options_.extra_cmdline.empty()) cmdline += " " + options_.extra_cmdline;
    agent_socket_ = dir_ / "agent.sock";
    qmp_socket_ = dir_ / "qmp.sock";
    // The same device kinds msb gives a guest; QEMU's microvm describes them (and the CPUs) in
    // ACPI, which this kernel needs.
    const std::string agent_device = options_.console_port
                                         ? "virtconsole,chardev=agent"
                                         : "virtserialport,chardev=agent,name=msb.agent";
    std::vector<std::string> argv = {find_on_path("qemu-system-x86_64")};
    auto add = [&argv](std::initializer_list<std::string> args) { argv.insert(argv.end(), args); };
    add({"-M", "microvm", "-accel", "tcg"});
    add({"-m", std::to_string(options_.memory_mib), "-smp", std::to_string(options_.cpus)});
    add({"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"});
    add({"-serial", "file:" + console_path().string()});
    add({"-kernel", (kernel_dir / "vmlinuz").string(), "-initrd", initramfs.string()});
    add({"-append", cmdline});
    add({"-device", "virtio-serial-device"});
    add({"-chardev", "socket,id=agent,path=" + agent_socket_.string() + ",server=on,wait=off"});
    add({"-device", agent_device});
    add({"-device", "virtio-rng-device", "-device", "virtio-balloon-device"});
    add({"-qmp", "unix:" + qmp_socket_.string() + ",server=on,wait=off"});
    if (!options_.root_image.empty()) {
      add({"-drive", "id=root,file=" + options_.root_image.string() + ",format=raw,if=none" +
                         (options_.writable_root ? "" : ",snapshot=on")});
      add({"-device", "virtio-blk-device,drive=root"});
    }
    qemu_ = spawn_process(argv, (dir_ / "qemu.log").string());
    listen_ = core::listen_unix(dir_ / "control.sock");

    // QEMU's sockets exist once it is up; the agent's must be connected before it says kReady.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!(agent_ = core::connect_unix(agent_socket_))) {
      INFO("QEMU: " << read_text(dir_ / "qemu.log"));
      REQUIRE(qemu_running());
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    start_mux({});
    wait_ready();
  }

  void shut_down() {
    stop_mux();
    // MSB_LINUX_GUEST_LOGS=DIR keeps each guest's console and QEMU log there, for debugging.
    if (const char* keep = std::getenv("MSB_LINUX_GUEST_LOGS")) {
      std::error_code ec;
      std::filesystem::create_directories(keep, ec);
      for (const char* name : {"console.log", "qemu.log"}) {
        std::filesystem::copy_file(
            dir_ / name,
            std::filesystem::path(keep) / (dir_.path().filename().string() + "-" + name),
            std::filesystem::copy_options::overwrite_existing, ec);
      }
    }
    if (qemu_ > 0) {
      ::kill(qemu_, SIGKILL);
      ::waitpid(qemu_, nullptr, 0);
      qemu_ = -1;
    }
  }

  bool qemu_running() { return qemu_ > 0 && ::waitpid(qemu_, nullptr, WNOHANG) == 0; }

  void start_mux(std::string restore_payload) {
    stop_fd_.reset(::eventfd(0, EFD_CLOEXEC));
    REQUIRE(stop_fd_);
    core::MuxOptions mux_options;
    mux_options.env = options_.env;
    mux_options.restore_payload = std::move(restore_payload);
    mux_ = std::make_unique<core::ExecMux>(agent_.get(), listen_.get(), mux_options);
    mux_->log = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(log_mutex_);
      mux_log_ += line + "\n";
    };
    mux_thread_ = std::thread([this] { mux_->run(stop_fd_.get()); });
  }

  void stop_mux() {
    if (!mux_) return;
    uint64_t one = 1;
    (void)!::write(stop_fd_.get(), &one, sizeof one);
    mux_thread_.join();
    mux_->close_clients();
    mux_.reset();
  }

  // Waits, as msb does after starting a VMM, for the mux to report the agent ready.
  void wait_ready() {
    auto fd = core::connect_unix(dir_ / "control.sock");
    REQUIRE(fd);
    core::ControlConnection connection(std::move(fd));
    connection.send_request({{"op", "wait_ready"}});
    bool timed_out = false;
    auto frame =
        connection.read_frame(std::chrono::steady_clock::now() + options_.boot_timeout, &timed_out);
    INFO("timed out: " << timed_out << "; mux: " << mux_log() << "; console:\n" << console_tail());
    REQUIRE(frame.has_value());
    REQUIRE(frame->type == core::control::kResponse);
    auto body = nlohmann::json::parse(frame->payload);
    REQUIRE(body.value("ready", false));
  }

  std::string qmp_line() {
    for (;;) {
      size_t eol = qmp_buffer_.find('\n');
      if (eol != std::string::npos) {
        std::string line = qmp_buffer_.substr(0, eol);
        qmp_buffer_.erase(0, eol + 1);
        return line;
      }
      pollfd pfd{qmp_.get(), POLLIN, 0};
      REQUIRE(::poll(&pfd, 1, 30'000) == 1);
      char buf[4096];
      ssize_t n = ::read(qmp_.get(), buf, sizeof buf);
      REQUIRE(n > 0);
      qmp_buffer_.append(buf, static_cast<size_t>(n));
    }
  }

  nlohmann::json qmp_send(const nlohmann::json& request) {
    std::string text = request.dump() + "\n";
    REQUIRE(::write(qmp_.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size()));
    for (;;) {
      auto reply = nlohmann::json::parse(qmp_line());
      // Events (BALLOON_CHANGE, ...) may come first.
      if (reply.contains("error")) FAIL("QMP " << request.dump() << ": " << reply.dump());
      if (reply.contains("return")) return reply["return"];
    }
  }

  LinuxGuestOptions options_;
  TempDir dir_;
  std::filesystem::path agent_socket_, qmp_socket_;
  pid_t qemu_ = -1;
  snapstore::UniqueFd listen_, agent_, qmp_, stop_fd_;
  std::string qmp_buffer_;
  std::unique_ptr<core::ExecMux> mux_;
  std::thread mux_thread_;
  std::mutex log_mutex_;
  std::string mux_log_;
  int inputs_ = 0;
};

}  // namespace msb::test
