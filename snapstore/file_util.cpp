#include "snapstore/file_util.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

#include "snapstore/error.h"

namespace msb::snapstore {

void throw_errno(const std::string& what, int error_number) {
  throw StoreError(what + ": " + std::strerror(error_number));
}

void throw_errno(const std::string& what) {
  throw_errno(what, errno);
}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

int UniqueFd::release() {
  int fd = fd_;
  fd_ = -1;
  return fd;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

UniqueFd open_file(int dir_fd, const std::filesystem::path& path, int flags, unsigned mode) {
  int fd;
  do {
    fd = ::openat(dir_fd, path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw_errno("cannot open " + path.string());
  return UniqueFd(fd);
}

void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset,
                const std::string& what) {
  while (!bytes.empty()) {
    ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write " + what);
    }
    bytes = bytes.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
}

void write_all(int fd, std::string_view bytes, const std::string& what) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write " + what);
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
}

std::string read_all(int fd, const std::string& what) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot read " + what);
    }
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

std::string read_file(const std::filesystem::path& path) {
  UniqueFd fd = open_file(AT_FDCWD, path, O_RDONLY);
  return read_all(fd.get(), path.string());
}

void fsync_or_throw(int fd, const std::string& what) {
  if (::fsync(fd) != 0) throw_errno("cannot sync " + what);
}

void syncfs_or_throw(int fd, const std::string& what) {
  if (::syncfs(fd) != 0) throw_errno("cannot sync " + what);
}

void fsync_dir(const std::filesystem::path& dir) {
  UniqueFd fd = open_file(AT_FDCWD, dir, O_RDONLY | O_DIRECTORY);
  fsync_or_throw(fd.get(), dir.string());
}

std::string unique_temp_name(std::string_view prefix) {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t process_random = std::random_device{}();
  return std::string(prefix) + "." + std::to_string(::getpid()) + "." +
         std::to_string(counter.fetch_add(1)) + "." + std::to_string(process_random & 0xffffff);
}

bool publish_file(const std::filesystem::path& temp_dir, const std::filesystem::path& dir,
                  const std::string& name, std::string_view bytes, bool replace) {
  std::filesystem::path temp = temp_dir / unique_temp_name(name);
  std::filesystem::path target = dir / name;
  {
    UniqueFd fd = open_file(AT_FDCWD, temp, O_WRONLY | O_CREAT | O_EXCL, 0644);
    try {
      write_all(fd.get(), bytes, temp.string());
      if (::fdatasync(fd.get()) != 0) throw_errno("cannot sync " + temp.string());
    } catch (...) {
      ::unlink(temp.c_str());
      throw;
    }
  }
  unsigned flags = replace ? 0 : RENAME_NOREPLACE;
  if (::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, target.c_str(), flags) != 0) {
    int error_number = errno;
    ::unlink(temp.c_str());
    if (error_number == EEXIST) return false;
    throw_errno("cannot rename " + temp.string() + " to " + target.string(), error_number);
  }
  fsync_dir(dir);
  return true;
}

}  // namespace msb::snapstore
