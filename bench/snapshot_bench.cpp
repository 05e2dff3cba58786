// msb-bench-snapshot: msb's snapshots next to the floor that no restore avoids and to QEMU's
// stop-and-migrate on the same guest, msb's own test guest (guest/testguest), in one run.
//
// For each guest size (--sizes, MiB) the guest first writes memory-like content over half its
// memory: the test guest's `load MIB` reads its stdin into guest memory from 32 MiB on, and the
// benchmark sends it real files of this machine in runs of zero and data pages
// (bench/memory_like.h, as msb-bench-store's buffer). A test guest without `load` gets `fill`'s
// pattern instead (incompressible), which the output says. Then:
//
//   floor  in this process: open /dev/kvm, KVM_CREATE_VM, the irqchip and PIT, one memory slot of
//          the guest's size, the vCPUs (as vmm::Machine builds them): what any restore pays
//          before the guest can run. Median of --floor-iterations.
//   msb    through the `msb` command, in a private $MSB_HOME: create, load, `snapshot create
//          --resume --json` (total time, how long the guest was paused, bytes it stored), then
//          16 MiB more written (`load 16` of fresh file pages) and the incremental snapshot;
//          `snapshot save-named`; --restores single restores (`msb restore --json`: to a running
//          guest, then to the reply of the first `msb exec echo`), the first one materializing
//          the snapshot's cache, the guest's memory checked with `sum` after one of them; then
//          forks of each --forks count (`msb restore --fork K`) until every fork answered an
//          exec, each fork's private host memory from /proc/PID/smaps_rollup and the part of its
//          guest RAM mapping that became private.
//   QEMU   `qemu-system-x86_64 -M microvm -enable-kvm` booting the same guest, the same content
//          loaded over its agent channel, then through QMP: `stop`, `migrate` to
//          `exec:cat > FILE` at unlimited bandwidth, polling `query-migrate` until completed
//          (paused = stop to completed); the file's size. Restore: a new QEMU with
//          `-incoming "exec:cat FILE"`, `cont` once the migration is in, until the guest answers
//          an echo (--restores times; the memory checked with `sum` once).
//
// It prints a table per guest size and the goals, met or NOT met with the ratio. It
// asserts no timing: a goal not met is a figure, not a failure. It removes every sandbox and
// kills every VMM and QEMU process it started, also when it fails or is interrupted; --keep
// leaves the temporary $MSB_HOME (sandboxes removed) for inspection.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <linux/kvm.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_util.h"
#include "bench/memory_like.h"
#include "bench/qemu_guest.h"
#include "guest/protocol/pattern.h"
#include "vmm/kvm.h"
#include "vmm/linux_boot.h"
#include "vmm/machine.h"
#include "vmm/machine_state.h"

#ifndef MSB_BINARY_DEFAULT
#define MSB_BINARY_DEFAULT "msb"
#endif
#ifndef MSB_TESTGUEST_DEFAULT
#define MSB_TESTGUEST_DEFAULT "testguest"
#endif

extern char** environ;

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace msb::bench;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// Where the test guest's fill, sum and load work (guest/testguest/README.md).
constexpr uint64_t kGuestAreaStartMiB = 32;
// What the incremental snapshot follows (the 16 MiB).
constexpr uint64_t kIncrementMiB = 16;

struct Options {
  unsigned runs = 1;
  unsigned restores = 5;
  unsigned floor_iterations = 20;
  std::vector<unsigned> sizes = {256, 1024};
  std::vector<unsigned> forks = {10, 50, 100};
  unsigned exec_parallel = 8;
  bool no_qemu = false;
  bool no_msb = false;
  bool keep = false;
  std::string msb = MSB_BINARY_DEFAULT;
  std::string testguest = MSB_TESTGUEST_DEFAULT;
  std::string qemu = "qemu-system-x86_64";
  double timeout_s = 300;
  uint64_t seed = 1;
};

double mib(double bytes) {
  return bytes / static_cast<double>(kMiB);
}

// "12.3", or "-" for a figure not measured.
std::string fmt(double value, const char* format = "%.1f") {
  return std::isnan(value) ? std::string("-") : strf(format, value);
}

// --- Child processes --------------------------------------------------------------------------

struct CommandResult {
  int status = 0;  // the exit code, or 128 + the signal
  std::string out, err;
  double seconds = 0;
};

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// Runs `argv` with `input` as its stdin (nullptr: /dev/null), collecting stdout and stderr, and
// kills it after `timeout_s` or when the benchmark is interrupted. Safe to call from several
// threads at once (posix_spawn; every descriptor is close-on-exec).
CommandResult run_command(const std::vector<std::string>& argv, double timeout_s,
                          const std::span<const std::byte>* input = nullptr,
                          const std::vector<std::string>& extra_env = {},
                          bool interruptible = true) {
  int in_pipe[2] = {-1, -1}, out_pipe[2], err_pipe[2];
  if (input != nullptr && ::pipe2(in_pipe, O_CLOEXEC) != 0) fail_errno("pipe");
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) fail_errno("pipe");
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) fail_errno("pipe");
  ScopedFd in_write{in_pipe[1]}, in_read{in_pipe[0]};
  ScopedFd out_read{out_pipe[0]}, out_write{out_pipe[1]};
  ScopedFd err_read{err_pipe[0]}, err_write{err_pipe[1]};

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (input != nullptr) {
    posix_spawn_file_actions_adddup2(&actions, in_read.fd, 0);
  } else {
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&actions, out_write.fd, 1);
  posix_spawn_file_actions_adddup2(&actions, err_write.fd, 2);
  std::vector<char*> args;
  for (const auto& a : argv)
    args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  // The environment, with `extra_env` (K=V) over it.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view entry(*e);
    bool replaced = false;
    for (const auto& extra : extra_env)
      replaced =
          replaced || entry.substr(0, extra.find('=') + 1) == extra.substr(0, extra.find('=') + 1);
    if (!replaced) env_strings.emplace_back(entry);
  }
  env_strings.insert(env_strings.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> env;
  for (auto& e : env_strings)
    env.push_back(e.data());
  env.push_back(nullptr);
  // The child starts with the default action for the signals this program catches or ignores.
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int sig : {SIGPIPE, SIGINT, SIGTERM, SIGHUP})
    sigaddset(&defaults, sig);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF);
  double start = wall_seconds();
  pid_t pid = -1;
  int spawned = ::posix_spawnp(&pid, args[0], &actions, &attributes, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (spawned != 0) throw BenchError("cannot run " + argv[0] + ": " + std::strerror(spawned));
  ::close(in_read.release());
  ::close(out_write.release());
  ::close(err_write.release());
  if (input != nullptr) {
    set_nonblocking(in_write.fd);
    ::fcntl(in_write.fd, F_SETPIPE_SZ, 1 << 20);
  }
  set_nonblocking(out_read.fd);
  set_nonblocking(err_read.fd);

  CommandResult result;
  size_t input_pos = 0;
  if (input != nullptr && input->empty()) ::close(in_write.release());
  std::string failure;
  while (out_read.fd >= 0 || err_read.fd >= 0) {
    if (interruptible && interrupted()) {
      failure = "interrupted";
      break;
    }
    if (wall_seconds() - start > timeout_s) {
      failure = strf("timed out after %.0f s", timeout_s);
      break;
    }
    pollfd fds[3];
    nfds_t n = 0;
    if (out_read.fd >= 0) fds[n++] = {out_read.fd, POLLIN, 0};
    if (err_read.fd >= 0) fds[n++] = {err_read.fd, POLLIN, 0};
    if (in_write.fd >= 0) fds[n++] = {in_write.fd, POLLOUT, 0};
    int ready = ::poll(fds, n, 200);
    if (ready < 0 && errno != EINTR) fail_errno("poll");
    if (ready <= 0) continue;
    for (nfds_t i = 0; i < n; ++i) {
      if (fds[i].revents == 0) continue;
      if (fds[i].fd == in_write.fd) {
        ssize_t w = ::write(in_write.fd, input->data() + input_pos,
                            std::min<size_t>(input->size() - input_pos, 1 << 20));
        if (w > 0) input_pos += static_cast<size_t>(w);
        if ((w < 0 && errno != EAGAIN && errno != EINTR) || input_pos == input->size())
          ::close(in_write.release());  // done, or the command stopped reading (EPIPE)
        continue;
      }
      ScopedFd& source = fds[i].fd == out_read.fd ? out_read : err_read;
      std::string& sink = fds[i].fd == out_read.fd ? result.out : result.err;
      char buffer[65536];
      ssize_t r = ::read(source.fd, buffer, sizeof buffer);
      if (r > 0) {
        sink.append(buffer, static_cast<size_t>(r));
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        ::close(source.release());
      }
    }
  }
  if (!failure.empty()) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.seconds = wall_seconds() - start;
  if (!failure.empty()) {
    std::string command;
    for (const auto& a : argv)
      command += (command.empty() ? "" : " ") + a;
    throw BenchError(command + ": " + failure);
  }
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

// One line of a command's stderr for messages.
std::string one_line(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' '))
    text.pop_back();
  std::replace(text.begin(), text.end(), '\n', '|');
  if (text.size() > 400) text = text.substr(0, 400) + "...";
  return text;
}

// --- msb, in a private $MSB_HOME --------------------------------------------------------------

class Msb {
 public:
  Msb(std::string binary, fs::path home, double timeout_s)
      : binary_(std::move(binary)), home_(std::move(home)), timeout_s_(timeout_s) {}

  const fs::path& home() const { return home_; }

  CommandResult run(std::vector<std::string> args,
                    const std::span<const std::byte>* input = nullptr,
                    std::optional<double> timeout_s = std::nullopt,
                    bool interruptible = true) const {
    args.insert(args.begin(), {binary_, "--home", home_.string()});
    return run_command(args, timeout_s.value_or(timeout_s_), input, {"MSB_HOME=" + home_.string()},
                       interruptible);
  }
  // Runs it and throws with its stderr unless it exits 0.
  CommandResult check(const std::vector<std::string>& args,
                      const std::span<const std::byte>* input = nullptr) const {
    CommandResult r = run(args, input);
    if (r.status != 0) throw BenchError(describe(args, r));
    return r;
  }
  json check_json(const std::vector<std::string>& args) const {
    CommandResult r = check(args);
    try {
      return json::parse(r.out);
    } catch (const json::exception& e) {
      throw BenchError("msb " + join(args) + ": its output is not JSON (" + e.what() +
                       "): " + one_line(r.out));
    }
  }
  static std::string describe(const std::vector<std::string>& args, const CommandResult& r) {
    return strf("msb %s: exit %d: %s", join(args).c_str(), r.status, one_line(r.err).c_str());
  }

  fs::path sandbox_dir(const std::string& name) const { return home_ / "sandboxes" / name; }

  // The sandbox's VMM process, 0 if there is none.
  int vmm_pid(const std::string& name) const {
    std::ifstream in(sandbox_dir(name) / "pid");
    int pid = 0;
    in >> pid;
    return pid > 0 && is_vmm(pid, name) ? pid : 0;
  }
  bool is_vmm(int pid, const std::string& name) const {
    std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return cmdline.find(std::string("__vmm") + '\0') != std::string::npos &&
           cmdline.find("/sandboxes/" + name + '\0') != std::string::npos;
  }

  // Removes every sandbox of this home (`msb rm -f`), then kills any VMM process of it that is
  // still there. Never throws; says what it could not do.
  void remove_all_sandboxes() const noexcept {
    try {
      std::vector<std::pair<std::string, int>> vmms;
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(home_ / "sandboxes", ec)) {
        std::string name = entry.path().filename().string();
        vmms.emplace_back(name, vmm_pid(name));
      }
      for (size_t i = 0; i < vmms.size(); i += 64) {
        std::vector<std::string> args = {"rm", "-f"};
        for (size_t j = i; j < std::min(vmms.size(), i + 64); ++j)
          args.push_back(vmms[j].first);
        try {
          // Also after an interrupt: this is the cleanup.
          CommandResult r = run(args, nullptr, 120.0, /*interruptible=*/false);
          if (r.status != 0) std::fprintf(stderr, "  cleanup: %s\n", describe(args, r).c_str());
        } catch (const std::exception& e) {
          std::fprintf(stderr, "  cleanup: %s\n", e.what());
        }
      }
      for (const auto& [name, pid] : vmms) {
        if (pid > 0 && is_vmm(pid, name)) {
          std::fprintf(stderr, "  cleanup: the VMM of %s (pid %d) outlived msb rm: killed\n",
                       name.c_str(), pid);
          ::kill(pid, SIGKILL);
        }
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  cleanup: %s\n", e.what());
    }
  }

  static std::string join(const std::vector<std::string>& args) {
    std::string s;
    for (const auto& a : args)
      s += (s.empty() ? "" : " ") + a;
    return s;
  }

 private:
  std::string binary_;
  fs::path home_;
  double timeout_s_;
};

// --- The content the guest writes -------------------------------------------------------------

// An anonymous mapping, unmapped on destruction.
struct Buffer {
  std::byte* data = nullptr;
  size_t size = 0;
  explicit Buffer(size_t bytes) : size(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail_errno(strf("cannot map %.0f MiB", mib(static_cast<double>(bytes))));
    data = static_cast<std::byte*>(p);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { ::munmap(data, size); }
  std::span<const std::byte> span() const { return {data, size}; }
};

uint64_t checksum_words(uint64_t checksum, std::span<const std::byte> bytes) {
  for (size_t i = 0; i + 8 <= bytes.size(); i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes.data() + i, 8);
    checksum = msb::pattern::checksum_update(checksum, word);
  }
  return checksum;
}

struct Content {
  bool memory_like = true;  // false: `fill`'s pattern (no `load` in the guest)
  uint64_t mib = 0;         // written from 32 MiB on
  std::unique_ptr<Buffer> bytes;
  std::unique_ptr<Buffer> increment;  // kIncrementMiB written over the first part afterwards
  uint64_t zero_pages = 0, pages = 0;
  uint64_t checksum = 0;                  // `sum MIB` after the content was written
  uint64_t checksum_after_increment = 0;  // and after the increment
  uint64_t seed = 0, increment_seed = 0;  // fill's seeds
  bool wrapped = false;                   // the files ran out and repeat

  // The command that writes it (stdin: `input`, or none for fill).
  std::vector<std::string> write_command() const {
    if (memory_like) return {"load", std::to_string(mib)};
    return {"fill", std::to_string(mib), std::to_string(seed)};
  }
  std::vector<std::string> increment_command() const {
    if (memory_like) return {"load", std::to_string(kIncrementMiB)};
    return {"fill", std::to_string(kIncrementMiB), std::to_string(increment_seed)};
  }
};

Content build_content(uint64_t mib_count, bool memory_like, uint64_t seed) {
  Content c;
  c.memory_like = memory_like;
  c.mib = mib_count;
  c.seed = seed;
  c.increment_seed = seed + 1000;
  c.bytes = std::make_unique<Buffer>(mib_count * kMiB);
  c.increment = std::make_unique<Buffer>(kIncrementMiB * kMiB);
  c.pages = mib_count * kMiB / kMemoryLikePage;
  if (memory_like) {
    FileStream files(memory_like_roots());
    MemoryLikeLayout layout =
        fill_memory_like(std::span<std::byte>(c.bytes->data, c.bytes->size), seed, files);
    c.zero_pages = layout.zero_pages;
    // Fresh data pages the store cannot have seen: the files' pages after those above.
    for (size_t i = 0; i < c.increment->size / kMemoryLikePage; ++i)
      files.next_page(c.increment->data + i * kMemoryLikePage);
    c.wrapped = files.wrapped();
  } else {
    auto write_pattern = [](Buffer& b, uint64_t s) {
      for (size_t i = 0; i < b.size / 8; ++i) {
        uint64_t word = msb::pattern::pattern_word(s, i);
        std::memcpy(b.data + i * 8, &word, 8);
      }
    };
    write_pattern(*c.bytes, c.seed);
    write_pattern(*c.increment, c.increment_seed);
  }
  c.checksum = checksum_words(msb::pattern::kChecksumInit, c.bytes->span());
  uint64_t after = checksum_words(msb::pattern::kChecksumInit, c.increment->span());
  c.checksum_after_increment = checksum_words(after, c.bytes->span().subspan(c.increment->size));
  return c;
}

std::string checksum_text(uint64_t checksum) {
  return strf("%016llx\n", static_cast<unsigned long long>(checksum));
}

// --- The floor: what KVM costs before any restored guest can run ------------------------------

struct FloorFigures {
  double median_s = kNaN, min_s = kNaN, max_s = kNaN;
  double teardown_s = kNaN;  // median of closing it all again
};

// As vmm::Machine builds a VM (vmm/machine.cpp): /dev/kvm, KVM_CREATE_VM, TSS and identity map,
// the irqchip and PIT (before the memory slot, as msb does), the guest RAM mapping and its slots,
// the vCPUs with their kvm_run pages. Returns {build, teardown} seconds.
std::pair<double, double> floor_once(uint64_t memory_mib, unsigned cpus) {
  namespace kvm = msb::vmm::kvm;
  double start = wall_seconds();
  double built = 0;
  {
    msb::snapstore::UniqueFd system = kvm::open_system();
    msb::snapstore::UniqueFd vm(
        kvm::ioctl_or_throw(system.get(), KVM_CREATE_VM, 0ul, "KVM_CREATE_VM"));
    kvm::ioctl_or_throw(vm.get(), KVM_SET_TSS_ADDR, 0xfffbd000ul, "KVM_SET_TSS_ADDR");
    uint64_t identity_map = 0xfffbc000;
    kvm::ioctl_or_throw(vm.get(), KVM_SET_IDENTITY_MAP_ADDR, &identity_map,
                        "KVM_SET_IDENTITY_MAP_ADDR");
    kvm::ioctl_or_throw(vm.get(), KVM_CREATE_IRQCHIP, 0ul, "KVM_CREATE_IRQCHIP");
    kvm_pit_config pit{};
    pit.flags = KVM_PIT_SPEAKER_DUMMY;
    kvm::ioctl_or_throw(vm.get(), KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");
    const uint64_t ram_size = memory_mib * kMiB;
    void* ram = ::mmap(nullptr, ram_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) fail_errno("cannot map guest memory");
    uint64_t offset = 0;
    uint32_t slot = 0;
    for (const auto& range : msb::vmm::boot::ram_ranges(ram_size)) {
      kvm_userspace_memory_region region{};
      region.slot = slot++;
      region.guest_phys_addr = range.start;
      region.memory_size = range.size;
      region.userspace_addr = reinterpret_cast<uint64_t>(static_cast<std::byte*>(ram) + offset);
      kvm::ioctl_or_throw(vm.get(), KVM_SET_USER_MEMORY_REGION, &region,
                          "KVM_SET_USER_MEMORY_REGION");
      offset += range.size;
    }
    int run_size =
        kvm::ioctl_or_throw(system.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, "KVM_GET_VCPU_MMAP_SIZE");
    std::vector<msb::snapstore::UniqueFd> vcpus;
    std::vector<void*> runs;
    for (unsigned i = 0; i < cpus; ++i) {
      vcpus.emplace_back(kvm::ioctl_or_throw(vm.get(), KVM_CREATE_VCPU,
                                             static_cast<unsigned long>(i), "KVM_CREATE_VCPU"));
      void* run = ::mmap(nullptr, static_cast<size_t>(run_size), PROT_READ | PROT_WRITE, MAP_SHARED,
                         vcpus.back().get(), 0);
      if (run == MAP_FAILED) fail_errno("cannot map kvm_run");
      runs.push_back(run);
    }
    built = wall_seconds();
    for (void* run : runs)
      ::munmap(run, static_cast<size_t>(run_size));
    vcpus.clear();
    vm.reset();
    ::munmap(ram, ram_size);
  }
  return {built - start, wall_seconds() - built};
}

FloorFigures measure_floor(uint64_t memory_mib, unsigned iterations) {
  std::vector<double> build, teardown;
  for (unsigned i = 0; i < iterations; ++i) {
    auto [b, t] = floor_once(memory_mib, 1);
    build.push_back(b);
    teardown.push_back(t);
  }
  FloorFigures f;
  f.median_s = percentile(build, 0.5);
  f.min_s = *std::min_element(build.begin(), build.end());
  f.max_s = *std::max_element(build.begin(), build.end());
  f.teardown_s = percentile(teardown, 0.5);
  return f;
}

// --- Process memory ---------------------------------------------------------------------------

struct ProcMemory {
  bool ok = false;
  double rss_kib = 0, pss_kib = 0, private_kib = 0, anon_kib = 0;
  // The largest mapping: the guest's RAM.
  double guest_size_kib = 0, guest_rss_kib = 0, guest_private_kib = 0, guest_anon_kib = 0;
};

ProcMemory proc_memory(int pid) {
  ProcMemory m;
  const std::string base = "/proc/" + std::to_string(pid);
  auto field = [](const std::string& line, const char* name, double& into) {
    size_t n = std::strlen(name);
    if (line.compare(0, n, name) == 0 && line.size() > n && line[n] == ':') {
      into += std::strtod(line.c_str() + n + 1, nullptr);
      return true;
    }
    return false;
  };
  {
    std::ifstream in(base + "/smaps_rollup");
    std::string line;
    double private_clean = 0, private_dirty = 0;
    while (std::getline(in, line)) {
      field(line, "Rss", m.rss_kib);
      field(line, "Pss", m.pss_kib);
      field(line, "Private_Clean", private_clean);
      field(line, "Private_Dirty", private_dirty);
      field(line, "Anonymous", m.anon_kib);
      m.ok = true;
    }
    m.private_kib = private_clean + private_dirty;
  }
  {
    std::ifstream in(base + "/smaps");
    std::string line;
    struct Mapping {
      double size = 0, rss = 0, private_clean = 0, private_dirty = 0, anon = 0;
    };
    Mapping current, largest;
    bool have = false;
    auto finish = [&] {
      if (have && current.size > largest.size) largest = current;
    };
    while (std::getline(in, line)) {
      // A mapping's header: "start-end perms offset dev inode [path]".
      if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
          line.find('-') != std::string::npos && line.find(':') > line.find(' ')) {
        finish();
        current = Mapping{};
        have = true;
        continue;
      }
      field(line, "Size", current.size) || field(line, "Rss", current.rss) ||
          field(line, "Private_Clean", current.private_clean) ||
          field(line, "Private_Dirty", current.private_dirty) ||
          field(line, "Anonymous", current.anon);
    }
    finish();
    m.guest_size_kib = largest.size;
    m.guest_rss_kib = largest.rss;
    m.guest_private_kib = largest.private_clean + largest.private_dirty;
    m.guest_anon_kib = largest.anon;
  }
  return m;
}

// --- QEMU's monitor -----------------------------------------------------------------------------

class QmpClient {
 public:
  explicit QmpClient(int fd) : fd_(fd) {}
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;
  ~QmpClient() {
    if (fd_ >= 0) ::close(fd_);
  }

  // The greeting, then qmp_capabilities.
  void handshake(double deadline) {
    json greeting = read_message(deadline);
    if (!greeting.contains("QMP")) throw BenchError("QMP: no greeting: " + greeting.dump());
    command("qmp_capabilities", json::object(), deadline);
  }

  json command(const std::string& name, const json& arguments, double deadline) {
    json message = {{"execute", name}};
    if (!arguments.empty()) message["arguments"] = arguments;
    std::string text = message.dump() + "\n";
    if (::send(fd_, text.data(), text.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(text.size()))
      fail_errno("QMP " + name + ": send");
    for (;;) {
      json reply = read_message(deadline);
      if (reply.contains("event")) continue;
      if (reply.contains("error"))
        throw BenchError("QMP " + name + ": " + reply["error"].value("desc", reply.dump()));
      if (reply.contains("return")) return reply["return"];
    }
  }

 private:
  json read_message(double deadline) {
    for (;;) {
      size_t newline = buffer_.find('\n');
      if (newline != std::string::npos) {
        std::string line = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
        try {
          return json::parse(line);
        } catch (const json::exception& e) {
          throw BenchError("QMP: not JSON: " + line);
        }
      }
      if (interrupted()) throw BenchError("QMP: interrupted");
      double left = deadline - wall_seconds();
      if (left <= 0) throw BenchError("QMP: timed out");
      pollfd p{fd_, POLLIN, 0};
      int ready = ::poll(&p, 1, static_cast<int>(std::clamp(left * 1e3, 1.0, 200.0)));
      if (ready < 0 && errno != EINTR) fail_errno("QMP: poll");
      if (ready <= 0) continue;
      char chunk[65536];
      ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n == 0) throw BenchError("QMP: QEMU closed its monitor");
      if (n < 0 && errno != EINTR && errno != EAGAIN) fail_errno("QMP: recv");
      if (n > 0) buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  int fd_;
  std::string buffer_;
};

// A QEMU running msb's test guest: the agent channel on its fd 3, QMP on its fd 4.
class QemuGuest {
 public:
  QemuGuest(const Options& options, uint64_t memory_mib, const fs::path& work,
            const std::string& tag, const std::string& incoming = "") {
    std::vector<std::string> argv = qemu_testguest_args(
        options.qemu, /*kvm=*/true, memory_mib, options.testguest, work / (tag + ".serial"));
    argv.insert(argv.end(), {"-chardev", "socket,id=qmp,fd=4", "-mon", "chardev=qmp,mode=control"});
    if (!incoming.empty()) argv.insert(argv.end(), {"-incoming", incoming});
    int agent_fds[2], qmp_fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, agent_fds) != 0)
      fail_errno("socketpair");
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, qmp_fds) != 0) {
      ::close(agent_fds[0]);
      ::close(agent_fds[1]);
      fail_errno("socketpair");
    }
    agent_ = std::make_unique<AgentChannel>(agent_fds[1]);
    qmp_ = std::make_unique<QmpClient>(qmp_fds[1]);
    ScopedFd agent_end{agent_fds[0]}, qmp_end{qmp_fds[0]};
    log_ = work / (tag + ".log");
    started_ = wall_seconds();
    process_ =
        std::make_unique<QemuProcess>(argv, log_, std::vector<int>{agent_end.fd, qmp_end.fd});
  }

  double started() const { return started_; }
  AgentChannel& agent() { return *agent_; }
  QmpClient& qmp() { return *qmp_; }
  QemuProcess& process() { return *process_; }
  // What QEMU printed, for error messages.
  std::string log_tail() const { return tail_of_file(log_); }
  uint32_t next_id() { return next_id_++; }

 private:
  std::unique_ptr<AgentChannel> agent_;
  std::unique_ptr<QmpClient> qmp_;
  std::unique_ptr<QemuProcess> process_;
  fs::path log_;
  double started_ = 0;
  uint32_t next_id_ = 1;
};

// --- Figures ----------------------------------------------------------------------------------

struct SnapshotFigures {
  double wall_s = kNaN;  // the command, as the user waits for it
  double paused_ms = kNaN, total_ms = kNaN, capture_ms = kNaN, store_ms = kNaN;
  double memory_bytes = kNaN, stored_bytes = kNaN;
  double chunks_read = kNaN, chunks = kNaN;
  std::string handle, parent;
};

struct RestoreFigures {
  double wall_s = kNaN;    // `msb restore` until it returned (the guest answered)
  double total_ms = kNaN;  // as msb reports it
  double materialize_ms = kNaN;
  double exec_s = kNaN;      // the first `msb exec echo` afterwards
  double to_reply_s = kNaN;  // from the restore's start to that exec's reply
};

// In this process, as msb's VMM process does it (core/vmm_process.cpp), from the snapshot's
// materialized cache ($MSB_HOME/cache/snapshots/HANDLE: state.json, memory, disk).
struct LibraryRestoreFigures {
  double state_s = kNaN;    // reading and parsing state.json
  double restore_s = kNaN;  // vmm::Machine::restore
  double running_s = kNaN;  // ... and start(): the vCPUs run (from the start, state included)
  double ready_s = kNaN;    // ... and the guest answered kRestore with kReady
  double reply_s = kNaN;    // ... and the first `echo hi` answered
};

struct ForkFigures {
  unsigned count = 0;
  double restore_wall_s = kNaN, restore_total_ms = kNaN;
  double all_answered_s = kNaN;  // from the restore's start until every fork answered an echo
  double rm_s = kNaN;
  double idle_cores = kNaN;      // the machine's busy cores over 1 s with the forks idle
  double baseline_cores = kNaN;  // the same just before they were restored
  // Per fork, KiB: private (clean + dirty), Rss, Pss; of the guest RAM mapping, private.
  std::vector<double> private_kib, rss_kib, pss_kib, guest_private_kib, other_private_kib;
  unsigned memory_unread = 0;  // forks whose memory could not be read
};

struct MsbFigures {
  std::string failure;  // why the rest was not measured
  double create_s = kNaN, load_s = kNaN, increment_s = kNaN;
  SnapshotFigures full, incremental;
  double inspect_total_bytes = kNaN;  // all chunks the full snapshot references
  double inspect_incremental_total_bytes = kNaN;
  RestoreFigures first_restore;          // materializes the snapshot's cache
  std::vector<RestoreFigures> restores;  // with the cache there
  std::vector<LibraryRestoreFigures> library_restores;
  std::string library_failure;
  std::string verified;  // "sum matches" or what did not
  std::vector<ForkFigures> forks;
};

struct QemuRestoreFigures {
  double incoming_s = kNaN;  // from the start of QEMU until the migration is in
  double running_s = kNaN;   // ... until `cont` returned (QEMU reports running)
  double echo_s = kNaN;      // ... until the guest answered an echo
};

struct QemuFigures {
  std::string failure;
  double boot_s = kNaN, load_s = kNaN;
  double paused_s = kNaN;                                // stop until the migration completed
  double stop_s = kNaN;                                  // the stop command alone
  double qemu_downtime_ms = kNaN, qemu_total_ms = kNaN;  // as query-migrate reports them
  double file_bytes = kNaN;
  std::vector<QemuRestoreFigures> restores;
  std::string verified;
};

struct SizeRun {
  FloorFigures floor;
  MsbFigures msb;
  QemuFigures qemu;
};

// --- The msb side -----------------------------------------------------------------------------

SnapshotFigures parse_snapshot(const json& j, double wall_s) {
  SnapshotFigures s;
  s.wall_s = wall_s;
  auto number = [&](const char* key) {
    return j.contains(key) && j[key].is_number() ? j[key].get<double>() : kNaN;
  };
  s.paused_ms = number("paused_ms");
  s.total_ms = number("total_ms");
  s.capture_ms = number("capture_ms");
  s.store_ms = number("store_ms");
  s.memory_bytes = number("memory_bytes");
  s.stored_bytes = number("stored_bytes");
  s.chunks_read = number("memory_chunks_read");
  s.chunks = number("memory_chunks");
  s.handle = j.value("handle", "");
  if (j.contains("parent") && j["parent"].is_string()) s.parent = j["parent"].get<std::string>();
  return s;
}

// Runs `msb exec NAME -- ARGV` with `input`, checking the checksum it prints.
// Runs `msb exec NAME -- ARGV` with `input`; then `sum` checks that the guest's memory holds
// `area_checksum` over `area_mib` (the checksum the command printed is not relied on).
double msb_write(const Msb& msb, const std::string& name, const std::vector<std::string>& argv,
                 const std::span<const std::byte>* input, uint64_t area_mib,
                 uint64_t area_checksum) {
  std::vector<std::string> args = {"exec", name, "--"};
  args.insert(args.end(), argv.begin(), argv.end());
  CommandResult r = msb.check(args, input);
  CommandResult sum = msb.check({"exec", name, "--", "sum", std::to_string(area_mib)});
  if (sum.out != checksum_text(area_checksum))
    throw BenchError(strf("after msb %s the guest's memory sums to \"%s\", not \"%s\"",
                          Msb::join(args).c_str(), one_line(sum.out).c_str(),
                          one_line(checksum_text(area_checksum)).c_str()));
  return r.seconds;
}

std::string verify_sum(const CommandResult& r, uint64_t want) {
  if (r.status != 0) return strf("sum failed: exit %d: %s", r.status, one_line(r.err).c_str());
  if (r.out != checksum_text(want))
    return strf("MISMATCH: the restored guest's memory sums to %s, want %s",
                one_line(r.out).c_str(), one_line(checksum_text(want)).c_str());
  return "sum matches";
}

// Every fork answers `msb exec NAME -- echo hi`, `parallel` at a time. Returns when all did.
void exec_all(const Msb& msb, const std::vector<std::string>& names, unsigned parallel) {
  std::atomic<size_t> next{0};
  std::mutex mutex;
  std::string failure;
  auto worker = [&] {
    for (;;) {
      size_t i = next++;
      if (i >= names.size()) return;
      {
        std::lock_guard lock(mutex);
        if (!failure.empty()) return;
      }
      try {
        CommandResult r = msb.run({"exec", names[i], "--", "echo", "hi"});
        if (r.status != 0 || r.out != "hi\n")
          throw BenchError(strf("msb exec %s -- echo hi: exit %d: %s", names[i].c_str(), r.status,
                                one_line(r.err + r.out).c_str()));
      } catch (const std::exception& e) {
        std::lock_guard lock(mutex);
        if (failure.empty()) failure = e.what();
      }
    }
  };
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < std::max(1u, parallel); ++t)
    threads.emplace_back(worker);
  for (auto& t : threads)
    t.join();
  if (!failure.empty()) throw BenchError(failure);
}

ForkFigures measure_forks(const Msb& msb, const std::string& snapshot, unsigned count,
                          const Options& options) {
  ForkFigures f;
  f.count = count;
  const std::string prefix = strf("fork%u", count);
  auto busy_cores_over_a_second = [] {
    CpuAccount before = cpu_account();
    ::usleep(1000000);
    CpuAccount after = cpu_account();
    return (after.machine_busy_s - before.machine_busy_s) / (after.wall_s - before.wall_s);
  };
  f.baseline_cores = busy_cores_over_a_second();
  double start = wall_seconds();
  json j = msb.check_json(
      {"restore", snapshot, "--name", prefix, "--fork", std::to_string(count), "--json"});
  f.restore_wall_s = wall_seconds() - start;
  if (j.contains("total_ms") && j["total_ms"].is_number())
    f.restore_total_ms = j["total_ms"].get<double>();
  std::vector<std::string> names;
  if (j.contains("sandboxes") && j["sandboxes"].is_array()) {
    for (const auto& n : j["sandboxes"])
      names.push_back(n.get<std::string>());
  }
  if (names.size() != count)
    throw BenchError(strf("msb restore --fork %u listed %zu sandboxes", count, names.size()));
  exec_all(msb, names, options.exec_parallel);
  f.all_answered_s = wall_seconds() - start;
  for (const auto& name : names) {
    int pid = msb.vmm_pid(name);
    ProcMemory m = pid > 0 ? proc_memory(pid) : ProcMemory{};
    if (!m.ok) {
      ++f.memory_unread;
      continue;
    }
    f.private_kib.push_back(m.private_kib);
    f.rss_kib.push_back(m.rss_kib);
    f.pss_kib.push_back(m.pss_kib);
    f.guest_private_kib.push_back(m.guest_private_kib);
    f.other_private_kib.push_back(m.private_kib - m.guest_private_kib);
  }
  // What the idle forks cost the host: their guests' timer ticks, each an exit to the VMM.
  f.idle_cores = busy_cores_over_a_second();
  double rm_start = wall_seconds();
  std::vector<std::string> rm = {"rm", "-f"};
  rm.insert(rm.end(), names.begin(), names.end());
  msb.check(rm);
  f.rm_s = wall_seconds() - rm_start;
  return f;
}

// The kRestore frame's payload, as msb's VMM process sends it.
std::string restore_payload(uint64_t memory_mib, unsigned cpus, const std::string& name) {
  msb::agent::RestorePayload payload{};
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  payload.wall_clock_ns =
      static_cast<uint64_t>(now.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(now.tv_nsec);
  payload.memory_mib = memory_mib;
  payload.cpus = cpus;
  if (::getrandom(payload.entropy, sizeof payload.entropy, 0) !=
      static_cast<ssize_t>(sizeof payload.entropy))
    fail_errno("getrandom");
  std::string out(reinterpret_cast<const char*>(&payload), sizeof payload);
  out += name;
  out += '\0';
  return out;
}

LibraryRestoreFigures library_restore(const fs::path& cache, const fs::path& work) {
  using msb::vmm::Machine;
  LibraryRestoreFigures f;
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) fail_errno("socketpair");
  AgentChannel channel(fds[1]);
  ScopedFd vmm_end{fds[0]};
  ScopedFd log{::open("/dev/null", O_WRONLY | O_CLOEXEC)};
  const fs::path overlay = work / "library-restore.overlay";
  std::error_code ignored;
  fs::remove(overlay, ignored);

  double start = wall_seconds();
  std::ifstream in(cache / "state.json");
  msb::vmm::MachineState state = msb::vmm::MachineState::from_json(json::parse(in));
  f.state_s = wall_seconds() - start;
  msb::vmm::MachineConfig config;
  config.cpus = state.cpus;
  config.max_cpus = state.max_cpus;
  config.memory_mib = state.memory_mib;
  config.max_memory_mib = state.max_memory_mib;
  config.disk_size = state.has_disk ? state.disk_size : 0;
  if (state.has_disk) {
    config.disk_overlay_path = overlay.string();
    if (fs::exists(cache / "disk")) config.disk_layer_path = (cache / "disk").string();
  }
  config.memory_path = (cache / "memory").string();
  config.console_log_fd = log.fd;
  config.agent_fd = vmm_end.fd;
  std::unique_ptr<Machine> machine = Machine::restore(config, state);
  f.restore_s = wall_seconds() - start;
  machine->start();
  f.running_s = wall_seconds() - start;
  auto exited = std::async(std::launch::async, [&machine] { return machine->wait(); });
  try {
    channel.write(msb::agent::kRestore, 0, restore_payload(state.memory_mib, state.cpus, "lib"),
                  "library restore");
    expect_ready(channel.read(start + 60, "library restore: kReady"), "library restore");
    f.ready_s = wall_seconds() - start;
    ExecResult echo = run_exec(channel, 1, {"echo", "hi"}, 60, "library restore: echo");
    f.reply_s = wall_seconds() - start;
    if (echo.code != 0 || echo.stdout_text != "hi\n")
      throw BenchError("library restore: the guest did not answer echo");
  } catch (...) {
    machine->stop();
    exited.wait();
    fs::remove(overlay, ignored);
    throw;
  }
  machine->stop();
  exited.wait();
  machine.reset();
  fs::remove(overlay, ignored);
  return f;
}

void run_msb(const Msb& msb, const Options& options, unsigned size_mib, const Content& content,
             MsbFigures& figures) {
  const std::string source = strf("src%u", size_mib);
  const std::string named = strf("snap%u", size_mib);
  double t = wall_seconds();
  msb.check({"create", source, "--memory", std::to_string(size_mib)});
  figures.create_s = wall_seconds() - t;

  std::span<const std::byte> bytes = content.bytes->span();
  figures.load_s = msb_write(msb, source, content.write_command(),
                             content.memory_like ? &bytes : nullptr, content.mib, content.checksum);
  println(strf("    msb: created in %.0f ms, wrote %llu MiB in %.2f s", figures.create_s * 1e3,
               static_cast<unsigned long long>(content.mib), figures.load_s));

  t = wall_seconds();
  json full = msb.check_json({"snapshot", "create", source, "--resume", "--json"});
  figures.full = parse_snapshot(full, wall_seconds() - t);
  println(strf("    msb: full snapshot %s: %.0f ms (paused %s ms), %s MiB stored",
               figures.full.handle.substr(0, 12).c_str(), figures.full.wall_s * 1e3,
               fmt(figures.full.paused_ms).c_str(), fmt(mib(figures.full.stored_bytes)).c_str()));
  try {
    json info = msb.check_json({"snapshot", "inspect", figures.full.handle, "--json"});
    const char* key = info.contains("total_bytes") ? "total_bytes" : "stored_bytes";
    if (info.contains(key) && info[key].is_number())
      figures.inspect_total_bytes = info[key].get<double>();
  } catch (const BenchError& e) {
    println(std::string("    msb: snapshot inspect failed: ") + e.what());
  }

  std::span<const std::byte> increment = content.increment->span();
  figures.increment_s = msb_write(msb, source, content.increment_command(),
                                  content.memory_like ? &increment : nullptr, content.mib,
                                  content.checksum_after_increment);
  t = wall_seconds();
  json incremental = msb.check_json({"snapshot", "create", source, "--resume", "--json"});
  figures.incremental = parse_snapshot(incremental, wall_seconds() - t);
  println(
      strf("    msb: incremental snapshot after %llu MiB: %.0f ms (paused %s ms), %s MiB "
           "stored, parent %s",
           static_cast<unsigned long long>(kIncrementMiB), figures.incremental.wall_s * 1e3,
           fmt(figures.incremental.paused_ms).c_str(),
           fmt(mib(figures.incremental.stored_bytes), "%.2f").c_str(),
           figures.incremental.parent.empty() ? "(none)"
                                              : figures.incremental.parent.substr(0, 12).c_str()));
  try {
    json info = msb.check_json({"snapshot", "inspect", figures.incremental.handle, "--json"});
    const char* key = info.contains("total_bytes") ? "total_bytes" : "stored_bytes";
    if (info.contains(key) && info[key].is_number())
      figures.inspect_incremental_total_bytes = info[key].get<double>();
  } catch (const BenchError&) {
  }
  msb.check({"snapshot", "save-named", figures.incremental.handle, named, "--force"});
  // The source goes: only restored sandboxes run from here on.
  msb.check({"rm", "-f", source});

  for (unsigned i = 0; i <= options.restores; ++i) {
    const std::string name = strf("r%u-%u", size_mib, i);
    RestoreFigures r;
    double start = wall_seconds();
    json j = msb.check_json({"restore", named, "--name", name, "--json"});
    r.wall_s = wall_seconds() - start;
    if (j.contains("total_ms") && j["total_ms"].is_number())
      r.total_ms = j["total_ms"].get<double>();
    if (j.contains("materialize_ms") && j["materialize_ms"].is_number())
      r.materialize_ms = j["materialize_ms"].get<double>();
    CommandResult echo = msb.run({"exec", name, "--", "echo", "hi"});
    r.to_reply_s = wall_seconds() - start;
    r.exec_s = echo.seconds;
    if (echo.status != 0 || echo.out != "hi\n")
      throw BenchError(strf("the restored %s did not answer echo: exit %d: %s", name.c_str(),
                            echo.status, one_line(echo.err).c_str()));
    if (i == 0) {
      figures.first_restore = r;
      figures.verified =
          verify_sum(msb.run({"exec", name, "--", "sum", std::to_string(content.mib)}),
                     content.checksum_after_increment);
    } else {
      figures.restores.push_back(r);
    }
    msb.check({"rm", "-f", name});
  }
  println(
      strf("    msb: restored %u times (the first materializing the cache: %.0f ms); memory "
           "after restore: %s",
           options.restores + 1, figures.first_restore.wall_s * 1e3, figures.verified.c_str()));

  // In process, from the cache the first restore materialized.
  const fs::path cache = msb.home() / "cache" / "snapshots" / figures.incremental.handle;
  try {
    if (!fs::exists(cache / "state.json"))
      throw BenchError("no materialized snapshot at " + cache.string());
    for (unsigned i = 0; i < options.restores; ++i)
      figures.library_restores.push_back(library_restore(cache, msb.home()));
    println(
        strf("    msb: restored in process (vmm::Machine::restore) %u times", options.restores));
  } catch (const std::exception& e) {
    figures.library_failure = e.what();
    println(std::string("    msb: in-process restore FAILED: ") + e.what());
  }

  for (unsigned count : options.forks) {
    ForkFigures f = measure_forks(msb, named, count, options);
    figures.forks.push_back(f);
    println(
        strf("    msb: %u forks restored in %.2f s, all answered after %.2f s, removed in "
             "%.2f s",
             count, f.restore_wall_s, f.all_answered_s, f.rm_s));
  }
}

// --- The QEMU side ----------------------------------------------------------------------------

// `load` (or fill) over the agent channel, checked against the checksum of what was sent.
// As msb_write, over QEMU's agent channel.
double qemu_write(QemuGuest& guest, const std::vector<std::string>& argv,
                  const std::span<const std::byte>* input, uint64_t area_mib,
                  uint64_t area_checksum, double timeout_s) {
  ExecResult r =
      run_exec(guest.agent(), guest.next_id(), argv, timeout_s, "QEMU: " + argv[0], input);
  if (r.code != 0)
    throw BenchError(
        strf("QEMU: %s exited %d: %s", argv[0].c_str(), r.code, one_line(r.stderr_text).c_str()));
  ExecResult sum = run_exec(guest.agent(), guest.next_id(), {"sum", std::to_string(area_mib)},
                            timeout_s, "QEMU: sum");
  if (sum.stdout_text != checksum_text(area_checksum))
    throw BenchError(strf("QEMU: after %s the guest's memory sums to \"%s\", not \"%s\"",
                          argv[0].c_str(), one_line(sum.stdout_text).c_str(),
                          one_line(checksum_text(area_checksum)).c_str()));
  return r.seconds;
}

void run_qemu(const Options& options, unsigned size_mib, const Content& content,
              const fs::path& work, QemuFigures& figures) {
  const fs::path file = work / strf("qemu-%u.migration", size_mib);
  {
    QemuGuest guest(options, size_mib, work, strf("qemu-src-%u", size_mib));
    double deadline = guest.started() + options.timeout_s;
    try {
      expect_ready(guest.agent().read(deadline, "QEMU: boot"), "QEMU");
    } catch (const BenchError& e) {
      throw BenchError(std::string(e.what()) + "; QEMU said: " + guest.log_tail());
    }
    figures.boot_s = wall_seconds() - guest.started();
    guest.qmp().handshake(deadline);
    std::span<const std::byte> bytes = content.bytes->span();
    figures.load_s =
        qemu_write(guest, content.write_command(), content.memory_like ? &bytes : nullptr,
                   content.mib, content.checksum, options.timeout_s);
    println(strf("    QEMU: booted in %.0f ms, wrote %llu MiB in %.2f s", figures.boot_s * 1e3,
                 static_cast<unsigned long long>(content.mib), figures.load_s));
    // Fairness: no bandwidth limit (QEMU's default is 32 MiB/s... for a file, unlimited).
    guest.qmp().command("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}},
                        wall_seconds() + 30);
    double start = wall_seconds();
    guest.qmp().command("stop", json::object(), start + 30);
    figures.stop_s = wall_seconds() - start;
    guest.qmp().command("migrate", {{"uri", "exec:cat > " + file.string()}}, start + 30);
    json status;
    for (;;) {
      status = guest.qmp().command("query-migrate", json::object(), start + options.timeout_s);
      std::string s = status.value("status", "");
      if (s == "completed") break;
      if (s == "failed" || s == "cancelled")
        throw BenchError("QEMU: migration " + s + ": " + status.dump());
      ::usleep(500);
    }
    figures.paused_s = wall_seconds() - start;
    if (status.contains("downtime")) figures.qemu_downtime_ms = status["downtime"].get<double>();
    if (status.contains("total-time")) figures.qemu_total_ms = status["total-time"].get<double>();
    // `cat` may still be writing the end of the file once QEMU has handed it over.
    double settle = wall_seconds() + 10;
    uint64_t size = 0;
    for (;;) {
      uint64_t now = fs::file_size(file);
      if (now == size && now > 0) break;
      size = now;
      if (wall_seconds() > settle) break;
      ::usleep(20000);
    }
    figures.file_bytes = static_cast<double>(fs::file_size(file));
    println(strf("    QEMU: stop + migrate to a file: %.0f ms paused, %.1f MiB file",
                 figures.paused_s * 1e3, mib(figures.file_bytes)));
  }  // the source QEMU is killed

  for (unsigned i = 0; i < options.restores; ++i) {
    QemuGuest guest(options, size_mib, work, strf("qemu-dst-%u", size_mib),
                    "exec:cat " + file.string());
    double deadline = guest.started() + options.timeout_s;
    QemuRestoreFigures r;
    try {
      guest.qmp().handshake(deadline);
      std::string state;
      for (;;) {
        json s = guest.qmp().command("query-status", json::object(), deadline);
        state = s.value("status", "");
        if (state != "inmigrate") break;
        ::usleep(500);
      }
      r.incoming_s = wall_seconds() - guest.started();
      if (state != "running") guest.qmp().command("cont", json::object(), deadline);
      r.running_s = wall_seconds() - guest.started();
    } catch (const BenchError& e) {
      throw BenchError(std::string(e.what()) + "; QEMU said: " + guest.log_tail());
    }
    ExecResult echo =
        run_exec(guest.agent(), guest.next_id(), {"echo", "hi"}, options.timeout_s, "QEMU: echo");
    r.echo_s = wall_seconds() - guest.started();
    if (echo.code != 0 || echo.stdout_text != "hi\n")
      throw BenchError("QEMU: the restored guest did not answer echo");
    if (i == 0) {
      ExecResult sum =
          run_exec(guest.agent(), guest.next_id(), {"sum", std::to_string(content.mib)},
                   options.timeout_s, "QEMU: sum");
      figures.verified = sum.stdout_text == checksum_text(content.checksum)
                             ? "sum matches"
                             : "MISMATCH: " + one_line(sum.stdout_text);
    }
    figures.restores.push_back(r);
  }
  println(strf("    QEMU: restored %u times; memory after restore: %s", options.restores,
               figures.verified.c_str()));
}

// --- Does the guest have `load`? ----------------------------------------------------------------

// Asks a running guest for `load 1` with an empty stdin: a guest without it answers 127.
bool msb_guest_has_load(const Msb& msb) {
  const std::string name = "probe";
  msb.check({"create", name, "--memory", "64"});
  std::span<const std::byte> empty;
  CommandResult r = msb.run({"exec", name, "--", "load", "1"}, &empty);
  msb.check({"rm", "-f", name});
  return r.status != 127;
}

bool qemu_guest_has_load(const Options& options, const fs::path& work) {
  QemuGuest guest(options, 64, work, "qemu-probe");
  expect_ready(guest.agent().read(guest.started() + options.timeout_s, "QEMU: boot"), "QEMU");
  std::span<const std::byte> empty;
  ExecResult r = run_exec(guest.agent(), guest.next_id(), {"load", "1"}, options.timeout_s,
                          "QEMU: load", &empty);
  return r.code != 127;
}

// --- Summary ----------------------------------------------------------------------------------

// Median, min and max of the defined values of `f` over the runs.
struct Stat {
  double median = kNaN, min = kNaN, max = kNaN;
  size_t count = 0;
};
Stat stat(const std::vector<double>& values_in) {
  std::vector<double> values;
  for (double v : values_in) {
    if (!std::isnan(v)) values.push_back(v);
  }
  Stat s;
  s.count = values.size();
  if (values.empty()) return s;
  s.median = percentile(values, 0.5);
  s.min = *std::min_element(values.begin(), values.end());
  s.max = *std::max_element(values.begin(), values.end());
  return s;
}
double mean(const std::vector<double>& v) {
  if (v.empty()) return kNaN;
  double sum = 0;
  for (double x : v)
    sum += x;
  return sum / static_cast<double>(v.size());
}
double max_of(const std::vector<double>& v) {
  return v.empty() ? kNaN : *std::max_element(v.begin(), v.end());
}

// "12.3" or "12.3 [11.0-14.2]" when there are several values.
std::string cell(const std::vector<double>& values, double scale = 1, const char* format = "%.1f") {
  Stat s = stat(values);
  if (s.count == 0) return "-";
  std::string text = strf(format, s.median * scale);
  if (s.count > 1 && s.min != s.max)
    text += " [" + strf(format, s.min * scale) + "-" + strf(format, s.max * scale) + "]";
  return text;
}

void row(const std::string& what, const std::string& msb, const std::string& qemu = "",
         const std::string& note = "") {
  println(strf("  %-48s %-26s %-22s %s", what.c_str(), msb.c_str(), qemu.c_str(), note.c_str()));
}

struct Verdict {
  std::string goal;
  double ratio = kNaN;  // how far it is from the goal's limit: >= 1 is met
  std::string detail;
};

void print_verdict(const Verdict& v) {
  if (std::isnan(v.ratio)) {
    // A detail computed from figures that are missing says nothing.
    bool useful = !v.detail.empty() && v.detail.find("nan") == std::string::npos;
    println(
        strf("  %-68s not measured%s", v.goal.c_str(), useful ? (": " + v.detail).c_str() : ""));
    return;
  }
  println(
      strf("  %-68s %-8s %s", v.goal.c_str(), v.ratio >= 1 ? "met" : "NOT met", v.detail.c_str()));
}

void summarize(unsigned size, const std::vector<SizeRun>& runs, const Content& content,
               const Options& options) {
  auto collect = [&](auto get) {
    std::vector<double> v;
    for (const auto& r : runs)
      v.push_back(get(r));
    return v;
  };
  println(strf("Guest of %u MiB: %llu MiB of %s written from 32 MiB on%s; %u run%s", size,
               static_cast<unsigned long long>(content.mib),
               content.memory_like ? strf("memory-like content (%.1f%% zero pages)",
                                          100.0 * static_cast<double>(content.zero_pages) /
                                              static_cast<double>(content.pages))
                                         .c_str()
                                   : "fill's pattern (incompressible: the guest has no `load`)",
               content.wrapped ? " (the files ran out and repeat)" : "", options.runs,
               options.runs == 1 ? "" : "s (median [min-max])"));
  row("", "msb", "QEMU -M microvm, KVM", "");
  row("floor: KVM VM + irqchip + memslot + 1 vCPU, ms",
      cell(collect([](const SizeRun& r) { return r.floor.median_s; }), 1e3), "",
      strf("min %s, teardown %s ms",
           fmt(stat(collect([](const SizeRun& r) { return r.floor.min_s; })).min * 1e3).c_str(),
           fmt(stat(collect([](const SizeRun& r) { return r.floor.teardown_s; })).median * 1e3)
               .c_str()));
  row("boot / create to ready, ms",
      cell(collect([](const SizeRun& r) { return r.msb.create_s; }), 1e3),
      cell(collect([](const SizeRun& r) { return r.qemu.boot_s; }), 1e3), "msb: `msb create`");
  row(strf("write %llu MiB of content, s", static_cast<unsigned long long>(content.mib)),
      cell(collect([](const SizeRun& r) { return r.msb.load_s; }), 1, "%.2f"),
      cell(collect([](const SizeRun& r) { return r.qemu.load_s; }), 1, "%.2f"),
      "msb: `msb exec` with stdin");
  row("snapshot: command / migration total, ms",
      cell(collect([](const SizeRun& r) { return r.msb.full.wall_s; }), 1e3),
      cell(collect([](const SizeRun& r) { return r.qemu.paused_s; }), 1e3),
      "QEMU: stop to migration completed");
  row("  of which msb's total_ms / capture / store",
      cell(collect([](const SizeRun& r) { return r.msb.full.total_ms; })) + " / " +
          cell(collect([](const SizeRun& r) { return r.msb.full.capture_ms; })) + " / " +
          cell(collect([](const SizeRun& r) { return r.msb.full.store_ms; })),
      "", "");
  row("guest paused, ms", cell(collect([](const SizeRun& r) { return r.msb.full.paused_ms; })),
      cell(collect([](const SizeRun& r) { return r.qemu.paused_s; }), 1e3),
      strf("QEMU's own downtime figure: %s ms",
           cell(collect([](const SizeRun& r) { return r.qemu.qemu_downtime_ms; })).c_str()));
  row(strf("stored, MiB (guest memory %u MiB)", size),
      cell(collect([](const SizeRun& r) { return r.msb.full.stored_bytes; }), 1.0 / kMiB),
      cell(collect([](const SizeRun& r) { return r.qemu.file_bytes; }), 1.0 / kMiB),
      strf("msb: %.1fx smaller than guest memory; inspect: %s MiB referenced; memory_bytes %s MiB",
           static_cast<double>(size) * kMiB /
               stat(collect([](const SizeRun& r) { return r.msb.full.stored_bytes; })).median,
           cell(collect([](const SizeRun& r) { return r.msb.inspect_total_bytes; }), 1.0 / kMiB)
               .c_str(),
           cell(collect([](const SizeRun& r) { return r.msb.full.memory_bytes; }), 1.0 / kMiB,
                "%.0f")
               .c_str()));
  row(strf("incremental after %llu MiB more: stored MiB",
           static_cast<unsigned long long>(kIncrementMiB)),
      cell(collect([](const SizeRun& r) { return r.msb.incremental.stored_bytes; }), 1.0 / kMiB,
           "%.2f"),
      "-",
      strf("chunks read %s of %s; inspect: %s MiB referenced",
           cell(collect([](const SizeRun& r) { return r.msb.incremental.chunks_read; }), 1, "%.0f")
               .c_str(),
           cell(collect([](const SizeRun& r) { return r.msb.incremental.chunks; }), 1, "%.0f")
               .c_str(),
           cell(collect([](const SizeRun& r) { return r.msb.inspect_incremental_total_bytes; }),
                1.0 / kMiB)
               .c_str()));
  row("  its command / paused, ms",
      cell(collect([](const SizeRun& r) { return r.msb.incremental.wall_s; }), 1e3) + " / " +
          cell(collect([](const SizeRun& r) { return r.msb.incremental.paused_ms; })),
      "-");

  // Restores: every single restore of every run (first ones apart).
  std::vector<double> restore_wall, restore_total, reply, exec, q_incoming, q_running, q_echo;
  for (const auto& r : runs) {
    for (const auto& x : r.msb.restores) {
      restore_wall.push_back(x.wall_s);
      restore_total.push_back(x.total_ms);
      reply.push_back(x.to_reply_s);
      exec.push_back(x.exec_s);
    }
    for (const auto& x : r.qemu.restores) {
      q_incoming.push_back(x.incoming_s);
      q_running.push_back(x.running_s);
      q_echo.push_back(x.echo_s);
    }
  }
  row("first restore (materializes the cache), ms",
      cell(collect([](const SizeRun& r) { return r.msb.first_restore.wall_s; }), 1e3), "",
      "materialize_ms " +
          cell(collect([](const SizeRun& r) { return r.msb.first_restore.materialize_ms; })));
  row("restore to running, ms", cell(restore_wall, 1e3), cell(q_running, 1e3),
      "msb: `msb restore` returned (its total_ms " + cell(restore_total) +
          "); QEMU: migration in " + cell(q_incoming, 1e3) + ", then cont");
  std::vector<double> lib_state, lib_restore, lib_running, lib_ready, lib_reply;
  for (const auto& r : runs) {
    for (const auto& x : r.msb.library_restores) {
      lib_state.push_back(x.state_s);
      lib_restore.push_back(x.restore_s);
      lib_running.push_back(x.running_s);
      lib_ready.push_back(x.ready_s);
      lib_reply.push_back(x.reply_s);
    }
  }
  row("  in process: Machine::restore + start, ms", cell(lib_running, 1e3), "",
      "of which state.json " + cell(lib_state, 1e3, "%.2f") + ", restore() " +
          cell(lib_restore, 1e3, "%.2f") + "; guest answered kRestore " + cell(lib_ready, 1e3) +
          ", first echo " + cell(lib_reply, 1e3));
  row("restore to first exec reply, ms", cell(reply, 1e3), cell(q_echo, 1e3),
      "msb: restore + `msb exec echo` (" + cell(exec, 1e3) + ")");
  std::string verified;
  for (const auto& r : runs) {
    if (!r.msb.verified.empty()) verified = "msb " + r.msb.verified;
    if (!r.qemu.verified.empty())
      verified += (verified.empty() ? "QEMU " : "; QEMU ") + r.qemu.verified;
  }
  if (!verified.empty()) row("restored memory checked with `sum`", verified);
  for (size_t k = 0; k < options.forks.size(); ++k) {
    std::vector<double> idle, baseline;
    std::vector<double> wall, answered, rm, priv_mean, priv_max, guest_mean, guest_max, other_max,
        rss, pss;
    for (const auto& r : runs) {
      if (k >= r.msb.forks.size()) continue;
      const ForkFigures& f = r.msb.forks[k];
      wall.push_back(f.restore_wall_s);
      answered.push_back(f.all_answered_s);
      rm.push_back(f.rm_s);
      idle.push_back(f.idle_cores);
      baseline.push_back(f.baseline_cores);
      priv_mean.push_back(mean(f.private_kib));
      priv_max.push_back(max_of(f.private_kib));
      guest_mean.push_back(mean(f.guest_private_kib));
      guest_max.push_back(max_of(f.guest_private_kib));
      other_max.push_back(max_of(f.other_private_kib));
      rss.push_back(mean(f.rss_kib));
      pss.push_back(mean(f.pss_kib));
    }
    unsigned count = options.forks[k];
    row(strf("%u forks: restore returned / all answered, s", count),
        cell(wall, 1, "%.2f") + " / " + cell(answered, 1, "%.2f"), "",
        "rm -f of all: " + cell(rm, 1, "%.2f") + " s; the machine's busy cores while they idle: " +
            cell(idle, 1, "%.2f") + " (before: " + cell(baseline, 1, "%.2f") + ")");
    row(strf("  private memory per fork, MiB mean / max"),
        cell(priv_mean, 1.0 / 1024, "%.2f") + " / " + cell(priv_max, 1.0 / 1024, "%.2f"), "",
        "guest RAM made private: " + cell(guest_mean, 1.0 / 1024, "%.2f") + " / " +
            cell(guest_max, 1.0 / 1024, "%.2f") + " MiB (" + cell(guest_mean, 1.0 / 4, "%.0f") +
            " pages mean); the rest max " + cell(other_max, 1.0 / 1024, "%.2f") + " MiB; Rss " +
            cell(rss, 1.0 / 1024, "%.1f") + ", Pss " + cell(pss, 1.0 / 1024, "%.1f") + " MiB mean");
  }
  for (const auto& r : runs) {
    if (!r.msb.failure.empty()) row("msb FAILED", r.msb.failure);
    if (!r.qemu.failure.empty()) row("QEMU FAILED", r.qemu.failure);
    if (!r.msb.library_failure.empty()) row("in-process restore FAILED", r.msb.library_failure);
  }
  println();

  println(strf("Goals, guest of %u MiB (medians):", size));
  double floor_s = stat(collect([](const SizeRun& r) { return r.floor.median_s; })).median;
  double restore_s = stat(restore_wall).median;
  double library_s = stat(lib_running).median;
  print_verdict({"restore to running within 2x the floor (in process)", floor_s * 2 / library_s,
                 strf("%.1f ms vs floor %.1f ms: %.2fx the floor", library_s * 1e3, floor_s * 1e3,
                      library_s / floor_s)});
  print_verdict({"restore to running within 2x the floor (`msb restore`)", floor_s * 2 / restore_s,
                 strf("%.1f ms vs floor %.1f ms: %.2fx the floor", restore_s * 1e3, floor_s * 1e3,
                      restore_s / floor_s)});
  {
    Verdict v{"100 forks all answering an exec in under 5 s", kNaN, "no 100-fork set measured"};
    for (size_t k = 0; k < options.forks.size(); ++k) {
      if (options.forks[k] != 100) continue;
      std::vector<double> answered;
      for (const auto& r : runs) {
        if (k < r.msb.forks.size()) answered.push_back(r.msb.forks[k].all_answered_s);
      }
      double s = stat(answered).median;
      v = {v.goal, 5.0 / s, strf("%.2f s", s)};
    }
    print_verdict(v);
  }
  {
    // Every fork of every set.
    std::vector<double> all, other;
    for (const auto& r : runs) {
      for (const auto& f : r.msb.forks) {
        all.insert(all.end(), f.private_kib.begin(), f.private_kib.end());
        other.insert(other.end(), f.other_private_kib.begin(), f.other_private_kib.end());
      }
    }
    double worst = max_of(all) / 1024, worst_other = max_of(other) / 1024;
    print_verdict({"each fork under 2 MiB of private host memory (all of it)", 2.0 / worst,
                   strf("max %.2f MiB, mean %.2f MiB over %zu forks; without its guest RAM's "
                        "private pages max %.2f MiB",
                        worst, mean(all) / 1024, all.size(), worst_other)});
  }
  double stored = stat(collect([](const SizeRun& r) { return r.msb.full.stored_bytes; })).median;
  double file = stat(collect([](const SizeRun& r) { return r.qemu.file_bytes; })).median;
  print_verdict({"snapshot at least 3x smaller than QEMU's file", file / stored / 3,
                 strf("%.1f vs %.1f MiB: %.2fx smaller", mib(stored), mib(file), file / stored)});
  double paused = stat(collect([](const SizeRun& r) { return r.msb.full.paused_ms; })).median;
  double q_paused = stat(collect([](const SizeRun& r) { return r.qemu.paused_s; })).median * 1e3;
  print_verdict({"guest paused at least 3x shorter than QEMU's stop-and-migrate",
                 q_paused / paused / 3,
                 strf("%.1f vs %.1f ms: %.2fx shorter", paused, q_paused, q_paused / paused)});
  double msb_reply = stat(reply).median, q_reply = stat(q_echo).median;
  double msb_running = restore_s, q_run = stat(q_running).median;
  print_verdict({"restore at least 10x faster than QEMU's (to the first exec reply)",
                 q_reply / msb_reply / 10,
                 strf("%.1f vs %.1f ms: %.2fx faster (to running: %.1f vs %.1f ms, %.2fx)",
                      msb_reply * 1e3, q_reply * 1e3, q_reply / msb_reply, msb_running * 1e3,
                      q_run * 1e3, q_run / msb_running)});
  println();
}

// --- The run ------------------------------------------------------------------------------------

extern "C" void on_interrupt(int signal) {
  g_interrupt_signal = signal;
}

int run(const Options& options) {
  if (::access(options.testguest.c_str(), R_OK) != 0)
    throw BenchError("test guest " + options.testguest +
                     " cannot be read: build the testguest target or pass --testguest");
  struct sigaction action {};
  action.sa_handler = on_interrupt;
  for (int sig : {SIGINT, SIGTERM, SIGHUP})
    ::sigaction(sig, &action, nullptr);
  // A command that exits before reading all its stdin is an EPIPE, not the end of this program.
  ::signal(SIGPIPE, SIG_IGN);

  char pattern[] = "/tmp/msb-bench-snapshot.XXXXXX";
  if (::mkdtemp(pattern) == nullptr) fail_errno("cannot create a temporary directory");
  const fs::path root = pattern;
  const fs::path work = root / "work";
  fs::create_directories(work);
  // Removes every sandbox of every home used, then the folder (unless --keep): on every way out.
  std::vector<std::unique_ptr<Msb>> homes;
  struct Cleanup {
    const Options& options;
    const fs::path& root;
    std::vector<std::unique_ptr<Msb>>& homes;
    ~Cleanup() {
      for (const auto& msb : homes)
        msb->remove_all_sandboxes();
      if (options.keep) {
        std::printf("  kept %s\n", root.c_str());
      } else {
        std::error_code ignored;
        fs::remove_all(root, ignored);
      }
    }
  } cleanup{options, root, homes};
  auto new_home = [&](const std::string& tag) -> const Msb& {
    fs::path home = root / ("home-" + tag);
    fs::create_directories(home);
    homes.push_back(std::make_unique<Msb>(options.msb, home, options.timeout_s));
    return *homes.back();
  };

  println(
      "msb-bench-snapshot: msb's snapshots, restores and forks next to the KVM floor and "
      "QEMU's migration to a file");
  println("  machine:   " + machine_line());
  println(
      "  guest:     " + options.testguest +
      strf(" (%.0f KiB), 1 vCPU", static_cast<double>(fs::file_size(options.testguest)) / 1024));
  if (!options.no_msb) println("  msb:       " + options.msb + ", MSB_HOME under " + root.string());
  if (!options.no_qemu) println("  QEMU:      " + qemu_version(options.qemu));
  std::string sizes, forks;
  for (unsigned s : options.sizes)
    sizes += (sizes.empty() ? "" : ", ") + std::to_string(s);
  for (unsigned f : options.forks)
    forks += (forks.empty() ? "" : ", ") + std::to_string(f);
  println(
      strf("  sizes:     %s MiB; forks %s; %u run%s; %u timed restores each; floor median "
           "of %u",
           sizes.c_str(), forks.c_str(), options.runs, options.runs == 1 ? "" : "s",
           options.restores, options.floor_iterations));
  println();

  // Does the guest have `load`? Without it, every guest gets fill's pattern instead.
  bool memory_like = true;
  if (!options.no_msb) {
    memory_like = msb_guest_has_load(new_home("probe"));
  } else if (!options.no_qemu) {
    memory_like = qemu_guest_has_load(options, work);
  }
  if (!memory_like)
    println(
        "  NOTE: this test guest has no `load` command: writing `fill`'s pattern "
        "(incompressible) instead of memory-like content; stored sizes are not representative");

  const CpuAccount start_account = cpu_account();
  std::map<unsigned, std::vector<SizeRun>> results;
  std::map<unsigned, Content> contents;
  for (unsigned size : options.sizes) {
    const uint64_t half = size / 2;
    if (kGuestAreaStartMiB + half > size)
      throw BenchError(strf("a %u MiB guest cannot hold %llu MiB from 32 MiB on", size,
                            static_cast<unsigned long long>(half)));
    double t = wall_seconds();
    contents.emplace(size, build_content(half, memory_like, options.seed));
    const Content& content = contents.at(size);
    println(
        strf("Guest of %u MiB: content built in %.1f s (%llu MiB, %.1f%% zero pages)", size,
             wall_seconds() - t, static_cast<unsigned long long>(half),
             100.0 * static_cast<double>(content.zero_pages) / static_cast<double>(content.pages)));
    for (unsigned run = 1; run <= options.runs; ++run) {
      if (interrupted()) throw BenchError("interrupted");
      SizeRun r;
      println(strf("  run %u:", run));
      r.floor = measure_floor(size, options.floor_iterations);
      println(strf("    floor: %.2f ms median [%.2f-%.2f], teardown %.2f ms",
                   r.floor.median_s * 1e3, r.floor.min_s * 1e3, r.floor.max_s * 1e3,
                   r.floor.teardown_s * 1e3));
      if (!options.no_msb) {
        const Msb& msb = new_home(strf("%u-%u", size, run));
        try {
          run_msb(msb, options, size, content, r.msb);
        } catch (const std::exception& e) {
          r.msb.failure = e.what();
          println(std::string("    msb FAILED: ") + e.what());
          if (interrupted()) throw;
        }
        msb.remove_all_sandboxes();
      }
      if (!options.no_qemu) {
        try {
          run_qemu(options, size, content, work, r.qemu);
        } catch (const std::exception& e) {
          r.qemu.failure = e.what();
          println(std::string("    QEMU FAILED: ") + e.what());
          if (interrupted()) throw;
        }
        std::error_code ignored;
        fs::remove(work / strf("qemu-%u.migration", size), ignored);
      }
      results[size].push_back(std::move(r));
    }
    // The summary needs only the content's description.
    contents.at(size).bytes.reset();
    contents.at(size).increment.reset();
    println();
  }

  const CpuAccount end_account = cpu_account();
  const double wall = std::max(1e-9, end_account.wall_s - start_account.wall_s);
  println(
      strf("Measuring took %.0f s; other processes kept %.2f of %ld cores busy on average, "
           "hypervisor steal %.2f cores",
           wall, other_cores(start_account, end_account), ::sysconf(_SC_NPROCESSORS_ONLN),
           (end_account.steal_s - start_account.steal_s) / wall));
  println();
  for (unsigned size : options.sizes)
    summarize(size, results[size], contents.at(size), options);
  if (options.no_qemu) println("(QEMU skipped: --no-qemu)");
  if (options.no_msb) println("(msb skipped: --no-msb)");
  bool msb_failed = false;
  for (const auto& [size, runs] : results) {
    for (const auto& r : runs)
      msb_failed = msb_failed || !r.msb.failure.empty();
  }
  return msb_failed ? 1 : 0;
}

std::vector<unsigned> parse_list(const std::string& text, const char* what) {
  std::vector<unsigned> values;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    unsigned long v = std::strtoul(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v == 0 || v > 1000000)
      throw BenchError(strf("%s: \"%s\" is not a positive number", what, item.c_str()));
    values.push_back(static_cast<unsigned>(v));
  }
  if (values.empty()) throw BenchError(std::string(what) + ": empty list");
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  std::string sizes = "256,1024", forks = "10,50,100";
  CLI::App app{
      "Measures msb's snapshots (create, paused time, stored size, incremental), restores and "
      "forks on msb's test guest, next to the KVM floor and QEMU's stop-and-migrate to a file.",
      "msb-bench-snapshot"};
  app.add_option("--runs", options.runs, "Runs of the whole sequence per guest size")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  app.add_option("--restores", options.restores,
                 "Timed single restores per run (msb: after one that materializes the cache)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--floor-iterations", options.floor_iterations, "Floor measurements per run")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--sizes", sizes, "Guest memory sizes, MiB, comma-separated")
      ->capture_default_str();
  app.add_option("--forks", forks, "Fork counts, comma-separated")->capture_default_str();
  app.add_option("--exec-parallel", options.exec_parallel,
                 "`msb exec` commands at once while checking that forks answer")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--msb", options.msb, "The msb binary")->capture_default_str();
  app.add_option("--testguest", options.testguest, "The test guest kernel")->capture_default_str();
  app.add_option("--qemu", options.qemu, "The QEMU binary")->capture_default_str();
  app.add_option("--timeout", options.timeout_s, "Seconds one step may take")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 36000.0));
  app.add_option("--seed", options.seed, "Seed of the content's layout")->capture_default_str();
  app.add_flag("--no-qemu", options.no_qemu, "Leave QEMU out");
  app.add_flag("--no-msb", options.no_msb, "Leave msb out (the floor and QEMU only)");
  app.add_flag("--keep", options.keep, "Keep the temporary MSB_HOME (its sandboxes are removed)");
  try {
    app.parse(argc, argv);
    options.sizes = parse_list(sizes, "--sizes");
    options.forks = parse_list(forks, "--forks");
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "msb-bench-snapshot: error: %s\n", e.what());
    return 2;
  } catch (const BenchError& e) {
    std::fprintf(stderr, "msb-bench-snapshot: error: %s\n", e.what());
    return 2;
  }
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "msb-bench-snapshot: error: %s\n", e.what());
    return 1;
  }
}
