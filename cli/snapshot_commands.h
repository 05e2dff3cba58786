// `msb snapshot create|save-named|ls|inspect|rm`, `msb pause`, `msb resume`, `msb restore`: the
// snapshot commands.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "cli/context.h"

namespace msb::cli {

// Adds the snapshot commands to `app`; the returned function runs whichever was parsed and
// returns the process's exit code, or -1 if none of them was.
std::function<int()> add_snapshot_commands(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
