// The initramfs msb boots Linux with: a newc cpio holding the agent (guest/agent) as /init and
// the kernel modules it loads, with a modules.dep that lists just them (none for a kernel with
// everything built in, such as msb's own). Built by msb itself and cached by content as
// $MSB_HOME/cache/initramfs/HASH.cpio.
#pragma once

#include <array>
#include <filesystem>

#include "core/home.h"

namespace msb::core {

// The agent's file name, beside msb or in ../libexec/msb.
inline constexpr const char* kAgentBinary = "msb-agent";

// The modules (by modprobe name) the initramfs carries, with everything they need: the
// transport, then the console, disk, entropy and balloon devices msb gives every guest.
inline constexpr std::array<const char*, 5> kAgentModules = {
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_rng", "virtio_balloon"};

// The archive's layout (paths without a leading '/'; every time, owner and group zero):
//   init                          the agent, 0755
//   dev/ proc/ sys/ run/ newroot/ tmp/ (1777)
//   dev/console                   char device 5:1, 0600: the kernel opens it for init's stdio
//                                 before devtmpfs is mounted
//   lib/modules/VERSION/modules.dep   the included modules only, in the kernel's format
//                                 ("kernel/a.ko: kernel/b.ko kernel/c.ko", a module's whole
//                                 closure, to be loaded from the end), its lines in load order
//   lib/modules/VERSION/kernel/...    the modules, at their paths in the kernel's tree
// The dependencies come from the kernel's modules.dep where it has one, else from each
// module's own .modinfo "depends=" (Debian's package ships no modules.dep: depmod writes it
// on installation). For a kernel without modules there is no lib/ at all: the agent finds no
// modules.dep and loads nothing.

// The agent binary: beside msb, or in ../libexec/msb. Throws SandboxError if missing.
std::filesystem::path agent_binary();

// Returns the cached initramfs for `agent` and the modules of `modules_dir` (a kernel's
// lib/modules/VERSION, or "" for a kernel without modules: KernelChoice::modules), building it
// if no initramfs of that content exists yet. Its name is the XXH3-128 of the format version,
// the agent's bytes and, with modules, VERSION, the trimmed modules.dep and every included
// module's path and bytes. Throws SandboxError naming a missing agent or module.
std::filesystem::path build_initramfs(const Home& home, const std::filesystem::path& agent,
                                      const std::filesystem::path& modules_dir);

}  // namespace msb::core
