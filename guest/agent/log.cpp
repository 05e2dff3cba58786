#include "guest/agent/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace msb::agent {
namespace {
int g_log_fd = 2;
}

void open_log() {
  int fd = ::open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
  if (fd >= 0) g_log_fd = fd;
}

void log_line(const std::string& message) {
  // <5>: notice. One write is one kmsg record.
  std::string line = (g_log_fd == 2 ? "" : "<5>") + std::string("msb-agent: ") + message + "\n";
  (void)!::write(g_log_fd, line.data(), line.size());
}

void log_errno(const std::string& message) {
  log_line(message + ": " + std::strerror(errno));
}

}  // namespace msb::agent
