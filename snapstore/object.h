// Large objects (guest memory, disk images) as ordered lists of fixed-size chunks, and manifests:
// the JSON documents that reference them.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snapstore/hash.h"

namespace msb::snapstore {

// One chunk of an object: its content hash, or nullopt for an all-zero chunk (never stored).
using ChunkRef = std::optional<Hash128>;

// An object cut into chunks of `chunk_size` bytes; the last one may be shorter.
// Invariant: chunks.size() == ceil(size / chunk_size), and chunk_size is a multiple of 4096.
struct ObjectRef {
  uint64_t size = 0;
  uint32_t chunk_size = 0;
  std::vector<ChunkRef> chunks;

  uint64_t chunk_offset(size_t index) const { return uint64_t{chunk_size} * index; }
  uint32_t chunk_length(size_t index) const;
  // Bytes held in non-zero chunks (what the object costs before compression and dedup).
  uint64_t nonzero_bytes() const;

  // {"size": N, "chunk_size": N, "chunks": ["<hex>" | null, ...]}
  nlohmann::json to_json() const;
  // Throws StoreError if the JSON is not a well-formed ObjectRef (the invariant above included).
  static ObjectRef from_json(const nlohmann::json& json);

  bool operator==(const ObjectRef&) const = default;
};

// A manifest is stored by the hash of its serialized bytes. The store understands `objects` and
// `manifests` (they keep chunks and other manifests alive); `meta` is the caller's.
struct Manifest {
  nlohmann::json meta = nlohmann::json::object();
  std::map<std::string, ObjectRef> objects;
  std::vector<Hash128> manifests;

  // The exact bytes that are stored and hashed. Deterministic: JSON objects are key-sorted.
  std::string serialize() const;
  // Throws StoreError (mentioning `what`) if the bytes are not a manifest of a known format.
  static Manifest parse(std::string_view bytes, const std::string& what);
};

}  // namespace msb::snapstore
