// Snapshots: a running sandbox's whole state (vCPUs, VM, devices, memory, disk delta) kept in the
// store, and new sandboxes restored from it without a boot. docs/snapshots.md tells the story.
//
// A snapshot is a store manifest (meta.kind "snapshot", see kSnapshotFormat) whose objects are the
// guest memory ("memory"), the disk delta's data and map ("disk", "disk.map"), and whose
// manifests list holds its parent (the snapshot it is incremental to) and the image its disk is
// a layer over, so the store keeps them as long as the snapshot exists. Its handle is the
// manifest's hash in hex.
//
// Lifetimes are store names:
//   NAME                        a named snapshot (msb snapshot save-named): lives until removed
//   sandbox.SANDBOX.HANDLE      an unnamed snapshot taken of SANDBOX: removed with the sandbox
//   sandbox.SANDBOX.parent      the snapshot a restored SANDBOX came from: removed with it
//   sandbox.SANDBOX.image       the image SANDBOX's disk is a layer over: removed with it
// User names may not start with "sandbox." (kInternalNamePrefix) or "image." (image tags).
//
// Restore materializes a snapshot's memory and disk delta once into
// $MSB_HOME/cache/snapshots/HANDLE/ (rebuilt when missing; every chunk's hash is checked as it is
// read), and every sandbox restored from it maps that memory copy-on-write.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/home.h"
#include "snapstore/store.h"

namespace msb::core {

class SnapshotError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kSnapshotFormat = "msb-snapshot";
inline constexpr int kSnapshotFormatVersion = 1;
inline constexpr const char* kInternalNamePrefix = "sandbox.";

struct SnapshotInfo {
  std::string handle;              // the manifest's hash, hex
  std::vector<std::string> names;  // names given with save-named
  std::string source;              // the sandbox it was taken from
  std::string created;             // ISO 8601 UTC
  std::string parent;              // handle of the snapshot it is incremental to, or ""
  unsigned cpus = 0, max_cpus = 0;
  uint64_t memory_mib = 0, max_memory_mib = 0;
  uint64_t memory_bytes = 0;      // guest memory captured (the --max-memory ceiling)
  uint64_t disk_bytes = 0;        // size of the disk
  uint64_t disk_delta_bytes = 0;  // non-zero bytes of the disk delta
  uint64_t stored_bytes = 0;      // compressed bytes of the chunks it added over its parent
  uint64_t total_bytes = 0;       // compressed bytes of every distinct chunk it references
  bool unnamed_alive = false;     // its source sandbox still holds it
  nlohmann::json to_json() const;
};

struct SnapshotCreateOptions {
  bool resume = false;             // let the sandbox run again as soon as it is captured
  snapstore::ProgressFn progress;  // storing progress (bytes)
};

struct SnapshotCreateResult {
  std::string handle;
  std::string parent;     // "" for a full snapshot
  double paused_ms = 0;   // how long the guest was stopped (with resume), 0 if it stays paused
  double capture_ms = 0;  // pause + capture + copy out
  double store_ms = 0;    // hashing, compressing and writing chunks, then the manifest
  double total_ms = 0;
  uint64_t memory_bytes = 0;
  uint64_t stored_bytes = 0;  // compressed bytes this snapshot added to the store
  size_t memory_chunks_read = 0, memory_chunks = 0;
  size_t disk_chunks_read = 0;
  nlohmann::json to_json(const std::string& sandbox) const;
};

// Pauses the running sandbox (if it is not paused already), captures it and stores the snapshot
// under its unnamed lifetime name. The sandbox stays paused unless options.resume. A second
// snapshot of the same sandbox (or a snapshot of a restored sandbox) stores only what changed
// since its parent.
SnapshotCreateResult create_snapshot(const Home& home, const std::string& sandbox,
                                     const SnapshotCreateOptions& options);
void pause_sandbox(const Home& home, const std::string& sandbox);
void resume_sandbox(const Home& home, const std::string& sandbox);

// A name or a handle (or a unique prefix of one, at least 6 hex digits) to a handle. Throws
// SnapshotError("no snapshot \"REF\"") otherwise, or when a prefix is ambiguous.
std::string resolve_snapshot(const snapstore::Store& store, const std::string& ref);

// Keeps the snapshot REF under NAME; an existing name is refused unless `replace`.
std::string save_named(const Home& home, const std::string& ref, const std::string& name,
                       bool replace);
std::vector<SnapshotInfo> list_snapshots(const Home& home);
// With `verify`, re-reads every chunk it references (problems go to `problems`).
SnapshotInfo inspect_snapshot(const Home& home, const std::string& ref, bool verify,
                              std::vector<std::string>* problems = nullptr,
                              nlohmann::json* manifest_meta = nullptr);
// Removes a name (or, given a handle, the unnamed snapshot's name). Sandboxes restored from it go
// on (they hold their own reference); `msb store gc` reclaims what nothing references.
void remove_snapshot(const Home& home, const std::string& ref);

struct RestoreOptions {
  std::string name;   // the sandbox's name; with fork, the names' prefix
  unsigned fork = 0;  // 0: one sandbox called `name`; K: name-0 .. name-(K-1)
  std::optional<uint64_t> memory_mib;
  std::optional<unsigned> cpus;
  std::vector<std::string> env;    // K=V over the snapshot's environment
  snapstore::ProgressFn progress;  // materializing the snapshot, the first time (bytes)
};

struct RestoreResult {
  std::vector<std::string> sandboxes;
  double materialize_ms = 0;  // 0 when the cache was there
  double total_ms = 0;
};

// Starts new sandboxes from the snapshot, in parallel, and returns once every one answered. On
// any failure none of them is left behind.
RestoreResult restore_snapshot(const Home& home, const std::string& ref,
                               const RestoreOptions& options);

// The store names that make `sandbox` hold snapshots (its unnamed snapshots, its parent).
void release_sandbox_snapshots(const Home& home, const std::string& sandbox);

// The store name by which `sandbox` holds the image its disk is a layer over.
std::string image_hold_name(const std::string& sandbox);
// Removes cached materializations of snapshots the store no longer has; returns how many.
size_t prune_snapshot_caches(const Home& home, const snapstore::Store& store);

// Where a snapshot is materialized for restores.
std::filesystem::path snapshot_cache_dir(const Home& home, const std::string& handle);
// Materializes (if missing) and returns the cache folder; throws SnapshotError naming the
// snapshot and the chunk when a chunk is missing or corrupted. `manifest`: the snapshot's
// manifest when the caller has read it already (it is not read again), else nullptr.
std::filesystem::path materialize_snapshot(const Home& home, const snapstore::Store& store,
                                           const std::string& handle,
                                           const snapstore::ProgressFn& progress,
                                           double* materialize_ms = nullptr,
                                           const snapstore::Manifest* manifest = nullptr);

}  // namespace msb::core
