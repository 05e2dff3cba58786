// Unit tier: ACPI tables (vmm/acpi.h), checked by disassembling them with ACPICA's iasl, an
// implementation independent of ours, and by running ACPICA's power-off over them (acpiexec).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>

#include "tests/support.h"
#include "vmm/acpi.h"
#include "vmm/devices/acpi_sleep.h"
#include "vmm/io_bus.h"

namespace acpi = msb::vmm::acpi;
using msb::vmm::GuestMemory;

namespace {

constexpr uint64_t kRsdpAddress = 0xe0000;
constexpr uint64_t kTablesAddress = 0xe1000;

// One megabyte of guest memory from address 0, which covers the BIOS area the tables go to.
struct Guest {
  std::vector<std::byte> ram = std::vector<std::byte>(1 << 20);
  GuestMemory memory;
  Guest() { memory.add_region(0, ram); }

  std::vector<uint8_t> bytes(acpi::TableLocation table) const {
    auto view = memory.slice(table.address, table.length);
    REQUIRE(view);
    std::vector<uint8_t> out(view->size());
    std::memcpy(out.data(), view->data(), out.size());
    return out;
  }
};

uint8_t byte_sum(const std::vector<uint8_t>& bytes) {
  return std::accumulate(bytes.begin(), bytes.end(), uint8_t{0});
}

// Writes `bytes` to dir/name.dat, disassembles it with iasl and returns the .dsl text.
std::string disassemble(const msb::test::TempDir& dir, const std::string& name,
                        const std::vector<uint8_t>& bytes) {
  INFO("iasl comes from acpica-tools; CMake found none");
  REQUIRE(std::string(MSB_IASL) != "");
  std::filesystem::path input = dir / (name + ".dat");
  std::ofstream(input, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
  msb::test::ProcessResult result = msb::test::run_process({MSB_IASL, "-d", input.string()});
  INFO(result.out << result.err);
  REQUIRE(result.exit_code == 0);
  std::filesystem::path output = dir / (name + ".dsl");
  REQUIRE(std::filesystem::exists(output));
  return msb::test::read_text(output);
}

// Compiles dir/name.dsl (what disassemble() left) back with iasl, which checks it, predefined
// names such as _S5 included, and returns iasl's report.
std::string recompile(const msb::test::TempDir& dir, const std::string& name) {
  msb::test::ProcessResult result =
      msb::test::run_process({MSB_IASL, (dir / (name + ".dsl")).string()});
  INFO(result.out << result.err);
  CHECK(result.exit_code == 0);
  return result.out + result.err;
}

// The "[offset] Name : value" lines of a disassembled data table, in order.
using Fields = std::vector<std::pair<std::string, std::string>>;

Fields fields(const std::string& dsl) {
  static const std::regex line(R"(^\[[0-9A-F]{3}h [0-9]{4} +[0-9]+\] +(.*\S) +: (.*\S)\s*$)");
  Fields out;
  std::istringstream in(dsl);
  for (std::string text; std::getline(in, text);) {
    std::smatch match;
    if (std::regex_match(text, match, line)) out.emplace_back(match[1], match[2]);
  }
  return out;
}

// The first value of field `name`, or "" if there is none.
std::string field(const Fields& all, const std::string& name) {
  for (const auto& [n, value] : all) {
    if (n == name) return value;
  }
  return "";
}

std::vector<std::string> values(const Fields& all, const std::string& name) {
  std::vector<std::string> out;
  for (const auto& [n, value] : all) {
    if (n == name) out.push_back(value);
  }
  return out;
}

// The five fields of the Generic Address Structure `name`: space id, bit width, bit offset, access
// width, address; empty if there is no such field.
std::vector<std::string> gas(const Fields& all, const std::string& name) {
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].first != name) continue;
    REQUIRE(all[i].second == "[Generic Address Structure]");
    REQUIRE(i + 5 < all.size());
    std::vector<std::string> out;
    for (size_t j = i + 1; j <= i + 5; ++j)
      out.push_back(all[j].second);
    return out;
  }
  return {};
}

// How many braces are open at `position` of disassembled ASL: 1 is the DefinitionBlock's own, the
// root scope. (iasl's comments and strings in our tables hold no braces.)
int brace_depth(const std::string& dsl, size_t position) {
  int depth = 0;
  for (size_t i = 0; i < position; ++i)
    depth += dsl[i] == '{' ? 1 : dsl[i] == '}' ? -1 : 0;
  return depth;
}

std::string hex(uint64_t value, int digits) {
  char text[24];
  std::snprintf(text, sizeof text, "%0*llX", digits, static_cast<unsigned long long>(value));
  return text;
}

uint64_t le(const std::vector<uint8_t>& bytes, size_t offset, size_t size) {
  uint64_t value = 0;
  for (size_t i = 0; i < size; ++i)
    value |= uint64_t{bytes[offset + i]} << (8 * i);
  return value;
}

struct Disassembled {
  std::string xsdt, fadt, madt, dsdt;
};

// Writes the tables for `config`, checks what is common to every table (header, checksum, RSDP)
// and disassembles them.
Disassembled build(Guest& guest, const msb::test::TempDir& dir, const acpi::Config& config,
                   acpi::Result* result_out = nullptr) {
  acpi::Result result = acpi::write_tables(guest.memory, config, kRsdpAddress, kTablesAddress);
  if (result_out) *result_out = result;

  std::vector<uint8_t> rsdp = guest.bytes(result.rsdp);
  REQUIRE(std::string(rsdp.begin(), rsdp.begin() + 8) == "RSD PTR ");
  REQUIRE(byte_sum({rsdp.begin(), rsdp.begin() + 20}) == 0);
  REQUIRE(byte_sum(rsdp) == 0);
  REQUIRE(rsdp[15] == 2);  // revision: has an XSDT
  REQUIRE(le(rsdp, 16, 4) == 0);
  REQUIRE(le(rsdp, 20, 4) == 36);
  REQUIRE(le(rsdp, 24, 8) == result.xsdt.address);

  Disassembled out;
  const std::pair<const char*, acpi::TableLocation> tables[] = {
      {"XSDT", result.xsdt}, {"FACP", result.fadt}, {"APIC", result.madt}, {"DSDT", result.dsdt}};
  std::string* texts[] = {&out.xsdt, &out.fadt, &out.madt, &out.dsdt};
  for (size_t i = 0; i < 4; ++i) {
    auto [signature, location] = tables[i];
    INFO(signature);
    REQUIRE(location.address >= kTablesAddress);
    REQUIRE(location.address + location.length <= result.tables_end);
    std::vector<uint8_t> bytes = guest.bytes(location);
    REQUIRE(std::string(bytes.begin(), bytes.begin() + 4) == signature);
    REQUIRE(le(bytes, 4, 4) == location.length);
    REQUIRE(byte_sum(bytes) == 0);
    REQUIRE(std::string(bytes.begin() + 10, bytes.begin() + 16) == "MSB   ");
    std::string dsl = disassemble(dir, signature, bytes);
    // iasl flags a wrong checksum ("Incorrect checksum" or "Incorrect. Should be").
    REQUIRE(dsl.find("ncorrect") == std::string::npos);
    *texts[i] = dsl;
  }
  Fields xsdt = fields(out.xsdt);
  REQUIRE(field(xsdt, "Signature").starts_with("\"XSDT\""));
  REQUIRE(field(xsdt, "ACPI Table Address   0") == hex(result.fadt.address, 16));
  REQUIRE(field(xsdt, "ACPI Table Address   1") == hex(result.madt.address, 16));
  REQUIRE(field(xsdt, "ACPI Table Address   2") == "");
  REQUIRE(out.dsdt.find("DefinitionBlock (\"\", \"DSDT\", 2, \"MSB   \"") != std::string::npos);
  return out;
}

struct LocalApic {
  std::string processor_id, apic_id, flags;
};

std::vector<LocalApic> local_apics(const Fields& madt) {
  std::vector<LocalApic> out;
  for (size_t i = 0; i < madt.size(); ++i) {
    if (madt[i].first != "Subtable Type" || !madt[i].second.starts_with("00 ")) continue;
    REQUIRE(i + 4 < madt.size());
    REQUIRE(madt[i + 2].first == "Processor ID");
    REQUIRE(madt[i + 3].first == "Local Apic ID");
    REQUIRE(madt[i + 4].first == "Flags (decoded below)");
    out.push_back({madt[i + 2].second, madt[i + 3].second, madt[i + 4].second});
  }
  return out;
}

struct DsdtDevice {
  std::string name, hid, uid;
  std::string memory_base, memory_length;  // for Memory32Fixed
  std::string io_port, io_length;          // for IO
  std::vector<std::string> interrupts;     // "Interrupt (...) {n}" as "flags:n"
};

// The Devices of the disassembled DSDT; none of ours nest, so each "Device (" starts a new one.
std::vector<DsdtDevice> dsdt_devices(const std::string& dsl) {
  static const std::regex name(R"(^Device \((\w{4})\))");
  static const std::regex hid(R"re(Name \(_HID, (EisaId \("\w+"\)|"\w+"))re");
  static const std::regex uid(R"(Name \(_UID, (\w+)\))");
  static const std::regex memory(
      R"(Memory32Fixed \(ReadWrite,\s+0x([0-9A-F]+),\s+// Address Base\s+0x([0-9A-F]+),)");
  static const std::regex io(
      R"(IO \(Decode16,\s+0x([0-9A-F]+),\s+// Range Minimum\s+0x([0-9A-F]+),\s+// Range Maximum\s+0x01,\s+// Alignment\s+0x([0-9A-F]+),)");
  static const std::regex interrupt(R"(Interrupt \(([^)]*)\)\s+\{\s+0x([0-9A-F]+),\s+\})");
  std::vector<DsdtDevice> out;
  for (size_t at = dsl.find("Device ("); at != std::string::npos;) {
    size_t next = dsl.find("Device (", at + 1);
    std::string text = dsl.substr(at, next == std::string::npos ? std::string::npos : next - at);
    at = next;
    DsdtDevice device;
    std::smatch match;
    REQUIRE(std::regex_search(text, match, name));
    device.name = match[1];
    if (std::regex_search(text, match, hid)) device.hid = match[1];
    if (std::regex_search(text, match, uid)) device.uid = match[1];
    if (std::regex_search(text, match, memory)) {
      device.memory_base = match[1];
      device.memory_length = match[2];
    }
    if (std::regex_search(text, match, io)) {
      REQUIRE(match[1] == match[2]);
      device.io_port = match[1];
      device.io_length = match[3];
    }
    for (std::sregex_iterator it(text.begin(), text.end(), interrupt), end; it != end; ++it) {
      device.interrupts.push_back((*it)[1].str() + ":" + (*it)[2].str());
    }
    out.push_back(device);
  }
  return out;
}

constexpr const char* kEdgeInterrupt = "ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ";

void check_serial(const DsdtDevice& device) {
  CHECK(device.name == "COM1");
  CHECK(device.hid == "EisaId (\"PNP0501\")");
  CHECK(device.io_port == "03F8");
  CHECK(device.io_length == "08");
  REQUIRE(device.interrupts.size() == 1);
  CHECK(device.interrupts[0] == std::string(kEdgeInterrupt) + ":00000004");
}

// Devices at 0xd0000000 + 0x1000 * i with GSIs 5, 6, ... (skipping none: serial is on 4).
std::vector<acpi::VirtioMmioDevice> virtio_devices(size_t count) {
  std::vector<acpi::VirtioMmioDevice> out;
  for (uint32_t i = 0; i < count; ++i)
    out.push_back({0xd0000000 + 0x1000 * i, 0x200, 5 + i});
  return out;
}

void check_virtio(const std::vector<DsdtDevice>& devices,
                  const std::vector<acpi::VirtioMmioDevice>& expected) {
  REQUIRE(devices.size() == expected.size());
  std::set<std::string> names, uids;
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("virtio-mmio device " << i);
    const DsdtDevice& device = devices[i];
    CHECK(device.hid == "\"LNRO0005\"");
    CHECK(device.memory_base == hex(expected[i].base, 8));
    CHECK(device.memory_length == hex(expected[i].size, 8));
    REQUIRE(device.interrupts.size() == 1);
    CHECK(device.interrupts[0] == kEdgeInterrupt + (":" + hex(expected[i].gsi, 8)));
    names.insert(device.name);
    uids.insert(device.uid);
  }
  CHECK(names.size() == expected.size());
  CHECK(uids.size() == expected.size());
}

}  // namespace

TEST_CASE("acpi pkg_length encodes 1 to 4 bytes", "[acpi]") {
  using acpi::aml::pkg_length;
  using V = std::vector<uint8_t>;
  CHECK(pkg_length(0) == V{0x01});
  CHECK(pkg_length(62) == V{0x3f});                // 63 is the largest one-byte length
  CHECK(pkg_length(63) == V{0x41, 0x04});          // 65 = 0x041
  CHECK(pkg_length(300) == V{0x4e, 0x12});         // 302 = 0x12e
  CHECK(pkg_length(4093) == V{0x4f, 0xff});        // 4095, the largest two-byte length
  CHECK(pkg_length(4094) == V{0x81, 0x00, 0x01});  // 4097 = 0x1001
  CHECK(pkg_length((1 << 20) - 4) == V{0x8f, 0xff, 0xff});
  CHECK(pkg_length((1 << 20) - 3) == V{0xc1, 0x00, 0x00, 0x01});
  CHECK(pkg_length((1 << 28) - 5) == V{0xcf, 0xff, 0xff, 0xff});
  CHECK_THROWS_AS(pkg_length((1 << 28) - 4), std::length_error);
}

TEST_CASE("acpi tables for 1, 2 and 8 vCPUs without virtio devices", "[acpi]") {
  unsigned cpus = GENERATE(1u, 2u, 8u);
  INFO(cpus << " vCPUs");
  Guest guest;
  msb::test::TempDir dir;
  acpi::Config config;
  config.cpus = cpus;
  acpi::Result result;
  Disassembled tables = build(guest, dir, config, &result);

  Fields fadt = fields(tables.fadt);
  CHECK(field(fadt, "Revision") == "06");
  CHECK(field(fadt, "Flags (decoded below)") == "00100000");  // HW_REDUCED_ACPI alone
  CHECK(tables.fadt.find("Hardware Reduced (V5) : 1") != std::string::npos);
  CHECK(field(fadt, "SCI Interrupt") == "0000");
  // X_DSDT, the 64-bit field, has the same name.
  CHECK(values(fadt, "DSDT Address") ==
        std::vector<std::string>{hex(result.dsdt.address, 8), hex(result.dsdt.address, 16)});

  Fields madt = fields(tables.madt);
  CHECK(field(madt, "Local Apic Address") == "FEE00000");
  std::vector<LocalApic> apics = local_apics(madt);
  REQUIRE(apics.size() == cpus);
  for (unsigned cpu = 0; cpu < cpus; ++cpu) {
    CHECK(apics[cpu].processor_id == hex(cpu, 2));
    CHECK(apics[cpu].apic_id == hex(cpu, 2));
    CHECK(apics[cpu].flags == "00000001");  // enabled
  }
  CHECK(std::regex_search(tables.madt, std::regex(R"(Subtable Type : 01 \[I/O APIC\]\s+)"
                                                  R"([^\n]*Length : 0C\s+)"
                                                  R"([^\n]*I/O Apic ID : 00\s+)"
                                                  R"([^\n]*Reserved : 00\s+)"
                                                  R"([^\n]*Address : FEC00000\s+)"
                                                  R"([^\n]*Interrupt : 00000000)")));
  CHECK(tables.madt.find("Interrupt Source Override") == std::string::npos);

  std::vector<DsdtDevice> devices = dsdt_devices(tables.dsdt);
  REQUIRE(devices.size() == 1);
  check_serial(devices[0]);
}

TEST_CASE("acpi DSDT describes every virtio-mmio device", "[acpi]") {
  size_t count = GENERATE(1u, 3u);
  Guest guest;
  msb::test::TempDir dir;
  acpi::Config config;
  config.cpus = 2;
  config.virtio = virtio_devices(count);
  config.virtio.back().base = 0xfeb00000;  // one at the top of the 32-bit space, near the IOAPIC
  config.virtio.back().size = 0x1000;
  config.virtio.back().gsi = 23;
  config.interrupt_overrides = {{0, 2, 0}, {9, 9, 0xd}};
  Disassembled tables = build(guest, dir, config);

  std::vector<DsdtDevice> devices = dsdt_devices(tables.dsdt);
  REQUIRE(devices.size() == count + 1);
  check_serial(devices[0]);
  check_virtio({devices.begin() + 1, devices.end()}, config.virtio);

  CHECK(std::regex_search(tables.madt, std::regex(R"(Interrupt Source Override\]\s+)"
                                                  R"([^\n]*Length : 0A\s+)"
                                                  R"([^\n]*Bus : 00\s+)"
                                                  R"([^\n]*Source : 00\s+)"
                                                  R"([^\n]*Interrupt : 00000002\s+)"
                                                  R"([^\n]*Flags \(decoded below\) : 0000)")));
  CHECK(std::regex_search(tables.madt, std::regex(R"(Source : 09\s+)"
                                                  R"([^\n]*Interrupt : 00000009\s+)"
                                                  R"([^\n]*Flags \(decoded below\) : 000D)")));
}

TEST_CASE("acpi DSDT with many devices needs a multi-byte PkgLength", "[acpi]") {
  Guest guest;
  msb::test::TempDir dir;
  acpi::Config config;
  config.cpus = 254;
  config.serial = false;
  config.virtio = virtio_devices(19);  // GSIs 5..23, all the IOAPIC has left
  acpi::Result result;
  Disassembled tables = build(guest, dir, config, &result);

  // The Scope's PkgLength follows the header and ScopeOp; over 255 bytes its second byte is used.
  std::vector<uint8_t> dsdt = guest.bytes(result.dsdt);
  REQUIRE(dsdt[36] == 0x10);
  REQUIRE(dsdt.size() > 300);
  CHECK(dsdt[37] >> 6 == 1);
  // It ends where the table's last object, Name (_S5_, ...), begins (NameOp 0x08).
  const std::string text(dsdt.begin(), dsdt.end());
  const size_t s5 = text.rfind("\x08_S5_\x12");
  REQUIRE(s5 != std::string::npos);
  CHECK(size_t((dsdt[37] & 0xf) | dsdt[38] << 4) == s5 - 37);

  // iasl finding every device, the last one included, shows the lengths are right.
  std::vector<DsdtDevice> devices = dsdt_devices(tables.dsdt);
  check_virtio(devices, config.virtio);
  CHECK(devices.back().name == "V012");
  CHECK(tables.dsdt.find("PNP0501") == std::string::npos);
  CHECK(local_apics(fields(tables.madt)).size() == 254);
}

TEST_CASE("acpi tables offer power-off through the hardware-reduced sleep registers", "[acpi]") {
  bool serial = GENERATE(true, false);
  Guest guest;
  msb::test::TempDir dir;
  acpi::Config config;
  config.serial = serial;
  config.virtio = virtio_devices(2);
  Disassembled tables = build(guest, dir, config);
  INFO(tables.fadt << tables.dsdt);

  // Linux registers ACPI power-off on a hardware-reduced machine only when both registers are
  // there (acpi_sleep_state_supported) and \_S5_ evaluates to a package of integers.
  Fields fadt = fields(tables.fadt);
  CHECK(field(fadt, "Flags (decoded below)") == "00100000");  // still HW_REDUCED_ACPI alone
  CHECK(gas(fadt, "Sleep Control Register") ==
        std::vector<std::string>{"01 [SystemIO]", "08", "00", "01 [Byte Access:8]",
                                 hex(acpi::kSleepControlPort, 16)});
  CHECK(gas(fadt, "Sleep Status Register") ==
        std::vector<std::string>{"01 [SystemIO]", "08", "00", "01 [Byte Access:8]",
                                 hex(acpi::kSleepStatusPort, 16)});
  CHECK(acpi::kSleepControlPort == 0x600);
  CHECK(acpi::kSleepStatusPort == 0x601);
  // The fixed-hardware blocks stay absent.
  CHECK(gas(fadt, "PM1A Event Block") == std::vector<std::string>{"00 [SystemMemory]", "00", "00",
                                                                  "00 [Undefined/Legacy]",
                                                                  hex(0, 16)});

  const std::string type = "0x" + hex(acpi::kS5SleepType, 2);
  std::smatch match;
  REQUIRE(std::regex_search(tables.dsdt, match,
                            std::regex(R"(Name \(_S5, Package \(0x04\)[^\n]*\s+\{\s+)" + type +
                                       R"(,\s+)" + type + R"(,\s+Zero,\s+Zero\s+\}\))")));
  CHECK(brace_depth(tables.dsdt, match.position(0)) == 1);  // \_S5_, not inside \_SB
  CHECK(acpi::kS5SleepType == 5);
  // The devices are all still there, _S5 being no device.
  std::vector<DsdtDevice> devices = dsdt_devices(tables.dsdt);
  REQUIRE(devices.size() == 2 + (serial ? 1 : 0));
  if (serial) check_serial(devices[0]);
  check_virtio({devices.end() - 2, devices.end()}, config.virtio);

  // iasl compiles both back without a complaint, which checks _S5's type as a predefined name.
  for (const char* table : {"FACP", "DSDT"}) {
    INFO(table);
    const std::string report = recompile(dir, table);
    INFO(report);
    CHECK(report.find("Compilation successful. 0 Errors, 0 Warnings") != std::string::npos);
  }
}

TEST_CASE("acpi ACPICA's own S5 code powers the sleep device off", "[acpi]") {
  // acpiexec (acpica-tools, beside iasl) runs ACPICA, the ACPI core Linux is built on, over our
  // FADT and DSDT: its "sleep 5" evaluates \_S5_ and runs AcpiEnterSleepState(5), which on a
  // hardware-reduced FADT is acpi_hw_extended_sleep, as in Linux's acpi_power_off. Its port
  // writes (simulated, and logged at debug level ACPI_LV_IO) are replayed onto the device.
  Guest guest;
  msb::test::TempDir dir;
  acpi::Config config;
  config.virtio = virtio_devices(1);
  build(guest, dir, config);
  const std::string acpiexec =
      (std::filesystem::path(MSB_IASL).parent_path() / "acpiexec").string();
  INFO("acpiexec comes from acpica-tools, with iasl");
  REQUIRE(std::filesystem::exists(acpiexec));
  msb::test::ProcessResult result =
      msb::test::run_process({"/usr/bin/timeout", "60", acpiexec, "-x", "0x04000000", "-b",
                              "sleep 5", (dir / "FACP.dat").string(), (dir / "DSDT.dat").string()});
  INFO(result.out << result.err);
  REQUIRE(result.exit_code == 0);
  CHECK(result.out.find("Sleep-A: 05") != std::string::npos);
  const size_t from = result.out.find("Going to sleep (S5)");
  const size_t to = result.out.find("Prepare to return from sleep (S5)");
  REQUIRE(from != std::string::npos);
  REQUIRE(to != std::string::npos);
  REQUIRE(from < to);
  const std::string sleeping = result.out.substr(from, to - from);

  int power_offs = 0;
  msb::vmm::AcpiSleep sleep([&] { ++power_offs; });
  msb::vmm::IoBus ports;
  ports.add(msb::vmm::kAcpiSleepBase, msb::vmm::kAcpiSleepPorts, &sleep, "ACPI sleep registers");
  static const std::regex write(
      R"(Wrote: ([0-9A-F]{16}) width +([0-9]+) +to ([0-9A-F]{16}) \(SystemIO\))");
  std::vector<std::string> writes;
  for (std::sregex_iterator it(sleeping.begin(), sleeping.end(), write), end; it != end; ++it) {
    const auto& match = *it;
    writes.push_back(match[1].str().substr(14) + " to " + match[3].str().substr(12) + " width " +
                     match[2].str());
    REQUIRE(match[2] == "8");
    const std::byte value{static_cast<uint8_t>(std::stoul(match[1], nullptr, 16))};
    INFO("writes so far: " << writes.size());
    CHECK(power_offs == 0);
    CHECK(ports.write(std::stoul(match[3], nullptr, 16), std::span(&value, 1)));
  }
  // Clear WAK_STS, then SLP_TYP 5 with SLP_EN; the device powers off on the second.
  CHECK(writes == std::vector<std::string>{"80 to 0601 width 8", "34 to 0600 width 8"});
  CHECK(power_offs == 1);
}

TEST_CASE("acpi iasl notices a wrong checksum", "[acpi]") {
  // Makes sure the "no checksum complaint" checks above can fail.
  Guest guest;
  acpi::Config config;
  acpi::Result result = acpi::write_tables(guest.memory, config, kRsdpAddress, kTablesAddress);
  msb::test::TempDir dir;
  for (acpi::TableLocation table : {result.madt, result.dsdt}) {
    std::vector<uint8_t> bytes = guest.bytes(table);
    bytes[9] ^= 1;
    REQUIRE(byte_sum(bytes) != 0);
    CHECK(disassemble(dir, std::string(bytes.begin(), bytes.begin() + 4), bytes).find("ncorrect") !=
          std::string::npos);
  }
}

TEST_CASE("acpi rejects invalid configs", "[acpi]") {
  using Catch::Matchers::Contains;
  Guest guest;
  auto write = [&](const acpi::Config& config, uint64_t rsdp = kRsdpAddress,
                   uint64_t tables = kTablesAddress) {
    acpi::write_tables(guest.memory, config, rsdp, tables);
  };
  acpi::Config config;
  config.virtio = virtio_devices(2);
  REQUIRE_NOTHROW(write(config));

  acpi::Config bad = config;
  bad.cpus = 0;
  CHECK_THROWS_WITH(write(bad), Contains("vCPU count 0"));
  bad.cpus = 255;
  CHECK_THROWS_AS(write(bad), std::invalid_argument);
  CHECK_THROWS_WITH(write(bad), Contains("1..254"));

  bad = config;
  bad.virtio[1].base = bad.virtio[0].base + 0x100;  // inside device 0's 0x200 bytes
  CHECK_THROWS_AS(write(bad), std::invalid_argument);
  CHECK_THROWS_WITH(write(bad), Contains("overlaps device 0"));
  bad = config;
  bad.virtio[1].gsi = bad.virtio[0].gsi;
  CHECK_THROWS_WITH(write(bad), Contains("shares GSI 5"));
  bad = config;
  bad.virtio[0].gsi = 24;
  CHECK_THROWS_WITH(write(bad), Contains("GSI 24"));
  bad = config;
  bad.virtio[0].gsi = 4;
  CHECK_THROWS_WITH(write(bad), Contains("serial"));
  bad.serial = false;  // then GSI 4 is free
  CHECK_NOTHROW(write(bad));
  bad = config;
  bad.virtio[0].base = 0xfffff000;
  bad.virtio[0].size = 0x2000;
  CHECK_THROWS_WITH(write(bad), Contains("below 4 GiB"));
  bad.virtio[0].base = 0x100000000;
  bad.virtio[0].size = 0x1000;
  CHECK_THROWS_WITH(write(bad), Contains("below 4 GiB"));
  bad = config;
  bad.virtio[0].size = 0;
  CHECK_THROWS_WITH(write(bad), Contains("non-empty"));
  bad = config;
  bad.virtio[0].base = 0xfec00800;
  CHECK_THROWS_WITH(write(bad), Contains("interrupt controller"));
  bad = config;
  bad.virtio = virtio_devices(25);
  CHECK_THROWS_WITH(write(bad), Contains("25 virtio-mmio devices"));
  bad = config;
  bad.interrupt_overrides = {{16, 2, 0}};
  CHECK_THROWS_WITH(write(bad), Contains("ISA IRQ 16"));

  CHECK_THROWS_WITH(write(config, 0xe0008), Contains("0xe0008"));
  CHECK_THROWS_WITH(write(config, kRsdpAddress, kRsdpAddress), Contains("overlaps the tables"));
}

TEST_CASE("acpi tables that do not fit in guest memory are not written", "[acpi]") {
  using Catch::Matchers::Contains;
  Guest guest;
  acpi::Config config;
  CHECK_THROWS_WITH(acpi::write_tables(guest.memory, config, kRsdpAddress, 0xfff00),
                    Contains("does not fit in guest memory") && Contains("bytes at 0xfff"));
  CHECK_THROWS_WITH(acpi::write_tables(guest.memory, config, 0x100000, kTablesAddress),
                    Contains("RSDP (36 bytes at 0x100000)"));
  // Checked before writing: nothing was written, not even the tables that would have fit.
  CHECK(std::all_of(guest.ram.begin(), guest.ram.end(),
                    [](std::byte b) { return b == std::byte{0}; }));
}
