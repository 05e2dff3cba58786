#include "vmm/emulation.h"

#include <algorithm>
#include <array>
#include <optional>

namespace msb::vmm::emulation {

namespace {

struct Prefixes {
  bool lock = false;
  bool rep = false;           // f3
  bool operand_size = false;  // 66
  bool address_size = false;  // 67
  bool repne = false;         // f2
  uint8_t rex = 0;
};

bool is_legacy_prefix(uint8_t byte) {
  switch (byte) {
    case 0xf0:
    case 0xf2:
    case 0xf3:
    case 0x2e:
    case 0x36:
    case 0x3e:
    case 0x26:
    case 0x64:
    case 0x65:
    case 0x66:
    case 0x67:
      return true;
    default:
      return false;
  }
}

// The decoder works on what it was given and says "truncated" rather than read past it.
class Decoder {
 public:
  Decoder(std::span<const uint8_t> bytes, CodeMode mode) : bytes_(bytes), mode_(mode) {}

  Decoded run() {
    // Prefixes; a REX counts only right before the opcode (a legacy prefix after it voids it).
    size_t at = 0;
    for (; at < bytes_.size() && at < kMaxInstructionLength; ++at) {
      const uint8_t byte = bytes_[at];
      if (is_legacy_prefix(byte)) {
        prefixes_.lock |= byte == 0xf0;
        prefixes_.rep |= byte == 0xf3;
        prefixes_.repne |= byte == 0xf2;
        prefixes_.operand_size |= byte == 0x66;
        prefixes_.address_size |= byte == 0x67;
        prefixes_.rex = 0;
      } else if (mode_ == CodeMode::k64 && (byte & 0xf0) == 0x40) {
        prefixes_.rex = byte;
      } else {
        break;
      }
    }
    if (at == kMaxInstructionLength) return too_long({});
    if (at >= bytes_.size()) return truncated();
    return opcode(at);
  }

 private:
  unsigned address_bits() const {
    switch (mode_) {
      case CodeMode::k64:
        return prefixes_.address_size ? 32 : 64;
      case CodeMode::k32:
        return prefixes_.address_size ? 16 : 32;
      case CodeMode::k16:
        break;
    }
    return prefixes_.address_size ? 32 : 16;
  }

  std::optional<uint8_t> byte(size_t at) const {
    if (at >= bytes_.size()) return std::nullopt;
    return bytes_[at];
  }

  // The byte at `at` is missing: past the length limit the instruction is invalid whatever
  // follows; before it, more bytes are needed.
  static Decoded missing(size_t at) {
    return at >= kMaxInstructionLength ? too_long({}) : truncated();
  }

  static Decoded truncated() {
    Decoded decoded;
    decoded.truncated = true;
    return decoded;
  }
  static Decoded too_long(std::string_view mnemonic) {
    Decoded decoded;
    decoded.mnemonic = mnemonic;
    decoded.too_long = true;
    return decoded;
  }
  static Decoded unknown() { return Decoded{}; }

  // A known instruction the VMM does not complete.
  Decoded named(std::string_view mnemonic, size_t length) const {
    if (length > kMaxInstructionLength) return too_long(mnemonic);
    if (length > bytes_.size()) return truncated();
    Decoded decoded;
    decoded.mnemonic = mnemonic;
    decoded.length = length;
    return decoded;
  }

  // Bytes of ModRM, SIB and displacement at `at`, or nullopt when they run past the bytes.
  std::optional<size_t> modrm_length(size_t at) const {
    const auto modrm = byte(at);
    if (!modrm) return std::nullopt;
    const unsigned mod = *modrm >> 6;
    const unsigned rm = *modrm & 7;
    size_t length = 1;
    if (mod == 3) return length;
    if (address_bits() == 16) {
      if (mod == 1) {
        length += 1;
      } else if (mod == 2 || (mod == 0 && rm == 6)) {
        length += 2;
      }
    } else {
      if (rm == 4) {
        const auto sib = byte(at + 1);
        if (!sib) return std::nullopt;
        length += 1;
        if (mod == 0 && (*sib & 7) == 5) length += 4;
      }
      if (mod == 1) {
        length += 1;
      } else if (mod == 2 || (mod == 0 && rm == 5)) {
        length += 4;
      }
    }
    return length;
  }

  // A known instruction with a ModRM operand at `modrm_at` and `immediate` bytes after it.
  Decoded with_modrm(std::string_view mnemonic, size_t modrm_at, size_t immediate = 0) const {
    if (mnemonic.empty()) return unknown();
    const auto length = modrm_length(modrm_at);
    if (!length) return missing(modrm_at);
    return named(mnemonic, modrm_at + *length + immediate);
  }

  Decoded opcode(size_t at) const {
    const uint8_t op = bytes_[at];
    switch (op) {
      case 0xcc:
      case 0x9b: {
        // LOCK makes either #UD on hardware: not something to complete.
        if (prefixes_.lock) return named(op == 0xcc ? "int3" : "fwait", at + 1);
        Decoded decoded;
        decoded.action = op == 0xcc ? Action::kInjectBreakpoint : Action::kSkipWait;
        decoded.length = at + 1;
        decoded.mnemonic = op == 0xcc ? "int3" : "fwait";
        return decoded;
      }
      case 0xcd:
        return named("int", at + 2);
      case 0xce:
        return named("into", at + 1);
      case 0xcf:
        return named(prefixes_.rex & 0x08 ? "iretq" : "iret", at + 1);
      case 0xf1:
        return named("int1", at + 1);
      case 0xf4:
        return named("hlt", at + 1);
      case 0xfa:
        return named("cli", at + 1);
      case 0xfb:
        return named("sti", at + 1);
      case 0x0f:
        return two_byte(at + 1);
      case 0xc4:
      case 0xc5:
        return vex(at);
      default:
        break;
    }
    if (op >= 0xd8 && op <= 0xdf) return x87(op, at + 1);
    return unknown();
  }

  Decoded x87(uint8_t op, size_t modrm_at) const {
    const auto modrm = byte(modrm_at);
    if (!modrm) return missing(modrm_at);
    const unsigned reg = (*modrm >> 3) & 7;
    std::string_view name = "x87";
    if (*modrm >= 0xc0) {
      if (op == 0xdb && *modrm == 0xe2) name = "fnclex";
      if (op == 0xdb && *modrm == 0xe3) name = "fninit";
      if (op == 0xdf && *modrm == 0xe0) name = "fnstsw";
    } else if (op == 0xd9) {
      constexpr std::array<std::string_view, 8> names = {"fld",    "x87",   "fst",     "fstp",
                                                         "fldenv", "fldcw", "fnstenv", "fnstcw"};
      name = names[reg];
    } else if (op == 0xdb && reg == 0) {
      name = "fild";
    } else if (op == 0xdd) {
      constexpr std::array<std::string_view, 8> names = {"fld",    "fisttp", "fst",    "fstp",
                                                         "frstor", "x87",    "fnsave", "fnstsw"};
      name = names[reg];
    } else if (op == 0xdf && (reg == 0 || reg == 5)) {
      name = "fild";
    } else if (op == 0xdf && reg == 7) {
      name = "fistp";
    }
    return with_modrm(name, modrm_at);
  }

  Decoded two_byte(size_t at) const {
    const auto op = byte(at);
    if (!op) return missing(at);
    const size_t modrm_at = at + 1;
    switch (*op) {
      case 0x00:
        return group_by_reg(modrm_at, {"sldt", "str", "lldt", "ltr", "verr", "verw", "", ""});
      case 0x01:
        return group_0f01(modrm_at);
      case 0x02:
        return with_modrm("lar", modrm_at);
      case 0x03:
        return with_modrm("lsl", modrm_at);
      case 0x05:
        return named("syscall", modrm_at);
      case 0x06:
        return named("clts", modrm_at);
      case 0x07:
        return named("sysret", modrm_at);
      case 0x08:
        return named("invd", modrm_at);
      case 0x09:
        return named("wbinvd", modrm_at);
      case 0x0b:
        return named("ud2", modrm_at);
      case 0x30:
        return named("wrmsr", modrm_at);
      case 0x31:
        return named("rdtsc", modrm_at);
      case 0x32:
        return named("rdmsr", modrm_at);
      case 0x33:
        return named("rdpmc", modrm_at);
      case 0x38:
        return three_byte_38(at + 1);
      case 0x77:
        return named("emms", modrm_at);
      case 0xa2:
        return named("cpuid", modrm_at);
      case 0xae:
        return group_0fae(modrm_at);
      case 0xb8:
        return prefixes_.rep ? with_modrm("popcnt", modrm_at) : unknown();
      case 0xbc:
        return with_modrm(prefixes_.rep ? "tzcnt" : "bsf", modrm_at);
      case 0xbd:
        return with_modrm(prefixes_.rep ? "lzcnt" : "bsr", modrm_at);
      case 0xc7:
        return group_0fc7(modrm_at);
      case 0xef:
        return with_modrm("pxor", modrm_at);
      default:
        return unknown();
    }
  }

  Decoded group_by_reg(size_t modrm_at, const std::array<std::string_view, 8>& names) const {
    const auto modrm = byte(modrm_at);
    if (!modrm) return missing(modrm_at);
    return with_modrm(names[(*modrm >> 3) & 7], modrm_at);
  }

  Decoded group_0f01(size_t modrm_at) const {
    const auto modrm = byte(modrm_at);
    if (!modrm) return missing(modrm_at);
    const unsigned reg = (*modrm >> 3) & 7;
    if (*modrm < 0xc0) {
      return group_by_reg(modrm_at, {"sgdt", "sidt", "lgdt", "lidt", "smsw", "", "lmsw", "invlpg"});
    }
    struct Entry {
      uint8_t modrm;
      std::string_view name;
    };
    static constexpr Entry kTable[] = {
        {0xc1, "vmcall"},  {0xc2, "vmlaunch"}, {0xc3, "vmresume"}, {0xc4, "vmxoff"},
        {0xc8, "monitor"}, {0xc9, "mwait"},    {0xca, "clac"},     {0xcb, "stac"},
        {0xd0, "xgetbv"},  {0xd1, "xsetbv"},   {0xd8, "vmrun"},    {0xd9, "vmmcall"},
        {0xda, "vmload"},  {0xdb, "vmsave"},   {0xdc, "stgi"},     {0xdd, "clgi"},
        {0xde, "skinit"},  {0xdf, "invlpga"},  {0xee, "rdpkru"},   {0xef, "wrpkru"},
        {0xf8, "swapgs"},  {0xf9, "rdtscp"},   {0xfa, "monitorx"}, {0xfb, "mwaitx"},
    };
    for (const auto& entry : kTable) {
      if (entry.modrm == *modrm) return named(entry.name, modrm_at + 1);
    }
    if (reg == 4) return named("smsw", modrm_at + 1);
    if (reg == 6) return named("lmsw", modrm_at + 1);
    return unknown();
  }

  Decoded group_0fae(size_t modrm_at) const {
    const auto modrm = byte(modrm_at);
    if (!modrm) return missing(modrm_at);
    const unsigned reg = (*modrm >> 3) & 7;
    if (*modrm >= 0xc0) {
      if (prefixes_.rep) {
        constexpr std::array<std::string_view, 4> names = {"rdfsbase", "rdgsbase", "wrfsbase",
                                                           "wrgsbase"};
        return reg < 4 ? named(names[reg], modrm_at + 1) : unknown();
      }
      if (reg == 5) return named("lfence", modrm_at + 1);
      if (reg == 6) return named("mfence", modrm_at + 1);
      if (reg == 7) return named("sfence", modrm_at + 1);
      return unknown();
    }
    const bool rex_w = prefixes_.rex & 0x08;
    const std::array<std::string_view, 8> names = {
        rex_w ? "fxsave64" : "fxsave",
        rex_w ? "fxrstor64" : "fxrstor",
        "ldmxcsr",
        "stmxcsr",
        rex_w ? "xsave64" : "xsave",
        rex_w ? "xrstor64" : "xrstor",
        prefixes_.operand_size ? "clwb" : (rex_w ? "xsaveopt64" : "xsaveopt"),
        prefixes_.operand_size ? "clflushopt" : "clflush",
    };
    return with_modrm(names[reg], modrm_at);
  }

  Decoded group_0fc7(size_t modrm_at) const {
    const auto modrm = byte(modrm_at);
    if (!modrm) return missing(modrm_at);
    const unsigned reg = (*modrm >> 3) & 7;
    if (*modrm >= 0xc0) {
      if (reg == 6) return named("rdrand", modrm_at + 1);
      if (reg == 7) return named(prefixes_.rep ? "rdpid" : "rdseed", modrm_at + 1);
      return unknown();
    }
    const bool rex_w = prefixes_.rex & 0x08;
    const std::array<std::string_view, 8> names = {"",
                                                   rex_w ? "cmpxchg16b" : "cmpxchg8b",
                                                   "",
                                                   rex_w ? "xrstors64" : "xrstors",
                                                   rex_w ? "xsavec64" : "xsavec",
                                                   rex_w ? "xsaves64" : "xsaves",
                                                   "",
                                                   ""};
    return with_modrm(names[reg], modrm_at);
  }

  Decoded three_byte_38(size_t at) const {
    const auto op = byte(at);
    if (!op) return missing(at);
    if (*op == 0xf0 || *op == 0xf1) return with_modrm(prefixes_.repne ? "crc32" : "movbe", at + 1);
    if (*op == 0x82 && prefixes_.operand_size) return with_modrm("invpcid", at + 1);
    return unknown();
  }

  // VEX-encoded (BMI1/BMI2 here: andn, bzhi, ...). Outside 64-bit mode c4/c5 are LES/LDS unless
  // the next byte's top bits are set.
  Decoded vex(size_t at) const {
    const bool three_byte = bytes_[at] == 0xc4;
    const auto first = byte(at + 1);
    if (!first) return missing(at + 1);
    if (mode_ != CodeMode::k64 && *first < 0xc0) {
      return with_modrm(three_byte ? "les" : "lds", at + 1);
    }
    unsigned map = 1;
    uint8_t last = *first;
    size_t op_at = at + 2;
    if (three_byte) {
      const auto second = byte(at + 2);
      if (!second) return missing(at + 2);
      map = *first & 0x1f;
      last = *second;
      op_at = at + 3;
    }
    const unsigned pp = last & 3;
    const auto op = byte(op_at);
    if (!op) return missing(op_at);
    const size_t modrm_at = op_at + 1;
    if (map == 2) {
      switch (*op) {
        case 0xf2:
          return pp == 0 ? with_modrm("andn", modrm_at) : unknown();
        case 0xf3:
          return pp == 0 ? group_by_reg(modrm_at, {"", "blsr", "blsmsk", "blsi", "", "", "", ""})
                         : unknown();
        case 0xf5: {
          constexpr std::array<std::string_view, 4> names = {"bzhi", "", "pext", "pdep"};
          return with_modrm(names[pp], modrm_at);
        }
        case 0xf6:
          return pp == 3 ? with_modrm("mulx", modrm_at) : unknown();
        case 0xf7: {
          constexpr std::array<std::string_view, 4> names = {"bextr", "shlx", "sarx", "shrx"};
          return with_modrm(names[pp], modrm_at);
        }
        default:
          return unknown();
      }
    }
    if (map == 3 && *op == 0xf0 && pp == 3) return with_modrm("rorx", modrm_at, 1);
    return unknown();
  }

  std::span<const uint8_t> bytes_;
  CodeMode mode_;
  Prefixes prefixes_;
};

}  // namespace

Decoded decode(std::span<const uint8_t> bytes, CodeMode mode) {
  return Decoder(bytes, mode).run();
}

std::string hex_bytes(std::span<const uint8_t> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  for (uint8_t byte : bytes) {
    if (!text.empty()) text += ' ';
    text += kDigits[byte >> 4];
    text += kDigits[byte & 0xf];
  }
  return text;
}

std::string describe(std::span<const uint8_t> bytes, const Decoded& decoded) {
  const auto shown = bytes.first(std::min(bytes.size(), kMaxInstructionLength));
  if (decoded.too_long) {
    return "an instruction longer than " + std::to_string(kMaxInstructionLength) + " bytes (" +
           hex_bytes(shown) + ")";
  }
  if (decoded.mnemonic.empty()) {
    if (shown.empty()) return "an instruction whose bytes are unknown";
    return "an instruction msb does not recognize (bytes " + hex_bytes(shown) + ")";
  }
  const auto instruction =
      decoded.length > 0 && decoded.length <= shown.size() ? shown.first(decoded.length) : shown;
  return "`" + std::string(decoded.mnemonic) + "` (" + hex_bytes(instruction) + ")";
}

bool x87_exception_pending(uint16_t fsw, uint16_t fcw) {
  constexpr uint16_t kErrorSummary = 1u << 7;
  constexpr uint16_t kExceptionFlags = 0x3f;  // IE DE ZE OE UE PE, masked by the same FCW bits
  return (fsw & kErrorSummary) != 0 || (fsw & ~fcw & kExceptionFlags) != 0;
}

}  // namespace msb::vmm::emulation
