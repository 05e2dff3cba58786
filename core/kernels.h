// Kernels msb boots: the built-in test guest (beside msb), Linux kernels installed under
// $MSB_HOME/kernels/NAME/ (scripts/build-guest-kernel: msb's own, vmlinux and config with
// everything built in; scripts/fetch-linux-kernel: Debian's, vmlinuz, vmlinux, config and
// lib/modules/VERSION/), or a kernel file the user names with --kernel PATH.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "core/home.h"

namespace msb::core {

inline constexpr const char* kTestGuestKernel = "testguest";
// msb's own guest kernel (scripts/build-guest-kernel): no modules, boots wherever KVM works.
inline constexpr const char* kMsbKernel = "msb";
// Debian's cloud kernel (scripts/fetch-linux-kernel), with its modules.
inline constexpr const char* kDebianKernel = "debian-cloud";

// True where /proc/cpuinfo shows vmx or svm: a Linux guest runs natively. Elsewhere (nested
// PVM) guest kernel code is emulated: only a small kernel such as msb's boots in useful time.
bool host_has_hardware_virtualization();

struct KernelChoice {
  std::string name;             // what the user named ("msb", "testguest", a path)
  std::filesystem::path image;  // the file to boot (vmlinux where present, else vmlinuz)
  // lib/modules/VERSION of an installed Linux kernel, or "": the test guest, a bare file, or a
  // Linux kernel with everything built in (no lib/modules), whose initramfs holds just the agent.
  std::filesystem::path modules;
  bool linux_guest = false;  // boots msb's initramfs with the agent and an image
};

// The kernel `msb create` uses without --kernel: kMsbKernel where it is installed in `home`;
// else kDebianKernel where it is installed and the host has hardware virtualization (Debian's
// kernel does not boot in useful time where kernel code is emulated); else kTestGuestKernel.
// `why` (when given) says which and why, for messages.
std::string default_kernel(const Home& home, std::string* why = nullptr);
// The same rule with the host's answer given (for tests).
std::string default_kernel(const Home& home, bool hardware_virtualization, std::string* why);

// The kernels installed in `home` (folders of $MSB_HOME/kernels holding vmlinux or vmlinuz),
// sorted.
std::vector<std::string> installed_kernels(const Home& home);

// Resolves --kernel NAME|PATH: the built-in test guest (beside msb, or in ../libexec/msb), an
// installed kernel's name, or a path with a '/': a folder laid out like an installed kernel, or a
// file. An installed kernel's folder holds vmlinux or vmlinuz, and lib/modules/VERSION/ (exactly
// one VERSION) unless everything is built in. A file in a kernel's folder (one with a `config` or
// lib/modules beside the image: its vmlinuz, say) boots as that kernel, with its modules; any
// other file boots as it is (linux_guest false). Throws SandboxError naming what was not found; an
// unknown name's message lists the installed kernels.
KernelChoice resolve_kernel(const Home& home, const std::string& name_or_path);

}  // namespace msb::core
