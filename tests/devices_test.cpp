// Unit tier: the VMM's devices without KVM. The port devices are driven through their register
// interface; the virtio devices through the virtio-mmio transport by a test driver
// (virtio_test_driver.h) against fake guest memory, with the event loop pumped by hand.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <thread>

#include "snapstore/file_util.h"
#include "tests/support.h"
#include "tests/virtio_test_driver.h"
#include "vmm/devices/acpi_sleep.h"
#include "vmm/devices/i8042.h"
#include "vmm/devices/serial.h"
#include "vmm/disk_overlay.h"
#include "vmm/event_loop.h"
#include "vmm/interrupt.h"
#include "vmm/io_bus.h"
#include "vmm/virtio/block.h"
#include "vmm/virtio/console.h"
#include "vmm/virtio/mmio.h"
#include "vmm/virtio/rng.h"

using namespace msb;
using namespace msb::vmm;
using namespace msb::vmm::virtio;
using msb::test::Buffer;
using msb::test::FakeVirtioHost;
using msb::test::pump;
using msb::test::TempDir;
using msb::test::VirtioDriver;

namespace {

uint8_t port_read(BusDevice& device, uint64_t offset) {
  std::byte value{0xee};
  device.read(offset, std::span(&value, 1));
  return std::to_integer<uint8_t>(value);
}
void port_write(BusDevice& device, uint64_t offset, uint8_t value) {
  const std::byte byte{value};
  device.write(offset, std::span(&byte, 1));
}

std::vector<std::byte> bytes_of(std::string_view text) {
  const auto* data = reinterpret_cast<const std::byte*>(text.data());
  return {data, data + text.size()};
}
std::string text_of(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// FNV-1a over a file: "the base image is unchanged".
uint64_t file_hash(const std::filesystem::path& path) {
  std::string contents = snapstore::read_file(path);
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char c : contents)
    hash = (hash ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return hash;
}

// A bus device that records accesses.
struct Recorder : BusDevice {
  uint64_t last_offset = ~0ull;
  size_t last_size = 0;
  uint8_t last_value = 0;
  void read(uint64_t offset, std::span<std::byte> data) override {
    last_offset = offset;
    last_size = data.size();
    std::memset(data.data(), 0x5a, data.size());
  }
  void write(uint64_t offset, std::span<const std::byte> data) override {
    last_offset = offset;
    last_size = data.size();
    last_value = std::to_integer<uint8_t>(data[0]);
  }
};

}  // namespace

TEST_CASE("io bus dispatches by range and refuses overlaps", "[devices]") {
  IoBus bus;
  Recorder a, b;
  bus.add(0x3f8, 8, &a, "serial");
  bus.add(0x60, 5, &b, "i8042");
  CHECK_THROWS_WITH(bus.add(0x3fc, 8, &b, "other"), Catch::Contains("overlaps serial"));
  CHECK_THROWS_WITH(bus.add(0x3f0, 9, &b, "other"), Catch::Contains("overlaps serial"));
  CHECK_THROWS_AS(bus.add(0x1000, 0, &b, "empty"), std::invalid_argument);
  CHECK_THROWS_AS(bus.add(~0ull - 1, 4, &b, "wraps"), std::invalid_argument);
  bus.add(0x400, 4, &b, "adjacent");  // right after serial's range ends: no overlap

  std::byte data[4];
  REQUIRE(bus.read(0x3fd, std::span(data, 1)));
  CHECK(a.last_offset == 5);
  CHECK(data[0] == std::byte{0x5a});
  const std::byte value{0x42};
  REQUIRE(bus.write(0x64, std::span(&value, 1)));
  CHECK(b.last_offset == 4);
  CHECK(b.last_value == 0x42);
  // Accesses outside every range, or running past the end of one, reach nobody.
  CHECK_FALSE(bus.read(0x3f7, std::span(data, 1)));
  CHECK_FALSE(bus.read(0x3fe, std::span(data, 4)));
  CHECK_FALSE(bus.write(0x65, std::span(&value, 1)));
  CHECK_FALSE(bus.read(0, std::span(data, 1)));
}

TEST_CASE("interrupt counts triggers", "[devices]") {
  Interrupt interrupt;
  CHECK(interrupt.take_count() == 0);
  interrupt.trigger();
  interrupt.trigger();
  CHECK(interrupt.take_count() == 2);
  CHECK(interrupt.take_count() == 0);
}

TEST_CASE("event loop runs handlers and stops from another thread", "[devices]") {
  EventLoop loop;
  snapstore::UniqueFd event(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  int calls = 0;
  loop.add(event.get(), EPOLLIN, [&](uint32_t events) {
    CHECK((events & EPOLLIN) != 0);
    uint64_t value;
    CHECK(::read(event.get(), &value, sizeof value) == 8);
    ++calls;
  });
  CHECK(loop.run_once(0) == 0);
  uint64_t one = 1;
  REQUIRE(::write(event.get(), &one, sizeof one) == 8);
  CHECK(loop.run_once(1000) == 1);
  CHECK(calls == 1);
  // Not watched: no events reach the handler.
  loop.modify(event.get(), 0);
  REQUIRE(::write(event.get(), &one, sizeof one) == 8);
  CHECK(loop.run_once(0) == 0);
  loop.remove(event.get());
  CHECK(loop.run_once(0) == 0);
  CHECK_THROWS_AS(loop.add(-1, EPOLLIN, [](uint32_t) {}), std::system_error);

  std::atomic<bool> returned = false;
  std::thread runner([&] {
    loop.run();
    returned = true;
  });
  loop.stop();
  runner.join();
  CHECK(returned);
}

TEST_CASE("the console log stops at its size limit, saying so", "[devices]") {
  TempDir dir;
  const auto path = dir / "console.log";
  snapstore::UniqueFd log(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644));
  Interrupt irq;
  Serial serial(log.get(), irq, 10);
  for (char c : std::string("0123456789abcdef"))
    port_write(serial, 0, static_cast<uint8_t>(c));
  const std::string text = msb::test::read_text(path);
  REQUIRE(text.rfind("0123456789\nmsb: the console log reached its size limit", 0) == 0);
  REQUIRE(text.find("abcdef") == std::string::npos);
  REQUIRE_FALSE(serial.sink_error().empty());
}

TEST_CASE("serial registers, loopback and the THR-empty interrupt", "[devices]") {
  TempDir dir;
  snapstore::UniqueFd log(
      ::open((dir / "console.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644));
  Interrupt irq;
  Serial serial(log.get(), irq);

  // Transmitter always empty, nothing received, no interrupt pending.
  CHECK(port_read(serial, 5) == 0x60);
  CHECK(port_read(serial, 2) == 0x01);
  // Scratch register and divisor latch.
  port_write(serial, 7, 0xa5);
  CHECK(port_read(serial, 7) == 0xa5);
  port_write(serial, 3, 0x83);  // DLAB, 8N1
  port_write(serial, 0, 0x01);
  port_write(serial, 1, 0x00);
  CHECK(port_read(serial, 0) == 0x01);
  port_write(serial, 3, 0x03);
  CHECK(port_read(serial, 1) == 0x00);  // IER, not DLM
  // FIFO enable shows in IIR's top bits, as on a 16550A.
  port_write(serial, 2, 0x07);
  CHECK(port_read(serial, 2) == 0xc1);

  // Output goes to the log; no interrupt while IER does not enable it.
  for (char c : std::string("hello\n"))
    port_write(serial, 0, static_cast<uint8_t>(c));
  CHECK(irq.take_count() == 0);
  CHECK(test::read_text(dir / "console.log") == "hello\n");

  // Enabling the THR-empty interrupt raises it at once; identifying it clears it.
  port_write(serial, 1, 0x02);
  CHECK(irq.take_count() == 1);
  CHECK((port_read(serial, 2) & 0x0f) == 0x02);
  CHECK((port_read(serial, 2) & 0x0f) == 0x01);
  // Each byte written raises it again.
  port_write(serial, 0, 'x');
  CHECK(irq.take_count() == 1);
  CHECK((port_read(serial, 2) & 0x0f) == 0x02);
  // Bytes written while the interrupt is still pending raise no new edge.
  port_write(serial, 0, '1');
  port_write(serial, 0, '2');
  CHECK(irq.take_count() == 1);
  CHECK((port_read(serial, 2) & 0x0f) == 0x02);
  port_write(serial, 1, 0x00);
  port_write(serial, 0, 'y');
  CHECK(irq.take_count() == 0);
  CHECK((port_read(serial, 2) & 0x0f) == 0x01);

  // Loopback: Linux's probe writes MCR = LOOP | OUT2 | RTS and expects MSR's top nibble 0x90.
  port_write(serial, 4, 0x1a);
  CHECK((port_read(serial, 6) & 0xf0) == 0x90);
  port_write(serial, 4, 0x1f);
  CHECK((port_read(serial, 6) & 0xf0) == 0xf0);
  port_write(serial, 0, 'L');
  CHECK((port_read(serial, 5) & 0x01) == 0x01);  // data ready
  CHECK(port_read(serial, 0) == 'L');
  CHECK((port_read(serial, 5) & 0x01) == 0x00);
  port_write(serial, 4, 0x08);
  CHECK((port_read(serial, 6) & 0xf0) == 0xb0);  // DCD, DSR, CTS outside loopback
  CHECK(test::read_text(dir / "console.log") == "hello\nx12y");

  // Input (the later console hook) raises the data interrupt when enabled.
  port_write(serial, 1, 0x01);
  const uint8_t input[] = {'i'};
  serial.receive(input);
  CHECK(irq.take_count() == 1);
  CHECK((port_read(serial, 2) & 0x0f) == 0x04);
  CHECK(port_read(serial, 0) == 'i');
  CHECK(serial.save().receive.empty());
}

TEST_CASE("serial survives a sink that fails", "[devices]") {
  snapstore::UniqueFd read_only(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  Interrupt irq;
  Serial serial(read_only.get(), irq);
  port_write(serial, 0, 'a');
  port_write(serial, 0, 'b');
  CHECK_THAT(serial.sink_error(), Catch::Contains("console log"));
  CHECK(port_read(serial, 5) == 0x60);
}

TEST_CASE("i8042 answers the probe and reports reset", "[devices]") {
  int resets = 0;
  I8042 controller([&] { ++resets; });
  CHECK((port_read(controller, 4) & 0x01) == 0);  // output buffer empty: the flush ends at once
  port_write(controller, 4, 0x20);                // read control byte
  CHECK((port_read(controller, 4) & 0x01) == 1);
  CHECK(port_read(controller, 0) == 0x05);
  CHECK((port_read(controller, 4) & 0x01) == 0);
  port_write(controller, 4, 0x60);  // write control byte
  port_write(controller, 0, 0x47);
  port_write(controller, 4, 0x20);
  CHECK(port_read(controller, 0) == 0x47);
  port_write(controller, 4, 0xaa);
  CHECK(port_read(controller, 0) == 0x55);
  CHECK(resets == 0);
  port_write(controller, 4, 0xfe);
  CHECK(resets == 1);
}

TEST_CASE("acpi sleep registers power off on S5 with SLP_EN only", "[devices]") {
  int power_offs = 0;
  AcpiSleep sleep([&] { ++power_offs; });
  // What Linux's acpi_hw_extended_sleep writes for the DSDT's \_S5_ (SLP_TYP 5).
  constexpr uint8_t kLinuxS5 = (5 << 2 & 0x1c) | 0x20;
  CHECK(AcpiSleep::kPowerOff == kLinuxS5);
  CHECK(kAcpiSleepBase == 0x600);

  // Both registers read as zero: SLP_EN is write-only and WAK_STS is never set.
  CHECK(port_read(sleep, 0) == 0);
  CHECK(port_read(sleep, 1) == 0);
  std::byte wide[2]{std::byte{0xee}, std::byte{0xee}};
  sleep.read(0, wide);
  CHECK((wide[0] == std::byte{0} && wide[1] == std::byte{0}));

  // Linux clears WAK_STS first: nothing happens, and the status still reads zero.
  port_write(sleep, 1, AcpiSleep::kWakeStatus);
  CHECK(port_read(sleep, 1) == 0);
  // Every other sleep type, with or without SLP_EN, is ignored; so is S5 without SLP_EN.
  for (uint8_t type = 0; type < 8; ++type) {
    INFO("SLP_TYP " << int(type));
    if (type != 5) port_write(sleep, 0, uint8_t(type << 2 | 0x20));
    port_write(sleep, 0, uint8_t(type << 2));
  }
  port_write(sleep, 0, 0x20);  // SLP_EN alone is SLP_TYP 0
  port_write(sleep, 0, 0xff & ~0x20);
  // The power-off value anywhere but a one-byte write to the control register is ignored.
  port_write(sleep, 1, kLinuxS5);
  const std::byte word[2]{std::byte{kLinuxS5}, std::byte{0}};
  sleep.write(0, word);
  const std::byte dword[4]{std::byte{kLinuxS5}, std::byte{0}, std::byte{0}, std::byte{0}};
  sleep.write(0, dword);
  sleep.write(0, std::span<const std::byte>());
  CHECK(power_offs == 0);

  port_write(sleep, 0, kLinuxS5);
  CHECK(power_offs == 1);
  // The reserved bits (7:6, 1:0) do not matter.
  port_write(sleep, 0, kLinuxS5 | 0xc3);
  CHECK(power_offs == 2);

  // On the port bus where the machine puts it, at the ports the FADT names.
  IoBus bus;
  bus.add(kAcpiSleepBase, kAcpiSleepPorts, &sleep, "ACPI sleep registers");
  std::byte value{0xee};
  REQUIRE(bus.read(0x601, std::span(&value, 1)));
  CHECK(value == std::byte{0});
  const std::byte s5{kLinuxS5};
  REQUIRE(bus.write(0x601, std::span(&s5, 1)));
  CHECK(power_offs == 2);
  REQUIRE(bus.write(0x600, std::span(&s5, 1)));
  CHECK(power_offs == 3);
  CHECK_FALSE(bus.write(0x602, std::span(&s5, 1)));
}

TEST_CASE_METHOD(FakeVirtioHost, "virtio-mmio identifies itself and negotiates features",
                 "[devices][virtio]") {
  VirtioMmioTransport transport(std::make_unique<VirtioRng>(), guest.memory, loop, irq);
  VirtioDriver driver(transport, guest);

  CHECK(driver.read32(0x000) == 0x74726976);
  CHECK(driver.read32(0x004) == 2);
  CHECK(driver.read32(0x008) == kDeviceIdRng);
  CHECK(driver.read32(0x00c) == kMmioVendorId);
  const uint64_t features = driver.device_features();
  CHECK((features & kFeatureVersion1) != 0);
  CHECK((features & kFeatureRingEventIdx) != 0);
  CHECK((features & kFeatureRingIndirectDesc) != 0);
  // A register read that is not 32 bits wide reads zero.
  std::byte narrow[2] = {std::byte{1}, std::byte{1}};
  transport.read(0, narrow);
  CHECK(narrow[0] == std::byte{0});

  // A legacy driver (no VERSION_1) and one asking for unoffered features are refused.
  CHECK_FALSE(driver.negotiate(0));
  CHECK_FALSE(driver.negotiate(kFeatureVersion1 | (1ull << 40)));
  // DRIVER_OK without FEATURES_OK does not activate.
  driver.driver_ok();
  CHECK((driver.read32(0x70) & kStatusDriverOk) == 0);
  REQUIRE(driver.negotiate(kFeatureVersion1));

  // Queue setup: one queue; sizes must be powers of two within the maximum; rings must lie in
  // guest memory.
  CHECK(driver.count_queues() == 1);
  driver.write32(0x30, 0);
  CHECK(driver.read32(0x34) == VirtioRng::kQueueSize);
  driver.write32(0x38, 100);   // not a power of two: ignored
  driver.write32(0x80, 0x10);  // outside guest memory
  driver.write32(0x44, 1);
  CHECK(driver.read32(0x44) == 0);
  REQUIRE(driver.setup_queue(0, 16));
  driver.driver_ok();
  CHECK((driver.read32(0x70) & kStatusDriverOk) != 0);
  // After DRIVER_OK queue configuration is frozen.
  driver.write32(0x44, 0);
  CHECK(driver.read32(0x44) == 1);

  // Reset clears everything.
  driver.write32(0x70, 0);
  CHECK(driver.read32(0x70) == 0);
  CHECK(driver.read32(0x44) == 0);

  // Notification eventfds, for KVM's ioeventfd.
  auto notify = transport.notify_eventfds();
  REQUIRE(notify.size() == 1);
  CHECK(notify[0].offset == 0x50);
  CHECK(notify[0].datamatch == 0);
  CHECK(notify[0].fd >= 0);
}

TEST_CASE_METHOD(FakeVirtioHost, "virtio-rng fills buffers", "[devices][virtio]") {
  VirtioMmioTransport transport(std::make_unique<VirtioRng>(), guest.memory, loop, irq);
  VirtioDriver driver(transport, guest);
  driver.init();
  const uint64_t buffer = driver.alloc(256);
  const uint64_t huge = driver.alloc(VirtioRng::kMaxBytesPerRequest * 2);
  const uint16_t head = driver.post(0, {{buffer, 256, true}});
  driver.post(0, {{huge, VirtioRng::kMaxBytesPerRequest * 2, true}});
  driver.notify(0);
  pump(loop);
  auto used = driver.take_used(0);
  REQUIRE(used);
  CHECK(used->id == head);
  CHECK(used->len == 256);
  auto bytes = driver.read_bytes(buffer, 256);
  CHECK(std::count(bytes.begin(), bytes.end(), std::byte{0}) < 32);
  used = driver.take_used(0);
  REQUIRE(used);
  CHECK(used->len == VirtioRng::kMaxBytesPerRequest);  // capped
  CHECK(irq.take_count() >= 1);
  CHECK((driver.read32(0x60) & kInterruptUsedBuffer) != 0);
  driver.write32(0x64, kInterruptUsedBuffer);
  CHECK(driver.read32(0x60) == 0);
}

namespace {

// A virtio-blk request through the test driver; returns the status byte and the used length.
struct BlockResult {
  uint8_t status;
  uint32_t used_len;
};

struct BlockRig : FakeVirtioHost {
  std::unique_ptr<VirtioMmioTransport> transport;
  std::unique_ptr<VirtioDriver> driver;

  explicit BlockRig(std::unique_ptr<DiskOverlay> disk) {
    transport = std::make_unique<VirtioMmioTransport>(
        std::make_unique<VirtioBlock>(std::move(disk)), guest.memory, loop, irq);
    driver = std::make_unique<VirtioDriver>(*transport, guest);
    driver->init();
  }

  BlockResult request(uint32_t type, uint64_t sector, std::vector<Buffer> data) {
    const uint64_t header = driver->alloc(16);
    const uint64_t status = driver->alloc(1);
    BlockRequestHeader value{type, 0, sector};
    driver->write_bytes(header, std::as_bytes(std::span(&value, 1)));
    guest.at(status)[0] = std::byte{0xff};
    std::vector<Buffer> chain{{header, 16, false}};
    chain.insert(chain.end(), data.begin(), data.end());
    chain.push_back({status, 1, true});
    driver->post(0, chain);
    driver->notify(0);
    pump(loop);
    auto used = driver->take_used(0);
    REQUIRE(used);
    return {std::to_integer<uint8_t>(guest.at(status)[0]), used->len};
  }
  uint64_t config64(uint64_t offset) {
    return driver->read32(0x100 + offset) | (uint64_t{driver->read32(0x104 + offset)} << 32);
  }
  VirtioBlock& block() { return static_cast<VirtioBlock&>(transport->device()); }
};

}  // namespace

TEST_CASE("virtio-blk reads, writes and flushes over an overlay", "[devices][virtio]") {
  TempDir dir;
  const auto base_data = test::make_data(7, 64 * 1024);
  test::write_text(dir / "base.img", text_of(base_data));
  const uint64_t base_hash = file_hash(dir / "base.img");

  {
    BlockRig rig(DiskOverlay::open(dir / "base.img", dir / "overlay"));
    const uint64_t features = rig.driver->device_features();
    CHECK((features & kBlockFeatureFlush) != 0);
    CHECK((features & kBlockFeatureSegMax) != 0);
    CHECK(rig.config64(0) == 128);  // capacity in sectors
    CHECK(rig.driver->read32(0x100 + 12) == VirtioBlock::kQueueSize - 2);
    CHECK(rig.driver->read32(0x100 + 20) == 512);

    // Read sectors 3-5 (split over two buffers) from the base.
    const uint64_t a = rig.driver->alloc(512), b = rig.driver->alloc(1024);
    auto result = rig.request(kBlockTypeIn, 3, {{a, 512, true}, {b, 1024, true}});
    CHECK(result.status == kBlockStatusOk);
    CHECK(result.used_len == 1536 + 1);
    CHECK(rig.driver->read_bytes(a, 512) ==
          std::vector<std::byte>(base_data.begin() + 1536, base_data.begin() + 2048));
    CHECK(rig.driver->read_bytes(b, 1024) ==
          std::vector<std::byte>(base_data.begin() + 2048, base_data.begin() + 3072));

    // Write one sector in the middle of a 4 KiB block: the rest of the block is the base's.
    const uint64_t w = rig.driver->alloc(512);
    std::vector<std::byte> sector(512, std::byte{0xab});
    rig.driver->write_bytes(w, sector);
    result = rig.request(kBlockTypeOut, 9, {{w, 512, false}});
    CHECK(result.status == kBlockStatusOk);
    CHECK(result.used_len == 1);
    const uint64_t r = rig.driver->alloc(4096);
    result = rig.request(kBlockTypeIn, 8, {{r, 4096, true}});
    REQUIRE(result.status == kBlockStatusOk);
    auto expected = std::vector<std::byte>(base_data.begin() + 4096, base_data.begin() + 8192);
    std::fill(expected.begin() + 512, expected.begin() + 1024, std::byte{0xab});
    CHECK(rig.driver->read_bytes(r, 4096) == expected);
    CHECK(rig.block().disk().written_blocks() == std::vector<uint64_t>{1});

    CHECK(rig.request(kBlockTypeFlush, 0, {}).status == kBlockStatusOk);

    // Out of range, partly out of range, not whole sectors: IOERR.
    const uint64_t o = rig.driver->alloc(1024);
    CHECK(rig.request(kBlockTypeIn, 128, {{o, 512, true}}).status == kBlockStatusIoErr);
    CHECK(rig.request(kBlockTypeOut, 127, {{o, 1024, false}}).status == kBlockStatusIoErr);
    CHECK(rig.request(kBlockTypeIn, ~0ull, {{o, 512, true}}).status == kBlockStatusIoErr);
    CHECK(rig.request(kBlockTypeIn, 0, {{o, 100, true}}).status == kBlockStatusIoErr);
    CHECK(rig.request(kBlockTypeIn, 127, {{o, 512, true}}).status == kBlockStatusOk);

    // GET_ID and an unknown type.
    const uint64_t id = rig.driver->alloc(20);
    result = rig.request(kBlockTypeGetId, 0, {{id, 20, true}});
    CHECK(result.status == kBlockStatusOk);
    CHECK(result.used_len == 21);
    auto id_bytes = rig.driver->read_bytes(id, 20);
    CHECK(text_of(id_bytes).substr(0, 4) == std::string("msb\0", 4));
    CHECK(rig.request(99, 0, {}).status == kBlockStatusUnsupported);
  }
  CHECK(file_hash(dir / "base.img") == base_hash);

  // Reopening the overlay continues it.
  BlockRig again(DiskOverlay::open(dir / "base.img", dir / "overlay"));
  const uint64_t r = again.driver->alloc(1024);
  REQUIRE(again.request(kBlockTypeIn, 8, {{r, 1024, true}}).status == kBlockStatusOk);
  auto got = again.driver->read_bytes(r, 1024);
  CHECK(std::equal(got.begin(), got.begin() + 512, base_data.begin() + 4096));
  CHECK(
      std::all_of(got.begin() + 512, got.end(), [](std::byte b) { return b == std::byte{0xab}; }));
  CHECK(file_hash(dir / "base.img") == base_hash);
}

TEST_CASE("disk overlay copies up, persists its map and checks sizes", "[devices]") {
  TempDir dir;
  // A base whose size is not a multiple of 512: the disk rounds up and reads zeros past the end.
  const auto base_data = test::make_data(3, 3 * 4096 + 100);
  test::write_text(dir / "base", text_of(base_data));
  const uint64_t base_hash = file_hash(dir / "base");
  {
    auto disk = DiskOverlay::open(dir / "base", dir / "over");
    CHECK(disk->size() == 3 * 4096 + 512);
    std::vector<std::byte> tail(512);
    disk->read(3 * 4096, tail);
    CHECK(std::equal(tail.begin(), tail.begin() + 100, base_data.begin() + 3 * 4096));
    CHECK(
        std::all_of(tail.begin() + 100, tail.end(), [](std::byte b) { return b == std::byte{0}; }));

    // A write spanning blocks 0-2 partially at both ends.
    std::vector<std::byte> data(9000, std::byte{0x11});
    disk->write(1000, data);
    CHECK(disk->written_blocks() == std::vector<uint64_t>{0, 1, 2});
    std::vector<std::byte> all(disk->size());
    disk->read(0, all);
    auto expected = base_data;
    expected.resize(disk->size());
    std::fill(expected.begin() + 1000, expected.begin() + 10000, std::byte{0x11});
    CHECK(all == expected);
    CHECK_THROWS_WITH(disk->read(disk->size() - 10, std::span(all.data(), 20)),
                      Catch::Contains("past the disk's end"));
    CHECK_THROWS_AS(disk->write(~0ull - 5, std::span<const std::byte>(all.data(), 10)), DiskError);
    disk->flush();
  }
  CHECK(file_hash(dir / "base") == base_hash);
  {
    auto disk = DiskOverlay::open(dir / "base", dir / "over");
    CHECK(disk->written_blocks() == std::vector<uint64_t>{0, 1, 2});
    std::vector<std::byte> part(10);
    disk->read(995, part);
    CHECK(std::equal(part.begin(), part.begin() + 5, base_data.begin() + 995));
    CHECK(part[5] == std::byte{0x11});
  }
  // A blank disk reads zeros; a size that does not match the overlay's map is an error naming it.
  {
    auto blank = DiskOverlay::open("", dir / "blank", 1 << 20);
    std::vector<std::byte> data(8192, std::byte{1});
    blank->read(4096, data);
    CHECK(std::all_of(data.begin(), data.end(), [](std::byte b) { return b == std::byte{0}; }));
    blank->write(4096 + 10, std::span(data.data(), 10));
    CHECK(blank->written_blocks() == std::vector<uint64_t>{1});
  }
  CHECK_THROWS_WITH(DiskOverlay::open("", dir / "blank", 2 << 20),
                    Catch::Contains("blank.map") && Catch::Contains("not 2097152"));
  CHECK_THROWS_WITH(DiskOverlay::open(dir / "missing", dir / "x"), Catch::Contains("missing"));
  CHECK_THROWS_WITH(DiskOverlay::open("", dir / "y", 0), Catch::Contains("empty"));
}

namespace {

struct ConsoleRig : FakeVirtioHost {
  snapstore::UniqueFd host, vmm_end;
  std::unique_ptr<VirtioMmioTransport> transport;
  std::unique_ptr<VirtioDriver> driver;

  ConsoleRig() {
    int fds[2];
    REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    host.reset(fds[0]);
    vmm_end.reset(fds[1]);
    transport = std::make_unique<VirtioMmioTransport>(
        std::make_unique<VirtioConsole>(vmm_end.get(), loop), guest.memory, loop, irq);
    driver = std::make_unique<VirtioDriver>(*transport, guest);
    driver->init(256);
  }
  // Bytes waiting in the host end's receive buffer.
  std::string host_read_available() {
    std::string out;
    char buffer[65536];
    for (;;) {
      ssize_t got = recv(host.get(), buffer, sizeof buffer, MSG_DONTWAIT);
      if (got <= 0) return out;
      out.append(buffer, static_cast<size_t>(got));
    }
  }
};

}  // namespace

TEST_CASE("virtio-console carries bytes both ways", "[devices][virtio]") {
  ConsoleRig rig;
  auto& driver = *rig.driver;
  CHECK(driver.read32(0x008) == kDeviceIdConsole);
  CHECK(driver.count_queues() == 2);

  // Host -> guest: nothing is read from the socket until the guest posts a buffer.
  REQUIRE(send(rig.host.get(), "ping", 4, 0) == 4);
  pump(rig.loop);
  CHECK_FALSE(driver.take_used(0));
  const uint64_t rx = driver.alloc(64);
  driver.post(0, {{rx, 64, true}});
  driver.notify(0);
  pump(rig.loop);
  auto used = driver.take_used(0);
  REQUIRE(used);
  CHECK(used->len == 4);
  CHECK(text_of(driver.read_bytes(rx, 4)) == "ping");
  CHECK(rig.irq.take_count() >= 1);

  // Guest -> host, a chain of two buffers.
  const uint64_t a = driver.alloc(3), b = driver.alloc(4);
  driver.write_bytes(a, bytes_of("abc"));
  driver.write_bytes(b, bytes_of("defg"));
  driver.post(1, {{a, 3, false}, {b, 4, false}});
  driver.notify(1);
  pump(rig.loop);
  CHECK(driver.take_used(1));
  CHECK(rig.host_read_available() == "abcdefg");

  // More host input lands in later buffers.
  REQUIRE(send(rig.host.get(), "second", 6, 0) == 6);
  pump(rig.loop);  // starved: no buffer posted
  CHECK_FALSE(driver.take_used(0));
  const uint64_t rx2 = driver.alloc(3), rx3 = driver.alloc(64);
  driver.post(0, {{rx2, 3, true}});
  driver.post(0, {{rx3, 64, true}});
  driver.notify(0);
  pump(rig.loop);
  auto first = driver.take_used(0), second = driver.take_used(0);
  REQUIRE(first);
  REQUIRE(second);
  CHECK(text_of(driver.read_bytes(rx2, first->len)) +
            text_of(driver.read_bytes(rx3, second->len)) ==
        "second");
}

TEST_CASE("virtio-console holds guest output while the socket is full", "[devices][virtio]") {
  ConsoleRig rig;
  auto& driver = *rig.driver;
  int small = 4096;
  setsockopt(rig.vmm_end.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  setsockopt(rig.host.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);

  // 100 chains of 8 KiB: far more than the socket holds.
  constexpr size_t kChains = 100, kChunk = 8192;
  std::string expected;
  for (size_t i = 0; i < kChains; ++i) {
    std::string chunk(kChunk, static_cast<char>('A' + i % 26));
    expected += chunk;
    const uint64_t buffer = driver.alloc(kChunk);
    driver.write_bytes(buffer, bytes_of(chunk));
    driver.post(1, {{buffer, kChunk, false}});
  }
  driver.notify(1);
  pump(rig.loop);
  // The device stopped taking chains when the socket filled up.
  size_t consumed = 0;
  while (driver.take_used(1))
    ++consumed;
  CHECK(consumed > 0);
  CHECK(consumed < kChains);
  CHECK(rig.transport->device().name() == "virtio-console");
  CHECK(static_cast<VirtioConsole&>(rig.transport->device()).save().pending_output.size() <=
        kChunk);

  // The host drains; everything arrives in order.
  std::string received;
  for (int round = 0; round < 100000 && received.size() < expected.size(); ++round) {
    received += rig.host_read_available();
    rig.loop.run_once(10);
  }
  CHECK(received.size() == expected.size());
  CHECK(received == expected);
  while (driver.take_used(1))
    ++consumed;
  CHECK(consumed == kChains);
}

TEST_CASE("virtio-console drops output after the backend closes", "[devices][virtio]") {
  ConsoleRig rig;
  auto& driver = *rig.driver;
  const uint64_t rx = driver.alloc(64);
  driver.post(0, {{rx, 64, true}});
  driver.notify(0);
  pump(rig.loop);
  rig.host.reset();  // msb went away
  pump(rig.loop);
  CHECK(static_cast<VirtioConsole&>(rig.transport->device()).save().backend_closed);
  CHECK_FALSE(driver.take_used(0));  // no bytes invented
  for (int i = 0; i < 10; ++i) {
    const uint64_t tx = driver.alloc(16);
    driver.post(1, {{tx, 16, false}});
  }
  driver.notify(1);
  pump(rig.loop);
  int consumed = 0;
  while (driver.take_used(1))
    ++consumed;
  CHECK(consumed == 10);  // the guest never stalls
}

TEST_CASE("virtio devices work with the loop on its own thread", "[devices][virtio]") {
  // As in the machine: registers from this ("vCPU") thread, queues on the loop thread.
  ConsoleRig rig;
  auto& driver = *rig.driver;
  std::thread loop_thread([&] { rig.loop.run(); });
  constexpr int kMessages = 200;
  std::string expected;
  for (int i = 0; i < kMessages; ++i) {
    const std::string message = "message " + std::to_string(i) + "\n";
    expected += message;
    const uint64_t buffer = driver.alloc(static_cast<uint32_t>(message.size()));
    driver.write_bytes(buffer, bytes_of(message));
    driver.post(1, {{buffer, static_cast<uint32_t>(message.size()), false}});
    driver.notify(1);
    // Registers are read while the loop thread may be processing.
    CHECK(driver.read32(0x70) ==
          (kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk));
  }
  std::string received;
  while (received.size() < expected.size()) {
    char chunk[4096];
    ssize_t got = recv(rig.host.get(), chunk, sizeof chunk, 0);
    REQUIRE(got > 0);
    received.append(chunk, static_cast<size_t>(got));
  }
  CHECK(received == expected);
  // A reset from this thread while the loop runs.
  driver.write32(0x70, 0);
  CHECK(driver.read32(0x70) == 0);
  rig.loop.stop();
  loop_thread.join();
}

// ---- pause and snapshots ----

TEST_CASE("event loop pauses between handlers and resumes", "[devices][snapshot]") {
  EventLoop loop;
  loop.pause();  // not running: returns at once
  loop.resume();
  snapstore::UniqueFd event(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  std::atomic<int> calls = 0;
  loop.add(event.get(), EPOLLIN, [&](uint32_t) {
    uint64_t value;
    CHECK(::read(event.get(), &value, sizeof value) == 8);
    ++calls;
  });
  std::thread runner([&] { loop.run(); });
  auto signal = [&] {
    uint64_t one = 1;
    REQUIRE(::write(event.get(), &one, sizeof one) == 8);
  };
  auto wait_for = [&](int n) {
    for (int i = 0; i < 2000 && calls.load() < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return calls.load();
  };
  signal();
  REQUIRE(wait_for(1) == 1);
  loop.pause();
  loop.pause();  // idempotent
  signal();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(calls.load() == 1);  // parked: the event waits
  loop.resume();
  CHECK(wait_for(2) == 2);
  // stop() ends a paused loop.
  loop.pause();
  loop.stop();
  runner.join();
}

TEST_CASE("guest memory marks the pages the VMM writes once tracking is on",
          "[devices][snapshot]") {
  std::vector<std::byte> ram(64 * kPageSize);
  GuestMemory memory;
  memory.add_region(0x10000, std::span(ram).subspan(0, 32 * kPageSize));
  memory.add_region(0x100000, std::span(ram).subspan(32 * kPageSize));
  DirtyBitmap dirty(64);
  memory.track_writes(&dirty, ram.data());
  const std::byte two[2] = {};
  REQUIRE(memory.write(0x10000, two));
  CHECK(bitmap_count(dirty.take()) == 0);  // off until enabled
  dirty.enable();
  REQUIRE(memory.write(0x10000 + kPageSize - 1, two));           // straddles pages 0 and 1
  REQUIRE(memory.writable_slice(0x100000 + 3 * kPageSize, 10));  // page 32 + 3
  REQUIRE(memory.slice(0x100000 + 5 * kPageSize, 10));           // a read: not marked
  auto taken = dirty.take();
  REQUIRE(taken.size() == 1);
  CHECK(taken[0] == ((1ull << 0) | (1ull << 1) | (1ull << 35)));
  CHECK(bitmap_count(dirty.take()) == 0);  // take() cleared it

  // bitmap helpers: a slot's log lands at its page offset.
  std::vector<uint64_t> all(2);
  const uint64_t slot_log[] = {0b101};
  bitmap_or(all, 62, slot_log, 3);
  CHECK(all[0] == (1ull << 62));
  CHECK(all[1] == (1ull << 0));
  bitmap_set(all, 10, 3);
  CHECK(bitmap_count(all) == 5);
}

TEST_CASE_METHOD(FakeVirtioHost, "virtio-mmio restores a saved transport and refuses bad states",
                 "[devices][virtio][snapshot]") {
  VirtioMmioTransport original(std::make_unique<VirtioRng>(), guest.memory, loop, irq);
  VirtioDriver driver(original, guest);
  driver.init(16);
  const uint64_t buffer = driver.alloc(64);
  driver.post(0, {{buffer, 64, true}});
  driver.notify(0);
  pump(loop);
  REQUIRE(driver.take_used(0));
  // One more request posted but not yet noticed by the device: a restore must serve it.
  const uint16_t pending = driver.post(0, {{buffer, 32, true}});

  const MmioState state = original.save();
  const auto queues = original.save_queues();
  REQUIRE(state.activated);
  REQUIRE(queues.size() == 1);
  CHECK(queues[0].next_used == 1);

  VirtioMmioTransport restored(std::make_unique<VirtioRng>(), guest.memory, loop, irq);
  // Refused, and nothing changes: unoffered features, a ring outside memory, a queue too many,
  // DRIVER_OK without activation.
  MmioState bad = state;
  bad.driver_features |= 1ull << 40;
  CHECK_THROWS_WITH(restored.restore(bad, queues, 0, 0), Catch::Contains("does not offer"));
  auto bad_queues = queues;
  bad_queues[0].used_ring = 0x10;
  CHECK_THROWS_WITH(restored.restore(state, bad_queues, 0, 0),
                    Catch::Contains("not inside guest memory"));
  bad_queues = queues;
  bad_queues.push_back(queues[0]);
  CHECK_THROWS_WITH(restored.restore(state, bad_queues, 0, 0), Catch::Contains("queues"));
  bad = state;
  bad.activated = false;
  CHECK_THROWS_WITH(restored.restore(bad, queues, 0, 0), Catch::Contains("not activated"));
  CHECK_THROWS_AS(restored.restore(state, queues, 0x80, 0), std::invalid_argument);
  CHECK_FALSE(restored.save().activated);

  irq.take_count();
  restored.restore(state, queues, kInterruptUsedBuffer, original.config_generation());
  CHECK(restored.save().activated);
  CHECK(restored.save_queues() == queues);
  restored.resume_after_restore();
  CHECK(irq.take_count() >= 1);  // the pending interrupt, raised again
  pump(loop);
  auto used = driver.take_used(0);
  REQUIRE(used);
  CHECK(used->id == pending);
  CHECK(used->len == 32);
}

TEST_CASE("virtio-console sends restored pending output on its new socket",
          "[devices][virtio][snapshot]") {
  ConsoleRig rig;
  auto state = rig.transport->save();
  auto queues = rig.transport->save_queues();
  REQUIRE(state.activated);

  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  snapstore::UniqueFd host(fds[0]), vmm_end(fds[1]);
  auto console = std::make_unique<VirtioConsole>(vmm_end.get(), rig.loop);
  VirtioConsole& device = *console;
  VirtioMmioTransport restored(std::move(console), rig.guest.memory, rig.loop, rig.irq);
  ConsoleState saved;
  saved.pending_output = bytes_of("left over");
  saved.backend_closed = true;  // the old socket's; the new one is open
  device.restore(saved);
  restored.restore(state, queues, 0, 0);
  pump(rig.loop);
  char buffer[64];
  const ssize_t got = recv(host.get(), buffer, sizeof buffer, MSG_DONTWAIT);
  REQUIRE(got == 9);
  CHECK(std::string(buffer, 9) == "left over");
  CHECK(device.save().pending_output.empty());

  ConsoleState too_much;
  too_much.pending_output.resize(VirtioConsole::kMaxTransmitChain + 1);
  CHECK_THROWS_AS(device.restore(too_much), std::invalid_argument);
}
