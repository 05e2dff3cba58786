// A sandbox's disk: a read-only base image under a writable, per-sandbox overlay.
//
// The overlay is two files: `overlay_path`, a sparse data file as large as the disk that holds
// every 4 KiB block the guest wrote, at its own offset; and `overlay_path + ".map"`, a header
// (magic, disk size, block size) followed by a bitmap with one bit per block, set when the
// block is in the data file. Reads take each block from the overlay or from the base (zeros past
// the base's end, or everywhere without a base). A write that covers only part of a block not
// yet in the overlay first copies that block up from the base. The base is opened O_RDONLY and
// never written.
//
// Durability: the bitmap reaches its file only in flush(), after the data file's fdatasync, so
// a map on disk never names a block whose data may not be there; a crash loses what was written
// since the last flush (as on a real disk with a volatile write cache). Opening an existing
// overlay continues it: `msb start` boots a stopped sandbox again on its overlay.
//
// Not thread-safe: the block device uses it from the loop thread only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "snapstore/file_util.h"

namespace msb::vmm {

class DiskError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class DiskOverlay {
 public:
  static constexpr uint64_t kBlockSize = 4096;

  // Opens (or creates) the overlay at `overlay_path` over the base image `base_path` ("" for a
  // blank disk). The disk's size is the base's size rounded up to 512 bytes or, without a base,
  // `size` (which must then be > 0). An existing overlay must have been made for the same size.
  // Throws DiskError naming the file.
  static std::unique_ptr<DiskOverlay> open(const std::string& base_path,
                                           const std::string& overlay_path, uint64_t size = 0);
  ~DiskOverlay();  // flushes, so that a clean exit keeps every write

  uint64_t size() const { return size_; }
  // [offset, offset + bytes) must lie inside the disk; throws DiskError otherwise or on I/O
  // errors.
  void read(uint64_t offset, std::span<std::byte> out) const;
  void write(uint64_t offset, std::span<const std::byte> in);
  // fdatasync of the data file, then the map written and synced.
  void flush();

  bool block_written(uint64_t block) const;
  // Indexes of the blocks in the overlay, ascending (a snapshot's disk delta).
  std::vector<uint64_t> written_blocks() const;
  const std::string& overlay_path() const { return overlay_path_; }

 private:
  DiskOverlay() = default;
  void check_range(uint64_t offset, uint64_t length, const char* what) const;
  void read_base(uint64_t offset, std::span<std::byte> out) const;
  void copy_up(uint64_t block);
  void mark(uint64_t block);
  void write_map();

  std::string base_path_;
  std::string overlay_path_;
  std::string map_path_;
  snapstore::UniqueFd base_;  // -1 without a base
  snapstore::UniqueFd data_;
  snapstore::UniqueFd map_;
  uint64_t size_ = 0;
  uint64_t base_size_ = 0;
  std::vector<uint8_t> bitmap_;
  bool map_dirty_ = false;
};

}  // namespace msb::vmm
