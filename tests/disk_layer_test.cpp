// Unit tier: the disk overlay's read-only middle layer (a snapshot's disk delta) and the
// snapshot helpers (read_delta, delta_map, take_changed_blocks), without KVM.
#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "tests/support.h"
#include "vmm/disk_overlay.h"

using namespace msb;
using namespace msb::vmm;
using msb::test::TempDir;
namespace fs = std::filesystem;

namespace {

constexpr uint64_t kBlock = DiskOverlay::kBlockSize;

std::string text_of(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

std::vector<std::byte> bytes_of(const std::string& text) {
  const auto* begin = reinterpret_cast<const std::byte*>(text.data());
  return std::vector<std::byte>(begin, begin + text.size());
}

std::vector<std::byte> read_all(const DiskOverlay& disk) {
  std::vector<std::byte> out(disk.size());
  disk.read(0, out);
  return out;
}

std::vector<std::byte> filled(size_t size, uint8_t value) {
  return std::vector<std::byte>(size, std::byte{value});
}

// A map file's bytes, as DiskOverlay writes them: header, then one bit per block.
std::string map_bytes(uint64_t disk_size, const std::vector<uint64_t>& blocks,
                      uint64_t block_size = kBlock) {
  std::string out(32, '\0');
  std::memcpy(out.data(), "MSBOVL1", 8);
  std::memcpy(out.data() + 8, &disk_size, 8);
  std::memcpy(out.data() + 16, &block_size, 8);
  out.resize(32 + ((disk_size + kBlock - 1) / kBlock + 7) / 8, '\0');
  for (uint64_t block : blocks)
    out[32 + block / 8] = static_cast<char>(out[32 + block / 8] | (1 << (block % 8)));
  return out;
}

// A layer made by hand: block b of `blocks` filled with 0xa0 + b, the data file disk-sized.
void write_layer(const fs::path& path, uint64_t disk_size, const std::vector<uint64_t>& blocks) {
  std::string data(disk_size, '\0');
  for (uint64_t block : blocks) {
    const uint64_t start = block * kBlock;
    std::memset(data.data() + start, 0xa0 + static_cast<int>(block),
                std::min(kBlock, disk_size - start));
  }
  test::write_text(path, data);
  test::write_text(path.string() + ".map", map_bytes(disk_size, blocks));
}

// What a snapshot stores: the delta's bytes and its map, as a layer for the next generation.
void materialize_delta(const DiskOverlay& disk, const fs::path& path) {
  std::vector<std::byte> delta(disk.size());
  disk.read_delta(0, delta);
  test::write_text(path, text_of(delta));
  test::write_text(path.string() + ".map", disk.delta_map());
}

// Random writes, some unaligned and spanning blocks, applied to the disk and to a model of it.
void random_writes(DiskOverlay& disk, std::vector<std::byte>& model, uint64_t seed, int count) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < count; ++i) {
    const uint64_t offset = rng() % disk.size();
    const uint64_t length = 1 + rng() % std::min<uint64_t>(3 * kBlock, disk.size() - offset);
    std::vector<std::byte> data = test::make_data(rng(), length);
    disk.write(offset, data);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<ptrdiff_t>(offset));
  }
}

}  // namespace

TEST_CASE("disk reads go through overlay, layer and base", "[devices][disk]") {
  TempDir dir;
  // 16 whole blocks and a partial one: the disk is 16 blocks + 1024 bytes.
  const auto base_data = test::make_data(11, 16 * kBlock + 1000);
  test::write_text(dir / "base", text_of(base_data));
  const uint64_t size = 16 * kBlock + 1024;
  write_layer(dir / "layer", size, {2, 3, 5, 16});

  auto disk = DiskOverlay::open(dir / "base", dir / "over", 0, dir / "layer");
  REQUIRE(disk->size() == size);
  CHECK(disk->layer_path() == (dir / "layer").string());
  disk->write(3 * kBlock, filled(kBlock, 0xc3));
  disk->write(7 * kBlock, filled(kBlock, 0xc7));

  std::vector<std::byte> expected = base_data;
  expected.resize(size);
  for (uint64_t block : {2, 3, 5}) {
    std::fill_n(expected.begin() + block * kBlock, kBlock, std::byte(0xa0 + block));
  }
  std::fill(expected.begin() + 16 * kBlock, expected.end(), std::byte{0xb0});
  std::fill_n(expected.begin() + 3 * kBlock, kBlock, std::byte{0xc3});
  std::fill_n(expected.begin() + 7 * kBlock, kBlock, std::byte{0xc7});
  CHECK(read_all(*disk) == expected);
  // An unaligned read across every source.
  std::vector<std::byte> part(6 * kBlock + 77);
  disk->read(kBlock + 5, part);
  CHECK(std::equal(part.begin(), part.end(), expected.begin() + kBlock + 5));
  // Only the overlay's blocks are "written"; the delta is the union.
  CHECK(disk->written_blocks() == std::vector<uint64_t>{3, 7});
  CHECK(disk->delta_blocks() == 5);
  // The same after a reopen with the same layer.
  disk.reset();
  disk = DiskOverlay::open(dir / "base", dir / "over", 0, dir / "layer");
  CHECK(read_all(*disk) == expected);

  // A blank disk (no base) with a layer.
  write_layer(dir / "blank-layer", 1 << 20, {0, 255});
  auto blank = DiskOverlay::open("", dir / "blank", 1 << 20, dir / "blank-layer");
  std::vector<std::byte> block(kBlock);
  blank->read(0, block);
  CHECK(block == filled(kBlock, 0xa0));
  blank->read(kBlock, block);
  CHECK(block == filled(kBlock, 0));
  blank->read(255 * kBlock, block);
  CHECK(block == filled(kBlock, static_cast<uint8_t>(0xa0 + 255)));
}

TEST_CASE("partial writes copy up from the layer, which is never modified", "[devices][disk]") {
  TempDir dir;
  const auto base_data = test::make_data(12, 8 * kBlock);
  test::write_text(dir / "base", text_of(base_data));
  write_layer(dir / "layer", 8 * kBlock, {1, 2, 6});
  const std::string layer_before = test::read_text(dir / "layer");
  const std::string map_before = test::read_text(dir / "layer.map");

  std::vector<std::byte> expected = base_data;
  for (uint64_t block : {1, 2, 6}) {
    std::fill_n(expected.begin() + block * kBlock, kBlock, std::byte(0xa0 + block));
  }
  {
    auto disk = DiskOverlay::open(dir / "base", dir / "over", 0, dir / "layer");
    // Inside a layer block, inside a base block, and across a layer/base boundary (2 -> 3).
    disk->write(kBlock + 100, filled(100, 0x11));
    disk->write(4 * kBlock + 300, filled(10, 0x22));
    disk->write(3 * kBlock - 50, filled(100, 0x33));
    std::fill_n(expected.begin() + kBlock + 100, 100, std::byte{0x11});
    std::fill_n(expected.begin() + 4 * kBlock + 300, 10, std::byte{0x22});
    std::fill_n(expected.begin() + 3 * kBlock - 50, 100, std::byte{0x33});
    CHECK(read_all(*disk) == expected);
    CHECK(disk->written_blocks() == std::vector<uint64_t>{1, 2, 3, 4});
    random_writes(*disk, expected, 5, 40);
    CHECK(read_all(*disk) == expected);
    disk->flush();
  }
  {
    auto disk = DiskOverlay::open(dir / "base", dir / "over", 0, dir / "layer");
    CHECK(read_all(*disk) == expected);
  }
  CHECK(test::read_text(dir / "layer") == layer_before);
  CHECK(test::read_text(dir / "layer.map") == map_before);
  CHECK(bytes_of(test::read_text(dir / "base")) == base_data);
  // Read-only files are enough: the layer is opened O_RDONLY.
  fs::permissions(dir / "layer", fs::perms::owner_read);
  fs::permissions(dir / "layer.map", fs::perms::owner_read);
  auto disk = DiskOverlay::open(dir / "base", dir / "over2", 0, dir / "layer");
  disk->write(6 * kBlock + 1, filled(1, 0x44));
  std::vector<std::byte> block(kBlock);
  disk->read(6 * kBlock, block);
  CHECK(block[0] == std::byte{0xa6});
  CHECK(block[1] == std::byte{0x44});
}

TEST_CASE("the disk delta is the layer under the overlay, zeros elsewhere", "[devices][disk]") {
  TempDir dir;
  const auto base_data = test::make_data(13, 12 * kBlock + 512);
  test::write_text(dir / "base", text_of(base_data));
  const uint64_t size = 12 * kBlock + 512;
  write_layer(dir / "layer", size, {1, 4, 5, 12});
  auto disk = DiskOverlay::open(dir / "base", dir / "over", 0, dir / "layer");
  disk->write(4 * kBlock + 10, filled(20, 0x55));  // over a layer block, copied up
  disk->write(8 * kBlock, filled(2 * kBlock, 0x66));
  const std::vector<std::byte> seen = read_all(*disk);

  std::vector<std::byte> delta(size);
  disk->read_delta(0, delta);
  const std::vector<uint64_t> in_delta = {1, 4, 5, 8, 9, 12};
  for (uint64_t block = 0; block * kBlock < size; ++block) {
    INFO("block " << block);
    const uint64_t start = block * kBlock, end = std::min(size, start + kBlock);
    const bool member = std::count(in_delta.begin(), in_delta.end(), block) == 1;
    if (member) {
      CHECK(std::equal(delta.begin() + start, delta.begin() + end, seen.begin() + start));
    } else {
      CHECK(std::all_of(delta.begin() + start, delta.begin() + end,
                        [](std::byte b) { return b == std::byte{0}; }));
    }
  }
  CHECK(disk->delta_blocks() == in_delta.size());
  CHECK(disk->delta_map() == map_bytes(size, in_delta));
  // Pieces read alone, from several threads at once, match the whole.
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t offset = static_cast<uint64_t>(t) * 1000; offset < size; offset += 4000) {
        std::vector<std::byte> piece(std::min<uint64_t>(5000, size - offset));
        disk->read_delta(offset, piece);
        if (!std::equal(piece.begin(), piece.end(), delta.begin() + offset)) ++mismatches;
      }
    });
  }
  for (auto& thread : threads)
    thread.join();
  CHECK(mismatches == 0);
  CHECK_THROWS_WITH(disk->read_delta(size - 10, std::span(delta.data(), 20)),
                    Catch::Contains("past the disk's end"));

  // Without a layer the delta is the overlay alone.
  auto plain = DiskOverlay::open(dir / "base", dir / "plain");
  CHECK(plain->delta_blocks() == 0);
  CHECK(plain->delta_map() == map_bytes(size, {}));
  plain->write(2 * kBlock + 7, filled(1, 0x77));
  CHECK(plain->delta_map() == map_bytes(size, {2}));
}

TEST_CASE("snapshots of restored disks chain over generations", "[devices][disk]") {
  TempDir dir;
  const uint64_t size = 64 * kBlock + 512;
  const auto base_data = test::make_data(14, size - 300);
  test::write_text(dir / "base", text_of(base_data));
  std::vector<std::byte> model = base_data;
  model.resize(size);

  // Generation 0 runs on the base alone; each later one on the base and the previous delta.
  std::string layer;
  for (int generation = 0; generation < 4; ++generation) {
    INFO("generation " << generation);
    const std::string overlay = (dir / ("over" + std::to_string(generation))).string();
    auto disk = DiskOverlay::open(dir / "base", overlay, 0, layer);
    // A restored disk reads exactly as the snapshotted one did.
    REQUIRE(read_all(*disk) == model);
    if (generation == 3) break;
    random_writes(*disk, model, 100 + static_cast<uint64_t>(generation), 25);
    REQUIRE(read_all(*disk) == model);
    // The delta holds every block that differs from the base, and never loses one.
    std::vector<std::byte> padded_base = base_data;
    padded_base.resize(size);
    std::vector<std::byte> delta(size);
    disk->read_delta(0, delta);
    for (uint64_t block = 0; block * kBlock < size; ++block) {
      const uint64_t start = block * kBlock, end = std::min(size, start + kBlock);
      if (!std::equal(model.begin() + start, model.begin() + end, padded_base.begin() + start)) {
        REQUIRE(std::equal(delta.begin() + start, delta.begin() + end, model.begin() + start));
      }
    }
    const uint64_t before = disk->delta_blocks();
    layer = (dir / ("delta" + std::to_string(generation))).string();
    materialize_delta(*disk, layer);
    auto check = DiskOverlay::open(dir / "base", overlay + ".check", 0, layer);
    CHECK(check->delta_blocks() == before);
  }
}

TEST_CASE("take_changed_blocks names the blocks written since the last call", "[devices][disk]") {
  TempDir dir;
  write_layer(dir / "layer", 32 * kBlock, {0, 1});
  {
    auto disk = DiskOverlay::open("", dir / "over", 32 * kBlock, dir / "layer");
    CHECK(disk->take_changed_blocks().empty());  // layer blocks are not changes
    disk->write(kBlock, filled(kBlock, 1));
    disk->write(5 * kBlock + 10, filled(10, 2));
    CHECK(disk->take_changed_blocks() == std::vector<uint64_t>{1, 5});
    CHECK(disk->take_changed_blocks().empty());
    // Rewriting a block already in the overlay is a change again.
    disk->write(kBlock + 8, filled(8, 3));
    disk->write(2 * kBlock - 1, filled(2 * kBlock + 2, 4));  // blocks 1-4
    disk->write(31 * kBlock, filled(kBlock, 5));
    CHECK(disk->take_changed_blocks() == std::vector<uint64_t>{1, 2, 3, 4, 31});
    std::vector<std::byte> out(kBlock);
    disk->read(0, out);  // reads change nothing
    CHECK(disk->take_changed_blocks().empty());
    CHECK(disk->written_blocks() == std::vector<uint64_t>{1, 2, 3, 4, 5, 31});
  }
  // A new open starts a new set: earlier writes are in the overlay, not in the set.
  auto disk = DiskOverlay::open("", dir / "over", 32 * kBlock, dir / "layer");
  CHECK(disk->take_changed_blocks().empty());
  CHECK(disk->written_blocks().size() == 6);
  CHECK(disk->delta_blocks() == 7);
}

TEST_CASE("a bad layer is refused with an error naming its file", "[devices][disk]") {
  TempDir dir;
  const uint64_t size = 16 * kBlock + 512;  // 17 blocks: the bitmap's last byte is partial
  test::write_text(dir / "base", std::string(size, 'b'));
  auto open_with = [&](const fs::path& layer) {
    return DiskOverlay::open(dir / "base", dir / "over", 0, layer);
  };
  // Missing files.
  CHECK_THROWS_WITH(open_with(dir / "missing"), Catch::Contains("missing: cannot open"));
  test::write_text(dir / "nomap", std::string(size, '\0'));
  CHECK_THROWS_WITH(open_with(dir / "nomap"), Catch::Contains("nomap.map: cannot open"));
  // A map for another disk size.
  write_layer(dir / "other", size, {1});
  test::write_text(dir / "other.map", map_bytes(size + 4096, {1}));
  CHECK_THROWS_WITH(open_with(dir / "other"),
                    Catch::Contains("other.map") && Catch::Contains("made for a disk of"));
  // A data file of another size.
  write_layer(dir / "short", size, {1});
  test::write_text(dir / "short", std::string(size - 512, '\0'));
  CHECK_THROWS_WITH(open_with(dir / "short"),
                    Catch::Contains("short: a layer of") && Catch::Contains("for a disk of"));
  // Garbage, a short header, a wrong block size.
  write_layer(dir / "garbage", size, {1});
  std::string garbage = map_bytes(size, {1});
  garbage[0] = 'X';
  test::write_text(dir / "garbage.map", garbage);
  CHECK_THROWS_WITH(open_with(dir / "garbage"),
                    Catch::Contains("garbage.map") && Catch::Contains("not an msb overlay map"));
  test::write_text(dir / "garbage.map", "MSBOVL1");
  CHECK_THROWS_WITH(open_with(dir / "garbage"), Catch::Contains("not an msb overlay map"));
  test::write_text(dir / "garbage.map", "");
  CHECK_THROWS_WITH(open_with(dir / "garbage"), Catch::Contains("not an msb overlay map"));
  test::write_text(dir / "garbage.map", map_bytes(size, {1}, 512));
  CHECK_THROWS_WITH(open_with(dir / "garbage"), Catch::Contains("not an msb overlay map"));
  // A bitmap too short or too long.
  std::string map = map_bytes(size, {1});
  test::write_text(dir / "garbage.map", map.substr(0, map.size() - 1));
  CHECK_THROWS_WITH(open_with(dir / "garbage"),
                    Catch::Contains("garbage.map: has 34 bytes, not the 35"));
  test::write_text(dir / "garbage.map", map + std::string(1000, '\xff'));
  CHECK_THROWS_WITH(open_with(dir / "garbage"), Catch::Contains("garbage.map: has 1035 bytes"));
  // Bits for blocks past the disk's end.
  map.back() = static_cast<char>(0x03);  // blocks 16 (the last) and 17 (none)
  test::write_text(dir / "garbage.map", map);
  CHECK_THROWS_WITH(open_with(dir / "garbage"),
                    Catch::Contains("garbage.map: names blocks past the disk's end"));
  // None of these created the overlay.
  CHECK_FALSE(fs::exists(dir / "over"));
  CHECK_FALSE(fs::exists(dir / "over.map"));
  map.back() = static_cast<char>(0x01);
  test::write_text(dir / "garbage.map", map);
  CHECK(open_with(dir / "garbage")->delta_blocks() == 2);
}
