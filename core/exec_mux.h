// The heart of a sandbox's VMM process: one poll loop that serves control-socket clients and
// multiplexes their execs onto the guest agent's single stream. It needs no Machine, only the
// agent stream's file descriptor, so tests drive it with a fake guest on a socketpair.
//
// Execs beyond the guest's max_concurrent (from kReady) wait in a queue. Memory stays bounded:
// the guest's stream is not read while any client has buffer_limit bytes of output waiting, and
// clients' stdin is not read while buffer_limit bytes wait to go to the guest. A client that
// disconnects gets its command killed (kSignal 9).
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/frames.h"
#include "snapstore/file_util.h"

namespace msb::core {

struct MuxOptions {
  std::vector<std::string> env;      // the sandbox's environment, sent after every kReady
  size_t buffer_limit = 256 * 1024;  // bytes per buffer before the mux stops reading its source
  // How long after a timed-out exec's kSignal the mux waits for its kExit before telling the
  // client anyway (the guest slot stays taken until the kExit comes).
  std::chrono::milliseconds kill_grace{5000};
  size_t max_clients = 1024;
  // A restored guest sends no kReady of its own: the mux first sends kRestore with this payload
  // (agent::RestorePayload then the name) and the guest answers kReady. Empty after a boot.
  std::string restore_payload;
};

class ExecMux {
 public:
  // Neither descriptor is owned. `guest_fd` is made non-blocking; `listen_fd` is a listening
  // Unix stream socket.
  ExecMux(int guest_fd, int listen_fd, MuxOptions options);
  ~ExecMux();
  ExecMux(const ExecMux&) = delete;
  ExecMux& operator=(const ExecMux&) = delete;

  // Serves until `stop_fd` becomes readable (the machine stopped). Clients stay connected until
  // close_clients() or destruction, so that the VMM can record why it stopped first.
  void run(int stop_fd);
  void close_clients();

  // Called once when a stop request's timeout passes and run() has not returned yet.
  std::function<void()> on_stop_timeout;
  // Where the mux reports what went wrong (a broken guest stream, a bad client request).
  std::function<void(const std::string&)> log;
  // Requests about the machine itself: "pause", "resume", "snapshot" (capture; the client then
  // sends "snapshot_commit" on the same connection) and "snapshot_commit". Returns the response
  // (its "paused" field, when present, is the machine's state now); throws to fail the request.
  std::function<nlohmann::json(const std::string& op, const nlohmann::json& request)>
      on_machine_request;
  // The client holding a capture went away without committing it.
  std::function<void()> on_capture_abandoned;
  // Fields about the machine added to every "status" reply (the VMM adds its balloon); its keys
  // replace the mux's own where they clash. Must not block: the mux waits for it.
  std::function<nlohmann::json()> on_status;

 private:
  using Clock = std::chrono::steady_clock;
  enum class State { kRequest, kWaitReady, kQueued, kRunning, kFinishing, kStopping };
  struct Client {
    snapstore::UniqueFd fd;
    FrameParser in;
    std::string out;
    State state = State::kRequest;
    ExecRequest request;
    uint32_t exec_id = 0;
    bool stdin_done = false;
    bool timed_out = false;
    std::optional<Clock::time_point> deadline;  // timeout, then kill grace
    bool gone = false;                          // to be removed at the end of the iteration
    bool holds_capture = false;                 // sent "snapshot", not yet "snapshot_commit"
  };

  void accept_clients();
  void read_guest();
  void write_guest();
  void read_client(Client& client);
  void drain_client(Client& client);
  void write_client(Client& client);
  void handle_guest_frame(Frame frame);
  void handle_client_frame(Client& client, Frame frame);
  void handle_request(Client& client, const std::string& json);
  void handle_machine_request(Client& client, const std::string& op, const nlohmann::json& request);
  void start_queued();
  void disconnect(Client& client);
  void fail(Client& client, const std::string& error);
  void break_guest(const std::string& why);
  void check_deadlines();
  std::optional<Clock::time_point> next_deadline() const;
  bool output_backlog() const;
  void report(const std::string& message);
  void send_guest(uint16_t type, uint32_t id, std::string_view payload);

  int guest_fd_;
  int listen_fd_;
  MuxOptions options_;
  FrameParser guest_in_;
  std::string guest_out_;
  bool guest_broken_ = false;
  bool ready_ = false;
  bool paused_ = false;
  uint32_t max_concurrent_ = 1;
  uint32_t next_id_ = 1;
  std::vector<std::unique_ptr<Client>> clients_;
  std::deque<Client*> queue_;
  std::map<uint32_t, Client*> running_;  // exec id -> its client, nullptr once it left
  std::optional<Clock::time_point> stop_deadline_;
  bool stop_timeout_called_ = false;
};

}  // namespace msb::core
