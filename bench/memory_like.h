// Content that looks like guest memory, shared by the benchmarks that store or snapshot it
// (store_bench.cpp, snapshot_bench.cpp): 4 KiB pages in alternating runs of zero pages and data
// pages (geometric run lengths, mean 8 pages, so about half the pages are zero), the data being
// the concatenated real files of this machine (binaries and libraries under /usr/lib and
// /usr/bin), in sorted path order. It compresses the way a guest's page cache and heap do, which
// neither all-zero nor random memory would.

#ifndef MSB_BENCH_MEMORY_LIKE_H_
#define MSB_BENCH_MEMORY_LIKE_H_

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "bench/bench_util.h"

namespace msb::bench {

inline constexpr size_t kMemoryLikePage = 4096;
// The mean length, in pages, of both the zero runs and the data runs.
inline constexpr double kMeanRunPages = 8.0;

// Where the data pages come from, in this order.
inline std::vector<std::filesystem::path> memory_like_roots() {
  return {"/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"};
}

inline bool page_is_zero(const std::byte* page) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(page);
  return p[0] == 0 && std::memcmp(p, p + 1, kMemoryLikePage - 1) == 0;
}

// The concatenation of real files of this machine, as a stream of non-zero 4 KiB pages. Files are
// taken in sorted path order, root after root (a file is read once even if two roots or two
// hard links reach it), and the stream starts over when they run out.
class FileStream {
 public:
  explicit FileStream(std::vector<std::filesystem::path> roots) : roots_(std::move(roots)) {}

  // Copies the next non-zero page into `page`. All-zero pages of the files are skipped so that
  // the buffer's zero fraction is set by its zero runs alone.
  void next_page(std::byte* page) {
    for (;;) {
      while (pending_.size() - pos_ < kMemoryLikePage)
        load_next_file();
      const std::byte* candidate = pending_.data() + pos_;
      pos_ += kMemoryLikePage;
      if (page_is_zero(candidate)) {
        ++zero_pages_skipped_;
        continue;
      }
      std::memcpy(page, candidate, kMemoryLikePage);
      bytes_used_ += kMemoryLikePage;
      return;
    }
  }

  uint64_t bytes_used() const { return bytes_used_; }
  uint64_t files_read() const { return files_read_; }
  uint64_t zero_pages_skipped() const { return zero_pages_skipped_; }
  bool wrapped() const { return wrapped_; }
  // The roots that the pages so far came from.
  std::vector<std::filesystem::path> roots_used() const {
    return {roots_.begin(),
            roots_.begin() + static_cast<ptrdiff_t>(std::min(root_ + 1, roots_.size()))};
  }

 private:
  void load_next_file() {
    // Drop what has been consumed; what remains is less than a page.
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(pos_));
    pos_ = 0;
    for (;;) {
      if (next_file_ == files_.size()) list_next_root();
      const std::filesystem::path& path = files_[next_file_++];
      if (append_file(path)) return;
    }
  }

  // Lists the next root's regular files over a page, skipping roots already listed (so /usr/lib
  // does not yield /usr/lib/x86_64-linux-gnu again).
  void list_next_root() {
    namespace fs = std::filesystem;
    files_.clear();
    next_file_ = 0;
    while (files_.empty()) {
      if (listed_ == roots_.size()) {
        if (files_read_ == 0) throw BenchError("no readable files over 4 KiB under the data roots");
        // Out of files: start over. The data repeats from here on, which callers report.
        if (wrapped_ && bytes_used_ == bytes_at_wrap_) {
          throw BenchError("the files under the data roots hold no non-zero 4 KiB page");
        }
        bytes_at_wrap_ = bytes_used_;
        listed_ = 0;
        inodes_.clear();
        wrapped_ = true;
      }
      root_ = listed_;
      const fs::path& root = roots_[listed_++];
      std::error_code ec;
      auto options = fs::directory_options::skip_permission_denied;
      for (fs::recursive_directory_iterator it(root, options, ec), end; !ec && it != end;
           it.increment(ec)) {
        std::error_code entry_ec;
        auto status = it->symlink_status(entry_ec);
        if (entry_ec) continue;
        if (fs::is_directory(status)) {
          for (size_t i = 0; i + 1 < listed_; ++i) {
            if (it->path() == roots_[i]) it.disable_recursion_pending();
          }
          continue;
        }
        if (!fs::is_regular_file(status)) continue;
        auto size = it->file_size(entry_ec);
        if (!entry_ec && size > kMemoryLikePage) files_.push_back(it->path());
      }
      std::sort(files_.begin(), files_.end());
    }
  }

  // Appends a whole file; false (and nothing appended) if it cannot be read or was read already.
  bool append_file(const std::filesystem::path& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return false;
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return false;
    if (!inodes_.insert({st.st_dev, st.st_ino}).second) return false;
    size_t old_size = pending_.size();
    pending_.resize(old_size + static_cast<size_t>(st.st_size));
    size_t got = 0;
    while (got < static_cast<size_t>(st.st_size)) {
      ssize_t n =
          ::read(fd, pending_.data() + old_size + got, static_cast<size_t>(st.st_size) - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    pending_.resize(old_size + got);
    if (got == 0) return false;
    ++files_read_;
    return true;
  }

  std::vector<std::filesystem::path> roots_;
  size_t listed_ = 0;  // roots listed so far
  size_t root_ = 0;    // the root being read
  std::vector<std::filesystem::path> files_;
  size_t next_file_ = 0;
  std::set<std::pair<dev_t, ino_t>> inodes_;
  std::vector<std::byte> pending_;
  size_t pos_ = 0;
  uint64_t bytes_used_ = 0;
  uint64_t files_read_ = 0;
  uint64_t zero_pages_skipped_ = 0;
  bool wrapped_ = false;
  uint64_t bytes_at_wrap_ = 0;
};

// A run length in pages, geometric on {1, 2, ...} with the given mean, by inversion. Written out
// rather than std::geometric_distribution, whose algorithm differs between standard libraries:
// the same seed gives the same layout everywhere (mt19937_64 itself is fully specified).
inline uint64_t run_length(std::mt19937_64& rng, double mean) {
  double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;  // [0, 1)
  return 1 + static_cast<uint64_t>(std::floor(std::log1p(-u) / std::log1p(-1.0 / mean)));
}

// What fill_memory_like wrote.
struct MemoryLikeLayout {
  std::vector<uint8_t> zero_page;  // 1 where the page is all zero
  uint64_t zero_pages = 0;
  uint64_t zero_runs = 0, data_runs = 0, longest_zero_run = 0;
};

// Lays memory-like content over `buffer` (whole pages, already all zero): alternating zero and
// data runs of the same mean, so that about half the pages are zero, some in long stretches
// (untouched memory), some scattered among data (freed or never-written pages). The data pages
// are the next pages of `files`. The same seed and files give the same bytes.
inline MemoryLikeLayout fill_memory_like(std::span<std::byte> buffer, uint64_t seed,
                                         FileStream& files) {
  MemoryLikeLayout layout;
  const uint64_t pages = buffer.size() / kMemoryLikePage;
  layout.zero_page.assign(pages, 0);
  std::mt19937_64 rng(seed);
  bool zero = (rng() & 1) != 0;
  uint64_t page = 0;
  while (page < pages) {
    uint64_t length = std::min(run_length(rng, kMeanRunPages), pages - page);
    if (zero) {
      std::fill_n(layout.zero_page.begin() + static_cast<ptrdiff_t>(page), length, 1);
      layout.zero_pages += length;
      ++layout.zero_runs;
      layout.longest_zero_run = std::max(layout.longest_zero_run, length);
    } else {
      for (uint64_t i = 0; i < length; ++i)
        files.next_page(buffer.data() + (page + i) * kMemoryLikePage);
      ++layout.data_runs;
    }
    page += length;
    zero = !zero;
  }
  return layout;
}

}  // namespace msb::bench

#endif  // MSB_BENCH_MEMORY_LIKE_H_
