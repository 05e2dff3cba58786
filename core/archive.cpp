#include "core/archive.h"

#include <sys/stat.h>

#include <ctime>

#include "core/images.h"
#include "snapstore/error.h"
#include "snapstore/name.h"

namespace msb::core {
using snapstore::StoreError;

std::string utc_timestamp() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

PutResult put_file(snapstore::Store& store, const std::string& name,
                   const std::filesystem::path& file, bool replace,
                   const snapstore::ProgressFn& progress) {
  snapstore::check_name(name);
  // Image tags are names with this prefix (core/images.h): a file must not replace one.
  if (name.starts_with(kImageNamePrefix)) {
    throw StoreError("invalid name \"" + name + "\": names starting with \"" + kImageNamePrefix +
                     "\" are msb's own (image tags)");
  }
  // Checked first so that a refused name costs no work; set_name checks again atomically.
  if (!replace && store.find_name(name)) {
    throw StoreError("the name \"" + name + "\" already exists (use --force to replace it)");
  }
  struct stat st;
  if (::stat(file.c_str(), &st) != 0)
    throw StoreError("cannot read " + file.string() + ": no such file");
  if (S_ISDIR(st.st_mode)) throw StoreError(file.string() + " is a directory, not a file");

  snapstore::TransferOptions options;
  options.progress = progress;
  PutResult result;
  result.object = store.put_file(file, options);
  snapstore::Manifest manifest;
  manifest.meta = {{"kind", "file"},
                   {"source", std::filesystem::absolute(file).string()},
                   {"created", utc_timestamp()}};
  manifest.objects.emplace("data", result.object);
  result.manifest = store.put_manifest(manifest);
  store.set_name(name, result.manifest, replace);
  return result;
}

uint64_t get_file(snapstore::Store& store, const std::string& name,
                  const std::filesystem::path& output, const snapstore::ProgressFn& progress) {
  std::optional<snapstore::Hash128> hash = store.find_name(name);
  if (!hash) throw StoreError("no name \"" + name + "\" in the store");
  snapstore::Manifest manifest = store.get_manifest(*hash);
  auto it = manifest.objects.find("data");
  if (manifest.meta.value("kind", "") != "file" || it == manifest.objects.end()) {
    throw StoreError("\"" + name + "\" is a " + manifest.meta.value("kind", "manifest") +
                     ", not a file stored with msb store put");
  }
  snapstore::TransferOptions options;
  options.progress = progress;
  store.materialize_file(it->second, output, options);
  return it->second.size;
}

std::vector<NamedEntry> list_entries(const snapstore::Store& store) {
  std::vector<NamedEntry> out;
  for (const auto& [name, hash] : store.list_names()) {
    NamedEntry entry;
    entry.name = name;
    entry.manifest = hash;
    try {
      snapstore::Manifest manifest = store.get_manifest(hash);
      entry.kind = manifest.meta.value("kind", "unknown");
      entry.created = manifest.meta.value("created", "");
      entry.source = manifest.meta.value("source", "");
      for (const auto& [key, object] : manifest.objects)
        entry.size += object.size;
    } catch (const StoreError&) {
      entry.kind = "damaged";  // msb store verify says why
    }
    out.push_back(std::move(entry));
  }
  return out;
}

}  // namespace msb::core
