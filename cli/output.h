// Output helpers of the command line: sizes for people, and progress on a terminal.
#pragma once

#include <cstdint>
#include <string>

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

}  // namespace msb::cli
