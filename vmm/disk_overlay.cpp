#include "vmm/disk_overlay.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "snapstore/error.h"
#include "snapstore/file_util.h"

namespace msb::vmm {
namespace {

constexpr char kMapMagic[8] = {'M', 'S', 'B', 'O', 'V', 'L', '1', '\0'};

struct MapHeader {
  char magic[8];
  uint64_t disk_size;
  uint64_t block_size;
  uint64_t reserved;
};
static_assert(sizeof(MapHeader) == 32);

[[noreturn]] void fail(const std::string& file, const std::string& what, int error = errno) {
  throw DiskError(file + ": " + what + (error ? std::string(": ") + std::strerror(error) : ""));
}

snapstore::UniqueFd open_or_fail(const std::string& path, int flags) {
  snapstore::UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC, 0644));
  if (!fd) fail(path, "cannot open");
  return fd;
}

// Reads up to out.size() bytes at `offset`; returns how many (fewer only at end of file).
size_t pread_full(int fd, std::span<std::byte> out, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t got =
        ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail(path, "read at offset " + std::to_string(offset + done));
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

void pwrite_full(int fd, std::span<const std::byte> in, uint64_t offset, const std::string& path) {
  try {
    snapstore::pwrite_all(fd, in, offset, path + " at offset " + std::to_string(offset));
  } catch (const snapstore::StoreError& e) {
    throw DiskError(e.what());
  }
}

}  // namespace

std::unique_ptr<DiskOverlay> DiskOverlay::open(const std::string& base_path,
                                               const std::string& overlay_path, uint64_t size) {
  std::unique_ptr<DiskOverlay> disk(new DiskOverlay());
  disk->base_path_ = base_path;
  disk->overlay_path_ = overlay_path;
  disk->map_path_ = overlay_path + ".map";
  if (!base_path.empty()) {
    disk->base_ = open_or_fail(base_path, O_RDONLY);
    struct stat info {};
    if (fstat(disk->base_.get(), &info) != 0) fail(base_path, "stat");
    disk->base_size_ = static_cast<uint64_t>(info.st_size);
    // Sector granularity: the tail of the last sector reads as zeros.
    size = (disk->base_size_ + 511) / 512 * 512;
  }
  if (size == 0) fail(base_path.empty() ? overlay_path : base_path, "the disk is empty", 0);
  disk->size_ = size;
  const uint64_t blocks = (size + kBlockSize - 1) / kBlockSize;
  disk->bitmap_.assign((blocks + 7) / 8, 0);

  disk->data_ = open_or_fail(overlay_path, O_RDWR | O_CREAT);
  disk->map_ = open_or_fail(disk->map_path_, O_RDWR | O_CREAT);
  MapHeader header{};
  std::span<std::byte> header_bytes = std::as_writable_bytes(std::span(&header, 1));
  size_t got = pread_full(disk->map_.get(), header_bytes, 0, disk->map_path_);
  if (got == 0) {
    // A new overlay (or one whose map never reached the disk: then nothing was flushed, and the
    // disk starts over from the base, as after a crash before the first flush).
    if (ftruncate(disk->data_.get(), static_cast<off_t>(size)) != 0) {
      fail(overlay_path, "cannot set the size to " + std::to_string(size));
    }
    disk->map_dirty_ = true;
    disk->write_map();
  } else {
    if (got != sizeof header || std::memcmp(header.magic, kMapMagic, sizeof kMapMagic) != 0 ||
        header.block_size != kBlockSize) {
      fail(disk->map_path_, "not an msb overlay map", 0);
    }
    if (header.disk_size != size) {
      fail(disk->map_path_,
           "made for a disk of " + std::to_string(header.disk_size) + " bytes, not " +
               std::to_string(size),
           0);
    }
    auto bitmap = std::as_writable_bytes(std::span(disk->bitmap_));
    if (pread_full(disk->map_.get(), bitmap, sizeof header, disk->map_path_) != bitmap.size()) {
      fail(disk->map_path_, "truncated bitmap", 0);
    }
    struct stat info {};
    if (fstat(disk->data_.get(), &info) != 0) fail(overlay_path, "stat");
    if (static_cast<uint64_t>(info.st_size) != size &&
        ftruncate(disk->data_.get(), static_cast<off_t>(size)) != 0) {
      fail(overlay_path, "cannot set the size to " + std::to_string(size));
    }
  }
  return disk;
}

DiskOverlay::~DiskOverlay() {
  try {
    flush();
  } catch (const DiskError&) {
    // Nothing to report to at destruction; the last flush's map stays valid.
  }
}

void DiskOverlay::check_range(uint64_t offset, uint64_t length, const char* what) const {
  if (offset > size_ || length > size_ - offset) {
    throw DiskError(overlay_path_ + ": " + what + " of " + std::to_string(length) +
                    " bytes at offset " + std::to_string(offset) + " is past the disk's end (" +
                    std::to_string(size_) + " bytes)");
  }
}

bool DiskOverlay::block_written(uint64_t block) const {
  if (block / 8 >= bitmap_.size()) return false;
  return (bitmap_[block / 8] >> (block % 8)) & 1;
}

void DiskOverlay::mark(uint64_t block) {
  if (!block_written(block)) {
    bitmap_[block / 8] |= static_cast<uint8_t>(1u << (block % 8));
    map_dirty_ = true;
  }
}

std::vector<uint64_t> DiskOverlay::written_blocks() const {
  std::vector<uint64_t> blocks;
  for (uint64_t block = 0; block < bitmap_.size() * 8; ++block) {
    if (block_written(block)) blocks.push_back(block);
  }
  return blocks;
}

void DiskOverlay::read_base(uint64_t offset, std::span<std::byte> out) const {
  size_t got = 0;
  if (base_ && offset < base_size_) {
    const size_t wanted = static_cast<size_t>(std::min<uint64_t>(out.size(), base_size_ - offset));
    got = pread_full(base_.get(), out.first(wanted), offset, base_path_);
  }
  std::memset(out.data() + got, 0, out.size() - got);
}

void DiskOverlay::read(uint64_t offset, std::span<std::byte> out) const {
  check_range(offset, out.size(), "read");
  size_t done = 0;
  while (done < out.size()) {
    // The longest run of blocks that all come from the same place.
    const uint64_t position = offset + done;
    const bool in_overlay = block_written(position / kBlockSize);
    uint64_t run_end = (position / kBlockSize + 1) * kBlockSize;
    while (run_end < offset + out.size() && block_written(run_end / kBlockSize) == in_overlay) {
      run_end += kBlockSize;
    }
    const size_t length =
        static_cast<size_t>(std::min<uint64_t>(run_end, offset + out.size()) - position);
    std::span<std::byte> part = out.subspan(done, length);
    if (in_overlay) {
      size_t got = pread_full(data_.get(), part, position, overlay_path_);
      std::memset(part.data() + got, 0, part.size() - got);
    } else {
      read_base(position, part);
    }
    done += length;
  }
}

void DiskOverlay::copy_up(uint64_t block) {
  if (block_written(block)) return;
  const uint64_t start = block * kBlockSize;
  std::vector<std::byte> contents(static_cast<size_t>(std::min(kBlockSize, size_ - start)));
  // Zeros too, without a base: the data file may hold an unflushed write from before a crash.
  read_base(start, contents);
  pwrite_full(data_.get(), contents, start, overlay_path_);
}

void DiskOverlay::write(uint64_t offset, std::span<const std::byte> in) {
  check_range(offset, in.size(), "write");
  if (in.empty()) return;
  const uint64_t end = offset + in.size();
  const uint64_t first = offset / kBlockSize;
  const uint64_t last = (end - 1) / kBlockSize;
  // Only the first and last blocks can be partly covered.
  if (offset % kBlockSize != 0) copy_up(first);
  if (end % kBlockSize != 0 && end != size_) copy_up(last);
  pwrite_full(data_.get(), in, offset, overlay_path_);
  for (uint64_t block = first; block <= last; ++block)
    mark(block);
}

void DiskOverlay::write_map() {
  if (!map_dirty_) return;
  MapHeader header{};
  std::memcpy(header.magic, kMapMagic, sizeof kMapMagic);
  header.disk_size = size_;
  header.block_size = kBlockSize;
  pwrite_full(map_.get(), std::as_bytes(std::span(&header, 1)), 0, map_path_);
  pwrite_full(map_.get(), std::as_bytes(std::span(bitmap_)), sizeof header, map_path_);
  map_dirty_ = false;
}

void DiskOverlay::flush() {
  if (fdatasync(data_.get()) != 0) fail(overlay_path_, "fdatasync");
  write_map();
  if (fdatasync(map_.get()) != 0) fail(map_path_, "fdatasync");
}

}  // namespace msb::vmm
