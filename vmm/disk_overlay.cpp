#include "vmm/disk_overlay.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
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

MapHeader make_header(uint64_t disk_size) {
  MapHeader header{};
  std::memcpy(header.magic, kMapMagic, sizeof kMapMagic);
  header.disk_size = disk_size;
  header.block_size = DiskOverlay::kBlockSize;
  return header;
}

[[noreturn]] void fail(const std::string& file, const std::string& what, int error = errno) {
  throw DiskError(file + ": " + what + (error ? std::string(": ") + std::strerror(error) : ""));
}

snapstore::UniqueFd open_or_fail(const std::string& path, int flags) {
  snapstore::UniqueFd fd(::open(path.c_str(), flags | O_CLOEXEC, 0644));
  if (!fd) fail(path, "cannot open");
  return fd;
}

uint64_t file_size(int fd, const std::string& path) {
  struct stat info {};
  if (fstat(fd, &info) != 0) fail(path, "stat");
  return static_cast<uint64_t>(info.st_size);
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

bool test_bit(const std::vector<uint8_t>& bits, uint64_t block) {
  return block / 8 < bits.size() && ((bits[block / 8] >> (block % 8)) & 1);
}

// The bits of the bitmap's last byte that stand for no block of the disk.
uint8_t excess_bits(uint64_t blocks) {
  return blocks % 8 == 0 ? 0 : static_cast<uint8_t>(0xff << (blocks % 8));
}

// Indexes of the set bits, ascending.
std::vector<uint64_t> set_bits(const std::vector<uint8_t>& bits) {
  std::vector<uint64_t> out;
  for (size_t i = 0; i < bits.size(); ++i) {
    for (unsigned byte = bits[i]; byte != 0; byte &= byte - 1) {
      out.push_back(uint64_t{i} * 8 + static_cast<unsigned>(std::countr_zero(byte)));
    }
  }
  return out;
}

// Checks a map file's header (read into `header`, `got` bytes of it) against the disk.
void check_header(const MapHeader& header, size_t got, uint64_t size, const std::string& path) {
  if (got != sizeof header || std::memcmp(header.magic, kMapMagic, sizeof kMapMagic) != 0 ||
      header.block_size != DiskOverlay::kBlockSize) {
    fail(path, "not an msb overlay map", 0);
  }
  if (header.disk_size != size) {
    fail(path,
         "made for a disk of " + std::to_string(header.disk_size) + " bytes, not " +
             std::to_string(size),
         0);
  }
}

}  // namespace

std::unique_ptr<DiskOverlay> DiskOverlay::open(const std::string& base_path,
                                               const std::string& overlay_path, uint64_t size,
                                               const std::string& layer_path) {
  std::unique_ptr<DiskOverlay> disk(new DiskOverlay());
  disk->base_path_ = base_path;
  disk->overlay_path_ = overlay_path;
  disk->map_path_ = overlay_path + ".map";
  if (!base_path.empty()) {
    disk->base_ = open_or_fail(base_path, O_RDONLY);
    disk->base_size_ = file_size(disk->base_.get(), base_path);
    // Sector granularity: the tail of the last sector reads as zeros.
    size = (disk->base_size_ + 511) / 512 * 512;
  }
  if (size == 0) fail(base_path.empty() ? overlay_path : base_path, "the disk is empty", 0);
  disk->size_ = size;
  const uint64_t blocks = disk->block_count();
  disk->bitmap_.assign((blocks + 7) / 8, 0);
  disk->changed_.assign(disk->bitmap_.size(), 0);
  if (!layer_path.empty()) disk->open_layer(layer_path);

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
    check_header(header, got, size, disk->map_path_);
    auto bitmap = std::as_writable_bytes(std::span(disk->bitmap_));
    if (pread_full(disk->map_.get(), bitmap, sizeof header, disk->map_path_) != bitmap.size()) {
      fail(disk->map_path_, "truncated bitmap", 0);
    }
    // Bits past the last block name nothing: keep them out of written_blocks().
    disk->bitmap_.back() &= static_cast<uint8_t>(~excess_bits(blocks));
    if (file_size(disk->data_.get(), overlay_path) != size &&
        ftruncate(disk->data_.get(), static_cast<off_t>(size)) != 0) {
      fail(overlay_path, "cannot set the size to " + std::to_string(size));
    }
  }
  return disk;
}

void DiskOverlay::open_layer(const std::string& layer_path) {
  layer_path_ = layer_path;
  const std::string map_path = layer_path + ".map";
  layer_ = open_or_fail(layer_path, O_RDONLY);
  const uint64_t data_size = file_size(layer_.get(), layer_path);
  if (data_size != size_) {
    fail(
        layer_path,
        "a layer of " + std::to_string(data_size) + " bytes for a disk of " + std::to_string(size_),
        0);
  }
  snapstore::UniqueFd map = open_or_fail(map_path, O_RDONLY);
  MapHeader header{};
  size_t got = pread_full(map.get(), std::as_writable_bytes(std::span(&header, 1)), 0, map_path);
  check_header(header, got, size_, map_path);
  layer_bitmap_.assign(bitmap_.size(), 0);
  const uint64_t map_size = file_size(map.get(), map_path);
  if (map_size != sizeof header + layer_bitmap_.size()) {
    fail(map_path,
         "has " + std::to_string(map_size) + " bytes, not the " +
             std::to_string(sizeof header + layer_bitmap_.size()) + " of a map for this disk",
         0);
  }
  auto bitmap = std::as_writable_bytes(std::span(layer_bitmap_));
  if (pread_full(map.get(), bitmap, sizeof header, map_path) != bitmap.size()) {
    fail(map_path, "truncated bitmap", 0);
  }
  if (layer_bitmap_.back() & excess_bits(block_count())) {
    fail(map_path, "names blocks past the disk's end", 0);
  }
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
  return test_bit(bitmap_, block);
}

DiskOverlay::Source DiskOverlay::source(uint64_t block) const {
  if (test_bit(bitmap_, block)) return Source::kOverlay;
  if (test_bit(layer_bitmap_, block)) return Source::kLayer;
  return Source::kBase;
}

void DiskOverlay::mark(uint64_t block) {
  const auto bit = static_cast<uint8_t>(1u << (block % 8));
  changed_[block / 8] |= bit;
  if (!(bitmap_[block / 8] & bit)) {
    bitmap_[block / 8] |= bit;
    map_dirty_ = true;
  }
}

std::vector<uint64_t> DiskOverlay::written_blocks() const {
  return set_bits(bitmap_);
}

std::vector<uint64_t> DiskOverlay::take_changed_blocks() {
  std::vector<uint64_t> blocks = set_bits(changed_);
  std::fill(changed_.begin(), changed_.end(), 0);
  return blocks;
}

uint64_t DiskOverlay::delta_blocks() const {
  uint64_t count = 0;
  for (size_t i = 0; i < bitmap_.size(); ++i) {
    const unsigned layer = layer_bitmap_.empty() ? 0 : layer_bitmap_[i];
    count += static_cast<unsigned>(std::popcount(static_cast<unsigned>(bitmap_[i] | layer)));
  }
  return count;
}

std::string DiskOverlay::delta_map() const {
  const MapHeader header = make_header(size_);
  std::string out(sizeof header + bitmap_.size(), '\0');
  std::memcpy(out.data(), &header, sizeof header);
  for (size_t i = 0; i < bitmap_.size(); ++i) {
    const uint8_t layer = layer_bitmap_.empty() ? 0 : layer_bitmap_[i];
    out[sizeof header + i] = static_cast<char>(bitmap_[i] | layer);
  }
  return out;
}

template <class Fn>
void DiskOverlay::for_each_run(uint64_t offset, std::span<std::byte> out, Fn&& fn) const {
  const uint64_t end = offset + out.size();
  uint64_t position = offset;
  while (position < end) {
    // The longest run of blocks that all come from the same place.
    const Source from = source(position / kBlockSize);
    uint64_t run_end = (position / kBlockSize + 1) * kBlockSize;
    while (run_end < end && source(run_end / kBlockSize) == from) {
      run_end += kBlockSize;
    }
    run_end = std::min(run_end, end);
    fn(from, position, out.subspan(position - offset, run_end - position));
    position = run_end;
  }
}

void DiskOverlay::read_file(int fd, const std::string& path, uint64_t offset,
                            std::span<std::byte> out) const {
  size_t got = pread_full(fd, out, offset, path);
  std::memset(out.data() + got, 0, out.size() - got);
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
  read_levels(offset, out, /*base_as_zeros=*/false);
}

void DiskOverlay::read_delta(uint64_t offset, std::span<std::byte> out) const {
  check_range(offset, out.size(), "delta read");
  read_levels(offset, out, /*base_as_zeros=*/true);
}

void DiskOverlay::read_levels(uint64_t offset, std::span<std::byte> out, bool base_as_zeros) const {
  for_each_run(offset, out, [&](Source from, uint64_t position, std::span<std::byte> part) {
    switch (from) {
      case Source::kOverlay:
        read_file(data_.get(), overlay_path_, position, part);
        break;
      case Source::kLayer:
        read_file(layer_.get(), layer_path_, position, part);
        break;
      case Source::kBase:
        if (base_as_zeros) {
          std::memset(part.data(), 0, part.size());
        } else {
          read_base(position, part);
        }
        break;
    }
  });
}

void DiskOverlay::copy_up(uint64_t block) {
  if (block_written(block)) return;
  const uint64_t start = block * kBlockSize;
  std::vector<std::byte> contents(static_cast<size_t>(std::min(kBlockSize, size_ - start)));
  // Zeros too, without a base: the data file may hold an unflushed write from before a crash.
  if (source(block) == Source::kLayer) {
    read_file(layer_.get(), layer_path_, start, contents);
  } else {
    read_base(start, contents);
  }
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
  const MapHeader header = make_header(size_);
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
