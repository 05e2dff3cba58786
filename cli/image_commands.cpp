#include "cli/image_commands.h"

namespace msb::cli {

std::function<int()> add_image_commands(CLI::App&, const GlobalOptions&) {
  return [] { return -1; };
}

}  // namespace msb::cli
