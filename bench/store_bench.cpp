// msb-bench-store: measures the content-addressed store (snapstore) on a buffer that looks like
// guest memory, next to `zstd -b` on the same data as the practical ceiling.
//
// The figures justify the store's choices (docs/store.md): the zstd level, the chunk size and the
// on-disk layout (a file per chunk). It prints plain text meant to be pasted into docs:
//   1. the machine and the buffer: half zero pages in runs, the rest real files of this machine;
//   2. the ceiling: `zstd -b<level> -B<chunk> -i3` on the non-zero pages, for each chunk size;
//   3. the in-process pipeline on one thread without I/O (what put costs per core at best);
//   4. put / materialize for each chunk size and thread count, with stored size;
//   5. the incremental cost of re-putting after dirtying 16 MiB, contiguous or scattered;
//   6. a layout probe: file per chunk versus a pack file;
//   7. the goals of the issue, met or not.
//
// Sizes are in KiB/MiB (2^10, 2^20 bytes); speeds in GB/s and MB/s are 10^9 and 10^6 bytes per
// second, the units zstd -b reports.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

#include <zstd.h>
#include <CLI/CLI.hpp>

#include "bench/bench_util.h"
#include "bench/memory_like.h"
#include "snapstore/hash.h"
#include "snapstore/object.h"
#include "snapstore/store.h"

namespace {

namespace fs = std::filesystem;
using msb::snapstore::Hash128;
using msb::snapstore::hash_bytes;
using msb::snapstore::is_all_zero;
using msb::snapstore::ObjectRef;
using msb::snapstore::Store;
using msb::snapstore::StoreOptions;
using msb::snapstore::StoreStats;
using msb::snapstore::TransferOptions;
using namespace msb::bench;

constexpr size_t kPage = 4096;
constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * 1024;
// The dirtied amount of the incremental test (the issue's 16 MiB), as pages.
constexpr size_t kDirtyPages = 16 * kMiB / kPage;
// The layout probe's chunk sizes: the store's default and a smaller one, whatever --chunk-sizes.
constexpr uint32_t kProbeChunk = 256 * kKiB;
constexpr uint32_t kProbeSmallChunk = 64 * kKiB;

// CPU time of the whole process (all threads): with the wall time it shows how many cores a
// measured call kept busy.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double mib(uint64_t bytes) {
  return static_cast<double>(bytes) / static_cast<double>(kMiB);
}
double gb_per_s(uint64_t bytes, double seconds) {
  return static_cast<double>(bytes) / seconds / 1e9;
}
double mb_per_s(uint64_t bytes, double seconds) {
  return static_cast<double>(bytes) / seconds / 1e6;
}

// An anonymous private mapping, unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(size_t size, bool populate) : size_(size) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0);
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) fail_errno(strf("cannot map %.0f MiB of memory", mib(size)));
    data_ = static_cast<std::byte*>(p);
  }
  Mapping(Mapping&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  void reset() {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<std::byte> span() const { return {data_, size_}; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// A file descriptor closed on destruction (the bench's own, to stay independent of the library's
// helpers it measures).
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now, reporting the error that a deferred close would swallow.
  void close(const std::string& what) {
    int fd = std::exchange(fd_, -1);
    if (fd >= 0 && ::close(fd) != 0) fail_errno("cannot close " + what);
  }

 private:
  int fd_;
};

Fd open_or_fail(const fs::path& path, int flags, mode_t mode = 0644) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  if (fd < 0) fail_errno("cannot open " + path.string());
  return Fd(fd);
}

void write_or_fail(int fd, const void* data, size_t size, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_errno("cannot write " + what);
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Flushes the filesystem holding `dir`. Called untimed before a timed step so that it does not
// pay for the writeback of whatever came before (the previous store's files, for instance).
void sync_filesystem(const fs::path& dir) {
  Fd fd = open_or_fail(dir, O_RDONLY | O_DIRECTORY);
  if (::syncfs(fd.get()) != 0) fail_errno("cannot sync the filesystem of " + dir.string());
}

// The bench's scratch directory: a fresh mkdtemp, removed with everything in it at the end.
class WorkDir {
 public:
  explicit WorkDir(const fs::path& parent) {
    std::string pattern = (parent / "msb-bench-store.XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      fail_errno("cannot create a directory in " + parent.string());
    path_ = pattern;
  }
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
  ~WorkDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// --- Machine description ----------------------------------------------------------------------

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto start = line.find_first_not_of(" \t", colon + 1);
        return start == std::string::npos ? "" : line.substr(start);
      }
    }
  }
  return "unknown";
}

double memory_gib() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (in >> key >> kib) {
    if (key == "MemTotal:") return static_cast<double>(kib) / (1024.0 * 1024.0);
    in.ignore(256, '\n');
  }
  return 0;
}

std::string filesystem_type(const fs::path& path) {
  struct statfs st {};
  if (::statfs(path.c_str(), &st) != 0) return "unknown filesystem";
  switch (static_cast<uint64_t>(st.f_type)) {
    case 0xEF53:
      return "ext4";
    case 0x58465342:
      return "xfs";
    case 0x9123683E:
      return "btrfs";
    case 0x01021994:
      return "tmpfs";
    case 0x794C7630:
      return "overlayfs";
    case 0x2FC12FC1:
      return "zfs";
    case 0xF2F52010:
      return "f2fs";
    default:
      return strf("filesystem type 0x%lx", static_cast<unsigned long>(st.f_type));
  }
}

std::optional<fs::path> find_in_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::string_view rest = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (!rest.empty()) {
    auto colon = rest.find(':');
    std::string_view dir = rest.substr(0, colon);
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
    if (dir.empty()) continue;
    fs::path candidate = fs::path(dir) / program;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::nullopt;
}

// Runs a shell command, returning its exit status and everything it printed (stderr included).
std::pair<int, std::string> run_command(const std::string& command) {
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) fail_errno("cannot run " + command);
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0)
    output.append(buf, n);
  int status = ::pclose(pipe);
  return {status, output};
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

// --- The memory-like buffer -------------------------------------------------------------------

// The buffer's generator is bench/memory_like.h, shared with msb-bench-snapshot.

struct MemoryImage {
  Mapping buffer;
  std::vector<uint8_t> zero_page;  // 1 where the page is all zero
  uint64_t zero_pages = 0;
  uint64_t zero_runs = 0, data_runs = 0, longest_zero_run = 0;
  // Fresh non-zero pages from the files after those in the buffer: new data for the incremental
  // test that the store cannot have seen.
  std::vector<std::byte> fresh;
  uint64_t data_bytes = 0, data_files = 0, zero_file_pages_skipped = 0;
  bool wrapped = false;
  std::vector<fs::path> roots_used;

  uint64_t size() const { return buffer.size(); }
  uint64_t pages() const { return zero_page.size(); }
  uint64_t nonzero_bytes() const { return (pages() - zero_pages) * kPage; }
};

MemoryImage build_image(uint64_t size, uint64_t seed, size_t fresh_pages) {
  MemoryImage image;
  // MAP_POPULATE: the buffer stands for guest memory that is all there, zero pages included.
  image.buffer = Mapping(size, /*populate=*/true);
  FileStream files(memory_like_roots());
  MemoryLikeLayout layout = fill_memory_like(image.buffer.span(), seed, files);
  image.zero_page = std::move(layout.zero_page);
  image.zero_pages = layout.zero_pages;
  image.zero_runs = layout.zero_runs;
  image.data_runs = layout.data_runs;
  image.longest_zero_run = layout.longest_zero_run;
  image.data_bytes = files.bytes_used();
  image.data_files = files.files_read();
  image.zero_file_pages_skipped = files.zero_pages_skipped();
  image.roots_used = files.roots_used();
  image.fresh.resize(fresh_pages * kPage);
  for (size_t i = 0; i < fresh_pages; ++i)
    files.next_page(image.fresh.data() + i * kPage);
  image.wrapped = files.wrapped();
  return image;
}

// Writes the non-zero pages, concatenated in order: the data zstd -b measures.
void write_nonzero_pages(const MemoryImage& image, const fs::path& path) {
  Fd fd = open_or_fail(path, O_WRONLY | O_CREAT | O_TRUNC);
  uint64_t page = 0;
  while (page < image.pages()) {
    if (image.zero_page[page]) {
      ++page;
      continue;
    }
    uint64_t end = page;
    while (end < image.pages() && !image.zero_page[end])
      ++end;
    write_or_fail(fd.get(), image.buffer.data() + page * kPage, (end - page) * kPage,
                  path.string());
    page = end;
  }
  fd.close(path.string());
}

// --- Ceiling: zstd -b -----------------------------------------------------------------------

struct ZstdBench {
  bool ok = false;
  double ratio = 0, compress_mbps = 0, decompress_mbps = 0;
  std::string problem;  // why !ok
};

// zstd -b redraws its progress line with '\r' and ends with "<level>#" drawn over the start of
// the final line. Rendering each '\n' line the way a terminal would (a '\r' returns to column 0
// and overwrites) gives the result line " 1#-file : N -> M (x3.35), 280.1 MB/s, 900.2 MB/s".
std::vector<std::string> render_terminal_lines(const std::string& output) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= output.size()) {
    size_t end = output.find('\n', start);
    if (end == std::string::npos) end = output.size();
    std::string rendered;
    size_t column = 0;
    for (size_t i = start; i < end; ++i) {
      char c = output[i];
      if (c == '\r') {
        column = 0;
        continue;
      }
      if (column < rendered.size()) {
        rendered[column] = c;
      } else {
        rendered.push_back(c);
      }
      ++column;
    }
    lines.push_back(rendered);
    start = end + 1;
  }
  return lines;
}

// Parses "(xR)" and the two "N MB/s" of a zstd -b result line.
bool parse_zstd_result(const std::string& line, ZstdBench* result) {
  auto x = line.find("(x");
  if (x == std::string::npos) return false;
  result->ratio = std::strtod(line.c_str() + x + 2, nullptr);
  std::vector<double> speeds;
  for (size_t pos = line.find("MB/s"); pos != std::string::npos; pos = line.find("MB/s", pos + 4)) {
    size_t end = pos;
    while (end > 0 && line[end - 1] == ' ')
      --end;
    size_t begin = end;
    while (begin > 0 &&
           (std::isdigit(static_cast<unsigned char>(line[begin - 1])) || line[begin - 1] == '.')) {
      --begin;
    }
    if (begin == end) return false;
    speeds.push_back(std::strtod(line.substr(begin, end - begin).c_str(), nullptr));
  }
  if (speeds.size() != 2 || result->ratio <= 0 || speeds[0] <= 0 || speeds[1] <= 0) return false;
  result->compress_mbps = speeds[0];
  result->decompress_mbps = speeds[1];
  return true;
}

ZstdBench run_zstd_bench(const fs::path& zstd, const fs::path& file, int level, uint32_t chunk) {
  ZstdBench result;
  std::string command = strf("%s -b%d -B%u -i3 %s", shell_quote(zstd.string()).c_str(), level,
                             chunk, shell_quote(file.string()).c_str());
  auto [status, output] = run_command(command);
  std::string marker = strf("%d#", level);
  std::string found;
  for (const auto& line : render_terminal_lines(output)) {
    auto first = line.find_first_not_of(' ');
    if (first != std::string::npos && line.compare(first, marker.size(), marker) == 0) found = line;
  }
  if (status != 0) {
    result.problem = strf("zstd -b exited with status %d", status);
  } else if (found.empty() || !parse_zstd_result(found, &result)) {
    result.problem = "could not find the \"" + marker + "\" result line in zstd -b's output";
  } else {
    result.ok = true;
  }
  return result;
}

// --- In-process pipeline: what the store does per chunk, on one thread, without I/O ------------

struct ChunkSet {
  uint32_t chunk_size = 0;
  uint64_t chunks = 0, zero_chunks = 0, duplicate_chunks = 0;
  uint64_t plain_bytes = 0;       // of the distinct non-zero chunks
  uint64_t compressed_bytes = 0;  // their zstd frames
  double hash_s = 0, compress_s = 0, decompress_s = 0;
  // Kept only for the layout probe: the frames and their file names (hex of the plain bytes).
  std::vector<std::string> frames;
  std::vector<std::string> names;
};

ChunkSet compress_chunks(std::span<const std::byte> buffer, uint32_t chunk_size, int level,
                         bool keep) {
  ChunkSet set;
  set.chunk_size = chunk_size;
  std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
  std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> dctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!cctx || !dctx) throw BenchError("cannot create a zstd context");
  std::unordered_set<Hash128> seen;
  std::vector<std::string> frames;
  std::vector<char> scratch(ZSTD_compressBound(chunk_size));
  for (uint64_t offset = 0; offset < buffer.size(); offset += chunk_size) {
    auto chunk = buffer.subspan(offset, std::min<uint64_t>(chunk_size, buffer.size() - offset));
    ++set.chunks;
    // The zero test is part of hashing's cost: the store does both on every chunk.
    double t0 = wall_seconds();
    bool zero = is_all_zero(chunk);
    Hash128 hash;
    if (!zero) hash = hash_bytes(chunk);
    double t1 = wall_seconds();
    set.hash_s += t1 - t0;
    if (zero) {
      ++set.zero_chunks;
      continue;
    }
    if (!seen.insert(hash).second) {
      ++set.duplicate_chunks;
      continue;
    }
    size_t n = ZSTD_compressCCtx(cctx.get(), scratch.data(), scratch.size(), chunk.data(),
                                 chunk.size(), level);
    set.compress_s += wall_seconds() - t1;
    if (ZSTD_isError(n))
      throw BenchError(std::string("zstd compression failed: ") + ZSTD_getErrorName(n));
    frames.emplace_back(scratch.data(), n);
    if (keep) set.names.push_back(hash.hex());
    set.plain_bytes += chunk.size();
    set.compressed_bytes += n;
  }
  std::vector<char> plain(chunk_size);
  double t0 = wall_seconds();
  for (const auto& frame : frames) {
    size_t n =
        ZSTD_decompressDCtx(dctx.get(), plain.data(), plain.size(), frame.data(), frame.size());
    if (ZSTD_isError(n))
      throw BenchError(std::string("zstd decompression failed: ") + ZSTD_getErrorName(n));
  }
  set.decompress_s = wall_seconds() - t0;
  if (keep) set.frames = std::move(frames);
  return set;
}

// --- Store measurements -------------------------------------------------------------------------

// Throws naming the first differing byte: a materialize that returns wrong bytes is a store bug,
// and the bench must say so rather than print a speed.
void verify_equal(std::span<const std::byte> expected, std::span<const std::byte> actual,
                  uint32_t chunk_size, const std::string& what) {
  if (expected.size() == actual.size() &&
      std::memcmp(expected.data(), actual.data(), expected.size()) == 0) {
    return;
  }
  if (expected.size() != actual.size()) {
    throw BenchError(
        strf("%s: wrong size %zu, expected %zu", what.c_str(), actual.size(), expected.size()));
  }
  size_t i = 0;
  while (expected[i] == actual[i])
    ++i;
  throw BenchError(
      strf("%s returned wrong bytes: first difference at offset %zu (chunk %zu, byte %zu "
           "of it): 0x%02x instead of 0x%02x",
           what.c_str(), i, i / chunk_size, i % chunk_size, static_cast<unsigned>(actual[i]),
           static_cast<unsigned>(expected[i])));
}

void verify_file(const fs::path& path, std::span<const std::byte> expected, uint32_t chunk_size,
                 const std::string& what) {
  Fd fd = open_or_fail(path, O_RDONLY);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail_errno("cannot stat " + path.string());
  if (static_cast<uint64_t>(st.st_size) != expected.size()) {
    throw BenchError(strf("%s: file has %lld bytes, expected %zu", what.c_str(),
                          static_cast<long long>(st.st_size), expected.size()));
  }
  if (expected.empty()) return;
  void* p = ::mmap(nullptr, expected.size(), PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) fail_errno("cannot map " + path.string());
  std::span<const std::byte> actual(static_cast<const std::byte*>(p), expected.size());
  try {
    verify_equal(expected, actual, chunk_size, what);
  } catch (...) {
    ::munmap(p, expected.size());
    throw;
  }
  ::munmap(p, expected.size());
}

struct Row {
  uint32_t chunk_size = 0;
  unsigned threads = 0;
  double put_s = 0, put_cpu_s = 0;
  double mat_zeroed_s = 0, mat_dirty_s = 0, mat_file_s = 0;
  double first_touch_s = 0;  // of fresh memory like the zeroed destination, same threads
  uint64_t stored_bytes = 0, chunk_files = 0;
  double other_cores = 0;  // taken by other processes during the row
};

struct Incremental {
  uint32_t chunk_size = 0;
  std::string kind;
  uint64_t dirty_bytes = 0;
  uint64_t chunks_changed = 0;
  uint64_t stored_growth = 0, chunk_files_added = 0;
  double put_s = 0;
};

// Seconds to write every page of a fresh anonymous mapping of `size` bytes with `threads`
// threads: the page faults that materialize into fresh memory cannot avoid, so the floor under
// its time. In a virtual machine the hypervisor faults too, on memory the guest has not touched
// yet or has freed and handed back, so this varies from run to run there; measured next to each
// materialize it shows what that one met.
double first_touch_seconds(size_t size, unsigned threads) {
  Mapping fresh(size, /*populate=*/false);
  double t0 = wall_seconds();
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&fresh, t, threads] {
      size_t pages = fresh.size() / kPage;
      size_t begin = pages * t / threads * kPage, end = pages * (t + 1) / threads * kPage;
      std::memset(fresh.data() + begin, 0x5A, end - begin);
    });
  }
  for (auto& worker : workers)
    worker.join();
  return wall_seconds() - t0;
}

// TransferOptions by assignment: designated initializers would leave `progress` unnamed, which
// -Wextra reports.
TransferOptions transfer(unsigned threads, uint32_t chunk_size = 0,
                         bool destination_zeroed = false) {
  TransferOptions options;
  options.threads = threads;
  options.chunk_size = chunk_size;
  options.destination_zeroed = destination_zeroed;
  return options;
}

uint64_t changed_chunks(const ObjectRef& a, const ObjectRef& b) {
  uint64_t n = 0;
  for (size_t i = 0; i < std::min(a.chunks.size(), b.chunks.size()); ++i)
    n += a.chunks[i] != b.chunks[i];
  return n;
}

// Dirties `pages` (a list of page indexes) with fresh data, re-puts the whole buffer into the
// same store, measures the growth, checks the new object, and restores the buffer.
Incremental measure_incremental(Store& store, const ObjectRef& base, MemoryImage& image,
                                Mapping& scratch, const std::vector<uint64_t>& pages,
                                std::span<const std::byte> fresh, unsigned threads,
                                std::string kind) {
  Incremental result;
  result.chunk_size = base.chunk_size;
  result.kind = std::move(kind);
  result.dirty_bytes = pages.size() * kPage;
  std::vector<std::byte> saved(pages.size() * kPage);
  for (size_t i = 0; i < pages.size(); ++i) {
    std::byte* page = image.buffer.data() + pages[i] * kPage;
    std::memcpy(saved.data() + i * kPage, page, kPage);
    std::memcpy(page, fresh.data() + i * kPage, kPage);
  }
  StoreStats before = store.stats();
  sync_filesystem(store.root());
  double t0 = wall_seconds();
  ObjectRef ref = store.put_object(image.buffer.span(), transfer(threads, base.chunk_size));
  result.put_s = wall_seconds() - t0;
  StoreStats after = store.stats();
  result.stored_growth = after.stored_bytes - before.stored_bytes;
  result.chunk_files_added = after.chunks - before.chunks;
  result.chunks_changed = changed_chunks(base, ref);
  store.materialize(ref, scratch.span(), transfer(threads));
  verify_equal(image.buffer.span(), scratch.span(), base.chunk_size,
               strf("materialize after the %s re-put (%u KiB chunks)", result.kind.c_str(),
                    static_cast<unsigned>(base.chunk_size / kKiB)));
  for (size_t i = 0; i < pages.size(); ++i) {
    std::memcpy(image.buffer.data() + pages[i] * kPage, saved.data() + i * kPage, kPage);
  }
  return result;
}

// --- Layout probe ------------------------------------------------------------------------------

struct ProbeResult {
  std::string label;
  uint64_t chunks = 0, bytes = 0;
  double write_s = 0;  // creating and writing (and renaming) the files
  double sync_s = 0;   // the final syncfs or fsync
  double seconds() const { return write_s + sync_s; }
};

// Each chunk as its own file, as the store lays them out: written to tmp/, renamed into one of
// 256 folders named by the first two hex digits, and one syncfs for all of them at the end.
ProbeResult probe_file_per_chunk(const fs::path& root, const ChunkSet& set, std::string label) {
  fs::create_directories(root / "tmp");
  for (int i = 0; i < 256; ++i)
    fs::create_directories(root / "chunks" / strf("%02x", i));
  sync_filesystem(root);
  ProbeResult result{std::move(label), set.frames.size(), 0, 0, 0};
  double t0 = wall_seconds();
  for (size_t i = 0; i < set.frames.size(); ++i) {
    const std::string& name = set.names[i];
    fs::path temp = root / "tmp" / (name + ".tmp");
    Fd fd = open_or_fail(temp, O_WRONLY | O_CREAT | O_EXCL);
    write_or_fail(fd.get(), set.frames[i].data(), set.frames[i].size(), temp.string());
    fd.close(temp.string());
    fs::path final_path = root / "chunks" / name.substr(0, 2) / name;
    if (::rename(temp.c_str(), final_path.c_str()) != 0)
      fail_errno("cannot rename " + temp.string());
    result.bytes += set.frames[i].size();
  }
  double t1 = wall_seconds();
  sync_filesystem(root);
  result.write_s = t1 - t0;
  result.sync_s = wall_seconds() - t1;
  return result;
}

// Microseconds to create a small file (create, write 4 KiB, close), averaged over `count` files
// made in a new folder under `dir` and left there. A health check of the file system rather than a
// figure of the store: ext4 without a journal skips inodes freed in the last few minutes
// (recently_deleted() in the kernel) and checks them one by one on every creation, so soon after
// many files were deleted (by gc, or by the previous run of this program) each creation can cost
// a millisecond instead of tens of microseconds, and put, which creates a file per chunk, slows
// down with it.
double file_creation_us(const fs::path& dir, int count) {
  fs::create_directories(dir);
  std::vector<char> bytes(kPage, 'x');
  double t0 = wall_seconds();
  for (int i = 0; i < count; ++i) {
    fs::path path = dir / strf("f%05d", i);
    Fd fd = open_or_fail(path, O_WRONLY | O_CREAT | O_EXCL);
    write_or_fail(fd.get(), bytes.data(), bytes.size(), path.string());
    fd.close(path.string());
  }
  return (wall_seconds() - t0) * 1e6 / count;
}

// All chunks appended to one pack file, then one fsync.
ProbeResult probe_pack_file(const fs::path& root, const ChunkSet& set, std::string label) {
  fs::create_directories(root);
  sync_filesystem(root);
  ProbeResult result{std::move(label), set.frames.size(), 0, 0, 0};
  fs::path path = root / "chunks.pack";
  double t0 = wall_seconds();
  Fd fd = open_or_fail(path, O_WRONLY | O_CREAT | O_EXCL);
  for (const auto& frame : set.frames) {
    write_or_fail(fd.get(), frame.data(), frame.size(), path.string());
    result.bytes += frame.size();
  }
  double t1 = wall_seconds();
  if (::fsync(fd.get()) != 0) fail_errno("cannot fsync " + path.string());
  fd.close(path.string());
  result.write_s = t1 - t0;
  result.sync_s = wall_seconds() - t1;
  return result;
}

// --- Output --------------------------------------------------------------------------------------

constexpr size_t kOutputWidth = 98;

// Prints `text` wrapped at kOutputWidth columns: the first line after `lead`, the next ones
// indented by `indent` spaces. Keeps the long explanations readable in the source and the output.
void print_wrapped(std::string_view lead, size_t indent, std::string_view text) {
  std::string line(lead);
  bool empty = true;
  while (!text.empty()) {
    size_t space = text.find(' ');
    std::string_view word = text.substr(0, space);
    text = space == std::string_view::npos ? std::string_view{} : text.substr(space + 1);
    if (word.empty()) continue;
    if (!empty && line.size() + 1 + word.size() > kOutputWidth) {
      println(line);
      line.assign(indent, ' ');
      empty = true;
    }
    if (!empty) line += ' ';
    line += word;
    empty = false;
  }
  println(line);
}

// A header field: "  name        text", continuation lines aligned with the text.
void print_field(std::string_view name, std::string_view text) {
  std::string lead = "  " + std::string(name);
  lead.resize(14, ' ');
  print_wrapped(lead, 14, text);
}

// A plain text table: columns two spaces apart, right-aligned unless `left`, with headers of up to
// three lines so that wide tables stay within kOutputWidth.
class Table {
 public:
  struct Column {
    size_t width;
    std::array<const char*, 3> head;
    bool left = false;
  };
  explicit Table(std::vector<Column> columns) : columns_(std::move(columns)) {}

  void print_header() const {
    for (size_t line = 0; line < 3; ++line) {
      std::vector<std::string> cells;
      bool any = false;
      for (const auto& column : columns_) {
        const char* head = column.head[line];
        cells.emplace_back(head != nullptr ? head : "");
        any = any || !cells.back().empty();
      }
      if (any) print_row(cells);
    }
  }

  void print_row(const std::vector<std::string>& cells) const {
    std::string line;
    for (size_t i = 0; i < columns_.size(); ++i) {
      const std::string& cell = i < cells.size() ? cells[i] : std::string();
      std::string pad(cell.size() < columns_[i].width ? columns_[i].width - cell.size() : 0, ' ');
      line += "  ";
      line += columns_[i].left ? cell + pad : pad + cell;
    }
    println(line.substr(0, line.find_last_not_of(' ') + 1));
  }

 private:
  std::vector<Column> columns_;
};

std::string percent_or_na(std::optional<double> value) {
  return value ? strf("%.0f%%", *value) : "n/a";
}

struct Options {
  uint64_t size_mib = 1024;
  std::string dir;
  int level = 1;
  std::vector<uint32_t> chunk_kib = {64, 256, 1024};
  std::vector<unsigned> threads = {1, 2};
  uint64_t seed = 1;
};

int run(const Options& options) {
  const uint64_t size = options.size_mib * kMiB;
  std::vector<uint32_t> chunk_sizes;
  for (uint32_t kib : options.chunk_kib) {
    if (kib == 0 || kib % 4 != 0 || kib > 64 * 1024) {
      throw BenchError(strf("chunk size %u KiB: must be a multiple of 4 KiB, at most 64 MiB", kib));
    }
    chunk_sizes.push_back(kib * static_cast<uint32_t>(kKiB));
  }
  for (unsigned t : options.threads) {
    if (t == 0) throw BenchError("thread counts must be at least 1");
  }
  if (options.level < 1 || options.level > ZSTD_maxCLevel()) {
    throw BenchError(strf("level %d: must be 1 to %d", options.level, ZSTD_maxCLevel()));
  }
  fs::path parent = options.dir.empty() ? fs::path("/var/tmp") : fs::path(options.dir);
  WorkDir work(parent);
  constexpr int kCreationCheckFiles = 1000;
  constexpr double kSlowCreationUs = 300;
  const double creation_us_start =
      file_creation_us(work.path() / "creation-check-start", kCreationCheckFiles);

  // The incremental test's dirt: 16 MiB, or an eighth of a smaller buffer.
  const size_t dirty_pages = std::min<size_t>(kDirtyPages, size / kPage / 8);

  // --- Header ---
  utsname uts{};
  ::uname(&uts);
  char date[64] = "";
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M %Z", std::localtime(&now));
  auto zstd_cli = find_in_path("zstd");
  std::string zstd_cli_version = "not installed";
  if (zstd_cli) {
    auto [status, out] = run_command(shell_quote(zstd_cli->string()) + " --version");
    zstd_cli_version = out.substr(0, out.find('\n'));
    if (status != 0) zstd_cli_version = "present, but --version failed";
  }
  println("msb-bench-store: the content-addressed store on a buffer that looks like guest memory");
  print_field("date", date);
  print_field("machine", strf("%ld CPUs online (nproc), %s, %.1f GiB RAM, %s %s",
                              ::sysconf(_SC_NPROCESSORS_ONLN), cpu_model().c_str(), memory_gib(),
                              uts.sysname, uts.release));
  print_field("store dir",
              strf("%s (%s)", work.path().c_str(), filesystem_type(work.path()).c_str()));
  print_field("file create",
              strf("%.0f us per file at the start (%d files of 4 KiB)%s", creation_us_start,
                   kCreationCheckFiles,
                   creation_us_start > kSlowCreationUs
                       ? ": SLOW. Probably many files were deleted in the last minutes (ext4 "
                         "without a journal avoids their inodes for a while); put figures will be "
                         "low. Wait a few minutes and run again"
                       : ""));
  print_field("zstd", strf("library %s, level %d; CLI: %s", ZSTD_versionString(), options.level,
                           zstd_cli_version.c_str()));
  print_field("units",
              "sizes in KiB and MiB (2^10, 2^20 bytes); speeds in GB/s and MB/s (10^9 and 10^6 "
              "bytes per second, as zstd -b reports); one run per figure");
  println();

  const CpuAccount run_start = cpu_account();

  // --- 1. Buffer ---
  double t0 = wall_seconds();
  MemoryImage image = build_image(size, options.seed, 2 * dirty_pages);
  double build_s = wall_seconds() - t0;
  std::string roots;
  for (const auto& r : image.roots_used)
    roots += (roots.empty() ? "" : ", ") + r.string();
  println("Buffer");
  print_field("size", strf("%.0f MiB = %llu pages of 4 KiB, anonymous mmap (MAP_POPULATE), "
                           "seed %llu",
                           mib(size), static_cast<unsigned long long>(image.pages()),
                           static_cast<unsigned long long>(options.seed)));
  print_field(
      "zero pages",
      strf("%llu (%.1f%%) in %llu runs, alternating with %llu runs of data pages; run "
           "lengths geometric with mean %.0f pages (longest zero run %llu pages)",
           static_cast<unsigned long long>(image.zero_pages),
           100.0 * static_cast<double>(image.zero_pages) / static_cast<double>(image.pages()),
           static_cast<unsigned long long>(image.zero_runs),
           static_cast<unsigned long long>(image.data_runs), kMeanRunPages,
           static_cast<unsigned long long>(image.longest_zero_run)));
  print_field("data pages",
              strf("%.1f MiB from %llu files under %s, concatenated in sorted path order (the "
                   "last file partly; %llu all-zero pages of the files skipped)%s",
                   mib(image.data_bytes), static_cast<unsigned long long>(image.data_files),
                   roots.c_str(), static_cast<unsigned long long>(image.zero_file_pages_skipped),
                   image.wrapped ? "; THE FILES RAN OUT, SO THE DATA REPEATS" : ""));
  print_field("fresh data", strf("%.0f MiB of the files that follow, kept as new data for the "
                                 "incremental test; buffer built in %.1f s",
                                 mib(image.fresh.size()), build_s));
  println();

  // --- 2. Ceiling ---
  std::map<uint32_t, ZstdBench> ceiling;
  print_wrapped("", 2,
                strf("Ceiling: zstd -b%d -B<chunk> -i3 on the %.1f MiB of non-zero pages "
                     "(concatenated), one core",
                     options.level, mib(image.nonzero_bytes())));
  if (!zstd_cli) {
    println("  zstd is not installed: no ceiling, so no \"% of ceiling\" figures");
  } else {
    fs::path data_file = work.path() / "nonzero-pages.bin";
    write_nonzero_pages(image, data_file);
    Table table({{5, {"chunk", "KiB"}},
                 {5, {"ratio"}},
                 {8, {"compress", "MB/s"}},
                 {10, {"decompress", "MB/s"}}});
    table.print_header();
    for (uint32_t cs : chunk_sizes) {
      ZstdBench bench = run_zstd_bench(*zstd_cli, data_file, options.level, cs);
      if (bench.ok) {
        table.print_row({strf("%u", static_cast<unsigned>(cs / kKiB)), strf("%.2f", bench.ratio),
                         strf("%.1f", bench.compress_mbps), strf("%.1f", bench.decompress_mbps)});
      } else {
        println(strf("  %5u  %s", static_cast<unsigned>(cs / kKiB), bench.problem.c_str()));
      }
      ceiling[cs] = bench;
    }
    fs::remove(data_file);
  }
  println();
  auto ceiling_mbps = [&](uint32_t cs) -> std::optional<double> {
    auto it = ceiling.find(cs);
    if (it == ceiling.end() || !it->second.ok) return std::nullopt;
    return it->second.compress_mbps;
  };

  // --- 3. In-process pipeline ---
  std::map<uint32_t, ChunkSet> kept;
  print_wrapped("", 2,
                strf("Pipeline in process, one thread, no I/O: is_all_zero + XXH3-128 and "
                     "ZSTD_compressCCtx level %d per chunk, as put does; zero and repeated chunks "
                     "skipped. hash GB/s over all bytes; compress MB/s over the non-zero pages "
                     "(compare with the ceiling); decompress GB/s over the bytes of the stored "
                     "chunks; ratio of the stored chunks",
                     options.level));
  Table pipeline({{5, {"chunk", "KiB"}},
                  {6, {"chunks"}},
                  {8, {"all-zero"}},
                  {8, {"repeated"}},
                  {4, {"hash", "GB/s"}},
                  {8, {"compress", "MB/s"}},
                  {7, {"% of", "ceiling"}},
                  {10, {"decompress", "GB/s"}},
                  {5, {"ratio"}}});
  pipeline.print_header();
  for (uint32_t cs : chunk_sizes) {
    bool keep = cs == kProbeChunk || cs == kProbeSmallChunk;
    ChunkSet set = compress_chunks(image.buffer.span(), cs, options.level, keep);
    double compress_mbps = mb_per_s(image.nonzero_bytes(), set.compress_s);
    auto c = ceiling_mbps(cs);
    pipeline.print_row({strf("%u", static_cast<unsigned>(cs / kKiB)),
                        strf("%llu", static_cast<unsigned long long>(set.chunks)),
                        strf("%llu", static_cast<unsigned long long>(set.zero_chunks)),
                        strf("%llu", static_cast<unsigned long long>(set.duplicate_chunks)),
                        strf("%.1f", gb_per_s(size, set.hash_s)), strf("%.1f", compress_mbps),
                        percent_or_na(c ? std::optional(100.0 * compress_mbps / *c) : std::nullopt),
                        strf("%.2f", gb_per_s(set.plain_bytes, set.decompress_s)),
                        strf("%.2f", static_cast<double>(set.plain_bytes) /
                                         static_cast<double>(set.compressed_bytes))});
    if (keep) kept.emplace(cs, std::move(set));
  }
  println();

  {
    Mapping touched(size, /*populate=*/true);
    double w0 = wall_seconds();
    std::memcpy(touched.data(), image.buffer.data(), size);
    print_wrapped("", 2,
                  strf("Memory: copying the buffer into memory already touched, one thread: "
                       "%.2f GB/s",
                       gb_per_s(size, wall_seconds() - w0)));
    println();
  }

  // --- 4 and 5. Store matrix and incremental cost ---
  std::vector<Row> rows;
  std::vector<Incremental> increments;
  fs::path file_path = work.path() / "materialized.img";
  print_wrapped("", 2,
                strf("Store: put_object and materialize of the %.0f MiB buffer, a new store per "
                     "row (level %d; the chunk files are in the page cache when read back). put "
                     "GB/s over the whole buffer; put MB/s over its non-zero pages; %% of ceiling "
                     "per core = put MB/s / threads / ceiling MB/s; cores = CPU time / wall time "
                     "of put; materialize into fresh (zero) memory with destination_zeroed, into "
                     "dirty memory, and to a new file; touch = writing another fresh buffer with "
                     "as many threads, the page faults that materialize into fresh memory pays "
                     "too; ratio = buffer size / stored bytes; other cores = cores that other "
                     "processes kept busy during the row (should be near 0)",
                     mib(size), options.level));
  Table matrix({{5, {"chunk", "KiB"}},
                {3, {"thr"}},
                {5, {"put", "GB/s", "whole"}},
                {8, {"put", "MB/s", "non-zero"}},
                {5, {"%ceil", "per", "core"}},
                {5, {"put", "cores"}},
                {5, {"mat", "GB/s", "fresh"}},
                {5, {"touch", "GB/s", "fresh"}},
                {5, {"mat", "GB/s", "dirty"}},
                {5, {"mat", "GB/s", "file"}},
                {6, {"stored", "MiB"}},
                {5, {"ratio"}},
                {5, {"chunk", "files"}},
                {5, {"other", "cores"}}});
  matrix.print_header();
  std::vector<uint64_t> contiguous_pages, scattered_pages;
  {
    // The same dirt for every chunk size, so that the growths compare.
    std::mt19937_64 rng(options.seed + 1);
    uint64_t start = rng() % (image.pages() - dirty_pages + 1);
    for (size_t i = 0; i < dirty_pages; ++i)
      contiguous_pages.push_back(start + i);
    std::set<uint64_t> chosen;
    while (chosen.size() < dirty_pages)
      chosen.insert(rng() % image.pages());
    scattered_pages.assign(chosen.begin(), chosen.end());
  }
  const unsigned incremental_threads = options.threads.back();
  for (uint32_t cs : chunk_sizes) {
    for (unsigned threads : options.threads) {
      Row row{.chunk_size = cs, .threads = threads};
      CpuAccount row_start = cpu_account();
      std::string where =
          strf("%u KiB chunks, %u threads", static_cast<unsigned>(cs / kKiB), threads);
      // Each row gets its own store, and none is deleted before the end: ext4 without a journal
      // avoids reusing inodes freed in the last ~30 s (recently_deleted() in the kernel), checking
      // them one by one, so thousands of chunk files deleted just before a put would make each of
      // its file creations cost about a millisecond, a cost of the benchmark and not of the store.
      fs::path store_dir =
          work.path() / strf("store-%uk-%ut", static_cast<unsigned>(cs / kKiB), threads);
      sync_filesystem(work.path());
      auto store = Store::open(
          store_dir,
          StoreOptions{.zstd_level = options.level, .chunk_size = cs, .threads = threads});

      double w0 = wall_seconds(), c0 = cpu_seconds();
      ObjectRef ref = store->put_object(image.buffer.span(), transfer(threads, cs));
      row.put_s = wall_seconds() - w0;
      row.put_cpu_s = cpu_seconds() - c0;
      if (ref.size != size || ref.chunk_size != cs) {
        throw BenchError(strf("put_object (%s) returned an object of %llu bytes in %u-byte chunks",
                              where.c_str(), static_cast<unsigned long long>(ref.size),
                              ref.chunk_size));
      }
      StoreStats stats = store->stats();
      row.stored_bytes = stats.stored_bytes;
      row.chunk_files = stats.chunks;

      // Fresh anonymous memory is zero: the store may skip zero chunks (destination_zeroed).
      Mapping dest(size, /*populate=*/false);
      w0 = wall_seconds();
      store->materialize(ref, dest.span(), transfer(threads, 0, /*destination_zeroed=*/true));
      row.mat_zeroed_s = wall_seconds() - w0;
      verify_equal(image.buffer.span(), dest.span(), cs,
                   "materialize (" + where + ", zeroed destination)");
      // While `dest` is still mapped, so that the reference cannot reuse its pages.
      row.first_touch_s = first_touch_seconds(size, threads);

      // Memory that held something else: every byte must be written, zero chunks included.
      std::memset(dest.data(), 0xA5, dest.size());
      w0 = wall_seconds();
      store->materialize(ref, dest.span(), transfer(threads, 0, /*destination_zeroed=*/false));
      row.mat_dirty_s = wall_seconds() - w0;
      verify_equal(image.buffer.span(), dest.span(), cs,
                   "materialize (" + where + ", dirty destination)");

      sync_filesystem(work.path());
      w0 = wall_seconds();
      store->materialize_file(ref, file_path, transfer(threads));
      row.mat_file_s = wall_seconds() - w0;
      verify_file(file_path, image.buffer.span(), cs, "materialize_file (" + where + ")");
      fs::remove(file_path);

      row.other_cores = other_cores(row_start, cpu_account());
      std::optional<double> c = ceiling_mbps(cs);
      double put_mbps = mb_per_s(image.nonzero_bytes(), row.put_s);
      matrix.print_row(
          {strf("%u", static_cast<unsigned>(cs / kKiB)), strf("%u", threads),
           strf("%.2f", gb_per_s(size, row.put_s)), strf("%.1f", put_mbps),
           percent_or_na(c ? std::optional(100.0 * put_mbps / threads / *c) : std::nullopt),
           strf("%.2f", row.put_cpu_s / row.put_s), strf("%.2f", gb_per_s(size, row.mat_zeroed_s)),
           strf("%.2f", gb_per_s(size, row.first_touch_s)),
           strf("%.2f", gb_per_s(size, row.mat_dirty_s)),
           strf("%.2f", gb_per_s(size, row.mat_file_s)), strf("%.1f", mib(row.stored_bytes)),
           strf("%.2f", static_cast<double>(size) / static_cast<double>(row.stored_bytes)),
           strf("%llu", static_cast<unsigned long long>(row.chunk_files)),
           strf("%.2f", row.other_cores)});
      rows.push_back(row);

      if (threads == incremental_threads) {
        std::span<const std::byte> fresh(image.fresh);
        increments.push_back(measure_incremental(*store, ref, image, dest, contiguous_pages,
                                                 fresh.first(dirty_pages * kPage), threads,
                                                 "contiguous"));
        increments.push_back(measure_incremental(*store, ref, image, dest, scattered_pages,
                                                 fresh.subspan(dirty_pages * kPage), threads,
                                                 "scattered"));
      }
      store.reset();
    }
  }
  println();

  print_wrapped("", 2,
                strf("Incremental cost: dirty %.0f MiB of the buffer with new data, then re-put "
                     "the whole buffer into the same store (%u threads; unchanged chunks are "
                     "found by hash and not written again). contiguous: one run of %zu pages; "
                     "scattered: %zu distinct random pages (the same pages for every chunk size). "
                     "growth = bytes of the new chunk files",
                     mib(dirty_pages * kPage), incremental_threads, dirty_pages, dirty_pages));
  Table incremental({{5, {"chunk", "KiB"}},
                     {10, {"dirtied"}, true},
                     {7, {"chunks", "changed"}},
                     {10, {"new chunk", "files"}},
                     {6, {"growth", "MiB"}},
                     {7, {"growth/", "dirtied"}},
                     {6, {"re-put", "s"}}});
  incremental.print_header();
  for (const auto& inc : increments) {
    incremental.print_row({strf("%u", static_cast<unsigned>(inc.chunk_size / kKiB)), inc.kind,
                           strf("%llu", static_cast<unsigned long long>(inc.chunks_changed)),
                           strf("%llu", static_cast<unsigned long long>(inc.chunk_files_added)),
                           strf("%.1f", mib(inc.stored_growth)),
                           strf("%.2f", static_cast<double>(inc.stored_growth) /
                                            static_cast<double>(inc.dirty_bytes)),
                           strf("%.2f", inc.put_s)});
  }
  println();

  // --- 6. Layout probe ---
  print_wrapped("", 2,
                "Layout probe (a probe to justify the on-disk layout, not the store's code): "
                "write this buffer's compressed chunks (distinct, non-zero) on one thread, (a) "
                "each as its own file in 256 folders via a temporary file and a rename, then one "
                "syncfs; (b) appended to one pack file, then one fsync");
  Table layout({{35, {"layout"}, true},
                {6, {"chunks"}},
                {7, {"written", "MiB"}},
                {6, {"write", "ms"}},
                {6, {"sync", "ms"}},
                {6, {"total", "ms"}},
                {6, {"us per", "chunk"}},
                {5, {"MB/s"}}});
  fs::path probe_dir = work.path() / "probe";
  for (uint32_t cs : {kProbeChunk, kProbeSmallChunk}) {
    if (!kept.contains(cs))
      kept.emplace(cs, compress_chunks(image.buffer.span(), cs, options.level, true));
  }
  std::vector<ProbeResult> probes;
  probes.push_back(probe_file_per_chunk(probe_dir / "a", kept.at(kProbeChunk),
                                        "(a)  file per chunk, 256 KiB chunks"));
  probes.push_back(
      probe_pack_file(probe_dir / "b", kept.at(kProbeChunk), "(b)  pack file, 256 KiB chunks"));
  probes.push_back(probe_file_per_chunk(probe_dir / "a2", kept.at(kProbeSmallChunk),
                                        "(a') file per chunk, 64 KiB chunks"));
  probes.push_back(probe_pack_file(probe_dir / "b2", kept.at(kProbeSmallChunk),
                                   "(b') pack file, 64 KiB chunks"));
  layout.print_header();
  for (const auto& p : probes) {
    layout.print_row({p.label, strf("%llu", static_cast<unsigned long long>(p.chunks)),
                      strf("%.1f", mib(p.bytes)), strf("%.1f", p.write_s * 1e3),
                      strf("%.1f", p.sync_s * 1e3), strf("%.1f", p.seconds() * 1e3),
                      strf("%.1f", p.seconds() * 1e6 / static_cast<double>(p.chunks)),
                      strf("%.0f", mb_per_s(p.bytes, p.seconds()))});
  }
  println();

  // --- 7. Goals ---
  auto find_row = [&](uint32_t cs, unsigned threads) -> const Row* {
    for (const auto& r : rows) {
      if (r.chunk_size == cs && r.threads == threads) return &r;
    }
    return nullptr;
  };
  auto verdict = [](bool met) { return met ? "met" : "NOT met"; };
  println("Goals (the issue's), at 256 KiB chunks");
  for (unsigned threads : {1u, 2u}) {
    const Row* r = find_row(kProbeChunk, threads);
    auto c = ceiling_mbps(kProbeChunk);
    std::string label = strf("put, %u thread%s: >= 70%% of the zstd ceiling per core", threads,
                             threads == 1 ? "" : "s");
    if (r == nullptr || !c) {
      println(strf("  %-52s  not measured", label.c_str()));
      continue;
    }
    double percent = 100.0 * mb_per_s(image.nonzero_bytes(), r->put_s) / threads / *c;
    println(strf("  %-52s  %5.0f%% (%.1f of %.1f MB/s)  %s", label.c_str(), percent,
                 mb_per_s(image.nonzero_bytes(), r->put_s) / threads, *c,
                 verdict(percent >= 70.0)));
  }
  if (const Row* r = find_row(kProbeChunk, 2)) {
    double zeroed = gb_per_s(size, r->mat_zeroed_s), dirty = gb_per_s(size, r->mat_dirty_s);
    println(strf("  %-52s  %5.2f GB/s (dirty destination %.2f)  %s",
                 "materialize, 2 threads: >= 2 GB/s", zeroed, dirty, verdict(zeroed >= 2.0)));
  } else {
    println(strf("  %-52s  not measured", "materialize, 2 threads: >= 2 GB/s"));
  }
  if (const Row* r = find_row(kProbeChunk, options.threads.front())) {
    double ratio = static_cast<double>(size) / static_cast<double>(r->stored_bytes);
    println(strf("  %-52s  %5.2fx (%.1f MiB stored)  %s",
                 "stored size: >= 3x smaller than the buffer", ratio, mib(r->stored_bytes),
                 verdict(ratio >= 3.0)));
  } else {
    println(strf("  %-52s  not measured", "stored size: >= 3x smaller than the buffer"));
  }
  println();
  const double creation_us_end =
      file_creation_us(work.path() / "creation-check-end", kCreationCheckFiles);
  CpuAccount run_end = cpu_account();
  double others = other_cores(run_start, run_end);
  double steal = (run_end.steal_s - run_start.steal_s) / (run_end.wall_s - run_start.wall_s);
  print_wrapped(
      "", 2,
      strf("Run: %.0f s; file creation %.0f us per file at the start, %.0f at the end; "
           "other processes kept %.2f cores busy on average, hypervisor steal %.2f cores%s",
           run_end.wall_s - run_start.wall_s, creation_us_start, creation_us_end, others, steal,
           others + steal > 0.1 ? ": the figures are low by up to that share of the machine" : ""));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  CLI::App app{
      "Measures msb's content-addressed store (put, materialize, stored size, incremental cost, "
      "chunk "
      "layout) on a buffer that looks like guest memory, next to zstd -b as the ceiling.",
      "msb-bench-store"};
  app.add_option("--size", options.size_mib, "Buffer size in MiB")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option(
      "--dir", options.dir,
      "Directory for the temporary stores (a fresh subdirectory is made there and removed at the "
      "end; default /var/tmp)");
  app.add_option("--level", options.level, "zstd level")->capture_default_str();
  app.add_option("--chunk-sizes", options.chunk_kib, "Chunk sizes to measure, KiB, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--threads", options.threads, "Thread counts to measure, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--seed", options.seed, "Seed of the buffer's layout and of the dirtied pages")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "msb-bench-store: error: %s\n", e.what());
    return 1;
  }
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "msb-bench-store: error: %s\n", e.what());
    return 1;
  }
}
