// A loopback OCI registry for tests: Debian's docker-registry with its storage in a temporary
// folder, and the umoci and skopeo steps that build an image layout and push it there.
//
//   msb::test::skip_without_tools({msb::test::kRegistry, msb::test::kSkopeo}, "msb pull's tests");
//   msb::test::Registry registry;
//   msb::test::skopeo_push(layout, "1", registry.address() + "/test/busybox:1");
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/support.h"

namespace msb::test {

inline constexpr const char* kRegistry = "/usr/bin/docker-registry";
inline constexpr const char* kSkopeo = "/usr/bin/skopeo";
inline constexpr const char* kUmoci = "/usr/bin/umoci";
inline constexpr const char* kPython = "/usr/bin/python3";

// Prints "SKIPPED: TOOL is missing: WHO need(s) ..." and exits 77 (CTest's skip) unless every
// tool in `tools` is an executable.
inline void skip_without_tools(const std::vector<const char*>& tools, const std::string& who) {
  for (const char* tool : tools) {
    if (::access(tool, X_OK) != 0) {
      std::printf(
          "SKIPPED: %s is missing: %s need a loopback registry (Debian packages "
          "docker-registry, skopeo, umoci, python3)\n",
          tool, who.c_str());
      std::exit(77);
    }
  }
}

// A port nobody listens on right now (the kernel's pick for an ephemeral bind).
inline uint16_t free_port(const std::string& host) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

inline bool accepts_connections(const std::string& host, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// A background server, killed and reaped however the test ends.
class Server {
 public:
  Server(const std::vector<std::string>& argv, const std::string& host, uint16_t port,
         const std::filesystem::path& log)
      : pid_(spawn_process(argv, log.string())) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!accepts_connections(host, port)) {
      if (std::chrono::steady_clock::now() > deadline) {
        INFO(argv[0] << " did not listen on " << host << ":" << port << "; its log:\n"
                     << read_text(log));
        FAIL("server did not start");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~Server() {
    ::kill(pid_, SIGKILL);
    wait_process(pid_);
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

 private:
  pid_t pid_;
};

// Debian's docker-registry with its storage in a temporary folder.
class Registry {
 public:
  explicit Registry(const std::string& host = "127.0.0.1") : host_(host), port_(free_port(host)) {
    write_text(dir_ / "config.yml",
               "version: 0.1\n"
               "log:\n"
               "  level: error\n"
               "  accesslog:\n"
               "    disabled: true\n"
               "storage:\n"
               "  filesystem:\n"
               "    rootdirectory: " +
                   (dir_ / "data").string() +
                   "\n"
                   "http:\n"
                   "  addr: " +
                   address() + "\n");
    server_.emplace(std::vector<std::string>{kRegistry, "serve", (dir_ / "config.yml").string()},
                    host_, port_, dir_ / "registry.log");
  }
  std::string address() const { return host_ + ":" + std::to_string(port_); }
  // Where the registry keeps a blob's bytes (its filesystem driver's layout).
  std::filesystem::path blob_file(const std::string& digest) const {
    std::string hex = digest.substr(7);
    return dir_ / "data/docker/registry/v2/blobs/sha256" / hex.substr(0, 2) / hex / "data";
  }

 private:
  TempDir dir_;
  std::string host_;
  uint16_t port_;
  std::optional<Server> server_;
};

// Runs argv, which must exit 0.
inline ProcessResult require_run(const std::vector<std::string>& argv) {
  ProcessResult r = run_process(argv);
  INFO(argv[0] << " " << (argv.size() > 1 ? argv[1] : "") << " " << (argv.size() > 2 ? argv[2] : "")
               << ": exit " << r.exit_code << "\n"
               << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

// umoci unpack --image IMAGE BUNDLE: as root it keeps the layers' owners; otherwise --rootless.
inline void umoci_unpack(const std::string& image, const std::filesystem::path& bundle) {
  std::vector<std::string> unpack = {kUmoci, "unpack", "--image", image, bundle.string()};
  if (::geteuid() != 0) unpack.insert(unpack.begin() + 2, "--rootless");
  require_run(unpack);
}

// skopeo copy oci:LAYOUT:TAG docker://DEST, plain HTTP.
inline void skopeo_push(const std::filesystem::path& layout, const std::string& tag,
                        const std::string& dest, const std::vector<std::string>& options = {}) {
  std::vector<std::string> argv = {kSkopeo, "copy", "--quiet", "--dest-tls-verify=false"};
  argv.insert(argv.end(), options.begin(), options.end());
  argv.push_back("oci:" + layout.string() + ":" + tag);
  argv.push_back("docker://" + dest);
  require_run(argv);
}

}  // namespace msb::test
