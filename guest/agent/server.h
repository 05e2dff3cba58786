// The agent protocol's guest side (guest/protocol/agent_protocol.h) on the virtio-console port:
// one poll loop over the port, the commands' pipes and SIGCHLD.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/frames.h"

namespace msb::agent {

inline constexpr uint32_t kMaxConcurrent = 16;

class Server {
 public:
  // `port` is the open port (a tty in raw mode, or any stream); not owned. `pid1`: whether
  // kPowerOff powers the machine off (else the server just returns from run()).
  Server(int port, bool pid1);
  // Sends kReady and serves until kPowerOff.
  void run();

 private:
  using Clock = std::chrono::steady_clock;
  struct Exec {
    uint32_t id = 0;
    pid_t pid = -1;
    int stdin_fd = -1, stdout_fd = -1, stderr_fd = -1;
    std::string stdin_queue;
    bool stdin_eof = false;  // close stdin once the queue is written
    bool exited = false;
    int status = 0;
    std::optional<Clock::time_point> deadline;
  };

  void send(uint16_t type, uint32_t id, std::string_view payload);
  void read_port();
  void write_port();
  void handle_frame(core::Frame frame);
  void handle_exec(uint32_t id, const std::string& payload);
  void handle_stdin(Exec& exec, const std::string& data);
  void write_stdin(Exec& exec);
  // Reads what one of an exec's output pipes holds (one read); closes it at its end, or when the
  // command exited and nothing is left.
  void read_output(Exec& exec, int& fd, uint16_t type);
  void reap();
  void check_deadlines();
  void finish_done();
  bool output_backlog() const;
  bool input_backlog() const;
  void power_off();

  int port_;
  bool pid1_;
  int sigchld_fd_ = -1;
  core::FrameParser in_;
  std::string out_;
  size_t out_head_ = 0;  // bytes of out_ already written
  std::vector<std::string> sandbox_env_;
  std::map<uint32_t, Exec> execs_;
  bool stopping_ = false;
};

}  // namespace msb::agent
