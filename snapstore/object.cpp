#include "snapstore/object.h"

#include "snapstore/error.h"

namespace msb::snapstore {
namespace {
// Version of the manifest document; a newer one is refused rather than misread.
constexpr int kManifestFormat = 1;
}  // namespace

uint32_t ObjectRef::chunk_length(size_t index) const {
  uint64_t offset = chunk_offset(index);
  return static_cast<uint32_t>(std::min<uint64_t>(chunk_size, size - offset));
}

uint64_t ObjectRef::nonzero_bytes() const {
  uint64_t total = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (chunks[i]) total += chunk_length(i);
  }
  return total;
}

nlohmann::json ObjectRef::to_json() const {
  nlohmann::json list = nlohmann::json::array();
  for (const ChunkRef& c : chunks) {
    if (c) {
      list.push_back(c->hex());
    } else {
      list.push_back(nullptr);
    }
  }
  return {{"size", size}, {"chunk_size", chunk_size}, {"chunks", std::move(list)}};
}

ObjectRef ObjectRef::from_json(const nlohmann::json& json) {
  ObjectRef ref;
  if (!json.is_object() || !json.contains("size") || !json["size"].is_number_unsigned() ||
      !json.contains("chunk_size") || !json["chunk_size"].is_number_integer() ||
      !json.contains("chunks") || !json["chunks"].is_array()) {
    throw StoreError("object reference is malformed: it needs size, chunk_size and chunks");
  }
  ref.size = json["size"].get<uint64_t>();
  int64_t chunk_size = json["chunk_size"].get<int64_t>();
  if (chunk_size <= 0 || chunk_size % 4096 != 0 || chunk_size > (1u << 30)) {
    throw StoreError("object reference has an invalid chunk size " + std::to_string(chunk_size));
  }
  ref.chunk_size = static_cast<uint32_t>(chunk_size);
  const auto& list = json["chunks"];
  uint64_t expected = (ref.size + chunk_size - 1) / chunk_size;
  if (list.size() != expected) {
    throw StoreError("object reference of " + std::to_string(ref.size) + " bytes lists " +
                     std::to_string(list.size()) + " chunks, expected " + std::to_string(expected));
  }
  ref.chunks.reserve(list.size());
  for (const auto& item : list) {
    if (item.is_null()) {
      ref.chunks.emplace_back(std::nullopt);
      continue;
    }
    std::optional<Hash128> hash;
    if (item.is_string()) hash = Hash128::parse(item.get_ref<const std::string&>());
    if (!hash) throw StoreError("object reference has a malformed chunk hash " + item.dump());
    ref.chunks.emplace_back(*hash);
  }
  return ref;
}

std::string Manifest::serialize() const {
  nlohmann::json objects_json = nlohmann::json::object();
  for (const auto& [key, ref] : objects)
    objects_json[key] = ref.to_json();
  nlohmann::json manifests_json = nlohmann::json::array();
  for (const Hash128& h : manifests)
    manifests_json.push_back(h.hex());
  nlohmann::json doc = {{"format", kManifestFormat},
                        {"meta", meta},
                        {"objects", std::move(objects_json)},
                        {"manifests", std::move(manifests_json)}};
  return doc.dump();
}

Manifest Manifest::parse(std::string_view bytes, const std::string& what) {
  nlohmann::json doc = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) throw StoreError(what + " is not valid JSON");
  if (!doc.contains("format") || !doc["format"].is_number_integer()) {
    throw StoreError(what + " has no format version");
  }
  int format = doc["format"].get<int>();
  if (format != kManifestFormat) {
    throw StoreError(what + " has format " + std::to_string(format) + ", this msb reads format " +
                     std::to_string(kManifestFormat));
  }
  Manifest m;
  try {
    m.meta = doc.value("meta", nlohmann::json::object());
    // Named locals: a range-for over a temporary's items() would iterate a destroyed object.
    const nlohmann::json objects = doc.value("objects", nlohmann::json::object());
    const nlohmann::json manifests = doc.value("manifests", nlohmann::json::array());
    if (!objects.is_object() || !manifests.is_array()) {
      throw StoreError("objects must be an object and manifests an array");
    }
    for (const auto& [key, value] : objects.items()) {
      m.objects.emplace(key, ObjectRef::from_json(value));
    }
    for (const auto& item : manifests) {
      std::optional<Hash128> h;
      if (item.is_string()) h = Hash128::parse(item.get_ref<const std::string&>());
      if (!h) throw StoreError("malformed manifest reference " + item.dump());
      m.manifests.push_back(*h);
    }
  } catch (const StoreError& e) {
    throw StoreError(what + ": " + e.what());
  } catch (const nlohmann::json::exception& e) {
    throw StoreError(what + " is malformed: " + e.what());
  }
  return m;
}

}  // namespace msb::snapstore
