// The byte-level framing shared by the agent protocol (guest/protocol/agent_protocol.h: the VMM
// process <-> the guest's agent) and msb's control protocol (msb <-> a sandbox's VMM process, see
// docs/sandboxes.md): a 12-byte FrameHeader, then up to kMaxPayload payload bytes.
//
// Payloads from a guest are untrusted: every parser here checks lengths and returns nullopt (or
// marks the stream broken) instead of reading past what arrived.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "guest/protocol/agent_protocol.h"

namespace msb::core {

struct Frame {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint32_t id = 0;
  std::string payload;
};

// Appends one frame to `out`. `payload` must be at most agent::kMaxPayload bytes.
void append_frame(std::string& out, uint16_t type, uint32_t id, std::string_view payload,
                  uint16_t flags = 0);

// Splits a byte stream into frames as bytes arrive. A header announcing more than
// agent::kMaxPayload bytes breaks the stream for good: nothing after it can be trusted to be a
// frame boundary.
class FrameParser {
 public:
  void feed(std::string_view bytes) { buffer_.append(bytes); }
  // The next complete frame, or nullopt if none has fully arrived (or the stream is broken).
  std::optional<Frame> next();
  bool broken() const { return broken_; }
  // Bytes received but not yet returned as frames.
  size_t buffered() const { return buffer_.size() - consumed_; }

 private:
  std::string buffer_;
  size_t consumed_ = 0;
  bool broken_ = false;
};

// What a kExec frame asks for.
struct ExecRequest {
  std::vector<std::string> argv;
  std::vector<std::string> env;  // "K=V"
  std::string workdir;           // "" for the agent's default
  uint32_t timeout_ms = 0;       // 0: none
  std::string user;              // "" for the agent's default (NAME, UID, NAME:GROUP, UID:GID)
};

std::string encode_exec(const ExecRequest& request);
// nullopt if the payload is malformed (short, argc 0, a string without its NUL, bytes left over,
// unknown flags).
std::optional<ExecRequest> decode_exec(std::string_view payload);

std::string encode_ready(uint32_t max_concurrent);
std::optional<agent::ReadyPayload> decode_ready(std::string_view payload);

std::string encode_exit(int32_t code, int32_t signal);
std::optional<agent::ExitPayload> decode_exit(std::string_view payload);

std::string encode_signal(int32_t signal);
std::optional<int32_t> decode_signal(std::string_view payload);

std::string encode_set_env(const std::vector<std::string>& env);
std::optional<std::vector<std::string>> decode_set_env(std::string_view payload);

}  // namespace msb::core
