// The state directory ($MSB_HOME, default ~/.msb): where every msb invocation finds sandboxes, the
// store, images and kernels. No VM state lives in the CLI process; it lives here.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>

#include "snapstore/store.h"

namespace msb::core {

class Home {
 public:
  // `override_dir` (the --home option) wins over $MSB_HOME, which wins over ~/.msb.
  static Home resolve(const std::optional<std::filesystem::path>& override_dir = std::nullopt);

  const std::filesystem::path& root() const { return root_; }
  std::filesystem::path store_dir() const { return root_ / "store"; }

  // Opens the store with the settings of the environment: MSB_ZSTD_LEVEL picks the compression
  // level of new chunks. `exclusive` is for gc.
  std::unique_ptr<snapstore::Store> open_store(bool exclusive = false) const;

 private:
  explicit Home(std::filesystem::path root) : root_(std::move(root)) {}
  std::filesystem::path root_;
};

// Replaces `path` (a file of the state directory, owner-only) with `text` by write-then-rename,
// so that readers see the old file or the new one, never half of one.
void write_file_atomically(const std::filesystem::path& path, std::string_view text);

}  // namespace msb::core
