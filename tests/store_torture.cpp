// A process that works a store hard, for the crash and concurrency tests:
//   store_torture write ROOT SEED COUNT   put objects and (re)name them, COUNT times (0: forever)
//   store_torture read ROOT MILLIS        read every name's object and check it against its seed
//   store_torture gc ROOT MILLIS          collect garbage over and over
//   store_torture pin ROOT NAME           pin NAME's manifest, print "pinned", wait to be killed
// Exits 1 with a message on any inconsistency.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include "snapstore/error.h"
#include "snapstore/store.h"
#include "tests/support.h"

using namespace msb::snapstore;

namespace {

int write_loop(const std::string& root, uint64_t seed, uint64_t count) {
  std::mt19937_64 rng(seed);
  std::optional<Pin> held;
  for (uint64_t i = 0; count == 0 || i < count; ++i) {
    // A Store is held only for one operation, as msb does, so that gc can run in between.
    auto store = Store::open(root);
    uint64_t object_seed = seed * 1000003 + i;
    size_t size = static_cast<size_t>(rng() % (3 << 20)) + static_cast<size_t>(rng() % 4096);
    std::vector<std::byte> data = msb::test::make_data(object_seed, size);
    TransferOptions options;
    options.chunk_size = 64 * 1024;
    options.threads = 2;
    Manifest manifest;
    manifest.meta = {{"seed", object_seed}, {"size", size}};
    manifest.objects.emplace("data", store->put_object(data, options));
    Hash128 hash = store->put_manifest(manifest);
    std::string name = "w" + std::to_string(seed) + "-" + std::to_string(i % 4);
    store->set_name(name, hash, /*replace=*/true);
    if (i % 5 == 4) store->remove_name(name);
    if (i % 3 == 0) held = store->pin({hash});  // replaces (releases) the previous pin
  }
  return 0;
}

int read_loop(const std::string& root, long millis) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
  uint64_t checked = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    auto store = Store::open(root);
    for (const auto& [name, listed] : store->list_names()) {
      std::optional<Hash128> hash = store->find_name(name);  // may be gone or renamed since
      if (!hash) continue;
      Manifest manifest = store->get_manifest(*hash);
      if (!manifest.meta.contains("seed")) continue;
      const ObjectRef& ref = manifest.objects.at("data");
      std::vector<std::byte> actual(ref.size);
      store->materialize(ref, actual);
      std::vector<std::byte> expected =
          msb::test::make_data(manifest.meta["seed"].get<uint64_t>(), ref.size);
      if (actual != expected) {
        std::fprintf(stderr, "name %s: object differs from its seed\n", name.c_str());
        return 1;
      }
      ++checked;
    }
  }
  std::printf("checked %llu objects\n", (unsigned long long)checked);
  return 0;
}

int gc_loop(const std::string& root, long millis) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(millis);
  int runs = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    StoreOptions options;
    options.exclusive = true;
    auto store = Store::open(root, options);
    store->gc(false);
    ++runs;
    store.reset();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::printf("%d gc runs\n", runs);
  return 0;
}

int pin_and_wait(const std::string& root, const std::string& name) {
  std::optional<Pin> pin;
  {
    auto store = Store::open(root);
    std::optional<Hash128> hash = store->find_name(name);
    if (!hash) throw StoreError("no name " + name);
    pin = store->pin({*hash});
  }
  std::printf("pinned\n");
  std::fflush(stdout);
  for (;;)
    ::pause();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "write" && argc == 5)
      return write_loop(argv[2], std::stoull(argv[3]), std::stoull(argv[4]));
    if (mode == "read" && argc == 4) return read_loop(argv[2], std::stol(argv[3]));
    if (mode == "gc" && argc == 4) return gc_loop(argv[2], std::stol(argv[3]));
    if (mode == "pin" && argc == 4) return pin_and_wait(argv[2], argv[3]);
    std::fprintf(stderr, "usage: store_torture write|read|gc|pin ...\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "store_torture: %s\n", e.what());
    return 1;
  }
}
