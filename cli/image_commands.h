// msb image import|ls|rm and msb pull.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "cli/context.h"
#include "core/images.h"

namespace msb::cli {

// Prints an image just imported or pulled: "TAG: image ID, SIZE ext4", its JSON with --json,
// nothing with --quiet.
void print_new_image(const GlobalOptions& global, bool json, const core::ImageInfo& info);

// Registers the commands; the returned function runs the one that was parsed and returns its exit
// code, or -1 if none of these was.
std::function<int()> add_image_commands(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
