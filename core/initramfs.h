// The initramfs msb boots Linux with: a newc cpio holding the agent (guest/agent) as /init and
// the kernel modules it loads, with a modules.dep that lists just them. Built by msb itself and
// cached by content as $MSB_HOME/cache/initramfs/HASH.cpio.
#pragma once

#include <filesystem>

#include "core/home.h"

namespace msb::core {

// The agent binary: beside msb, or in ../libexec/msb. Throws SandboxError if missing.
std::filesystem::path agent_binary();

// Returns the cached initramfs for `agent` and the modules of `modules_dir` (a kernel's
// lib/modules/VERSION), building it if no initramfs of that content exists yet.
std::filesystem::path build_initramfs(const Home& home, const std::filesystem::path& agent,
                                      const std::filesystem::path& modules_dir);

}  // namespace msb::core
