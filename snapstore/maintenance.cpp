// Store: stats, verify and gc. All three scan the store's folders and walk what names and live
// pins reach; gc then deletes the rest.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "snapstore/chunk_codec.h"
#include "snapstore/error.h"
#include "snapstore/parallel.h"
#include "snapstore/store.h"

namespace msb::snapstore {
namespace fs = std::filesystem;

namespace {

struct ChunkFile {
  Hash128 hash;
  fs::path path;
  uint64_t size;
};

struct PinFile {
  fs::path path;
  bool live;
  std::vector<Hash128> manifests;
};

// What names and live pins reach.
struct Reach {
  std::unordered_set<Hash128> manifests;
  std::unordered_map<Hash128, uint32_t> chunks;  // chunk -> its length
  uint64_t objects = 0, logical_bytes = 0, referenced_bytes = 0;
};

uint64_t size_on_disk(const fs::path& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

std::vector<ChunkFile> scan_chunks(const fs::path& root, std::vector<std::string>* problems) {
  std::vector<ChunkFile> out;
  for (const auto& dir : fs::directory_iterator(root / "chunks")) {
    const std::string prefix = dir.path().filename().string();
    if (!dir.is_directory()) {
      if (problems) problems->push_back("unexpected file " + dir.path().string());
      continue;
    }
    for (const auto& entry : fs::directory_iterator(dir.path())) {
      std::optional<Hash128> hash = Hash128::parse(entry.path().filename().string());
      if (!hash || hash->hex().substr(0, 2) != prefix || !entry.is_regular_file()) {
        if (problems) problems->push_back("unexpected file " + entry.path().string());
        continue;
      }
      out.push_back({*hash, entry.path(), size_on_disk(entry.path())});
    }
  }
  return out;
}

std::vector<std::pair<Hash128, fs::path>> scan_manifests(const fs::path& root,
                                                         std::vector<std::string>* problems) {
  std::vector<std::pair<Hash128, fs::path>> out;
  for (const auto& entry : fs::directory_iterator(root / "manifests")) {
    std::string file = entry.path().filename().string();
    std::optional<Hash128> hash;
    if (file.size() == 37 && file.ends_with(".json")) hash = Hash128::parse(file.substr(0, 32));
    if (!hash) {
      if (problems) problems->push_back("unexpected file " + entry.path().string());
      continue;
    }
    out.emplace_back(*hash, entry.path());
  }
  return out;
}

// A pin is live while the process that made it (or a child that inherited it) holds its flock.
std::vector<PinFile> scan_pins(const fs::path& root, std::vector<std::string>* problems) {
  std::vector<PinFile> out;
  for (const auto& entry : fs::directory_iterator(root / "pins")) {
    PinFile pin{entry.path(), false, {}};
    int raw = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (raw < 0) continue;  // released meanwhile
    UniqueFd fd(raw);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK) throw_errno("cannot lock " + entry.path().string());
      pin.live = true;
    }
    if (pin.live) {
      nlohmann::json doc =
          nlohmann::json::parse(read_all(fd.get(), entry.path().string()), nullptr, false);
      bool ok = doc.is_object() && doc.contains("manifests") && doc["manifests"].is_array();
      if (ok) {
        for (const auto& item : doc["manifests"]) {
          std::optional<Hash128> h;
          if (item.is_string()) h = Hash128::parse(item.get_ref<const std::string&>());
          if (!h) ok = false;
          if (h) pin.manifests.push_back(*h);
        }
      }
      if (!ok) {
        std::string problem = "pin " + entry.path().string() + " is malformed";
        if (!problems) throw StoreError(problem);
        problems->push_back(problem);
      }
    }
    out.push_back(std::move(pin));
  }
  return out;
}

// Walks from the roots. With `problems` null a manifest that cannot be read is an error (gc must
// not guess what it references); otherwise it is recorded and the walk goes on.
Reach walk(const Store& store, const std::vector<std::pair<Hash128, std::string>>& roots,
           std::vector<std::string>* problems) {
  Reach reach;
  std::deque<std::pair<Hash128, std::string>> queue(roots.begin(), roots.end());
  while (!queue.empty()) {
    auto [hash, via] = queue.front();
    queue.pop_front();
    if (!reach.manifests.insert(hash).second) continue;
    Manifest manifest;
    try {
      manifest = store.get_manifest(hash);
    } catch (const StoreError& e) {
      std::string problem = std::string(e.what()) + " (reached from " + via + ")";
      if (!problems) throw StoreError(problem + "; run msb store verify");
      problems->push_back(problem);
      continue;
    }
    for (const auto& [key, object] : manifest.objects) {
      ++reach.objects;
      reach.logical_bytes += object.size;
      for (size_t i = 0; i < object.chunks.size(); ++i) {
        if (!object.chunks[i]) continue;
        reach.referenced_bytes += object.chunk_length(i);
        reach.chunks.emplace(*object.chunks[i], object.chunk_length(i));
      }
    }
    for (const Hash128& child : manifest.manifests)
      queue.emplace_back(child, via);
  }
  return reach;
}

std::vector<std::pair<Hash128, std::string>> roots_of(
    const std::vector<std::pair<std::string, Hash128>>& names, const std::vector<PinFile>& pins) {
  std::vector<std::pair<Hash128, std::string>> roots;
  for (const auto& [name, hash] : names)
    roots.emplace_back(hash, "name \"" + name + "\"");
  for (const PinFile& pin : pins) {
    if (!pin.live) continue;
    for (const Hash128& hash : pin.manifests)
      roots.emplace_back(hash, "pin " + pin.path.string());
  }
  return roots;
}

uint64_t count_entries(const fs::path& dir) {
  uint64_t n = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(dir))
    ++n;
  return n;
}

}  // namespace

StoreStats Store::stats() const {
  StoreStats s;
  std::vector<ChunkFile> chunks = scan_chunks(root_, nullptr);
  s.chunks = chunks.size();
  for (const ChunkFile& c : chunks) {
    s.stored_bytes += c.size;
    long long length = detail::ChunkCodec::content_size(root_fd_.get(), c.path.string());
    if (length > 0) s.chunk_bytes += static_cast<uint64_t>(length);
  }
  auto manifests = scan_manifests(root_, nullptr);
  s.manifests = manifests.size();
  for (const auto& [hash, path] : manifests)
    s.manifest_bytes += size_on_disk(path);
  std::vector<std::string> ignored;
  auto names = scan_names(&ignored);
  s.names = names.size();
  std::vector<PinFile> pins = scan_pins(root_, &ignored);
  for (const PinFile& p : pins)
    s.live_pins += p.live ? 1 : 0;
  Reach reach = walk(*this, roots_of(names, pins), &ignored);
  s.objects = reach.objects;
  s.logical_bytes = reach.logical_bytes;
  s.referenced_bytes = reach.referenced_bytes;
  uint64_t unique_bytes = 0;
  for (const auto& [hash, length] : reach.chunks)
    unique_bytes += length;
  if (unique_bytes > 0) s.dedup_ratio = double(s.referenced_bytes) / double(unique_bytes);
  if (s.stored_bytes > 0) s.compression_ratio = double(s.chunk_bytes) / double(s.stored_bytes);
  s.temp_files = count_entries(root_ / "tmp");
  return s;
}

VerifyReport Store::verify() const {
  VerifyReport report;
  std::vector<std::string>& problems = report.problems;

  // Every chunk: decodable, and its content hashes to its name.
  std::vector<ChunkFile> chunks = scan_chunks(root_, &problems);
  report.chunks = chunks.size();
  std::unordered_set<Hash128> present;
  for (const ChunkFile& c : chunks)
    present.insert(c.hash);
  unsigned workers = thread_count({});
  auto codecs = detail::make_codecs(workers, options_.zstd_level);
  std::mutex mutex;
  detail::parallel_for(chunks.size(), workers, [&](size_t i, unsigned w) {
    try {
      codecs[w]->read(root_fd_.get(), chunks[i].path.string(), chunks[i].hash);
    } catch (const StoreError& e) {
      std::lock_guard lock(mutex);
      problems.push_back(e.what());
    }
  });

  // Every manifest: intact, and everything it references is present.
  auto manifests = scan_manifests(root_, &problems);
  report.manifests = manifests.size();
  std::unordered_set<Hash128> manifest_set;
  for (const auto& [hash, path] : manifests)
    manifest_set.insert(hash);
  for (const auto& [hash, path] : manifests) {
    Manifest manifest;
    try {
      manifest = get_manifest(hash);
    } catch (const StoreError& e) {
      problems.push_back(e.what());
      continue;
    }
    for (const auto& [key, object] : manifest.objects) {
      for (const ChunkRef& chunk : object.chunks) {
        if (chunk && !present.count(*chunk)) {
          problems.push_back("manifest " + hash.hex() + " (object \"" + key +
                             "\") references chunk " + chunk->hex() + ", which is missing");
        }
      }
    }
    for (const Hash128& child : manifest.manifests) {
      if (!manifest_set.count(child)) {
        problems.push_back("manifest " + hash.hex() + " references manifest " + child.hex() +
                           ", which is missing");
      }
    }
  }

  // Every name and live pin points at a present manifest.
  auto names = scan_names(&problems);
  report.names = names.size();
  for (const auto& [name, hash] : names) {
    if (!manifest_set.count(hash)) {
      problems.push_back("name \"" + name + "\" points to manifest " + hash.hex() +
                         ", which is missing");
    }
  }
  for (const PinFile& pin : scan_pins(root_, &problems)) {
    if (!pin.live) continue;
    ++report.pins;
    for (const Hash128& hash : pin.manifests) {
      if (!manifest_set.count(hash)) {
        problems.push_back("pin " + pin.path.string() + " holds manifest " + hash.hex() +
                           ", which is missing");
      }
    }
  }
  report.temp_files = count_entries(root_ / "tmp");
  return report;
}

GcReport Store::gc(bool dry_run) {
  if (!options_.exclusive) {
    throw StoreError("gc needs the store at " + root_.string() + " opened exclusively");
  }
  GcReport report;
  // Exclusive lock: no other process is writing, so everything not reached is garbage, and a
  // corrupt name, pin or reachable manifest stops gc before it deletes anything.
  auto names = scan_names(nullptr);
  std::vector<PinFile> pins = scan_pins(root_, nullptr);
  Reach reach = walk(*this, roots_of(names, pins), nullptr);

  auto remove = [&](const fs::path& path) {
    if (dry_run) return;
    std::error_code ec;
    fs::remove(path, ec);
    if (ec) throw StoreError("gc cannot remove " + path.string() + ": " + ec.message());
  };
  for (const PinFile& pin : pins) {
    if (pin.live) continue;
    remove(pin.path);
    ++report.pins_removed;
  }
  // Manifests before chunks: if gc is interrupted, no manifest is left without its chunks.
  for (const auto& [hash, path] : scan_manifests(root_, nullptr)) {
    if (reach.manifests.count(hash)) {
      ++report.manifests_kept;
    } else {
      remove(path);
      ++report.manifests_removed;
    }
  }
  for (const ChunkFile& chunk : scan_chunks(root_, nullptr)) {
    if (reach.chunks.count(chunk.hash)) {
      ++report.chunks_kept;
    } else {
      remove(chunk.path);
      ++report.chunks_removed;
      report.chunk_bytes_removed += chunk.size;
    }
  }
  for (const auto& entry : fs::directory_iterator(root_ / "tmp")) {
    remove(entry.path());
    ++report.temp_files_removed;
  }
  return report;
}

}  // namespace msb::snapstore
