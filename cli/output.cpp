#include "cli/output.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
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

std::string terminal_line(std::string_view text, size_t width) {
  std::string out;
  for (size_t i = 0; i < text.size();) {
    auto c = static_cast<unsigned char>(text[i]);
    // An escape sequence goes whole: CSI ("ESC [ ... final byte"), OSC ("ESC ] ... BEL or
    // ESC backslash"), or ESC and one byte.
    if (c == 0x1b) {
      ++i;
      if (i < text.size() && text[i] == '[') {
        for (++i; i < text.size() && !(text[i] >= 0x40 && text[i] <= 0x7e); ++i) {
        }
        ++i;
      } else if (i < text.size() && text[i] == ']') {
        for (++i; i < text.size() && text[i] != '\a' && text[i] != 0x1b; ++i) {
        }
        i += (i < text.size() && text[i] == 0x1b) ? 2 : 1;
      } else {
        ++i;
      }
      continue;
    }
    ++i;
    if (c == '\t') {
      out += ' ';
    } else if (c >= 0x20 && c < 0x7f) {
      out += char(c);
    } else if (c >= 0xc0) {  // a UTF-8 lead byte: one character, shown as '?'
      while (i < text.size() && (static_cast<unsigned char>(text[i]) & 0xc0) == 0x80)
        ++i;
      out += '?';
    } else if (c >= 0x80) {  // a stray continuation byte
      out += '?';
    }  // other control characters (and DEL) are dropped
  }
  if (out.size() > width) {
    out.resize(width >= 3 ? width - 3 : 0);
    out += std::string(std::min<size_t>(width, 3), '.');
  }
  return out;
}

std::string boot_progress_text(const core::BootProgress& progress, size_t width) {
  std::string text =
      "booting " + progress.name + ": " + std::to_string(progress.waited.count() / 1000) + " s";
  std::string line = terminal_line(progress.console_line, SIZE_MAX);
  // The console line only where a useful part of it fits.
  constexpr size_t kMinShown = 8;
  if (!line.empty() && text.size() + 2 + kMinShown <= width) {
    text += ": " + terminal_line(line, width - text.size() - 2);
  }
  return terminal_line(text, width);
}

BootProgressLine::BootProgressLine(bool quiet, std::chrono::milliseconds after)
    : enabled_(!quiet && ::isatty(STDERR_FILENO)), after_(after) {}

BootProgressLine::~BootProgressLine() {
  clear();
}

void BootProgressLine::clear() {
  if (drawn_.empty()) return;
  std::fprintf(stderr, "\r\033[K");
  std::fflush(stderr);
  drawn_.clear();
}

core::BootProgressFn BootProgressLine::callback() {
  if (!enabled_) return {};
  return [this](const core::BootProgress& progress) {
    if (progress.done) return clear();
    if (progress.waited < after_) return;
    winsize size{};
    size_t columns =
        ::ioctl(STDERR_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0 ? size.ws_col : 80;
    // One column short of the width: a line that fills it would wrap on some terminals, and
    // "\r" would then redraw only its last row.
    std::string text = boot_progress_text(progress, columns - 1);
    if (text == drawn_) return;
    std::fprintf(stderr, "\r\033[K%s", text.c_str());
    std::fflush(stderr);
    drawn_ = text;
  };
}

}  // namespace msb::cli
