#include "core/control_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/control_protocol.h"
#include "snapstore/error.h"

namespace msb::core {
namespace {

// sun_path holds 107 characters; a longer path is reached through the folder's descriptor.
struct Address {
  sockaddr_un addr{};
  snapstore::UniqueFd dir;
};

Address address_of(const std::filesystem::path& path) {
  Address a;
  a.addr.sun_family = AF_UNIX;
  std::string text = path.string();
  if (text.size() >= sizeof a.addr.sun_path) {
    int fd = ::open(path.parent_path().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) snapstore::throw_errno("cannot open " + path.parent_path().string());
    a.dir.reset(fd);
    text = "/proc/self/fd/" + std::to_string(fd) + "/" + path.filename().string();
  }
  std::memcpy(a.addr.sun_path, text.c_str(), text.size() + 1);
  return a;
}

}  // namespace

snapstore::UniqueFd connect_unix(const std::filesystem::path& socket_path) {
  Address a = address_of(socket_path);
  snapstore::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fd;
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a.addr), sizeof a.addr) != 0) {
    int saved = errno;
    fd.reset();
    errno = saved;
  }
  return fd;
}

snapstore::UniqueFd listen_unix(const std::filesystem::path& socket_path) {
  Address a = address_of(socket_path);
  snapstore::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw SandboxError("socket: " + std::string(std::strerror(errno)));
  ::unlink(a.addr.sun_path);
  // Only the owner may connect: the socket is created 0600 (and its folder is 0700).
  mode_t old_mask = ::umask(0077);
  int rc = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&a.addr), sizeof a.addr);
  int saved = errno;
  ::umask(old_mask);
  if (rc != 0 || ::listen(fd.get(), 128) != 0) {
    throw SandboxError("cannot listen on " + socket_path.string() + ": " +
                       std::strerror(rc != 0 ? saved : errno));
  }
  return fd;
}

void ControlConnection::send_request(const nlohmann::json& request) {
  std::string payload = request.dump();
  if (payload.size() > agent::kMaxPayload) {
    throw SandboxError("the request is " + std::to_string(payload.size()) +
                       " bytes (command, arguments and environment); at most " +
                       std::to_string(agent::kMaxPayload) + " fit in one");
  }
  std::string frame;
  append_frame(frame, control::kRequest, 0, payload);
  // send with MSG_NOSIGNAL: a VMM that died must be an error here, not a SIGPIPE that kills msb.
  std::string_view rest = frame;
  while (!rest.empty()) {
    ssize_t n = ::send(fd_.get(), rest.data(), rest.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      throw SandboxError(std::string("the sandbox's VMM went away (control socket: ") +
                         std::strerror(errno) + ")");
    }
    rest.remove_prefix(static_cast<size_t>(n));
  }
}

std::optional<Frame> ControlConnection::read_frame(
    std::optional<std::chrono::steady_clock::time_point> deadline, bool* timed_out) {
  if (timed_out) *timed_out = false;
  for (;;) {
    if (auto frame = in_.next()) return frame;
    if (in_.broken()) return std::nullopt;
    int timeout_ms = -1;
    if (deadline) {
      auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline -
                                                               std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        if (timed_out) *timed_out = true;
        return std::nullopt;
      }
      timeout_ms = static_cast<int>(std::min<long long>(left.count(), 60'000));
    }
    pollfd pfd{fd_.get(), POLLIN, 0};
    int rc = ::poll(&pfd, 1, timeout_ms);
    if (rc < 0 && errno != EINTR) return std::nullopt;
    if (rc <= 0) continue;
    char buf[65536];
    ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    in_.feed(std::string_view(buf, static_cast<size_t>(n)));
  }
}

std::optional<ExecResult> ControlConnection::exec(const ExecOptions& options, const ExecIo& io) {
  send_request({{"op", "exec"},
                {"argv", options.argv},
                {"env", options.env},
                {"workdir", options.workdir},
                {"user", options.user},
                {"timeout_ms", options.timeout.count()}});
  int flags = ::fcntl(fd_.get(), F_GETFL);
  ::fcntl(fd_.get(), F_SETFL, flags | O_NONBLOCK);

  // Input goes out as it can: the VMM stops reading while the guest is behind, and this loop
  // keeps reading output meanwhile, so neither side can block the other.
  std::string pending;
  bool input_done = io.stdin_fd < 0;
  if (input_done) append_frame(pending, agent::kStdin, 0, {});
  for (;;) {
    while (auto frame = in_.next()) {
      switch (frame->type) {
        case agent::kStdout:
          if (io.on_stdout) io.on_stdout(frame->payload);
          break;
        case agent::kStderr:
          if (io.on_stderr) io.on_stderr(frame->payload);
          break;
        case agent::kExit: {
          auto exit = decode_exit(frame->payload);
          if (!exit) throw SandboxError("malformed exit frame from the VMM process");
          return ExecResult{exit->code, exit->signal, (frame->flags & control::kExitTimedOut) != 0};
        }
        case control::kResponse: {
          auto body = nlohmann::json::parse(frame->payload, nullptr, false);
          throw SandboxError(body.is_object() && body.contains("error")
                                 ? body["error"].get<std::string>()
                                 : "unexpected response from the VMM process");
        }
        default:
          break;
      }
    }
    if (in_.broken()) throw SandboxError("the VMM process sent a malformed frame");

    pollfd fds[2] = {{fd_.get(), short(POLLIN | (pending.empty() ? 0 : POLLOUT)), 0},
                     {input_done || !pending.empty() ? -1 : io.stdin_fd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      snapstore::throw_errno("poll");
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      char buf[65536];
      ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return std::nullopt;
      if (n > 0) in_.feed(std::string_view(buf, static_cast<size_t>(n)));
    }
    if (!pending.empty() && (fds[0].revents & POLLOUT)) {
      ssize_t n = ::send(fd_.get(), pending.data(), pending.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) pending.erase(0, static_cast<size_t>(n));
      // A failed send means the VMM went away; the read side reports it.
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      char buf[agent::kMaxPayload];
      ssize_t n = ::read(io.stdin_fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        input_done = true;  // a read error ends the input like its end does
        append_frame(pending, agent::kStdin, 0, {});
      } else {
        append_frame(pending, agent::kStdin, 0, std::string_view(buf, static_cast<size_t>(n)));
      }
    }
  }
}

}  // namespace msb::core
