// msb pull REF: an image from an OCI registry (core/registry.h).
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

#include "cli/context.h"

namespace msb::cli {

// Registers `msb pull`; the returned function runs it if it was parsed and returns its exit code,
// or -1 if it was not.
std::function<int()> add_pull_command(CLI::App& app, const GlobalOptions& global);

}  // namespace msb::cli
