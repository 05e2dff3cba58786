// The VMM process: `msb __vmm DIR`, which `msb create` and `msb start` start detached, one per
// sandbox. It owns the sandbox's Machine, serves its control socket with an ExecMux, and records
// why it stopped in DIR/exit.json before it exits. Not a user command: --help does not list it.
#pragma once

#include <filesystem>

#include <nlohmann/json.hpp>

#include "vmm/machine.h"

namespace msb::core {

inline constexpr const char* kVmmModeArgument = "__vmm";

// Runs the sandbox in `dir` until its machine stops. Returns the process's exit code: 0 when
// the guest powered off or was stopped, 1 otherwise.
int run_vmm_process(const std::filesystem::path& dir);

// The machine a sandbox's config.json describes (run in the sandbox's folder: the overlay's path
// is relative to it), with the console log and agent channel given. A Linux guest gets its
// devices from ACPI alone, the balloon holding what is above --memory, msb.hostname=NAME, and
// what its host needs on the command line where `kernel_mode_emulated` (core/guest_cmdline.h).
vmm::MachineConfig machine_config(const nlohmann::json& config, int console_fd, int agent_fd,
                                  bool kernel_mode_emulated);

}  // namespace msb::core
