// Output helpers of the command line: sizes for people, and progress on a terminal.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/sandbox.h"
#include "snapstore/store.h"

namespace msb::cli {

// "1.5 GiB", "312.0 KiB", "17 B".
std::string human_bytes(uint64_t bytes);

// A progress line on stderr ("\rLABEL  42%  1.2 GiB of 2.9 GiB"), only when stderr is a terminal
// and not quiet; otherwise it prints nothing. The line is cleared when the reporter is destroyed.
class Progress {
 public:
  Progress(std::string label, bool quiet);
  ~Progress();
  snapstore::ProgressFn callback();

 private:
  std::string label_;
  bool enabled_;
  bool drawn_ = false;
};

// `text` made safe to show on a terminal in at most `width` columns: escape sequences and control
// characters are dropped (it may be a guest's output), tabs become spaces, each other non-ASCII
// character (a UTF-8 sequence or a stray byte) becomes one '?', and a longer line is cut to end in
// "...".
std::string terminal_line(std::string_view text, size_t width);

// The line a boot shows: "booting NAME: 12 s: CONSOLE LINE", fitted to `width` columns.
std::string boot_progress_text(const core::BootProgress& progress, size_t width);

// A boot's progress on stderr, redrawn in place, once it has waited `after`; only when stderr is
// a terminal and not quiet, otherwise nothing. Cleared when the boot is done or the reporter is
// destroyed.
class BootProgressLine {
 public:
  explicit BootProgressLine(bool quiet,
                            std::chrono::milliseconds after = std::chrono::milliseconds(1000));
  ~BootProgressLine();
  core::BootProgressFn callback();

 private:
  void clear();
  bool enabled_;
  std::chrono::milliseconds after_;
  std::string drawn_;  // what the line shows now, "" when nothing
};

}  // namespace msb::cli
