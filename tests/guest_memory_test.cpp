// Unit tier: bounds-checked guest memory (vmm/guest_memory.h).
#include <catch2/catch.hpp>
#include <limits>

#include "vmm/guest_memory.h"

using msb::vmm::GuestMemory;

TEST_CASE("guest memory accesses are checked against the regions", "[vmm]") {
  std::vector<std::byte> low(0x1000), high(0x2000);
  GuestMemory memory;
  memory.add_region(0x10000, high);
  memory.add_region(0, low);
  REQUIRE(memory.regions().front().guest_address == 0);

  REQUIRE(memory.write_obj<uint32_t>(0xffc, 0xdeadbeef));
  REQUIRE(memory.read_obj<uint32_t>(0xffc) == 0xdeadbeef);
  REQUIRE_FALSE(memory.read_obj<uint32_t>(0xffd));  // crosses the end of a region
  REQUIRE_FALSE(memory.read_obj<uint8_t>(0x1000));  // in the gap
  REQUIRE(memory.slice(0x1000, 0));                 // empty, at the end of a region
  REQUIRE(memory.slice(0x10000, 0x2000)->size() == 0x2000);
  REQUIRE_FALSE(memory.slice(0x10000, 0x2001));
  REQUIRE_FALSE(memory.slice(0xffc, 8));  // spans the gap into nothing
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  REQUIRE_FALSE(memory.slice(0x10000, kMax));  // length overflow
  REQUIRE_FALSE(memory.slice(kMax - 1, 4));    // address + length wraps
  REQUIRE_FALSE(memory.write_obj<uint64_t>(kMax - 3, 1));

  std::vector<std::byte> other(0x100);
  REQUIRE_THROWS(memory.add_region(0x10800, other));      // overlaps
  REQUIRE_THROWS(memory.add_region(kMax - 0x10, other));  // wraps
  REQUIRE_NOTHROW(memory.add_region(0x1000, other));      // adjacent is fine
  REQUIRE_FALSE(memory.read_obj<uint64_t>(0xffc));  // adjacent regions: an access spans one only
}
