// The decoder for instructions KVM's emulator gave up on (vmm/emulation.h): what the VMM
// completes (int3, fwait), what it names in a report, and garbage.
#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "vmm/emulation.h"

using namespace msb::vmm::emulation;

namespace {

Decoded decode64(const std::vector<uint8_t>& bytes) {
  return decode(bytes, CodeMode::k64);
}

std::string mnemonic(const std::vector<uint8_t>& bytes, CodeMode mode = CodeMode::k64) {
  return std::string(decode(bytes, mode).mnemonic);
}

}  // namespace

TEST_CASE("int3 is completed by injecting #BP past it", "[emulation]") {
  for (auto mode : {CodeMode::k64, CodeMode::k32, CodeMode::k16}) {
    auto decoded = decode({{0xcc}}, mode);
    REQUIRE(decoded.action == Action::kInjectBreakpoint);
    REQUIRE(decoded.length == 1);
    REQUIRE(decoded.mnemonic == "int3");
  }
  // What follows the int3 in KVM's fetch window does not matter.
  auto decoded = decode64({0xcc, 0x0f, 0x01, 0xd0, 0x90});
  REQUIRE(decoded.action == Action::kInjectBreakpoint);
  REQUIRE(decoded.length == 1);
  // Prefixes are ignored by the CPU, but the return address is past them too.
  decoded = decode64({0x66, 0x2e, 0xcc});
  REQUIRE(decoded.action == Action::kInjectBreakpoint);
  REQUIRE(decoded.length == 3);
  // LOCK int3 is #UD on hardware: reported, not completed.
  decoded = decode64({0xf0, 0xcc});
  REQUIRE(decoded.action == Action::kFail);
  REQUIRE(decoded.mnemonic == "int3");
  // int 3 (cd 03) is another instruction (no #BP trap semantics for debuggers): reported.
  decoded = decode64({0xcd, 0x03});
  REQUIRE(decoded.action == Action::kFail);
  REQUIRE(decoded.mnemonic == "int");
  REQUIRE(decoded.length == 2);
}

TEST_CASE("fwait is skipped, with or without prefixes", "[emulation]") {
  auto decoded = decode64({0x9b, 0xc3});
  REQUIRE(decoded.action == Action::kSkipWait);
  REQUIRE(decoded.length == 1);
  REQUIRE(decoded.mnemonic == "fwait");
  decoded = decode64({0x66, 0x9b});
  REQUIRE(decoded.action == Action::kSkipWait);
  REQUIRE(decoded.length == 2);
  decoded = decode64({0x48, 0x9b});  // REX.W
  REQUIRE(decoded.action == Action::kSkipWait);
  REQUIRE(decoded.length == 2);
  decoded = decode64({0x3e, 0x41, 0x9b});
  REQUIRE(decoded.action == Action::kSkipWait);
  REQUIRE(decoded.length == 3);
  // Outside 64-bit mode 0x48 is `dec eax`, not a prefix: that is what failed, not the fwait.
  decoded = decode({{0x48, 0x9b}}, CodeMode::k32);
  REQUIRE(decoded.action == Action::kFail);
  REQUIRE(decoded.mnemonic.empty());
  REQUIRE(decode64({0xf0, 0x9b}).action == Action::kFail);
  // fclex is fwait then fnclex: the fwait comes first.
  decoded = decode64({0x9b, 0xdb, 0xe2});
  REQUIRE(decoded.action == Action::kSkipWait);
  REQUIRE(decoded.length == 1);
  REQUIRE(mnemonic({0xdb, 0xe2}) == "fnclex");
}

TEST_CASE("a pending x87 exception keeps fwait from being skipped", "[emulation]") {
  REQUIRE_FALSE(x87_exception_pending(0x0000, 0x037f));
  REQUIRE_FALSE(x87_exception_pending(0x3800, 0x037f));  // TOP only
  REQUIRE_FALSE(x87_exception_pending(0x0020, 0x037f));  // precision flagged but masked
  REQUIRE(x87_exception_pending(0x0081, 0x037f));        // error summary
  REQUIRE(x87_exception_pending(0x0004, 0x037b));        // divide by zero, unmasked
  REQUIRE_FALSE(x87_exception_pending(0x0004, 0x037f));
}

TEST_CASE("the instructions this host's emulator lacks are named, with their length",
          "[emulation]") {
  struct Case {
    std::vector<uint8_t> bytes;
    const char* mnemonic;
    size_t length;
  };
  const Case cases[] = {
      {{0x0f, 0x01, 0xd0}, "xgetbv", 3},
      {{0x0f, 0x01, 0xd1}, "xsetbv", 3},
      {{0x0f, 0x01, 0xc1}, "vmcall", 3},
      {{0x0f, 0x01, 0xd9}, "vmmcall", 3},
      {{0x0f, 0x01, 0xf9}, "rdtscp", 3},
      {{0x0f, 0x01, 0xca}, "clac", 3},
      {{0x0f, 0x01, 0xcb}, "stac", 3},
      {{0x0f, 0x01, 0xc8}, "monitor", 3},
      {{0x0f, 0xae, 0x21}, "xsave", 3},                       // xsave [rcx]
      {{0x48, 0x0f, 0xae, 0x6c, 0x24, 0x08}, "xrstor64", 6},  // xrstor64 [rsp+8]
      {{0x0f, 0xc7, 0x27}, "xsavec", 3},
      {{0x48, 0x0f, 0xc7, 0x2f}, "xsaves64", 4},
      {{0x48, 0x0f, 0xc7, 0x1f}, "xrstors64", 4},
      {{0x0f, 0xae, 0x35, 0x10, 0x00, 0x00, 0x00}, "xsaveopt", 7},  // [rip+0x10]
      {{0x0f, 0xae, 0x14, 0x24}, "ldmxcsr", 4},
      {{0x0f, 0xae, 0x5d, 0xfc}, "stmxcsr", 4},
      {{0x66, 0x0f, 0xae, 0x30}, "clwb", 4},
      {{0xf3, 0x48, 0x0f, 0xb8, 0xc3}, "popcnt", 5},
      {{0xf2, 0x48, 0x0f, 0x38, 0xf1, 0xc1}, "crc32", 6},
      {{0xc4, 0xe2, 0x70, 0xf2, 0xc2}, "andn", 5},
      {{0xc4, 0xe2, 0x70, 0xf5, 0xc2}, "bzhi", 5},
      {{0xc4, 0xe3, 0xfb, 0xf0, 0xc1, 0x07}, "rorx", 6},
      {{0x48, 0x0f, 0xc7, 0x0e}, "cmpxchg16b", 4},
      {{0x0f, 0xc7, 0x0e}, "cmpxchg8b", 3},
      {{0x66, 0x0f, 0x38, 0x82, 0x07}, "invpcid", 5},
      {{0x0f, 0x00, 0xe8}, "verw", 3},
      {{0x0f, 0x00, 0x2c, 0x24}, "verw", 4},
      {{0x0f, 0x03, 0xc1}, "lsl", 3},
      {{0x0f, 0x02, 0xc1}, "lar", 3},
      {{0x0f, 0x77}, "emms", 2},
      {{0x66, 0x0f, 0xef, 0xc0}, "pxor", 4},
      {{0xdf, 0x2c, 0x24}, "fild", 3},
      {{0xd9, 0x6c, 0x24, 0xfe}, "fldcw", 4},
      {{0xdf, 0xe0}, "fnstsw", 2},
      {{0xdd, 0x38}, "fnstsw", 2},
      {{0xdd, 0x30}, "fnsave", 2},
      {{0xdd, 0x20}, "frstor", 2},
      {{0xcd, 0x80}, "int", 2},
      {{0xf1}, "int1", 1},
      {{0xf4}, "hlt", 1},
      {{0x0f, 0x0b}, "ud2", 2},
      {{0x0f, 0xa2}, "cpuid", 2},
      {{0x48, 0xcf}, "iretq", 2},
  };
  for (const auto& c : cases) {
    INFO(hex_bytes(c.bytes));
    auto decoded = decode64(c.bytes);
    CHECK(decoded.action == Action::kFail);
    CHECK(decoded.mnemonic == c.mnemonic);
    CHECK(decoded.length == c.length);
    CHECK_FALSE(decoded.truncated);
    // What follows the instruction is not part of it.
    auto longer = c.bytes;
    longer.insert(longer.end(), {0x90, 0x90, 0x90});
    CHECK(decode64(longer).length == c.length);
  }
  // 16-bit addressing: [bp+si+disp16] is ModRM 0xa2 plus two bytes.
  auto decoded = decode({{0x0f, 0xae, 0xa2, 0x34, 0x12}}, CodeMode::k16);
  REQUIRE(decoded.mnemonic == "xsave");
  REQUIRE(decoded.length == 5);
  // 32-bit mode: c4 with a memory ModRM is LES, not VEX.
  REQUIRE(mnemonic({0xc4, 0x06}, CodeMode::k32) == "les");
}

TEST_CASE("a report names the instruction and shows exactly its bytes", "[emulation]") {
  const std::vector<uint8_t> xgetbv = {0x0f, 0x01, 0xd0, 0x89, 0xc1, 0x90};
  REQUIRE(describe(xgetbv, decode64(xgetbv)) == "`xgetbv` (0f 01 d0)");
  const std::vector<uint8_t> unknown = {0x0f, 0x0f, 0xc1, 0xb4};  // 3DNow!
  auto decoded = decode64(unknown);
  REQUIRE(decoded.mnemonic.empty());
  REQUIRE(decoded.action == Action::kFail);
  REQUIRE(describe(unknown, decoded) ==
          "an instruction msb does not recognize (bytes 0f 0f c1 b4)");
  REQUIRE(describe({}, decode64({})) == "an instruction whose bytes are unknown");
  REQUIRE(hex_bytes(std::vector<uint8_t>{0x00, 0xff, 0x0a}) == "00 ff 0a");
}

TEST_CASE("truncated bytes ask for more, never read past what was given", "[emulation]") {
  for (const auto& bytes :
       std::vector<std::vector<uint8_t>>{{},
                                         {0x66},
                                         {0x48},
                                         {0x0f},
                                         {0x0f, 0x01},
                                         {0x0f, 0xae},
                                         {0x0f, 0xae, 0x24},              // SIB missing
                                         {0x0f, 0xae, 0x25, 0x00, 0x10},  // disp32 cut short
                                         {0x0f, 0x38},
                                         {0xc4, 0xe2},
                                         {0xc4, 0xe2, 0x70},
                                         {0xc5},
                                         {0xcd},
                                         {0xdd}}) {
    INFO(hex_bytes(bytes));
    auto decoded = decode64(bytes);
    CHECK(decoded.truncated);
    CHECK(decoded.action == Action::kFail);
    CHECK(decoded.length == 0);
    CHECK_FALSE(describe(bytes, decoded).empty());
  }
}

TEST_CASE("prefixes past the length limit make no instruction", "[emulation]") {
  std::vector<uint8_t> bytes(14, 0x66);
  bytes.push_back(0xcc);  // 15 bytes: still an instruction
  auto decoded = decode64(bytes);
  REQUIRE(decoded.action == Action::kInjectBreakpoint);
  REQUIRE(decoded.length == 15);

  bytes.assign(15, 0x66);
  bytes.push_back(0xcc);  // the int3 would be byte 16
  decoded = decode64(bytes);
  REQUIRE(decoded.action == Action::kFail);
  REQUIRE(decoded.too_long);
  REQUIRE_FALSE(decoded.truncated);
  REQUIRE(describe(bytes, decoded).find("longer than 15 bytes") != std::string::npos);

  bytes.assign(15, 0x2e);  // only prefixes, exactly the limit: never an instruction
  REQUIRE(decode64(bytes).too_long);

  // A known instruction whose operands run past 15 bytes.
  bytes.assign(10, 0x66);
  bytes.insert(bytes.end(), {0x0f, 0xae, 0xa4, 0x24, 0x00, 0x00, 0x00, 0x00});  // xsave [rsp+0]
  decoded = decode64(bytes);
  REQUIRE(decoded.too_long);
  REQUIRE(decoded.action == Action::kFail);
}

TEST_CASE("random bytes decode without reading past them", "[emulation]") {
  // Run under ASan/UBSan to catch a stray read: every prefix of every buffer is decoded.
  uint64_t state = 0x9e3779b97f4a7c15;
  auto next = [&] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  for (int round = 0; round < 20000; ++round) {
    std::vector<uint8_t> bytes(next() % 20);
    for (auto& byte : bytes) {
      // Bias towards prefixes and escapes so that the deep paths are taken.
      static constexpr uint8_t kInteresting[] = {0x0f, 0x66, 0xf3, 0xf2, 0x48, 0xc4, 0xc5,
                                                 0x01, 0xae, 0xc7, 0x38, 0xcc, 0x9b, 0xdd};
      const uint64_t r = next();
      byte = r % 2 ? kInteresting[(r >> 8) % sizeof kInteresting] : static_cast<uint8_t>(r >> 16);
    }
    for (auto mode : {CodeMode::k64, CodeMode::k32, CodeMode::k16}) {
      auto decoded = decode(bytes, mode);
      CHECK(decoded.length <= std::min(bytes.size(), kMaxInstructionLength));
      if (decoded.action != Action::kFail) CHECK(decoded.length >= 1);
      (void)describe(bytes, decoded);
    }
  }
}
