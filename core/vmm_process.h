// The VMM process: `msb __vmm DIR`, which `msb create` and `msb start` start detached, one per
// sandbox. It owns the sandbox's Machine, serves its control socket with an ExecMux, and records
// why it stopped in DIR/exit.json before it exits. Not a user command: --help does not list it.
#pragma once

#include <filesystem>

namespace msb::core {

inline constexpr const char* kVmmModeArgument = "__vmm";

// Runs the sandbox in `dir` until its machine stops. Returns the process's exit code: 0 when
// the guest powered off or was stopped, 1 otherwise.
int run_vmm_process(const std::filesystem::path& dir);

}  // namespace msb::core
