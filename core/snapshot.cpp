#include "core/snapshot.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "core/archive.h"
#include "core/control_client.h"
#include "core/control_protocol.h"
#include "core/images.h"
#include "core/sandbox.h"
#include "core/snapshot_staging.h"
#include "core/test_hooks.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "snapstore/name.h"

namespace msb::core {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using snapstore::Hash128;
using snapstore::Manifest;
using snapstore::ObjectRef;
using snapstore::Store;
using snapstore::UniqueFd;

namespace {

constexpr size_t kMinHandlePrefix = 6;
constexpr unsigned kMaxForks = 1000;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

std::string unnamed_name(const std::string& sandbox, const std::string& handle) {
  return kInternalNamePrefix + sandbox + "." + handle;
}

std::string parent_name(const std::string& sandbox) {
  return kInternalNamePrefix + sandbox + ".parent";
}

// The image manifest a sandbox's config names (its disk's base), if any.
std::optional<Hash128> image_of(const nlohmann::json& config) {
  if (!config.contains("image") || !config["image"].is_object()) return std::nullopt;
  return Hash128::parse(config["image"].value("manifest", std::string()));
}

bool is_internal(std::string_view name) {
  return name.starts_with(kInternalNamePrefix);
}

// For an internal name: the sandbox and what follows it ("parent" or a handle).
std::optional<std::pair<std::string, std::string>> split_internal(std::string_view name) {
  if (!is_internal(name)) return std::nullopt;
  std::string_view rest = name.substr(std::strlen(kInternalNamePrefix));
  size_t dot = rest.rfind('.');
  if (dot == std::string_view::npos || dot == 0) return std::nullopt;
  return std::pair{std::string(rest.substr(0, dot)), std::string(rest.substr(dot + 1))};
}

bool is_hex(std::string_view s) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(uint8_t(c)); });
}

// A sandbox's control connection, or a SnapshotError saying it is not running.
ControlConnection connect_to(const Home& home, const std::string& sandbox) {
  Sandbox box = Sandbox::open(home, sandbox);
  UniqueFd fd = connect_unix(box.dir() / "control.sock");
  if (!fd) {
    SandboxInfo info = box.info();
    throw SnapshotError("sandbox " + in_quotes(sandbox) + " is not running (" + info.state + ")");
  }
  return ControlConnection(std::move(fd));
}

nlohmann::json read_response(ControlConnection& connection, const std::string& sandbox,
                             const std::string& what, std::chrono::seconds timeout) {
  bool timed_out = false;
  auto frame = connection.read_frame(Clock::now() + timeout, &timed_out);
  if (!frame) {
    throw SnapshotError(
        what + " of sandbox " + in_quotes(sandbox) +
        (timed_out ? ": its VMM did not answer in time" : ": its VMM went away (it stopped?)"));
  }
  auto body = nlohmann::json::parse(frame->payload, nullptr, false);
  if (frame->type != control::kResponse || !body.is_object()) {
    throw SnapshotError(what + " of sandbox " + in_quotes(sandbox) + ": unexpected answer");
  }
  if (body.contains("error")) {
    throw SnapshotError(what + " of sandbox " + in_quotes(sandbox) + ": " +
                        body["error"].get<std::string>());
  }
  return body;
}

nlohmann::json simple_request(const Home& home, const std::string& sandbox, const std::string& op) {
  ControlConnection connection = connect_to(home, sandbox);
  connection.send_request({{"op", op}});
  return read_response(connection, sandbox, op, std::chrono::seconds(60));
}

// A read-only view of another process's staging memfd.
class StagingView {
 public:
  StagingView(int pid, int fd, const std::string& sandbox) {
    fs::path path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    fd_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd_) {
      snapstore::throw_errno("snapshot of sandbox " + in_quotes(sandbox) +
                             ": cannot open its staging area " + path.string());
    }
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) snapstore::throw_errno("fstat " + path.string());
    size_ = static_cast<size_t>(st.st_size);
    if (size_ == 0)
      throw SnapshotError("snapshot of sandbox " + in_quotes(sandbox) + ": empty staging area");
    void* map = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_.get(), 0);
    if (map == MAP_FAILED) snapstore::throw_errno("cannot map " + path.string());
    data_ = static_cast<const std::byte*>(map);
  }
  ~StagingView() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
  }
  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  UniqueFd fd_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// The chunks (and their stored sizes) an object list references.
std::set<Hash128> chunks_of(const Manifest& manifest) {
  std::set<Hash128> out;
  for (const auto& [name, ref] : manifest.objects)
    for (const auto& chunk : ref.chunks)
      if (chunk) out.insert(*chunk);
  return out;
}

uint64_t stored_size(const Store& store, const std::set<Hash128>& chunks) {
  uint64_t total = 0;
  for (const auto& hash : chunks) {
    struct stat st {};
    if (::stat(store.chunk_path(hash).c_str(), &st) == 0) total += uint64_t(st.st_size);
  }
  return total;
}

Manifest snapshot_manifest(const Store& store, const Hash128& hash, const std::string& ref) {
  Manifest manifest = store.get_manifest(hash);
  if (manifest.meta.value("kind", "") != "snapshot") {
    throw SnapshotError(in_quotes(ref) + " is not a snapshot (it is a " +
                        manifest.meta.value("kind", std::string("manifest")) + ")");
  }
  if (manifest.meta.value("format", "") != kSnapshotFormat ||
      manifest.meta.value("version", 0) != kSnapshotFormatVersion) {
    throw SnapshotError("snapshot " + hash.hex() + " has format " +
                        manifest.meta.value("format", std::string("?")) + " version " +
                        std::to_string(manifest.meta.value("version", 0)) + "; this msb reads " +
                        kSnapshotFormat + " version " + std::to_string(kSnapshotFormatVersion));
  }
  return manifest;
}

SnapshotInfo describe(const Store& store, const Hash128& hash, const Manifest& manifest) {
  SnapshotInfo info;
  info.handle = hash.hex();
  const auto& meta = manifest.meta;
  info.source = meta.value("source", std::string());
  info.created = meta.value("created", std::string());
  info.parent = meta["parent"].is_string() ? meta["parent"].get<std::string>() : "";
  const auto& config = meta.value("config", nlohmann::json::object());
  info.cpus = config.value("cpus", 0u);
  info.max_cpus = config.value("max_cpus", 0u);
  info.memory_mib = config.value("memory_mib", uint64_t{0});
  info.max_memory_mib = config.value("max_memory_mib", uint64_t{0});
  if (auto it = manifest.objects.find("memory"); it != manifest.objects.end()) {
    info.memory_bytes = it->second.size;
  }
  if (auto it = manifest.objects.find("disk"); it != manifest.objects.end()) {
    info.disk_bytes = it->second.size;
    info.disk_delta_bytes = it->second.nonzero_bytes();
  }
  std::set<Hash128> mine = chunks_of(manifest);
  info.total_bytes = stored_size(store, mine);
  std::set<Hash128> added = mine;
  if (auto parent = Hash128::parse(info.parent); parent && store.has_manifest(*parent)) {
    for (const auto& hash : chunks_of(store.get_manifest(*parent)))
      added.erase(hash);
  }
  info.stored_bytes = stored_size(store, added);
  return info;
}

}  // namespace

nlohmann::json SnapshotInfo::to_json() const {
  return {{"handle", handle},
          {"names", names},
          {"source", source},
          {"created", created},
          {"parent", parent.empty() ? nlohmann::json() : nlohmann::json(parent)},
          {"cpus", cpus},
          {"max_cpus", max_cpus},
          {"memory_mib", memory_mib},
          {"max_memory_mib", max_memory_mib},
          {"memory_bytes", memory_bytes},
          {"disk_bytes", disk_bytes},
          {"disk_delta_bytes", disk_delta_bytes},
          {"stored_bytes", stored_bytes},
          {"total_bytes", total_bytes},
          {"unnamed", unnamed_alive}};
}

nlohmann::json SnapshotCreateResult::to_json(const std::string& sandbox) const {
  return {{"handle", handle},
          {"sandbox", sandbox},
          {"parent", parent.empty() ? nlohmann::json() : nlohmann::json(parent)},
          {"paused_ms", paused_ms},
          {"capture_ms", capture_ms},
          {"store_ms", store_ms},
          {"total_ms", total_ms},
          {"memory_bytes", memory_bytes},
          {"stored_bytes", stored_bytes},
          {"memory_chunks", memory_chunks},
          {"memory_chunks_read", memory_chunks_read},
          {"disk_chunks_read", disk_chunks_read}};
}

void pause_sandbox(const Home& home, const std::string& sandbox) {
  simple_request(home, sandbox, "pause");
}

void resume_sandbox(const Home& home, const std::string& sandbox) {
  simple_request(home, sandbox, "resume");
}

SnapshotCreateResult create_snapshot(const Home& home, const std::string& sandbox,
                                     const SnapshotCreateOptions& options) {
  const auto start = Clock::now();
  Sandbox box = Sandbox::open(home, sandbox);
  nlohmann::json config = nlohmann::json::parse(snapstore::read_file(box.dir() / "config.json"));
  ControlConnection connection = connect_to(home, sandbox);
  connection.send_request({{"op", "snapshot"}, {"resume", options.resume}});
  nlohmann::json captured =
      read_response(connection, sandbox, "snapshot", std::chrono::seconds(300));

  SnapshotCreateResult result;
  result.paused_ms = captured.value("paused_ms", 0.0);
  result.capture_ms = captured.value("capture_ms", 0.0);
  const auto store_start = Clock::now();
  StagingView staging(captured.at("pid").get<int>(), captured.at("staging_fd").get<int>(), sandbox);
  nlohmann::json header;
  auto layout = parse_staging(staging.bytes(), header);
  if (!layout)
    throw SnapshotError("snapshot of sandbox " + in_quotes(sandbox) + ": malformed staging area");
  // Test hooks (core/test_hooks.h) mark each step from here on: the VMM holds the capture (and
  // stages it), this process has mapped it and stored nothing yet.
  test_hook("snapshot-captured");
  const std::byte* area = staging.bytes().data();

  auto store = home.open_store();
  std::optional<Hash128> parent;
  std::optional<Manifest> parent_manifest;
  if (header["parent"].is_string()) {
    parent = Hash128::parse(header["parent"].get<std::string>());
    if (!parent || !store->has_manifest(*parent)) {
      // Someone removed the snapshot this one is incremental to: start a new chain.
      connection.send_request({{"op", "snapshot_commit"}, {"handle", ""}});
      throw SnapshotError("snapshot of sandbox " + in_quotes(sandbox) +
                          ": the snapshot it builds on (" + header["parent"].get<std::string>() +
                          ") is no longer in the store; take it again for a full snapshot");
    }
    parent_manifest = store->get_manifest(*parent);
  }
  auto parent_object = [&](const std::string& name) -> std::optional<ObjectRef> {
    if (!parent_manifest) return std::nullopt;
    auto it = parent_manifest->objects.find(name);
    if (it == parent_manifest->objects.end()) return std::nullopt;
    return it->second;
  };

  const uint64_t chunk = layout->chunk_size;
  const uint64_t staged_bytes = chunk * (layout->memory_staged.size() + layout->disk_staged.size());
  uint64_t done_before = 0;
  snapstore::TransferOptions transfer;
  transfer.chunk_size = layout->chunk_size;
  if (options.progress) {
    transfer.progress = [&](uint64_t done, uint64_t) {
      options.progress(std::min(staged_bytes, done_before + done), staged_bytes);
    };
  }

  // Stores one object: the chunks listed in `changed` come from their staging slot (`slot_offset`
  // of the i-th staged chunk) or, when not staged, are zero; every other chunk is the parent's.
  auto put_staged = [&](const char* what, uint64_t size, const std::vector<uint64_t>& staged,
                        std::vector<size_t> changed, const std::optional<ObjectRef>& parent,
                        const std::function<uint64_t(size_t)>& slot_offset) {
    std::vector<int64_t> slot_of((size + chunk - 1) / chunk, -1);
    for (size_t i = 0; i < staged.size(); ++i) {
      if (staged[i] >= slot_of.size()) {
        throw SnapshotError("snapshot of sandbox " + in_quotes(sandbox) + ": staged " + what +
                            " chunk " + std::to_string(staged[i]) + " is out of range");
      }
      slot_of[staged[i]] = int64_t(i);
    }
    std::erase_if(changed, [&](size_t index) { return index >= slot_of.size(); });
    std::sort(changed.begin(), changed.end());
    // Test hook: halfway through the staged memory chunks, when those read before it (but for
    // the ones other workers still compress) are in the store's temporary files or, deduplicated,
    // in place.
    const bool hooked = std::string_view(what) == "memory";
    const size_t hook_at = std::max<size_t>(1, staged.size() / 2);
    std::atomic<size_t> staged_reads{0};
    ObjectRef ref = store->put_object_changes(
        size, parent, changed,
        [&](size_t index, std::span<std::byte> out) {
          int64_t slot = slot_of.at(index);
          if (slot < 0) {
            std::memset(out.data(), 0, out.size());
          } else {
            std::memcpy(out.data(), area + slot_offset(size_t(slot)), out.size());
            if (hooked && staged_reads.fetch_add(1) + 1 == hook_at) {
              test_hook("snapshot-storing-memory");
            }
          }
        },
        transfer);
    done_before += chunk * staged.size();
    return ref;
  };

  // Memory: the staged chunks, and the zero ones, over the parent's.
  std::vector<size_t> memory_changed(layout->memory_staged.begin(), layout->memory_staged.end());
  memory_changed.insert(memory_changed.end(), layout->memory_zero.begin(),
                        layout->memory_zero.end());
  Manifest manifest;
  manifest.objects["memory"] =
      put_staged("memory", layout->memory_size, layout->memory_staged, memory_changed,
                 parent_object("memory"), [&](size_t i) { return layout->memory_slot(i); });
  const size_t memory_chunks = (layout->memory_size + chunk - 1) / chunk;
  if (layout->has_disk) {
    // A first snapshot's delta is all zero outside the staged chunks: an all-zero parent makes
    // the store read only those.
    std::optional<ObjectRef> disk_parent = parent_object("disk");
    if (!disk_parent) {
      disk_parent = ObjectRef{layout->disk_size, layout->chunk_size, {}};
      disk_parent->chunks.resize((layout->disk_size + chunk - 1) / chunk);
    }
    manifest.objects["disk"] =
        put_staged("disk", layout->disk_size, layout->disk_staged,
                   std::vector<size_t>(layout->disk_staged.begin(), layout->disk_staged.end()),
                   disk_parent, [&](size_t i) { return layout->disk_slot(i); });
    manifest.objects["disk.map"] =
        store->put_object(std::span(area + layout->disk_map_offset, layout->disk_map_size));
  }
  config.erase("restore");
  config.erase("name");
  config.erase("created");
  manifest.meta = {{"kind", "snapshot"},
                   {"format", kSnapshotFormat},
                   {"version", kSnapshotFormatVersion},
                   {"created", utc_timestamp()},
                   {"source", sandbox},
                   {"parent", parent ? nlohmann::json(parent->hex()) : nlohmann::json()},
                   {"config", config},
                   {"machine", header.at("state")}};
  if (parent) manifest.manifests.push_back(*parent);
  if (auto image = image_of(config)) manifest.manifests.push_back(*image);
  test_hook("snapshot-stored");  // every chunk in place; no manifest yet
  Hash128 hash = store->put_manifest(manifest);
  test_hook("snapshot-manifest");  // the manifest stored; no name holds it yet
  store->set_name(unnamed_name(sandbox, hash.hex()), hash, /*replace=*/true);
  test_hook("snapshot-named");  // named; the VMM has not heard of it yet

  // The snapshot is stored and named now, whatever happens to the VMM: a VMM that died meanwhile
  // has nothing to build its next snapshot on anyway.
  try {
    connection.send_request({{"op", "snapshot_commit"}, {"handle", hash.hex()}});
    read_response(connection, sandbox, "snapshot", std::chrono::seconds(60));
  } catch (const std::exception&) {
  }
  test_hook("snapshot-committed");  // the VMM's next snapshot builds on this one (if it lives)

  result.handle = hash.hex();
  result.parent = parent ? parent->hex() : "";
  result.memory_bytes = layout->memory_size;
  result.memory_chunks = memory_chunks;
  result.memory_chunks_read = memory_changed.size();
  result.disk_chunks_read = layout->disk_staged.size();
  std::set<Hash128> added = chunks_of(manifest);
  if (parent_manifest)
    for (const auto& h : chunks_of(*parent_manifest))
      added.erase(h);
  result.stored_bytes = stored_size(*store, added);
  result.store_ms = ms_since(store_start);
  result.total_ms = ms_since(start);
  return result;
}

std::string resolve_snapshot(const Store& store, const std::string& ref) {
  if (ref.empty()) throw SnapshotError("a snapshot name or handle cannot be empty");
  if (!snapstore::name_problem(ref)) {
    if (auto hash = store.find_name(ref)) return hash->hex();
  }
  std::string lower = ref;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](char c) { return char(std::tolower(uint8_t(c))); });
  if (is_hex(lower) && lower.size() >= kMinHandlePrefix && lower.size() <= 32) {
    if (lower.size() == 32) {
      if (auto hash = Hash128::parse(lower); hash && store.has_manifest(*hash)) return lower;
    }
    std::set<std::string> matches;
    for (const auto& [name, hash] : store.list_names()) {
      std::string hex = hash.hex();
      if (hex.starts_with(lower)) matches.insert(hex);
    }
    if (matches.size() == 1) return *matches.begin();
    if (matches.size() > 1) {
      throw SnapshotError("snapshot handle prefix " + in_quotes(ref) + " is ambiguous (" +
                          std::to_string(matches.size()) + " snapshots start with it)");
    }
  }
  throw SnapshotError("no snapshot " + in_quotes(ref));
}

std::string save_named(const Home& home, const std::string& ref, const std::string& name,
                       bool replace) {
  if (auto problem = snapstore::name_problem(name)) {
    throw SnapshotError("invalid snapshot name " + in_quotes(name) + ": " + *problem);
  }
  if (is_internal(name)) {
    throw SnapshotError("invalid snapshot name " + in_quotes(name) + ": names starting with \"" +
                        kInternalNamePrefix + "\" are msb's own");
  }
  if (name.starts_with(kImageNamePrefix)) {
    throw SnapshotError("invalid snapshot name " + in_quotes(name) + ": names starting with \"" +
                        kImageNamePrefix + "\" are msb's own (image tags)");
  }
  auto store = home.open_store();
  std::string handle = resolve_snapshot(*store, ref);
  Hash128 hash = *Hash128::parse(handle);
  snapshot_manifest(*store, hash, ref);
  if (!replace) {
    if (auto existing = store->find_name(name)) {
      if (*existing == hash) return handle;
      throw SnapshotError("snapshot name " + in_quotes(name) +
                          " is taken (msb snapshot save-named --force replaces it)");
    }
  }
  store->set_name(name, hash, replace);
  return handle;
}

std::vector<SnapshotInfo> list_snapshots(const Home& home) {
  auto store = home.open_store();
  std::map<std::string, SnapshotInfo> by_handle;
  std::map<std::string, std::pair<std::vector<std::string>, bool>> holders;
  for (const auto& [name, hash] : store->list_names()) {
    auto& holder = holders[hash.hex()];
    if (auto internal = split_internal(name)) {
      if (internal->second != "parent") holder.second = true;
    } else if (!is_internal(name)) {
      holder.first.push_back(name);
    }
  }
  std::vector<SnapshotInfo> out;
  for (const auto& [handle, holder] : holders) {
    if (holder.first.empty() && !holder.second) continue;  // only restored sandboxes hold it
    Hash128 hash = *Hash128::parse(handle);
    Manifest manifest;
    try {
      manifest = store->get_manifest(hash);
    } catch (const std::exception&) {
      continue;  // msb store verify reports damaged manifests
    }
    if (manifest.meta.value("kind", "") != "snapshot") continue;
    SnapshotInfo info = describe(*store, hash, manifest);
    info.names = holder.first;
    info.unnamed_alive = holder.second;
    out.push_back(std::move(info));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::tie(a.created, a.handle) < std::tie(b.created, b.handle);
  });
  return out;
}

SnapshotInfo inspect_snapshot(const Home& home, const std::string& ref, bool verify,
                              std::vector<std::string>* problems, nlohmann::json* manifest_meta) {
  auto store = home.open_store();
  std::string handle = resolve_snapshot(*store, ref);
  Hash128 hash = *Hash128::parse(handle);
  Manifest manifest = snapshot_manifest(*store, hash, ref);
  SnapshotInfo info = describe(*store, hash, manifest);
  for (const auto& [name, target] : store->list_names()) {
    if (target != hash) continue;
    if (auto internal = split_internal(name)) {
      if (internal->second != "parent") info.unnamed_alive = true;
    } else if (!is_internal(name)) {
      info.names.push_back(name);
    }
  }
  if (verify && problems) {
    for (const auto& [object, objref] : manifest.objects) {
      for (size_t i = 0; i < objref.chunks.size(); ++i) {
        if (!objref.chunks[i]) continue;
        try {
          store->get_chunk(*objref.chunks[i]);
        } catch (const std::exception& e) {
          problems->push_back("snapshot " + handle + ", " + object + " chunk " + std::to_string(i) +
                              ": " + e.what());
        }
      }
    }
    if (!info.parent.empty()) {
      auto parent = Hash128::parse(info.parent);
      if (!parent || !store->has_manifest(*parent)) {
        problems->push_back("snapshot " + handle + ": its parent " + info.parent + " is missing");
      }
    }
  }
  if (manifest_meta) *manifest_meta = manifest.meta;
  return info;
}

void remove_snapshot(const Home& home, const std::string& ref) {
  auto store = home.open_store();
  if (!snapstore::name_problem(ref) && !is_internal(ref) && store->find_name(ref)) {
    Hash128 hash = *store->find_name(ref);
    snapshot_manifest(*store, hash, ref);
    store->remove_name(ref);
    return;
  }
  std::string handle = resolve_snapshot(*store, ref);
  for (const auto& [name, hash] : store->list_names()) {
    if (hash.hex() != handle) continue;
    if (auto internal = split_internal(name); internal && internal->second != "parent") {
      throw SnapshotError("snapshot " + handle + " has no name: it lives until sandbox " +
                          in_quotes(internal->first) + " is removed (msb rm " + internal->first +
                          ")");
    }
  }
  throw SnapshotError("snapshot " + handle + " has no name to remove");
}

fs::path snapshot_cache_dir(const Home& home, const std::string& handle) {
  return home.root() / "cache" / "snapshots" / handle;
}

fs::path materialize_snapshot(const Home& home, const Store& store, const std::string& handle,
                              const snapstore::ProgressFn& progress, double* materialize_ms,
                              const Manifest* known_manifest) {
  const auto start = Clock::now();
  fs::path dir = snapshot_cache_dir(home, handle);
  fs::create_directories(dir.parent_path());
  // One materializer per snapshot at a time; the others wait and then find it done.
  fs::path lock_path = dir.parent_path() / (handle + ".lock");
  UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock || ::flock(lock.get(), LOCK_EX) != 0)
    snapstore::throw_errno("cannot lock " + lock_path.string());
  std::optional<Manifest> loaded;
  if (!known_manifest) loaded = snapshot_manifest(store, *Hash128::parse(handle), handle);
  const Manifest& manifest = known_manifest ? *known_manifest : *loaded;
  auto complete = [&] {
    if (!fs::exists(dir / "complete") || !fs::exists(dir / "state.json")) return false;
    for (const auto& [name, ref] : manifest.objects) {
      std::error_code ec;
      if (fs::file_size(dir / name, ec) != ref.size || ec) return false;
    }
    return true;
  };
  if (complete()) {
    if (materialize_ms) *materialize_ms = 0;
    return dir;
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir);
  try {
    write_file_atomically(dir / "state.json", manifest.meta.at("machine").dump());
    uint64_t total = 0, before = 0;
    for (const auto& [name, ref] : manifest.objects)
      total += ref.size;
    for (const auto& [name, ref] : manifest.objects) {
      snapstore::TransferOptions transfer;
      if (progress) {
        transfer.progress = [&, before](uint64_t done, uint64_t) {
          progress(before + done, total);
        };
      }
      store.materialize_file(ref, dir / name, transfer);
      before += ref.size;
    }
    write_file_atomically(dir / "complete", handle + "\n");
  } catch (const std::exception& e) {
    fs::remove_all(dir, ec);
    throw SnapshotError("snapshot " + handle + ": " + e.what());
  }
  if (materialize_ms) *materialize_ms = ms_since(start);
  return dir;
}

RestoreResult restore_snapshot(const Home& home, const std::string& ref,
                               const RestoreOptions& options) {
  const auto start = Clock::now();
  if (options.name.empty()) throw SnapshotError("restore needs --name");
  if (options.fork > kMaxForks) {
    throw SnapshotError("--fork " + std::to_string(options.fork) + " is over the limit of " +
                        std::to_string(kMaxForks));
  }
  std::vector<std::string> names;
  if (options.fork == 0) {
    names.push_back(options.name);
  } else {
    for (unsigned i = 0; i < options.fork; ++i)
      names.push_back(options.name + "-" + std::to_string(i));
  }
  for (const auto& name : names) {
    if (auto problem = snapstore::name_problem(name)) {
      throw SnapshotError("invalid sandbox name " + in_quotes(name) + ": " + *problem);
    }
    if (fs::exists(home.root() / "sandboxes" / name)) {
      throw SnapshotError("sandbox " + in_quotes(name) + " already exists");
    }
  }
  for (const auto& entry : options.env)
    check_env_entry("--env", entry);

  auto store = home.open_store();
  std::string handle = resolve_snapshot(*store, ref);
  Hash128 hash = *Hash128::parse(handle);
  Manifest manifest = snapshot_manifest(*store, hash, ref);
  const nlohmann::json& source = manifest.meta.at("config");
  const unsigned max_cpus = source.at("max_cpus").get<unsigned>();
  const uint64_t max_memory = source.at("max_memory_mib").get<uint64_t>();
  const unsigned cpus = options.cpus.value_or(source.at("cpus").get<unsigned>());
  const uint64_t memory = options.memory_mib.value_or(source.at("memory_mib").get<uint64_t>());
  if (cpus == 0) throw SnapshotError("--cpus must be at least 1");
  if (cpus > max_cpus) {
    throw SnapshotError("--cpus " + std::to_string(cpus) + " is over the snapshot's --max-cpus " +
                        std::to_string(max_cpus) + " (the ceiling it was created with)");
  }
  if (memory < 16) throw SnapshotError("--memory must be at least 16 MiB");
  if (memory > max_memory) {
    throw SnapshotError("--memory " + std::to_string(memory) +
                        " MiB is over the snapshot's --max-memory " + std::to_string(max_memory) +
                        " MiB (the ceiling it was created with)");
  }
  nlohmann::json env = merge_env(source.value("env", std::vector<std::string>{}), options.env);
  size_t env_bytes = sizeof(uint32_t);
  for (const auto& entry : env)
    env_bytes += entry.get<std::string>().size() + 1;
  if (env_bytes > 64 * 1024) throw SnapshotError("--env: the environment is over 64 KiB");

  RestoreResult result;
  fs::path cache = materialize_snapshot(home, *store, handle, options.progress,
                                        &result.materialize_ms, &manifest);

  std::vector<nlohmann::json> configs;
  for (const auto& name : names) {
    nlohmann::json config = source;
    config["name"] = name;
    config["cpus"] = cpus;
    config["memory_mib"] = memory;
    config["env"] = env;
    config["created"] = utc_timestamp();
    config["restore"] = {{"handle", handle}, {"cache", cache.string()}};
    configs.push_back(std::move(config));
  }
  // The image the disk is a layer over, materialized again if gc pruned its cache meanwhile.
  const std::optional<Hash128> image = image_of(source);
  if (image) {
    PreparedImage prepared = prepare_image(home, *store, *image, options.progress);
    for (auto& config : configs)
      config["disk"] = prepared.ext4.string();
  }
  // Each sandbox holds its snapshot (and so the chunks its disk and memory come from) and its
  // image for as long as it exists, whatever happens to the snapshot's names and the image's tags.
  for (const auto& name : names) {
    store->set_name(parent_name(name), hash, /*replace=*/true);
    if (image) store->set_name(image_hold_name(name), *image, /*replace=*/true);
  }
  store.reset();  // gc may run while the sandboxes live; the names keep what they need
  try {
    Sandbox::create_restored(home, configs);
  } catch (...) {
    if (auto again = home.open_store()) {
      for (const auto& name : names) {
        if (fs::exists(home.root() / "sandboxes" / name)) continue;
        again->remove_name(parent_name(name));
        if (image) again->remove_name(image_hold_name(name));
      }
    }
    throw;
  }
  result.sandboxes = names;
  result.total_ms = ms_since(start);
  return result;
}

std::string image_hold_name(const std::string& sandbox) {
  return kInternalNamePrefix + sandbox + ".image";
}

void release_sandbox_snapshots(const Home& home, const std::string& sandbox) {
  auto store = home.open_store();
  for (const auto& [name, hash] : store->list_names()) {
    auto internal = split_internal(name);
    if (!internal || internal->first != sandbox) continue;
    if (internal->second == "parent" || internal->second == "image" ||
        (internal->second.size() == 32 && is_hex(internal->second))) {
      store->remove_name(name);
    }
  }
}

size_t prune_snapshot_caches(const Home& home, const Store& store) {
  size_t removed = 0;
  std::error_code ec;
  fs::path root = home.root() / "cache" / "snapshots";
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    std::string name = entry.path().filename().string();
    if (entry.is_directory()) {
      auto hash = Hash128::parse(name);
      if (hash && store.has_manifest(*hash)) continue;
      fs::remove_all(entry.path(), ec);
      fs::remove(root / (name + ".lock"), ec);
      ++removed;
    }
  }
  return removed;
}

}  // namespace msb::core
