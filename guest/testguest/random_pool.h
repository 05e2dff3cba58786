// The test guest's random pool: xoshiro256** state into which entropy is mixed (each word through
// splitmix64 into one lane, then the generator stepped) and out of which `random` draws. Seeded at
// boot from RDRAND where CPUID offers it and the TSC, reseeded by every kRestore with the host's
// entropy. Mixing adds to the state and never replaces it, so what a guest drew at boot and what
// the host sends both count. A test guest's pool, not a cryptographic one.
//
// Header-only and free of everything but <stdint.h>: the freestanding guest and the host's tests
// (tests/testguest_restore_test.cpp) both include it.
#pragma once

#include <stdint.h>

namespace testguest {

struct RandomPool {
  uint64_t s[4];
};

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t rotl64(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

// xoshiro256**: the next 64 bits.
inline uint64_t pool_next(RandomPool& pool) {
  uint64_t* s = pool.s;
  const uint64_t result = rotl64(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl64(s[3], 45);
  return result;
}

// Mixes `count` words into the pool. The same pool given different words ends up different (with
// overwhelming odds); the same words mixed into different pools keep them different.
inline void pool_absorb(RandomPool& pool, const uint64_t* words, uint32_t count) {
  for (uint32_t i = 0; i < count; ++i) {
    pool.s[i & 3] ^= splitmix64(words[i] ^ (0x632be59bd9b4e019ull * (i + 1)));
    pool_next(pool);
  }
  for (int round = 0; round < 8; ++round)
    pool_next(pool);
  if ((pool.s[0] | pool.s[1] | pool.s[2] | pool.s[3]) == 0) pool.s[0] = 1;  // xoshiro needs one bit
}

}  // namespace testguest
