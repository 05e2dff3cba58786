#include "snapstore/hash.h"

#include <cstring>

#define XXH_STATIC_LINKING_ONLY
#include <xxh_x86dispatch.h>
#include <xxhash.h>

namespace msb::snapstore {

std::string Hash128::hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[15 - i] = kDigits[(high >> (4 * i)) & 0xf];
    out[31 - i] = kDigits[(low >> (4 * i)) & 0xf];
  }
  return out;
}

std::optional<Hash128> Hash128::parse(std::string_view text) {
  if (text.size() != 32) return std::nullopt;
  Hash128 h;
  for (size_t i = 0; i < 32; ++i) {
    char c = text[i];
    uint64_t v;
    if (c >= '0' && c <= '9') {
      v = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      v = static_cast<uint64_t>(c - 'a' + 10);
    } else if (c >= 'A' && c <= 'F') {
      v = static_cast<uint64_t>(c - 'A' + 10);
    } else {
      return std::nullopt;
    }
    uint64_t& word = i < 16 ? h.high : h.low;
    word = (word << 4) | v;
  }
  return h;
}

Hash128 hash_bytes(std::span<const std::byte> bytes) {
  // The dispatch variant picks AVX2/AVX-512 at run time; Debian builds libxxhash for baseline
  // x86-64.
  XXH128_hash_t h = XXH3_128bits_dispatch(bytes.data(), bytes.size());
  return Hash128{h.high64, h.low64};
}

bool is_all_zero(std::span<const std::byte> bytes) {
  if (bytes.empty()) return true;
  if (bytes[0] != std::byte{0}) return false;
  // Comparing the span with itself shifted by one byte runs at memcmp speed.
  return std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0;
}

}  // namespace msb::snapstore
