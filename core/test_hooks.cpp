#include "core/test_hooks.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace msb::core {

void test_hook(std::string_view point) {
  // Read once: the environment does not change under a running msb.
  static const std::string* const folder = [] {
    const char* value = std::getenv("MSB_TEST_HOOKS");
    return value && *value ? new std::string(value) : nullptr;
  }();
  if (!folder) return;
  const std::string base = *folder + "/" + std::string(point);
  // Not armed, or armed and claimed already (by another thread, or another process).
  if (::unlink((base + ".arm").c_str()) != 0) return;
  const std::string pid = std::to_string(::getpid()) + "\n";
  const std::string temp = base + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd >= 0) {
    const bool written = ::write(fd, pid.data(), pid.size()) == static_cast<ssize_t>(pid.size());
    ::close(fd);
    if (written) ::rename(temp.c_str(), base.c_str());
  }
  // Every thread stops with the process; SIGKILL ends it here, SIGCONT lets it go on.
  ::raise(SIGSTOP);
}

}  // namespace msb::core
