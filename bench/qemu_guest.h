// Driving a guest that speaks msb's agent protocol over a stream socket, and QEMU as a child
// process: shared by msb-bench-vmm (cold boots) and msb-bench-snapshot (migration to a file and
// back). The benchmark owns one end of a socketpair; the other is msb's `agent_fd`, or QEMU's
// `-chardev socket,fd=3` behind a `virtconsole`. QEMU's monitor is a QMP socketpair on its fd 4.

#ifndef MSB_BENCH_QEMU_GUEST_H_
#define MSB_BENCH_QEMU_GUEST_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bench/bench_util.h"
#include "guest/protocol/agent_protocol.h"
#include "guest/protocol/pattern.h"

namespace msb::bench {

// A descriptor closed at the end of its scope.
struct ScopedFd {
  int fd;
  explicit ScopedFd(int descriptor) : fd(descriptor) {}
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

// --- The agent channel: a stream socket carrying agent frames ---------------------------------

struct Frame {
  agent::FrameHeader header{};
  std::string payload;
};

class AgentChannel {
 public:
  explicit AgentChannel(int fd) : fd_(fd) {}
  AgentChannel(const AgentChannel&) = delete;
  AgentChannel& operator=(const AgentChannel&) = delete;
  ~AgentChannel() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }

  // The next frame, waiting until `deadline` (wall_seconds() time). A header over kMaxPayload
  // breaks the stream: the bench reports it rather than guessing where the next frame starts.
  Frame read(double deadline, const std::string& what) {
    Frame frame;
    while (!take_buffered(frame, what))
      fill(deadline, what);
    return frame;
  }

  // A frame already received, if a whole one is buffered.
  bool take_buffered(Frame& frame, const std::string& what) {
    size_t have = buffer_.size() - pos_;
    if (have >= sizeof(agent::FrameHeader)) {
      std::memcpy(&frame.header, buffer_.data() + pos_, sizeof frame.header);
      if (frame.header.length > agent::kMaxPayload)
        throw BenchError(strf("%s: a frame announces %u bytes, over the protocol's maximum",
                              what.c_str(), frame.header.length));
      if (have >= sizeof frame.header + frame.header.length) {
        frame.payload.assign(buffer_.data() + pos_ + sizeof frame.header, frame.header.length);
        pos_ += sizeof frame.header + frame.header.length;
        return true;
      }
    }
    if (pos_ > 0 && pos_ == buffer_.size()) {
      buffer_.clear();
      pos_ = 0;
    } else if (pos_ > (1u << 20)) {
      buffer_.erase(0, pos_);
      pos_ = 0;
    }
    return false;
  }

  // Reads what the socket has now (at least one byte), without waiting.
  void read_available(const std::string& what) {
    char chunk[256 * 1024];
    ssize_t n = ::recv(fd_, chunk, sizeof chunk, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (n < 0) fail_errno(what + ": cannot read the agent channel");
    if (n == 0) throw BenchError(what + ": the agent channel closed");
    buffer_.append(chunk, static_cast<size_t>(n));
  }

  static std::string frame_bytes(uint16_t type, uint32_t id, std::string_view payload) {
    agent::FrameHeader header{static_cast<uint32_t>(payload.size()), type, 0, id};
    std::string bytes(reinterpret_cast<const char*>(&header), sizeof header);
    bytes += payload;
    return bytes;
  }

  void write(uint16_t type, uint32_t id, std::string_view payload, const std::string& what) {
    std::string bytes = frame_bytes(type, id, payload);
    const char* p = bytes.data();
    size_t left = bytes.size();
    while (left > 0) {
      ssize_t n = ::send(fd_, p, left, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail_errno(what + ": cannot write to the agent channel");
      p += n;
      left -= static_cast<size_t>(n);
    }
  }

 private:
  void fill(double deadline, const std::string& what) {
    for (;;) {
      if (interrupted()) throw BenchError(what + ": interrupted");
      double left_s = deadline - wall_seconds();
      if (left_s <= 0) throw BenchError(what + ": timed out waiting for the guest");
      // Short waits, so that an interrupt (SIGINT) is seen.
      int wait_ms = static_cast<int>(std::clamp(left_s * 1e3, 1.0, 200.0));
      pollfd readable{fd_, POLLIN, 0};
      int ready = ::poll(&readable, 1, wait_ms);
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) fail_errno(what + ": poll");
      if (ready == 0) continue;
      size_t before = buffer_.size();
      read_available(what);
      if (buffer_.size() > before) return;
    }
  }

  int fd_;
  std::string buffer_;
  size_t pos_ = 0;
};

struct ExecResult {
  int32_t code = 0;
  int32_t signal = 0;
  uint64_t stdout_bytes = 0;
  uint64_t stdout_checksum = msb::pattern::kChecksumInit;  // FNV-1a over 64-bit words
  std::string stdout_text;                                 // the first 4 KiB only
  std::string stderr_text;
  double seconds = 0;
};

// Runs one command over the agent protocol, from sending kExec to receiving kExit. With `input`,
// it is sent as the command's stdin (kStdin frames, then the empty one), interleaved with reading
// what the guest answers; otherwise the command gets no kStdin at all.
inline ExecResult run_exec(AgentChannel& channel, uint32_t id, const std::vector<std::string>& argv,
                           double timeout_s, const std::string& what,
                           const std::span<const std::byte>* input = nullptr) {
  agent::ExecPayload exec{static_cast<uint32_t>(argv.size()), 0, 0, 0};
  std::string payload(reinterpret_cast<const char*>(&exec), sizeof exec);
  for (const auto& arg : argv)
    payload.append(arg).push_back('\0');
  payload.push_back('\0');  // the working directory: the agent's default
  ExecResult result;
  std::string word_carry;  // stdout bytes not yet making a whole 64-bit word
  double start = wall_seconds();
  double deadline = start + timeout_s;
  channel.write(agent::kExec, id, payload, what);

  // The stdin still to send: `pending` is the current frame's bytes not yet written.
  size_t input_pos = 0;
  bool input_done = input == nullptr;
  std::string pending;
  size_t pending_pos = 0;
  auto next_input_frame = [&] {
    size_t n = std::min<size_t>(agent::kMaxPayload, input->size() - input_pos);
    std::string_view data(reinterpret_cast<const char*>(input->data()) + input_pos, n);
    pending = AgentChannel::frame_bytes(agent::kStdin, id, data);
    pending_pos = 0;
    input_pos += n;
    if (n == 0) input_done = true;  // the empty frame: end of input
  };
  if (!input_done) next_input_frame();

  for (;;) {
    Frame frame;
    if (!channel.take_buffered(frame, what)) {
      if (pending_pos == pending.size()) {
        frame = channel.read(deadline, what);
      } else {
        if (interrupted()) throw BenchError(what + ": interrupted");
        if (wall_seconds() > deadline) throw BenchError(what + ": timed out");
        pollfd p{channel.fd(), POLLIN | POLLOUT, 0};
        int ready = ::poll(&p, 1, 200);
        if (ready < 0 && errno != EINTR) fail_errno(what + ": poll");
        if (ready <= 0) continue;
        if (p.revents & POLLIN) channel.read_available(what);
        if (p.revents & (POLLOUT | POLLERR | POLLHUP)) {
          ssize_t n = ::send(channel.fd(), pending.data() + pending_pos,
                             pending.size() - pending_pos, MSG_NOSIGNAL | MSG_DONTWAIT);
          if (n < 0 && errno != EINTR && errno != EAGAIN)
            fail_errno(what + ": cannot write stdin to the agent channel");
          if (n > 0) pending_pos += static_cast<size_t>(n);
          if (pending_pos == pending.size() && !input_done) next_input_frame();
        }
        continue;
      }
    }
    if (frame.header.id != id)
      throw BenchError(strf("%s: a frame of type %u for id %u while waiting for id %u",
                            what.c_str(), frame.header.type, frame.header.id, id));
    if (frame.header.type == agent::kStdout) {
      result.stdout_bytes += frame.payload.size();
      if (result.stdout_text.size() < 4096)
        result.stdout_text.append(frame.payload, 0, 4096 - result.stdout_text.size());
      std::string_view bytes = frame.payload;
      if (!word_carry.empty()) {
        size_t take = std::min(bytes.size(), 8 - word_carry.size());
        word_carry.append(bytes.substr(0, take));
        bytes.remove_prefix(take);
        if (word_carry.size() == 8) {
          uint64_t word;
          std::memcpy(&word, word_carry.data(), 8);
          result.stdout_checksum = msb::pattern::checksum_update(result.stdout_checksum, word);
          word_carry.clear();
        }
      }
      while (bytes.size() >= 8) {
        uint64_t word;
        std::memcpy(&word, bytes.data(), 8);
        result.stdout_checksum = msb::pattern::checksum_update(result.stdout_checksum, word);
        bytes.remove_prefix(8);
      }
      word_carry.append(bytes);
    } else if (frame.header.type == agent::kStderr) {
      result.stderr_text += frame.payload;
    } else if (frame.header.type == agent::kExit) {
      result.seconds = wall_seconds() - start;
      if (frame.payload.size() != sizeof(agent::ExitPayload))
        throw BenchError(what + ": a kExit frame of the wrong size");
      agent::ExitPayload status;
      std::memcpy(&status, frame.payload.data(), sizeof status);
      result.code = status.code;
      result.signal = status.signal;
      // A command that exited before reading all its stdin (a guest without it, exit 127): the
      // rest is not sent.
      return result;
    }
  }
}

inline void expect_ready(const Frame& frame, const std::string& what) {
  if (frame.header.type != agent::kReady || frame.payload.size() < sizeof(agent::ReadyPayload))
    throw BenchError(
        strf("%s: the first frame is of type %u, not kReady", what.c_str(), frame.header.type));
}

// --- QEMU as a child process ------------------------------------------------------------------

// QEMU (or any program) as a child process, given `fds[i]` as its file descriptor 3 + i, stdout
// and stderr into `log`, stdin from /dev/null. It is killed when this object goes and, through
// PR_SET_PDEATHSIG, when the benchmark dies, so none is ever left behind.
class QemuProcess {
 public:
  QemuProcess(std::vector<std::string> argv, const std::filesystem::path& log,
              std::vector<int> fds) {
    std::vector<char*> args;
    for (auto& a : argv)
      args.push_back(a.data());
    args.push_back(nullptr);
    int log_fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log_fd < 0) fail_errno("cannot create " + log.string());
    pid_t parent = ::getpid();
    const std::string cannot_run = "cannot run " + argv.front() + ": ";
    pid_ = ::fork();
    if (pid_ < 0) {
      ::close(log_fd);
      fail_errno("fork");
    }
    if (pid_ == 0) {
      // QEMU dies with this program, whatever the way it ends.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      int null_fd = ::open("/dev/null", O_RDONLY);
      ::dup2(null_fd, 0);
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
      // Out of the way of the targets 3, 4, ... first, then into place (dup2 clears CLOEXEC).
      int high = 100;
      for (int& fd : fds) {
        int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, high);
        fd = moved;
        high = moved + 1;
      }
      for (size_t i = 0; i < fds.size(); ++i)
        ::dup2(fds[i], 3 + static_cast<int>(i));
      ::execvp(args[0], args.data());
      const char* reason = std::strerror(errno);
      [[maybe_unused]] ssize_t ignored = ::write(2, cannot_run.data(), cannot_run.size());
      ignored = ::write(2, reason, std::strlen(reason));
      ::_exit(127);
    }
    ::close(log_fd);
  }
  QemuProcess(const QemuProcess&) = delete;
  QemuProcess& operator=(const QemuProcess&) = delete;
  ~QemuProcess() { kill(); }

  pid_t pid() const { return pid_; }

  // Whether it exited within `timeout_s`; reaped if so.
  bool wait_exit(double timeout_s) {
    double deadline = wall_seconds() + timeout_s;
    while (pid_ > 0) {
      int status = 0;
      pid_t got = ::waitpid(pid_, &status, WNOHANG);
      if (got == pid_ || (got < 0 && errno != EINTR)) {
        pid_ = -1;
        return true;
      }
      if (wall_seconds() > deadline) return false;
      ::usleep(200);
    }
    return true;
  }
  bool running() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) pid_ = -1;
    return pid_ > 0;
  }
  void kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
      pid_ = -1;
    }
  }

 private:
  pid_t pid_ = -1;
};

// The end of a (log) file as one line, for error messages and notes in a table.
inline std::string tail_of_file(const std::filesystem::path& path, size_t max_bytes = 600) {
  std::ifstream in(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.size() > max_bytes) text = "..." + text.substr(text.size() - max_bytes);
  std::replace(text.begin(), text.end(), '\n', '|');
  while (!text.empty() && (text.back() == '|' || text.back() == ' '))
    text.pop_back();
  return text;
}

// `qemu --version`'s first line.
inline std::string qemu_version(const std::string& qemu) {
  FILE* pipe = ::popen((qemu + " --version 2>&1").c_str(), "r");
  if (pipe == nullptr) return "unknown";
  char buf[256] = {};
  std::string first = std::fgets(buf, sizeof buf, pipe) != nullptr ? buf : "unknown";
  ::pclose(pipe);
  while (!first.empty() && first.back() == '\n')
    first.pop_back();
  return first;
}

// The arguments that boot msb's test guest under `qemu-system-x86_64 -M microvm` with the agent
// channel on fd 3 (`-chardev socket,fd=3` behind a virtconsole), as msb-bench-vmm measured it.
inline std::vector<std::string> qemu_testguest_args(const std::string& qemu, bool kvm,
                                                    uint64_t memory_mib,
                                                    const std::string& testguest,
                                                    const std::filesystem::path& serial_log) {
  std::vector<std::string> argv = {qemu, "-M", "microvm,acpi=off"};
  if (kvm) {
    argv.push_back("-enable-kvm");
  } else {
    argv.insert(argv.end(), {"-accel", "tcg"});
  }
  argv.insert(argv.end(), {"-m",
                           std::to_string(memory_mib),
                           "-smp",
                           "1",
                           "-nodefaults",
                           "-no-user-config",
                           "-nographic",
                           "-serial",
                           "file:" + serial_log.string(),
                           "-kernel",
                           testguest,
                           "-append",
                           "msb.cpus=1",
                           "-global",
                           "virtio-mmio.force-legacy=false",
                           "-device",
                           "virtio-serial-device",
                           "-chardev",
                           "socket,id=agent,fd=3",
                           "-device",
                           "virtconsole,chardev=agent",
                           "-no-reboot"});
  return argv;
}

// --- The machine ------------------------------------------------------------------------------

// "AMD EPYC ..., 2 CPUs, Linux 6.x; KVM is nested PVM ...": what a reader needs to weigh figures.
inline std::string machine_line() {
  std::string model = "unknown CPU";
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  bool vmx_or_svm = false;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0 && model == "unknown CPU") {
      auto colon = line.find(':');
      if (colon != std::string::npos && colon + 2 <= line.size()) model = line.substr(colon + 2);
    }
    if (line.rfind("flags", 0) == 0 &&
        (line.find(" vmx") != std::string::npos || line.find(" svm") != std::string::npos))
      vmx_or_svm = true;
  }
  utsname u{};
  ::uname(&u);
  // kvm_pvm is built into some kernels that are PVM guests themselves, which then offer no
  // /dev/kvm at all.
  std::string kvm = !std::filesystem::exists("/dev/kvm") ? "no /dev/kvm"
                    : std::filesystem::exists("/sys/module/kvm_pvm")
                        ? "KVM is nested PVM (kvm_pvm): guest CPL0 and real mode are emulated"
                        : (vmx_or_svm ? "KVM with VMX/SVM" : "KVM kind unknown");
  return strf("%s, %ld CPUs, Linux %s; %s", model.c_str(), ::sysconf(_SC_NPROCESSORS_ONLN),
              u.release, kvm.c_str());
}

}  // namespace msb::bench

#endif  // MSB_BENCH_QEMU_GUEST_H_
