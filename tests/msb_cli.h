// The msb binary as the vmm-tier tests drive it: a private $MSB_HOME per test, commands run as a
// user would (in the foreground or the background), helpers for what a user checks (exit codes,
// one-line errors, checksums), and for waiting on observable states (a VMM's status, a process
// stopped or gone) with deadlines that only catch hangs.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "core/control_protocol.h"
#include "guest/protocol/agent_protocol.h"
#include "guest/protocol/pattern.h"
#include "tests/support.h"

extern char** environ;

namespace msb::test {

// Polls `done` every 10 ms until it holds; false once `limit` has passed. The limit only catches
// hangs: what a test waits for is an event (a file, a state, a process gone), never a duration.
template <class Done>
bool eventually(Done done, std::chrono::seconds limit = std::chrono::seconds(120)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (done()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// The state letter of /proc/PID/stat ('R', 'S', 'T' stopped, 'Z' zombie...), or 0 when there is
// no such process.
inline char process_state(int pid) {
  if (pid <= 0) return 0;
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() ? 0 : stat[paren + 2];
}

// Whether `pid` runs (or is stopped): a zombie has ended, whether or not its parent reaped it.
inline bool process_alive(int pid) {
  const char state = process_state(pid);
  return state != 0 && state != 'Z' && state != 'X';
}

// Whether `pid` has a handler for `signal` (SigCgt in /proc/PID/status): msb catches SIGINT only
// while it has a VMM to stop on an interrupt.
inline bool catches_signal(int pid, int signal) {
  const std::string status = read_text("/proc/" + std::to_string(pid) + "/status");
  const size_t at = status.find("\nSigCgt:");
  if (at == std::string::npos) return false;
  const uint64_t caught = std::strtoull(status.c_str() + at + 8, nullptr, 16);
  return (caught >> (signal - 1)) & 1;
}

struct Msb {
  TempDir home;
  // Added to the environment of every msb command this runs (and so of the VMMs they start).
  std::map<std::string, std::string> env;
  Msb() { skip_without_kvm("sandboxes need KVM"); }
  ~Msb() {
    // Leave no VMM process behind, whatever a failed check skipped.
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(home / "sandboxes", ec)) {
      std::string name = entry.path().filename().string();
      if (!name.starts_with(".")) run_process({MSB_BINARY, "rm", "--force", "--quiet", name});
    }
  }
  std::map<std::string, std::string> environment() const {
    std::map<std::string, std::string> out = env;
    out["MSB_HOME"] = home.path().string();
    return out;
  }
  ProcessResult run_process(std::vector<std::string> args, const std::string& input = "") {
    return msb::test::run_process(args, environment(), input);
  }
  ProcessResult operator()(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), MSB_BINARY);
    return run_process(args, input);
  }
  // `msb exec SANDBOX ARGS...`, which must succeed; its output.
  std::string exec_in(const std::string& sandbox, std::vector<std::string> args,
                      const std::string& input = "") {
    args.insert(args.begin(), {"exec", sandbox, "--"});
    ProcessResult r = (*this)(args, input);
    INFO("msb exec " << sandbox << " " << args[3] << ": exit " << r.exit_code
                     << ", stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    REQUIRE(r.err.empty());
    return r.out;
  }
  std::string exec(std::vector<std::string> args, const std::string& input = "") {
    return exec_in("box", std::move(args), input);
  }
  nlohmann::json ls() {
    ProcessResult r = (*this)({"ls", "--json"});
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.out);
  }
  std::filesystem::path dir(const std::string& name) { return home / "sandboxes" / name; }

  // The VMM's own view of sandbox `name` through its control socket (op "status": ready, paused,
  // running and queued execs, max_concurrent...). Fails the test if the VMM does not answer
  // within a minute.
  nlohmann::json vmm_status(const std::string& name) { return vmm_status_at(dir(name)); }
  static nlohmann::json vmm_status_at(const std::filesystem::path& sandbox_dir) {
    // Through the folder's descriptor: a socket path may be longer than sun_path holds.
    const int folder = ::open(sandbox_dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    REQUIRE(folder >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof address.sun_path, "/proc/self/fd/%d/control.sock",
                  folder);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const bool connected =
        fd >= 0 && ::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
    const int error = errno;
    ::close(folder);
    if (!connected && fd >= 0) ::close(fd);
    INFO("connect to " << (sandbox_dir / "control.sock") << ": " << std::strerror(error));
    REQUIRE(connected);
    const std::string request = R"({"op":"status"})";
    agent::FrameHeader header{static_cast<uint32_t>(request.size()), core::control::kRequest, 0, 0};
    std::string frame(reinterpret_cast<const char*>(&header), sizeof header);
    frame += request;
    REQUIRE(::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL) == ssize_t(frame.size()));
    std::string in;
    auto complete = [&] {
      if (in.size() < sizeof header) return false;
      std::memcpy(&header, in.data(), sizeof header);
      return in.size() >= sizeof header + header.length;
    };
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!complete() && std::chrono::steady_clock::now() < deadline) {
      pollfd readable{fd, POLLIN, 0};
      if (::poll(&readable, 1, 1000) <= 0) continue;
      char buf[4096];
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      in.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    INFO("status answer: " << in.size() << " bytes");
    REQUIRE(complete());
    REQUIRE(header.type == core::control::kResponse);
    return nlohmann::json::parse(in.substr(sizeof header, header.length));
  }
};

// A FIFO for a command's stdin, held open by the test for writing (and reading, so that opening
// it never blocks): the command waits for more input until close().
class InputFifo {
 public:
  InputFifo() {
    REQUIRE(::mkfifo(path().c_str(), 0600) == 0);
    fd_ = ::open(path().c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd_ >= 0);
  }
  ~InputFifo() { close(); }
  InputFifo(const InputFifo&) = delete;
  InputFifo& operator=(const InputFifo&) = delete;

  std::string path() const { return (dir_ / "input").string(); }
  // At most 4 KiB, which any pipe holds whether or not the command reads it yet.
  void write(const std::string& bytes) {
    REQUIRE(bytes.size() <= 4096);
    REQUIRE(::write(fd_, bytes.data(), bytes.size()) == ssize_t(bytes.size()));
  }
  // The end of the command's input, once it has read what was written.
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  TempDir dir_;
  int fd_ = -1;
};

// An msb command in the background, its stdin from `input` (a FIFO the test holds open keeps it
// waiting for more), its stdout and stderr in files of its own (stdout to /dev/null with
// `discard_stdout`). Killed (SIGKILL, which also ends a process stopped by a test hook) and reaped
// on destruction if it still runs, so that no test leaves one behind whatever check failed.
class Background {
 public:
  Background(Msb& msb, std::vector<std::string> args, const std::string& input = "/dev/null",
             bool discard_stdout = false) {
    args.insert(args.begin(), MSB_BINARY);
    std::vector<std::string> envs;
    const auto extra = msb.environment();
    for (char** e = environ; *e; ++e) {
      const std::string entry = *e;
      if (!extra.count(entry.substr(0, entry.find('=')))) envs.push_back(entry);
    }
    for (const auto& [key, value] : extra)
      envs.push_back(key + "=" + value);
    auto c_strings = [](std::vector<std::string>& strings) {
      std::vector<char*> out;
      for (auto& s : strings)
        out.push_back(s.data());
      out.push_back(nullptr);
      return out;
    };
    auto c_args = c_strings(args), c_envs = c_strings(envs);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    const std::string out = discard_stdout ? "/dev/null" : (files_ / "stdout").string();
    posix_spawn_file_actions_addopen(&actions, 0, input.c_str(), O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&actions, 2, (files_ / "stderr").c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int rc = ::posix_spawn(&pid_, c_args[0], &actions, nullptr, c_args.data(), c_envs.data());
    posix_spawn_file_actions_destroy(&actions);
    INFO("posix_spawn " << MSB_BINARY << ": " << std::strerror(rc));
    REQUIRE(rc == 0);
  }
  ~Background() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;

  int pid() const { return pid_; }
  // Whether it has exited (reaping it), without waiting. A stopped process has not.
  bool exited() {
    if (exited_) return true;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) != pid_) return false;
    record(status);
    return true;
  }
  // Waits for it to exit (a command that runs past `limit` is killed and fails the test); its exit
  // code (128+N after signal N) and output.
  ProcessResult wait(std::chrono::seconds limit = std::chrono::seconds(300)) {
    if (!eventually([&] { return exited(); }, limit)) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      exited_ = true;
      FAIL("msb (pid " << pid_ << ") still ran after " << limit.count() << " s; killed it");
    }
    return result();
  }
  // Its exit code and output so far (the exit code is -1 while it runs).
  ProcessResult result() const {
    ProcessResult r;
    r.exit_code = exited_ ? exit_code_ : -1;
    r.out = read_text(files_ / "stdout");
    r.err = read_text(files_ / "stderr");
    return r;
  }

 private:
  void record(int status) {
    exited_ = true;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  TempDir files_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

inline void require_ok(const ProcessResult& r) {
  INFO("exit " << r.exit_code << ", stdout: " << r.out << ", stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
}

// Errors are one line, "msb: error: ...", naming what was wrong.
inline void require_error(const ProcessResult& r, const std::string& needle) {
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.err, Catch::StartsWith("msb: error: ") && Catch::Contains(needle));
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

// What the test guest prints for a checksum: 16 hex digits and a newline.
inline std::string checksum_line(uint64_t seed, uint64_t mib) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016" PRIx64 "\n", pattern::pattern_checksum(seed, mib << 17));
  return buf;
}

// Where two byte strings first differ (Catch would print megabytes for a plain ==), or -1.
inline long first_difference(const std::string& a, const std::string& b) {
  auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return ia == a.end() && ib == b.end() ? -1 : long(ia - a.begin());
}

// `msb snapshot create ARGS --json`, which must succeed: its JSON.
inline nlohmann::json snapshot_create(Msb& msb, std::vector<std::string> args) {
  args.insert(args.begin(), {"snapshot", "create"});
  args.push_back("--json");
  ProcessResult r = msb(args);
  require_ok(r);
  return nlohmann::json::parse(r.out);
}

// The handle of `msb snapshot create ARGS`, which must succeed.
inline std::string handle_of(Msb& msb, std::vector<std::string> args) {
  return snapshot_create(msb, std::move(args)).at("handle").get<std::string>();
}

// The sandbox's entry in msb ls --json, which must be there.
inline nlohmann::json entry_of(Msb& msb, const std::string& name) {
  for (const auto& box : msb.ls())
    if (box.at("name") == name) return box;
  FAIL("no sandbox " << name << " in msb ls");
  return {};
}

// A balloon as msb ls --json shows it.
inline nlohmann::json balloon(uint64_t ram_mib, uint64_t target_mib, uint64_t actual_mib) {
  return {{"ram_mib", ram_mib}, {"target_mib", target_mib}, {"actual_mib", actual_mib}};
}

// The sandbox's balloon in msb ls --json (the machine's target and what the guest's driver says
// it holds) once the driver holds the target: a guest may answer before its balloon is done,
// and ls may miss a VMM busy for a moment. `limit` only catches a hang.
inline nlohmann::json settled_balloon(Msb& msb, const std::string& name,
                                      std::chrono::seconds limit = std::chrono::minutes(3)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    nlohmann::json box = entry_of(msb, name);
    const nlohmann::json& balloon = box.at("balloon");
    if (balloon.is_object() && balloon.at("actual_mib") == balloon.at("target_mib")) return balloon;
    INFO("msb ls: " << box.dump());
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// VmRSS of the sandbox's VMM process (its pid from msb ls), in MiB.
inline uint64_t vmm_rss_mib(Msb& msb, const std::string& name) {
  const nlohmann::json box = entry_of(msb, name);
  REQUIRE(box.at("pid").is_number());
  const std::string status =
      read_text("/proc/" + std::to_string(box.at("pid").get<int>()) + "/status");
  const size_t at = status.find("\nVmRSS:");
  if (at == std::string::npos) FAIL("no VmRSS for the VMM of " << name);
  return std::stoull(status.substr(at + 7)) / 1024;
}

}  // namespace msb::test
