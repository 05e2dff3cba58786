#include "core/home.h"

#include <fcntl.h>
#include <stdio.h>

#include <cstdlib>
#include <string>

#include "snapstore/error.h"
#include "snapstore/file_util.h"

namespace msb::core {

Home Home::resolve(const std::optional<std::filesystem::path>& override_dir) {
  if (override_dir && !override_dir->empty()) return Home(std::filesystem::absolute(*override_dir));
  if (const char* env = std::getenv("MSB_HOME"); env && *env) {
    return Home(std::filesystem::absolute(env));
  }
  const char* home = std::getenv("HOME");
  if (!home || !*home) {
    throw snapstore::StoreError(
        "neither MSB_HOME nor HOME is set: cannot find msb's state directory");
  }
  return Home(std::filesystem::path(home) / ".msb");
}

std::unique_ptr<snapstore::Store> Home::open_store(bool exclusive) const {
  snapstore::StoreOptions options;
  options.exclusive = exclusive;
  if (const char* level = std::getenv("MSB_ZSTD_LEVEL"); level && *level) {
    char* end = nullptr;
    long value = std::strtol(level, &end, 10);
    if (*end != '\0') {
      throw snapstore::StoreError("MSB_ZSTD_LEVEL=\"" + std::string(level) + "\" is not a number");
    }
    options.zstd_level = static_cast<int>(value);
  }
  return snapstore::Store::open(store_dir(), options);
}

void write_file_atomically(const std::filesystem::path& path, std::string_view text) {
  const std::filesystem::path temp =
      path.parent_path() / snapstore::unique_temp_name("." + path.filename().string());
  {
    snapstore::UniqueFd fd =
        snapstore::open_file(AT_FDCWD, temp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    snapstore::write_all(fd.get(), text, temp.string());
  }
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    snapstore::throw_errno("cannot rename " + temp.string() + " to " + path.string());
  }
}

}  // namespace msb::core
