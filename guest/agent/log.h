// The agent's few log lines: to /dev/kmsg (so they land in the guest's console log with the
// kernel's), else to stderr.
#pragma once

#include <string>

namespace msb::agent {

// Opens /dev/kmsg (call once /dev is mounted; the descriptor survives the switch to the root).
void open_log();
// One line, prefixed "msb-agent: ".
void log_line(const std::string& message);
// The same, with ": " and strerror(errno) appended.
void log_errno(const std::string& message);

}  // namespace msb::agent
