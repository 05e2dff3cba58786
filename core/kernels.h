// Kernels msb boots: the built-in test guest (beside msb), Linux kernels installed under
// $MSB_HOME/kernels/NAME/ (scripts/fetch-linux-kernel: vmlinuz, vmlinux, config,
// lib/modules/VERSION/), or a kernel file the user names with --kernel PATH.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

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
// The same rule with the host's answer given (for tests).
std::string default_kernel(const Home& home, bool hardware_virtualization, std::string* why);

// The kernels installed in `home` (folders of $MSB_HOME/kernels holding vmlinux or vmlinuz),
// sorted.
std::vector<std::string> installed_kernels(const Home& home);

// Resolves --kernel NAME|PATH: the built-in test guest (beside msb, or in ../libexec/msb), an
// installed kernel's name, or a path with a '/': a folder laid out like an installed kernel, or a
// file. A file in such a folder (its vmlinuz, say) boots with that folder's modules; any other
// file boots as it is (linux_guest false). Throws SandboxError naming what was not found; an
// unknown name's message lists the installed kernels.
KernelChoice resolve_kernel(const Home& home, const std::string& name_or_path);

}  // namespace msb::core
