// Root filesystem images: ext4 files built from OCI images (msb image import, msb pull) or, for
// the default image, from Debian's busybox-static; kept in the store by content, so two tags of
// one image share one ext4 object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/home.h"
#include "snapstore/store.h"

struct archive;  // libarchive's, for Sha256
struct archive_entry;

namespace msb::core {

// The image msb create and msb run use without --image.
inline constexpr const char* kDefaultImage = "busybox:latest";

// Every tag is a store name "image.<XXH3-128 of the tag, hex>" (tags hold ':' and '/', which names
// may not) whose manifest has meta.kind "image" and one object, "rootfs" (the ext4). User names
// may not start with this prefix.
inline constexpr const char* kImageNamePrefix = "image.";
inline constexpr const char* kImageFormat = "msb-image";
inline constexpr int kImageFormatVersion = 1;

// What the image's config says about running it (OCI image config "config" section).
struct ImageConfig {
  std::vector<std::string> env;         // "K=V"
  std::vector<std::string> entrypoint;  // may be empty
  std::vector<std::string> cmd;         // may be empty
  std::string workdir;                  // "" for /
  std::string user;                     // "" for root
};
// The form msb keeps it in (an image's metadata, a sandbox's config.json): {"env", "entrypoint",
// "cmd", "workdir", "user"}, each missing one empty.
ImageConfig image_config_from_json(const nlohmann::json& json);

struct ImageInfo {
  std::string tag;      // NAME:TAG as the user gave it (":latest" added when missing)
  std::string id;       // the image's content id (hex), shared by every tag of one image
  uint64_t size = 0;    // bytes of the ext4 file
  std::string created;  // ISO 8601 UTC, when this tag was made
  std::string source;   // what it was imported or pulled from
  ImageConfig config;
  // {"tag", "id", "size", "created", "source", "config": {"env", "entrypoint", "cmd", "workdir",
  // "user"}}
  nlohmann::json to_json() const;
};

// The store name of a (normalized) tag.
std::string image_store_name(const std::string& tag);

// "NAME" becomes "NAME:latest"; throws ImageError for a malformed reference.
std::string normalize_image_tag(const std::string& reference);

// An image that cannot be imported, found or used, with which one and why.
class ImageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Imports an OCI image layout directory or a `docker save` tarball at `source` (the one image
// in it, or the one whose ref name matches `tag`'s) as `tag`: layers applied in order with
// whiteouts, the config kept, written as an ext4 image with mke2fs -d and stored by content.
// An existing tag is replaced. Progress (bytes) goes to `progress` when set. The image records
// `source_label` as where it came from (msb pull: the reference and manifest digest), else the
// absolute path of `source`.
ImageInfo import_image(const Home& home, snapstore::Store& store,
                       const std::filesystem::path& source, const std::string& tag,
                       const snapstore::ProgressFn& progress = {},
                       const std::string& source_label = "");

std::vector<ImageInfo> list_images(const snapstore::Store& store);

// Removes a tag (the image's data goes with store gc once no tag or snapshot uses it).
void remove_image(snapstore::Store& store, const std::string& tag);

struct PreparedImage {
  std::filesystem::path ext4;  // read-only, under $MSB_HOME/cache/images/
  ImageInfo info;
  // The tag's manifest. A store name pointing at it keeps the image (and its cached ext4, see
  // prune_image_caches) through msb image rm and msb store gc.
  snapstore::Hash128 manifest;
};

// The image's ext4 file for a sandbox's disk, materialized once per image id. kDefaultImage is
// built from the host's busybox-static (and stored) the first time it is asked for.
PreparedImage prepare_image(const Home& home, snapstore::Store& store, const std::string& tag,
                            const snapstore::ProgressFn& progress = {});

// The same for the image manifest `manifest` (a sandbox's or a snapshot's hold on its image,
// which outlives the tag).
PreparedImage prepare_image(const Home& home, snapstore::Store& store,
                            const snapstore::Hash128& manifest,
                            const snapstore::ProgressFn& progress = {});

// Where prepare_image puts the ext4 of image `id`.
std::filesystem::path image_cache_path(const Home& home, const std::string& id);
// Removes cached ext4 files of images no name in the store reaches any more (a tag, a sandbox's
// hold, a snapshot that lists the image; for msb store gc);
// returns how many.
size_t prune_image_caches(const Home& home, const snapstore::Store& store);

// SHA-256, for OCI digests. Computed by libarchive (which has it from nettle for its mtree
// digests), so that msb needs no crypto library of its own.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t size);
  // 64 lowercase hex digits; the object takes no more data after.
  std::string hex();

 private:
  ::archive* archive_ = nullptr;
  ::archive_entry* entry_ = nullptr;
  std::string output_;
  std::string hex_;
};

// The SHA-256 of a file's bytes, hex.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace msb::core
