// Store: large objects cut into chunks, written and read in parallel on all cores.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "snapstore/chunk_codec.h"
#include "snapstore/error.h"
#include "snapstore/parallel.h"
#include "snapstore/store.h"

namespace msb::snapstore {
namespace fs = std::filesystem;

namespace {

// How much of an object is written before its chunks are synced and renamed into place: bounds
// the list of pending temporary files (and the debris a crash can leave) whatever the object's
// size.
constexpr uint64_t kWindowBytes = 1ull << 30;
constexpr uintptr_t kPageSize = 4096;
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; glibc 2.36's headers may lack it
#endif

void pread_all(int fd, std::span<std::byte> out, uint64_t offset, const std::string& what) {
  while (!out.empty()) {
    ssize_t n = ::pread(fd, out.data(), out.size(), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno("cannot read " + what);
    if (n == 0) throw StoreError("cannot read " + what + ": it shrank while being stored");
    out = out.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
}

// Faults in a destination range with one call instead of a page fault per page: fresh memory is
// filled about 1.4x faster on the development machine (docs/benchmarks.md). Only an optimization:
// kernels before 5.14 refuse it and the pages then fault in as they are written.
void prefault(std::span<std::byte> range) {
  auto begin = reinterpret_cast<uintptr_t>(range.data());
  uintptr_t first = (begin + kPageSize - 1) & ~(kPageSize - 1);
  uintptr_t last = (begin + range.size()) & ~(kPageSize - 1);
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
}

// Writes `bytes` at `offset` of a file that reads as zeros there (fresh and sparse), leaving out
// its all-zero pages: they stay holes, which saves page cache and disk (guest memory has many zero
// pages inside non-zero chunks), and a page's zero check costs far less than copying it.
void write_nonzero_pages(int fd, std::span<const std::byte> bytes, uint64_t offset,
                         const std::string& what) {
  auto page_at = [&](size_t position) {
    return bytes.subspan(position, std::min<size_t>(kPageSize, bytes.size() - position));
  };
  size_t position = 0;
  while (position < bytes.size()) {
    if (is_all_zero(page_at(position))) {
      position += page_at(position).size();
      continue;
    }
    size_t end = position + page_at(position).size();
    while (end < bytes.size() && !is_all_zero(page_at(end)))
      end += page_at(end).size();
    pwrite_all(fd, bytes.subspan(position, end - position), offset + position, what);
    position = end;
  }
}

// An object of `size` bytes whose chunks are all still to be stored.
ObjectRef empty_ref(uint64_t size, uint32_t chunk_size) {
  ObjectRef ref;
  ref.size = size;
  ref.chunk_size = chunk_size;
  ref.chunks.resize(static_cast<size_t>((size + chunk_size - 1) / chunk_size));
  return ref;
}

}  // namespace

// Shared by every put. Stores the chunks of `ref` whose indexes are in `indexes` (ascending; all of
// them when null), whose other entries are left as they are. `piece(index, worker)` returns chunk
// `index`'s bytes, valid until that worker's next call. Progress counts the bytes of those chunks.
template <class PieceFn>
static void put_chunks(int root_fd, const fs::path& root, int level, ObjectRef& ref,
                       const std::vector<size_t>* indexes, unsigned workers,
                       const ProgressFn& progress, PieceFn&& piece) {
  const size_t count = indexes ? indexes->size() : ref.chunks.size();
  auto index_at = [&](size_t i) { return indexes ? (*indexes)[i] : i; };
  uint64_t total = 0;
  if (indexes) {
    for (size_t index : *indexes)
      total += ref.chunk_length(index);
  } else {
    total = ref.size;
  }
  const size_t window = std::max<size_t>(1, kWindowBytes / ref.chunk_size);
  detail::ProgressReporter reporter(progress, total);

  struct Pending {
    std::string temp;
    Hash128 hash;
  };
  struct Worker {
    explicit Worker(int level) : codec(level) {}
    detail::ChunkCodec codec;
    std::vector<Pending> pending;
  };
  std::vector<std::unique_ptr<Worker>> state;
  for (unsigned w = 0; w < workers; ++w)
    state.push_back(std::make_unique<Worker>(level));

  for (size_t first = 0; first < count; first += window) {
    const size_t last = std::min(count, first + window);
    try {
      detail::parallel_for(last - first, workers, [&](size_t i, unsigned w) {
        const size_t index = index_at(first + i);
        std::span<const std::byte> bytes = piece(index, w);
        reporter.add(bytes.size());
        ChunkRef& chunk = ref.chunks[index];
        if (is_all_zero(bytes)) {
          chunk.reset();  // zero chunks are never stored
          return;
        }
        Hash128 hash = hash_bytes(bytes);
        chunk = hash;
        std::string target = detail::chunk_file(hash);
        if (::faccessat(root_fd, target.c_str(), F_OK, 0) == 0) return;  // stored already
        Worker& worker = *state[w];
        std::span<const std::byte> encoded = worker.codec.encode(bytes);
        std::string temp = "tmp/" + unique_temp_name("chunk");
        UniqueFd fd = open_file(root_fd, temp, O_WRONLY | O_CREAT | O_EXCL, 0444);
        worker.pending.push_back({temp, hash});
        pwrite_all(fd.get(), encoded, 0, (root / temp).string());
      });
      std::vector<const Pending*> renames;
      for (auto& w : state) {
        for (const Pending& p : w->pending)
          renames.push_back(&p);
      }
      if (!renames.empty()) {
        // The data of every pending chunk reaches the disk before any of them gets its name, so a
        // chunk under its final name is always complete. One syncfs batches them all.
        syncfs_or_throw(root_fd, "the store at " + root.string());
      }
      detail::parallel_for(renames.size(), workers, [&](size_t i, unsigned) {
        const Pending& p = *renames[i];
        std::string target = detail::chunk_file(p.hash);
        if (::renameat2(root_fd, p.temp.c_str(), root_fd, target.c_str(), RENAME_NOREPLACE) != 0) {
          int error_number = errno;
          ::unlinkat(root_fd, p.temp.c_str(), 0);
          // Another writer stored the same chunk first: that is dedup, not an error.
          if (error_number != EEXIST)
            throw_errno("cannot store chunk " + p.hash.hex(), error_number);
        }
      });
      for (auto& w : state)
        w->pending.clear();
    } catch (...) {
      for (auto& w : state) {
        for (const Pending& p : w->pending)
          ::unlinkat(root_fd, p.temp.c_str(), 0);
      }
      throw;
    }
  }
}

uint32_t Store::put_chunk_size(const TransferOptions& options) const {
  uint32_t chunk_size = options.chunk_size ? options.chunk_size : options_.chunk_size;
  if (chunk_size == 0 || chunk_size % 4096 != 0) {
    throw StoreError("chunk size must be a multiple of 4096");
  }
  return chunk_size;
}

ObjectRef Store::put_object(std::span<const std::byte> data, const TransferOptions& options) {
  const uint32_t chunk_size = put_chunk_size(options);
  ObjectRef ref = empty_ref(data.size(), chunk_size);
  // Chunks are hashed and compressed straight from `data`: no copy.
  put_chunks(root_fd_.get(), root_, options_.zstd_level, ref, nullptr, thread_count(options),
             options.progress, [&](size_t index, unsigned) {
               return data.subspan(ref.chunk_offset(index), ref.chunk_length(index));
             });
  return ref;
}

ObjectRef Store::put_object_changes(uint64_t size, const std::optional<ObjectRef>& parent,
                                    const std::vector<size_t>& changed, const ChunkReader& read,
                                    const TransferOptions& options) {
  const uint32_t chunk_size = put_chunk_size(options);
  const size_t count = static_cast<size_t>((size + chunk_size - 1) / chunk_size);
  // A parent of another geometry (or a malformed one) shares nothing: every chunk is read.
  const bool incremental = parent && parent->size == size && parent->chunk_size == chunk_size &&
                           parent->chunks.size() == count;
  ObjectRef ref = incremental ? *parent : empty_ref(size, chunk_size);
  if (incremental) {
    for (size_t i = 0; i < changed.size(); ++i) {
      if (changed[i] >= ref.chunks.size() || (i > 0 && changed[i] <= changed[i - 1])) {
        throw StoreError("changed chunk indexes must be ascending and below " +
                         std::to_string(ref.chunks.size()) + " (index " +
                         std::to_string(changed[i]) + " at position " + std::to_string(i) + ")");
      }
    }
  }
  unsigned workers = thread_count(options);
  // One chunk-sized buffer per worker: memory stays bounded whatever the object's size.
  std::vector<std::vector<std::byte>> buffers(workers);
  put_chunks(root_fd_.get(), root_, options_.zstd_level, ref, incremental ? &changed : nullptr,
             workers, options.progress, [&](size_t index, unsigned w) {
               buffers[w].resize(ref.chunk_length(index));
               std::span<std::byte> out(buffers[w]);
               read(index, out);
               return std::span<const std::byte>(out);
             });
  return ref;
}

ObjectRef Store::put_file(const fs::path& path, const TransferOptions& options) {
  UniqueFd fd = open_file(AT_FDCWD, path, O_RDONLY);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) throw_errno("cannot stat " + path.string());
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    throw StoreError(path.string() + " is not a regular file");
  }
  const std::string what = path.string();
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint32_t chunk_size = put_chunk_size(options);
  return put_object_changes(
      size, std::nullopt, {},
      [&](size_t index, std::span<std::byte> out) {
        pread_all(fd.get(), out, uint64_t{chunk_size} * index, what);
      },
      options);
}

void Store::materialize(const ObjectRef& ref, std::span<std::byte> destination,
                        const TransferOptions& options) const {
  if (destination.size() != ref.size) {
    throw StoreError("cannot materialize an object of " + std::to_string(ref.size) +
                     " bytes into " + std::to_string(destination.size()) + " bytes");
  }
  unsigned workers = thread_count(options);
  auto codecs = detail::make_codecs(workers, options_.zstd_level);
  detail::ProgressReporter reporter(options.progress, ref.size);
  detail::parallel_for(ref.chunks.size(), workers, [&](size_t index, unsigned w) {
    std::span<std::byte> out =
        destination.subspan(ref.chunk_offset(index), ref.chunk_length(index));
    const ChunkRef& chunk = ref.chunks[index];
    if (!chunk) {
      if (!options.destination_zeroed) std::memset(out.data(), 0, out.size());
    } else {
      prefault(out);
      // Decompresses straight into the destination: no intermediate copy.
      codecs[w]->read_into(root_fd_.get(), detail::chunk_file(*chunk), *chunk, out);
    }
    reporter.add(out.size());
  });
}

void Store::materialize_file(const ObjectRef& ref, const fs::path& path,
                             const TransferOptions& options) const {
  fs::path target = fs::absolute(path);
  fs::path temp = target.parent_path() /
                  ("." + target.filename().string() + "." + unique_temp_name("msb-partial"));
  // Errors name the file the caller asked for, not the temporary one beside it.
  struct stat st;
  if (::stat(target.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw StoreError("cannot write " + target.string() + ": it is a directory");
  }
  int raw = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (raw < 0) throw_errno("cannot write " + target.string());
  UniqueFd fd(raw);
  try {
    // Zero chunks stay holes: the file is as sparse as the object.
    if (::ftruncate(fd.get(), static_cast<off_t>(ref.size)) != 0) {
      throw_errno("cannot size " + temp.string());
    }
    unsigned workers = thread_count(options);
    struct Worker {
      explicit Worker(int level) : codec(level) {}
      detail::ChunkCodec codec;
      std::vector<std::byte> buffer;
    };
    std::vector<std::unique_ptr<Worker>> state;
    for (unsigned w = 0; w < workers; ++w)
      state.push_back(std::make_unique<Worker>(options_.zstd_level));
    detail::ProgressReporter reporter(options.progress, ref.size);
    detail::parallel_for(ref.chunks.size(), workers, [&](size_t index, unsigned w) {
      const ChunkRef& chunk = ref.chunks[index];
      uint32_t length = ref.chunk_length(index);
      if (chunk) {
        Worker& worker = *state[w];
        worker.buffer.resize(length);
        worker.codec.read_into(root_fd_.get(), detail::chunk_file(*chunk), *chunk, worker.buffer);
        write_nonzero_pages(fd.get(), worker.buffer, ref.chunk_offset(index), temp.string());
      }
      reporter.add(length);
    });
    if (::rename(temp.c_str(), target.c_str()) != 0) {
      throw_errno("cannot rename " + temp.string() + " to " + target.string());
    }
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }
}

}  // namespace msb::snapstore
