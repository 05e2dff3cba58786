// msb image import|ls|rm and msb pull.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "cli/context.h"

namespace msb::cli {

// Registers the commands; the returned function runs the one that was parsed and returns its exit
// code, or -1 if none of these was.
std::function<int()> add_image_commands(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
