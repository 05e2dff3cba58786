#include "snapstore/chunk_codec.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>

#include "snapstore/error.h"
#include "snapstore/file_util.h"

namespace msb::snapstore::detail {
namespace {

constexpr unsigned long long kMaxChunkLength = 1ull << 30;

[[noreturn]] void corrupt(const Hash128& hash, const std::string& why) {
  throw StoreError("chunk " + hash.hex() + " is corrupt: " + why);
}

}  // namespace

std::string chunk_file(const Hash128& hash) {
  std::string hex = hash.hex();
  return "chunks/" + hex.substr(0, 2) + "/" + hex;
}

ChunkCodec::ChunkCodec(int level) : level_(level) {}

ChunkCodec::~ChunkCodec() {
  ZSTD_freeCCtx(cctx_);
  ZSTD_freeDCtx(dctx_);
}

std::span<const std::byte> ChunkCodec::encode(std::span<const std::byte> plain) {
  if (!cctx_) cctx_ = ZSTD_createCCtx();
  if (!cctx_) throw StoreError("cannot allocate a zstd compression context");
  scratch_.resize(ZSTD_compressBound(plain.size()));
  size_t n = ZSTD_compressCCtx(cctx_, scratch_.data(), scratch_.size(), plain.data(), plain.size(),
                               level_);
  if (ZSTD_isError(n))
    throw StoreError(std::string("zstd compression failed: ") + ZSTD_getErrorName(n));
  return {scratch_.data(), n};
}

std::span<const std::byte> ChunkCodec::load(int dir_fd, const std::string& path,
                                            const Hash128& hash) {
  int raw = ::openat(dir_fd, path.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) {
    if (errno == ENOENT) throw StoreError("chunk " + hash.hex() + " is missing from the store");
    throw_errno("cannot open chunk " + hash.hex());
  }
  UniqueFd fd(raw);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw_errno("cannot stat chunk " + hash.hex());
  auto size = static_cast<size_t>(st.st_size);
  if (size > ZSTD_compressBound(kMaxChunkLength)) corrupt(hash, "its file is too large");
  scratch_.resize(size);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd.get(), scratch_.data() + done, size - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot read chunk " + hash.hex());
    if (n == 0) corrupt(hash, "its file shrank while being read");
    done += static_cast<size_t>(n);
  }
  return {scratch_.data(), size};
}

unsigned long long ChunkCodec::frame_length(std::span<const std::byte> encoded,
                                            const Hash128& hash) {
  unsigned long long length = ZSTD_getFrameContentSize(encoded.data(), encoded.size());
  if (length == ZSTD_CONTENTSIZE_ERROR || length == ZSTD_CONTENTSIZE_UNKNOWN) {
    corrupt(hash, "it is not a zstd frame");
  }
  return length;
}

void ChunkCodec::decode(std::span<const std::byte> encoded, const Hash128& hash,
                        std::span<std::byte> destination) {
  if (!dctx_) dctx_ = ZSTD_createDCtx();
  if (!dctx_) throw StoreError("cannot allocate a zstd decompression context");
  size_t n = ZSTD_decompressDCtx(dctx_, destination.data(), destination.size(), encoded.data(),
                                 encoded.size());
  if (ZSTD_isError(n)) corrupt(hash, std::string("zstd: ") + ZSTD_getErrorName(n));
  if (n != destination.size()) corrupt(hash, "it decompresses to the wrong length");
  Hash128 actual = hash_bytes(destination);
  if (actual != hash) corrupt(hash, "its content hashes to " + actual.hex());
}

void ChunkCodec::read_into(int dir_fd, const std::string& path, const Hash128& hash,
                           std::span<std::byte> destination) {
  std::span<const std::byte> encoded = load(dir_fd, path, hash);
  unsigned long long length = frame_length(encoded, hash);
  if (length != destination.size()) {
    corrupt(hash, "it holds " + std::to_string(length) + " bytes where " +
                      std::to_string(destination.size()) + " are expected");
  }
  decode(encoded, hash, destination);
}

std::vector<std::byte> ChunkCodec::read(int dir_fd, const std::string& path, const Hash128& hash) {
  std::span<const std::byte> encoded = load(dir_fd, path, hash);
  unsigned long long length = frame_length(encoded, hash);
  if (length > kMaxChunkLength) corrupt(hash, "it claims " + std::to_string(length) + " bytes");
  std::vector<std::byte> plain(length);
  decode(encoded, hash, plain);
  return plain;
}

long long ChunkCodec::content_size(int dir_fd, const std::string& path) {
  int raw = ::openat(dir_fd, path.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) return -1;
  UniqueFd fd(raw);
  std::byte header[18];  // ZSTD_FRAMEHEADERSIZE_MAX, which zstd.h shows only to static linkers
  ssize_t n = ::pread(fd.get(), header, sizeof header, 0);
  if (n <= 0) return -1;
  unsigned long long length = ZSTD_getFrameContentSize(header, static_cast<size_t>(n));
  if (length == ZSTD_CONTENTSIZE_ERROR || length == ZSTD_CONTENTSIZE_UNKNOWN) return -1;
  return static_cast<long long>(length);
}

std::vector<std::unique_ptr<ChunkCodec>> make_codecs(unsigned workers, int level) {
  std::vector<std::unique_ptr<ChunkCodec>> codecs;
  for (unsigned w = 0; w < workers; ++w)
    codecs.push_back(std::make_unique<ChunkCodec>(level));
  return codecs;
}

}  // namespace msb::snapstore::detail
