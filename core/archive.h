// Files kept in the store under a name ("msb store put/get"): the store at work before sandboxes
// exist, and the way to keep disk images and other large files deduplicated beside snapshots.
// Each is a manifest of kind "file" with one object, "data".
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "snapstore/store.h"

namespace msb::core {

struct NamedEntry {
  std::string name;
  snapstore::Hash128 manifest;
  std::string kind;     // "file" here; snapshots add their own kinds
  uint64_t size = 0;    // logical bytes of the manifest's objects
  std::string created;  // ISO 8601 UTC, as recorded when the entry was made
  std::string source;   // what it was made from (a path, a sandbox)
};

struct PutResult {
  snapstore::Hash128 manifest;
  snapstore::ObjectRef object;
};

// Stores `file` under `name`. An existing name is an error unless `replace`.
PutResult put_file(snapstore::Store& store, const std::string& name,
                   const std::filesystem::path& file, bool replace,
                   const snapstore::ProgressFn& progress = {});

// Writes the file stored under `name` to `output` (atomically). Returns its size.
uint64_t get_file(snapstore::Store& store, const std::string& name,
                  const std::filesystem::path& output, const snapstore::ProgressFn& progress = {});

// Every name in the store, with what its manifest says it is.
std::vector<NamedEntry> list_entries(const snapstore::Store& store);

// The time now as ISO 8601 UTC ("2026-11-28T13:45:00Z").
std::string utc_timestamp();

}  // namespace msb::core
