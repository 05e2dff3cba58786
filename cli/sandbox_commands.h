// `msb create`, `exec`, `ls`, `logs`, `stop`, `start`, `rm`, `run`: the sandbox commands.
#pragma once

#include <CLI/CLI.hpp>

#include "cli/context.h"

namespace msb::cli {

// Adds the sandbox commands to `app`; the returned function runs whichever was parsed and returns
// the process's exit code, or -1 if none of them was.
std::function<int()> add_sandbox_commands(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
