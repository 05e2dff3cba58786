#include "core/images.h"

#include <archive.h>
#include <archive_entry.h>
#include <elf.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>

#include "core/archive.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "snapstore/hash.h"

extern char** environ;

namespace msb::core {
namespace fs = std::filesystem;
using snapstore::Hash128;
using snapstore::Manifest;
using snapstore::ObjectRef;
using snapstore::Store;
using snapstore::UniqueFd;

// --- SHA-256 ------------------------------------------------------------------------------------

Sha256::Sha256() {
  archive_ = archive_write_new();
  entry_ = archive_entry_new();
  auto write = [](::archive*, void* context, const void* buffer, size_t length) -> la_ssize_t {
    static_cast<std::string*>(context)->append(static_cast<const char*>(buffer), length);
    return static_cast<la_ssize_t>(length);
  };
  // An mtree listing whose only keyword is sha256, of one entry of unbounded size: its one line
  // carries the digest of whatever was written.
  bool ok = archive_ && entry_ && archive_write_set_format_mtree(archive_) == ARCHIVE_OK &&
            archive_write_set_options(archive_, "!all,sha256") == ARCHIVE_OK &&
            archive_write_open(archive_, &output_, nullptr, write, nullptr) == ARCHIVE_OK;
  if (ok) {
    archive_entry_set_pathname(entry_, "blob");
    archive_entry_set_filetype(entry_, AE_IFREG);
    archive_entry_set_size(entry_, INT64_MAX);
    ok = archive_write_header(archive_, entry_) == ARCHIVE_OK;
  }
  if (!ok) {
    std::string why = archive_ && archive_error_string(archive_) ? archive_error_string(archive_)
                                                                 : "out of memory";
    if (archive_) archive_write_free(archive_);
    if (entry_) archive_entry_free(entry_);
    throw ImageError("SHA-256 is not available from libarchive: " + why);
  }
}

Sha256::~Sha256() {
  archive_write_free(archive_);
  archive_entry_free(entry_);
}

void Sha256::update(const void* data, size_t size) {
  if (!hex_.empty()) throw std::logic_error("Sha256::update after hex()");
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    la_ssize_t n = archive_write_data(archive_, p, size);
    if (n <= 0) throw ImageError(std::string("SHA-256: ") + archive_error_string(archive_));
    p += n;
    size -= size_t(n);
  }
}

std::string Sha256::hex() {
  if (!hex_.empty()) return hex_;
  archive_write_finish_entry(archive_);
  archive_write_close(archive_);
  const std::string key = "sha256digest=";
  size_t at = output_.find(key);
  if (at == std::string::npos || output_.size() < at + key.size() + 64) {
    throw ImageError("SHA-256: libarchive wrote no digest");
  }
  hex_ = output_.substr(at + key.size(), 64);
  return hex_;
}

std::string sha256_file(const fs::path& path) {
  UniqueFd fd = snapstore::open_file(AT_FDCWD, path, O_RDONLY);
  Sha256 sha;
  std::vector<char> buffer(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd.get(), buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) snapstore::throw_errno("cannot read " + path.string());
    if (n == 0) break;
    sha.update(buffer.data(), size_t(n));
  }
  return sha.hex();
}

namespace {

constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kMiB = 1ull << 20;
// JSON documents of an image (index, manifests, config) larger than this are not an image's.
constexpr uint64_t kMaxJsonBytes = 16 * kMiB;
constexpr const char* kDefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
constexpr const char* kBusybox = "/bin/busybox";
// Bumped when the default image's recipe changes, so that it gets a new id (and is rebuilt).
constexpr int kDefaultImageRecipe = 1;

std::string in_quotes(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

bool is_hex64(std::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string tag_part(const std::string& tag) {
  return tag.substr(tag.rfind(':') + 1);
}

// --- Helper programs (mke2fs, debugfs, busybox) -------------------------------------------------

fs::path find_program(const std::string& name, const std::string& package) {
  // /usr/sbin and /sbin too: a user's PATH often lacks them, and mke2fs and debugfs live there.
  std::string dirs = std::getenv("PATH") ? std::getenv("PATH") : "";
  dirs += std::string(":") + kDefaultPath;
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string dir = dirs.substr(start, end - start);
    if (!dir.empty()) {
      fs::path candidate = fs::path(dir) / name;
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    start = end + 1;
  }
  throw ImageError(name + " is not installed (it comes with Debian's " + package + " package)");
}

struct ProgramResult {
  int status = -1;  // exit status, or 128+N for signal N
  std::string out, err;
};

// Runs a program to completion with stdin from /dev/null and its output in files under `scratch`
// (read back, then removed).
ProgramResult run_program(const std::vector<std::string>& argv, const fs::path& scratch) {
  const fs::path out_path = scratch / snapstore::unique_temp_name("program.out");
  const fs::path err_path = scratch / snapstore::unique_temp_name("program.err");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0600);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0600);
  std::vector<char*> args;
  for (const auto& arg : argv)
    args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int error = posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) snapstore::throw_errno("cannot run " + argv[0], error);
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0) {
    if (errno != EINTR) snapstore::throw_errno("waitpid " + argv[0]);
  }
  ProgramResult result;
  result.status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
  std::error_code ec;
  if (fs::exists(out_path, ec)) result.out = snapstore::read_file(out_path);
  if (fs::exists(err_path, ec)) result.err = snapstore::read_file(err_path);
  fs::remove(out_path, ec);
  fs::remove(err_path, ec);
  return result;
}

// The first non-empty line of a program's complaint, for a one-line error.
std::string first_line(const std::string& text, const std::string& otherwise) {
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (line.find_first_not_of(" \t\r") != std::string::npos) return line;
    start = end + 1;
  }
  return otherwise;
}

// --- Scratch space ------------------------------------------------------------------------------

// A folder under $MSB_HOME/tmp for one import, removed with everything in it when done, failed or
// not. One left by a killed msb (its pid is gone) is removed by the next import.
class Workspace {
 public:
  explicit Workspace(const Home& home) {
    fs::path tmp = home.root() / "tmp";
    fs::create_directories(tmp);
    sweep(tmp);
    fs::path dir = tmp / snapstore::unique_temp_name("image");
    fs::create_directory(dir);
    ::chmod(dir.c_str(), 0700);
    // Canonical: libarchive's symlink checks look at every component of the paths it writes.
    dir_ = fs::canonical(dir);
  }
  ~Workspace() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  const fs::path& dir() const { return dir_; }

 private:
  static void sweep(const fs::path& tmp) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(tmp, ec)) {
      // "image.<pid>.<counter>.<random>" (snapstore::unique_temp_name)
      std::string name = entry.path().filename().string();
      if (!name.starts_with("image.")) continue;
      long pid = std::strtol(name.c_str() + 6, nullptr, 10);
      if (pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH) {
        fs::remove_all(entry.path(), ec);
      }
    }
  }
  fs::path dir_;
};

// --- Archives -----------------------------------------------------------------------------------

struct ReadArchive {
  std::unique_ptr<::archive, decltype(&archive_read_free)> ptr{archive_read_new(),
                                                               &archive_read_free};
  ::archive* get() const { return ptr.get(); }
};
struct WriteDisk {
  std::unique_ptr<::archive, decltype(&archive_write_free)> ptr{archive_write_disk_new(),
                                                                &archive_write_free};
  ::archive* get() const { return ptr.get(); }
};

// A path inside an archive (a layer or a docker save tarball) relative to the root it is unpacked
// into: "" for the root itself. Absolute paths and ".." are refused, not cleaned up: an image that
// names them is broken or hostile.
std::string relative_path(std::string_view path, const std::string& what) {
  if (path.starts_with('/')) {
    throw ImageError(what + ": unsafe path " + in_quotes(path) + " (absolute)");
  }
  std::string out;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string_view::npos) end = path.size();
    std::string_view part = path.substr(start, end - start);
    if (part == "..") throw ImageError(what + ": unsafe path " + in_quotes(path) + " (\"..\")");
    if (!part.empty() && part != ".") {
      if (!out.empty()) out += '/';
      out += part;
    }
    start = end + 1;
  }
  return out;
}

std::string parent_of(const std::string& rel) {
  size_t slash = rel.rfind('/');
  return slash == std::string::npos ? "" : rel.substr(0, slash);
}

std::string base_of(const std::string& rel) {
  size_t slash = rel.rfind('/');
  return slash == std::string::npos ? rel : rel.substr(slash + 1);
}

fs::path under(const fs::path& root, const std::string& rel) {
  return rel.empty() ? root : root / rel;
}

// Copies the current entry's data from `in` to `out` and finishes it.
void copy_data(::archive* in, ::archive* out, const std::string& what, const std::string& rel) {
  for (;;) {
    const void* block = nullptr;
    size_t size = 0;
    la_int64_t offset = 0;
    int r = archive_read_data_block(in, &block, &size, &offset);
    if (r == ARCHIVE_EOF) break;
    if (r < ARCHIVE_WARN) throw ImageError(what + ": " + archive_error_string(in));
    if (archive_write_data_block(out, block, size, offset) < ARCHIVE_WARN) {
      throw ImageError(what + ": cannot write " + in_quotes(rel) + ": " +
                       archive_error_string(out));
    }
  }
  if (archive_write_finish_entry(out) < ARCHIVE_WARN) {
    throw ImageError(what + ": cannot write " + in_quotes(rel) + ": " + archive_error_string(out));
  }
}

// Unpacks a docker save tarball (or an OCI layout in a tarball) into `dest`: regular files,
// folders and the symbolic links older docker versions use between layers; nothing is written
// outside `dest`.
void unpack_tarball(const fs::path& tarball, const fs::path& dest, const std::string& where) {
  ReadArchive in;
  archive_read_support_filter_all(in.get());
  archive_read_support_format_tar(in.get());
  WriteDisk out;
  archive_write_disk_set_options(out.get(),
                                 ARCHIVE_EXTRACT_SECURE_SYMLINKS | ARCHIVE_EXTRACT_SECURE_NODOTDOT);
  const std::string not_image = where +
                                " is neither an OCI image layout nor a docker save tarball (it is "
                                "not a tar archive: ";
  if (archive_read_open_filename(in.get(), tarball.c_str(), 1 << 20) != ARCHIVE_OK) {
    throw ImageError(not_image + archive_error_string(in.get()) + ")");
  }
  fs::create_directories(dest);
  bool first = true;
  for (;;) {
    archive_entry* entry = nullptr;
    int r = archive_read_next_header(in.get(), &entry);
    if (r == ARCHIVE_EOF) break;
    if (r < ARCHIVE_WARN) {
      if (first) throw ImageError(not_image + archive_error_string(in.get()) + ")");
      throw ImageError(where + ": " + archive_error_string(in.get()));
    }
    first = false;
    const char* name = archive_entry_pathname(entry);
    std::string rel = relative_path(name ? name : "", where);
    auto type = archive_entry_filetype(entry);
    if (rel.empty() || (type != AE_IFREG && type != AE_IFDIR && type != AE_IFLNK)) continue;
    std::string path = (dest / rel).string();
    archive_entry_set_pathname(entry, path.c_str());
    std::string link;
    if (const char* hardlink = archive_entry_hardlink(entry)) {
      link = (dest / relative_path(hardlink, where)).string();
      archive_entry_set_hardlink(entry, link.c_str());
    }
    archive_entry_set_perm(entry, type == AE_IFDIR ? 0700 : 0600);
    if (archive_write_header(out.get(), entry) < ARCHIVE_WARN) {
      throw ImageError(where + ": cannot unpack " + in_quotes(rel) + ": " +
                       archive_error_string(out.get()));
    }
    copy_data(in.get(), out.get(), where, rel);
  }
  if (first) throw ImageError(not_image + "it is empty)");
  archive_write_close(out.get());
  // Symbolic links (older docker's layer.tar links) may only lead to files of the archive: the
  // layout's JSON and blobs are read through them.
  const std::string prefix = dest.string() + "/";
  for (const auto& entry : fs::recursive_directory_iterator(dest)) {
    if (!entry.is_symlink()) continue;
    std::error_code ec;
    fs::path target = fs::canonical(entry.path(), ec);
    if (ec) {
      fs::remove(entry.path(), ec);  // leads nowhere: as if it were not there
    } else if (!target.string().starts_with(prefix)) {
      throw ImageError(where + ": unsafe path " +
                       in_quotes(entry.path().lexically_relative(dest).string()) +
                       " (a symbolic link that leads outside the archive)");
    }
  }
}

// --- Finding the image in a layout --------------------------------------------------------------

// A blob of the image: where it is and what it must be.
struct Blob {
  fs::path path;
  std::string sha256;  // expected digest, hex; "" when the source does not say
  int64_t size = -1;   // expected size; -1 when the source does not say
  std::string digest;  // "sha256:..." as the source names it, for messages and the manifest
};

struct SourceImage {
  std::string what;  // "image busybox:latest in PATH", for messages
  Blob config;
  std::vector<Blob> layers;
  bool docker_layer_digests = false;  // layer digests come from the config's diff_ids
};

std::string read_small_file(const fs::path& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw ImageError(what + ": " + path.string() + " is missing");
  }
  if (!S_ISREG(st.st_mode) || uint64_t(st.st_size) > kMaxJsonBytes) {
    throw ImageError(what + ": " + path.string() + " is not a JSON document of an image");
  }
  return snapstore::read_file(path);
}

nlohmann::json parse_json(const std::string& text, const std::string& what) {
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, false);
  if (doc.is_discarded()) throw ImageError(what + " is not valid JSON");
  return doc;
}

std::string digest_mismatch(const std::string& what, const Blob& blob, const std::string& actual) {
  return what + ": blob " + blob.path.filename().string() + " is corrupt (its sha256 is " +
         actual.substr(0, 12) + "..., expected " + blob.sha256.substr(0, 12) + "...)";
}

// A small blob (a manifest, a config), its size and digest checked.
std::string read_blob(const Blob& blob, const std::string& what) {
  std::string bytes = read_small_file(blob.path, what);
  if (blob.size >= 0 && bytes.size() != uint64_t(blob.size)) {
    throw ImageError(what + ": blob " + blob.path.filename().string() + " has " +
                     std::to_string(bytes.size()) + " bytes, expected " +
                     std::to_string(blob.size));
  }
  if (!blob.sha256.empty()) {
    Sha256 sha;
    sha.update(bytes.data(), bytes.size());
    if (std::string actual = sha.hex(); actual != blob.sha256) {
      throw ImageError(digest_mismatch(what, blob, actual));
    }
  }
  return bytes;
}

// Where a path named by the source (docker's manifest.json) is; with `contained` (a tarball we
// unpacked), it must stay inside `root` even through symbolic links.
fs::path source_path(const fs::path& root, const std::string& name, bool contained,
                     const std::string& where) {
  std::string rel = relative_path(name, where);
  if (rel.empty()) throw ImageError(where + ": empty blob path");
  fs::path path = root / rel;
  if (contained) {
    std::error_code ec;
    fs::path real = fs::weakly_canonical(path, ec);
    std::string prefix = fs::canonical(root).string() + "/";
    if (ec || !real.string().starts_with(prefix)) {
      throw ImageError(where + ": unsafe path " + in_quotes(name) +
                       " (it leads outside the archive)");
    }
  }
  return path;
}

// An OCI descriptor ({"mediaType", "digest", "size"}) to the blob in layout `root`.
Blob oci_blob(const fs::path& root, const nlohmann::json& descriptor, const std::string& what) {
  // (const operator[] of a missing key is undefined: every lookup checks contains() first)
  if (!descriptor.is_object() || !descriptor.contains("digest") ||
      !descriptor["digest"].is_string()) {
    throw ImageError(what + ": a descriptor without a digest");
  }
  Blob blob;
  blob.digest = descriptor["digest"].get<std::string>();
  if (!blob.digest.starts_with("sha256:") || !is_hex64(blob.digest.substr(7))) {
    throw ImageError(what + ": unsupported digest " + in_quotes(blob.digest) +
                     " (msb reads sha256 digests)");
  }
  blob.sha256 = blob.digest.substr(7);
  blob.path = root / "blobs" / "sha256" / blob.sha256;
  if (descriptor.contains("size") && descriptor["size"].is_number_integer()) {
    blob.size = descriptor["size"].get<int64_t>();
  }
  return blob;
}

std::string ref_name(const nlohmann::json& descriptor) {
  if (!descriptor.is_object()) return "";
  const auto& annotations = descriptor.value("annotations", nlohmann::json::object());
  if (!annotations.is_object()) return "";
  return annotations.value("org.opencontainers.image.ref.name", std::string());
}

// Docker Hub's implicit parts, so that "docker.io/library/busybox:latest" is "busybox:latest".
std::string without_docker_hub(std::string ref) {
  for (const char* prefix : {"docker.io/", "index.docker.io/", "registry-1.docker.io/"}) {
    if (ref.starts_with(prefix)) {
      ref.erase(0, std::strlen(prefix));
      break;
    }
  }
  if (ref.starts_with("library/")) ref.erase(0, 8);
  return ref;
}

// Whether a name an image carries in its source (an OCI ref name, a docker RepoTag) is `tag`.
// OCI layouts often name images by the tag alone (umoci, skopeo's oci:DIR:TAG).
bool ref_matches(const std::string& ref, const std::string& tag) {
  if (ref.empty()) return false;
  if (ref == tag_part(tag)) return true;
  try {
    return without_docker_hub(normalize_image_tag(ref)) == without_docker_hub(tag);
  } catch (const ImageError&) {
    return false;
  }
}

std::string platform_of(const nlohmann::json& descriptor) {
  const auto& platform = descriptor.value("platform", nlohmann::json::object());
  if (!platform.is_object()) return "";
  std::string out =
      platform.value("os", std::string()) + "/" + platform.value("architecture", std::string());
  return out == "/" ? "" : out;
}

// Picks one descriptor of an index's list: the only one, else the one named `tag` (when
// `by_ref`), and among several platforms linux/amd64.
nlohmann::json choose(const nlohmann::json& list, const std::string& tag, bool by_ref,
                      const std::string& where) {
  if (!list.is_array() || list.empty()) throw ImageError(where + " holds no image");
  std::vector<nlohmann::json> candidates(list.begin(), list.end());
  if (by_ref && candidates.size() > 1) {
    std::vector<nlohmann::json> named;
    std::set<std::string> refs;
    for (const auto& d : candidates) {
      if (ref_matches(ref_name(d), tag)) named.push_back(d);
      if (!ref_name(d).empty()) refs.insert(ref_name(d));
    }
    if (named.empty() && !refs.empty()) {
      std::string names;
      for (const auto& r : refs)
        names += (names.empty() ? "" : ", ") + r;
      throw ImageError(where + " holds " + std::to_string(candidates.size()) + " images (" + names +
                       ") and none is " + tag + " (give --tag one of them)");
    }
    if (!named.empty()) candidates = named;
  }
  if (candidates.size() > 1) {
    std::vector<nlohmann::json> amd64;
    std::string seen;
    for (const auto& d : candidates) {
      if (platform_of(d) == "linux/amd64") amd64.push_back(d);
      seen += (seen.empty() ? "" : ", ") + (platform_of(d).empty() ? "?" : platform_of(d));
    }
    if (amd64.empty()) {
      throw ImageError(where + " holds no linux/amd64 image (only " + seen + ")");
    }
    candidates = {amd64.front()};
  }
  const std::string platform = platform_of(candidates.front());
  if (!platform.empty() && platform != "linux/amd64") {
    throw ImageError(where + " holds an image for " + platform + "; msb runs linux/amd64");
  }
  return candidates.front();
}

SourceImage find_oci_image(const fs::path& root, const std::string& tag, const std::string& where) {
  nlohmann::json index =
      parse_json(read_small_file(root / "index.json", where), where + ": index.json");
  nlohmann::json descriptor = choose(index["manifests"], tag, /*by_ref=*/true, where);
  // An index may point at another (a multi-platform image): follow at most a few.
  for (int depth = 0; depth < 4; ++depth) {
    Blob blob = oci_blob(root, descriptor, where);
    const std::string what = where + ": " + blob.digest.substr(0, 19);
    nlohmann::json doc = parse_json(read_blob(blob, where), what);
    if (!doc.is_object()) throw ImageError(what + " is not an image manifest");
    if (doc.contains("manifests")) {
      descriptor = choose(doc["manifests"], tag, /*by_ref=*/false, where);
      continue;
    }
    if (!doc["config"].is_object() || !doc["layers"].is_array()) {
      throw ImageError(what + " is not an image manifest (no config or layers)");
    }
    SourceImage image;
    image.what = where;
    image.config = oci_blob(root, doc["config"], where);
    for (const auto& layer : doc["layers"]) {
      std::string media = layer.value("mediaType", std::string());
      if (media.find("encrypted") != std::string::npos) {
        throw ImageError(where + ": encrypted layers are not supported (" + media + ")");
      }
      image.layers.push_back(oci_blob(root, layer, where));
    }
    return image;
  }
  throw ImageError(where + ": image indexes nest too deep");
}

// `docker save`'s manifest.json: [{"Config": PATH, "RepoTags": [...], "Layers": [PATH...]}].
SourceImage find_docker_image(const fs::path& root, const std::string& tag,
                              const std::string& where, bool contained) {
  nlohmann::json list =
      parse_json(read_small_file(root / "manifest.json", where), where + ": manifest.json");
  if (!list.is_array() || list.empty()) throw ImageError(where + ": manifest.json lists no image");
  nlohmann::json chosen;
  if (list.size() == 1) {
    chosen = list[0];
  } else {
    std::string names;
    for (const auto& entry : list) {
      for (const auto& repo_tag : entry.value("RepoTags", nlohmann::json::array())) {
        if (!repo_tag.is_string()) continue;
        names += (names.empty() ? "" : ", ") + repo_tag.get<std::string>();
        if (chosen.is_null() && ref_matches(repo_tag.get<std::string>(), tag)) chosen = entry;
      }
    }
    if (chosen.is_null()) {
      throw ImageError(where + " holds " + std::to_string(list.size()) + " images (" + names +
                       ") and none is " + tag + " (give --tag one of them)");
    }
  }
  if (!chosen.is_object() || !chosen["Config"].is_string() || !chosen["Layers"].is_array()) {
    throw ImageError(where + ": manifest.json has no Config or Layers");
  }
  // Blobs are named by their digest ("blobs/sha256/HEX", older docker "HEX.json", skopeo
  // "HEX.tar"); older docker layers ("ID/layer.tar") are checked against the config's diff_ids.
  auto digest_in_name = [](const std::string& name) -> std::string {
    std::string base = base_of(name);
    for (const char* suffix : {".json", ".tar"}) {
      if (base.ends_with(suffix)) base.resize(base.size() - std::strlen(suffix));
    }
    return is_hex64(base) ? base : "";
  };
  SourceImage image;
  image.what = where;
  std::string config = chosen["Config"].get<std::string>();
  image.config.path = source_path(root, config, contained, where);
  image.config.sha256 = digest_in_name(config);
  image.config.digest = "sha256:" + image.config.sha256;
  for (const auto& layer : chosen["Layers"]) {
    if (!layer.is_string()) throw ImageError(where + ": manifest.json has a bad layer path");
    Blob blob;
    blob.path = source_path(root, layer.get<std::string>(), contained, where);
    blob.sha256 = digest_in_name(layer.get<std::string>());
    if (blob.sha256.empty()) image.docker_layer_digests = true;
    blob.digest = "sha256:" + blob.sha256;
    image.layers.push_back(blob);
  }
  return image;
}

SourceImage find_image(const fs::path& root, const std::string& tag, const std::string& where,
                       bool contained) {
  std::error_code ec;
  if (fs::exists(root / "oci-layout", ec) && fs::exists(root / "index.json", ec)) {
    return find_oci_image(root, tag, where);
  }
  if (fs::exists(root / "manifest.json", ec)) {
    return find_docker_image(root, tag, where, contained);
  }
  throw ImageError(where +
                   " is neither an OCI image layout (oci-layout, index.json) nor a docker save "
                   "tarball (manifest.json)");
}

std::vector<std::string> string_list(const nlohmann::json& value, const std::string& what) {
  std::vector<std::string> out;
  if (value.is_null()) return out;
  if (!value.is_array()) throw ImageError(what + " is not a list of strings");
  for (const auto& item : value) {
    if (!item.is_string()) throw ImageError(what + " is not a list of strings");
    out.push_back(item.get<std::string>());
  }
  return out;
}

// The runtime part of an OCI image config.
ImageConfig parse_config(const nlohmann::json& doc, const std::string& where) {
  const std::string what = where + ": the image config";
  if (!doc.is_object()) throw ImageError(what + " is not a JSON object");
  std::string os = doc.value("os", std::string("linux"));
  std::string arch = doc.value("architecture", std::string("amd64"));
  if (os != "linux" || arch != "amd64") {
    throw ImageError(where + " is an image for " + os + "/" + arch + "; msb runs linux/amd64");
  }
  ImageConfig config;
  const nlohmann::json& c = doc.contains("config") ? doc["config"] : nlohmann::json();
  if (c.is_null()) return config;
  if (!c.is_object()) throw ImageError(what + "'s config is not an object");
  config.env = string_list(c.value("Env", nlohmann::json()), what + "'s Env");
  config.entrypoint = string_list(c.value("Entrypoint", nlohmann::json()), what + "'s Entrypoint");
  config.cmd = string_list(c.value("Cmd", nlohmann::json()), what + "'s Cmd");
  if (c.contains("WorkingDir") && c["WorkingDir"].is_string()) {
    config.workdir = c["WorkingDir"].get<std::string>();
  }
  if (c.contains("User") && c["User"].is_string()) config.user = c["User"].get<std::string>();
  return config;
}

nlohmann::json config_to_json(const ImageConfig& config) {
  return {{"env", config.env},
          {"entrypoint", config.entrypoint},
          {"cmd", config.cmd},
          {"workdir", config.workdir},
          {"user", config.user}};
}

// --- The root file system -----------------------------------------------------------------------

// What a path of the image is, when the files on disk cannot say (extracted without root).
struct Attributes {
  uint32_t uid = 0, gid = 0;
  uint32_t mode = 0;  // type and permission bits
  dev_t rdev = 0;
};

// A folder the layers are applied to, then written as an ext4 file.
//
// As root, files get their owners, modes, device nodes and extended attributes on disk and mke2fs
// -d copies them. Without root they cannot, so every path's owner, group and mode are recorded and
// set in the ext4 afterwards with debugfs, device nodes are made there too, and the files on disk
// stay readable and writable to us; only extended attributes (file capabilities) are lost.
class Rootfs {
 public:
  explicit Rootfs(fs::path dir) : dir_(std::move(dir)), as_root_(::geteuid() == 0) {
    fs::create_directory(dir_);
    ::chmod(dir_.c_str(), 0755);
  }

  void apply_layer(const Blob& blob, const std::string& what,
                   const std::function<void(uint64_t)>& read_bytes);
  // Sets a path's owner (the default image's home folder).
  void set_owner(const std::string& rel, uint32_t uid, uint32_t gid);
  // Writes the ext4 file; `id` makes its UUID, `scratch` holds helper files.
  void build_ext4(const fs::path& file, const std::string& id, const fs::path& scratch);

 private:
  // Fails when a folder on the way to `rel` is a symbolic link: a layer must not write through
  // one (it could point anywhere on the host).
  void check_parents(const std::string& rel, const std::string& what, std::string_view name) const;
  void remove(const std::string& rel);
  void make_opaque(const std::string& rel);
  void handle_entry(::archive* in, ::archive* out, archive_entry* entry, const std::string& what);
  // Sets owners and modes in the ext4 that mke2fs -d could not take from the files: without root
  // all of them, as root the root folder's.
  void fix_ownership(const fs::path& file, const fs::path& scratch);

  fs::path dir_;
  bool as_root_;
  std::map<std::string, Attributes> attributes_;  // without root: every path a layer wrote
  std::set<std::string> layer_paths_;             // what the current layer wrote
  std::optional<Attributes> root_attributes_;     // what the layers said of the root folder
};

void Rootfs::check_parents(const std::string& rel, const std::string& what,
                           std::string_view name) const {
  fs::path path = dir_;
  std::string parent = parent_of(rel);
  size_t start = 0;
  while (!parent.empty() && start <= parent.size()) {
    size_t end = parent.find('/', start);
    if (end == std::string::npos) end = parent.size();
    path /= parent.substr(start, end - start);
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) return;  // created as a folder on the way
    if (S_ISLNK(st.st_mode)) {
      throw ImageError(what + ": unsafe path " + in_quotes(name) + " (through the symbolic link " +
                       in_quotes(path.string().substr(dir_.string().size())) + ")");
    }
    start = end + 1;
  }
}

void Rootfs::remove(const std::string& rel) {
  if (rel.empty()) return;
  std::error_code ec;
  // remove_all does not follow symbolic links: a link goes, not what it points at.
  fs::remove_all(dir_ / rel, ec);
  if (ec) throw ImageError("cannot remove " + (dir_ / rel).string() + ": " + ec.message());
  attributes_.erase(rel);
  attributes_.erase(attributes_.lower_bound(rel + "/"), attributes_.lower_bound(rel + "0"));
}

// Removes what lower layers put under folder `rel` (what this layer put there stays).
void Rootfs::make_opaque(const std::string& rel) {
  fs::path path = under(dir_, rel);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return;
  std::vector<std::string> children;
  for (const auto& entry : fs::directory_iterator(path))
    children.push_back((rel.empty() ? "" : rel + "/") + entry.path().filename().string());
  for (const auto& child : children) {
    if (!layer_paths_.count(child)) {
      remove(child);
    } else if (fs::is_directory(fs::symlink_status(dir_ / child))) {
      make_opaque(child);
    }
  }
  // Device nodes recorded without root are not on disk.
  const std::string prefix = rel.empty() ? "" : rel + "/";
  for (auto it = attributes_.lower_bound(prefix); it != attributes_.end();) {
    if (!it->first.starts_with(prefix)) break;
    if (!it->first.empty() && !layer_paths_.count(it->first) && it->first != rel) {
      it = attributes_.erase(it);
    } else {
      ++it;
    }
  }
}

void Rootfs::handle_entry(::archive* in, ::archive* out, archive_entry* entry,
                          const std::string& what) {
  const char* raw = archive_entry_pathname(entry);
  const std::string name = raw ? raw : "";
  const std::string rel = relative_path(name, what);
  const std::string base = base_of(rel);
  check_parents(rel, what, name);
  // Whiteouts (the OCI image spec's, from AUFS): ".wh.NAME" deletes NAME of the layers below,
  // ".wh..wh..opq" hides everything the layers below put in its folder.
  if (base.starts_with(".wh.")) {
    if (base == ".wh..wh..opq") {
      make_opaque(parent_of(rel));
    } else if (!base.starts_with(".wh..wh.")) {  // other ".wh..wh." names are AUFS bookkeeping
      std::string target = parent_of(rel);
      target += (target.empty() ? "" : "/") + base.substr(4);
      remove(target);
    }
    return;
  }
  const auto type = archive_entry_filetype(entry);
  const char* hardlink = archive_entry_hardlink(entry);
  // The root stays the folder every check above starts from (a link there would lead anywhere).
  if (rel.empty() && (type != AE_IFDIR || hardlink)) {
    throw ImageError(what + ": unsafe path " + in_quotes(name) + " (the root must be a folder)");
  }
  if (rel.empty()) {
    root_attributes_ =
        Attributes{uint32_t(archive_entry_uid(entry)), uint32_t(archive_entry_gid(entry)),
                   uint32_t(archive_entry_mode(entry)), 0};
  }
  // What a lower layer had here goes, unless a folder meets a folder (their contents merge). A
  // file is never written into in place: it may be a hard link of another.
  struct stat st {};
  if (!rel.empty() && ::lstat((dir_ / rel).c_str(), &st) == 0 &&
      !(S_ISDIR(st.st_mode) && type == AE_IFDIR && !hardlink)) {
    remove(rel);
  }
  Attributes attributes{uint32_t(archive_entry_uid(entry)), uint32_t(archive_entry_gid(entry)),
                        uint32_t(archive_entry_mode(entry)), archive_entry_rdev(entry)};
  std::string link_path;
  if (hardlink) {
    std::string target = relative_path(hardlink, what);
    check_parents(target, what, hardlink);
    if (target.empty() || ::lstat((dir_ / target).c_str(), &st) != 0) {
      throw ImageError(what + ": " + in_quotes(name) + " is a hard link to " + in_quotes(hardlink) +
                       ", which is not there");
    }
    link_path = (dir_ / target).string();
    archive_entry_set_hardlink(entry, link_path.c_str());
    if (auto it = attributes_.find(target); it != attributes_.end()) attributes = it->second;
  }
  // The folders on the way are this layer's too (libarchive makes those it lacks entries for):
  // an opaque whiteout later in the layer must not take them.
  for (std::string p = rel; !p.empty(); p = parent_of(p))
    layer_paths_.insert(p);
  if (!as_root_) {
    attributes_[rel] = attributes;
    // Device nodes need root; debugfs makes them in the ext4 instead.
    if (!hardlink && (type == AE_IFCHR || type == AE_IFBLK)) return;
    const mode_t perm = archive_entry_perm(entry) & 0777;
    archive_entry_set_perm(entry, perm | (type == AE_IFDIR ? 0700 : 0600));
  }
  const std::string path = under(dir_, rel).string();
  archive_entry_set_pathname(entry, path.c_str());
  if (archive_write_header(out, entry) < ARCHIVE_WARN) {
    throw ImageError(what + ": cannot write " + in_quotes(name) + ": " + archive_error_string(out));
  }
  copy_data(in, out, what, name);
}

void Rootfs::apply_layer(const Blob& blob, const std::string& what,
                         const std::function<void(uint64_t)>& read_bytes) {
  // The blob is hashed as libarchive reads it (it reads every byte in order: there is no skip
  // callback), so it is read once; a corrupt layer fails the import before anything is built from
  // what it unpacked.
  struct Reader {
    UniqueFd fd;
    Sha256 sha;
    std::vector<char> buffer = std::vector<char>(1 << 20);
    uint64_t bytes = 0;
    const std::function<void(uint64_t)>* progress = nullptr;
    ssize_t read() {
      for (;;) {
        ssize_t n = ::read(fd.get(), buffer.data(), buffer.size());
        if (n < 0 && errno == EINTR) continue;
        if (n > 0) {
          sha.update(buffer.data(), size_t(n));
          bytes += uint64_t(n);
          if (*progress) (*progress)(uint64_t(n));
        }
        return n;
      }
    }
  } reader;
  reader.progress = &read_bytes;
  reader.fd.reset(::open(blob.path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!reader.fd) throw ImageError(what + ": blob " + blob.path.string() + " is missing");
  auto read = [](::archive* a, void* context, const void** buffer) -> la_ssize_t {
    auto* r = static_cast<Reader*>(context);
    ssize_t n = r->read();
    if (n < 0) {
      archive_set_error(a, errno, "cannot read the blob: %s", std::strerror(errno));
      return -1;
    }
    *buffer = r->buffer.data();
    return n;
  };
  auto check = [&] {
    while (reader.read() > 0) {
    }
    if (blob.size >= 0 && reader.bytes != uint64_t(blob.size)) {
      throw ImageError(what + ": blob " + blob.path.filename().string() + " has " +
                       std::to_string(reader.bytes) + " bytes, expected " +
                       std::to_string(blob.size));
    }
    if (!blob.sha256.empty()) {
      if (std::string actual = reader.sha.hex(); actual != blob.sha256) {
        throw ImageError(digest_mismatch(what, blob, actual));
      }
    }
  };

  ReadArchive in;
  archive_read_support_filter_all(in.get());  // gzip, zstd or none
  archive_read_support_format_tar(in.get());
  archive_read_support_format_empty(in.get());  // a layer with nothing in it
  WriteDisk out;
  int flags = ARCHIVE_EXTRACT_TIME | ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_SECURE_SYMLINKS |
              ARCHIVE_EXTRACT_SECURE_NODOTDOT;
  // Paths are written absolute (under the canonical rootfs folder, checked above) because hard
  // link targets resolve against the working directory otherwise, hence no
  // ARCHIVE_EXTRACT_SECURE_NOABSOLUTEPATHS. No archive_write_disk_set_standard_lookup: owners are
  // the image's numbers, not the host's names.
  if (as_root_) flags |= ARCHIVE_EXTRACT_OWNER | ARCHIVE_EXTRACT_XATTR;
  archive_write_disk_set_options(out.get(), flags);
  layer_paths_.clear();
  try {
    if (archive_read_open(in.get(), &reader, nullptr, read, nullptr) != ARCHIVE_OK) {
      throw ImageError(what + ": " + archive_error_string(in.get()));
    }
    for (;;) {
      archive_entry* entry = nullptr;
      int r = archive_read_next_header(in.get(), &entry);
      if (r == ARCHIVE_EOF) break;
      if (r < ARCHIVE_WARN) throw ImageError(what + ": " + archive_error_string(in.get()));
      handle_entry(in.get(), out.get(), entry, what);
    }
    if (archive_write_close(out.get()) < ARCHIVE_WARN) {
      throw ImageError(what + ": " + archive_error_string(out.get()));
    }
  } catch (const ImageError&) {
    check();  // a corrupt blob explains whatever went wrong better
    throw;
  }
  check();
}

void Rootfs::set_owner(const std::string& rel, uint32_t uid, uint32_t gid) {
  fs::path path = under(dir_, rel);
  if (as_root_) {
    if (::lchown(path.c_str(), uid, gid) != 0)
      snapstore::throw_errno("cannot chown " + path.string());
    return;
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) snapstore::throw_errno("cannot stat " + path.string());
  attributes_[rel] = Attributes{uid, gid, uint32_t(st.st_mode), 0};
}

// debugfs reads one command a line and takes a double-quoted argument with "" for a quote.
std::string debugfs_quoted(const std::string& path) {
  if (path.find('\n') != std::string::npos || path.find('\r') != std::string::npos) {
    throw ImageError("cannot set the owner of " + in_quotes(path) +
                     " in the image: its name holds a line break (import as root)");
  }
  std::string out = "\"";
  for (char c : path)
    out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

void Rootfs::fix_ownership(const fs::path& file, const fs::path& scratch) {
  std::string commands;
  auto set = [&](const std::string& rel, const Attributes& a) {
    std::string path = debugfs_quoted("/" + rel);
    char mode[16];
    std::snprintf(mode, sizeof mode, "0%o", a.mode);
    commands += "sif " + path + " uid " + std::to_string(a.uid) + "\n";
    commands += "sif " + path + " gid " + std::to_string(a.gid) + "\n";
    commands += "sif " + path + " mode " + mode + "\n";
  };
  if (as_root_) {
    // mke2fs -d makes the root folder root's, mode 0755, whatever the layers said.
    if (!root_attributes_ || (root_attributes_->uid == 0 && root_attributes_->gid == 0 &&
                              root_attributes_->mode == (S_IFDIR | 0755))) {
      return;
    }
    set("", *root_attributes_);
  }
  for (const auto& [rel, a] : attributes_) {
    if (!S_ISCHR(a.mode) && !S_ISBLK(a.mode)) continue;
    // debugfs's mknod makes a name in its current folder.
    commands += "cd " + debugfs_quoted("/" + parent_of(rel)) + "\n";
    commands += "mknod " + debugfs_quoted(base_of(rel)) + (S_ISCHR(a.mode) ? " c " : " b ") +
                std::to_string(major(a.rdev)) + " " + std::to_string(minor(a.rdev)) + "\n";
    commands += "cd /\n";
  }
  // Without root, every path: what a layer said, else root's (folders libarchive made on the way,
  // the root).
  std::vector<std::pair<std::string, Attributes>> all;
  auto add = [&](const std::string& rel, const struct stat& st) {
    auto it = attributes_.find(rel);
    all.emplace_back(
        rel, it != attributes_.end() ? it->second : Attributes{0, 0, uint32_t(st.st_mode), 0});
  };
  struct stat st {};
  if (!as_root_ && ::lstat(dir_.c_str(), &st) == 0) add("", st);
  for (auto it = fs::recursive_directory_iterator(dir_);
       !as_root_ && it != fs::recursive_directory_iterator(); ++it) {
    if (::lstat(it->path().c_str(), &st) != 0) continue;
    add(it->path().lexically_relative(dir_).string(), st);
  }
  for (const auto& [rel, a] : attributes_)
    if (S_ISCHR(a.mode) || S_ISBLK(a.mode)) all.emplace_back(rel, a);
  for (const auto& [rel, a] : all)
    set(rel, a);
  fs::path script = scratch / "debugfs.commands";
  snapstore::UniqueFd fd =
      snapstore::open_file(AT_FDCWD, script, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  snapstore::write_all(fd.get(), commands, script.string());
  fd.reset();
  ProgramResult r = run_program(
      {find_program("debugfs", "e2fsprogs").string(), "-w", "-f", script.string(), file.string()},
      scratch);
  // debugfs prints its banner on stderr and goes on past failed commands: any other line there is
  // a failure.
  std::string problems;
  size_t start = 0;
  while (start < r.err.size()) {
    size_t end = r.err.find('\n', start);
    if (end == std::string::npos) end = r.err.size();
    std::string line = r.err.substr(start, end - start);
    if (!line.empty() && !line.starts_with("debugfs ")) {
      problems = line;
      break;
    }
    start = end + 1;
  }
  if (r.status != 0 || !problems.empty()) {
    throw ImageError(
        "debugfs could not set owners and modes in the image: " +
        (problems.empty() ? first_line(r.err, "exit " + std::to_string(r.status)) : problems));
  }
}

void Rootfs::build_ext4(const fs::path& file, const std::string& id, const fs::path& scratch) {
  // Size: the content plus a quarter (ext4's own metadata, inode tables, the journal) plus 1 GiB
  // for what the guest installs. The file is sparse and the store keeps no zero chunk, so the
  // headroom costs next to nothing until the guest writes there.
  uint64_t content = 0, entries = 1;
  for (auto it = fs::recursive_directory_iterator(dir_); it != fs::recursive_directory_iterator();
       ++it) {
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0) continue;
    ++entries;
    content += S_ISDIR(st.st_mode) ? 4096 : uint64_t(st.st_blocks) * 512;
  }
  entries += attributes_.size() / 8;  // device nodes not on disk: a rough allowance
  uint64_t size = content + content / 4 + kGiB;
  size = (size + kMiB - 1) / kMiB * kMiB;
  // mke2fs's default of an inode per 16 KiB runs short for images of many small files.
  uint64_t inodes = std::max<uint64_t>(size / 16384, entries + entries / 4 + 16384);
  std::string uuid = id.substr(0, 8) + "-" + id.substr(8, 4) + "-" + id.substr(12, 4) + "-" +
                     id.substr(16, 4) + "-" + id.substr(20, 12);
  { UniqueFd fd = snapstore::open_file(AT_FDCWD, file, O_WRONLY | O_CREAT | O_EXCL, 0644); }
  // The UUID and directory hash seed come from the image id, so that the same image builds into
  // much the same bytes (and chunks) again. Inode tables and the journal are zeroed now, not by
  // the guest's kernel in the background, which would dirty every sandbox's disk. No blocks are
  // reserved for root: the guest's file system serves one sandbox. The root folder's owner is
  // root whoever runs mke2fs.
  ProgramResult r =
      run_program({find_program("mke2fs", "e2fsprogs").string(), "-q", "-F", "-t", "ext4", "-b",
                   "4096", "-m", "0", "-N", std::to_string(inodes), "-U", uuid, "-E",
                   "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,hash_seed=" + uuid, "-d",
                   dir_.string(), file.string(), std::to_string(size / 1024) + "k"},
                  scratch);
  if (r.status != 0) {
    throw ImageError("mke2fs could not build the image's ext4: " +
                     first_line(r.err, first_line(r.out, "exit " + std::to_string(r.status))));
  }
  fix_ownership(file, scratch);
}

// --- The store ----------------------------------------------------------------------------------

ImageInfo describe(const Manifest& manifest) {
  ImageInfo info;
  const auto& meta = manifest.meta;
  info.tag = meta.value("tag", std::string());
  info.id = meta.value("id", std::string());
  info.created = meta.value("created", std::string());
  info.source = meta.value("source", std::string());
  info.config = image_config_from_json(meta.value("config", nlohmann::json::object()));
  if (auto it = manifest.objects.find("rootfs"); it != manifest.objects.end()) {
    info.size = it->second.size;
  }
  return info;
}

bool is_image(const Manifest& manifest) {
  return manifest.meta.value("kind", "") == "image" && manifest.objects.count("rootfs");
}

// The manifest of a tag, or nullopt; ImageError when the name holds something else.
std::optional<Manifest> find_tag(const Store& store, const std::string& tag,
                                 Hash128* manifest_hash = nullptr) {
  auto hash = store.find_name(image_store_name(tag));
  if (!hash) return std::nullopt;
  if (manifest_hash) *manifest_hash = *hash;
  Manifest manifest = store.get_manifest(*hash);
  if (!is_image(manifest)) throw ImageError("image " + tag + ": its store entry is not an image");
  if (manifest.meta.value("format", "") != kImageFormat ||
      manifest.meta.value("version", 0) != kImageFormatVersion) {
    throw ImageError("image " + tag + " has format " +
                     manifest.meta.value("format", std::string("?")) + " version " +
                     std::to_string(manifest.meta.value("version", 0)) + "; this msb reads " +
                     kImageFormat + " version " + std::to_string(kImageFormatVersion));
  }
  return manifest;
}

// A stored image with this id (under any tag), whose ext4 a new tag can share.
std::optional<Manifest> find_id(const Store& store, const std::string& id) {
  for (const auto& [name, hash] : store.list_names()) {
    if (!name.starts_with(kImageNamePrefix)) continue;
    try {
      Manifest manifest = store.get_manifest(hash);
      if (is_image(manifest) && manifest.meta.value("id", "") == id) return manifest;
    } catch (const snapstore::StoreError&) {
      // msb store verify reports damaged manifests
    }
  }
  return std::nullopt;
}

ImageInfo publish(Store& store, const std::string& tag, const std::string& id,
                  const ImageConfig& config, const std::string& source,
                  const std::vector<std::string>& layers, const ObjectRef& rootfs) {
  Manifest manifest;
  manifest.meta = {{"kind", "image"},
                   {"format", kImageFormat},
                   {"version", kImageFormatVersion},
                   {"tag", tag},
                   {"id", id},
                   {"created", utc_timestamp()},
                   {"source", source},
                   {"layers", layers},
                   {"config", config_to_json(config)}};
  manifest.objects.emplace("rootfs", rootfs);
  Hash128 hash = store.put_manifest(manifest);
  store.set_name(image_store_name(tag), hash, /*replace=*/true);
  return describe(manifest);
}

// Stores the ext4 file. Most of it is a hole (the headroom): chunks in holes are not read, only
// filled with zeros, which makes storing an image several times faster than put_file.
ObjectRef store_ext4(Store& store, const fs::path& ext4, const snapstore::ProgressFn& progress) {
  UniqueFd fd = snapstore::open_file(AT_FDCWD, ext4, O_RDONLY);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) snapstore::throw_errno("cannot stat " + ext4.string());
  const uint64_t size = uint64_t(st.st_size);
  const uint32_t chunk_size = store.options().chunk_size;
  snapstore::TransferOptions options;
  options.progress = progress;
  auto read = [&](size_t index, std::span<std::byte> out) {
    const off_t offset = off_t(uint64_t(index) * chunk_size);
    // SEEK_DATA only reports where data is (the file offset it moves is not used: pread).
    off_t data = ::lseek(fd.get(), offset, SEEK_DATA);
    if ((data < 0 && errno == ENXIO) || (data >= 0 && uint64_t(data) >= offset + out.size())) {
      std::memset(out.data(), 0, out.size());
      return;
    }
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n = ::pread(fd.get(), out.data() + done, out.size() - done, offset + off_t(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) snapstore::throw_errno("cannot read " + ext4.string());
      done += size_t(n);
    }
  };
  return store.put_object_changes(size, std::nullopt, {}, read, options);
}

// --- The default image --------------------------------------------------------------------------

// Fails unless /bin/busybox is a static executable: the image has no C library for it.
void check_static_busybox() {
  const std::string package = "install Debian's busybox-static package";
  UniqueFd fd(::open(kBusybox, O_RDONLY | O_CLOEXEC));
  if (!fd) {
    throw ImageError(std::string("the default image ") + kDefaultImage + " is built from " +
                     kBusybox + ", which is missing: " + package);
  }
  Elf64_Ehdr header{};
  bool elf = ::pread(fd.get(), &header, sizeof header, 0) == ssize_t(sizeof header) &&
             std::memcmp(header.e_ident, ELFMAG, SELFMAG) == 0 &&
             header.e_ident[EI_CLASS] == ELFCLASS64 && header.e_machine == EM_X86_64;
  for (unsigned i = 0; elf && i < header.e_phnum; ++i) {
    Elf64_Phdr program{};
    off_t at = off_t(header.e_phoff + uint64_t(i) * header.e_phentsize);
    if (::pread(fd.get(), &program, sizeof program, at) != ssize_t(sizeof program)) elf = false;
    if (elf && program.p_type == PT_INTERP) {
      throw ImageError(std::string(kBusybox) + " is dynamically linked and cannot run alone in " +
                       "the default image: " + package);
    }
  }
  if (!elf) throw ImageError(std::string(kBusybox) + " is not an x86-64 executable: " + package);
}

ImageInfo build_default_image(const Home& home, Store& store,
                              const snapstore::ProgressFn& progress) {
  check_static_busybox();
  Workspace work(home);
  ProgramResult version = run_program({kBusybox}, work.dir());
  // "BusyBox v1.35.0 (Debian 1:1.35.0-4+b3) multi-call binary."
  std::string banner = first_line(version.out, "BusyBox");
  std::string busybox_version = "unknown";
  if (size_t v = banner.find(" v"); v != std::string::npos) {
    size_t end = banner.find(" multi-call");
    busybox_version = banner.substr(v + 2, end == std::string::npos ? end : end - v - 2);
  }
  ProgramResult applets = run_program({kBusybox, "--list-full"}, work.dir());
  if (applets.status != 0 || applets.out.empty()) {
    throw ImageError(std::string(kBusybox) +
                     " --list-full failed: " + first_line(applets.err, "no applets"));
  }

  ImageConfig config;
  config.env = {std::string("PATH=") + kDefaultPath};
  config.cmd = {"/bin/sh"};
  config.workdir = "/";
  config.user = "root";
  // The config an OCI image would carry; its digest is the id, so one busybox version and recipe
  // is one image.
  nlohmann::json oci_config = {
      {"architecture", "amd64"},
      {"os", "linux"},
      {"config",
       {{"Env", config.env},
        {"Cmd", config.cmd},
        {"WorkingDir", "/"},
        {"User", "root"},
        {"Labels",
         {{"org.opencontainers.image.source", "busybox-static " + busybox_version},
          {"dev.msb.default-image-recipe", std::to_string(kDefaultImageRecipe)}}}}},
      {"rootfs", {{"type", "layers"}, {"diff_ids", nlohmann::json::array()}}}};
  const std::string config_text = oci_config.dump();
  Sha256 sha;
  sha.update(config_text.data(), config_text.size());
  const std::string id = sha.hex();
  const std::string tag = kDefaultImage;
  const std::string source = "busybox-static " + busybox_version;
  if (auto existing = find_id(store, id)) {
    return publish(store, tag, id, config, source, {}, existing->objects.at("rootfs"));
  }

  Rootfs rootfs(work.dir() / "rootfs");
  const fs::path root = work.dir() / "rootfs";
  auto dir = [&](const std::string& rel, mode_t mode) {
    fs::create_directories(root / rel);
    if (::chmod((root / rel).c_str(), mode) != 0) snapstore::throw_errno("chmod " + rel);
  };
  auto file = [&](const std::string& rel, const std::string& text, mode_t mode) {
    UniqueFd fd = snapstore::open_file(AT_FDCWD, root / rel, O_WRONLY | O_CREAT | O_TRUNC, mode);
    snapstore::write_all(fd.get(), text, (root / rel).string());
    if (::fchmod(fd.get(), mode) != 0) snapstore::throw_errno("chmod " + rel);
  };
  for (const char* d : {"bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin", "etc", "root",
                        "home/user", "proc", "sys", "dev", "run", "var/log", "mnt"}) {
    dir(d, 0755);
  }
  dir("root", 0700);
  dir("tmp", 01777);
  dir("var/tmp", 01777);
  fs::copy_file(kBusybox, root / "bin/busybox");
  ::chmod((root / "bin/busybox").c_str(), 0755);
  size_t start = 0;
  while (start < applets.out.size()) {
    size_t end = applets.out.find('\n', start);
    if (end == std::string::npos) end = applets.out.size();
    std::string applet = applets.out.substr(start, end - start);
    start = end + 1;
    // "bin/sh", "usr/bin/awk": a link to busybox where busybox puts it when it installs itself.
    std::string rel = applet.empty() ? "" : relative_path(applet, kBusybox);
    if (rel.empty() || rel == "bin/busybox" || fs::exists(fs::symlink_status(root / rel))) continue;
    fs::create_directories((root / rel).parent_path());
    fs::create_symlink("/bin/busybox", root / rel);
  }
  file("etc/passwd",
       "root:x:0:0:root:/root:/bin/sh\n"
       "user:x:1000:1000:user:/home/user:/bin/sh\n"
       "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
       0644);
  file("etc/group", "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n", 0644);
  file("etc/hostname", "msb\n", 0644);
  file("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n", 0644);
  file("etc/profile", std::string("export PATH=") + kDefaultPath + "\n", 0644);
  rootfs.set_owner("home/user", 1000, 1000);
  const fs::path ext4 = work.dir() / "rootfs.ext4";
  rootfs.build_ext4(ext4, id, work.dir());
  return publish(store, tag, id, config, source, {}, store_ext4(store, ext4, progress));
}

}  // namespace

// --- The public interface -----------------------------------------------------------------------

nlohmann::json ImageInfo::to_json() const {
  return {{"tag", tag},         {"id", id},         {"size", size},
          {"created", created}, {"source", source}, {"config", config_to_json(config)}};
}

std::string image_store_name(const std::string& tag) {
  return kImageNamePrefix +
         snapstore::hash_bytes(std::as_bytes(std::span(tag.data(), tag.size()))).hex();
}

std::string normalize_image_tag(const std::string& reference) {
  auto invalid = [&](const std::string& why) {
    return ImageError("invalid image reference " + in_quotes(reference.substr(0, 300)) + ": " +
                      why);
  };
  if (reference.empty()) throw invalid("it is empty");
  if (reference.size() > 255) throw invalid("it is longer than 255 characters");
  if (reference.find('@') != std::string::npos) {
    throw invalid("a digest (@sha256:...) names no tag; give NAME:TAG");
  }
  std::string name = reference, tag = "latest";
  size_t slash = reference.rfind('/');
  size_t colon = reference.rfind(':');
  if (colon != std::string::npos && (slash == std::string::npos || colon > slash)) {
    name = reference.substr(0, colon);
    tag = reference.substr(colon + 1);
  }
  static const std::regex kTag("[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
  if (!std::regex_match(tag, kTag)) {
    throw invalid(
        "a tag is 1 to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'");
  }
  // [HOST[:PORT]/]PATH, PATH = COMPONENT(/COMPONENT)*, as docker reads references.
  static const std::regex kHost(
      "[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*(:[0-9]+)"
      "?");
  static const std::regex kComponent("[a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*");
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    if (end == std::string::npos) end = name.size();
    parts.push_back(name.substr(start, end - start));
    start = end + 1;
  }
  size_t first = 0;
  if (parts.size() > 1 &&
      (parts[0].find_first_of(".:") != std::string::npos || parts[0] == "localhost")) {
    if (!std::regex_match(parts[0], kHost))
      throw invalid("bad registry host " + in_quotes(parts[0]));
    first = 1;
  }
  for (size_t i = first; i < parts.size(); ++i) {
    if (std::regex_match(parts[i], kComponent)) continue;
    if (std::any_of(parts[i].begin(), parts[i].end(),
                    [](char c) { return c >= 'A' && c <= 'Z'; })) {
      throw invalid("a name must be lowercase");
    }
    throw invalid("a name is lowercase letters and digits, separated by '/', '.', '_' or '-'");
  }
  return name + ":" + tag;
}

ImageInfo import_image(const Home& home, Store& store, const fs::path& source,
                       const std::string& tag_given, const snapstore::ProgressFn& progress,
                       const std::string& source_label) {
  const std::string tag = normalize_image_tag(tag_given);
  const std::string where = source.string();
  struct stat st {};
  if (::stat(source.c_str(), &st) != 0) {
    throw ImageError("cannot import " + where + ": " + std::strerror(errno));
  }
  if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)) {
    throw ImageError(where + " is neither a folder (an OCI image layout) nor a file (a docker " +
                     "save tarball)");
  }
  Workspace work(home);
  fs::path root = source;
  if (S_ISREG(st.st_mode)) {
    root = work.dir() / "source";
    unpack_tarball(source, root, where);
  }
  SourceImage image = find_image(root, tag, where, /*contained=*/S_ISREG(st.st_mode));
  const std::string config_text = read_blob(image.config, where + ": the image config");
  Sha256 config_sha;
  config_sha.update(config_text.data(), config_text.size());
  const std::string id = config_sha.hex();
  const nlohmann::json config_doc = parse_json(config_text, where + ": the image config");
  ImageConfig config = parse_config(config_doc, where);
  const std::string display =
      source_label.empty() ? fs::absolute(source).lexically_normal().string() : source_label;
  std::vector<std::string> layer_digests;

  if (image.docker_layer_digests) {
    // Older docker save layers are plain tars: their digests are the config's diff_ids.
    const auto& diff_ids = config_doc.value("rootfs", nlohmann::json::object())
                               .value("diff_ids", nlohmann::json::array());
    if (!diff_ids.is_array() || diff_ids.size() != image.layers.size()) {
      throw ImageError(where + ": the image config lists " + std::to_string(diff_ids.size()) +
                       " layer digests for " + std::to_string(image.layers.size()) + " layers");
    }
    for (size_t i = 0; i < image.layers.size(); ++i) {
      Blob& layer = image.layers[i];
      if (!layer.sha256.empty()) continue;
      std::string digest = diff_ids[i].is_string() ? diff_ids[i].get<std::string>() : "";
      if (!digest.starts_with("sha256:") || !is_hex64(digest.substr(7))) {
        throw ImageError(where + ": the image config has a bad layer digest " + in_quotes(digest));
      }
      layer.sha256 = digest.substr(7);
      layer.digest = digest;
    }
  }
  for (const auto& layer : image.layers)
    layer_digests.push_back(layer.digest);

  // Another tag of the same image: share its ext4, build nothing.
  if (auto existing = find_id(store, id)) {
    return publish(store, tag, id, config, display, layer_digests, existing->objects.at("rootfs"));
  }
  uint64_t total = 0, done = 0;
  for (const auto& layer : image.layers) {
    std::error_code ec;
    uint64_t size = fs::file_size(layer.path, ec);
    total += ec ? 0 : size;
  }
  auto last = std::chrono::steady_clock::now();
  auto read_bytes = [&](uint64_t n) {
    done += n;
    // At most every 100 ms, as the store reports its own.
    auto now = std::chrono::steady_clock::now();
    if (progress && (now - last >= std::chrono::milliseconds(100) || done >= total)) {
      last = now;
      progress(std::min(done, total), total);
    }
  };
  Rootfs rootfs(work.dir() / "rootfs");
  for (size_t i = 0; i < image.layers.size(); ++i) {
    const Blob& layer = image.layers[i];
    rootfs.apply_layer(layer,
                       where + ": layer " + std::to_string(i + 1) + " of " +
                           std::to_string(image.layers.size()) + " (" + layer.digest.substr(0, 19) +
                           ")",
                       read_bytes);
  }
  const fs::path ext4 = work.dir() / "rootfs.ext4";
  rootfs.build_ext4(ext4, id, work.dir());
  return publish(store, tag, id, config, display, layer_digests, store_ext4(store, ext4, progress));
}

std::vector<ImageInfo> list_images(const Store& store) {
  std::vector<ImageInfo> out;
  for (const auto& [name, hash] : store.list_names()) {
    if (!name.starts_with(kImageNamePrefix)) continue;
    try {
      Manifest manifest = store.get_manifest(hash);
      if (is_image(manifest)) out.push_back(describe(manifest));
    } catch (const snapstore::StoreError&) {
      // msb store verify reports damaged manifests
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.tag < b.tag; });
  return out;
}

void remove_image(Store& store, const std::string& tag_given) {
  const std::string tag = normalize_image_tag(tag_given);
  if (!find_tag(store, tag)) throw ImageError("no image " + tag);
  store.remove_name(image_store_name(tag));
}

fs::path image_cache_path(const Home& home, const std::string& id) {
  return home.root() / "cache" / "images" / (id + ".ext4");
}

namespace {
PreparedImage materialize_image(const Home& home, Store& store, const Hash128& manifest_hash,
                                const Manifest& manifest, const std::string& tag,
                                const snapstore::ProgressFn& progress);
}  // namespace

PreparedImage prepare_image(const Home& home, Store& store, const std::string& tag_given,
                            const snapstore::ProgressFn& progress) {
  const std::string tag = normalize_image_tag(tag_given);
  PreparedImage prepared;
  std::optional<Manifest> manifest = find_tag(store, tag, &prepared.manifest);
  const fs::path cache_dir = home.root() / "cache" / "images";
  fs::create_directories(cache_dir);
  if (!manifest && tag == kDefaultImage) {
    // One builder at a time; the others wait and then find it stored.
    const fs::path lock_path = cache_dir / "default-image.lock";
    UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!lock || ::flock(lock.get(), LOCK_EX) != 0) {
      snapstore::throw_errno("cannot lock " + lock_path.string());
    }
    manifest = find_tag(store, tag, &prepared.manifest);
    if (!manifest) {
      build_default_image(home, store, progress);
      manifest = find_tag(store, tag, &prepared.manifest);
    }
  }
  if (!manifest) {
    throw ImageError("no image " + tag + " (msb image import or msb pull adds one; msb image ls " +
                     "lists them)");
  }
  return materialize_image(home, store, prepared.manifest, *manifest, tag, progress);
}

PreparedImage prepare_image(const Home& home, Store& store, const Hash128& manifest_hash,
                            const snapstore::ProgressFn& progress) {
  Manifest manifest = store.get_manifest(manifest_hash);
  if (!is_image(manifest)) {
    throw ImageError("manifest " + manifest_hash.hex() + " is not an image's");
  }
  return materialize_image(home, store, manifest_hash, manifest,
                           manifest.meta.value("tag", manifest_hash.hex()), progress);
}

namespace {

// The image's ext4 in the cache, written once per image id under a lock.
PreparedImage materialize_image(const Home& home, Store& store, const Hash128& manifest_hash,
                                const Manifest& manifest, const std::string& tag,
                                const snapstore::ProgressFn& progress) {
  PreparedImage prepared;
  prepared.manifest = manifest_hash;
  const fs::path cache_dir = home.root() / "cache" / "images";
  fs::create_directories(cache_dir);
  prepared.info = describe(manifest);
  const ObjectRef& rootfs = manifest.objects.at("rootfs");
  const std::string& id = prepared.info.id;
  if (!is_hex64(id)) throw ImageError("image " + tag + " has a malformed id " + in_quotes(id));
  prepared.ext4 = image_cache_path(home, id);
  // One materializer per image at a time; the others wait and then find it done.
  const fs::path lock_path = cache_dir / (id + ".lock");
  UniqueFd lock(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!lock || ::flock(lock.get(), LOCK_EX) != 0) {
    snapstore::throw_errno("cannot lock " + lock_path.string());
  }
  std::error_code ec;
  if (fs::file_size(prepared.ext4, ec) == rootfs.size && !ec) return prepared;
  const fs::path temp = cache_dir / snapstore::unique_temp_name("." + id);
  try {
    snapstore::TransferOptions options;
    options.progress = progress;
    store.materialize_file(rootfs, temp, options);
    // Read-only: every sandbox's disk is a layer over this one file.
    if (::chmod(temp.c_str(), 0444) != 0) snapstore::throw_errno("chmod " + temp.string());
    if (::rename(temp.c_str(), prepared.ext4.c_str()) != 0) {
      snapstore::throw_errno("cannot rename " + temp.string() + " to " + prepared.ext4.string());
    }
  } catch (const std::exception& e) {
    fs::remove(temp, ec);
    throw ImageError("image " + tag + ": " + e.what());
  }
  return prepared;
}

}  // namespace

size_t prune_image_caches(const Home& home, const Store& store) {
  // Every image a name reaches: a tag, a sandbox's hold on its image, or a snapshot (whose
  // manifest lists the image its disk is a layer over, and its parent).
  std::set<std::string> ids;
  std::set<Hash128> seen;
  std::vector<Hash128> todo;
  for (const auto& [name, hash] : store.list_names())
    todo.push_back(hash);
  while (!todo.empty()) {
    Hash128 hash = todo.back();
    todo.pop_back();
    if (!seen.insert(hash).second) continue;
    try {
      Manifest manifest = store.get_manifest(hash);
      if (is_image(manifest)) ids.insert(manifest.meta.value("id", ""));
      for (const Hash128& listed : manifest.manifests)
        todo.push_back(listed);
    } catch (const snapstore::StoreError&) {
      return 0;  // a damaged store: keep everything
    }
  }
  size_t removed = 0;
  std::error_code ec;
  const fs::path dir = home.root() / "cache" / "images";
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::string name = entry.path().filename().string();
    if (!name.ends_with(".ext4")) continue;
    std::string id = name.substr(0, name.size() - 5);
    if (ids.count(id)) continue;
    fs::remove(entry.path(), ec);
    fs::remove(dir / (id + ".lock"), ec);
    ++removed;
  }
  return removed;
}

ImageConfig image_config_from_json(const nlohmann::json& json) {
  ImageConfig config;
  if (!json.is_object()) return config;
  config.env = json.value("env", std::vector<std::string>{});
  config.entrypoint = json.value("entrypoint", std::vector<std::string>{});
  config.cmd = json.value("cmd", std::vector<std::string>{});
  config.workdir = json.value("workdir", std::string());
  config.user = json.value("user", std::string());
  return config;
}

}  // namespace msb::core
