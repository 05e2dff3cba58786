// Small POSIX file helpers shared by the store (and by msb's other state files): owned file
// descriptors, whole-buffer reads and writes, and durable publication by write-then-rename.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace msb::snapstore {

// Owns a file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release();
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// open(2) relative to `dir_fd` (AT_FDCWD for plain paths), O_CLOEXEC added; throws StoreError
// naming `path` on failure.
UniqueFd open_file(int dir_fd, const std::filesystem::path& path, int flags, unsigned mode = 0644);

// Writes/reads the whole buffer at `offset`, retrying short transfers; throws naming `what`.
void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset, const std::string& what);
void write_all(int fd, std::string_view bytes, const std::string& what);
std::string read_all(int fd, const std::string& what);
std::string read_file(const std::filesystem::path& path);

void fsync_or_throw(int fd, const std::string& what);
// syncfs(2): flushes everything written to the file system that holds `fd`, by any process.
void syncfs_or_throw(int fd, const std::string& what);
void fsync_dir(const std::filesystem::path& dir);

// A name that no other process or thread picks at the same time:
// "<prefix>.<pid>.<counter>.<random>".
std::string unique_temp_name(std::string_view prefix);

// Publishes `bytes` as `dir/name` so that a reader sees either nothing (or the old file) or the
// whole new file, and a crash at any point leaves at most a temporary file in `temp_dir`.
// The data and the directory entry are on disk when it returns. Without `replace`, an existing
// file is left alone and false is returned.
bool publish_file(const std::filesystem::path& temp_dir, const std::filesystem::path& dir,
                  const std::string& name, std::string_view bytes, bool replace);

}  // namespace msb::snapstore
