// The test guest's side of a restore (vmm tier): kRestore, which a restored guest gets as the
// host's first frame, works in a freshly booted guest too, so these tests boot the test guest on
// vmm::Machine and send it kRestore frames. They check the commands that show what it applied
// (`random`, `clock`, `hostname`, `cpus`, `mem`), the clamping of its vCPU count, and that a
// malformed kRestore is ignored. Forks of one capture (Machine::restore) given different
// kRestores draw different random bytes and bring up their own vCPUs. The random pool's mixing
// itself is checked without KVM.
#include <array>
#include <catch2/catch.hpp>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "guest/protocol/agent_protocol.h"
#include "guest/testguest/random_pool.h"
#include "tests/guest_agent.h"
#include "tests/support.h"
#include "vmm/machine.h"
#include "vmm/machine_state.h"

using namespace msb;

namespace {

using Entropy = test::RestoreEntropy;

Entropy entropy_from(uint64_t seed) {
  Entropy entropy{};
  for (size_t i = 0; i < entropy.size(); ++i)
    entropy[i] = static_cast<uint8_t>(testguest::splitmix64(seed + i));
  return entropy;
}

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// The test guest on a machine with a console log and an agent socket pair, stopped on
// destruction: booted, or restored from another one's capture (a fork).
class Guest {
 public:
  Guest(unsigned cpus, unsigned max_cpus, uint64_t memory_mib) {
    configure(cpus, max_cpus, memory_mib);
    machine_ = vmm::Machine::create(host_.config);
    machine_->start();
    expect_ready("boot");
  }
  // A fork of `original`, which must be paused: its state and RAM, in a machine of its own. A
  // restored guest sends nothing until the host's kRestore.
  explicit Guest(Guest& original) {
    const vmm::MachineConfig& config = original.host_.config;
    configure(config.cpus, config.max_cpus, config.memory_mib);
    const vmm::MachineState state = original.machine_->capture();
    const auto ram = original.machine_->ram();
    host_.config.memory_path = dir_.path() / "memory";
    std::ofstream(host_.config.memory_path, std::ios::binary)
        .write(reinterpret_cast<const char*>(ram.data()), static_cast<std::streamsize>(ram.size()));
    machine_ = vmm::Machine::restore(host_.config, state);
    machine_->start();
  }

  void pause() { machine_->pause(); }
  ~Guest() {
    if (machine_) {
      machine_->stop();
      machine_->wait();
    }
  }
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;

  std::string console() const { return host_.console(); }

  void write_frame(uint16_t type, uint32_t id, const std::string& payload) {
    host_.write_frame(type, id, payload);
  }

  void expect_ready(const char* after) {
    INFO("kReady after " << after);
    REQUIRE(host_.wait_ready().max_concurrent == 1);
  }

  // Runs a command that must exit 0; returns its stdout (or the number it prints).
  std::string run(const std::vector<std::string>& argv) { return host_.run(argv); }
  uint64_t run_number(const std::vector<std::string>& argv) { return host_.run_number(argv); }

  // Sends kRestore and waits for the kReady that answers it.
  void restore(uint32_t cpus, uint64_t memory_mib, const std::string& name, const Entropy& entropy,
               uint64_t wall_clock_ns = now_ns()) {
    host_.send_restore(cpus, memory_mib, name, entropy, wall_clock_ns);
    expect_ready("kRestore");
  }

 private:
  void configure(unsigned cpus, unsigned max_cpus, uint64_t memory_mib) {
    host_.context = [this] { return console(); };
    host_.config.cpus = cpus;
    host_.config.max_cpus = max_cpus;
    host_.config.memory_mib = host_.config.max_memory_mib = memory_mib;
    host_.config.disk_size = 0;  // no disk
  }

  test::TempDir dir_;
  test::MachineHost host_{dir_.path() / "console.log", dir_.path() / "disk.overlay"};
  std::unique_ptr<vmm::Machine> machine_;
};

// The guest's `clock` after a kRestore that said `sent_ns`, read by a host that had `read_ns`
// on its own clock once the answer came: the guest counts whole seconds on from `sent_ns` with
// its timer ticks, which never run ahead of the host's clock (a busy host can only make them lag,
// so no lower bound but `sent_ns` itself is safe). One second over for the tick rate's rounding.
void require_clock_between(uint64_t clock, uint64_t sent_ns, uint64_t read_ns) {
  INFO("guest clock " << clock << " s; sent " << sent_ns << " ns; read by " << read_ns << " ns");
  REQUIRE(clock >= sent_ns / 1'000'000'000);
  REQUIRE(clock <= read_ns / 1'000'000'000 + 1);
}

bool is_random_line(const std::string& line) {
  if (line.size() != 33 || line.back() != '\n') return false;
  for (size_t i = 0; i < 32; ++i)
    if (!std::isxdigit(static_cast<unsigned char>(line[i]))) return false;
  return true;
}

}  // namespace

TEST_CASE("the test guest applies kRestore: entropy, clock, name, memory and vCPUs",
          "[testguest][kvm]") {
  test::skip_without_kvm();
  Guest guest(1, 3, 256);

  // Before any kRestore: the boot's memory, the agent's name, an unknown clock.
  REQUIRE(guest.run_number({"cpus"}) == 1);
  REQUIRE(guest.run_number({"mem"}) == 256);
  REQUIRE(guest.run({"hostname"}) == "testguest\n");
  REQUIRE(guest.run({"clock"}) == "0\n");
  const std::string random1 = guest.run({"random"});
  const std::string random2 = guest.run({"random"});
  REQUIRE(is_random_line(random1));
  REQUIRE(is_random_line(random2));
  REQUIRE(random1 != random2);

  const uint64_t sent = now_ns();
  guest.restore(3, 200, "fork-7", entropy_from(7), sent);
  REQUIRE(guest.run_number({"cpus"}) == 3);  // two APs never started before
  REQUIRE(guest.run_number({"mem"}) == 200);
  REQUIRE(guest.run({"hostname"}) == "fork-7\n");
  const uint64_t clock = guest.run_number({"clock"});
  require_clock_between(clock, sent, now_ns());
  const std::string random3 = guest.run({"random"});
  REQUIRE(is_random_line(random3));
  REQUIRE(random3 != random1);
  REQUIRE(random3 != random2);

  // The host's environment follows kReady, as after a boot.
  guest.write_frame(agent::kSetEnv, 0, std::string("\1\0\0\0SANDBOX=fork-7\0", 19));
  REQUIRE(guest.run({"env"}) == "SANDBOX=fork-7\n");

  // Offline two APs, then online one of them again.
  guest.restore(1, 200, "fork-7", entropy_from(8));
  REQUIRE(guest.run_number({"cpus"}) == 1);
  guest.restore(2, 200, "fork-7", entropy_from(9));
  REQUIRE(guest.run_number({"cpus"}) == 2);

  // Out of range: clamped to 1 .. the VM's vCPUs (3), with a line in the console log.
  guest.restore(99, 256, "fork-8", entropy_from(10));
  REQUIRE(guest.run_number({"cpus"}) == 3);
  guest.restore(0, 256, "fork-9", entropy_from(11));
  REQUIRE(guest.run_number({"cpus"}) == 1);
  REQUIRE(guest.run({"hostname"}) == "fork-9\n");
  const std::string console = guest.console();
  INFO(console);
  REQUIRE(console.find("kRestore asks for 99 vCPUs; this VM has 1 to 3: clamped to 3") !=
          std::string::npos);
  REQUIRE(console.find("kRestore asks for 0 vCPUs; this VM has 1 to 3: clamped to 1") !=
          std::string::npos);
  REQUIRE(console.find("testguest: 1 vCPU of 3, 256 MiB") != std::string::npos);
}

TEST_CASE("the test guest ignores a malformed kRestore and keeps answering", "[testguest][kvm]") {
  test::skip_without_kvm();
  Guest guest(1, 2, 256);
  // Too short for RestorePayload.
  guest.write_frame(agent::kRestore, 0, "short");
  // The whole payload but no name.
  guest.write_frame(agent::kRestore, 0, std::string(sizeof(agent::RestorePayload), '\x01'));
  // A name without its NUL.
  agent::RestorePayload restore{};
  restore.cpus = 2;
  restore.memory_mib = 100;
  guest.write_frame(agent::kRestore, 0,
                    std::string(reinterpret_cast<const char*>(&restore), sizeof restore) + "x");
  // No kReady came for any of them: the next frames are the command's.
  REQUIRE(guest.run({"echo", "still", "here"}) == "still here\n");
  REQUIRE(guest.run_number({"cpus"}) == 1);
  REQUIRE(guest.run_number({"mem"}) == 256);
  REQUIRE(guest.run({"hostname"}) == "testguest\n");
  REQUIRE(guest.run({"clock"}) == "0\n");
  const std::string console = guest.console();
  INFO(console);
  size_t count = 0;
  for (size_t at = 0;
       (at = console.find("malformed kRestore frame ignored", at)) != std::string::npos; ++at)
    ++count;
  REQUIRE(count == 3);
  // A good one afterwards still works.
  guest.restore(2, 128, "after-junk", entropy_from(1));
  REQUIRE(guest.run_number({"cpus"}) == 2);
  REQUIRE(guest.run({"hostname"}) == "after-junk\n");
}

TEST_CASE("the test guest's memory is msb's --memory and its pool mixes boot randomness",
          "[testguest][kvm]") {
  test::skip_without_kvm();
  // Two boots given the same kRestore (entropy included) still differ: the pool keeps what
  // each boot drew.
  std::vector<std::string> randoms;
  for (uint64_t memory : {512, 1024}) {
    Guest guest(1, 1, memory);
    REQUIRE(guest.run_number({"mem"}) == memory);
    // The clock runs from what the host said (1.7e9 s), not from the host's own clock: on from
    // there by no more than the host's time since it said so.
    const uint64_t said = now_ns();
    guest.restore(1, 64, "same", entropy_from(42), 1'000'000'000ull * 1'700'000'000);
    REQUIRE(guest.run_number({"mem"}) == 64);
    const uint64_t clock = guest.run_number({"clock"});
    require_clock_between(clock, 1'000'000'000ull * 1'700'000'000,
                          1'000'000'000ull * 1'700'000'000 + (now_ns() - said));
    randoms.push_back(guest.run({"random"}));
    REQUIRE(is_random_line(randoms.back()));
  }
  REQUIRE(randoms[0] != randoms[1]);
}

TEST_CASE("forks of one snapshot given different kRestores go their own ways",
          "[testguest][snapshot][kvm]") {
  test::skip_without_kvm();
  Guest original(1, 3, 128);
  REQUIRE(is_random_line(original.run({"random"})));
  original.pause();
  Guest fork_a(original);
  Guest fork_b(original);
  // Same pool, same path since the snapshot; only the host's kRestore differs.
  const uint64_t sent_a = now_ns();
  fork_a.restore(3, 96, "fork-a", entropy_from(100), sent_a);
  fork_b.restore(2, 128, "fork-b", entropy_from(200));
  const std::string random_a = fork_a.run({"random"});
  const std::string random_b = fork_b.run({"random"});
  REQUIRE(is_random_line(random_a));
  REQUIRE(is_random_line(random_b));
  REQUIRE(random_a != random_b);
  REQUIRE(fork_a.run_number({"cpus"}) == 3);
  REQUIRE(fork_b.run_number({"cpus"}) == 2);
  REQUIRE(fork_a.run_number({"mem"}) == 96);
  REQUIRE(fork_b.run_number({"mem"}) == 128);
  REQUIRE(fork_a.run({"hostname"}) == "fork-a\n");
  REQUIRE(fork_b.run({"hostname"}) == "fork-b\n");
  const uint64_t clock_a = fork_a.run_number({"clock"});
  require_clock_between(clock_a, sent_a, now_ns());
  // And back down: an AP started in the fork goes offline there.
  fork_a.restore(1, 96, "fork-a", entropy_from(101));
  REQUIRE(fork_a.run_number({"cpus"}) == 1);
  REQUIRE(fork_b.run_number({"cpus"}) == 2);
}

// What a snapshot's forks rely on: the same pool (as every fork of one snapshot has) with
// different host entropy draws differently; the same pool and entropy draws the same.
TEST_CASE("the test guest's random pool: forks with different entropy draw differently",
          "[testguest]") {
  testguest::RandomPool boot{};
  const uint64_t boot_words[] = {0x1234, 0x5678};
  testguest::pool_absorb(boot, boot_words, 2);

  auto draw_after = [&](const testguest::RandomPool& start, uint64_t seed) {
    testguest::RandomPool pool = start;
    const Entropy entropy = entropy_from(seed);
    uint64_t words[4];
    std::memcpy(words, entropy.data(), sizeof words);
    testguest::pool_absorb(pool, words, 4);
    return std::pair{testguest::pool_next(pool), testguest::pool_next(pool)};
  };
  REQUIRE(draw_after(boot, 1) == draw_after(boot, 1));
  REQUIRE(draw_after(boot, 1) != draw_after(boot, 2));
  // One bit of entropy is enough.
  testguest::RandomPool a = boot, b = boot;
  uint64_t word = 0;
  testguest::pool_absorb(a, &word, 1);
  word = 1;
  testguest::pool_absorb(b, &word, 1);
  REQUIRE(testguest::pool_next(a) != testguest::pool_next(b));
  // Different boots, same entropy: different.
  testguest::RandomPool other{};
  const uint64_t other_words[] = {0x1234, 0x5679};
  testguest::pool_absorb(other, other_words, 2);
  REQUIRE(draw_after(boot, 3) != draw_after(other, 3));
  // A pool never sticks at zero.
  testguest::RandomPool zero{};
  testguest::pool_absorb(zero, nullptr, 0);
  REQUIRE(testguest::pool_next(zero) != testguest::pool_next(zero));
}
