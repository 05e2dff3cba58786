// The seeded patterns and checksums of the test guest's `fill`, `sum`, `disk-write`, `disk-read`
// and `out` commands, shared with host-side tests so they can compute what the guest must print.
// Freestanding: nothing beyond <stdint.h>.
//
// A pattern is a sequence of 64-bit little-endian words; word i of seed s is
// pattern_word(s, i), so any part of it can be produced or checked on its own. The checksum of a
// range is FNV-1a over its 64-bit words (not bytes: it runs at memory speed in the guest), printed
// by the guest as 16 lowercase hex digits and a newline.
#pragma once

#include <stdint.h>

namespace msb::pattern {

inline constexpr uint64_t kChecksumInit = 0xcbf29ce484222325ull;

// splitmix64 of the word's position in the stream of `seed`.
inline uint64_t pattern_word(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + index + 1;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t checksum_update(uint64_t checksum, uint64_t word) {
  return (checksum ^ word) * 0x100000001b3ull;
}

// The checksum of `words` words of seed `seed` starting at word 0.
inline uint64_t pattern_checksum(uint64_t seed, uint64_t words) {
  uint64_t checksum = kChecksumInit;
  for (uint64_t i = 0; i < words; ++i)
    checksum = checksum_update(checksum, pattern_word(seed, i));
  return checksum;
}

}  // namespace msb::pattern
