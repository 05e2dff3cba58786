// A sandbox's disk: a read-only base image, optionally a read-only "layer" (a snapshot's disk
// delta), and a writable per-sandbox overlay on top.
//
// The overlay is two files: `overlay_path`, a sparse data file as large as the disk that holds
// every 4 KiB block the guest wrote, at its own offset; and `overlay_path + ".map"`, a header
// (magic, disk size, block size) followed by a bitmap with one bit per block (bit b % 8 of byte
// b / 8), set when the block is in the data file. A layer has the same two-file format
// (`layer_path` and `layer_path + ".map"`), is opened O_RDONLY and never written: a sandbox
// restored from a snapshot runs on base + the snapshot's delta + its own overlay.
//
// Reads take each block from the overlay if it is there, else from the layer if it is there, else
// from the base (zeros past the base's end, or everywhere without a base). A write that covers
// only part of a block not yet in the overlay first copies that block up from the layer or the
// base, whichever the guest sees.
//
// Snapshots: the disk delta is every block in the layer or the overlay, with the content the
// guest sees (read_delta, delta_map). Stored as a file pair again, it becomes the layer of the
// next generation's disk, so a snapshot of a restored sandbox is base + one delta, never a stack.
// take_changed_blocks() names the blocks the guest wrote since the previous call, so that an
// incremental snapshot re-reads only the chunks that hold them.
//
// Durability: the bitmap reaches its file only in flush(), after the data file's fdatasync, so
// a map on disk never names a block whose data may not be there; a crash loses what was written
// since the last flush (as on a real disk with a volatile write cache). Opening an existing
// overlay continues it: `msb start` boots a stopped sandbox again on its overlay (and must pass
// the same layer).
//
// Not thread-safe, except read_delta (below): the block device uses it from the loop thread only.
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
  // blank disk) and the layer `layer_path` ("" for none). The disk's size is the base's size
  // rounded up to 512 bytes or, without a base, `size` (which must then be > 0). An existing
  // overlay, and the layer, must have been made for the same size: the layer's map must be
  // exactly a header and a bitmap for this disk, and its data file exactly the disk's size.
  // Throws DiskError naming the file.
  static std::unique_ptr<DiskOverlay> open(const std::string& base_path,
                                           const std::string& overlay_path, uint64_t size = 0,
                                           const std::string& layer_path = "");
  ~DiskOverlay();  // flushes, so that a clean exit keeps every write

  uint64_t size() const { return size_; }
  uint64_t block_count() const { return (size_ + kBlockSize - 1) / kBlockSize; }
  // [offset, offset + bytes) must lie inside the disk; throws DiskError otherwise or on I/O
  // errors.
  void read(uint64_t offset, std::span<std::byte> out) const;
  void write(uint64_t offset, std::span<const std::byte> in);
  // fdatasync of the data file, then the map written and synced.
  void flush();

  // Whether the block is in the overlay (written by this sandbox).
  bool block_written(uint64_t block) const;
  // Indexes of the blocks in the overlay, ascending.
  std::vector<uint64_t> written_blocks() const;
  const std::string& overlay_path() const { return overlay_path_; }
  const std::string& layer_path() const { return layer_path_; }

  // --- Snapshots ------------------------------------------------------------------------------
  // The delta's bytes in [offset, offset + out.size()), which must lie inside the disk: blocks in
  // the overlay or the layer as the guest sees them, zeros elsewhere. Only preads: safe to call
  // from several threads at once, as long as nothing writes meanwhile (the guest is paused).
  void read_delta(uint64_t offset, std::span<std::byte> out) const;
  // The delta's map file, as bytes: the .map format (same header) with the bitmap of the blocks
  // in the layer or the overlay. Written beside a file of read_delta's bytes (disk-sized), it
  // makes a layer for open().
  std::string delta_map() const;
  // Number of blocks in the delta (layer ∪ overlay).
  uint64_t delta_blocks() const;
  // The blocks written into the overlay (ascending) since open() or the previous call, which
  // clears the set. In memory only: it covers this object's lifetime, so an incremental snapshot
  // can build only on a snapshot taken through the same object.
  std::vector<uint64_t> take_changed_blocks();

 private:
  DiskOverlay() = default;
  enum class Source { kBase, kLayer, kOverlay };
  Source source(uint64_t block) const;
  // Calls fn(source, offset, span) for each run of consecutive blocks with one source.
  template <class Fn>
  void for_each_run(uint64_t offset, std::span<std::byte> out, Fn&& fn) const;
  void check_range(uint64_t offset, uint64_t length, const char* what) const;
  void read_base(uint64_t offset, std::span<std::byte> out) const;
  // Each part of [offset, offset + out.size()) from the level that holds it; the base's parts
  // read as zeros with `base_as_zeros` (the delta a snapshot stores).
  void read_levels(uint64_t offset, std::span<std::byte> out, bool base_as_zeros) const;
  void read_file(int fd, const std::string& path, uint64_t offset, std::span<std::byte> out) const;
  void open_layer(const std::string& layer_path);
  void copy_up(uint64_t block);
  void mark(uint64_t block);
  void write_map();

  std::string base_path_;
  std::string overlay_path_;
  std::string map_path_;
  std::string layer_path_;
  snapstore::UniqueFd base_;   // -1 without a base
  snapstore::UniqueFd layer_;  // -1 without a layer
  snapstore::UniqueFd data_;
  snapstore::UniqueFd map_;
  uint64_t size_ = 0;
  uint64_t base_size_ = 0;
  // One bit per block, in the .map file's layout. layer_bitmap_ is empty without a layer.
  std::vector<uint8_t> bitmap_;
  std::vector<uint8_t> layer_bitmap_;
  std::vector<uint8_t> changed_;
  bool map_dirty_ = false;
};

}  // namespace msb::vmm
