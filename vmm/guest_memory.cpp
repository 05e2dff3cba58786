#include "vmm/guest_memory.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace msb::vmm {

std::string hex_address(uint64_t address) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(address));
  return text;
}

void GuestMemory::add_region(uint64_t guest_address, std::span<std::byte> host) {
  uint64_t size = host.size();
  if (size == 0 || guest_address + size < guest_address) {
    throw std::invalid_argument("guest memory region is empty or wraps around");
  }
  for (const MemoryRegion& r : regions_) {
    bool disjoint =
        guest_address + size <= r.guest_address || r.guest_address + r.host.size() <= guest_address;
    if (!disjoint) throw std::invalid_argument("guest memory regions overlap");
  }
  regions_.push_back({guest_address, host});
  std::sort(regions_.begin(), regions_.end(), [](const MemoryRegion& a, const MemoryRegion& b) {
    return a.guest_address < b.guest_address;
  });
}

std::optional<std::span<std::byte>> GuestMemory::slice(uint64_t address, uint64_t length) const {
  for (const MemoryRegion& r : regions_) {
    if (address < r.guest_address) continue;
    uint64_t offset = address - r.guest_address;
    // Written so that nothing can overflow: offset <= size, then length <= size - offset.
    if (offset > r.host.size() || length > r.host.size() - offset) continue;
    return r.host.subspan(offset, length);
  }
  return std::nullopt;
}

bool GuestMemory::read(uint64_t address, std::span<std::byte> out) const {
  auto source = slice(address, out.size());
  if (!source) return false;
  if (!out.empty()) std::memcpy(out.data(), source->data(), out.size());
  return true;
}

std::optional<std::span<std::byte>> GuestMemory::writable_slice(uint64_t address,
                                                                uint64_t length) const {
  auto target = slice(address, length);
  if (target) mark_dirty(*target);
  return target;
}

bool GuestMemory::write(uint64_t address, std::span<const std::byte> in) const {
  auto target = slice(address, in.size());
  if (!target) return false;
  if (!in.empty()) std::memcpy(target->data(), in.data(), in.size());
  mark_dirty(*target);
  return true;
}

void GuestMemory::mark_dirty(std::span<const std::byte> host) const {
  if (dirty_ == nullptr || host.empty() || !dirty_->enabled()) return;
  dirty_->mark(static_cast<uint64_t>(host.data() - dirty_base_), host.size());
}

// ---- dirty bitmaps ----

void bitmap_or(std::vector<uint64_t>& into, uint64_t first_page, std::span<const uint64_t> from,
               uint64_t from_pages) {
  for (size_t word = 0; word < from.size(); ++word) {
    uint64_t bits = from[word];
    while (bits != 0) {
      const uint64_t page = word * 64 + static_cast<uint64_t>(__builtin_ctzll(bits));
      bits &= bits - 1;
      if (page >= from_pages) break;
      const uint64_t target = first_page + page;
      if (target / 64 < into.size()) into[target / 64] |= 1ull << (target % 64);
    }
  }
}

void bitmap_set(std::vector<uint64_t>& bitmap, uint64_t first, uint64_t count) {
  for (uint64_t page = first; page < first + count && page / 64 < bitmap.size(); ++page)
    bitmap[page / 64] |= 1ull << (page % 64);
}

uint64_t bitmap_count(std::span<const uint64_t> bitmap) {
  uint64_t count = 0;
  for (uint64_t word : bitmap)
    count += static_cast<uint64_t>(__builtin_popcountll(word));
  return count;
}

void DirtyBitmap::reset(uint64_t pages) {
  pages_ = pages;
  words_ = std::make_unique<std::atomic<uint64_t>[]>(bitmap_words(pages));
  enabled_.store(false);
}

void DirtyBitmap::mark(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= pages_ * kPageSize) return;
  const uint64_t first = offset / kPageSize;
  const uint64_t last = std::min((offset + length - 1) / kPageSize, pages_ - 1);
  for (uint64_t page = first; page <= last; ++page) {
    auto& word = words_[page / 64];
    const uint64_t bit = 1ull << (page % 64);
    // Most writes land on pages already marked: a load first avoids a locked RMW.
    if (!(word.load(std::memory_order_relaxed) & bit)) word.fetch_or(bit);
  }
}

std::vector<uint64_t> DirtyBitmap::take() {
  std::vector<uint64_t> result(bitmap_words(pages_));
  for (size_t i = 0; i < result.size(); ++i)
    result[i] = words_[i].exchange(0);
  return result;
}

}  // namespace msb::vmm
