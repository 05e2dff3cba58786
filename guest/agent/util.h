// Small file helpers the agent's parts share.
#pragma once

#include <string>

namespace msb::agent {

// Reads a whole (small) file; false with errno set if it cannot be read.
bool read_file(const std::string& path, std::string& out);
// Writes `text` to an existing file (a sysfs or procfs knob); false with errno set on failure.
bool write_file(const std::string& path, const std::string& text);

}  // namespace msb::agent
