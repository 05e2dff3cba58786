#include "vmm/acpi.h"

#include <algorithm>
#include <array>
#include <numeric>
#include <stdexcept>
#include <string>
#include <string_view>

namespace msb::vmm::acpi {
namespace {

using Bytes = std::vector<uint8_t>;

// ACPI is little-endian; writing byte by byte keeps the code independent of the host's.
void put8(Bytes& out, uint64_t value) {
  out.push_back(static_cast<uint8_t>(value));
}
void put16(Bytes& out, uint64_t value) {
  for (int i = 0; i < 2; ++i)
    put8(out, value >> (8 * i));
}
void put32(Bytes& out, uint64_t value) {
  for (int i = 0; i < 4; ++i)
    put8(out, value >> (8 * i));
}
void put64(Bytes& out, uint64_t value) {
  for (int i = 0; i < 8; ++i)
    put8(out, value >> (8 * i));
}
void put_chars(Bytes& out, std::string_view chars) {
  for (char c : chars)
    put8(out, static_cast<uint8_t>(c));
}
void append(Bytes& out, const Bytes& more) {
  out.insert(out.end(), more.begin(), more.end());
}
void set32(Bytes& table, size_t offset, uint64_t value) {
  for (int i = 0; i < 4; ++i)
    table[offset + i] = static_cast<uint8_t>(value >> (8 * i));
}
void set64(Bytes& table, size_t offset, uint64_t value) {
  for (int i = 0; i < 8; ++i)
    table[offset + i] = static_cast<uint8_t>(value >> (8 * i));
}

// The value that makes `bytes` sum to zero modulo 256.
uint8_t checksum(const uint8_t* bytes, size_t length) {
  uint8_t sum = std::accumulate(bytes, bytes + length, uint8_t{0});
  return static_cast<uint8_t>(-sum);
}

constexpr std::string_view kOemId = "MSB   ";
constexpr std::string_view kOemTableId = "MSBVM   ";
constexpr std::string_view kCreatorId = "MSB ";
constexpr size_t kHeaderLength = 36;
constexpr size_t kChecksumOffset = 9;

// The common System Description Table header; length and checksum are filled in by finish().
Bytes sdt_header(std::string_view signature, uint8_t revision) {
  Bytes out;
  put_chars(out, signature);
  put32(out, 0);  // length
  put8(out, revision);
  put8(out, 0);  // checksum
  put_chars(out, kOemId);
  put_chars(out, kOemTableId);
  put32(out, 1);  // OEM revision
  put_chars(out, kCreatorId);
  put32(out, 1);  // creator revision
  return out;
}

Bytes finish(Bytes table) {
  set32(table, 4, table.size());
  table[kChecksumOffset] = 0;
  table[kChecksumOffset] = checksum(table.data(), table.size());
  return table;
}

// --- AML (ACPI 6.5 chapter 20) and resource descriptors (section 6.4) ---

constexpr uint8_t kZeroOp = 0x00, kOneOp = 0x01, kNameOp = 0x08, kBytePrefix = 0x0a,
                  kWordPrefix = 0x0b, kDWordPrefix = 0x0c, kStringPrefix = 0x0d,
                  kQWordPrefix = 0x0e, kScopeOp = 0x10, kBufferOp = 0x11, kPackageOp = 0x12,
                  kExtOpPrefix = 0x5b, kDeviceOp = 0x82, kRootChar = 0x5c;

// A NameSeg is exactly four characters from [A-Z0-9_], not starting with a digit.
void put_name_seg(Bytes& out, std::string_view seg) {
  if (seg.size() != 4) throw std::logic_error("AML NameSeg must be 4 characters");
  put_chars(out, seg);
}

void put_integer(Bytes& out, uint64_t value) {
  if (value == 0) {
    put8(out, kZeroOp);
  } else if (value == 1) {
    put8(out, kOneOp);
  } else if (value <= 0xff) {
    put8(out, kBytePrefix);
    put8(out, value);
  } else if (value <= 0xffff) {
    put8(out, kWordPrefix);
    put16(out, value);
  } else if (value <= 0xffffffff) {
    put8(out, kDWordPrefix);
    put32(out, value);
  } else {
    put8(out, kQWordPrefix);
    put64(out, value);
  }
}

void put_string(Bytes& out, std::string_view text) {
  put8(out, kStringPrefix);
  put_chars(out, text);
  put8(out, 0);
}

// Name(seg, object): `object` is an already encoded DataRefObject.
void put_name(Bytes& out, std::string_view seg, const Bytes& object) {
  put8(out, kNameOp);
  put_name_seg(out, seg);
  append(out, object);
}

// An opcode followed by PkgLength and `body`, the shape of Scope, Device and Buffer.
void put_package(Bytes& out, std::initializer_list<uint8_t> opcode, const Bytes& body) {
  out.insert(out.end(), opcode);
  append(out, aml::pkg_length(body.size()));
  append(out, body);
}

// The compressed EISA id form of a PNP id such as "PNP0501": three 5-bit letters, then four hex
// digits, stored big-endian in a DWord.
uint32_t eisa_id(std::string_view id) {
  auto letter = [&](int i) { return static_cast<uint32_t>(id[i] - 0x40) & 0x1f; };
  uint32_t vendor = letter(0) << 10 | letter(1) << 5 | letter(2);
  uint32_t product = std::stoul(std::string(id.substr(3, 4)), nullptr, 16);
  uint32_t big_endian = vendor << 16 | product;
  return __builtin_bswap32(big_endian);
}

// ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag.
Bytes resource_template(const Bytes& descriptors) {
  Bytes data = descriptors;
  put8(data, 0x79);  // End Tag, small item of length 1
  put8(data, 0);     // zero: "the checksum is correct" by definition
  Bytes body;
  put_integer(body, data.size());
  append(body, data);
  Bytes out;
  put_package(out, {kBufferOp}, body);
  return out;
}

// IO(Decode16, port, port, 1, length): a fixed range of I/O ports.
void put_io_descriptor(Bytes& out, uint16_t port, uint8_t length) {
  put8(out, 0x47);  // small item, type 8 (I/O port), 7 bytes
  put8(out, 1);     // decodes all 16 address bits
  put16(out, port);
  put16(out, port);
  put8(out, 1);  // alignment
  put8(out, length);
}

// Memory32Fixed(ReadWrite, base, length).
void put_memory32_fixed(Bytes& out, uint32_t base, uint32_t length) {
  put8(out, 0x86);  // large item, type 6
  put16(out, 9);
  put8(out, 1);  // read/write
  put32(out, base);
  put32(out, length);
}

// Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}. Edge, as Firecracker and Cloud
// Hypervisor declare virtio-mmio and serial interrupts: a KVM irqfd without a resample fd only
// delivers edges, and nothing would tell the VMM when to lower a level-triggered line.
void put_edge_interrupt(Bytes& out, uint32_t gsi) {
  put8(out, 0x89);  // large item, type 9 (extended interrupt)
  put16(out, 6);
  put8(out, 0b0011);  // consumer, edge; active high, exclusive, not wake capable
  put8(out, 1);       // one interrupt number follows
  put32(out, gsi);
}

// Device(seg) { Name(_HID, hid) Name(_UID, uid) Name(_CRS, ResourceTemplate() {...}) }
Bytes device(std::string_view seg, const Bytes& hid, uint64_t uid, const Bytes& resources) {
  Bytes body;
  put_name_seg(body, seg);
  put_name(body, "_HID", hid);
  Bytes uid_object;
  put_integer(uid_object, uid);
  put_name(body, "_UID", uid_object);
  put_name(body, "_CRS", resource_template(resources));
  Bytes out;
  put_package(out, {kExtOpPrefix, kDeviceOp}, body);
  return out;
}

// V000..VFFF; validate() keeps the index below 0x1000.
std::string virtio_name(size_t index) {
  const char* digits = "0123456789ABCDEF";
  return {'V', digits[(index >> 8) & 0xf], digits[(index >> 4) & 0xf], digits[index & 0xf]};
}

Bytes build_dsdt(const Config& config) {
  Bytes devices;
  if (config.serial) {
    Bytes hid;
    put_integer(hid, eisa_id("PNP0501"));
    Bytes resources;
    put_io_descriptor(resources, kSerialPort, 8);
    put_edge_interrupt(resources, kSerialIrq);
    append(devices, device("COM1", hid, 0, resources));
  }
  for (size_t i = 0; i < config.virtio.size(); ++i) {
    const VirtioMmioDevice& d = config.virtio[i];
    Bytes hid;
    put_string(hid, "LNRO0005");  // the id Linux's virtio_mmio driver matches in ACPI
    Bytes resources;
    put_memory32_fixed(resources, static_cast<uint32_t>(d.base), d.size);
    put_edge_interrupt(resources, d.gsi);
    append(devices, device(virtio_name(i), hid, i, resources));
  }
  Bytes scope_body;
  put8(scope_body, kRootChar);
  put_name_seg(scope_body, "_SB_");
  append(scope_body, devices);
  Bytes table = sdt_header("DSDT", 2);  // revision 2: 64-bit AML integers
  put_package(table, {kScopeOp}, scope_body);
  // Name (_S5, Package (4) {SLP_TYPa, SLP_TYPb, reserved, reserved}) at the root, where Linux
  // looks for \_S5_: its presence (with the FADT's sleep registers) is what makes Linux register
  // ACPI power-off. Hardware-reduced ACPI uses SLP_TYPa only; b repeats it as firmware does.
  Bytes s5;
  put8(s5, 4);                    // NumElements
  put_integer(s5, kS5SleepType);  // SLP_TYPa
  put_integer(s5, kS5SleepType);  // SLP_TYPb
  put_integer(s5, 0);             // reserved
  put_integer(s5, 0);             // reserved
  Bytes s5_package;
  put_package(s5_package, {kPackageOp}, s5);
  put_name(table, "_S5_", s5_package);
  return finish(table);
}

// Generic Address Structure, all zero: "not present", as hardware-reduced ACPI wants.
void put_null_gas(Bytes& out) {
  for (int i = 0; i < 12; ++i)
    put8(out, 0);
}

// A one-byte register in system I/O space (ACPI 6.5 section 5.2.3.2).
void put_io_byte_gas(Bytes& out, uint16_t port) {
  put8(out, 1);  // address space: system I/O
  put8(out, 8);  // register bit width
  put8(out, 0);  // bit offset
  put8(out, 1);  // access size: byte
  put64(out, port);
}

constexpr size_t kFadtDsdtOffset = 40, kFadtXDsdtOffset = 140;

Bytes build_fadt() {
  Bytes t = sdt_header("FACP", 6);
  put32(t, 0);  // FIRMWARE_CTRL: no FACS, which hardware-reduced ACPI allows
  put32(t, 0);  // DSDT, set by write_tables(), which knows where the DSDT goes
  put8(t, 0);   // reserved
  put8(t, 0);   // preferred PM profile: unspecified
  put16(t, 0);  // SCI_INT: no SCI on hardware-reduced
  // SMI_CMD through CENTURY (offsets 48..108): the fixed hardware blocks, none present.
  while (t.size() < 109)
    put8(t, 0);
  // IAPC_BOOT_ARCH: no VGA, so Linux skips probing legacy VGA memory. Leaving the 8042 bit clear
  // tells Linux there is no keyboard controller.
  constexpr uint16_t kVgaNotPresent = 1 << 2;
  put16(t, kVgaNotPresent);
  put8(t, 0);  // reserved
  constexpr uint32_t kHwReducedAcpi = 1u << 20;
  put32(t, kHwReducedAcpi);
  put_null_gas(t);  // RESET_REG
  put8(t, 0);       // RESET_VALUE
  put16(t, 0);      // ARM_BOOT_ARCH
  put8(t, 5);       // FADT minor version: ACPI 6.5
  put64(t, 0);      // X_FIRMWARE_CTRL
  put64(t, 0);      // X_DSDT, set by write_tables(), which knows where the DSDT goes
  // X_PM1a_EVT_BLK .. X_GPE1_BLK: the fixed hardware, none present.
  for (int i = 0; i < 8; ++i)
    put_null_gas(t);
  // The hardware-reduced sleep registers, without which Linux offers no ACPI power-off.
  put_io_byte_gas(t, kSleepControlPort);
  put_io_byte_gas(t, kSleepStatusPort);
  put64(t, 0);  // hypervisor vendor identity
  if (t.size() != 276) throw std::logic_error("FADT layout");
  return t;  // write_tables() fills in the DSDT addresses, then finishes it
}

Bytes build_madt(const Config& config) {
  Bytes t = sdt_header("APIC", 5);
  put32(t, config.lapic_address);
  put32(t, 0);  // flags: PCAT_COMPAT clear, promising no 8259 PICs; Linux probes for them
  for (unsigned cpu = 0; cpu < config.cpus; ++cpu) {
    put8(t, 0);  // Processor Local APIC
    put8(t, 8);
    put8(t, cpu);  // ACPI processor UID
    put8(t, cpu);  // APIC id, which is what KVM gives vCPU `cpu` by default
    put32(t, 1);   // enabled
  }
  put8(t, 1);  // I/O APIC
  put8(t, 12);
  put8(t, 0);  // IOAPIC id
  put8(t, 0);  // reserved
  put32(t, config.ioapic_address);
  put32(t, 0);  // its pins are GSIs 0..23
  for (const InterruptOverride& o : config.interrupt_overrides) {
    put8(t, 2);  // Interrupt Source Override
    put8(t, 10);
    put8(t, 0);  // bus: ISA
    put8(t, o.isa_irq);
    put32(t, o.gsi);
    put16(t, o.flags);
  }
  return finish(t);
}

Bytes build_xsdt(const std::vector<uint64_t>& tables) {
  Bytes t = sdt_header("XSDT", 1);
  for (uint64_t address : tables)
    put64(t, address);
  return finish(t);
}

Bytes build_rsdp(uint64_t xsdt_address) {
  Bytes r;
  put_chars(r, "RSD PTR ");
  put8(r, 0);  // checksum of the first 20 bytes (the ACPI 1.0 part)
  put_chars(r, kOemId);
  put8(r, 2);   // revision 2: has the XSDT address
  put32(r, 0);  // no RSDT, so the guest uses the 64-bit XSDT
  put32(r, kRsdpLength);
  put64(r, xsdt_address);
  put8(r, 0);  // extended checksum, of all 36 bytes
  for (int i = 0; i < 3; ++i)
    put8(r, 0);
  r[8] = checksum(r.data(), 20);
  r[32] = checksum(r.data(), r.size());
  return r;
}

constexpr uint64_t kFourGiB = uint64_t{1} << 32;

bool overlaps(uint64_t a, uint64_t a_size, uint64_t b, uint64_t b_size) {
  return a < b + b_size && b < a + a_size;
}

void validate(const Config& config) {
  if (config.cpus < 1 || config.cpus > 254) {
    throw std::invalid_argument("ACPI: vCPU count " + std::to_string(config.cpus) +
                                " is outside 1..254");
  }
  for (uint64_t address : {config.ioapic_address, config.lapic_address}) {
    if (address > 0xffffffff - 0xfff) {
      throw std::invalid_argument("ACPI: interrupt controller address " + hex_address(address) +
                                  " is not below 4 GiB");
    }
  }
  for (const InterruptOverride& o : config.interrupt_overrides) {
    if (o.isa_irq > 15 || o.gsi >= kIoapicPins) {
      throw std::invalid_argument("ACPI: interrupt override of ISA IRQ " +
                                  std::to_string(o.isa_irq) + " to GSI " + std::to_string(o.gsi) +
                                  " is out of range");
    }
  }
  if (config.virtio.size() > kIoapicPins) {
    throw std::invalid_argument("ACPI: " + std::to_string(config.virtio.size()) +
                                " virtio-mmio devices but only " + std::to_string(kIoapicPins) +
                                " GSIs");
  }
  for (size_t i = 0; i < config.virtio.size(); ++i) {
    const VirtioMmioDevice& d = config.virtio[i];
    std::string what =
        "ACPI: virtio-mmio device " + std::to_string(i) + " at " + hex_address(d.base);
    if (d.size == 0 || d.base > kFourGiB - d.size) {
      throw std::invalid_argument(what + " (size " + hex_address(d.size) +
                                  ") must be non-empty and lie below 4 GiB");
    }
    if (d.gsi >= kIoapicPins) {
      throw std::invalid_argument(what + " has GSI " + std::to_string(d.gsi) +
                                  ", beyond the IOAPIC's " + std::to_string(kIoapicPins) + " pins");
    }
    // Edge-triggered lines cannot be shared: the guest would miss one device's interrupt.
    if (config.serial && d.gsi == kSerialIrq) {
      throw std::invalid_argument(what + " uses GSI 4, the serial port's");
    }
    if (overlaps(d.base, d.size, config.ioapic_address, 0x1000) ||
        overlaps(d.base, d.size, config.lapic_address, 0x1000)) {
      throw std::invalid_argument(what + " overlaps an interrupt controller");
    }
    for (size_t j = 0; j < i; ++j) {
      const VirtioMmioDevice& other = config.virtio[j];
      if (overlaps(d.base, d.size, other.base, other.size)) {
        throw std::invalid_argument(what + " overlaps device " + std::to_string(j) + " at " +
                                    hex_address(other.base));
      }
      if (d.gsi == other.gsi) {
        throw std::invalid_argument(what + " shares GSI " + std::to_string(d.gsi) +
                                    " with device " + std::to_string(j));
      }
    }
  }
}

uint64_t align8(uint64_t address) {
  return (address + 7) & ~uint64_t{7};
}

}  // namespace

namespace aml {
std::vector<uint8_t> pkg_length(size_t payload) {
  // One byte holds up to 63; otherwise bits 7-6 of the lead byte count 1..3 following bytes, its
  // low nibble holds bits 0-3 and each following byte 8 more bits. The encoded length counts the
  // encoding itself, so the size of the encoding must be chosen before the value is known.
  if (payload + 1 <= 63) return {static_cast<uint8_t>(payload + 1)};
  for (size_t extra = 1; extra <= 3; ++extra) {
    size_t total = payload + 1 + extra;
    if (total >= size_t{1} << (4 + 8 * extra)) continue;
    std::vector<uint8_t> out{static_cast<uint8_t>(extra << 6 | (total & 0xf))};
    for (size_t i = 0; i < extra; ++i)
      out.push_back(static_cast<uint8_t>(total >> (4 + 8 * i)));
    return out;
  }
  throw std::length_error("AML package of " + std::to_string(payload) + " bytes is too long");
}
}  // namespace aml

Result write_tables(const GuestMemory& memory, const Config& config, uint64_t rsdp_address,
                    uint64_t tables_address) {
  validate(config);
  if (rsdp_address % 16 != 0) {
    throw std::invalid_argument("ACPI: RSDP address " + hex_address(rsdp_address) +
                                " is not 16-byte aligned");
  }
  // The tables take a few KiB; this keeps every address computation below from wrapping around.
  if (tables_address > UINT64_MAX - (uint64_t{1} << 20) || rsdp_address > UINT64_MAX - 4096) {
    throw std::invalid_argument("ACPI: tables at " + hex_address(tables_address) +
                                " would wrap around");
  }

  Result result;
  Bytes dsdt = build_dsdt(config);
  result.dsdt = {tables_address, static_cast<uint32_t>(dsdt.size())};
  Bytes fadt = build_fadt();
  result.fadt = {align8(result.dsdt.address + dsdt.size()), static_cast<uint32_t>(fadt.size())};
  // Linux takes X_DSDT when it is set; DSDT is for guests that only read the 32-bit field.
  if (result.dsdt.address <= 0xffffffff) set32(fadt, kFadtDsdtOffset, result.dsdt.address);
  set64(fadt, kFadtXDsdtOffset, result.dsdt.address);
  fadt = finish(fadt);
  Bytes madt = build_madt(config);
  result.madt = {align8(result.fadt.address + fadt.size()), static_cast<uint32_t>(madt.size())};
  Bytes xsdt = build_xsdt({result.fadt.address, result.madt.address});
  result.xsdt = {align8(result.madt.address + madt.size()), static_cast<uint32_t>(xsdt.size())};
  result.tables_end = result.xsdt.address + xsdt.size();
  Bytes rsdp = build_rsdp(result.xsdt.address);
  result.rsdp = {rsdp_address, kRsdpLength};

  if (overlaps(rsdp_address, kRsdpLength, tables_address, result.tables_end - tables_address)) {
    throw std::invalid_argument("ACPI: RSDP at " + hex_address(rsdp_address) +
                                " overlaps the tables at " + hex_address(tables_address));
  }
  struct Write {
    const char* name;
    uint64_t address;
    const Bytes* bytes;
  };
  const std::array<Write, 5> writes{{{"RSDP", rsdp_address, &rsdp},
                                     {"DSDT", result.dsdt.address, &dsdt},
                                     {"FADT", result.fadt.address, &fadt},
                                     {"MADT", result.madt.address, &madt},
                                     {"XSDT", result.xsdt.address, &xsdt}}};
  // Check every destination before writing anything, so that a failure leaves memory untouched.
  for (const Write& w : writes) {
    if (!memory.slice(w.address, w.bytes->size())) {
      throw std::invalid_argument(std::string("ACPI: ") + w.name + " (" +
                                  std::to_string(w.bytes->size()) + " bytes at " +
                                  hex_address(w.address) + ") does not fit in guest memory");
    }
  }
  for (const Write& w : writes)
    memory.write(w.address, std::as_bytes(std::span(*w.bytes)));
  return result;
}

}  // namespace msb::vmm::acpi
