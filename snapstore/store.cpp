// Store: opening, versioning and locking; single chunks; manifests; names; pins.
// Large objects are in object_io.cpp, stats/verify/gc in maintenance.cpp.
#include "snapstore/store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <thread>

#include "snapstore/chunk_codec.h"
#include "snapstore/error.h"
#include "snapstore/name.h"

namespace msb::snapstore {
namespace fs = std::filesystem;

namespace {

constexpr char kFormatName[] = "msb-store";

std::string version_file_content() {
  nlohmann::json doc = {
      {"format", kFormatName},
      {"version", std::to_string(kStoreMajorVersion) + "." + std::to_string(kStoreMinorVersion)}};
  return doc.dump(2) + "\n";
}

// Checks store.json; throws if this code cannot read a store of that version.
void check_version_file(const fs::path& root, const std::string& content) {
  const std::string what = (root / "store.json").string();
  nlohmann::json doc = nlohmann::json::parse(content, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || doc.value("format", "") != kFormatName ||
      !doc.contains("version") || !doc["version"].is_string()) {
    throw StoreError(what + " does not describe an msb store");
  }
  const std::string version = doc["version"].get<std::string>();
  int major = 0, minor = 0;
  if (std::sscanf(version.c_str(), "%d.%d", &major, &minor) != 2 || major < 1) {
    throw StoreError(what + " has an unreadable version \"" + version + "\"");
  }
  if (major > kStoreMajorVersion) {
    throw StoreError("the store at " + root.string() + " has format version " + version +
                     ", newer than this msb reads (" + std::to_string(kStoreMajorVersion) +
                     ".x): upgrade msb");
  }
}

}  // namespace

Pin& Pin::operator=(Pin&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = std::move(other.fd_);
  }
  return *this;
}

void Pin::release() {
  if (!fd_) return;
  ::unlink(path_.c_str());
  fd_.reset();
}

Store::Store(fs::path root, StoreOptions options) : root_(std::move(root)), options_(options) {}

Store::~Store() = default;

std::unique_ptr<Store> Store::open(const fs::path& root, StoreOptions options) {
  if (options.zstd_level < -7 || options.zstd_level > 19) {
    throw StoreError("zstd level " + std::to_string(options.zstd_level) +
                     " is out of range (-7 to 19)");
  }
  if (options.chunk_size == 0 || options.chunk_size % 4096 != 0 ||
      options.chunk_size > (1u << 30)) {
    throw StoreError("chunk size " + std::to_string(options.chunk_size) +
                     " is not a multiple of 4096 up to 1 GiB");
  }
  std::unique_ptr<Store> store(new Store(fs::absolute(root), options));
  store->open_root();
  return store;
}

void Store::open_root() {
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec) throw StoreError("cannot create the store at " + root_.string() + ": " + ec.message());
  root_fd_ = open_file(AT_FDCWD, root_, O_RDONLY | O_DIRECTORY);
  lock_fd_ = open_file(root_fd_.get(), "lock", O_RDWR | O_CREAT, 0644);

  if (options_.exclusive) {
    auto deadline = std::chrono::steady_clock::now() + options_.lock_timeout;
    while (::flock(lock_fd_.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK && errno != EINTR) throw_errno("cannot lock " + root_.string());
      if (std::chrono::steady_clock::now() >= deadline) {
        throw StoreError("the store at " + root_.string() +
                         " is in use by other msb processes; try again when they finish");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  } else {
    // Waits only while a gc runs.
    while (::flock(lock_fd_.get(), LOCK_SH) != 0) {
      if (errno != EINTR) throw_errno("cannot lock " + root_.string());
    }
  }

  // store.json is published last when a store is created, so its presence means the layout is
  // complete. Two processes creating one store at once both build the layout; one publishes.
  int raw = ::openat(root_fd_.get(), "store.json", O_RDONLY | O_CLOEXEC);
  if (raw < 0 && errno != ENOENT) throw_errno("cannot open " + (root_ / "store.json").string());
  if (raw < 0) {
    for (const char* dir : {"chunks", "manifests", "names", "pins", "tmp"}) {
      fs::create_directories(root_ / dir, ec);
      if (ec) throw StoreError("cannot create " + (root_ / dir).string() + ": " + ec.message());
    }
    for (int i = 0; i < 256; ++i) {
      char sub[3];
      std::snprintf(sub, sizeof sub, "%02x", i);
      fs::create_directories(root_ / "chunks" / sub, ec);
      if (ec)
        throw StoreError("cannot create a chunk folder in " + root_.string() + ": " + ec.message());
    }
    publish_file(root_ / "tmp", root_, "store.json", version_file_content(), /*replace=*/false);
    raw = ::openat(root_fd_.get(), "store.json", O_RDONLY | O_CLOEXEC);
    if (raw < 0) throw_errno("cannot open " + (root_ / "store.json").string());
  }
  UniqueFd version_fd(raw);
  check_version_file(root_, read_all(version_fd.get(), (root_ / "store.json").string()));
}

unsigned Store::thread_count(const TransferOptions& options) const {
  unsigned n = options.threads ? options.threads : options_.threads;
  if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

void Store::sync_filesystem() const {
  // One syncfs covers every chunk written since the last one, by this process or any other: this
  // is how the store batches durability instead of an fsync per chunk.
  syncfs_or_throw(root_fd_.get(), "the store at " + root_.string());
}

fs::path Store::chunk_path(const Hash128& hash) const {
  return root_ / detail::chunk_file(hash);
}

fs::path Store::manifest_path(const Hash128& hash) const {
  return root_ / "manifests" / (hash.hex() + ".json");
}

// --- Chunks ------------------------------------------------------------------------------------

bool Store::has_chunk(const Hash128& hash) const {
  return ::faccessat(root_fd_.get(), detail::chunk_file(hash).c_str(), F_OK, 0) == 0;
}

std::vector<std::byte> Store::get_chunk(const Hash128& hash) const {
  detail::ChunkCodec codec(options_.zstd_level);
  return codec.read(root_fd_.get(), detail::chunk_file(hash), hash);
}

// --- Manifests ---------------------------------------------------------------------------------

bool Store::has_manifest(const Hash128& hash) const {
  std::string rel = "manifests/" + hash.hex() + ".json";
  return ::faccessat(root_fd_.get(), rel.c_str(), F_OK, 0) == 0;
}

Hash128 Store::put_manifest(const Manifest& manifest) {
  for (const auto& [key, object] : manifest.objects) {
    for (const ChunkRef& chunk : object.chunks) {
      if (chunk && !has_chunk(*chunk)) {
        throw StoreError("cannot store a manifest whose object \"" + key + "\" references chunk " +
                         chunk->hex() + ", which is not in the store");
      }
    }
  }
  for (const Hash128& child : manifest.manifests) {
    if (!has_manifest(child)) {
      throw StoreError("cannot store a manifest that references manifest " + child.hex() +
                       ", which is not in the store");
    }
  }
  std::string bytes = manifest.serialize();
  Hash128 hash = hash_bytes(std::as_bytes(std::span(bytes)));
  if (has_manifest(hash)) return hash;
  // Makes the directory entries of every chunk renamed so far durable before the manifest is.
  sync_filesystem();
  publish_file(root_ / "tmp", root_ / "manifests", hash.hex() + ".json", bytes, /*replace=*/false);
  return hash;
}

Manifest Store::get_manifest(const Hash128& hash) const {
  std::string rel = "manifests/" + hash.hex() + ".json";
  int raw = ::openat(root_fd_.get(), rel.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) {
    if (errno == ENOENT) throw StoreError("manifest " + hash.hex() + " is missing from the store");
    throw_errno("cannot open manifest " + hash.hex());
  }
  UniqueFd fd(raw);
  std::string bytes = read_all(fd.get(), "manifest " + hash.hex());
  Hash128 actual = hash_bytes(std::as_bytes(std::span(bytes)));
  if (actual != hash) {
    throw StoreError("manifest " + hash.hex() + " is corrupt: its content hashes to " +
                     actual.hex());
  }
  return Manifest::parse(bytes, "manifest " + hash.hex());
}

// --- Names -------------------------------------------------------------------------------------

void Store::set_name(std::string_view name, const Hash128& manifest, bool replace) {
  check_name(name);
  if (!has_manifest(manifest)) {
    throw StoreError("cannot name \"" + std::string(name) + "\": manifest " + manifest.hex() +
                     " is not in the store");
  }
  if (!publish_file(root_ / "tmp", root_ / "names", std::string(name), manifest.hex() + "\n",
                    replace)) {
    throw StoreError("the name \"" + std::string(name) + "\" already exists");
  }
}

std::optional<Hash128> Store::find_name(std::string_view name) const {
  check_name(name);
  std::string rel = "names/" + std::string(name);
  int raw = ::openat(root_fd_.get(), rel.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw_errno("cannot open the name \"" + std::string(name) + "\"");
  }
  UniqueFd fd(raw);
  std::string content = read_all(fd.get(), "name \"" + std::string(name) + "\"");
  if (!content.empty() && content.back() == '\n') content.pop_back();
  std::optional<Hash128> hash = Hash128::parse(content);
  if (!hash) throw StoreError("the name \"" + std::string(name) + "\" is corrupt in the store");
  return hash;
}

bool Store::remove_name(std::string_view name) {
  check_name(name);
  std::string rel = "names/" + std::string(name);
  if (::unlinkat(root_fd_.get(), rel.c_str(), 0) != 0) {
    if (errno == ENOENT) return false;
    throw_errno("cannot remove the name \"" + std::string(name) + "\"");
  }
  fsync_dir(root_ / "names");
  return true;
}

std::vector<std::pair<std::string, Hash128>> Store::scan_names(
    std::vector<std::string>* problems) const {
  std::vector<std::pair<std::string, Hash128>> out;
  for (const auto& entry : fs::directory_iterator(root_ / "names")) {
    std::string name = entry.path().filename().string();
    try {
      if (auto problem = name_problem(name)) {
        throw StoreError("unexpected file " + entry.path().string() + " (" + *problem + ")");
      }
      std::optional<Hash128> hash = find_name(name);
      if (hash) out.emplace_back(name, *hash);
    } catch (const StoreError& e) {
      if (!problems) throw;
      problems->push_back(e.what());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::pair<std::string, Hash128>> Store::list_names() const {
  return scan_names(nullptr);
}

// --- Pins --------------------------------------------------------------------------------------

Pin Store::pin(const std::vector<Hash128>& manifests) {
  nlohmann::json list = nlohmann::json::array();
  for (const Hash128& hash : manifests) {
    if (!has_manifest(hash)) {
      throw StoreError("cannot pin manifest " + hash.hex() + ": it is not in the store");
    }
    list.push_back(hash.hex());
  }
  std::string name = unique_temp_name("pin") + ".pin";
  std::string temp = "tmp/" + name;
  Pin pin;
  pin.fd_ = open_file(root_fd_.get(), temp, O_RDWR | O_CREAT | O_EXCL, 0644);
  // Locked before it becomes visible under pins/, so gc never sees it unlocked while we live.
  if (::flock(pin.fd_.get(), LOCK_EX) != 0) throw_errno("cannot lock " + temp);
  nlohmann::json doc = {{"pid", ::getpid()}, {"manifests", std::move(list)}};
  write_all(pin.fd_.get(), doc.dump() + "\n", (root_ / temp).string());
  std::string target = "pins/" + name;
  if (::renameat(root_fd_.get(), temp.c_str(), root_fd_.get(), target.c_str()) != 0) {
    int error_number = errno;
    ::unlinkat(root_fd_.get(), temp.c_str(), 0);
    throw_errno("cannot publish pin " + target, error_number);
  }
  pin.path_ = root_ / target;
  return pin;
}

}  // namespace msb::snapstore
