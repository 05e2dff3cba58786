#include "guest/agent/restore.h"

#include <fcntl.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <thread>

#include "guest/agent/log.h"
#include "guest/agent/memory.h"
#include "guest/agent/util.h"

namespace msb::agent {
namespace {

constexpr size_t kMaxHostname = 64;

std::string reseed(const uint8_t* entropy) {
  struct {
    int entropy_count;
    int buf_size;
    uint8_t buf[kRestoreEntropyBytes];
  } info{};
  static_assert(sizeof info == sizeof(rand_pool_info) + kRestoreEntropyBytes);
  info.entropy_count = kRestoreEntropyBytes * 8;
  info.buf_size = kRestoreEntropyBytes;
  std::memcpy(info.buf, entropy, kRestoreEntropyBytes);
  int fd = ::open("/dev/urandom", O_RDWR | O_CLOEXEC);
  if (fd < 0) return std::string("cannot open /dev/urandom: ") + std::strerror(errno);
  std::string result = "entropy credited";
  if (::ioctl(fd, RNDADDENTROPY, &info) != 0) {
    result = std::string("RNDADDENTROPY failed: ") + std::strerror(errno);
  } else if (::ioctl(fd, RNDRESEEDCRNG) != 0) {
    result = std::string("RNDRESEEDCRNG failed: ") + std::strerror(errno);
  }
  ::close(fd);
  return result;
}

// Onlines or offlines CPUs so that `wanted` of the present ones are online (cpu0 always).
// Returns how many are online afterwards.
unsigned set_cpus(uint32_t wanted) {
  std::string text;
  std::optional<std::vector<unsigned>> present;
  if (read_file("/sys/devices/system/cpu/present", text)) present = parse_cpu_list(text);
  if (!present || present->empty()) {
    log_line("cannot read the present CPUs");
    return 0;
  }
  std::sort(present->begin(), present->end());
  size_t target = std::clamp<size_t>(wanted, 1, present->size());
  if (target != wanted) {
    log_line("restore: " + std::to_string(wanted) + " CPUs asked for, " +
             std::to_string(present->size()) + " present");
  }
  // Online the low ones first, then offline the high ones, so that the count never drops to 0.
  for (size_t i = 0; i < present->size(); ++i) {
    unsigned cpu = (*present)[i];
    if (cpu == 0 || i >= target) continue;
    std::string knob = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/online";
    std::string state;
    if (read_file(knob, state) && state.rfind('1', 0) != 0 && !write_file(knob, "1"))
      log_errno("cannot online cpu" + std::to_string(cpu));
  }
  for (size_t i = present->size(); i-- > target;) {
    unsigned cpu = (*present)[i];
    if (cpu == 0) continue;
    std::string knob = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/online";
    std::string state;
    if (read_file(knob, state) && state.rfind('0', 0) != 0 && !write_file(knob, "0"))
      log_errno("cannot offline cpu" + std::to_string(cpu));
  }
  std::optional<std::vector<unsigned>> online;
  if (read_file("/sys/devices/system/cpu/online", text)) online = parse_cpu_list(text);
  return online ? static_cast<unsigned>(online->size()) : 0;
}

uint64_t mem_total_kib() {
  std::string text;
  if (!read_file("/proc/meminfo", text)) return 0;
  std::istringstream lines(text);
  std::string key;
  uint64_t value = 0;
  while (lines >> key >> value) {
    if (key == "MemTotal:") return value;
    lines.ignore(1 << 20, '\n');
  }
  return 0;
}

struct MemoryResult {
  uint64_t total_kib = 0;  // MemTotal at the end
  std::string summary;     // for the restore's log line
};

std::string seconds_text(std::chrono::milliseconds ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f s", ms.count() / 1000.0);
  return text;
}

// Where the grant is below MemTotal, frees what the guest can give back, then waits for the
// balloon (driven by the host, which set its target before kRestore) to bring MemTotal within
// `memory_mib`, as long as it makes progress (memory.h). A grant at or above MemTotal (the
// balloon deflates, or stays) needs neither: the page cache stays warm for the guest's next
// commands.
MemoryResult fit_memory(uint64_t memory_mib) {
  using std::chrono::milliseconds;
  MemoryResult result;
  result.total_kib = mem_total_kib();
  if (result.total_kib == 0) {
    log_line("restore: cannot read MemTotal from /proc/meminfo");
    return result;
  }
  if (!must_free_memory(memory_mib, result.total_kib)) return result;

  const auto start = std::chrono::steady_clock::now();
  ::sync();
  if (!write_file("/proc/sys/vm/drop_caches", "3")) log_errno("cannot drop caches");
  if (!write_file("/proc/sys/vm/compact_memory", "1")) log_errno("cannot compact memory");
  // The wait's clock starts once the guest has freed what it can (which can take seconds where
  // kernel code is emulated), so that freeing is never taken for a stalled balloon.
  const auto freed = std::chrono::steady_clock::now();
  BalloonWait wait(memory_mib, result.total_kib);
  // Short sleeps first (on hardware the balloon inflates in milliseconds), longer ones later:
  // each read of /proc/meminfo is kernel work, which is slow where it is emulated.
  milliseconds pause(10);
  for (;;) {
    result.total_kib = mem_total_kib();
    const auto now = std::chrono::steady_clock::now();
    const BalloonWait::Verdict verdict =
        wait.next(std::chrono::duration_cast<milliseconds>(now - freed), result.total_kib);
    const auto elapsed = std::chrono::duration_cast<milliseconds>(now - start);
    if (verdict == BalloonWait::Verdict::kWait) {
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, milliseconds(250));
      continue;
    }
    if (verdict == BalloonWait::Verdict::kDone) {
      result.summary = "caches dropped, within the grant after " + seconds_text(elapsed);
    } else {
      const std::string why =
          verdict == BalloonWait::Verdict::kStalled
              ? "the balloon made no progress for " + seconds_text(BalloonWait::kStall) +
                    " (is its target set?)"
              : "the balloon was still inflating after " + seconds_text(BalloonWait::kCap);
      log_line("restore: MemTotal is " + std::to_string(result.total_kib / 1024) +
               " MiB, over the " + std::to_string(memory_mib) + " MiB granted: " + why);
      result.summary = "over the grant after " + seconds_text(elapsed);
    }
    return result;
  }
}

}  // namespace

std::optional<std::vector<unsigned>> parse_cpu_list(const std::string& text) {
  std::vector<unsigned> cpus;
  std::string list = text.substr(0, text.find_first_of("\n "));
  if (list.empty()) return cpus;
  std::istringstream ranges(list);
  std::string range;
  while (std::getline(ranges, range, ',')) {
    unsigned first = 0, last = 0;
    size_t dash = range.find('-');
    std::string a = range.substr(0, dash);
    std::string b = dash == std::string::npos ? a : range.substr(dash + 1);
    auto r1 = std::from_chars(a.data(), a.data() + a.size(), first);
    auto r2 = std::from_chars(b.data(), b.data() + b.size(), last);
    if (a.empty() || b.empty() || r1.ec != std::errc() || r1.ptr != a.data() + a.size() ||
        r2.ec != std::errc() || r2.ptr != b.data() + b.size() || last < first ||
        last - first > 4096) {
      return std::nullopt;
    }
    for (unsigned cpu = first; cpu <= last; ++cpu)
      cpus.push_back(cpu);
  }
  return cpus;
}

std::optional<RestoreRequest> decode_restore(std::string_view payload) {
  RestoreRequest request;
  if (payload.size() < sizeof request.payload) return std::nullopt;
  std::memcpy(&request.payload, payload.data(), sizeof request.payload);
  std::string_view rest = payload.substr(sizeof request.payload);
  size_t nul = rest.find('\0');
  if (nul == std::string_view::npos || nul + 1 != rest.size() || nul > kMaxHostname ||
      request.payload.cpus == 0) {
    return std::nullopt;
  }
  request.name.assign(rest.substr(0, nul));
  return request;
}

void apply_restore(const RestoreRequest& request) {
  const RestorePayload& p = request.payload;
  std::string entropy = reseed(p.entropy);
  timespec now{static_cast<time_t>(p.wall_clock_ns / 1'000'000'000),
               static_cast<long>(p.wall_clock_ns % 1'000'000'000)};
  if (::clock_settime(CLOCK_REALTIME, &now) != 0) log_errno("cannot set the clock");
  if (!request.name.empty() && ::sethostname(request.name.data(), request.name.size()) != 0)
    log_errno("cannot set the hostname");
  unsigned online = set_cpus(p.cpus);
  const MemoryResult memory = fit_memory(p.memory_mib);
  log_line("restored as " + request.name + ": " + entropy + ", " + std::to_string(online) +
           " CPUs online, MemTotal " + std::to_string(memory.total_kib / 1024) + " MiB" +
           (memory.summary.empty() ? "" : " (" + memory.summary + ")"));
}

}  // namespace msb::agent
