// Instructions KVM's in-kernel emulator gave up on (KVM_EXIT_INTERNAL_ERROR, suberror
// KVM_INTERNAL_ERROR_EMULATION). On hosts without VMX/SVM (nested PVM, shared/environment.md)
// guest kernel code is emulated instruction by instruction, and that emulator lacks some
// instructions Linux runs all the time: `int3` (text patching, static keys) and `fwait` (every
// task exit). The VMM completes those two itself; anything else stops the guest with a report
// that names the instruction. Hosts with VMX/SVM run guest code natively and never get here.
//
// decode() is a pure function of the bytes (untrusted: they are guest memory), so it is tested
// without KVM; vmm/vcpu.cpp applies what it says.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace msb::vmm::emulation {

// The architectural limit: a longer instruction raises #GP on hardware.
inline constexpr size_t kMaxInstructionLength = 15;

// The code segment's default operand and address size.
enum class CodeMode { k16, k32, k64 };

enum class Action {
  kInjectBreakpoint,  // int3: advance RIP by `length`, then inject #BP (a trap: the handler's
                      // frame holds the next RIP, as on hardware)
  kSkipWait,          // fwait: advance RIP by `length`, unless an x87 exception is pending
  kFail,              // stop the guest and report the instruction
};

struct Decoded {
  Action action = Action::kFail;
  // The instruction's length when the decoder knows the instruction, else 0.
  size_t length = 0;
  // "int3", "xgetbv", ...; empty when the decoder does not know the instruction.
  std::string_view mnemonic;
  // The bytes ended before the instruction did: more bytes (from guest memory) may decode it.
  bool truncated = false;
  // Prefixes alone fill kMaxInstructionLength bytes: no instruction at all.
  bool too_long = false;
};

Decoded decode(std::span<const uint8_t> bytes, CodeMode mode);

// What a report says about the instruction: "`xgetbv` (0f 01 d0)", or the bytes alone when the
// instruction is unknown.
std::string describe(std::span<const uint8_t> bytes, const Decoded& decoded);

// "0f 01 d0"
std::string hex_bytes(std::span<const uint8_t> bytes);

// Whether `fwait` would raise #MF: an x87 exception flagged in the status word (FSW) that the
// control word (FCW) does not mask, or the error-summary bit.
bool x87_exception_pending(uint16_t fsw, uint16_t fcw);

}  // namespace msb::vmm::emulation
