// Helpers shared by the benchmark programs (bench/*_bench.cpp): formatting, errors, clocks and
// the machine's CPU accounting that tells how much other processes disturbed a measurement.

#ifndef MSB_BENCH_BENCH_UTIL_H_
#define MSB_BENCH_BENCH_UTIL_H_

#include <sys/resource.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace msb::bench {

// What a benchmark reports as its failure (printed, exit status 1).
class BenchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// printf into a std::string.
__attribute__((format(printf, 1, 2))) inline std::string strf(const char* format, ...) {
  va_list args;
  va_start(args, format);
  char small[256];
  va_list copy;
  va_copy(copy, args);
  int n = std::vsnprintf(small, sizeof small, format, copy);
  va_end(copy);
  std::string out;
  if (n < 0) {
    out = format;
  } else if (static_cast<size_t>(n) < sizeof small) {
    out.assign(small, static_cast<size_t>(n));
  } else {
    out.resize(static_cast<size_t>(n));
    std::vsnprintf(out.data(), out.size() + 1, format, args);
  }
  va_end(args);
  return out;
}

[[noreturn]] inline void fail_errno(const std::string& what) {
  throw BenchError(what + ": " + std::strerror(errno));
}

// Monotonic seconds, for differences.
inline double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The signal (SIGINT, SIGTERM, SIGHUP) that asked a benchmark to stop, 0 if none: a benchmark
// that sets it from its handler checks interrupted() in its waits and unwinds, cleaning up what
// it started.
inline volatile std::sig_atomic_t g_interrupt_signal = 0;
inline bool interrupted() {
  return g_interrupt_signal != 0;
}

// The nearest-rank percentile (0.5: the median) of `values`; 0 for none.
inline double percentile(std::vector<double> values, double fraction) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t rank = static_cast<size_t>(std::ceil(fraction * static_cast<double>(values.size())));
  return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
}

// A line on stdout, flushed so that progress shows while a long benchmark runs.
inline void println(const std::string& line = "") {
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// CPU use of the whole machine next to that of this process and its waited-for children (zstd -b,
// QEMU): the difference is what other processes took while a figure was measured. On a small
// machine a compiler running alongside halves the figures, and the output should show it.
struct CpuAccount {
  double wall_s = 0;
  double machine_busy_s = 0;  // all CPUs: user, nice, system, irq, softirq
  double steal_s = 0;         // taken by the hypervisor
  double own_s = 0;           // this process and its waited-for children
};

inline CpuAccount cpu_account() {
  CpuAccount account;
  account.wall_s = wall_seconds();
  std::ifstream in("/proc/stat");
  std::string label;
  uint64_t user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  in >> label >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal;
  double tick = static_cast<double>(::sysconf(_SC_CLK_TCK));
  if (in && label == "cpu" && tick > 0) {
    account.machine_busy_s = static_cast<double>(user + nice + system + irq + softirq) / tick;
    account.steal_s = static_cast<double>(steal) / tick;
  }
  for (int who : {RUSAGE_SELF, RUSAGE_CHILDREN}) {
    rusage usage{};
    ::getrusage(who, &usage);
    for (const timeval& tv : {usage.ru_utime, usage.ru_stime}) {
      account.own_s += static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) * 1e-6;
    }
  }
  return account;
}

// Cores kept busy by other processes between two accounts, on average.
inline double other_cores(const CpuAccount& from, const CpuAccount& to) {
  double busy = (to.machine_busy_s - from.machine_busy_s) - (to.own_s - from.own_s);
  return std::max(0.0, busy) / std::max(1e-9, to.wall_s - from.wall_s);
}

}  // namespace msb::bench

#endif  // MSB_BENCH_BENCH_UTIL_H_
