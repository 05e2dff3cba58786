#include "tests/support.h"

#include <elf.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "guest/protocol/pattern.h"

extern char** environ;

namespace msb::test {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/msb-test.XXXXXX";
  if (!::mkdtemp(templ.data())) throw std::runtime_error("mkdtemp failed");
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

namespace {

std::vector<std::string> environment_with(const std::map<std::string, std::string>& env) {
  std::vector<std::string> out;
  for (char** e = environ; *e; ++e) {
    std::string entry = *e;
    std::string key = entry.substr(0, entry.find('='));
    if (!env.count(key)) out.push_back(entry);
  }
  for (const auto& [k, v] : env)
    out.push_back(k + "=" + v);
  return out;
}

std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings)
    out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::map<std::string, std::string>& env, const std::string& input) {
  int in[2], out[2], err[2];
  if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC) || ::pipe2(err, O_CLOEXEC)) {
    throw std::runtime_error("pipe failed");
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err[1], 2);
  std::vector<std::string> args = argv, envs = environment_with(env);
  auto c_args = c_strings(args), c_envs = c_strings(envs);
  pid_t pid;
  int rc = ::posix_spawn(&pid, args[0].c_str(), &actions, nullptr, c_args.data(), c_envs.data());
  posix_spawn_file_actions_destroy(&actions);
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  if (rc != 0) throw std::runtime_error("cannot start " + args[0] + ": " + std::strerror(rc));

  ProcessResult result;
  size_t written = 0;
  // Non-blocking, so that a write never waits for a child that is busy writing output itself.
  ::fcntl(in[1], F_SETFL, O_NONBLOCK);
  if (input.empty()) {
    ::close(in[1]);
    in[1] = -1;
  }
  // Feeds stdin and drains both outputs together so that no pipe fills up and blocks the child.
  while (out[0] >= 0 || err[0] >= 0) {
    pollfd fds[3] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}, {in[1], POLLOUT, 0}};
    ::poll(fds, 3, -1);
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? result.out : result.err).append(buf, static_cast<size_t>(n));
      } else if (n == 0 || errno != EINTR) {
        ::close(fds[i].fd);
        (i == 0 ? out[0] : err[0]) = -1;
      }
    }
    if (in[1] >= 0 && (fds[2].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t n = ::write(in[1], input.data() + written, input.size() - written);
      if (n > 0) written += static_cast<size_t>(n);
      if ((n < 0 && errno != EAGAIN && errno != EINTR) || written == input.size()) {
        ::close(in[1]);
        in[1] = -1;
      }
    }
  }
  if (in[1] >= 0) ::close(in[1]);
  result.exit_code = wait_process(pid);
  return result;
}

ProcessResult run_on_terminal(const std::vector<std::string>& argv,
                              const std::map<std::string, std::string>& env,
                              unsigned short columns) {
  winsize size{};
  size.ws_row = 24;
  size.ws_col = columns;
  int terminal = -1;
  pid_t pid = ::forkpty(&terminal, nullptr, nullptr, &size);
  if (pid < 0) throw std::runtime_error(std::string("forkpty failed: ") + std::strerror(errno));
  if (pid == 0) {
    for (const auto& [key, value] : env)
      ::setenv(key.c_str(), value.c_str(), 1);
    std::vector<char*> args;
    for (const auto& arg : argv)
      args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ProcessResult result;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(terminal, buf, sizeof buf);
    if (n > 0) {
      result.out.append(buf, static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;  // EIO: the program exited, and nothing else has the terminal open
    }
  }
  ::close(terminal);
  result.exit_code = wait_process(pid);
  return result;
}

pid_t spawn_process(const std::vector<std::string>& argv, const std::string& output) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  const char* target = output.empty() ? "/dev/null" : output.c_str();
  posix_spawn_file_actions_addopen(&actions, 1, target, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  std::vector<std::string> args = argv;
  auto c_args = c_strings(args);
  pid_t pid;
  int rc = ::posix_spawn(&pid, args[0].c_str(), &actions, nullptr, c_args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot start " + args[0] + ": " + std::strerror(rc));
  return pid;
}

int wait_process(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

std::vector<std::byte> make_data(uint64_t seed, size_t size) {
  std::vector<std::byte> data(size);
  std::mt19937_64 rng(seed);
  // The pool is the same for every seed: separate objects share these pages.
  static const std::vector<std::byte> pool = [] {
    std::vector<std::byte> p(16 * 4096);
    std::mt19937_64 pool_rng(12345);
    for (auto& b : p)
      b = std::byte(pool_rng() & 0xff);
    return p;
  }();
  for (size_t page = 0; page * 4096 < size; ++page) {
    size_t offset = page * 4096, length = std::min<size_t>(4096, size - offset);
    std::byte* out = data.data() + offset;
    switch (rng() % 10) {
      case 0:
      case 1:
      case 2:  // zero
        break;
      case 3:
      case 4:
      case 5:  // random
        for (size_t i = 0; i < length; ++i)
          out[i] = std::byte(rng() & 0xff);
        break;
      case 6:
      case 7:  // shared pool
        std::memcpy(out, pool.data() + (rng() % 16) * 4096, length);
        break;
      default: {  // text-like
        uint64_t word = rng();
        for (size_t i = 0; i < length; ++i)
          out[i] = std::byte('a' + ((word >> (i % 60)) + i / 7) % 26);
      }
    }
  }
  return data;
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string pattern_bytes(uint64_t seed, size_t size) {
  std::string out(size, '\0');
  for (size_t i = 0; i * 8 < size; ++i) {
    uint64_t word = msb::pattern::pattern_word(seed, i);
    std::memcpy(out.data() + i * 8, &word, std::min<size_t>(8, size - i * 8));
  }
  return out;
}

void skip_without_kvm(const std::string& needs) {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    std::printf("SKIPPED: /dev/kvm cannot be opened (%s): %s\n", std::strerror(errno),
                needs.c_str());
    std::exit(77);
  }
  ::close(fd);
}

// An ELF64 executable with one segment holding `code` at 1 MiB, entered there.
std::string tiny_kernel(const std::vector<uint8_t>& code) {
  Elf64_Ehdr ehdr{};
  std::memcpy(ehdr.e_ident, ELFMAG, SELFMAG);
  ehdr.e_ident[EI_CLASS] = ELFCLASS64;
  ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
  ehdr.e_ident[EI_VERSION] = EV_CURRENT;
  ehdr.e_type = ET_EXEC;
  ehdr.e_machine = EM_X86_64;
  ehdr.e_version = EV_CURRENT;
  ehdr.e_entry = 0x100000;
  ehdr.e_phoff = sizeof(Elf64_Ehdr);
  ehdr.e_ehsize = sizeof(Elf64_Ehdr);
  ehdr.e_phentsize = sizeof(Elf64_Phdr);
  ehdr.e_phnum = 1;
  Elf64_Phdr phdr{};
  phdr.p_type = PT_LOAD;
  phdr.p_flags = PF_R | PF_X;
  phdr.p_offset = sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr);
  phdr.p_vaddr = phdr.p_paddr = 0x100000;
  phdr.p_filesz = phdr.p_memsz = code.size();
  std::string file(reinterpret_cast<const char*>(&ehdr), sizeof ehdr);
  file.append(reinterpret_cast<const char*>(&phdr), sizeof phdr);
  file.append(code.begin(), code.end());
  return file;
}

}  // namespace msb::test
