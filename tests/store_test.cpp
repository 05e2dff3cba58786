// Unit tier: the content-addressed store (snapstore/), no KVM.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "snapstore/error.h"
#include "snapstore/name.h"
#include "snapstore/store.h"
#include "tests/support.h"

using namespace msb::snapstore;
using msb::test::make_data;
using msb::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::vector<std::byte> random_bytes(uint64_t seed, size_t size) {
  std::vector<std::byte> out(size);
  std::mt19937_64 rng(seed);
  for (auto& b : out)
    b = std::byte(rng() & 0xff);
  return out;
}

size_t count_files(const fs::path& dir) {
  size_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    n += e.is_regular_file() ? 1 : 0;
  return n;
}

std::unique_ptr<Store> open_exclusive(const fs::path& root, int timeout_ms = 30000) {
  StoreOptions options;
  options.exclusive = true;
  options.lock_timeout = std::chrono::milliseconds(timeout_ms);
  return Store::open(root, options);
}

// How many of this process's descriptors are open on `path`.
int open_descriptors(const fs::path& path) {
  int n = 0;
  for (const auto& fd : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    if (fs::read_symlink(fd.path(), ec) == path) ++n;
  }
  return n;
}

// Stores `data` as a named manifest, as msb does for a snapshot or a file.
Hash128 put_named(Store& store, const std::string& name, std::span<const std::byte> data) {
  Manifest m;
  m.objects.emplace("data", store.put_object(data));
  Hash128 h = store.put_manifest(m);
  store.set_name(name, h, /*replace=*/true);
  return h;
}

void flip_byte(const fs::path& path, off_t offset) {
  ::chmod(path.c_str(), 0644);
  int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  unsigned char b;
  REQUIRE(::pread(fd, &b, 1, offset) == 1);
  b ^= 0x40;
  REQUIRE(::pwrite(fd, &b, 1, offset) == 1);
  ::close(fd);
}

std::string torture_binary() {
  return MSB_TORTURE_BINARY;
}

}  // namespace

TEST_CASE("hashes print as 32 hex digits and parse back", "[store]") {
  Hash128 h = hash_bytes(std::as_bytes(std::span("hello", 5)));
  std::string hex = h.hex();
  REQUIRE(hex.size() == 32);
  REQUIRE(Hash128::parse(hex) == h);
  std::string upper = hex;
  for (auto& c : upper)
    c = static_cast<char>(std::toupper(c));
  REQUIRE(Hash128::parse(upper) == h);
  REQUIRE_FALSE(Hash128::parse(hex.substr(1)));
  REQUIRE_FALSE(Hash128::parse(hex.substr(1) + "g"));
  REQUIRE(hash_bytes(std::as_bytes(std::span("hellp", 5))) != h);
}

TEST_CASE("names are validated with a reason", "[store]") {
  for (const char* ok : {"a", "after-pip-install", "worker-0", "v1.2_final", "A9"}) {
    INFO(ok);
    REQUIRE_FALSE(name_problem(ok));
  }
  struct Bad {
    std::string name, reason;
  };
  for (const Bad& bad : std::vector<Bad>{{"", "empty"},
                                         {std::string(129, 'a'), "at most 128"},
                                         {"a/b", "'/'"},
                                         {"a..b", "\"..\""},
                                         {"..", "start with a letter"},
                                         {".hidden", "start with a letter"},
                                         {"-rf", "start with a letter"},
                                         {"tab\tname", "control"},
                                         {"new\nline", "control"},
                                         {"sp ace", "' '"},
                                         {"caf\xc3\xa9", "non-ASCII"}}) {
    INFO(bad.name);
    auto problem = name_problem(bad.name);
    REQUIRE(problem);
    REQUIRE_THAT(*problem, Catch::Contains(bad.reason));
    REQUIRE_THROWS_WITH(check_name(bad.name), Catch::StartsWith("invalid name"));
  }
}

TEST_CASE("objects round trip through the store", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  const uint32_t cs = 64 * 1024;
  struct Case {
    std::string what;
    std::vector<std::byte> data;
  };
  std::vector<Case> cases = {
      {"empty", {}},
      {"one byte", random_bytes(1, 1)},
      {"a page less one", random_bytes(2, 4095)},
      {"one chunk exactly", random_bytes(3, cs)},
      {"a chunk and one byte", random_bytes(4, cs + 1)},
      {"odd-sized random", random_bytes(5, 3 * cs + 12345)},
      {"zero", std::vector<std::byte>(5 * cs + 7)},
      {"memory-like", make_data(6, 2 * 1024 * 1024 + 999)},
  };
  // Incompressible: already-compressed bytes (zstd output of random data does not shrink).
  cases.push_back({"incompressible", random_bytes(7, 4 * cs)});
  for (const Case& c : cases) {
    INFO(c.what);
    TransferOptions options;
    options.chunk_size = cs;
    ObjectRef ref = store->put_object(c.data, options);
    REQUIRE(ref.size == c.data.size());
    REQUIRE(ref.chunks.size() == (c.data.size() + cs - 1) / cs);

    std::vector<std::byte> back(c.data.size());
    store->materialize(ref, back);
    REQUIRE(back == c.data);

    // Into a dirty destination, zero chunks must be written too.
    std::vector<std::byte> dirty(c.data.size(), std::byte{0x5a});
    store->materialize(ref, dirty);
    REQUIRE(dirty == c.data);

    fs::path file = dir / "out.bin";
    store->materialize_file(ref, file);
    REQUIRE(fs::file_size(file) == c.data.size());
    std::string text = msb::test::read_text(file);
    REQUIRE(std::equal(text.begin(), text.end(), c.data.begin(),
                       [](char a, std::byte b) { return std::byte(a) == b; }));

    // A file stores to the same references as the buffer.
    REQUIRE(store->put_file(file, options) == ref);

    for (size_t i = 0; i < ref.chunks.size(); ++i) {
      auto piece = std::span(c.data).subspan(ref.chunk_offset(i), ref.chunk_length(i));
      REQUIRE(ref.chunks[i].has_value() == !is_all_zero(piece));
      if (ref.chunks[i])
        REQUIRE(store->get_chunk(*ref.chunks[i]) == std::vector(piece.begin(), piece.end()));
    }
  }
  // The all-zero object stored nothing; materialize_file left it sparse.
  TransferOptions options;
  options.chunk_size = cs;
  ObjectRef zero = store->put_object(std::vector<std::byte>(8 * cs), options);
  for (const auto& c : zero.chunks)
    REQUIRE_FALSE(c);
  store->materialize_file(zero, dir / "zero.bin");
  struct stat st;
  REQUIRE(::stat((dir / "zero.bin").c_str(), &st) == 0);
  REQUIRE(st.st_blocks == 0);
  REQUIRE(store->verify().ok());
}

TEST_CASE("materialize refuses a destination of the wrong size", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  ObjectRef ref = store->put_object(random_bytes(1, 10000));
  std::vector<std::byte> small(9999);
  REQUIRE_THROWS_WITH(store->materialize(ref, small), Catch::Contains("10000 bytes into 9999"));
}

TEST_CASE("identical data is stored once", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  std::vector<std::byte> data = make_data(42, 4 * 1024 * 1024);
  put_named(*store, "first", data);
  StoreStats one = store->stats();
  REQUIRE(one.chunks > 0);
  put_named(*store, "second", data);  // another name, same content
  Manifest other;
  other.meta = {{"different", true}};
  other.objects.emplace("again", store->put_object(data));
  store->set_name("third", store->put_manifest(other));
  StoreStats three = store->stats();
  REQUIRE(three.chunks == one.chunks);
  REQUIRE(three.stored_bytes == one.stored_bytes);
  REQUIRE(three.referenced_bytes == 2 * one.referenced_bytes);  // two manifests reference it
  REQUIRE(three.dedup_ratio == Approx(2.0));
  REQUIRE(three.compression_ratio > 1.0);

  // Repeated chunks inside one object are stored once too.
  TempDir dir2;
  auto store2 = Store::open(dir2 / "store");
  std::vector<std::byte> chunk = random_bytes(9, kDefaultChunkSize);
  std::vector<std::byte> repeated;
  for (int i = 0; i < 5; ++i)
    repeated.insert(repeated.end(), chunk.begin(), chunk.end());
  ObjectRef ref = store2->put_object(repeated);
  REQUIRE(ref.chunks.size() == 5);
  REQUIRE(store2->stats().chunks == 1);
}

TEST_CASE("a flipped byte in a chunk is reported with the chunk's name", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  std::vector<std::byte> data = random_bytes(11, 3 * kDefaultChunkSize);
  put_named(*store, "victim", data);
  Manifest m = store->get_manifest(*store->find_name("victim"));
  Hash128 chunk = *m.objects.at("data").chunks[1];
  flip_byte(store->chunk_path(chunk), 100);

  REQUIRE_THROWS_WITH(store->get_chunk(chunk),
                      Catch::Contains(chunk.hex()) && Catch::Contains("corrupt"));
  std::vector<std::byte> out(data.size());
  REQUIRE_THROWS_WITH(store->materialize(m.objects.at("data"), out), Catch::Contains(chunk.hex()));
  REQUIRE_THROWS_WITH(store->materialize_file(m.objects.at("data"), dir / "out"),
                      Catch::Contains(chunk.hex()));
  REQUIRE_FALSE(fs::exists(dir / "out"));  // nothing half-written is left
  REQUIRE(count_files(dir.path()) == count_files(dir / "store"));

  VerifyReport report = store->verify();
  REQUIRE(report.problems.size() == 1);
  REQUIRE_THAT(report.problems[0], Catch::Contains(chunk.hex()) && Catch::Contains("corrupt"));
}

TEST_CASE("verify reports missing chunks, damaged manifests and dangling names", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  Hash128 a = put_named(*store, "a", random_bytes(1, 2 * kDefaultChunkSize));
  Hash128 b = put_named(*store, "b", random_bytes(2, kDefaultChunkSize));
  Hash128 gone = put_named(*store, "gone", random_bytes(3, kDefaultChunkSize));
  Manifest parent;
  parent.manifests.push_back(gone);
  Hash128 p = store->put_manifest(parent);
  store->set_name("parent", p);
  REQUIRE(store->verify().ok());

  // A chunk that manifest a (still there) references; b damaged; gone's manifest removed while a
  // name and a parent manifest still point at it.
  Hash128 missing = *store->get_manifest(a).objects.at("data").chunks[1];
  fs::remove(store->chunk_path(missing));
  flip_byte(store->manifest_path(b), 5);
  fs::remove(store->manifest_path(gone));

  VerifyReport report = store->verify();
  std::string all;
  for (const auto& problem : report.problems)
    all += problem + "\n";
  INFO(all);
  CHECK_FALSE(report.ok());
  CHECK_THAT(all, Catch::Contains("manifest " + a.hex() + " (object \"data\") references chunk " +
                                  missing.hex() + ", which is missing"));
  CHECK_THAT(all, Catch::Contains("manifest " + b.hex() + " is corrupt"));
  CHECK_THAT(all, Catch::Contains("manifest " + p.hex() + " references manifest " + gone.hex() +
                                  ", which is missing"));
  CHECK_THAT(all, Catch::Contains("name \"gone\" points to manifest " + gone.hex() +
                                  ", which is missing"));
  CHECK(report.problems.size() == 4);  // and nothing else: a and its other chunk are fine
  REQUIRE_THROWS_WITH(store->get_chunk(missing),
                      Catch::Contains(missing.hex()) && Catch::Contains("missing"));

  // A name whose manifest is gone, as it reads once more.
  store->set_name("c", a);
  fs::remove(store->manifest_path(a));
  all.clear();
  for (const auto& problem : store->verify().problems)
    all += problem + "\n";
  CHECK_THAT(all, Catch::Contains("name \"a\" points to manifest " + a.hex()));
  CHECK_THAT(all, Catch::Contains("name \"c\" points to manifest " + a.hex()));
}

TEST_CASE("manifests, names and their rules", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  Manifest m;
  m.meta = {{"kind", "test"}, {"n", 3}};
  m.objects.emplace("memory", store->put_object(make_data(1, 1 << 20)));
  Hash128 h = store->put_manifest(m);
  REQUIRE(store->put_manifest(m) == h);  // same bytes, same name
  Manifest back = store->get_manifest(h);
  REQUIRE(back.meta == m.meta);
  REQUIRE(back.objects == m.objects);

  Manifest child;
  child.manifests.push_back(h);
  Hash128 ch = store->put_manifest(child);
  REQUIRE(store->get_manifest(ch).manifests == std::vector<Hash128>{h});

  // A manifest may only reference what is stored.
  Manifest dangling;
  ObjectRef fake;
  fake.size = 4096;
  fake.chunk_size = 4096;
  fake.chunks.push_back(hash_bytes(std::as_bytes(std::span("nope", 4))));
  dangling.objects.emplace("x", fake);
  REQUIRE_THROWS_WITH(store->put_manifest(dangling), Catch::Contains("not in the store"));

  store->set_name("snap", h);
  REQUIRE(store->find_name("snap") == h);
  REQUIRE_THROWS_WITH(store->set_name("snap", ch), Catch::Contains("already exists"));
  REQUIRE(store->find_name("snap") == h);
  store->set_name("snap", ch, /*replace=*/true);
  REQUIRE(store->find_name("snap") == ch);
  REQUIRE_THROWS_WITH(store->set_name("bad/name", h), Catch::Contains("invalid name"));
  REQUIRE_THROWS_WITH(store->set_name("ghost", hash_bytes({})),
                      Catch::Contains("not in the store"));
  store->set_name("other", h);
  auto names = store->list_names();
  REQUIRE(names.size() == 2);
  REQUIRE(names[0].first == "other");
  REQUIRE(store->remove_name("snap"));
  REQUIRE_FALSE(store->remove_name("snap"));
  REQUIRE_FALSE(store->find_name("snap"));
}

TEST_CASE("a store of a newer major version is refused", "[store]") {
  TempDir dir;
  Store::open(dir / "store").reset();
  fs::path version = dir / "store" / "store.json";
  REQUIRE_THAT(msb::test::read_text(version), Catch::Contains("\"1.0\""));

  msb::test::write_text(version, R"({"format": "msb-store", "version": "1.9"})");
  REQUIRE_NOTHROW(Store::open(dir / "store"));  // a newer minor version is readable

  msb::test::write_text(version, R"({"format": "msb-store", "version": "2.0"})");
  REQUIRE_THROWS_WITH(Store::open(dir / "store"),
                      Catch::Contains("format version 2.0") && Catch::Contains("upgrade msb"));
  msb::test::write_text(version, "garbage");
  REQUIRE_THROWS_WITH(Store::open(dir / "store"),
                      Catch::Contains("does not describe an msb store"));
}

TEST_CASE("gc keeps what names and live pins reach and removes the rest", "[store]") {
  TempDir dir;
  fs::path root = dir / "store";
  std::vector<std::byte> shared = random_bytes(1, 2 * kDefaultChunkSize);
  std::vector<std::byte> only_dead = random_bytes(2, 2 * kDefaultChunkSize);
  std::vector<std::byte> pinned_data = random_bytes(3, kDefaultChunkSize);
  std::vector<std::byte> dead_data(shared);
  dead_data.insert(dead_data.end(), only_dead.begin(), only_dead.end());
  std::optional<Pin> pin;
  Hash128 pinned;
  {
    auto store = Store::open(root);
    put_named(*store, "live", shared);
    put_named(*store, "dead", dead_data);
    pinned = put_named(*store, "pinned", pinned_data);
    pin = store->pin({pinned});
    REQUIRE(store->remove_name("dead"));
    REQUIRE(store->remove_name("pinned"));
    REQUIRE(store->stats().chunks == 5);
  }
  {
    auto store = open_exclusive(root);
    GcReport dry = store->gc(/*dry_run=*/true);
    REQUIRE(dry.chunks_removed == 2);
    REQUIRE(store->stats().chunks == 5);  // dry run removed nothing
    GcReport report = store->gc(false);
    REQUIRE(report.chunks_removed == 2);  // only the dead object's own chunks
    REQUIRE(report.manifests_removed == 1);
    REQUIRE(report.chunks_kept == 3);
    REQUIRE(store->verify().ok());
    std::vector<std::byte> out(pinned_data.size());
    Manifest m = store->get_manifest(pinned);
    store->materialize(m.objects.at("data"), out);
    REQUIRE(out == pinned_data);
  }
  pin->release();
  {
    auto store = open_exclusive(root);
    GcReport report = store->gc(false);
    REQUIRE(report.chunks_removed == 1);
    REQUIRE(report.manifests_removed == 1);
    REQUIRE(store->stats().chunks == 2);
    REQUIRE(store->verify().ok());
  }
}

TEST_CASE("a pin dies with its process, and gc then removes it", "[store][process]") {
  TempDir dir;
  fs::path root = dir / "store";
  {
    auto store = Store::open(root);
    put_named(*store, "held", random_bytes(1, kDefaultChunkSize));
  }
  fs::path out = dir / "pin.out";
  pid_t pid =
      msb::test::spawn_process({torture_binary(), "pin", root.string(), "held"}, out.string());
  for (int i = 0; i < 500 && msb::test::read_text(out).find("pinned") == std::string::npos; ++i) {
    ::usleep(10000);
  }
  REQUIRE(msb::test::read_text(out) == "pinned\n");
  {
    auto store = Store::open(root);
    REQUIRE(store->remove_name("held"));
    REQUIRE(store->stats().live_pins == 1);
  }
  {
    auto store = open_exclusive(root);
    GcReport report = store->gc(false);
    REQUIRE(report.chunks_removed == 0);  // the child's pin holds them
    REQUIRE(report.pins_removed == 0);
  }
  ::kill(pid, SIGKILL);
  REQUIRE(msb::test::wait_process(pid) == 128 + SIGKILL);
  {
    auto store = open_exclusive(root);
    GcReport report = store->gc(false);
    REQUIRE(report.pins_removed == 1);
    REQUIRE(report.chunks_removed == 1);
    REQUIRE(report.manifests_removed == 1);
  }
}

TEST_CASE("gc waits for a writer that is about to reference existing chunks", "[store]") {
  TempDir dir;
  fs::path root = dir / "store";
  std::vector<std::byte> data = random_bytes(5, 4 * kDefaultChunkSize);
  {
    auto store = Store::open(root);
    put_named(*store, "old", data);
    store->remove_name("old");  // its chunks are garbage now
  }
  // The writer finds every chunk already stored (dedup) and has not yet named its manifest.
  auto writer = Store::open(root);
  ObjectRef ref = writer->put_object(data);
  // gc cannot start while the writer has the store open: it gives up after its lock timeout.
  REQUIRE_THROWS_WITH(open_exclusive(root, 100), Catch::Contains("in use by other msb processes"));
  // One that waits longer has opened the store's lock (a second descriptor in this process) and is
  // polling it, not merely unscheduled, when the writer finishes.
  REQUIRE(open_descriptors(root / "lock") == 1);
  std::atomic<bool> gc_done{false};
  std::thread gc([&] {
    auto store = open_exclusive(root, 120000);
    store->gc(false);
    gc_done = true;
  });
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
       open_descriptors(root / "lock") < 2 && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  REQUIRE(open_descriptors(root / "lock") == 2);
  REQUIRE_FALSE(gc_done);
  Manifest m;
  m.objects.emplace("data", ref);
  writer->set_name("new", writer->put_manifest(m));
  writer.reset();
  gc.join();
  REQUIRE(gc_done);
  auto store = Store::open(root);
  REQUIRE(store->verify().ok());
  std::vector<std::byte> out(data.size());
  store->materialize(ref, out);
  REQUIRE(out == data);
}

TEST_CASE("gc gives up with a clear error while the store stays busy", "[store]") {
  TempDir dir;
  auto user = Store::open(dir / "store");
  REQUIRE_THROWS_WITH(open_exclusive(dir / "store", 200),
                      Catch::Contains("in use by other msb processes"));
  auto store = Store::open(dir / "store");
  REQUIRE_THROWS_WITH(store->gc(false), Catch::Contains("opened exclusively"));
}

TEST_CASE("writers killed with SIGKILL leave a consistent store and gc removes the debris",
          "[store][process]") {
  TempDir dir;
  fs::path root = dir / "store";
  Store::open(root).reset();
  std::mt19937 rng(2024);
  const int kKills = 30;
  for (int round = 0; round < kKills; ++round) {
    pid_t pid = msb::test::spawn_process(
        {torture_binary(), "write", root.string(), std::to_string(round % 3 + 1), "0"});
    ::usleep(20000 + rng() % 250000);
    ::kill(pid, SIGKILL);
    REQUIRE(msb::test::wait_process(pid) == 128 + SIGKILL);
    auto store = Store::open(root);
    VerifyReport report = store->verify();
    INFO("round " << round << ": " << (report.ok() ? "" : report.problems[0]));
    REQUIRE(report.ok());
  }
  // The kills landed mid-write: they left temporary files or pins of dead processes.
  REQUIRE(count_files(root / "tmp") + count_files(root / "pins") > 0);
  {
    auto store = open_exclusive(root);
    GcReport report = store->gc(false);
    REQUIRE(report.temp_files_removed + report.pins_removed > 0);
    REQUIRE(count_files(root / "tmp") == 0);
    REQUIRE(count_files(root / "pins") == 0);  // every pin's process is dead
    REQUIRE(store->verify().ok());
    REQUIRE(store->stats().names > 0);
  }
  // Whatever survived reads back exactly as written.
  auto check = msb::test::run_process({torture_binary(), "read", root.string(), "1"});
  INFO(check.err);
  REQUIRE(check.exit_code == 0);
}

TEST_CASE("concurrent writers, readers and gc share one store", "[store][process]") {
  TempDir dir;
  fs::path root = dir / "store";
  Store::open(root).reset();
  std::vector<pid_t> writers, others;
  for (int seed : {1, 2, 3}) {
    writers.push_back(msb::test::spawn_process(
        {torture_binary(), "write", root.string(), std::to_string(seed), "12"}));
  }
  fs::path log = dir / "others.log";
  for (const char* mode : {"read", "read", "gc"}) {
    others.push_back(msb::test::spawn_process(
        {torture_binary(), mode, root.string(), "4000"},
        (dir / (std::string(mode) + std::to_string(others.size()))).string()));
  }
  // Readers in this process too: threads, each with its own Store handle.
  std::atomic<int> thread_failures{0};
  std::atomic<uint64_t> thread_checks{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      try {
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
        while (std::chrono::steady_clock::now() < deadline) {
          auto store = Store::open(root);
          for (const auto& [name, listed] : store->list_names()) {
            std::optional<Hash128> hash = store->find_name(name);
            if (!hash) continue;
            Manifest m = store->get_manifest(*hash);
            const ObjectRef& ref = m.objects.at("data");
            std::vector<std::byte> out(ref.size);
            store->materialize(ref, out);
            if (out != make_data(m.meta["seed"].get<uint64_t>(), ref.size)) ++thread_failures;
            ++thread_checks;
          }
        }
      } catch (const std::exception& e) {
        UNSCOPED_INFO(e.what());
        ++thread_failures;
      }
    });
  }
  for (pid_t pid : writers)
    REQUIRE(msb::test::wait_process(pid) == 0);
  for (size_t i = 0; i < others.size(); ++i) {
    int code = msb::test::wait_process(others[i]);
    INFO(msb::test::read_text(dir / (std::string(i == 2 ? "gc" : "read") + std::to_string(i))));
    REQUIRE(code == 0);
  }
  for (auto& t : threads)
    t.join();
  REQUIRE(thread_failures == 0);
  REQUIRE(thread_checks > 0);
  auto store = Store::open(root);
  REQUIRE(store->verify().ok());
  REQUIRE(store->stats().names > 0);
}

TEST_CASE("progress is reported up to the total", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  std::vector<std::byte> data = make_data(3, 3 * kDefaultChunkSize + 5);
  uint64_t last = 0, total = 0;
  int calls = 0;
  TransferOptions options;
  options.progress = [&](uint64_t done, uint64_t t) {
    REQUIRE(done >= last);
    last = done;
    total = t;
    ++calls;
  };
  ObjectRef ref = store->put_object(data, options);
  REQUIRE(calls >= 1);
  REQUIRE(last == data.size());
  REQUIRE(total == data.size());
  last = 0;
  std::vector<std::byte> out(data.size());
  store->materialize(ref, out, options);
  REQUIRE(last == data.size());
}

TEST_CASE("object references in JSON are checked", "[store]") {
  ObjectRef ref;
  ref.size = 10000;
  ref.chunk_size = 4096;
  ref.chunks = {std::nullopt, hash_bytes({}), std::nullopt};
  REQUIRE(ObjectRef::from_json(ref.to_json()) == ref);
  nlohmann::json j = ref.to_json();
  j["chunks"].erase(0);
  REQUIRE_THROWS_WITH(ObjectRef::from_json(j), Catch::Contains("expected 3"));
  j = ref.to_json();
  j["chunk_size"] = 1000;
  REQUIRE_THROWS_WITH(ObjectRef::from_json(j), Catch::Contains("invalid chunk size"));
  j = ref.to_json();
  j["chunks"][1] = "xyz";
  REQUIRE_THROWS_WITH(ObjectRef::from_json(j), Catch::Contains("malformed chunk hash"));
  REQUIRE_THROWS_WITH(Manifest::parse(R"({"format": 9})", "manifest X"),
                      Catch::Contains("format 9"));
  REQUIRE_THROWS_WITH(Manifest::parse("{", "manifest X"), Catch::Contains("not valid JSON"));
}

namespace {

// A ChunkReader over a buffer that records which chunks it was asked for.
struct CountingReader {
  CountingReader(std::span<const std::byte> data, uint32_t chunk_size)
      : data(data), chunk_size(chunk_size) {}
  std::span<const std::byte> data;
  uint32_t chunk_size;
  std::mutex mutex;
  std::vector<size_t> indexes;
  std::atomic<int> wrong_lengths{0};

  Store::ChunkReader reader() {
    return [this](size_t index, std::span<std::byte> out) {
      {
        std::lock_guard lock(mutex);
        indexes.push_back(index);
      }
      const uint64_t offset = uint64_t{chunk_size} * index;
      if (out.size() != std::min<uint64_t>(chunk_size, data.size() - offset)) ++wrong_lengths;
      std::memcpy(out.data(), data.data() + offset, out.size());
    };
  }
  std::vector<size_t> sorted() {
    std::vector<size_t> out = indexes;
    std::sort(out.begin(), out.end());
    return out;
  }
};

std::vector<size_t> all_indexes(size_t count) {
  std::vector<size_t> out(count);
  for (size_t i = 0; i < count; ++i)
    out[i] = i;
  return out;
}

}  // namespace

TEST_CASE("incremental puts read only the changed chunks and keep the parent's", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  const uint32_t cs = 64 * 1024;
  TransferOptions options;
  options.chunk_size = cs;
  // 20 chunks, the last one short; chunk 2 zero.
  std::vector<std::byte> data = make_data(21, 19 * cs + 5000);
  std::fill_n(data.begin() + 2 * cs, cs, std::byte{0});
  const ObjectRef parent = store->put_object(data, options);
  REQUIRE(!parent.chunks[2]);
  REQUIRE(parent.chunks[9]);
  const size_t files_before = count_files(dir / "store" / "chunks");

  // Chunk 2 becomes non-zero, 5 new content, 9 zero, 12 unchanged though listed, 19 (short) new.
  std::vector<std::byte> next = data;
  std::fill_n(next.begin() + 2 * cs + 100, 10, std::byte{1});
  auto fresh = random_bytes(22, cs);
  std::copy(fresh.begin(), fresh.end(), next.begin() + 5 * cs);
  std::fill_n(next.begin() + 9 * cs, cs, std::byte{0});
  std::fill_n(next.begin() + 19 * cs + 7, 3, std::byte{0xee});
  const std::vector<size_t> changed = {2, 5, 9, 12, 19};

  CountingReader reader{next, cs};
  uint64_t last = 0, total = 0;
  options.progress = [&](uint64_t done, uint64_t t) {
    last = done;
    total = t;
  };
  const ObjectRef ref =
      store->put_object_changes(next.size(), parent, changed, reader.reader(), options);
  CHECK(reader.sorted() == changed);
  CHECK(reader.wrong_lengths == 0);
  CHECK(total == 4 * cs + 5000);
  CHECK(last == total);
  for (size_t i = 0; i < ref.chunks.size(); ++i) {
    INFO("chunk " << i);
    if (std::find(changed.begin(), changed.end(), i) == changed.end() || i == 12) {
      CHECK(ref.chunks[i] == parent.chunks[i]);
    } else {
      CHECK(ref.chunks[i] != parent.chunks[i]);
    }
  }
  CHECK(!ref.chunks[9]);
  // The same references as a full put of the new bytes, and three new chunk files (2, 5, 19).
  options.progress = nullptr;
  CHECK(ref == store->put_object(next, options));
  CHECK(count_files(dir / "store" / "chunks") == files_before + 3);
  std::vector<std::byte> back(next.size());
  store->materialize(ref, back);
  CHECK(back == next);
  store->materialize_file(ref, dir / "next.bin");
  CHECK(msb::test::read_text(dir / "next.bin") ==
        std::string(reinterpret_cast<const char*>(next.data()), next.size()));

  // Nothing changed: nothing is read, and the result is the parent.
  CountingReader idle{next, cs};
  CHECK(store->put_object_changes(next.size(), ref, {}, idle.reader(), options) == ref);
  CHECK(idle.indexes.empty());

  // A manifest referencing the result can be published; the store stays consistent.
  Manifest m;
  m.objects.emplace("data", ref);
  store->set_name("incremental", store->put_manifest(m));
  CHECK(store->verify().ok());
}

TEST_CASE("incremental puts without a matching parent read every chunk", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  const uint32_t cs = 64 * 1024;
  TransferOptions options;
  options.chunk_size = cs;
  std::vector<std::byte> data = make_data(31, 6 * cs + 123);
  const ObjectRef full = store->put_object(data, options);
  const size_t count = full.chunks.size();

  struct Case {
    std::string what;
    std::optional<ObjectRef> parent;
  };
  std::vector<Case> cases = {{"no parent", std::nullopt}};
  cases.push_back({"another size", store->put_object(std::span(data).first(5 * cs), options)});
  TransferOptions other = options;
  other.chunk_size = 2 * cs;
  cases.push_back({"another chunk size", store->put_object(data, other)});
  ObjectRef malformed = full;
  malformed.chunks.pop_back();
  cases.push_back({"a malformed parent", malformed});
  for (const Case& c : cases) {
    INFO(c.what);
    CountingReader reader{data, cs};
    // `changed` means nothing against another geometry: ignored, even if out of range.
    ObjectRef ref =
        store->put_object_changes(data.size(), c.parent, {1, 100}, reader.reader(), options);
    CHECK(reader.sorted() == all_indexes(count));
    CHECK(reader.wrong_lengths == 0);
    CHECK(ref == full);
  }
  // The store's chunk size is the default one.
  CountingReader reader{data, kDefaultChunkSize};
  ObjectRef ref = store->put_object_changes(data.size(), full, {0}, reader.reader());
  CHECK(ref.chunk_size == kDefaultChunkSize);
  CHECK(reader.sorted() == all_indexes(ref.chunks.size()));
  // Empty objects read nothing.
  CountingReader none{{}, cs};
  CHECK(store->put_object_changes(0, std::nullopt, {}, none.reader(), options).chunks.empty());
  CHECK(none.indexes.empty());
}

TEST_CASE("incremental puts store zero chunks as null and check the change list", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  const uint32_t cs = 64 * 1024;
  TransferOptions options;
  options.chunk_size = cs;
  // An all-zero parent (a fresh disk's delta) with no chunk read.
  std::vector<std::byte> zero(8 * cs);
  CountingReader reader{zero, cs};
  ObjectRef parent =
      store->put_object_changes(zero.size(), std::nullopt, {}, reader.reader(), options);
  CHECK(reader.indexes.size() == 8);
  CHECK(std::all_of(parent.chunks.begin(), parent.chunks.end(),
                    [](const ChunkRef& c) { return !c; }));
  CHECK(count_files(dir / "store" / "chunks") == 0);
  std::vector<std::byte> next = zero;
  next[3 * cs + 17] = std::byte{9};
  CountingReader one{next, cs};
  ObjectRef ref = store->put_object_changes(next.size(), parent, {3, 4}, one.reader(), options);
  CHECK(one.sorted() == std::vector<size_t>{3, 4});
  CHECK(ref.chunks[3]);
  CHECK(ref.nonzero_bytes() == cs);

  CHECK_THROWS_WITH(store->put_object_changes(next.size(), parent, {4, 3}, one.reader(), options),
                    Catch::Contains("ascending"));
  CHECK_THROWS_WITH(store->put_object_changes(next.size(), parent, {3, 3}, one.reader(), options),
                    Catch::Contains("ascending"));
  CHECK_THROWS_WITH(store->put_object_changes(next.size(), parent, {8}, one.reader(), options),
                    Catch::Contains("below 8"));
}

TEST_CASE("a failing chunk reader stops an incremental put and leaves the store consistent",
          "[store]") {
  TempDir dir;
  const fs::path root = dir / "store";
  const uint32_t cs = 64 * 1024;
  TransferOptions options;
  options.chunk_size = cs;
  std::vector<std::byte> data = make_data(41, 32 * cs);
  {
    auto store = Store::open(root);
    const ObjectRef parent = store->put_object(data, options);
    Manifest m;
    m.objects.emplace("data", parent);
    store->set_name("parent", store->put_manifest(m));
    std::vector<std::byte> next = random_bytes(42, data.size());
    std::atomic<int> calls{0};
    auto failing = [&](size_t index, std::span<std::byte> out) {
      ++calls;
      if (index == 20) throw std::runtime_error("the guest's memory went away");
      std::memcpy(out.data(), next.data() + uint64_t{cs} * index, out.size());
    };
    CHECK_THROWS_WITH(
        store->put_object_changes(data.size(), parent, all_indexes(32), failing, options),
        Catch::Contains("went away"));
    CHECK(calls <= 32);
    CHECK(count_files(root / "tmp") == 0);  // pending chunks were removed
    CHECK(store->verify().ok());
    // The store still works.
    CountingReader reader{next, cs};
    ObjectRef ref = store->put_object_changes(next.size(), parent, {20}, reader.reader(), options);
    std::vector<std::byte> back(next.size());
    store->materialize(ref, back);
    CHECK(std::equal(back.begin() + 20 * cs, back.begin() + 21 * cs, next.begin() + 20 * cs));
    CHECK(std::equal(back.begin(), back.begin() + 20 * cs, data.begin()));
  }
  auto gc_store = open_exclusive(root);
  gc_store->gc(false);
  CHECK(gc_store->verify().ok());
  CHECK(gc_store->stats().names == 1);
}

TEST_CASE("materialize_file leaves zero pages inside chunks as holes", "[store]") {
  TempDir dir;
  auto store = Store::open(dir / "store");
  // One 256 KiB chunk: pages 0, 5-7 and 63 non-zero, the rest zero; and a short last chunk.
  std::vector<std::byte> data(kDefaultChunkSize + 6000);
  for (size_t page : {0, 5, 6, 7, 63})
    std::fill_n(data.begin() + page * 4096 + 11, 100, std::byte{7});
  data.back() = std::byte{1};
  ObjectRef ref = store->put_object(data);
  REQUIRE(ref.chunks[0]);
  store->materialize_file(ref, dir / "out");
  CHECK(msb::test::read_text(dir / "out") ==
        std::string(reinterpret_cast<const char*>(data.data()), data.size()));
  struct stat st;
  REQUIRE(::stat((dir / "out").c_str(), &st) == 0);
  CHECK(st.st_blocks * 512 <= 6 * 4096);  // five pages and the tail's last page
}
