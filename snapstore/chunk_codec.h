// Internal: a chunk file's encoding (one zstd frame of the chunk's bytes) and its verification.
// One ChunkCodec per thread: it owns zstd contexts and scratch buffers.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "snapstore/hash.h"

struct ZSTD_CCtx_s;
struct ZSTD_DCtx_s;

namespace msb::snapstore::detail {

// A chunk's file relative to the store root: "chunks/<first two hex digits>/<hex>".
std::string chunk_file(const Hash128& hash);

class ChunkCodec {
 public:
  explicit ChunkCodec(int level);
  ~ChunkCodec();
  ChunkCodec(const ChunkCodec&) = delete;
  ChunkCodec& operator=(const ChunkCodec&) = delete;

  // The encoded form of `plain`; valid until the next call.
  std::span<const std::byte> encode(std::span<const std::byte> plain);

  // Reads the chunk file `path` (relative to `dir_fd`) into `destination`, which must be exactly
  // the chunk's length, and checks that it hashes to `hash`. Throws StoreError naming the chunk.
  void read_into(int dir_fd, const std::string& path, const Hash128& hash,
                 std::span<std::byte> destination);
  // Reads a chunk of unknown length (up to 1 GiB).
  std::vector<std::byte> read(int dir_fd, const std::string& path, const Hash128& hash);

  // The chunk's uncompressed length from its frame header, or -1 if it cannot be read.
  static long long content_size(int dir_fd, const std::string& path);

 private:
  // The encoded file, in scratch_; valid until the next call.
  std::span<const std::byte> load(int dir_fd, const std::string& path, const Hash128& hash);
  static unsigned long long frame_length(std::span<const std::byte> encoded, const Hash128& hash);
  // Decompresses into `destination` (exactly the frame's length) and checks the hash.
  void decode(std::span<const std::byte> encoded, const Hash128& hash,
              std::span<std::byte> destination);
  int level_;
  ZSTD_CCtx_s* cctx_ = nullptr;
  ZSTD_DCtx_s* dctx_ = nullptr;
  std::vector<std::byte> scratch_;
};

// One codec per worker thread of a parallel loop.
std::vector<std::unique_ptr<ChunkCodec>> make_codecs(unsigned workers, int level);

}  // namespace msb::snapstore::detail
