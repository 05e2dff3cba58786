// Unit tier: virtio-balloon through the virtio-mmio transport, driven by the test driver
// (virtio_test_driver.h) against fake guest memory: inflating frees the host pages, bad requests
// are refused without harm, the configuration space and the state round-trip.
#include <fcntl.h>
#include <sys/mman.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "snapstore/file_util.h"
#include "tests/support.h"
#include "tests/virtio_test_driver.h"
#include "vmm/machine_state.h"
#include "vmm/virtio/balloon.h"
#include "vmm/virtio/mmio.h"

using namespace msb;
using namespace msb::vmm;
using namespace msb::vmm::virtio;
using msb::test::Buffer;
using msb::test::kGuestRamBase;
using msb::test::kGuestRamSize;
using msb::test::pump;
using msb::test::VirtioDriver;

namespace {

constexpr uint64_t kPage = VirtioBalloon::kPageSize;

// The fake guest, with its RAM re-pointed at an anonymous mapping: MADV_DONTNEED frees only
// whole, aligned host pages, which a std::vector's storage is not. The driver reaches guest
// memory through `guest.memory` (rings, buffers); pages are read here through `at`.
struct BalloonRig : msb::test::FakeVirtioHost {
  std::byte* ram = nullptr;
  std::unique_ptr<VirtioMmioTransport> transport;
  VirtioBalloon* balloon = nullptr;
  std::unique_ptr<VirtioDriver> driver;

  // RAM is anonymous, or with `file`, that file mapped MAP_PRIVATE (a restored machine's RAM).
  explicit BalloonRig(int file = -1) {
    void* mapping = ::mmap(nullptr, kGuestRamSize, PROT_READ | PROT_WRITE,
                           file < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_PRIVATE, file, 0);
    REQUIRE(mapping != MAP_FAILED);
    ram = static_cast<std::byte*>(mapping);
    guest.memory = GuestMemory();
    guest.memory.add_region(kGuestRamBase, std::span(ram, kGuestRamSize));
    auto device = std::make_unique<VirtioBalloon>();
    balloon = device.get();
    transport = std::make_unique<VirtioMmioTransport>(std::move(device), guest.memory, loop, irq);
    driver = std::make_unique<VirtioDriver>(*transport, guest);
  }
  ~BalloonRig() {
    driver.reset();
    transport.reset();
    ::munmap(ram, kGuestRamSize);
  }

  std::byte* at(uint64_t address) { return ram + (address - kGuestRamBase); }

  // The driver's init, with fresh rings in this RAM (the driver clears the vector's).
  void init(uint16_t size = 64) {
    std::memset(at(VirtioDriver::kRings), 0, VirtioDriver::kData - VirtioDriver::kRings);
    driver->init(size);
  }
  uint32_t pfn(uint64_t address) { return static_cast<uint32_t>(address / kPage); }

  // A page of guest RAM above the driver's buffers, filled with `fill`.
  uint64_t data_page(unsigned index, uint8_t fill) {
    const uint64_t address = kGuestRamBase + kGuestRamSize - (index + 1) * kPage;
    std::memset(at(address), fill, kPage);
    return address;
  }

  // Posts a buffer holding `pfns` on `queue`, as one readable descriptor; returns its head.
  uint16_t post_pfns(uint32_t queue, const std::vector<uint32_t>& pfns) {
    const uint32_t length = static_cast<uint32_t>(pfns.size() * 4);
    const uint64_t buffer = driver->alloc(std::max<uint32_t>(length, 4));
    guest.memory.write(buffer, std::as_bytes(std::span(pfns)));
    return driver->post(queue, {{buffer, length, false}});
  }

  // Notifies `queue`, runs the device and returns the used element for `head`.
  VirtqUsedElem run(uint32_t queue, uint16_t head) {
    driver->notify(queue);
    pump(loop);
    auto used = driver->take_used(queue);
    REQUIRE(used);
    CHECK(used->id == head);
    return *used;
  }

  uint32_t config32(uint64_t offset) { return driver->read32(0x100 + offset); }

  bool all(uint64_t address, uint8_t value) {
    for (uint64_t i = 0; i < kPage; ++i) {
      if (at(address)[i] != std::byte{value}) return false;
    }
    return true;
  }
};

TEST_CASE_METHOD(BalloonRig, "virtio-balloon identifies itself and offers no balloon features",
                 "[devices][virtio][balloon]") {
  CHECK(driver->read32(0x008) == kDeviceIdBalloon);
  // VERSION_1 and the ring features only: no MUST_TELL_HOST, STATS_VQ or DEFLATE_ON_OOM.
  CHECK(driver->device_features() ==
        (kFeatureVersion1 | kFeatureRingEventIdx | kFeatureRingIndirectDesc));
  CHECK_FALSE(driver->negotiate(kFeatureVersion1 | (1ull << 2)));  // DEFLATE_ON_OOM refused
  REQUIRE(driver->negotiate(kFeatureVersion1));
  CHECK(driver->count_queues() == 2);  // inflateq, deflateq
}

TEST_CASE_METHOD(BalloonRig, "inflating frees the pages and deflating returns them",
                 "[devices][virtio][balloon]") {
  init();
  const uint64_t a = data_page(0, 0xaa);
  const uint64_t b = data_page(1, 0xbb);  // b sits right below a: one run of two pages
  const uint64_t c = data_page(5, 0xcc);
  const uint64_t kept = data_page(2, 0x77);
  irq.take_count();

  const uint16_t head = post_pfns(0, {pfn(a), pfn(b), pfn(c)});
  VirtqUsedElem used = run(0, head);
  CHECK(used.len == 0);
  CHECK(irq.take_count() >= 1);
  // The host pages are gone: anonymous memory reads zero again.
  CHECK(all(a, 0));
  CHECK(all(b, 0));
  CHECK(all(c, 0));
  CHECK(all(kept, 0x77));
  CHECK(balloon->state().pages_inflated == 3);

  // Deflating hands them back: nothing changes, the guest touches them in again.
  std::memset(at(a), 0x11, kPage);
  used = run(1, post_pfns(1, {pfn(a), pfn(b)}));
  CHECK(used.len == 0);
  CHECK(all(a, 0x11));
  CHECK(balloon->state().pages_deflated == 2);
  CHECK(balloon->state().bad_requests == 0);
}

TEST_CASE("inflating a restored machine's pages brings back the RAM file's, which stays as it was",
          "[devices][virtio][balloon]") {
  msb::test::TempDir dir;
  const std::filesystem::path path = dir / "ram";
  std::string contents(kGuestRamSize, '\x6b');
  msb::test::write_text(path, contents);
  snapstore::UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(file);
  BalloonRig rig(file.get());
  rig.init();
  const uint64_t page = kGuestRamBase + kGuestRamSize - kPage;
  CHECK(rig.all(page, 0x6b));
  std::memset(rig.at(page), 0x01, kPage);  // the guest writes: a private copy
  rig.run(0, rig.post_pfns(0, {rig.pfn(page)}));
  CHECK(rig.all(page, 0x6b));  // the private copy is gone
  CHECK(msb::test::read_text(path) == contents);
}

TEST_CASE_METHOD(BalloonRig, "inflated pages count as the VMM's writes for dirty tracking",
                 "[devices][virtio][balloon]") {
  DirtyBitmap dirty(kGuestRamSize / kPage);
  guest.memory.track_writes(&dirty, ram);
  init();
  const uint64_t page = data_page(3, 0x42);
  dirty.enable();
  dirty.take();
  run(0, post_pfns(0, {pfn(page)}));
  const std::vector<uint64_t> marked = dirty.take();
  const uint64_t index = (page - kGuestRamBase) / kPage;
  CHECK((marked[index / 64] >> (index % 64) & 1) == 1);
}

TEST_CASE_METHOD(BalloonRig, "bad balloon requests are refused and change nothing",
                 "[devices][virtio][balloon]") {
  init();
  const uint64_t page = data_page(0, 0x5a);
  const uint32_t good = pfn(page);
  const uint32_t below_ram = pfn(kGuestRamBase) - 1;
  const uint32_t past_ram = pfn(kGuestRamBase + kGuestRamSize);
  uint64_t refused = 0;
  auto refuse = [&](uint16_t head) {
    INFO("head " << head);
    CHECK(run(0, head).len == 0);
    CHECK(all(page, 0x5a));  // the good PFN beside the bad part was not freed either
    CHECK(balloon->state().bad_requests == ++refused);
    CHECK(balloon->state().pages_inflated == 0);
  };

  refuse(post_pfns(0, {good, past_ram}));
  refuse(post_pfns(0, {below_ram, good}));
  refuse(post_pfns(0, {good, 0xffffffffu}));
  refuse(post_pfns(0, {}));  // empty
  {
    // Not whole PFNs: 6 bytes.
    const uint64_t buffer = driver->alloc(8);
    guest.memory.write_obj(buffer, uint64_t{good});
    refuse(driver->post(0, {{buffer, 6, false}}));
  }
  {
    // A device-writable part: the inflate queue's buffers are the driver's to the device only.
    const uint64_t buffer = driver->alloc(8);
    guest.memory.write_obj(buffer, uint32_t{good});
    refuse(driver->post(0, {{buffer, 4, false}, {buffer + 4, 4, true}}));
  }
  {
    // More PFNs than one request may carry.
    const uint32_t count = VirtioBalloon::kMaxPfnsPerRequest + 1;
    const uint64_t buffer = driver->alloc(count * 4);
    std::vector<uint32_t> pfns(count, good);
    guest.memory.write(buffer, std::as_bytes(std::span(pfns)));
    refuse(driver->post(0, {{buffer, count * 4, false}}));
  }
  {
    // A buffer outside guest memory: a malformed chain.
    refuse(driver->post(0, {{0x1000, 4, false}}));
  }

  // The device still works.
  run(0, post_pfns(0, {good}));
  CHECK(all(page, 0));
  CHECK(balloon->state().pages_inflated == 1);
}

TEST_CASE_METHOD(BalloonRig, "virtio-balloon survives random garbage on its queues",
                 "[devices][virtio][balloon][fuzz]") {
  std::mt19937_64 random(42);
  const uint64_t page = data_page(0, 0x33);
  for (int round = 0; round < 200; ++round) {
    driver->reset_allocator();
    init(16);
    for (int request = 0; request < 8; ++request) {
      const uint32_t queue = random() % 2;
      std::vector<Buffer> buffers;
      const int parts = 1 + static_cast<int>(random() % 3);
      for (int i = 0; i < parts; ++i) {
        const uint32_t length = static_cast<uint32_t>(random() % 64);
        uint64_t address = driver->alloc(64);
        // Garbage PFNs, some of them in RAM, never the watched page.
        for (uint32_t w = 0; w < 16; ++w) {
          uint32_t value = static_cast<uint32_t>(random());
          if (random() % 2) {
            value = pfn(kGuestRamBase) + static_cast<uint32_t>(random() % (kGuestRamSize / kPage));
          }
          if (value == pfn(page)) value = 0;
          guest.memory.write_obj(address + 4 * w, value);
        }
        if (random() % 8 == 0) address = random();  // anywhere at all
        buffers.push_back({address, length, random() % 4 == 0});
      }
      driver->post(queue, buffers);
      driver->notify(queue);
    }
    pump(loop);
  }
  CHECK(all(page, 0x33));
  // And a good request still works after all that.
  driver->reset_allocator();
  init(16);
  run(0, post_pfns(0, {pfn(page)}));
  CHECK(all(page, 0));
}

TEST_CASE_METHOD(BalloonRig, "the balloon's target and actual live in its configuration space",
                 "[devices][virtio][balloon]") {
  // Before a driver: the target is recorded, nobody is interrupted.
  balloon->set_target_pages(100);
  CHECK(irq.take_count() == 0);
  CHECK(config32(0) == 100);
  CHECK(config32(4) == 0);
  const uint32_t generation = driver->read32(0x0fc);

  init();
  irq.take_count();
  // A new target raises a configuration change.
  balloon->set_target_pages(300);
  CHECK(irq.take_count() == 1);
  CHECK((driver->read32(0x060) & kInterruptConfigChange) != 0);
  CHECK(driver->read32(0x0fc) != generation);
  CHECK(config32(0) == 300);
  // The same target again is no change.
  driver->write32(0x064, kInterruptConfigChange);
  balloon->set_target_pages(300);
  CHECK(irq.take_count() == 0);
  CHECK(driver->read32(0x060) == 0);

  // The driver writes actual; num_pages is the device's and ignores writes.
  driver->write32(0x104, 250);
  driver->write32(0x100, 7);
  CHECK(config32(0) == 300);
  CHECK(config32(4) == 250);
  CHECK(balloon->state().actual == 250);
  // Narrow accesses, as Linux's virtio_cread/virtio_cwrite may make them.
  std::byte two[2] = {std::byte{0x34}, std::byte{0x12}};
  transport->write(0x104, two);
  CHECK(config32(4) == 0x1234);
  std::byte one{0xff};
  transport->read(0x101, std::span(&one, 1));
  CHECK(one == std::byte{1});  // 300 = 0x12c
  // Past the configuration space: zeros, and writes go nowhere.
  CHECK(config32(8) == 0);
  driver->write32(0x108, 5);
  CHECK(config32(8) == 0);

  // A reset forgets what the driver held, not the host's target.
  driver->write32(0x070, 0);
  CHECK(config32(4) == 0);
  CHECK(config32(0) == 300);
}

TEST_CASE_METHOD(BalloonRig, "the balloon's state round-trips through the machine state",
                 "[devices][virtio][balloon]") {
  init();
  balloon->set_target_pages(512);
  driver->write32(0x104, 2);
  run(0, post_pfns(0, {pfn(data_page(0, 1)), pfn(data_page(1, 2))}));
  run(1, post_pfns(1, {pfn(data_page(0, 1))}));
  run(0, post_pfns(0, {0xffffffffu}));
  const BalloonState state = balloon->state();
  CHECK(state == BalloonState{512, 2, 2, 1, 1});

  const nlohmann::json json = balloon_state_to_json(state);
  CHECK(json == nlohmann::json{{"num_pages", 512},
                               {"actual", 2},
                               {"pages_inflated", 2},
                               {"pages_deflated", 1},
                               {"bad_requests", 1}});
  CHECK(balloon_state_from_json(json) == state);

  // Into a fresh device behind a fresh transport, as Machine::restore does it.
  auto fresh = std::make_unique<VirtioBalloon>();
  VirtioBalloon* restored = fresh.get();
  VirtioMmioTransport other(std::move(fresh), guest.memory, loop, irq);
  restored->restore(balloon_state_from_json(json));
  other.restore(transport->save(), transport->save_queues(), transport->interrupt_status(),
                transport->config_generation());
  CHECK(restored->state() == state);
  uint32_t target = 0;
  other.read(0x100, std::as_writable_bytes(std::span(&target, 1)));
  CHECK(target == 512);

  // Malformed states are refused, naming the field.
  auto broken = json;
  broken["num_pages"] = uint64_t{1} << 32;
  CHECK_THROWS_WITH(balloon_state_from_json(broken),
                    Catch::Contains("virtio-balloon.num_pages: out of range"));
  broken = json;
  broken.erase("actual");
  CHECK_THROWS_WITH(balloon_state_from_json(broken), Catch::Contains("missing \"actual\""));
  broken = json;
  broken["pages_inflated"] = -1;
  CHECK_THROWS_WITH(balloon_state_from_json(broken),
                    Catch::Contains("virtio-balloon.pages_inflated: not a non-negative integer"));
  CHECK_THROWS_WITH(balloon_state_from_json(nlohmann::json::array()),
                    Catch::Contains("not an object"));
}

TEST_CASE_METHOD(BalloonRig, "a target set after a restore interrupts the restored driver",
                 "[devices][virtio][balloon]") {
  // The driver holds what the target asked for, and has acked the change.
  init();
  balloon->set_target_pages(512);
  driver->write32(0x104, 512);
  driver->write32(0x064, kInterruptConfigChange);
  irq.take_count();

  // A restored machine: the state into a fresh device behind a fresh transport, then the target
  // of the memory the restore grants, which the VMM sets before the machine runs.
  auto fresh = std::make_unique<VirtioBalloon>();
  VirtioBalloon* restored = fresh.get();
  VirtioMmioTransport other(std::move(fresh), guest.memory, loop, irq);
  restored->restore(balloon->state());
  other.restore(transport->save(), transport->save_queues(), transport->interrupt_status(),
                transport->config_generation());
  irq.take_count();
  auto read32 = [&](uint64_t offset) {
    uint32_t value = 0;
    other.read(offset, std::as_writable_bytes(std::span(&value, 1)));
    return value;
  };
  const uint32_t generation = read32(0x0fc);
  restored->set_target_pages(128);
  CHECK(irq.take_count() == 1);
  CHECK((read32(0x060) & kInterruptConfigChange) != 0);
  CHECK(read32(0x0fc) != generation);
  CHECK(read32(0x100) == 128);
  CHECK(read32(0x104) == 512);  // the driver's, until it moves
  CHECK(restored->state().num_pages == 128);
  // The snapshot's own target again (a restore that keeps its memory) is no change.
  auto same = std::make_unique<VirtioBalloon>();
  VirtioBalloon* kept = same.get();
  VirtioMmioTransport third(std::move(same), guest.memory, loop, irq);
  kept->restore(balloon->state());
  third.restore(transport->save(), transport->save_queues(), transport->interrupt_status(),
                transport->config_generation());
  irq.take_count();
  kept->set_target_pages(512);
  CHECK(irq.take_count() == 0);
}

}  // namespace
