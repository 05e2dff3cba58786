// `msb store ...`: the content-addressed store's commands.
#pragma once

#include <CLI/CLI.hpp>

#include "cli/context.h"

namespace msb::cli {

// Adds the `store` command and its subcommands to `app`; the returned function runs whichever was
// parsed and returns the process's exit code.
std::function<int()> add_store_commands(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
