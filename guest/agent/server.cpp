#include "guest/agent/server.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "guest/agent/exec.h"
#include "guest/agent/log.h"
#include "guest/agent/restore.h"
#include "guest/agent/shutdown.h"

namespace msb::agent {
namespace {

constexpr size_t kReadSize = kMaxPayload;
// The port's output queue beyond which commands' output is not read (the host is not draining).
constexpr size_t kOutputLimit = 256 * 1024;
// A command's input queue beyond which the port is not read (the command is not reading).
constexpr size_t kInputLimit = 1024 * 1024;

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

Server::Server(int port, bool pid1) : port_(port), pid1_(pid1) {
  ::fcntl(port_, F_SETFL, ::fcntl(port_, F_GETFL) | O_NONBLOCK);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &chld, nullptr);
  sigchld_fd_ = ::signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sigchld_fd_ < 0) log_errno("signalfd");
  ::signal(SIGPIPE, SIG_IGN);
}

void Server::send(uint16_t type, uint32_t id, std::string_view payload) {
  core::append_frame(out_, type, id, payload);
}

bool Server::output_backlog() const {
  return out_.size() - out_head_ >= kOutputLimit;
}

bool Server::input_backlog() const {
  for (const auto& [id, exec] : execs_)
    if (exec.stdin_queue.size() >= kInputLimit) return true;
  return false;
}

void Server::run() {
  std::string ready = core::encode_ready(kMaxConcurrent);
  ready.append("msb-agent").push_back('\0');
  send(kReady, 0, ready);
  std::vector<pollfd> fds;
  // What each pollfd after the first two is: the exec's id and which of its descriptors.
  std::vector<std::pair<uint32_t, int>> owners;
  while (!stopping_) {
    fds.clear();
    owners.clear();
    short port_events = 0;
    if (!input_backlog()) port_events |= POLLIN;
    if (out_head_ < out_.size()) port_events |= POLLOUT;
    fds.push_back({port_, port_events, 0});
    fds.push_back({sigchld_fd_, POLLIN, 0});
    const bool backlog = output_backlog();
    for (auto& [id, exec] : execs_) {
      if (!backlog) {
        for (int which : {1, 2}) {
          int fd = which == 1 ? exec.stdout_fd : exec.stderr_fd;
          if (fd < 0) continue;
          fds.push_back({fd, POLLIN, 0});
          owners.emplace_back(id, which);
        }
      }
      if (exec.stdin_fd >= 0 && (!exec.stdin_queue.empty() || exec.stdin_eof)) {
        fds.push_back({exec.stdin_fd, POLLOUT, 0});
        owners.emplace_back(id, 0);
      }
    }
    int timeout_ms = -1;
    auto now = Clock::now();
    for (const auto& [id, exec] : execs_) {
      if (!exec.deadline || exec.exited) continue;
      auto left = std::chrono::ceil<std::chrono::milliseconds>(*exec.deadline - now).count();
      left = std::max<long long>(left, 0);
      if (timeout_ms < 0 || left < timeout_ms) timeout_ms = static_cast<int>(left);
    }
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) {
      if (errno == EINTR) continue;
      log_errno("poll");
      ::sleep(1);
      continue;
    }
    if (fds[1].revents) reap();
    for (size_t i = 2; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      auto it = execs_.find(owners[i - 2].first);
      if (it == execs_.end()) continue;
      Exec& exec = it->second;
      switch (owners[i - 2].second) {
        case 0:
          write_stdin(exec);
          break;
        case 1:
          read_output(exec, exec.stdout_fd, kStdout);
          break;
        case 2:
          read_output(exec, exec.stderr_fd, kStderr);
          break;
      }
    }
    if (fds[0].revents & POLLOUT) write_port();
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) read_port();
    check_deadlines();
    finish_done();
    if (out_head_ < out_.size()) write_port();
  }
}

void Server::write_port() {
  while (out_head_ < out_.size()) {
    ssize_t n = ::write(port_, out_.data() + out_head_, out_.size() - out_head_);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n < 0 && errno != EAGAIN) log_errno("writing the agent port");
      break;
    }
    out_head_ += static_cast<size_t>(n);
  }
  if (out_head_ == out_.size()) {
    out_.clear();
    out_head_ = 0;
  } else if (out_head_ > kOutputLimit) {
    out_.erase(0, out_head_);
    out_head_ = 0;
  }
}

void Server::read_port() {
  char buf[kReadSize];
  ssize_t n = ::read(port_, buf, sizeof buf);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    // A port without a host behind it: nothing to do but wait for one.
    if (n < 0) log_errno("reading the agent port");
    ::usleep(100'000);
    return;
  }
  if (in_.broken()) return;
  in_.feed(std::string_view(buf, static_cast<size_t>(n)));
  while (!stopping_) {
    auto frame = in_.next();
    if (!frame) break;
    handle_frame(std::move(*frame));
  }
  if (in_.broken()) {
    // Nothing after an oversized header can be trusted to be a frame boundary, and running
    // whatever it would parse as is worse than hearing nothing more: the port is read and
    // dropped from now on.
    log_line("a frame from the host is longer than the protocol allows; ignoring the host");
  }
}

void Server::handle_frame(core::Frame frame) {
  switch (frame.type) {
    case kExec:
      handle_exec(frame.id, frame.payload);
      return;
    case kStdin: {
      auto it = execs_.find(frame.id);
      if (it != execs_.end()) handle_stdin(it->second, frame.payload);
      return;
    }
    case kSignal: {
      auto signal = core::decode_signal(frame.payload);
      auto it = execs_.find(frame.id);
      if (!signal || *signal <= 0 || *signal >= NSIG) {
        log_line("ignoring a malformed signal frame");
        return;
      }
      if (it == execs_.end() || it->second.exited) return;
      if (::kill(-it->second.pid, *signal) != 0) ::kill(it->second.pid, *signal);
      return;
    }
    case kSetEnv: {
      auto env = core::decode_set_env(frame.payload);
      if (!env) {
        log_line("ignoring a malformed environment frame");
        return;
      }
      sandbox_env_ = std::move(*env);
      return;
    }
    case kRestore: {
      auto request = decode_restore(frame.payload);
      if (!request) {
        log_line("ignoring a malformed restore frame");
        return;
      }
      apply_restore(*request);
      std::string ready = core::encode_ready(kMaxConcurrent);
      ready.append("msb-agent").push_back('\0');
      send(kReady, 0, ready);
      return;
    }
    case kPowerOff:
      power_off();
      return;
    default:
      return;  // unknown frames are skipped by their length
  }
}

void Server::handle_exec(uint32_t id, const std::string& payload) {
  auto refuse = [&](const std::string& why) {
    std::string message = "msb-agent: " + why + "\n";
    send(kStderr, id, message.substr(0, kMaxPayload));
    send(kExit, id, core::encode_exit(126, 0));
  };
  if (id == 0 || execs_.count(id)) {
    log_line("ignoring an exec with id " + std::to_string(id) + (id ? " (in use)" : ""));
    return;
  }
  auto request = core::decode_exec(payload);
  if (!request) {
    log_line("malformed exec request " + std::to_string(id));
    return refuse("malformed exec request");
  }
  if (execs_.size() >= kMaxConcurrent) {
    return refuse("more than " + std::to_string(kMaxConcurrent) + " commands at once");
  }
  Process process;
  StartError error;
  if (!start_process(*request, sandbox_env_, process, error)) {
    std::string message = "msb-agent: " + error.message + "\n";
    send(kStderr, id, message.substr(0, kMaxPayload));
    send(kExit, id, core::encode_exit(error.code, 0));
    return;
  }
  Exec& exec = execs_[id];
  exec.id = id;
  exec.pid = process.pid;
  exec.stdin_fd = process.stdin_fd;
  exec.stdout_fd = process.stdout_fd;
  exec.stderr_fd = process.stderr_fd;
  if (request->timeout_ms)
    exec.deadline = Clock::now() + std::chrono::milliseconds(request->timeout_ms);
}

void Server::handle_stdin(Exec& exec, const std::string& data) {
  if (exec.stdin_eof) return;
  if (data.empty()) {
    exec.stdin_eof = true;
  } else if (exec.stdin_fd >= 0) {
    exec.stdin_queue += data;
  }
  write_stdin(exec);
}

void Server::write_stdin(Exec& exec) {
  while (exec.stdin_fd >= 0 && !exec.stdin_queue.empty()) {
    ssize_t n = ::write(exec.stdin_fd, exec.stdin_queue.data(), exec.stdin_queue.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      // The command closed its input (EPIPE): what is left has nowhere to go.
      exec.stdin_queue.clear();
      close_fd(exec.stdin_fd);
      return;
    }
    exec.stdin_queue.erase(0, static_cast<size_t>(n));
  }
  if (exec.stdin_eof && exec.stdin_queue.empty()) close_fd(exec.stdin_fd);
}

void Server::read_output(Exec& exec, int& fd, uint16_t type) {
  if (fd < 0) return;
  char buf[kReadSize];
  ssize_t n = ::read(fd, buf, sizeof buf);
  if (n < 0 && errno == EINTR) return;
  if (n > 0) {
    send(type, exec.id, std::string_view(buf, static_cast<size_t>(n)));
    return;
  }
  // The end, an error, or (once the command exited) nothing more buffered: what a command's
  // background children write after it exited is not its output.
  if (n == 0 || errno != EAGAIN || exec.exited) close_fd(fd);
}

void Server::reap() {
  signalfd_siginfo info;
  while (::read(sigchld_fd_, &info, sizeof info) == sizeof info) {
  }
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    for (auto& [id, exec] : execs_) {
      if (exec.pid == pid && !exec.exited) {
        exec.exited = true;
        exec.status = status;
      }
    }
  }
}

void Server::check_deadlines() {
  auto now = Clock::now();
  for (auto& [id, exec] : execs_) {
    if (exec.exited || !exec.deadline || now < *exec.deadline) continue;
    exec.deadline.reset();
    ::kill(-exec.pid, SIGKILL);
    ::kill(exec.pid, SIGKILL);
  }
}

void Server::finish_done() {
  for (auto it = execs_.begin(); it != execs_.end();) {
    Exec& exec = it->second;
    if (exec.exited && !output_backlog()) {
      // Everything it wrote before it exited is in the pipes: take it now.
      while (exec.stdout_fd >= 0 && !output_backlog())
        read_output(exec, exec.stdout_fd, kStdout);
      while (exec.stderr_fd >= 0 && !output_backlog())
        read_output(exec, exec.stderr_fd, kStderr);
    }
    if (!exec.exited || exec.stdout_fd >= 0 || exec.stderr_fd >= 0) {
      ++it;
      continue;
    }
    close_fd(exec.stdin_fd);
    if (WIFSIGNALED(exec.status)) {
      send(kExit, exec.id, core::encode_exit(-1, WTERMSIG(exec.status)));
    } else {
      send(kExit, exec.id, core::encode_exit(WEXITSTATUS(exec.status), 0));
    }
    it = execs_.erase(it);
  }
}

void Server::power_off() {
  stopping_ = true;
  // Whatever is queued for the host goes first, briefly: the host asked for this.
  for (int tries = 0; out_head_ < out_.size() && tries < 20; ++tries) {
    pollfd pfd{port_, POLLOUT, 0};
    ::poll(&pfd, 1, 50);
    write_port();
  }
  for (auto& [id, exec] : execs_) {
    for (int* fd : {&exec.stdin_fd, &exec.stdout_fd, &exec.stderr_fd})
      close_fd(*fd);
  }
  execs_.clear();
  if (pid1_) shutdown_machine();
}

}  // namespace msb::agent
