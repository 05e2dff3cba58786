// The content-addressed store: chunks, large objects, manifests, names and pins on local disk.
//
// Layout under the root (see docs/store.md for the reasons):
//   store.json               format and version; a newer major version is refused
//   lock                     flock: shared while a Store is open, exclusive for gc
//   chunks/xx/<hash>         one zstd frame per chunk, named by the XXH3-128 of its plain bytes
//   manifests/<hash>.json    manifest documents, named by the XXH3-128 of their bytes
//   names/<name>             "<manifest hash>\n"
//   pins/<id>.pin            manifests held alive by a running process (flock held by it)
//   tmp/                     files being written; anything here without a writer is debris
//
// Invariants:
//  - A file appears under chunks/, manifests/, names/ or pins/ only by rename(2) of a complete
//  file.
//  - A chunk is renamed into place only after its data is on disk, and a manifest or name is
//    published only after everything it references is on disk (syncs are batched with syncfs).
//  - Every open Store holds the store lock shared; gc holds it exclusive. So gc never runs while
//    anyone is between "this chunk exists, skip it" and publishing the manifest that needs it.
//    Hold a Store only for the length of an operation; long-lived references are Pins.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "snapstore/file_util.h"
#include "snapstore/hash.h"
#include "snapstore/object.h"

namespace msb::snapstore {

inline constexpr int kStoreMajorVersion = 1;
inline constexpr int kStoreMinorVersion = 0;
// 256 KiB: chosen by measurement (docs/store.md): large enough that per-file costs vanish next to
// compression, small enough that a few dirty pages rewrite little.
inline constexpr uint32_t kDefaultChunkSize = 256 * 1024;
// zstd level 1: the fastest level that keeps the memory-like benchmark buffer over 3x smaller.
inline constexpr int kDefaultZstdLevel = 1;

struct StoreOptions {
  int zstd_level = kDefaultZstdLevel;
  uint32_t chunk_size = kDefaultChunkSize;
  unsigned threads = 0;  // 0: one per core
  // Open for gc: take the store lock exclusively, waiting at most `lock_timeout` for other users.
  bool exclusive = false;
  std::chrono::milliseconds lock_timeout{30000};
};

// Reports progress of a long operation: bytes done out of total. Called from worker threads, one
// call at a time, at most every ~100 ms.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

struct TransferOptions {
  unsigned threads = 0;             // 0: the store's setting
  uint32_t chunk_size = 0;          // put only; 0: the store's setting
  ProgressFn progress;              // optional
  bool destination_zeroed = false;  // materialize into memory only: skip writing zero chunks
};

// A running process's hold on some manifests (and through them their chunks): gc keeps them while
// the Pin exists. The pin file carries an flock; if the process dies the lock goes with it and the
// next gc removes the stale pin. A forked child that inherits the descriptor keeps the pin alive
// too.
class Pin {
 public:
  Pin() = default;
  Pin(Pin&&) noexcept = default;
  Pin& operator=(Pin&& other) noexcept;
  ~Pin() { release(); }

  const std::filesystem::path& path() const { return path_; }
  int fd() const { return fd_.get(); }
  // Removes the pin now (otherwise on destruction).
  void release();

 private:
  friend class Store;
  std::filesystem::path path_;
  UniqueFd fd_;
};

struct StoreStats {
  uint64_t chunks = 0;
  uint64_t chunk_bytes = 0;   // uncompressed bytes of all stored chunks
  uint64_t stored_bytes = 0;  // bytes of chunk files on disk
  uint64_t manifests = 0;
  uint64_t manifest_bytes = 0;
  uint64_t names = 0;
  uint64_t live_pins = 0;
  uint64_t objects = 0;           // object references in reachable manifests
  uint64_t logical_bytes = 0;     // their sizes, zero chunks included
  uint64_t referenced_bytes = 0;  // their non-zero chunks, counted once per reference
  uint64_t temp_files = 0;
  // referenced_bytes / unique bytes of the chunks they reference (1.0 when nothing is shared).
  double dedup_ratio = 1.0;
  // chunk_bytes / stored_bytes.
  double compression_ratio = 1.0;
};

struct VerifyReport {
  uint64_t chunks = 0, manifests = 0, names = 0, pins = 0;
  uint64_t temp_files = 0;  // debris of interrupted writers: not a problem, gc removes it
  std::vector<std::string> problems;
  bool ok() const { return problems.empty(); }
};

struct GcReport {
  uint64_t chunks_removed = 0, chunk_bytes_removed = 0;
  uint64_t manifests_removed = 0, pins_removed = 0, temp_files_removed = 0;
  uint64_t chunks_kept = 0, manifests_kept = 0;
};

class Store {
 public:
  // Opens (creating if absent) the store at `root`. Throws StoreError if the store's version is
  // newer than this code reads, if it is not a store, or (exclusive) if it stays busy.
  static std::unique_ptr<Store> open(const std::filesystem::path& root, StoreOptions options = {});
  ~Store();

  const std::filesystem::path& root() const { return root_; }
  const StoreOptions& options() const { return options_; }

  // --- Chunks ---------------------------------------------------------------------------------
  bool has_chunk(const Hash128& hash) const;
  // Reads, decompresses and verifies a chunk. Throws StoreError naming the chunk if it is
  // missing, undecodable or its content does not hash to its name.
  std::vector<std::byte> get_chunk(const Hash128& hash) const;

  // --- Large objects --------------------------------------------------------------------------
  // Cuts `data` into chunks and stores them in parallel; the chunks are on disk when it returns.
  ObjectRef put_object(std::span<const std::byte> data, const TransferOptions& options = {});
  // The same for a file, read in chunk-sized pieces (memory stays bounded).
  ObjectRef put_file(const std::filesystem::path& path, const TransferOptions& options = {});

  // Reads chunk `index` of the object being stored (exactly ObjectRef::chunk_length(index) bytes)
  // into `out`. Called from worker threads, several at once, each with its own `out`.
  using ChunkReader = std::function<void(size_t index, std::span<std::byte> out)>;
  // Stores an object of `size` bytes that is `parent` except in the chunks listed in `changed`
  // (indexes, strictly ascending, may be empty): only those are read, hashed, compressed and
  // stored (zero chunks become null refs, chunks already stored are not rewritten); every other
  // chunk keeps the parent's ref. Without a parent, or when the parent's size or chunk size
  // differ from (size, the chunk size used), `changed` is ignored and every chunk is read. The
  // parent's chunks must still be in the store (keep it named or pinned). Chunks are on disk
  // when it returns, like put_object. Progress counts bytes of chunks read out of bytes to read.
  // Throws StoreError for a bad `changed`; an exception from `read` stops the put and is
  // rethrown (chunks stored so far stay, unreferenced, for gc).
  ObjectRef put_object_changes(uint64_t size, const std::optional<ObjectRef>& parent,
                               const std::vector<size_t>& changed, const ChunkReader& read,
                               const TransferOptions& options = {});

  // Writes the object's bytes into `destination` (exactly ref.size bytes), verifying every chunk.
  void materialize(const ObjectRef& ref, std::span<std::byte> destination,
                   const TransferOptions& options = {}) const;
  // Writes the object to a new file at `path`, atomically for readers: the file appears complete
  // or not at all. Zero chunks and zero 4 KiB pages are never written: they stay holes. It is not
  // synced; callers that need it to survive a power loss sync it (a cache can instead be checked
  // and rebuilt).
  void materialize_file(const ObjectRef& ref, const std::filesystem::path& path,
                        const TransferOptions& options = {}) const;

  // --- Manifests ------------------------------------------------------------------------------
  // Stores a manifest durably. Every chunk and manifest it references must already be stored.
  Hash128 put_manifest(const Manifest& manifest);
  Manifest get_manifest(const Hash128& hash) const;
  bool has_manifest(const Hash128& hash) const;

  // --- Names ----------------------------------------------------------------------------------
  // Points `name` at a stored manifest. An existing name is an error unless `replace`.
  void set_name(std::string_view name, const Hash128& manifest, bool replace = false);
  std::optional<Hash128> find_name(std::string_view name) const;
  // Removes a name; false if it did not exist. The manifest and chunks stay until gc.
  bool remove_name(std::string_view name);
  std::vector<std::pair<std::string, Hash128>> list_names() const;

  // --- Pins -----------------------------------------------------------------------------------
  Pin pin(const std::vector<Hash128>& manifests);

  // --- Maintenance ----------------------------------------------------------------------------
  StoreStats stats() const;
  VerifyReport verify() const;
  // Deletes every chunk and manifest that no name or live pin reaches, stale pins and temporary
  // files. Needs a store opened with `exclusive`. With dry_run, only counts.
  GcReport gc(bool dry_run);

  // Paths, for tools and tests.
  std::filesystem::path chunk_path(const Hash128& hash) const;
  std::filesystem::path manifest_path(const Hash128& hash) const;

 private:
  Store(std::filesystem::path root, StoreOptions options);
  void open_root();
  unsigned thread_count(const TransferOptions& options) const;
  // The chunk size a put uses: the options' or the store's.
  uint32_t put_chunk_size(const TransferOptions& options) const;
  void sync_filesystem() const;
  std::vector<std::pair<std::string, Hash128>> scan_names(std::vector<std::string>* problems) const;

  std::filesystem::path root_;
  StoreOptions options_;
  UniqueFd root_fd_;
  UniqueFd lock_fd_;
};

}  // namespace msb::snapstore
