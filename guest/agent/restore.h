// kRestore: what a guest restored from a snapshot must change before its first exec.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "guest/protocol/agent_protocol.h"

namespace msb::agent {

struct RestoreRequest {
  RestorePayload payload{};
  std::string name;
};

// nullopt if the payload is malformed (short, the name without its NUL or too long for a
// hostname, bytes after it, cpus 0).
std::optional<RestoreRequest> decode_restore(std::string_view payload);

// Reseeds the kernel's random pool, sets the clock and the hostname, brings exactly `cpus` CPUs
// online and, where the grant is below MemTotal, drops caches, compacts memory and waits for the
// balloon to bring MemTotal within the grant while it makes progress (memory.h). Failures are
// logged; one line sums up what was done.
void apply_restore(const RestoreRequest& request);

// The CPUs a sysfs list names ("0-3,5").
std::optional<std::vector<unsigned>> parse_cpu_list(const std::string& text);

}  // namespace msb::agent
