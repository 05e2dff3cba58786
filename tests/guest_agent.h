// The host side of the agent protocol (guest/protocol/agent_protocol.h) for the vmm tier's tests,
// which drive the test guest over a socket pair: frames in and out, kReady, execs whose stdout
// they collect, kRestore; and MachineHost, a console log and agent socket pair wired into a
// vmm::MachineConfig.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "guest/protocol/agent_protocol.h"
#include "tests/support.h"
#include "vmm/machine.h"

namespace msb::test {

using RestoreEntropy = std::array<uint8_t, agent::kRestoreEntropyBytes>;

// The host end `fd` of a guest's agent channel (not owned). Every read waits at most
// `timeout_ms`, and a guest that sends nothing for that long, or ends the channel, fails the test.
class GuestAgent {
 public:
  explicit GuestAgent(int fd = -1) : fd(fd) {}

  int fd;
  int timeout_ms = 30'000;
  uint32_t next_id = 1;  // the id of the next exec
  // Where set, its text (the guest's console, say) goes with a failed check on the guest's
  // answers. Called for every frame, so only for tests that read the console anyway.
  std::function<std::string()> context;

  std::pair<agent::FrameHeader, std::string> read_frame() {
    agent::FrameHeader header{};
    read_exact(&header, sizeof header);
    REQUIRE(header.length <= agent::kMaxPayload);
    std::string payload(header.length, '\0');
    read_exact(payload.data(), payload.size());
    return {header, payload};
  }

  void write_frame(uint16_t type, uint32_t id, const std::string& payload) {
    agent::FrameHeader header{static_cast<uint32_t>(payload.size()), type, 0, id};
    std::string bytes(reinterpret_cast<const char*>(&header), sizeof header);
    bytes += payload;
    REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  }

  // Reads the guest's kReady (the next frame must be it) and returns its payload.
  agent::ReadyPayload wait_ready() {
    auto [header, payload] = read_frame();
    INFO("kReady" << where());
    REQUIRE(header.type == agent::kReady);
    REQUIRE(header.id == 0);
    REQUIRE(payload.size() >= sizeof(agent::ReadyPayload));
    agent::ReadyPayload ready;
    std::memcpy(&ready, payload.data(), sizeof ready);
    REQUIRE(ready.version == agent::kProtocolVersion);
    return ready;
  }

  // Sends kExec for `argv` (no extra environment, the default working directory) under the next
  // id, which it returns.
  uint32_t send_exec(const std::vector<std::string>& argv) {
    const uint32_t id = next_id++;
    agent::ExecPayload exec{static_cast<uint32_t>(argv.size()), 0, 0, 0};
    std::string payload(reinterpret_cast<const char*>(&exec), sizeof exec);
    for (const auto& arg : argv)
      payload.append(arg).push_back('\0');
    payload.push_back('\0');  // the working directory: the default
    write_frame(agent::kExec, id, payload);
    return id;
  }

  // Runs a command that must exit 0; returns its stdout.
  std::string run(const std::vector<std::string>& argv) {
    const uint32_t id = send_exec(argv);
    std::string out, err;
    for (;;) {
      auto [header, data] = read_frame();
      INFO("command " << argv[0] << "; frame type " << header.type << where());
      REQUIRE(header.id == id);
      if (header.type == agent::kStdout) out += data;
      if (header.type == agent::kStderr) err += data;
      if (header.type == agent::kExit) {
        INFO("stderr: " << err);
        REQUIRE(data.size() == sizeof(agent::ExitPayload));
        agent::ExitPayload status;
        std::memcpy(&status, data.data(), sizeof status);
        REQUIRE(status.code == 0);
        return out;
      }
    }
  }

  // Runs a command that must exit 0 and print one number and a newline; returns the number.
  uint64_t run_number(const std::vector<std::string>& argv) {
    const std::string out = run(argv);
    REQUIRE(!out.empty());
    REQUIRE(out.back() == '\n');
    return std::stoull(out);
  }

  // Sends kRestore (it does not wait for the kReady that answers it).
  void send_restore(uint32_t cpus, uint64_t memory_mib, const std::string& name,
                    const RestoreEntropy& entropy, uint64_t wall_clock_ns) {
    agent::RestorePayload restore{};
    restore.wall_clock_ns = wall_clock_ns;
    restore.memory_mib = memory_mib;
    restore.cpus = cpus;
    std::memcpy(restore.entropy, entropy.data(), entropy.size());
    std::string payload(reinterpret_cast<const char*>(&restore), sizeof restore);
    payload.append(name).push_back('\0');
    write_frame(agent::kRestore, 0, payload);
  }

  void power_off() { write_frame(agent::kPowerOff, 0, ""); }

 private:
  std::string where() const { return context ? "; console:\n" + context() : std::string(); }

  void read_exact(void* out, size_t size) {
    auto* bytes = static_cast<char*>(out);
    while (size > 0) {
      pollfd readable{fd, POLLIN, 0};
      if (::poll(&readable, 1, timeout_ms) != 1)
        FAIL("the guest sent nothing for " << timeout_ms / 1000 << " s" << where());
      ssize_t got = ::read(fd, bytes, size);
      if (got <= 0) FAIL("the agent channel ended");
      bytes += got;
      size -= static_cast<size_t>(got);
    }
  }
};

// The host side of a test machine: a console log at `log_path` and an agent socket pair, closed
// on destruction, a MachineConfig wired to them (the test guest for its kernel, its disk overlay
// at `overlay_path`), and the agent protocol on the host end. Declared before the machine, so
// that it outlives it.
class MachineHost : public GuestAgent {
 public:
  MachineHost(std::filesystem::path log_path, const std::filesystem::path& overlay_path)
      : log_path(std::move(log_path)) {
    log_ = ::open(this->log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    REQUIRE(log_ >= 0);
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_) == 0);
    fd = fds_[1];
    config.kernel_path = MSB_TESTGUEST;
    config.disk_overlay_path = overlay_path;
    config.console_log_fd = log_;
    config.agent_fd = fds_[0];
  }
  ~MachineHost() {
    for (int each : {log_, fds_[0], fds_[1]}) {
      if (each >= 0) ::close(each);
    }
  }
  MachineHost(const MachineHost&) = delete;
  MachineHost& operator=(const MachineHost&) = delete;

  std::string console() const { return read_text(log_path); }

  const std::filesystem::path log_path;
  vmm::MachineConfig config;

 private:
  int log_ = -1;
  int fds_[2] = {-1, -1};
};

}  // namespace msb::test
