#include "guest/agent/shutdown.h"

#include <signal.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "guest/agent/log.h"
#include "guest/agent/util.h"

namespace msb::agent {
namespace {

// Reaps children until none is left or `limit` passes; true if none is left.
bool reap_all(std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    pid_t pid = ::waitpid(-1, nullptr, WNOHANG);
    if (pid < 0 && errno == ECHILD) return true;
    if (pid > 0) continue;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Whether any process but PID 1 (and kernel threads) is left: kill(-1, 0) reaches them all.
bool others_alive() {
  return ::kill(-1, 0) == 0;
}

void unmount_all() {
  std::string text;
  if (!read_file("/proc/mounts", text)) return;
  std::vector<std::string> targets;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string source, target;
    fields >> source >> target;
    if (!target.empty()) targets.push_back(target);
  }
  // The last mounted first; / is remounted read-only instead (we are running from it).
  for (auto it = targets.rbegin(); it != targets.rend(); ++it) {
    if (*it == "/" || *it == "/proc" || *it == "/sys" || *it == "/dev") continue;
    ::umount2(it->c_str(), MNT_DETACH);
  }
  ::mount(nullptr, "/", nullptr, MS_REMOUNT | MS_RDONLY, nullptr);
}

}  // namespace

void shutdown_machine() {
  ::kill(-1, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
  while (others_alive() && std::chrono::steady_clock::now() < deadline)
    reap_all(std::chrono::milliseconds(20));
  ::kill(-1, SIGKILL);
  reap_all(std::chrono::milliseconds(500));
  ::sync();
  unmount_all();
  ::sync();
  ::reboot(RB_POWER_OFF);
  // Without a way to power off the kernel halts instead; PID 1 returning from here would panic
  // (and panic=-1 reboots, which msb and QEMU's -no-reboot also treat as the end).
  log_errno("power off failed");
  ::reboot(RB_AUTOBOOT);
  for (;;)
    ::pause();
}

}  // namespace msb::agent
