// vmm tier: the balloon end to end through the msb binary and the test guest's balloon driver
// (guest/testguest/README.md). A restore that grants less memory than its snapshot had makes the
// machine's balloon target the difference (msb ls --json, from the VMM), the guest's driver gives
// that many pages (its `balloon` command, and `actual` in ls), and the host frees them (the VMM's
// RSS); a restore that grants more deflates it. Each KVM test exits 77 with the reason printed
// where /dev/kvm is missing. The last test needs no KVM: ls against a fake VMM's control socket.
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/control_protocol.h"
#include "guest/protocol/agent_protocol.h"
#include "tests/msb_cli.h"

using msb::test::balloon;
using msb::test::checksum_line;
using msb::test::entry_of;
using msb::test::handle_of;
using msb::test::Msb;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
using msb::test::settled_balloon;
using msb::test::snapshot_create;
using msb::test::vmm_rss_mib;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {}  // namespace

TEST_CASE(
    "a restore with less memory than its snapshot inflates the balloon, and the host frees it",
    "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "256"}));
  // A booted test guest keeps all its RAM.
  REQUIRE(settled_balloon(msb, "box") == balloon(256, 0, 0));
  REQUIRE(msb.exec({"balloon"}) == "0 0\n");
  // All the RAM above 32 MiB, in the snapshot.
  REQUIRE(msb.exec({"fill", "224", "5"}) == checksum_line(5, 224));
  const std::string handle = handle_of(msb, {"box", "--resume"});

  require_ok(msb({"restore", handle, "--name", "small", "--memory", "64"}));
  // The machine asks for the 192 MiB above the grant, and the guest's driver gives them.
  REQUIRE(settled_balloon(msb, "small") == balloon(256, 192, 192));
  REQUIRE(msb.exec_in("small", {"balloon"}) == "49152 49152\n");  // 4 KiB pages
  REQUIRE(msb.exec_in("small", {"mem"}) == "64\n");
  // The guest keeps the snapshot's memory below the balloon and does not touch the balloon's.
  REQUIRE(msb.exec_in("small", {"sum", "32"}) == checksum_line(5, 32));
  ProcessResult into = msb({"exec", "small", "--", "sum", "33"});
  REQUIRE(into.exit_code == 2);
  REQUIRE(into.err == "testguest: sum: the balloon holds RAM in that range\n");

  // The host frees what the balloon holds. The driver writes every page before it gives it
  // away, so a VMM that kept them would hold them all; beside it, the same snapshot restored
  // without a balloon, all of its RAM read back, holds that RAM.
  require_ok(msb({"restore", handle, "--name", "full"}));
  REQUIRE(settled_balloon(msb, "full") == balloon(256, 0, 0));
  REQUIRE(msb.exec_in("full", {"sum", "224"}) == checksum_line(5, 224));
  const uint64_t full_rss = vmm_rss_mib(msb, "full");
  const uint64_t small_rss = vmm_rss_mib(msb, "small");
  INFO("VmRSS: " << small_rss << " MiB with 192 MiB ballooned, " << full_rss << " MiB without");
  REQUIRE(full_rss >= 224);
  REQUIRE(small_rss + 128 < full_rss);
  require_ok(msb({"rm", "--force", "box", "small", "full"}));
}

TEST_CASE("a restore with more memory than its snapshot's grant deflates the balloon",
          "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "128"}));
  const std::string handle = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"restore", handle, "--name", "small", "--memory", "48"}));
  REQUIRE(settled_balloon(msb, "small") == balloon(128, 80, 80));
  REQUIRE(msb.exec_in("small", {"balloon"}) == "20480 20480\n");
  REQUIRE(msb.exec_in("small", {"fill", "16", "7"}) == checksum_line(7, 16));
  REQUIRE(msb({"exec", "small", "--", "fill", "17", "7"}).exit_code == 2);

  // A snapshot of the small sandbox: its grant is 48 MiB, its ceiling still 128, its balloon full.
  const std::string small = handle_of(msb, {"small", "--resume"});
  require_ok(msb({"restore", small, "--name", "same"}));
  REQUIRE(settled_balloon(msb, "same") == balloon(128, 80, 80));
  REQUIRE(msb.exec_in("same", {"balloon"}) == "20480 20480\n");
  REQUIRE(msb.exec_in("same", {"sum", "16"}) == checksum_line(7, 16));

  // All of it back: the balloon empties and the guest uses the RAM again.
  require_ok(msb({"restore", small, "--name", "grown", "--memory", "128"}));
  REQUIRE(settled_balloon(msb, "grown") == balloon(128, 0, 0));
  REQUIRE(msb.exec_in("grown", {"balloon"}) == "0 0\n");
  REQUIRE(msb.exec_in("grown", {"mem"}) == "128\n");
  REQUIRE(msb.exec_in("grown", {"fill", "96", "8"}) == checksum_line(8, 96));

  // Part of it back: the balloon keeps the rest.
  require_ok(msb({"restore", small, "--name", "some", "--memory", "96"}));
  REQUIRE(settled_balloon(msb, "some") == balloon(128, 32, 32));
  REQUIRE(msb.exec_in("some", {"balloon"}) == "8192 8192\n");
  REQUIRE(msb.exec_in("some", {"fill", "64", "9"}) == checksum_line(9, 64));
  REQUIRE(msb({"exec", "some", "--", "fill", "65", "9"}).exit_code == 2);

  require_error(msb({"restore", small, "--name", "x", "--memory", "256"}), "--max-memory 128");
  require_ok(msb({"rm", "--force", "box", "small", "same", "grown", "some"}));
}

namespace {

// A sandbox folder whose "VMM" is this test: it holds vmm.lock and serves control.sock from a
// thread, answering "status" with a balloon, or (silent) never answering at all.
class FakeVmm {
 public:
  FakeVmm(const fs::path& dir, bool answers) : answers_(answers) {
    fs::create_directories(dir);
    msb::test::write_text(dir / "config.json",
                          R"({"cpus": 1, "max_cpus": 1, "memory_mib": 512, "max_memory_mib": 1024,
                              "kernel": "/nonexistent", "kernel_name": "fake"})");
    lock_ = ::open((dir / "vmm.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    REQUIRE(lock_ >= 0);
    REQUIRE(::flock(lock_, LOCK_EX) == 0);
    msb::test::write_text(dir / "pid", std::to_string(::getpid()) + "\n");
    listen_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listen_ >= 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string path = (dir / "control.sock").string();
    REQUIRE(path.size() < sizeof address.sun_path);
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    REQUIRE(::bind(listen_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    REQUIRE(::listen(listen_, 16) == 0);
    REQUIRE(::pipe2(stop_, O_CLOEXEC) == 0);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeVmm() {
    (void)!::write(stop_[1], "x", 1);
    thread_.join();
    for (int fd : {stop_[0], stop_[1], listen_, lock_})
      ::close(fd);
  }

 private:
  struct Client {
    int fd;
    std::string in;
  };

  void serve() {
    std::vector<Client> clients;
    for (;;) {
      std::vector<pollfd> fds = {{stop_[0], POLLIN, 0}, {listen_, POLLIN, 0}};
      for (const Client& client : clients)
        fds.push_back({client.fd, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), -1) < 0) continue;
      if (fds[0].revents) break;
      if (fds[1].revents & POLLIN) {
        int fd = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) clients.push_back({fd, {}});
      }
      for (size_t i = 2; i < fds.size(); ++i) {
        if (!fds[i].revents) continue;
        Client& client = clients[i - 2];
        char buf[4096];
        ssize_t n = ::read(client.fd, buf, sizeof buf);
        if (n <= 0) {
          ::close(client.fd);
          client.fd = -1;
          continue;
        }
        client.in.append(buf, static_cast<size_t>(n));
        if (answers_ && client.in.size() >= sizeof(msb::agent::FrameHeader)) {
          reply(client.fd);
          ::close(client.fd);
          client.fd = -1;
        }
      }
      std::erase_if(clients, [](const Client& client) { return client.fd < 0; });
    }
    for (const Client& client : clients)
      ::close(client.fd);
  }

  static void reply(int fd) {
    const std::string payload = nlohmann::json{
        {"ready", true},
        {"paused", false},
        {"guest_broken", false},
        {"running", 0},
        {"queued", 0},
        {"max_concurrent", 1},
        {"balloon",
         {{"ram_mib", 1024},
          {"target_mib", 512},
          {"actual_mib", 500},
          {"target_pages", 512 * 256},
          {"actual_pages",
           500 * 256 + 3}}}}.dump();
    msb::agent::FrameHeader header{static_cast<uint32_t>(payload.size()),
                                   msb::core::control::kResponse, 0, 0};
    std::string frame(reinterpret_cast<const char*>(&header), sizeof header);
    frame += payload;
    (void)!::write(fd, frame.data(), frame.size());
  }

  bool answers_;
  int lock_ = -1;
  int listen_ = -1;
  int stop_[2] = {-1, -1};
  std::thread thread_;
};

}  // namespace

TEST_CASE(
    "msb ls shows a running sandbox's balloon from its VMM, without waiting long for one "
    "that does not answer",
    "[sandbox]") {
  msb::test::TempDir home;
  FakeVmm answering(home / "sandboxes/answers", true);
  FakeVmm silent(home / "sandboxes/silent", false);
  // `timeout` catches a hang: ls waits a few seconds for the silent VMM, not for ever.
  ProcessResult r = msb::test::run_process({"/usr/bin/timeout", "120", MSB_BINARY, "ls", "--json"},
                                           {{"MSB_HOME", home.path().string()}});
  INFO("stdout: " << r.out << "stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  const nlohmann::json boxes = nlohmann::json::parse(r.out);
  REQUIRE(boxes.size() == 2);
  REQUIRE(boxes[0].at("name") == "answers");
  REQUIRE(boxes[0].at("state") == "running");
  REQUIRE(boxes[0].at("balloon") == balloon(1024, 512, 500));
  REQUIRE(boxes[1].at("name") == "silent");
  REQUIRE(boxes[1].at("state") == "running");
  REQUIRE(boxes[1].at("balloon").is_null());
}
