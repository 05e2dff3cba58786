// Unit tier: the agent protocol's framing and the VMM process's exec multiplexer, driven by a
// fake guest that speaks the protocol over a socketpair (no KVM, no Machine).
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "core/control_client.h"
#include "core/control_protocol.h"
#include "core/exec_mux.h"
#include "core/frames.h"
#include "core/home.h"
#include "core/images.h"
#include "core/sandbox.h"
#include "guest/agent/memory.h"
#include "guest/protocol/pattern.h"
#include "snapstore/file_util.h"
#include "tests/support.h"

using msb::core::ControlConnection;
using msb::core::ExecIo;
using msb::core::ExecOptions;
using msb::core::ExecResult;
using msb::core::Frame;
using msb::core::FrameParser;
using msb::snapstore::UniqueFd;
using msb::test::pattern_bytes;
namespace agent = msb::agent;
namespace core = msb::core;

namespace {

std::string frame_bytes(uint16_t type, uint32_t id, std::string_view payload) {
  std::string out;
  core::append_frame(out, type, id, payload);
  return out;
}

// A guest agent in a thread, on one end of a socketpair, running one exec at a time (it says
// max_concurrent 1) with a few commands of its own:
//   echo ARGS...   env   exit N   err TEXT   out BYTES SEED   cat   wait (until killed)
//   show ARGS...   (prints the request: its argv, working directory and user)
class FakeGuest {
 public:
  explicit FakeGuest(int fd, bool send_ready = true) : fd_(fd) {
    thread_ = std::thread([this, send_ready] {
      if (send_ready) ready();
      serve();
    });
  }
  ~FakeGuest() {
    ::shutdown(fd_.get(), SHUT_RDWR);
    thread_.join();
  }
  void ready() { send(agent::kReady, 0, core::encode_ready(1)); }
  void send_raw(const std::string& bytes) {
    msb::snapstore::write_all(fd_.get(), bytes, "fake guest");
  }

  std::atomic<int> overlapping_execs = 0;  // kExec while another ran: the host broke the limit
  std::atomic<int> power_offs = 0;
  std::atomic<int> execs = 0;
  std::atomic<uint64_t> out_bytes = 0;  // what `out` has written so far
  std::mutex mutex;
  std::vector<int32_t> signals;  // kSignal numbers received
  std::vector<std::string> env;  // from kSetEnv

 private:
  void send(uint16_t type, uint32_t id, std::string_view payload) {
    std::string bytes = frame_bytes(type, id, payload);
    try {
      msb::snapstore::write_all(fd_.get(), bytes, "fake guest");
    } catch (...) {
    }
  }
  void finish(int32_t code, int32_t signal = 0) {
    send(agent::kExit, current_, core::encode_exit(code, signal));
    current_ = 0;
  }
  void serve() {
    FrameParser parser;
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(fd_.get(), buf, sizeof buf);
      if (n <= 0) return;
      parser.feed(std::string_view(buf, size_t(n)));
      while (auto frame = parser.next())
        handle(*frame);
    }
  }
  void handle(const Frame& frame) {
    switch (frame.type) {
      case agent::kSetEnv: {
        std::lock_guard lock(mutex);
        env = core::decode_set_env(frame.payload).value_or(std::vector<std::string>{"BAD"});
        return;
      }
      case agent::kPowerOff:
        ++power_offs;
        return;
      case agent::kSignal: {
        {
          std::lock_guard lock(mutex);
          signals.push_back(core::decode_signal(frame.payload).value_or(-1));
        }
        if (frame.id == current_) finish(-1, 9);
        return;
      }
      case agent::kStdin:
        if (frame.id != current_ || command_ != "cat") return;
        if (frame.payload.empty()) {
          finish(0);
        } else {
          send(agent::kStdout, current_, frame.payload);
        }
        return;
      case agent::kExec:
        break;
      default:
        return;
    }
    ++execs;
    if (current_ != 0) ++overlapping_execs;
    current_ = frame.id;
    auto request = core::decode_exec(frame.payload);
    REQUIRE(request);
    const auto& argv = request->argv;
    command_ = argv[0];
    if (command_ == "echo") {
      std::string line;
      for (size_t i = 1; i < argv.size(); ++i)
        line += (i > 1 ? " " : "") + argv[i];
      send(agent::kStdout, current_, line + "\n");
      finish(0);
    } else if (command_ == "env") {
      std::string text;
      std::lock_guard lock(mutex);
      for (const auto& e : env)
        text += e + "\n";
      for (const auto& e : request->env)
        text += e + "\n";
      send(agent::kStdout, current_, text);
      finish(0);
    } else if (command_ == "exit") {
      finish(std::stoi(argv.at(1)));
    } else if (command_ == "err") {
      send(agent::kStderr, current_, argv.at(1));
      finish(1);
    } else if (command_ == "out") {
      std::string data = pattern_bytes(std::stoull(argv.at(2)), std::stoull(argv.at(1)));
      for (size_t off = 0; off < data.size(); off += agent::kMaxPayload) {
        send(agent::kStdout, current_, std::string_view(data).substr(off, agent::kMaxPayload));
        out_bytes += std::min<uint64_t>(agent::kMaxPayload, data.size() - off);
      }
      finish(0);
    } else if (command_ == "show") {
      std::string text = "argv:";
      for (const auto& arg : argv)
        text += " " + arg;
      send(agent::kStdout, current_,
           text + "\nworkdir: " + request->workdir + "\nuser: " + request->user + "\n");
      finish(0);
    } else if (command_ == "cat" || command_ == "wait") {
      // cat answers kStdin; wait ends only by kSignal
    } else {
      send(agent::kStderr, current_, "unknown command\n");
      finish(127);
    }
  }

  UniqueFd fd_;
  std::thread thread_;
  uint32_t current_ = 0;
  std::string command_;
};

// An ExecMux serving a control socket in a temporary folder, with its guest end given to a
// FakeGuest.
struct Harness {
  msb::test::TempDir dir;
  UniqueFd host_end, stop_event{::eventfd(0, EFD_CLOEXEC)}, listen_fd;
  std::unique_ptr<FakeGuest> guest;
  std::unique_ptr<core::ExecMux> mux;
  std::thread thread;
  std::atomic<int> stop_timeouts = 0;

  explicit Harness(bool guest_ready = true, core::MuxOptions options = {}) {
    int pair[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
    host_end.reset(pair[0]);
    guest = std::make_unique<FakeGuest>(pair[1], guest_ready);
    listen_fd = core::listen_unix(dir / "control.sock");
    if (options.env.empty()) options.env = {"SANDBOX=yes"};
    mux = std::make_unique<core::ExecMux>(host_end.get(), listen_fd.get(), options);
    mux->on_stop_timeout = [this] { ++stop_timeouts; };
    thread = std::thread([this] { mux->run(stop_event.get()); });
  }
  ~Harness() { stop(); }
  void stop() {
    if (!thread.joinable()) return;
    uint64_t one = 1;
    REQUIRE(::write(stop_event.get(), &one, sizeof one) == sizeof one);
    thread.join();
    mux->close_clients();
    guest.reset();
  }
  ControlConnection connect() {
    UniqueFd fd = core::connect_unix(dir / "control.sock");
    REQUIRE(fd);
    return ControlConnection(std::move(fd));
  }
};

struct Captured {
  std::string out, err;
  std::optional<ExecResult> result;
};

// Runs argv through a new connection, with `input` (if any) on stdin from a pipe fed by a thread.
Captured run(Harness& h, std::vector<std::string> argv, std::optional<std::string> input = {},
             std::vector<std::string> env = {}, std::chrono::milliseconds timeout = {}) {
  Captured c;
  ExecIo io;
  io.on_stdout = [&](std::string_view b) { c.out.append(b); };
  io.on_stderr = [&](std::string_view b) { c.err.append(b); };
  int pipe_fds[2] = {-1, -1};
  std::thread writer;
  if (input) {
    REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
    io.stdin_fd = pipe_fds[0];
    writer = std::thread([&] {
      msb::snapstore::write_all(pipe_fds[1], *input, "stdin pipe");
      ::close(pipe_fds[1]);
    });
  }
  ControlConnection connection = h.connect();
  c.result = connection.exec(ExecOptions{std::move(argv), std::move(env), "", timeout, ""}, io);
  if (writer.joinable()) writer.join();
  if (pipe_fds[0] >= 0) ::close(pipe_fds[0]);
  return c;
}

nlohmann::json request(Harness& h, const nlohmann::json& body) {
  ControlConnection connection = h.connect();
  connection.send_request(body);
  auto frame = connection.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(10));
  REQUIRE(frame);
  REQUIRE(frame->type == core::control::kResponse);
  return nlohmann::json::parse(frame->payload);
}

// Polls `condition` until it holds; the deadline only catches a hang.
template <typename F>
bool eventually(F condition) {
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
       std::chrono::steady_clock::now() < deadline;) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return condition();
}

}  // namespace

TEST_CASE("frames survive any split of the byte stream", "[agent]") {
  std::string stream = frame_bytes(agent::kStdout, 7, "hello") +
                       frame_bytes(agent::kExit, 7, core::encode_exit(3, 0)) +
                       frame_bytes(agent::kPowerOff, 0, "");
  for (size_t step : {size_t(1), size_t(5), size_t(12), stream.size()}) {
    FrameParser parser;
    std::vector<Frame> frames;
    for (size_t i = 0; i < stream.size(); i += step) {
      parser.feed(std::string_view(stream).substr(i, step));
      while (auto f = parser.next())
        frames.push_back(*f);
    }
    REQUIRE(frames.size() == 3);
    REQUIRE(frames[0].type == agent::kStdout);
    REQUIRE(frames[0].id == 7);
    REQUIRE(frames[0].payload == "hello");
    REQUIRE(core::decode_exit(frames[1].payload)->code == 3);
    REQUIRE(frames[2].type == agent::kPowerOff);
    REQUIRE(frames[2].payload.empty());
    REQUIRE(parser.buffered() == 0);
  }
}

TEST_CASE("a frame longer than the protocol allows breaks the stream", "[agent]") {
  agent::FrameHeader header{agent::kMaxPayload + 1, agent::kStdout, 0, 1};
  FrameParser parser;
  parser.feed(std::string_view(reinterpret_cast<const char*>(&header), sizeof header));
  parser.feed(frame_bytes(agent::kStdout, 1, "after"));
  REQUIRE_FALSE(parser.next());
  REQUIRE(parser.broken());
  REQUIRE_FALSE(parser.next());
}

TEST_CASE("exec payloads round-trip and malformed ones are refused", "[agent]") {
  core::ExecRequest request{{"echo", "a b", ""}, {"K=V"}, "/tmp", 1500, ""};
  std::string payload = core::encode_exec(request);
  auto back = core::decode_exec(payload);
  REQUIRE(back);
  REQUIRE(back->argv == request.argv);
  REQUIRE(back->env == request.env);
  REQUIRE(back->workdir == "/tmp");
  REQUIRE(back->timeout_ms == 1500);
  REQUIRE(back->user.empty());
  request.user = "1000:100";
  auto with_user = core::decode_exec(core::encode_exec(request));
  REQUIRE(with_user);
  REQUIRE(with_user->user == "1000:100");
  REQUIRE(with_user->workdir == "/tmp");
  std::string unknown_flag = core::encode_exec(request);
  unknown_flag[12] = 3;  // ExecPayload.flags: a bit no one defined
  REQUIRE_FALSE(core::decode_exec(unknown_flag));
  std::string empty_user = payload;
  empty_user[12] = agent::kExecFlagUser;  // says a user follows, but none does
  REQUIRE_FALSE(core::decode_exec(empty_user));

  REQUIRE_FALSE(core::decode_exec(payload.substr(0, payload.size() - 1)));   // workdir's NUL
  REQUIRE_FALSE(core::decode_exec(payload + "x"));                           // bytes left over
  REQUIRE_FALSE(core::decode_exec(payload.substr(0, 10)));                   // short header
  REQUIRE_FALSE(core::decode_exec(core::encode_exec({{}, {}, "", 0, ""})));  // argc 0
  std::string huge_count = payload;
  uint32_t argc = 0xffffffff;
  std::memcpy(huge_count.data(), &argc, 4);
  REQUIRE_FALSE(core::decode_exec(huge_count));

  REQUIRE(core::decode_ready(core::encode_ready(4))->max_concurrent == 4);
  REQUIRE_FALSE(core::decode_ready("abc"));
  REQUIRE_FALSE(core::decode_exit("1234567"));
  REQUIRE(core::decode_signal(core::encode_signal(9)) == 9);
  REQUIRE(core::decode_set_env(core::encode_set_env({"A=1", "B=2"})) ==
          std::vector<std::string>{"A=1", "B=2"});
  REQUIRE_FALSE(core::decode_set_env(core::encode_set_env({"A=1"}) + "B"));
}

TEST_CASE("the mux runs execs with their output, exit codes and environment", "[agent]") {
  Harness h;
  Captured echo = run(h, {"echo", "hello", "world"});
  REQUIRE(echo.result);
  REQUIRE(echo.result->code == 0);
  REQUIRE(echo.out == "hello world\n");
  REQUIRE(echo.err.empty());

  Captured exit3 = run(h, {"exit", "3"});
  REQUIRE(exit3.result->exit_status() == 3);

  Captured err = run(h, {"err", "oops"});
  REQUIRE(err.out.empty());
  REQUIRE(err.err == "oops");
  REQUIRE(err.result->code == 1);

  Captured env = run(h, {"env"}, std::nullopt, {"EXTRA=1"});
  REQUIRE(env.out == "SANDBOX=yes\nEXTRA=1\n");

  REQUIRE(run(h, {"nope"}).result->code == 127);
  REQUIRE(h.guest->overlapping_execs == 0);
}

TEST_CASE("stdin and several MiB of output pass through intact", "[agent]") {
  Harness h;
  std::string input = pattern_bytes(42, 3 * 1024 * 1024 + 5);
  Captured cat = run(h, {"cat"}, input);
  REQUIRE(cat.result->code == 0);
  REQUIRE(cat.out.size() == input.size());
  REQUIRE(cat.out == input);

  Captured out = run(h, {"out", std::to_string(8 << 20), "7"});
  REQUIRE(out.result->code == 0);
  REQUIRE(out.out == pattern_bytes(7, 8 << 20));
}

TEST_CASE("execs beyond the guest's limit wait their turn", "[agent]") {
  Harness h;
  // The first holds the guest's only slot until its stdin ends.
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  Captured first;
  std::thread first_thread([&] {
    ExecIo io;
    io.on_stdout = [&](std::string_view b) { first.out.append(b); };
    io.stdin_fd = pipe_fds[0];
    ControlConnection c = h.connect();
    first.result = c.exec(ExecOptions{{"cat"}, {}, "", {}, ""}, io);
  });
  REQUIRE(eventually([&] { return h.guest->execs == 1; }));
  std::atomic<bool> second_done = false;
  Captured second;
  std::thread second_thread([&] {
    second = run(h, {"echo", "second"});
    second_done = true;
  });
  REQUIRE(eventually([&] { return request(h, {{"op", "status"}})["queued"] == 1; }));
  REQUIRE_FALSE(second_done);
  REQUIRE(h.guest->execs == 1);

  REQUIRE(::write(pipe_fds[1], "x", 1) == 1);
  ::close(pipe_fds[1]);
  first_thread.join();
  second_thread.join();
  ::close(pipe_fds[0]);
  REQUIRE(first.out == "x");
  REQUIRE(second.out == "second\n");
  REQUIRE(h.guest->overlapping_execs == 0);
  REQUIRE(h.guest->execs == 2);
}

TEST_CASE("a client that disconnects gets its command killed", "[agent]") {
  Harness h;
  {
    ControlConnection c = h.connect();
    c.send_request({{"op", "exec"}, {"argv", {"wait"}}});
    REQUIRE(eventually([&] { return h.guest->execs == 1; }));
  }  // closed
  REQUIRE(eventually([&] {
    std::lock_guard lock(h.guest->mutex);
    return h.guest->signals == std::vector<int32_t>{9};
  }));
  // The slot is free again.
  REQUIRE(run(h, {"echo", "next"}).out == "next\n");
  // A queued exec whose client leaves never runs.
  {
    ControlConnection blocker = h.connect();
    blocker.send_request({{"op", "exec"}, {"argv", {"wait"}}});
    REQUIRE(eventually([&] { return h.guest->execs == 3; }));
    {
      ControlConnection queued = h.connect();
      queued.send_request({{"op", "exec"}, {"argv", {"echo", "never"}}});
      REQUIRE(eventually([&] { return request(h, {{"op", "status"}})["queued"] == 1; }));
    }
    REQUIRE(eventually([&] { return request(h, {{"op", "status"}})["queued"] == 0; }));
  }
  REQUIRE(eventually([&] { return request(h, {{"op", "status"}})["running"] == 0; }));
  REQUIRE(h.guest->execs == 3);
}

TEST_CASE("a timeout kills the command and says so", "[agent]") {
  Harness h;
  Captured c = run(h, {"wait"}, std::nullopt, {}, std::chrono::milliseconds(50));
  REQUIRE(c.result);
  REQUIRE(c.result->timed_out);
  REQUIRE(c.result->signal == 9);
  REQUIRE(c.result->exit_status() == 124);
}

TEST_CASE("wait_ready answers once the guest is ready, and stop powers it off", "[agent]") {
  Harness h(/*guest_ready=*/false);
  REQUIRE(request(h, {{"op", "status"}})["ready"] == false);
  ControlConnection waiter = h.connect();
  waiter.send_request({{"op", "wait_ready"}});
  bool timed_out = false;
  REQUIRE_FALSE(waiter.read_frame(std::chrono::steady_clock::now() + std::chrono::milliseconds(50),
                                  &timed_out));
  REQUIRE(timed_out);
  h.guest->ready();
  auto frame = waiter.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(10));
  REQUIRE(frame);
  REQUIRE(nlohmann::json::parse(frame->payload)["ready"] == true);
  REQUIRE(eventually([&] {
    std::lock_guard lock(h.guest->mutex);
    return h.guest->env == std::vector<std::string>{"SANDBOX=yes"};
  }));

  ControlConnection stopper = h.connect();
  stopper.send_request({{"op", "stop"}, {"timeout_ms", 30}});
  REQUIRE(eventually([&] { return h.guest->power_offs == 1; }));
  // The fake guest does not power off: the mux calls for the machine to be stopped.
  REQUIRE(eventually([&] { return h.stop_timeouts == 1; }));
  h.stop();
  REQUIRE_FALSE(stopper.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(10)));
}

TEST_CASE("a client that does not read holds the guest back instead of filling memory", "[agent]") {
  core::MuxOptions options;
  options.buffer_limit = 64 * 1024;
  Harness h(true, options);
  ControlConnection c = h.connect();
  c.send_request({{"op", "exec"}, {"argv", {"out", std::to_string(32 << 20), "9"}}});
  REQUIRE(eventually([&] { return h.guest->execs == 1; }));
  // Nothing read yet: the guest's writes stop once the socket buffers and the mux's 64 KiB are
  // full. Stopped means no progress for 200 ms (a mux that buffered everything would have taken
  // all 32 MiB by then, or keep moving); what it holds is bounded by the buffers, not the output.
  uint64_t sent = 0;
  auto last_move = std::chrono::steady_clock::now();
  for (auto deadline = last_move + std::chrono::seconds(60);
       std::chrono::steady_clock::now() < deadline &&
       std::chrono::steady_clock::now() - last_move < std::chrono::milliseconds(200);) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (uint64_t now = h.guest->out_bytes; now != sent) {
      sent = now;
      last_move = std::chrono::steady_clock::now();
    }
  }
  INFO("the guest wrote " << sent << " bytes before it had to wait");
  REQUIRE(sent < (uint64_t(4) << 20));
  REQUIRE(request(h, {{"op", "status"}})["running"] == 1);
  std::string out;
  std::optional<ExecResult> result;
  while (auto frame = c.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(30))) {
    if (frame->type == agent::kStdout) out += frame->payload;
    if (frame->type == agent::kExit) break;
  }
  REQUIRE(out.size() == size_t(32) << 20);
  REQUIRE(out == pattern_bytes(9, 32 << 20));
}

TEST_CASE("bad requests and a broken guest stream get errors, not a dead mux", "[agent]") {
  Harness h;
  REQUIRE(request(h, {{"op", "frobnicate"}})["error"] == "unknown request \"frobnicate\"");
  REQUIRE(request(h, {{"op", "exec"}, {"argv", nlohmann::json::array()}})["error"] ==
          "exec needs a command");
  REQUIRE_THAT(request(h, {{"op", "exec"}, {"argv", 5}})["error"].get<std::string>(),
               Catch::StartsWith("malformed request"));
  {
    ControlConnection c = h.connect();
    std::string garbage = frame_bytes(core::control::kRequest, 0, "{not json");
    msb::snapstore::write_all(c.fd(), garbage, "test");
    auto frame = c.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(10));
    REQUIRE(frame);
    REQUIRE(nlohmann::json::parse(frame->payload)["error"] == "malformed request");
  }
  REQUIRE(run(h, {"echo", "still"}).out == "still\n");

  // The guest sends a header announcing too much: the exec it ran fails, and so does every one
  // after it, while the mux itself keeps answering.
  ControlConnection waiting = h.connect();
  waiting.send_request({{"op", "exec"}, {"argv", {"wait"}}});
  REQUIRE(eventually([&] { return h.guest->execs == 2; }));
  agent::FrameHeader header{agent::kMaxPayload + 1, agent::kStdout, 0, 1};
  h.guest->send_raw(std::string(reinterpret_cast<const char*>(&header), sizeof header));
  auto frame = waiting.read_frame(std::chrono::steady_clock::now() + std::chrono::seconds(10));
  REQUIRE(frame);
  REQUIRE(frame->type == core::control::kResponse);
  REQUIRE_THAT(nlohmann::json::parse(frame->payload)["error"].get<std::string>(),
               Catch::Contains("longer than the protocol allows"));
  REQUIRE(request(h, {{"op", "exec"}, {"argv", {"echo"}}})["error"] ==
          "the guest's agent stream is broken");
  REQUIRE(request(h, {{"op", "status"}})["guest_broken"] == true);
}

// ---- The Linux agent's kRestore memory decisions (guest/agent/memory.h) ----

TEST_CASE("the agent frees memory on restore only when the balloon must inflate", "[agent]") {
  // MemTotal over the grant: drop caches and compact so that the balloon can take pages.
  CHECK(agent::must_free_memory(256, 512 * 1024));
  CHECK(agent::must_free_memory(256, 256 * 1024 + 1));
  // Within the grant, or below it (the balloon deflates): the page cache stays warm.
  CHECK_FALSE(agent::must_free_memory(256, 256 * 1024));
  CHECK_FALSE(agent::must_free_memory(256, 250 * 1024));
  CHECK_FALSE(agent::must_free_memory(1024, 512 * 1024));
}

TEST_CASE("the agent waits for the balloon while it makes progress", "[agent]") {
  using Verdict = agent::BalloonWait::Verdict;
  using std::chrono::milliseconds;
  using std::chrono::seconds;
  static_assert(agent::BalloonWait::kStall == seconds(10));
  static_assert(agent::BalloonWait::kCap == seconds(300));

  SECTION("done as soon as MemTotal is within the grant") {
    agent::BalloonWait wait(256, 512 * 1024);
    CHECK(wait.next(milliseconds(0), 256 * 1024) == Verdict::kDone);
    agent::BalloonWait deflate(1024, 512 * 1024);
    CHECK(deflate.next(milliseconds(0), 512 * 1024) == Verdict::kDone);
  }
  SECTION("a slow balloon is waited for as long as it moves, beyond 5 s") {
    // 512 -> 256 MiB at 4 MiB/s, read every 250 ms: about 64 s.
    agent::BalloonWait wait(256, 512 * 1024);
    uint64_t total = 512 * 1024;
    milliseconds t(0);
    while (total > 256 * 1024) {
      CHECK(wait.next(t, total) == Verdict::kWait);
      t += milliseconds(250);
      total -= std::min<uint64_t>(total - 256 * 1024, 1024);
    }
    CHECK(t > seconds(60));
    CHECK(wait.next(t, total) == Verdict::kDone);
  }
  SECTION("no progress for the stall period gives up") {
    agent::BalloonWait wait(256, 512 * 1024);
    CHECK(wait.next(seconds(0), 512 * 1024) == Verdict::kWait);
    CHECK(wait.next(milliseconds(9999), 512 * 1024) == Verdict::kWait);
    CHECK(wait.next(seconds(10), 512 * 1024) == Verdict::kStalled);

    // Progress resets the stall clock; going back up is no progress.
    agent::BalloonWait moving(256, 512 * 1024);
    CHECK(moving.next(seconds(8), 500 * 1024) == Verdict::kWait);
    CHECK(moving.next(seconds(17), 510 * 1024) == Verdict::kWait);
    CHECK(moving.next(seconds(17), 500 * 1024) == Verdict::kWait);
    CHECK(moving.next(seconds(18), 500 * 1024) == Verdict::kStalled);
  }
  SECTION("a balloon that keeps moving stops at the cap") {
    agent::BalloonWait wait(256, 512 * 1024, seconds(10), seconds(30));
    uint64_t total = 512 * 1024;
    for (int s = 0; s < 30; ++s) {
      CHECK(wait.next(seconds(s), --total) == Verdict::kWait);
    }
    CHECK(wait.next(seconds(30), --total) == Verdict::kTimedOut);
  }
}

TEST_CASE("an image's environment sits under the sandbox's, key by key", "[agent]") {
  using core::merge_env;
  const std::vector<std::string> image = {"PATH=/usr/bin:/bin", "GREETING=hi", "EMPTY=", "EQ=a=b"};
  CHECK(merge_env(image, {}) == image);
  CHECK(merge_env({}, {"A=1"}) == std::vector<std::string>{"A=1"});
  // A key given again replaces the image's entry (moved to the end); others stay in order.
  CHECK(
      merge_env(image, {"GREETING=hello", "NEW=1", "EQ=c"}) ==
      std::vector<std::string>{"PATH=/usr/bin:/bin", "EMPTY=", "GREETING=hello", "NEW=1", "EQ=c"});
  // Keys match whole: GREET is not GREETING; the last of repeated overrides wins.
  CHECK(merge_env(image, {"GREET=x", "EMPTY=1", "EMPTY=2"}) ==
        std::vector<std::string>{"PATH=/usr/bin:/bin", "GREETING=hi", "EQ=a=b", "GREET=x",
                                 "EMPTY=2"});
}

TEST_CASE("msb exec takes what it leaves out from the sandbox's image", "[agent]") {
  // A sandbox folder as msb create leaves it, its control socket the mux's (Sandbox::exec reads
  // config.json, then speaks to the VMM over the socket, as msb exec does).
  Harness h;
  msb::test::TempDir home_dir;
  core::Home home = core::Home::resolve(home_dir.path());
  const std::filesystem::path box = home_dir / "sandboxes" / "box";
  std::filesystem::create_directories(box);
  std::filesystem::create_symlink(h.dir / "control.sock", box / "control.sock");
  auto write_config = [&](const nlohmann::json& image) {
    msb::test::write_text(box / "config.json",
                          nlohmann::json{{"name", "box"}, {"image", image}}.dump());
  };
  auto exec = [&](ExecOptions options) {
    std::string out;
    ExecIo io;
    io.on_stdout = [&](std::string_view b) { out.append(b); };
    ExecResult result = core::Sandbox::open(home, "box").exec(options, io);
    CHECK(result.exit_status() == 0);
    return out;
  };
  core::ImageConfig config;
  config.entrypoint = {"show", "from-entrypoint"};
  config.cmd = {"from-cmd"};
  config.workdir = "/srv";
  config.user = "tester";
  write_config({{"tag", "app:1"},
                {"workdir", config.workdir},
                {"user", config.user},
                {"entrypoint", config.entrypoint},
                {"cmd", config.cmd}});

  // Nothing given: the image's entrypoint, then its command, in its folder, as its user.
  CHECK(exec({}) == "argv: show from-entrypoint from-cmd\nworkdir: /srv\nuser: tester\n");
  // What the exec names wins.
  ExecOptions mine;
  mine.argv = {"show", "mine"};
  mine.workdir = "/tmp";
  mine.user = "1000:1000";
  CHECK(exec(mine) == "argv: show mine\nworkdir: /tmp\nuser: 1000:1000\n");
  mine.workdir.clear();
  CHECK(exec(mine) == "argv: show mine\nworkdir: /srv\nuser: 1000:1000\n");
  // The same rule as a function (core's, which msb run's and exec's paths share).
  ExecOptions filled = core::with_image_defaults({}, config);
  CHECK(filled.argv == std::vector<std::string>{"show", "from-entrypoint", "from-cmd"});
  config.entrypoint.clear();
  CHECK(core::with_image_defaults({}, config).argv == std::vector<std::string>{"from-cmd"});

  // An image with neither, and no command: refused before anything reaches the guest.
  write_config({{"tag", "bare:1"}, {"workdir", "/"}});
  const int execs = h.guest->execs;
  CHECK_THROWS_WITH(exec({}), "exec needs a command (the image names none)");
  CHECK(h.guest->execs == execs);
  // Without an image the agent's defaults apply: nothing is filled in.
  msb::test::write_text(box / "config.json", nlohmann::json{{"name", "box"}}.dump());
  ExecOptions plain;
  plain.argv = {"show"};
  CHECK(exec(plain) == "argv: show\nworkdir: \nuser: \n");
}
