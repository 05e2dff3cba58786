// The staging area a VMM process fills while its guest is paused and the snapshotting msb reads
// afterwards (a memfd, opened through /proc/PID/fd/N). Layout, every offset a multiple of 4096:
//
//   [0, 8)            u64 length of the header JSON (little-endian)
//   [8, ...)          the header JSON: {"format", "parent", "state", ...} then the chunk lists
//   memory slots      one chunk_size slot per staged memory chunk, in memory_staged order
//   disk slots        one chunk_size slot per staged disk chunk, in disk_staged order
//   disk map          the disk delta's map file (vmm/disk_overlay.h format)
//
// The reader treats the area as untrusted only in size: the header must fit, and every slot
// must lie inside the area (checked by StagingLayout::parse).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace msb::core {

struct StagingLayout {
  std::string header;  // JSON
  uint64_t memory_size = 0;
  uint32_t chunk_size = 0;
  std::vector<uint64_t> memory_staged;  // chunk indexes copied into slots
  std::vector<uint64_t> memory_zero;    // chunk indexes that are all zero (no slot)
  bool has_disk = false;
  uint64_t disk_size = 0;
  std::vector<uint64_t> disk_staged;
  uint64_t disk_map_size = 0;

  // Derived by compute().
  uint64_t data_offset = 0;
  uint64_t disk_map_offset = 0;
  uint64_t total_size = 0;

  static constexpr uint64_t kAlign = 4096;
  static uint64_t align(uint64_t value) { return (value + kAlign - 1) / kAlign * kAlign; }

  nlohmann::json lists() const {
    return {{"memory_size", memory_size},     {"chunk_size", chunk_size},
            {"memory_staged", memory_staged}, {"memory_zero", memory_zero},
            {"has_disk", has_disk},           {"disk_size", disk_size},
            {"disk_staged", disk_staged},     {"disk_map_size", disk_map_size}};
  }
  // The full header document: the caller's header with the lists merged in.
  std::string document() const {
    nlohmann::json doc = nlohmann::json::parse(header);
    doc["layout"] = lists();
    return doc.dump();
  }
  void compute() {
    const std::string doc = document();
    data_offset = align(8 + doc.size());
    disk_map_offset = data_offset + chunk_size * (memory_staged.size() + disk_staged.size());
    total_size = align(disk_map_offset + disk_map_size);
  }
  uint64_t memory_slot(size_t i) const { return data_offset + uint64_t{chunk_size} * i; }
  uint64_t disk_slot(size_t i) const {
    return data_offset + uint64_t{chunk_size} * (memory_staged.size() + i);
  }
};

// Writes the length and the header document at the start of the area.
inline void write_staging_prefix(const StagingLayout& layout, std::byte* area) {
  const std::string doc = layout.document();
  uint64_t length = doc.size();
  std::memcpy(area, &length, 8);
  std::memcpy(area + 8, doc.data(), doc.size());
}

// Reads the header back from an area of `size` bytes; nullopt when it is malformed. `header`
// receives the whole document.
inline std::optional<StagingLayout> parse_staging(std::span<const std::byte> area,
                                                  nlohmann::json& header) {
  if (area.size() < 8) return std::nullopt;
  uint64_t length = 0;
  std::memcpy(&length, area.data(), 8);
  if (length > area.size() - 8) return std::nullopt;
  header = nlohmann::json::parse(
      std::string_view(reinterpret_cast<const char*>(area.data()) + 8, length), nullptr, false);
  if (!header.is_object() || !header.contains("layout")) return std::nullopt;
  try {
    const auto& l = header["layout"];
    StagingLayout layout;
    layout.memory_size = l.at("memory_size").get<uint64_t>();
    layout.chunk_size = l.at("chunk_size").get<uint32_t>();
    layout.memory_staged = l.at("memory_staged").get<std::vector<uint64_t>>();
    layout.memory_zero = l.at("memory_zero").get<std::vector<uint64_t>>();
    layout.has_disk = l.at("has_disk").get<bool>();
    layout.disk_size = l.at("disk_size").get<uint64_t>();
    layout.disk_staged = l.at("disk_staged").get<std::vector<uint64_t>>();
    layout.disk_map_size = l.at("disk_map_size").get<uint64_t>();
    if (layout.chunk_size == 0 || layout.chunk_size % StagingLayout::kAlign) return std::nullopt;
    layout.data_offset = StagingLayout::align(8 + length);
    layout.disk_map_offset =
        layout.data_offset +
        uint64_t{layout.chunk_size} * (layout.memory_staged.size() + layout.disk_staged.size());
    layout.total_size = StagingLayout::align(layout.disk_map_offset + layout.disk_map_size);
    if (layout.total_size > area.size()) return std::nullopt;
    return layout;
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
}

}  // namespace msb::core
