// Unit tier: a hostile guest. Seeded, reproducible random garbage (register writes, descriptor
// tables with loops and huge lengths, addresses outside memory, avail indexes far ahead, random
// rings) is fed to every virtio device through its transport. The VMM must survive (under
// ASan/UBSan in the sanitizer build, which also catches any access outside guest memory) and each
// device must work again after a reset.
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>

#include "tests/support.h"
#include "tests/virtio_test_driver.h"
#include "vmm/disk_overlay.h"
#include "vmm/virtio/block.h"
#include "vmm/virtio/console.h"
#include "vmm/virtio/rng.h"

using namespace msb;
using namespace msb::vmm;
using namespace msb::vmm::virtio;
using msb::test::FakeGuest;
using msb::test::FakeVirtioHost;
using msb::test::kGuestRamBase;
using msb::test::kGuestRamSize;
using msb::test::pump;
using msb::test::VirtioDriver;

namespace {

constexpr uint64_t kDefaultSeed = 0x6d73622d66757a7aull;  // "msb-fuzz"

// MSB_FUZZ_SEED=N explores other seeds; failures print the seed, which reproduces them.
uint64_t seed() {
  const char* text = std::getenv("MSB_FUZZ_SEED");
  return text ? std::strtoull(text, nullptr, 0) : kDefaultSeed;
}
constexpr int kIterations = 10000;

class Fuzzer {
 public:
  Fuzzer(uint64_t seed, FakeGuest& guest, VirtioMmioTransport& transport, VirtioDriver& driver)
      : random_(seed), guest_(guest), transport_(transport), driver_(driver) {}

  uint64_t next() { return random_(); }
  uint64_t below(uint64_t bound) { return random_() % bound; }

  // An address a hostile driver might use: inside RAM, at its edges, outside, or anything.
  uint64_t address() {
    switch (below(6)) {
      case 0:
        return kGuestRamBase + below(kGuestRamSize);
      case 1:
        return kGuestRamBase + kGuestRamSize - below(64);
      case 2:
        return kGuestRamBase - below(64);
      case 3:
        return below(kGuestRamBase);
      case 4:
        return ~0ull - below(4096);
      default:
        return next();
    }
  }
  uint32_t length() {
    switch (below(5)) {
      case 0:
        return 0;
      case 1:
        return static_cast<uint32_t>(below(64));
      case 2:
        return static_cast<uint32_t>(below(70000));
      case 3:
        return 0xffffffffu - static_cast<uint32_t>(below(16));
      default:
        return static_cast<uint32_t>(next());
    }
  }
  uint32_t register_value() {
    switch (below(5)) {
      case 0:
        return static_cast<uint32_t>(below(4));
      case 1:
        return static_cast<uint32_t>(address());
      case 2:
        return 1u << below(32);
      case 3:
        return static_cast<uint32_t>(below(512));
      default:
        return static_cast<uint32_t>(next());
    }
  }

  // The queue size the driver configured last (garbage is likelier to be looked at in range).
  void set_queue_size(uint16_t size) { queue_size_ = size; }

  // A chain that is almost right: buffers in the data area (headers that look like block
  // requests), sometimes a length or a link that is off, published at the next avail slot.
  void plausible_chain(uint64_t base) {
    const uint16_t size = queue_size_;
    const uint16_t head = static_cast<uint16_t>(below(size));
    const int count = 1 + static_cast<int>(below(4));
    for (int i = 0; i < count; ++i) {
      const uint16_t index = static_cast<uint16_t>((head + i) % size);
      const uint64_t buffer = VirtioDriver::kData + below(0x2000) * 16;
      static constexpr uint32_t kLengths[] = {16, 1, 512, 4096, 8192 + 1, 20};
      uint32_t len = below(8) == 0 ? length() : kLengths[below(6)];
      uint16_t flags = (i + 1 < count ? kDescFNext : 0) | (i > 0 && below(3) ? kDescFWrite : 0);
      if (below(16) == 0) flags = static_cast<uint16_t>(below(8));
      uint16_t link = static_cast<uint16_t>((index + 1) % size);
      if (below(16) == 0) link = head;  // a loop
      guest_.memory.write_obj(base + 16ull * index, VirtqDesc{buffer, len, flags, link});
      if (i == 0) {
        static constexpr uint32_t kTypes[] = {0, 1, 4, 8};
        const uint32_t type = below(8) == 0 ? static_cast<uint32_t>(next_u16()) : kTypes[below(4)];
        const uint64_t sector = below(4) == 0 ? next() : below(4096);
        guest_.memory.write_obj(buffer, type);
        guest_.memory.write_obj(buffer + 8, sector);
      }
    }
    const uint16_t avail_idx = *guest_.memory.read_obj<uint16_t>(base + 0x1000 + 2);
    guest_.memory.write_obj<uint16_t>(base + 0x1000 + 4 + 2ull * (avail_idx % size), head);
    guest_.memory.write_obj<uint16_t>(base + 0x1000 + 2, static_cast<uint16_t>(avail_idx + 1));
  }

  // Random register accesses of random widths, config space included.
  void poke_registers() {
    const int count = 1 + static_cast<int>(below(12));
    for (int i = 0; i < count; ++i) {
      const uint64_t offset = below(4) == 0 ? below(0x200) : below(0x100 / 4) * 4;
      const size_t width = size_t{1} << below(4);
      std::byte data[8];
      if (below(3) == 0) {
        transport_.read(offset, std::span(data, width));
      } else {
        const uint64_t value = register_value();
        std::memcpy(data, &value, 8);
        transport_.write(offset, std::span<const std::byte>(data, width));
      }
    }
  }

  // Garbage in the rings and descriptor tables of every queue, then notifications.
  void scribble_rings(uint32_t queues) {
    for (uint32_t q = 0; q < queues; ++q) {
      const uint64_t base = VirtioDriver::kRings + q * 0x4000ull;
      const int writes = static_cast<int>(below(40));
      for (int i = 0; i < writes; ++i) {
        switch (below(7)) {
          case 5:
          case 6:
            plausible_chain(base);
            break;
          case 0: {  // a descriptor with random fields, sometimes indirect, sometimes looping
            const uint16_t index = static_cast<uint16_t>(below(256));
            uint16_t flags = static_cast<uint16_t>(below(8));
            const uint16_t next = below(2) ? static_cast<uint16_t>(index + 1)
                                           : static_cast<uint16_t>(below(3) ? index : next_u16());
            VirtqDesc desc{address(), length(), flags, next};
            if ((flags & kDescFIndirect) && below(2)) {
              desc.addr = VirtioDriver::kData + below(0x1000) * 16;
              desc.len = static_cast<uint32_t>(16 * below(300));
            }
            guest_.memory.write_obj(base + 16ull * index, desc);
            break;
          }
          case 1:  // the avail idx: small steps, or (rarely) far ahead, which breaks the queue
            guest_.memory.write_obj<uint16_t>(
                base + 0x1000 + 2, below(8) ? static_cast<uint16_t>(below(8)) : next_u16());
            break;
          case 2:  // an avail ring entry
            guest_.memory.write_obj<uint16_t>(base + 0x1000 + 4 + 2 * below(256), next_u16());
            break;
          case 3:  // flags and used_event
            guest_.memory.write_obj<uint16_t>(base + 0x1000 + 4 + 2 * below(260), next_u16());
            break;
          default: {  // raw bytes anywhere in the data area, indirect tables included
            const uint64_t at = VirtioDriver::kData + below(0x20000);
            guest_.memory.write_obj<uint64_t>(at, next());
            break;
          }
        }
      }
    }
    const int notifies = 1 + static_cast<int>(below(3));
    for (int i = 0; i < notifies; ++i) {
      driver_.notify(static_cast<uint32_t>(below(queues + 1)));
    }
  }

 private:
  uint16_t next_u16() { return static_cast<uint16_t>(next()); }

  uint16_t queue_size_ = 1;

  std::mt19937_64 random_;
  FakeGuest& guest_;
  VirtioMmioTransport& transport_;
  VirtioDriver& driver_;
};

// Runs the fuzz loop against one device; `check` proves the device works after a reset.
void fuzz_device(
    const char* what, FakeGuest& guest, EventLoop& loop, VirtioMmioTransport& transport,
    const std::function<void(VirtioDriver&)>& check, const std::function<void()>& between = [] {}) {
  VirtioDriver driver(transport, guest);
  const uint64_t base_seed = seed();
  Fuzzer fuzzer(base_seed ^ std::hash<std::string>{}(what), guest, transport, driver);
  const uint32_t queues = driver.count_queues();
  INFO(what << ", MSB_FUZZ_SEED=" << base_seed);
  for (int iteration = 0; iteration < kIterations; ++iteration) {
    INFO("iteration " << iteration);
    switch (fuzzer.below(4)) {
      case 0:
        fuzzer.poke_registers();
        break;
      default: {
        // A proper setup with random queue sizes and features, then garbage.
        const uint16_t size = static_cast<uint16_t>(1u << fuzzer.below(9));
        uint64_t features = driver.device_features();
        if (fuzzer.below(2)) features &= ~kFeatureRingEventIdx;
        if (fuzzer.below(4) == 0) features = fuzzer.next();
        fuzzer.set_queue_size(size);
        if (driver.negotiate(features)) {
          for (uint32_t q = 0; q < queues; ++q)
            driver.setup_queue(q, size);
          if (fuzzer.below(8) != 0) driver.driver_ok();
        }
        fuzzer.scribble_rings(queues);
        if (fuzzer.below(4) == 0) fuzzer.poke_registers();
        break;
      }
    }
    pump(loop);
    between();
    if (iteration % 100 == 99) {
      // After a reset the device must serve a well-formed request again.
      driver.reset_allocator();
      driver.init(64);
      check(driver);
      pump(loop);
    }
  }
  driver.reset_allocator();
  driver.init(64);
  check(driver);
}

}  // namespace

TEST_CASE_METHOD(FakeVirtioHost, "virtio-rng survives a hostile driver",
                 "[devices][virtio][fuzz]") {
  VirtioMmioTransport transport(std::make_unique<VirtioRng>(), guest.memory, loop, irq);
  fuzz_device("virtio-rng", guest, loop, transport, [&](VirtioDriver& driver) {
    const uint64_t buffer = driver.alloc(32);
    const uint16_t head = driver.post(0, {{buffer, 32, true}});
    driver.notify(0);
    pump(loop);
    auto used = driver.take_used(0);
    REQUIRE(used);
    REQUIRE(used->id == head);
    REQUIRE(used->len == 32);
  });
  CHECK(static_cast<VirtioRng&>(transport.device()).state().bytes_delivered > 100000);
}

TEST_CASE_METHOD(FakeVirtioHost, "virtio-blk survives a hostile driver",
                 "[devices][virtio][fuzz]") {
  test::TempDir dir;
  VirtioMmioTransport transport(
      std::make_unique<VirtioBlock>(DiskOverlay::open("", dir / "overlay", 1 << 20)), guest.memory,
      loop, irq);
  fuzz_device("virtio-blk", guest, loop, transport, [&](VirtioDriver& driver) {
    const uint64_t header = driver.alloc(16), id = driver.alloc(20), status = driver.alloc(1);
    BlockRequestHeader request{kBlockTypeGetId, 0, 0};
    driver.write_bytes(header, std::as_bytes(std::span(&request, 1)));
    guest.at(status)[0] = std::byte{0xff};
    driver.post(0, {{header, 16, false}, {id, 20, true}, {status, 1, true}});
    driver.notify(0);
    pump(loop);
    auto used = driver.take_used(0);
    REQUIRE(used);
    REQUIRE(used->len == 21);
    REQUIRE(guest.at(status)[0] == std::byte{kBlockStatusOk});
    REQUIRE(std::memcmp(guest.at(id), "msb", 4) == 0);
  });
  // The garbage reached the device, not only the transport.
  const BlockState& state = static_cast<VirtioBlock&>(transport.device()).state();
  INFO("requests " << state.requests << ", errors " << state.errors);
  CHECK(state.requests > 1000);
  CHECK(state.errors > 500);
}

TEST_CASE_METHOD(FakeVirtioHost, "virtio-console survives a hostile driver",
                 "[devices][virtio][fuzz]") {
  int fds[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  snapstore::UniqueFd host(fds[0]), vmm_end(fds[1]);
  VirtioMmioTransport transport(std::make_unique<VirtioConsole>(vmm_end.get(), loop), guest.memory,
                                loop, irq);
  std::string received;
  std::mt19937 host_random(7);
  auto drain = [&] {
    char buffer[65536];
    ssize_t got;
    while ((got = recv(host.get(), buffer, sizeof buffer, MSG_DONTWAIT)) > 0) {
      received.append(buffer, static_cast<size_t>(got));
      if (received.size() > 4096) received.erase(0, received.size() - 4096);
    }
  };
  auto between = [&] {
    drain();
    // The host talks too, now and then.
    if (host_random() % 4 == 0) {
      char bytes[37];
      for (char& c : bytes)
        c = static_cast<char>(host_random());
      send(host.get(), bytes, sizeof bytes, MSG_DONTWAIT);
    }
  };
  int round = 0;
  fuzz_device(
      "virtio-console", guest, loop, transport,
      [&](VirtioDriver& driver) {
        const std::string marker = "sane-" + std::to_string(round++);
        const uint64_t buffer = driver.alloc(static_cast<uint32_t>(marker.size()));
        std::memcpy(guest.at(buffer), marker.data(), marker.size());
        driver.post(1, {{buffer, static_cast<uint32_t>(marker.size()), false}});
        driver.notify(1);
        for (int i = 0; i < 1000 && received.find(marker) == std::string::npos; ++i) {
          loop.run_once(1);
          drain();
        }
        REQUIRE(received.find(marker) != std::string::npos);
      },
      between);
}
