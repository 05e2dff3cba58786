#include "guest/agent/exec.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "guest/agent/users.h"

namespace msb::agent {
namespace {

// What a child that could not exec tells its parent through the close-on-exec pipe.
struct ChildFailure {
  int stage;  // 0: working directory, 1: user, 2: exec
  int error;  // errno
};

[[noreturn]] void child_fail(int fd, int stage, int error) {
  ChildFailure failure{stage, error};
  (void)!::write(fd, &failure, sizeof failure);
  ::_exit(127);
}

std::string key_of(const std::string& entry) {
  return entry.substr(0, entry.find('='));
}

std::string lookup(const std::vector<std::string>& env, const std::string& key) {
  for (const auto& entry : env)
    if (key_of(entry) == key) return entry.substr(key.size() + 1);
  return {};
}

void close_pair(int fds[2]) {
  for (int i = 0; i < 2; ++i)
    if (fds[i] >= 0) ::close(fds[i]);
}

}  // namespace

std::vector<std::string> base_environment(const std::string& home) {
  return {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + home};
}

std::vector<std::string> merge_environment(const std::vector<std::string>& base,
                                           const std::vector<std::string>& sandbox,
                                           const std::vector<std::string>& exec) {
  std::vector<std::string> merged;
  for (const auto* layer : {&base, &sandbox, &exec}) {
    for (const auto& entry : *layer) {
      size_t eq = entry.find('=');
      if (eq == std::string::npos || eq == 0) continue;
      bool replaced = false;
      for (auto& existing : merged) {
        if (existing.compare(0, eq + 1, entry, 0, eq + 1) == 0) {
          existing = entry;
          replaced = true;
          break;
        }
      }
      if (!replaced) merged.push_back(entry);
    }
  }
  return merged;
}

bool start_process(const core::ExecRequest& request, const std::vector<std::string>& sandbox_env,
                   Process& process, StartError& error) {
  Credentials creds;
  bool as_user = !request.user.empty();
  if (as_user) {
    auto resolved = resolve_user(request.user, error.message);
    if (!resolved) {
      error.code = 126;
      return false;
    }
    creds = *resolved;
  } else {
    creds.home = "/root";
  }
  const std::vector<std::string> env =
      merge_environment(base_environment(creds.home), sandbox_env, request.env);
  const std::string workdir = request.workdir.empty() ? "/" : request.workdir;

  // Everything the child needs is prepared before fork.
  std::vector<char*> argv, envp;
  for (const auto& arg : request.argv)
    argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  for (const auto& entry : env)
    envp.push_back(const_cast<char*>(entry.c_str()));
  envp.push_back(nullptr);
  std::vector<std::string> candidates;
  const std::string& command = request.argv[0];
  if (command.find('/') != std::string::npos) {
    candidates.push_back(command);
  } else if (!command.empty()) {
    std::string path = lookup(env, "PATH");
    size_t start = 0;
    for (;;) {
      size_t end = path.find(':', start);
      std::string dir = path.substr(start, end - start);
      candidates.push_back((dir.empty() ? "." : dir) + "/" + command);
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }

  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, report[2] = {-1, -1};
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0 ||
      ::pipe2(report, O_CLOEXEC) != 0) {
    error = {126, std::string("cannot make pipes: ") + std::strerror(errno)};
    for (int* pair : {in, out, err, report})
      close_pair(pair);
    return false;
  }
  pid_t pid = ::fork();
  if (pid < 0) {
    error = {126, std::string("cannot fork: ") + std::strerror(errno)};
    for (int* pair : {in, out, err, report})
      close_pair(pair);
    return false;
  }
  if (pid == 0) {
    // The child: the agent's signal settings must not leak into the command.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int sig = 1; sig < NSIG; ++sig)
      ::signal(sig, SIG_DFL);
    ::setsid();
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    if (as_user) {
      if (::setgroups(creds.groups.size(), creds.groups.data()) != 0 || ::setgid(creds.gid) != 0 ||
          ::setuid(creds.uid) != 0) {
        child_fail(report[1], 1, errno);
      }
    }
    if (::chdir(workdir.c_str()) != 0) child_fail(report[1], 0, errno);
    int saved = ENOENT;
    for (const auto& candidate : candidates) {
      ::execve(candidate.c_str(), argv.data(), envp.data());
      // As a shell does: a candidate that exists but cannot run is what gets reported.
      if (errno != ENOENT && errno != ENOTDIR) saved = errno;
    }
    child_fail(report[1], 2, saved);
  }
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  ::close(report[1]);
  ChildFailure failure{};
  ssize_t n;
  do {
    n = ::read(report[0], &failure, sizeof failure);
  } while (n < 0 && errno == EINTR);
  ::close(report[0]);
  if (n == static_cast<ssize_t>(sizeof failure)) {
    ::waitpid(pid, nullptr, 0);
    ::close(in[1]);
    ::close(out[0]);
    ::close(err[0]);
    const char* why = std::strerror(failure.error);
    switch (failure.stage) {
      case 0:
        error = {126, "cannot enter the working directory " + workdir + ": " + why};
        break;
      case 1:
        error = {126, "cannot run as " + request.user + ": " + why};
        break;
      default:
        if (failure.error == ENOENT) {
          error = {127, command.find('/') == std::string::npos ? command + ": command not found"
                                                               : command + ": " + why};
        } else {
          error = {126, command + ": " + why};
        }
        break;
    }
    return false;
  }
  for (int fd : {in[1], out[0], err[0]})
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  process = {pid, in[1], out[0], err[0]};
  return true;
}

}  // namespace msb::agent
