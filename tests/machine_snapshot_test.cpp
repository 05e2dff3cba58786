// Pause, capture and restore of a whole machine on real KVM (vmm tier), with the test guest:
// pause/resume keeps it answering; a machine restored from capture() and a copy of its RAM goes
// on where the original was (same memory checksum, its timer still counting, its disk as it
// was) while the original goes on independently; the state's JSON round-trips and malformed
// states are refused; dirty tracking reports what the guest and the VMM wrote.
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "guest/protocol/pattern.h"
#include "tests/guest_agent.h"
#include "tests/support.h"
#include "vmm/disk_overlay.h"
#include "vmm/machine.h"
#include "vmm/machine_state.h"

using namespace msb;
using namespace msb::vmm;

namespace {

constexpr uint64_t kMemoryMib = 96;
constexpr uint64_t kDiskSize = 4 << 20;
constexpr uint64_t kFillStart = 32 << 20;  // where the test guest's fill/sum area starts

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// The host side of a test guest with 2 vCPUs, kMemoryMib and a disk: its console log and disk
// overlay are `name`.log and `name`.overlay in `dir`.
struct Host : test::MachineHost {
  Host(const std::filesystem::path& dir, const std::string& name)
      : MachineHost(dir / (name + ".log"), dir / (name + ".overlay")) {
    config.cpus = config.max_cpus = 2;
    config.memory_mib = config.max_memory_mib = kMemoryMib;
    config.disk_size = kDiskSize;
  }
};

// Builds and starts the machine `host` is wired to, and waits for its guest's kReady.
std::unique_ptr<Machine> boot(Host& host) {
  auto machine = Machine::create(host.config);
  machine->start();
  host.wait_ready();
  return machine;
}

std::string checksum_line(uint64_t checksum) {
  char text[32];
  std::snprintf(text, sizeof text, "%016llx\n", static_cast<unsigned long long>(checksum));
  return text;
}

std::string fill_checksum(uint64_t mib, uint64_t seed) {
  return checksum_line(pattern::pattern_checksum(seed, (mib << 20) / 8));
}

uint64_t ticks(Host& host) {
  return std::stoull(host.run({"ticks"}));
}

// Runs the test guest's `cat` with no input and a timeout of `timeout_ms`, which the guest
// enforces on its own timer: it ends the cat (killed, signal 9) once the ticks for it have passed
// (10 per 100 ms), however long that takes the host.
void cat_until_timeout(Host& host, uint32_t timeout_ms) {
  const uint32_t id = host.next_id++;
  const agent::ExecPayload exec{1, 0, timeout_ms, 0};
  std::string payload(reinterpret_cast<const char*>(&exec), sizeof exec);
  payload.append("cat").push_back('\0');
  payload.push_back('\0');  // the working directory: the default
  host.write_frame(agent::kExec, id, payload);
  auto [header, data] = host.read_frame();
  REQUIRE(header.id == id);
  REQUIRE(header.type == agent::kExit);
  REQUIRE(data.size() == sizeof(agent::ExitPayload));
  agent::ExitPayload status;
  std::memcpy(&status, data.data(), sizeof status);
  REQUIRE(status.code == -1);
  REQUIRE(status.signal == 9);
}

void write_file(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  REQUIRE(fd >= 0);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t put = ::write(fd, bytes.data() + done, bytes.size() - done);
    REQUIRE(put > 0);
    done += static_cast<size_t>(put);
  }
  ::close(fd);
}

bool page_dirty(const std::vector<uint64_t>& bitmap, uint64_t page) {
  return page / 64 < bitmap.size() && (bitmap[page / 64] >> (page % 64)) & 1;
}

uint64_t count_pages(const std::vector<uint64_t>& bitmap) {
  uint64_t count = 0;
  for (uint64_t word : bitmap)
    count += static_cast<uint64_t>(__builtin_popcountll(word));
  return count;
}

}  // namespace

TEST_CASE("a paused machine holds still, captures, and answers again after resume",
          "[snapshot][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  Host host(dir.path(), "a");
  auto machine = boot(host);
  REQUIRE(host.run({"echo", "before"}) == "before\n");

  double worst_pause_ms = 0;
  for (int round = 0; round < 5; ++round) {
    const auto start = Clock::now();
    machine->pause();
    worst_pause_ms = std::max(worst_pause_ms, ms_since(start));
    REQUIRE(machine->paused());
    machine->pause();  // idempotent
    if (round == 0) {
      // Paused: the guest does not answer (its exec frame waits in the socket) ...
      const uint32_t id = host.send_exec({"cpus"});
      pollfd readable{host.fd, POLLIN, 0};
      REQUIRE(::poll(&readable, 1, 100) == 0);
      const MachineState state = machine->capture();
      REQUIRE(state.vcpus.size() == 2);
      REQUIRE(state.virtio.size() == 4);  // console, block, rng, balloon
      REQUIRE(state.virtio[0].name == "virtio-console");
      REQUIRE(state.virtio[0].mmio.activated);
      REQUIRE(state.has_disk);
      REQUIRE(state.disk_size == kDiskSize);
      REQUIRE(machine->ram().size() == kMemoryMib << 20);
      REQUIRE(machine->disk() != nullptr);
      machine->resume();
      machine->resume();  // idempotent
      // ... and answers once resumed.
      auto [header, data] = host.read_frame();
      REQUIRE(header.id == id);
      REQUIRE(data == "2\n");
      host.read_frame();  // its exit
    } else {
      machine->resume();
    }
    REQUIRE_FALSE(machine->paused());
    REQUIRE(host.run({"echo", "round", std::to_string(round)}) ==
            "round " + std::to_string(round) + "\n");
  }
  std::printf("pause latency (worst of 5, 2 vCPUs): %.2f ms\n", worst_pause_ms);

  // Paused and resumed over and over while the guest works and talks: nothing is lost.
  std::thread pauser([&] {
    for (int i = 0; i < 50; ++i) {
      machine->pause();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      machine->resume();
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  for (int i = 0; i < 4; ++i)
    REQUIRE(host.run({"fill", "16", std::to_string(i)}) == fill_checksum(16, i));
  pauser.join();
  REQUIRE_THROWS_AS(machine->capture(), VmmError);  // not paused

  host.power_off();
  REQUIRE(machine->wait().reason == MachineExit::Reason::kPoweredOff);
}

TEST_CASE("a restored machine goes on where the original was, and both go on independently",
          "[snapshot][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  Host original_host(dir.path(), "original");
  auto original = boot(original_host);
  REQUIRE(original_host.run({"fill", "8", "7"}) == fill_checksum(8, 7));
  REQUIRE(original_host.run({"disk-write", "1", "5"}) == fill_checksum(1, 5));
  const uint64_t ticks_before = ticks(original_host);

  original->pause();
  const MachineState state = original->capture();
  // The RAM file and the disk: the original's overlay (flushed by capture) serves as the
  // restored machine's read-only layer, under an overlay of its own.
  write_file(dir.path() / "memory", original->ram());
  std::filesystem::copy_file(original_host.config.disk_overlay_path, dir.path() / "layer");
  std::filesystem::copy_file(original_host.config.disk_overlay_path + ".map",
                             dir.path() / "layer.map");

  Host restored_host(dir.path(), "restored");
  restored_host.config.kernel_path = "/nonexistent";  // not loaded by a restore
  restored_host.config.memory_path = dir.path() / "memory";
  restored_host.config.disk_layer_path = dir.path() / "layer";
  const auto build_start = Clock::now();
  auto restored = Machine::restore(restored_host.config, state);
  const double build_ms = ms_since(build_start);
  REQUIRE(restored->dirty_tracking());
  const auto run_start = Clock::now();
  restored->start();
  REQUIRE(restored_host.run({"echo", "restored"}) == "restored\n");
  std::printf("restore: Machine::restore %.2f ms, then first exec answered after %.2f ms\n",
              build_ms, ms_since(run_start));
  REQUIRE(restored_host.run({"sum", "8"}) == fill_checksum(8, 7));
  // Its timer goes on from the original's count, and counts: a 100 ms timeout, which the guest
  // measures in its own ticks, ends a cat between two readings.
  const uint64_t restored_ticks = ticks(restored_host);
  REQUIRE(restored_ticks >= ticks_before);
  cat_until_timeout(restored_host, 100);
  REQUIRE(ticks(restored_host) >= restored_ticks + 10);
  REQUIRE(restored_host.run({"disk-read", "1"}) == fill_checksum(1, 5));
  REQUIRE(restored_host.run({"cpus"}) == "2\n");

  // The original, resumed, carries on too; each one's memory is its own from here.
  original->resume();
  REQUIRE(original_host.run({"fill", "8", "100"}) == fill_checksum(8, 100));
  REQUIRE(restored_host.run({"fill", "8", "200"}) == fill_checksum(8, 200));
  REQUIRE(original_host.run({"sum", "8"}) == fill_checksum(8, 100));
  REQUIRE(restored_host.run({"sum", "8"}) == fill_checksum(8, 200));
  // The RAM file stays as it was captured (MAP_PRIVATE).
  {
    const std::string memory = test::read_text(dir.path() / "memory");
    std::vector<uint64_t> words((8 << 20) / 8);
    std::memcpy(words.data(), memory.data() + kFillStart, 8 << 20);
    uint64_t checksum = pattern::kChecksumInit;
    for (uint64_t word : words)
      checksum = pattern::checksum_update(checksum, word);
    REQUIRE(checksum_line(checksum) == fill_checksum(8, 7));
  }

  for (auto* host : {&original_host, &restored_host})
    host->power_off();
  REQUIRE(original->wait().reason == MachineExit::Reason::kPoweredOff);
  REQUIRE(restored->wait().reason == MachineExit::Reason::kPoweredOff);
}

TEST_CASE("machine state JSON round-trips and malformed states are refused", "[snapshot][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  Host host(dir.path(), "a");
  auto machine = boot(host);
  machine->pause();
  const MachineState state = machine->capture();
  write_file(dir.path() / "memory", machine->ram());

  const nlohmann::json json = state.to_json();
  const std::string text = json.dump();
  const MachineState parsed = MachineState::from_json(nlohmann::json::parse(text));
  REQUIRE(parsed.to_json().dump() == text);

  auto refused = [&](auto&& mutate, const std::string& what) {
    nlohmann::json bad = json;
    mutate(bad);
    INFO(what);
    REQUIRE_THROWS_WITH(MachineState::from_json(bad),
                        Catch::StartsWith("snapshot state: ") && Catch::Contains(what));
  };
  refused([](auto& j) { j.erase("vcpus"); }, "vcpus");
  refused([](auto& j) { j["vcpus"][0]["regs"] = "00"; }, "regs");
  refused([](auto& j) { j["vcpus"][0]["xsave"] = std::string(4096, '0'); }, "xsave");
  refused([](auto& j) { j["vcpus"][0]["lapic"] = 5; }, "lapic");
  refused([](auto& j) { j["vcpus"].erase(1); }, "vcpus");
  refused([](auto& j) { j["virtio"][0]["queues"][0]["size"] = 70000; }, "size");
  refused([](auto& j) { j["virtio"][0]["device"].erase("pending_output"); }, "pending_output");
  refused([](auto& j) { j["virtio"][1]["name"] = "virtio-gpu"; }, "virtio-gpu");
  refused([](auto& j) { j["serial"]["ier"] = -1; }, "ier");
  refused([](auto& j) { j["format"] = 99; }, "format");
  refused([](auto& j) { j["vm"]["ioapic"] = j["vm"]["pic_master"]; }, "chip id");
  REQUIRE_THROWS_AS(MachineState::from_json(nlohmann::json::array()), VmmError);

  // Well-formed but inconsistent with the machine: Machine::restore refuses it.
  Host restore_host(dir.path(), "b");
  restore_host.config.memory_path = dir.path() / "memory";
  auto restore_refused = [&](MachineState bad, const std::string& what) {
    INFO(what);
    REQUIRE_THROWS_WITH(Machine::restore(restore_host.config, bad), Catch::Contains(what));
  };
  {
    MachineState bad = parsed;
    bad.virtio[0].queues[0].desc_table = (kMemoryMib << 20) - 16;  // runs off the end of RAM
    restore_refused(bad, "not inside guest memory");
  }
  {
    MachineState bad = parsed;
    bad.virtio[0].mmio.driver_features |= 1ull << 40;
    restore_refused(bad, "does not offer");
  }
  {
    MachineState bad = parsed;
    bad.virtio[1].mmio.status &= ~4u;  // DRIVER_OK gone but still activated
    restore_refused(bad, "virtio-blk: activated without DRIVER_OK");
  }
  {
    MachineState bad = parsed;
    bad.cpus = 1;
    restore_refused(bad, "cpus");
  }
  {
    MachineConfig other = restore_host.config;
    other.memory_mib = other.max_memory_mib = kMemoryMib * 2;
    REQUIRE_THROWS_WITH(Machine::restore(other, parsed), Catch::Contains("memory_mib"));
  }
  {
    test::write_text(dir.path() / "short", "x");
    MachineConfig other = restore_host.config;
    other.memory_path = dir.path() / "short";
    REQUIRE_THROWS_WITH(Machine::restore(other, parsed), Catch::Contains("memory file"));
  }
  // And the parsed state itself restores.
  auto restored = Machine::restore(restore_host.config, parsed);
  restored->start();
  REQUIRE(restore_host.run({"echo", "ok"}) == "ok\n");
  restored->stop();
  restored->wait();
  machine->stop();
  machine->wait();
}

TEST_CASE("dirty tracking reports the pages the guest and the VMM wrote", "[snapshot][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  Host host(dir.path(), "a");
  auto machine = boot(host);
  REQUIRE_FALSE(machine->dirty_tracking());
  machine->start_dirty_tracking();
  machine->start_dirty_tracking();  // idempotent
  REQUIRE(machine->dirty_tracking());
  machine->pause();
  machine->take_dirty_pages();  // what was written while tracking started
  machine->resume();

  REQUIRE(host.run({"fill", "4", "3"}) == fill_checksum(4, 3));
  machine->pause();
  const auto start = Clock::now();
  const auto after_fill = machine->take_dirty_pages();
  const double take_ms = ms_since(start);
  REQUIRE(after_fill.size() == (kMemoryMib << 20) / 4096 / 64);
  const uint64_t first = kFillStart / 4096;
  uint64_t missing = 0;
  for (uint64_t page = first; page < first + (4 << 20) / 4096; ++page)
    missing += page_dirty(after_fill, page) ? 0 : 1;
  REQUIRE(missing == 0);
  const uint64_t fill_count = count_pages(after_fill);
  REQUIRE(fill_count >= 1024);

  // The console's receive buffer that got the exec frame: only the VMM writes it.
  const MachineState state = machine->capture();
  const auto& receive = state.virtio[0].queues[0];
  const auto ram = machine->ram();
  auto read_u32 = [&](uint64_t address) {
    uint32_t value;
    std::memcpy(&value, ram.data() + address, 4);
    return value;
  };
  auto read_u64 = [&](uint64_t address) {
    uint64_t value;
    std::memcpy(&value, ram.data() + address, 8);
    return value;
  };
  const uint16_t last = static_cast<uint16_t>(receive.next_used - 1) % receive.size;
  const uint32_t head = read_u32(receive.used_ring + 4 + 8ull * last);
  const uint64_t buffer = read_u64(receive.desc_table + 16ull * head);
  REQUIRE(page_dirty(after_fill, buffer / 4096));
  REQUIRE(page_dirty(after_fill, receive.used_ring / 4096));

  // Idle: only what the guest's timer and agent loop touch.
  machine->resume();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  machine->pause();
  const uint64_t idle_count = count_pages(machine->take_dirty_pages());
  std::printf("dirty pages: %llu after fill 4 MiB (take: %.2f ms), %llu after 200 ms idle\n",
              static_cast<unsigned long long>(fill_count), take_ms,
              static_cast<unsigned long long>(idle_count));
  REQUIRE(idle_count < 64);
  machine->resume();
  machine->stop();
  machine->wait();
}

TEST_CASE("stop() ends a paused machine", "[snapshot][kvm]") {
  test::skip_without_kvm();
  test::TempDir dir;
  Host host(dir.path(), "a");
  auto machine = Machine::create(host.config);
  machine->pause();  // before start: it starts paused
  machine->start();
  REQUIRE(machine->paused());
  machine->resume();
  host.wait_ready();
  machine->pause();
  machine->stop();
  const MachineExit exit = machine->wait();
  REQUIRE(exit.reason == MachineExit::Reason::kPoweredOff);
}
