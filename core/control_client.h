// The msb side of the control protocol (core/control_protocol.h): connecting to a sandbox's
// control socket, requests and the exec stream.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/frames.h"
#include "core/sandbox.h"
#include "snapstore/file_util.h"

namespace msb::core {

// Connects to `socket_path`; an empty fd (errno set) if nothing listens there.
snapstore::UniqueFd connect_unix(const std::filesystem::path& socket_path);
// Binds and listens on `socket_path` (relative paths are fine); throws SandboxError.
snapstore::UniqueFd listen_unix(const std::filesystem::path& socket_path);

// A connection to one sandbox's VMM process.
class ControlConnection {
 public:
  explicit ControlConnection(snapstore::UniqueFd fd) : fd_(std::move(fd)) {}
  int fd() const { return fd_.get(); }
  void send_request(const nlohmann::json& request);
  // The next frame, or nullopt at the end of the stream or when `deadline` passes (then
  // `timed_out` is set).
  std::optional<Frame> read_frame(std::optional<std::chrono::steady_clock::time_point> deadline,
                                  bool* timed_out = nullptr);
  // Runs an exec: streams stdin from io.stdin_fd and output to the callbacks. nullopt if the
  // stream ended without an exit (the VMM stopped); throws SandboxError on an error response.
  std::optional<ExecResult> exec(const ExecOptions& options, const ExecIo& io);

 private:
  snapstore::UniqueFd fd_;
  FrameParser in_;
};

}  // namespace msb::core
