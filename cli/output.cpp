#include "cli/output.h"

#include <unistd.h>

#include <cstdio>

namespace msb::cli {

std::string human_bytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double value = double(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 5) {
    value /= 1024;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", value, kUnits[unit]);
  return buf;
}

Progress::Progress(std::string label, bool quiet)
    : label_(std::move(label)), enabled_(!quiet && ::isatty(STDERR_FILENO)) {}

Progress::~Progress() {
  if (drawn_) std::fprintf(stderr, "\r\033[K");
}

snapstore::ProgressFn Progress::callback() {
  if (!enabled_) return {};
  return [this](uint64_t done, uint64_t total) {
    int percent = total ? int(done * 100 / total) : 100;
    std::fprintf(stderr, "\r\033[K%s  %3d%%  %s of %s", label_.c_str(), percent,
                 human_bytes(done).c_str(), human_bytes(total).c_str());
    std::fflush(stderr);
    drawn_ = true;
  };
}

}  // namespace msb::cli
