// msb's guest agent: PID 1 of the initramfs msb boots Linux with (see README.md).
//
//   msb-agent                  as PID 1: set the machine up, then serve /dev/hvc0
//   msb-agent --serve PATH     serve the protocol on PATH (a tty or socket) without setting up
//                              anything, for trying the agent outside a VM
#include <fcntl.h>
#include <termios.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <thread>

#include "guest/agent/init.h"
#include "guest/agent/log.h"
#include "guest/agent/server.h"
#include "guest/agent/shutdown.h"
#include "guest/agent/util.h"

namespace {

constexpr const char* kPort = "/dev/hvc0";

// Opens the port, waiting for its device node (virtio_console adds it once the host described
// the port) up to `limit`; raw mode when it is a tty. -1 if it never appears.
int open_port(const char* path, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  int fd;
  while ((fd = ::open(path, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  termios tio;
  if (::tcgetattr(fd, &tio) == 0) {
    ::cfmakeraw(&tio);
    tio.c_cc[VMIN] = 1;
    tio.c_cc[VTIME] = 0;
    ::tcsetattr(fd, TCSANOW, &tio);
  }
  return fd;
}

// The device of the virtio-serial port named `name`, waiting for it up to `limit`; "" if none.
std::string named_port(const std::string& name, std::chrono::milliseconds limit) {
  namespace fs = std::filesystem;
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator("/sys/class/virtio-ports", ec)) {
      std::string text;
      if (msb::agent::read_file((entry.path() / "name").string(), text) &&
          text.substr(0, text.find('\n')) == name) {
        return "/dev/" + entry.path().filename().string();
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) return {};
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

int serve(const char* path, bool pid1) {
  int port = open_port(path, std::chrono::seconds(10));
  if (port < 0) {
    msb::agent::log_errno(std::string("cannot open ") + path);
    return 1;
  }
  msb::agent::Server server(port, pid1);
  server.run();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--serve") == 0) return serve(argv[2], false);
  if (::getpid() != 1) {
    std::fprintf(stderr, "usage: msb-agent (as PID 1) | msb-agent --serve PORT\n");
    return 2;
  }
  // PID 1 must never exit: a failure powers the machine off, so that the host sees it end.
  try {
    msb::agent::BootOptions options = msb::agent::init_system();
    std::string port = kPort;
    if (!options.port.empty()) {
      port = named_port(options.port, std::chrono::seconds(10));
      if (port.empty()) msb::agent::log_line("no virtio-serial port named " + options.port);
    }
    if (!port.empty()) serve(port.c_str(), true);
  } catch (const std::exception& e) {
    msb::agent::log_line(std::string("fatal: ") + e.what());
  }
  msb::agent::shutdown_machine();
}
