#include "core/kernels.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "core/sandbox.h"
#include "snapstore/name.h"
#include "vmm/hypercall_probe.h"

namespace msb::core {
namespace fs = std::filesystem;

namespace {

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

fs::path kernels_dir(const Home& home) {
  return home.root() / "kernels";
}

bool is_file(const fs::path& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

bool is_dir(const fs::path& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

// The image to boot in an installed kernel's folder: vmlinux (an uncompressed ELF) where present,
// since where kernel code is emulated decompressing a bzImage alone takes minutes; else vmlinuz.
std::optional<fs::path> kernel_image(const fs::path& dir) {
  for (const char* file : {"vmlinux", "vmlinuz"}) {
    if (is_file(dir / file)) return dir / file;
  }
  return std::nullopt;
}

bool path_exists(const fs::path& path) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(path, ec));
}

// An installed kernel's folder (`name` is what the user called it, for messages): the image,
// and the one lib/modules/VERSION folder that the initramfs takes its modules from. A kernel
// without lib/modules has everything built in (msb's own): its initramfs holds just the agent.
KernelChoice installed_kernel(const std::string& name, const fs::path& dir) {
  KernelChoice choice;
  choice.name = name;
  choice.linux_guest = true;
  std::optional<fs::path> image = kernel_image(dir);
  if (!image) {
    throw SandboxError("kernel " + in_quotes(name) + ": " + dir.string() +
                       " has neither vmlinux nor vmlinuz");
  }
  choice.image = fs::absolute(*image).lexically_normal();
  const fs::path modules_root = dir / "lib" / "modules";
  if (!path_exists(modules_root)) return choice;
  std::vector<fs::path> versions;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(modules_root, ec)) {
    if (entry.is_directory()) versions.push_back(entry.path());
  }
  if (versions.empty()) {
    throw SandboxError("kernel " + in_quotes(name) + ": no modules in " + modules_root.string() +
                       " (expected lib/modules/VERSION, which msb's initramfs loads from)");
  }
  if (versions.size() > 1) {
    std::sort(versions.begin(), versions.end());
    std::string list;
    for (const auto& v : versions)
      list += (list.empty() ? "" : ", ") + v.filename().string();
    throw SandboxError("kernel " + in_quotes(name) + ": " + modules_root.string() +
                       " holds more than one kernel version (" + list + "); keep just one");
  }
  choice.modules = fs::absolute(versions.front()).lexically_normal();
  return choice;
}

KernelChoice builtin_test_guest() {
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  const fs::path libexec = (bin / ".." / "libexec" / "msb").lexically_normal();
  for (const fs::path& candidate : {bin / kTestGuestKernel, libexec / kTestGuestKernel}) {
    if (is_file(candidate)) {
      KernelChoice choice;
      choice.name = kTestGuestKernel;
      choice.image = fs::weakly_canonical(candidate);
      return choice;
    }
  }
  throw SandboxError("built-in kernel " + in_quotes(kTestGuestKernel) + " not found beside " +
                     bin.string() + "/msb or in " + libexec.string());
}

}  // namespace

// The fetch script works in a hidden folder (.NAME.tmp), which is no valid name, and a folder
// without an image is no kernel: neither is listed.
std::vector<std::string> installed_kernels(const Home& home) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(kernels_dir(home), ec)) {
    std::string name = entry.path().filename().string();
    if (!snapstore::name_problem(name) && kernel_image(entry.path())) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

bool host_has_hardware_virtualization() {
  return vmm::hypercall_probe::hardware_virtualization();
}

std::string default_kernel(const Home& home, std::string* why) {
  return default_kernel(home, host_has_hardware_virtualization(), why);
}

std::string default_kernel(const Home& home, bool hardware_virtualization, std::string* why) {
  const fs::path msb_dir = kernels_dir(home) / kMsbKernel;
  const fs::path debian_dir = kernels_dir(home) / kDebianKernel;
  std::string choice;
  std::string reason;
  if (kernel_image(msb_dir)) {
    choice = kMsbKernel;
    reason = "msb's own guest kernel, installed in " + msb_dir.string();
  } else if (kernel_image(debian_dir) && hardware_virtualization) {
    choice = kDebianKernel;
    reason = "installed in " + debian_dir.string() +
             " and the host has hardware virtualization (msb's own kernel is not installed in " +
             msb_dir.string() + ": scripts/build-guest-kernel builds it)";
  } else if (kernel_image(debian_dir)) {
    // Where kernel code is emulated (no vmx or svm), Debian's kernel takes many minutes to boot.
    choice = kTestGuestKernel;
    reason = "msb's own kernel is not installed in " + msb_dir.string() +
             " (scripts/build-guest-kernel builds it), and Debian's in " + debian_dir.string() +
             " boots in useful time only with hardware virtualization (no vmx or svm in "
             "/proc/cpuinfo)";
  } else {
    choice = kTestGuestKernel;
    reason = "no Linux kernel installed in " + kernels_dir(home).string() +
             " (scripts/setup builds msb's with scripts/build-guest-kernel)";
  }
  if (why) *why = choice + ": " + reason;
  return choice;
}

KernelChoice resolve_kernel(const Home& home, const std::string& name_or_path) {
  if (name_or_path == kTestGuestKernel) return builtin_test_guest();

  if (name_or_path.find('/') != std::string::npos) {
    const fs::path path = name_or_path;
    if (is_dir(path)) return installed_kernel(name_or_path, path);
    if (!is_file(path)) throw SandboxError("kernel " + name_or_path + ": not found");
    KernelChoice choice;
    choice.name = name_or_path;
    choice.image = fs::absolute(path).lexically_normal();
    // The vmlinux or vmlinuz of an installed kernel's folder (the image with its `config` or
    // its modules beside it) boots as that kernel, with its modules if any; any other file
    // boots as it is (with the user's --initrd, if any).
    const fs::path dir = choice.image.parent_path();
    if ((is_dir(dir / "lib" / "modules") || is_file(dir / "config")) && kernel_image(dir)) {
      KernelChoice installed = installed_kernel(name_or_path, dir);
      installed.image = choice.image;
      return installed;
    }
    return choice;
  }

  const fs::path dir = kernels_dir(home) / name_or_path;
  if (snapstore::name_problem(name_or_path) || !is_dir(dir)) {
    std::vector<std::string> names = installed_kernels(home);
    std::string known = "the built-in " + std::string(kTestGuestKernel);
    for (const auto& name : names)
      known += ", " + name;
    throw SandboxError("kernel " + in_quotes(name_or_path) + " is not installed in " +
                       kernels_dir(home).string() + " (known kernels: " + known +
                       "; a kernel file is named by a path with a '/')");
  }
  return installed_kernel(name_or_path, dir);
}

}  // namespace msb::core
