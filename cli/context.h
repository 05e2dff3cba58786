// Options every command sees.
#pragma once

#include <optional>
#include <string>

namespace msb::cli {

struct GlobalOptions {
  std::string home;  // --home; empty: $MSB_HOME or ~/.msb
  bool quiet = false;
};

}  // namespace msb::cli
