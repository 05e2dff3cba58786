// Kernels msb boots: the built-in test guest (beside msb), Linux kernels installed under
// $MSB_HOME/kernels/NAME/ (scripts/fetch-linux-kernel: vmlinuz, vmlinux, config,
// lib/modules/VERSION/), or a kernel file the user names with --kernel PATH.
#pragma once

#include <filesystem>
#include <string>

#include "core/home.h"

namespace msb::core {

inline constexpr const char* kTestGuestKernel = "testguest";
inline constexpr const char* kLinuxKernel = "debian-cloud";  // the kernel the setup installs

// True where /proc/cpuinfo shows vmx or svm: a Linux guest runs natively. Elsewhere (nested
// PVM) guest kernel code is emulated and Linux cannot boot in useful time.
bool host_has_hardware_virtualization();

struct KernelChoice {
  std::string name;               // what the user named ("debian-cloud", "testguest", a path)
  std::filesystem::path image;    // the file to boot (vmlinux where present, else vmlinuz)
  std::filesystem::path modules;  // lib/modules/VERSION of an installed Linux kernel, or ""
  bool linux_guest = false;       // boots msb's initramfs with the agent and an image
};

// The kernel `msb create` uses without --kernel: kLinuxKernel when it is installed in `home`
// and the host has hardware virtualization, else kTestGuestKernel. `why` (when given) says
// which and why, for messages.
std::string default_kernel(const Home& home, std::string* why = nullptr);

// Resolves --kernel NAME|PATH: a built-in name, an installed kernel's name, or a file (a path
// with a '/'). Throws SandboxError naming what was not found.
KernelChoice resolve_kernel(const Home& home, const std::string& name_or_path);

}  // namespace msb::core
