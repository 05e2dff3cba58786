// Content hashes for the store: XXH3-128 of a chunk's uncompressed bytes.
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace msb::snapstore {

// A 128-bit content hash. Its text form is 32 lowercase hex digits, most significant first
// (XXH3's canonical byte order), and is what names chunk and manifest files.
struct Hash128 {
  uint64_t high = 0;
  uint64_t low = 0;

  std::string hex() const;
  // Parses exactly 32 hex digits (either case); nullopt for anything else.
  static std::optional<Hash128> parse(std::string_view text);

  auto operator<=>(const Hash128&) const = default;
};

Hash128 hash_bytes(std::span<const std::byte> bytes);

// True if every byte is zero (an empty span is zero).
bool is_all_zero(std::span<const std::byte> bytes);

}  // namespace msb::snapstore

template <>
struct std::hash<msb::snapstore::Hash128> {
  size_t operator()(const msb::snapstore::Hash128& h) const noexcept {
    return h.low ^ (h.high * 31);
  }
};
