// Root filesystem images: ext4 files built from OCI images (msb image import, msb pull) or, for
// the default image, from Debian's busybox-static; kept in the store by content, so two tags of
// one image share one ext4 object.
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/home.h"
#include "snapstore/store.h"

namespace msb::core {

// The image msb create and msb run use without --image.
inline constexpr const char* kDefaultImage = "busybox:latest";

// What the image's config says about running it (OCI image config "config" section).
struct ImageConfig {
  std::vector<std::string> env;         // "K=V"
  std::vector<std::string> entrypoint;  // may be empty
  std::vector<std::string> cmd;         // may be empty
  std::string workdir;                  // "" for /
  std::string user;                     // "" for root
};

struct ImageInfo {
  std::string tag;      // NAME:TAG as the user gave it (":latest" added when missing)
  std::string id;       // the image's content id (hex), shared by every tag of one image
  uint64_t size = 0;    // bytes of the ext4 file
  std::string created;  // ISO 8601 UTC, when this tag was made
  std::string source;   // what it was imported or pulled from
  ImageConfig config;
};

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
// An existing tag is replaced. Progress (bytes) goes to `progress` when set.
ImageInfo import_image(const Home& home, snapstore::Store& store,
                       const std::filesystem::path& source, const std::string& tag,
                       const snapstore::ProgressFn& progress = {});

std::vector<ImageInfo> list_images(const snapstore::Store& store);

// Removes a tag (the image's data goes with store gc once no tag or snapshot uses it).
void remove_image(snapstore::Store& store, const std::string& tag);

struct PreparedImage {
  std::filesystem::path ext4;  // read-only, under $MSB_HOME/cache/images/
  ImageInfo info;
};

// The image's ext4 file for a sandbox's disk, materialized once per image id. kDefaultImage is
// built from the host's busybox-static (and stored) the first time it is asked for.
PreparedImage prepare_image(const Home& home, snapstore::Store& store, const std::string& tag,
                            const snapstore::ProgressFn& progress = {});

}  // namespace msb::core
