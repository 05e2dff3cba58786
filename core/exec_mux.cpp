#include "core/exec_mux.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/control_protocol.h"

namespace msb::core {
namespace {

constexpr size_t kReadSize = 64 * 1024;
constexpr uint32_t kMaxConcurrentLimit = 1024;  // a guest asking for more gets this many

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

std::string json_frame(uint16_t type, const nlohmann::json& body) {
  std::string out;
  append_frame(out, type, 0, body.dump());
  return out;
}

}  // namespace

ExecMux::ExecMux(int guest_fd, int listen_fd, MuxOptions options)
    : guest_fd_(guest_fd), listen_fd_(listen_fd), options_(std::move(options)) {
  set_nonblocking(guest_fd_);
  if (listen_fd_ >= 0) set_nonblocking(listen_fd_);
  if (!options_.restore_payload.empty()) send_guest(agent::kRestore, 0, options_.restore_payload);
}

ExecMux::~ExecMux() = default;

void ExecMux::report(const std::string& message) {
  if (log) log(message);
}

void ExecMux::send_guest(uint16_t type, uint32_t id, std::string_view payload) {
  if (!guest_broken_) append_frame(guest_out_, type, id, payload);
}

bool ExecMux::output_backlog() const {
  for (const auto& client : clients_)
    if (client->out.size() >= options_.buffer_limit) return true;
  return false;
}

void ExecMux::run(int stop_fd) {
  std::vector<pollfd> fds;
  std::vector<Client*> polled;
  for (;;) {
    fds.clear();
    polled.clear();
    fds.push_back({stop_fd, POLLIN, 0});
    bool accepting = listen_fd_ >= 0 && clients_.size() < options_.max_clients;
    fds.push_back({accepting ? listen_fd_ : -1, POLLIN, 0});
    short guest_events = 0;
    if (!guest_broken_) {
      if (!output_backlog()) guest_events |= POLLIN;
      if (!guest_out_.empty()) guest_events |= POLLOUT;
    }
    fds.push_back({guest_broken_ ? -1 : guest_fd_, guest_events, 0});
    bool guest_full = guest_out_.size() >= options_.buffer_limit;
    for (const auto& client : clients_) {
      short events = 0;
      switch (client->state) {
        case State::kRequest:
        case State::kWaitReady:
        case State::kStopping:
          events |= POLLIN;  // a request, or an end of stream to notice
          break;
        case State::kRunning:
          if (!client->stdin_done && !guest_full) events |= POLLIN;
          break;
        case State::kQueued:  // its stdin waits in its socket until the exec starts
        case State::kFinishing:
          break;
      }
      if (!client->out.empty()) events |= POLLOUT;
      fds.push_back({client->fd.get(), events, 0});
      polled.push_back(client.get());
    }

    int timeout_ms = -1;
    if (auto deadline = next_deadline()) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - Clock::now()).count();
      timeout_ms = static_cast<int>(std::clamp<long long>(left, 0, 60'000));
    }
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) {
      if (errno == EINTR) continue;
      report(std::string("poll: ") + std::strerror(errno));
      return;
    }
    if (fds[0].revents) return;

    if (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) read_guest();
    if (!guest_broken_ && (fds[2].revents & POLLOUT)) write_guest();
    for (size_t i = 0; i < polled.size(); ++i) {
      Client& client = *polled[i];
      short revents = fds[3 + i].revents;
      if (client.gone) continue;
      if (revents & POLLIN) {
        read_client(client);
      } else if (revents & (POLLHUP | POLLERR)) {
        disconnect(client);
      }
      if (!client.gone && (revents & POLLOUT)) write_client(client);
    }
    if (fds[1].revents & POLLIN) accept_clients();
    check_deadlines();
    start_queued();
    // Clients whose last words were sent leave now; the rest of the gone ones were disconnected.
    for (auto& client : clients_) {
      if (client->state == State::kFinishing && client->out.empty()) client->gone = true;
    }
    std::erase_if(clients_, [this](const auto& client) {
      if (client->gone && client->holds_capture && on_capture_abandoned) on_capture_abandoned();
      return client->gone;
    });
  }
}

void ExecMux::close_clients() {
  // Best effort: what fits in the sockets now goes; nothing waits for slow clients.
  for (auto& client : clients_) {
    if (!client->out.empty())
      ::send(client->fd.get(), client->out.data(), client->out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  clients_.clear();
  queue_.clear();
  running_.clear();
}

void ExecMux::accept_clients() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or a client that gave up already
    auto client = std::make_unique<Client>();
    client->fd.reset(fd);
    clients_.push_back(std::move(client));
    if (clients_.size() >= options_.max_clients) return;
  }
}

void ExecMux::read_guest() {
  char buf[kReadSize];
  ssize_t n = ::read(guest_fd_, buf, sizeof buf);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    break_guest(n == 0 ? "the guest's agent stream ended"
                       : std::string("reading the agent stream: ") + std::strerror(errno));
    return;
  }
  guest_in_.feed(std::string_view(buf, static_cast<size_t>(n)));
  while (auto frame = guest_in_.next())
    handle_guest_frame(std::move(*frame));
  if (guest_in_.broken()) break_guest("the guest sent a frame longer than the protocol allows");
}

void ExecMux::write_guest() {
  ssize_t n = ::send(guest_fd_, guest_out_.data(), guest_out_.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n > 0) {
    guest_out_.erase(0, static_cast<size_t>(n));
  } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
    break_guest(std::string("writing the agent stream: ") + std::strerror(errno));
  }
}

void ExecMux::break_guest(const std::string& why) {
  if (guest_broken_) return;
  guest_broken_ = true;
  guest_out_.clear();
  report(why + "; no more commands can run in this sandbox");
  for (auto& client : clients_) {
    if (client->state == State::kRunning || client->state == State::kQueued ||
        client->state == State::kWaitReady) {
      fail(*client, why);
    }
  }
  running_.clear();
  queue_.clear();
}

void ExecMux::handle_guest_frame(Frame frame) {
  switch (frame.type) {
    case agent::kReady: {
      auto ready = decode_ready(frame.payload);
      if (!ready) {
        report("ignoring a malformed kReady from the guest");
        return;
      }
      // A second kReady means the agent started over: what it ran is gone.
      auto lost = std::move(running_);
      running_.clear();
      for (auto& [id, client] : lost)
        if (client) fail(*client, "the guest's agent restarted while the command ran");
      ready_ = true;
      max_concurrent_ = std::clamp<uint32_t>(ready->max_concurrent, 1, kMaxConcurrentLimit);
      send_guest(agent::kSetEnv, 0, encode_set_env(options_.env));
      for (auto& client : clients_) {
        if (client->state == State::kWaitReady) {
          client->out += json_frame(control::kResponse, {{"ready", true}});
          client->state = State::kFinishing;
        }
      }
      return;
    }
    case agent::kStdout:
    case agent::kStderr: {
      auto it = running_.find(frame.id);
      if (it == running_.end() || !it->second || frame.payload.empty()) return;
      append_frame(it->second->out, frame.type, 0, frame.payload);
      return;
    }
    case agent::kExit: {
      auto it = running_.find(frame.id);
      if (it == running_.end()) return;
      auto exit = decode_exit(frame.payload);
      if (!exit) report("malformed kExit for exec " + std::to_string(frame.id));
      if (Client* client = it->second) {
        agent::ExitPayload result = exit.value_or(agent::ExitPayload{-1, 0});
        // The agent enforces the timeout too, and its clock may fire first: a command killed by
        // SIGKILL once its deadline has passed timed out, whoever noticed.
        if (client->deadline && Clock::now() >= *client->deadline && result.code == -1 &&
            result.signal == 9) {
          client->timed_out = true;
        }
        append_frame(client->out, agent::kExit, 0, encode_exit(result.code, result.signal),
                     client->timed_out ? control::kExitTimedOut : 0);
        client->state = State::kFinishing;
        client->deadline.reset();
      }
      running_.erase(it);
      return;
    }
    default:
      return;  // unknown frames are skipped by their length
  }
}

void ExecMux::read_client(Client& client) {
  char buf[kReadSize];
  ssize_t n = ::recv(client.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    disconnect(client);
    return;
  }
  client.in.feed(std::string_view(buf, static_cast<size_t>(n)));
  drain_client(client);
}

void ExecMux::drain_client(Client& client) {
  // A queued exec's stdin frames stay in its parser (at most one read's worth) until it starts.
  while (!client.gone && (client.state == State::kRequest || client.state == State::kRunning)) {
    auto frame = client.in.next();
    if (!frame) break;
    handle_client_frame(client, std::move(*frame));
  }
  if (client.in.broken() && !client.gone) {
    report("a control client sent an oversized frame; dropping it");
    disconnect(client);
  }
}

void ExecMux::handle_client_frame(Client& client, Frame frame) {
  switch (client.state) {
    case State::kRequest:
      if (frame.type != control::kRequest) {
        fail(client, "the first frame must be a request");
        return;
      }
      handle_request(client, frame.payload);
      return;
    case State::kRunning:
      if (frame.type != agent::kStdin || client.stdin_done) return;
      send_guest(agent::kStdin, client.exec_id, frame.payload);
      if (frame.payload.empty()) client.stdin_done = true;
      return;
    default:
      return;  // nothing else is expected from a client
  }
}

void ExecMux::handle_request(Client& client, const std::string& text) {
  nlohmann::json request = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!request.is_object() || !request.contains("op") || !request["op"].is_string()) {
    fail(client, "malformed request");
    return;
  }
  std::string op = request["op"];
  try {
    if (op == "status") {
      nlohmann::json status = {{"ready", ready_},
                               {"paused", paused_},
                               {"guest_broken", guest_broken_},
                               {"running", running_.size()},
                               {"queued", queue_.size()},
                               {"max_concurrent", max_concurrent_}};
      if (on_status) status.update(on_status());
      client.out += json_frame(control::kResponse, status);
      client.state = State::kFinishing;
    } else if (op == "wait_ready") {
      if (guest_broken_) {
        fail(client, "the guest's agent stream is broken");
      } else if (ready_) {
        client.out += json_frame(control::kResponse, {{"ready", true}});
        client.state = State::kFinishing;
      } else {
        client.state = State::kWaitReady;
      }
    } else if (op == "stop") {
      uint64_t timeout_ms = request.value("timeout_ms", uint64_t{10'000});
      if (!guest_broken_) send_guest(agent::kPowerOff, 0, {});
      auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
      if (!stop_deadline_ || deadline < *stop_deadline_) stop_deadline_ = deadline;
      // A guest whose stream broke cannot hear kPowerOff, nor can a paused one: stop it at once.
      if (guest_broken_ || paused_) stop_deadline_ = Clock::now();
      client.state = State::kStopping;
    } else if (op == "exec") {
      ExecRequest exec;
      exec.argv = request.at("argv").get<std::vector<std::string>>();
      exec.env = request.value("env", std::vector<std::string>{});
      exec.workdir = request.value("workdir", std::string());
      exec.user = request.value("user", std::string());
      exec.timeout_ms = request.value("timeout_ms", uint32_t{0});
      if (exec.argv.empty()) {
        fail(client, "exec needs a command");
        return;
      }
      if (encode_exec(exec).size() > agent::kMaxPayload) {
        fail(client, "the command, its environment, working directory and user exceed 64 KiB");
        return;
      }
      if (guest_broken_) {
        fail(client, "the guest's agent stream is broken");
        return;
      }
      if (paused_) {
        fail(client, "the sandbox is paused (msb resume runs it again)");
        return;
      }
      client.request = std::move(exec);
      client.state = State::kQueued;
      queue_.push_back(&client);
    } else if (op == "pause" || op == "resume" || op == "snapshot" || op == "snapshot_commit") {
      handle_machine_request(client, op, request);
    } else {
      fail(client, "unknown request \"" + op + "\"");
    }
  } catch (const nlohmann::json::exception& e) {
    fail(client, std::string("malformed request: ") + e.what());
  }
}

void ExecMux::handle_machine_request(Client& client, const std::string& op,
                                     const nlohmann::json& request) {
  if (!on_machine_request) {
    fail(client, "this VMM does not serve \"" + op + "\"");
    return;
  }
  if (op == "snapshot") {
    // A snapshot must not cut a conversation with the agent in half: a restored guest would
    // answer a host that never asked (docs/snapshots.md, "what is captured").
    if (guest_broken_) return fail(client, "the guest's agent stream is broken");
    if (!ready_) return fail(client, "the guest's agent is not ready yet");
    if (!running_.empty() || !queue_.empty()) {
      return fail(client, std::to_string(running_.size() + queue_.size()) +
                              " command(s) are running in the sandbox; a snapshot needs none "
                              "(wait for them, or stop them)");
    }
    if (!guest_out_.empty()) return fail(client, "the guest has not taken all its input yet");
  }
  if (op == "snapshot_commit" && !client.holds_capture) {
    return fail(client, "snapshot_commit without a snapshot on this connection");
  }
  nlohmann::json response;
  try {
    response = on_machine_request(op, request);
  } catch (const std::exception& e) {
    if (op == "snapshot_commit") client.holds_capture = false;
    return fail(client, e.what());
  }
  if (response.contains("paused")) paused_ = response["paused"].get<bool>();
  client.out += json_frame(control::kResponse, response);
  if (op == "snapshot") {
    // The client stores the capture, then commits it on this connection.
    client.holds_capture = true;
    client.state = State::kRequest;
  } else {
    if (op == "snapshot_commit") client.holds_capture = false;
    client.state = State::kFinishing;
  }
}

void ExecMux::start_queued() {
  while (ready_ && !guest_broken_ && running_.size() < max_concurrent_ && !queue_.empty()) {
    Client& client = *queue_.front();
    queue_.pop_front();
    uint32_t id = next_id_++;
    if (next_id_ == 0) next_id_ = 1;  // id 0 belongs to no exec
    client.exec_id = id;
    client.state = State::kRunning;
    running_[id] = &client;
    ExecRequest request = client.request;
    // The agent enforces the timeout too; the mux's own is the backstop for one that does not.
    send_guest(agent::kExec, id, encode_exec(request));
    if (request.timeout_ms) {
      client.deadline = Clock::now() + std::chrono::milliseconds(request.timeout_ms);
    }
    drain_client(client);
  }
}

void ExecMux::check_deadlines() {
  auto now = Clock::now();
  if (stop_deadline_ && now >= *stop_deadline_ && !stop_timeout_called_) {
    stop_timeout_called_ = true;
    report("the guest did not power off in time; stopping the machine");
    if (on_stop_timeout) on_stop_timeout();
  }
  for (auto& client : clients_) {
    if (client->state != State::kRunning || !client->deadline || now < *client->deadline) continue;
    if (!client->timed_out) {
      client->timed_out = true;
      send_guest(agent::kSignal, client->exec_id, encode_signal(9));
      client->deadline = now + options_.kill_grace;
    } else {
      // The guest did not answer the kill: tell the client, and leave the slot taken until it does.
      running_[client->exec_id] = nullptr;
      append_frame(client->out, agent::kExit, 0, encode_exit(-1, 9), control::kExitTimedOut);
      client->state = State::kFinishing;
      client->deadline.reset();
    }
  }
}

std::optional<ExecMux::Clock::time_point> ExecMux::next_deadline() const {
  std::optional<Clock::time_point> next;
  if (stop_deadline_ && !stop_timeout_called_) next = stop_deadline_;
  for (const auto& client : clients_) {
    if (client->state == State::kRunning && client->deadline &&
        (!next || *client->deadline < *next)) {
      next = client->deadline;
    }
  }
  return next;
}

void ExecMux::write_client(Client& client) {
  ssize_t n =
      ::send(client.fd.get(), client.out.data(), client.out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n > 0) {
    client.out.erase(0, static_cast<size_t>(n));
  } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
    disconnect(client);
  }
}

void ExecMux::disconnect(Client& client) {
  if (client.state == State::kRunning) {
    // Nobody is listening any more: kill the command, and drop its output until its kExit.
    send_guest(agent::kSignal, client.exec_id, encode_signal(9));
    running_[client.exec_id] = nullptr;
  } else if (client.state == State::kQueued) {
    std::erase(queue_, &client);
  }
  client.gone = true;
  client.out.clear();
}

void ExecMux::fail(Client& client, const std::string& error) {
  if (client.state == State::kRunning) {
    running_.erase(client.exec_id);
  } else if (client.state == State::kQueued) {
    std::erase(queue_, &client);
  }
  // The error may echo what the client sent; a response must fit one frame.
  constexpr size_t kMaxError = 1024;
  client.out += json_frame(
      control::kResponse,
      {{"error", error.size() > kMaxError ? error.substr(0, kMaxError) + "..." : error}});
  client.state = State::kFinishing;
  client.deadline.reset();
}

}  // namespace msb::core
