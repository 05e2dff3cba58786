#include "core/frames.h"

#include <cstring>
#include <stdexcept>

namespace msb::core {
namespace {

void append_u32(std::string& out, uint32_t value) {
  char bytes[4];
  std::memcpy(bytes, &value, 4);  // x86-64 only: little-endian as the protocol says
  out.append(bytes, 4);
}

void append_string(std::string& out, const std::string& s) {
  out.append(s);
  out.push_back('\0');
}

// Reads little-endian integers and NUL-terminated strings from a payload, never past its end.
class PayloadReader {
 public:
  explicit PayloadReader(std::string_view payload) : rest_(payload) {}
  bool u32(uint32_t& value) {
    if (rest_.size() < 4) return false;
    std::memcpy(&value, rest_.data(), 4);
    rest_.remove_prefix(4);
    return true;
  }
  bool string(std::string& value) {
    size_t nul = rest_.find('\0');
    if (nul == std::string_view::npos) return false;
    value.assign(rest_.substr(0, nul));
    rest_.remove_prefix(nul + 1);
    return true;
  }
  bool done() const { return rest_.empty(); }

 private:
  std::string_view rest_;
};

}  // namespace

void append_frame(std::string& out, uint16_t type, uint32_t id, std::string_view payload,
                  uint16_t flags) {
  if (payload.size() > agent::kMaxPayload) {
    throw std::logic_error("frame payload of " + std::to_string(payload.size()) + " bytes");
  }
  agent::FrameHeader header{static_cast<uint32_t>(payload.size()), type, flags, id};
  out.append(reinterpret_cast<const char*>(&header), sizeof header);
  out.append(payload);
}

std::optional<Frame> FrameParser::next() {
  if (broken_ || buffered() < sizeof(agent::FrameHeader)) return std::nullopt;
  agent::FrameHeader header;
  std::memcpy(&header, buffer_.data() + consumed_, sizeof header);
  if (header.length > agent::kMaxPayload) {
    broken_ = true;
    return std::nullopt;
  }
  if (buffered() < sizeof header + header.length) return std::nullopt;
  Frame frame{header.type, header.flags, header.id,
              buffer_.substr(consumed_ + sizeof header, header.length)};
  consumed_ += sizeof header + header.length;
  // Drop what was consumed once it is most of the buffer, so the copy stays cheap.
  if (consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  } else if (consumed_ > 64 * 1024 && consumed_ * 2 > buffer_.size()) {
    buffer_.erase(0, consumed_);
    consumed_ = 0;
  }
  return frame;
}

std::string encode_exec(const ExecRequest& request) {
  std::string out;
  append_u32(out, static_cast<uint32_t>(request.argv.size()));
  append_u32(out, static_cast<uint32_t>(request.env.size()));
  append_u32(out, request.timeout_ms);
  append_u32(out, request.user.empty() ? 0u : uint32_t{agent::kExecFlagUser});
  for (const auto& arg : request.argv)
    append_string(out, arg);
  for (const auto& entry : request.env)
    append_string(out, entry);
  append_string(out, request.workdir);
  if (!request.user.empty()) append_string(out, request.user);
  return out;
}

std::optional<ExecRequest> decode_exec(std::string_view payload) {
  PayloadReader reader(payload);
  uint32_t argc, envc, flags;
  ExecRequest request;
  if (!reader.u32(argc) || !reader.u32(envc) || !reader.u32(request.timeout_ms) ||
      !reader.u32(flags) || argc == 0 || (flags & ~uint32_t{agent::kExecFlagUser}) != 0) {
    return std::nullopt;
  }
  // Each string takes at least its NUL, so counts beyond the payload's size are malformed.
  if (argc > payload.size() || envc > payload.size()) return std::nullopt;
  request.argv.resize(argc);
  request.env.resize(envc);
  for (auto& arg : request.argv)
    if (!reader.string(arg)) return std::nullopt;
  for (auto& entry : request.env)
    if (!reader.string(entry)) return std::nullopt;
  if (!reader.string(request.workdir)) return std::nullopt;
  if ((flags & agent::kExecFlagUser) && (!reader.string(request.user) || request.user.empty())) {
    return std::nullopt;
  }
  if (!reader.done()) return std::nullopt;
  return request;
}

std::string encode_ready(uint32_t max_concurrent) {
  std::string out;
  append_u32(out, agent::kProtocolVersion);
  append_u32(out, max_concurrent);
  return out;
}

std::optional<agent::ReadyPayload> decode_ready(std::string_view payload) {
  PayloadReader reader(payload);
  agent::ReadyPayload ready;
  // The agent's name may follow; it is not needed.
  if (!reader.u32(ready.version) || !reader.u32(ready.max_concurrent)) return std::nullopt;
  return ready;
}

std::string encode_exit(int32_t code, int32_t signal) {
  std::string out;
  append_u32(out, static_cast<uint32_t>(code));
  append_u32(out, static_cast<uint32_t>(signal));
  return out;
}

std::optional<agent::ExitPayload> decode_exit(std::string_view payload) {
  PayloadReader reader(payload);
  uint32_t code, signal;
  if (!reader.u32(code) || !reader.u32(signal) || !reader.done()) return std::nullopt;
  return agent::ExitPayload{static_cast<int32_t>(code), static_cast<int32_t>(signal)};
}

std::string encode_signal(int32_t signal) {
  std::string out;
  append_u32(out, static_cast<uint32_t>(signal));
  return out;
}

std::optional<int32_t> decode_signal(std::string_view payload) {
  PayloadReader reader(payload);
  uint32_t signal;
  if (!reader.u32(signal) || !reader.done()) return std::nullopt;
  return static_cast<int32_t>(signal);
}

std::string encode_set_env(const std::vector<std::string>& env) {
  std::string out;
  append_u32(out, static_cast<uint32_t>(env.size()));
  for (const auto& entry : env)
    append_string(out, entry);
  return out;
}

std::optional<std::vector<std::string>> decode_set_env(std::string_view payload) {
  PayloadReader reader(payload);
  uint32_t count;
  if (!reader.u32(count) || count > payload.size()) return std::nullopt;
  std::vector<std::string> env(count);
  for (auto& entry : env)
    if (!reader.string(entry)) return std::nullopt;
  if (!reader.done()) return std::nullopt;
  return env;
}

}  // namespace msb::core
