#include "vmm/virtio/balloon.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace msb::vmm::virtio {

namespace {

// Byte offsets in the configuration space (§5.5.4).
constexpr uint64_t kNumPagesOffset = 0;
constexpr uint64_t kActualOffset = 4;

// MADV_DONTNEED frees whole host pages only: a 4 KiB guest page can be given back where it is
// exactly one host page, at a host page boundary (always so for guest RAM mapped with mmap on
// x86-64).
bool is_host_page(const std::byte* address) {
  static const long host_page_size = ::sysconf(_SC_PAGESIZE);
  return host_page_size == static_cast<long>(VirtioBalloon::kPageSize) &&
         reinterpret_cast<uintptr_t>(address) % VirtioBalloon::kPageSize == 0;
}

void drop(std::byte* start, size_t length) {
  if (::madvise(start, length, MADV_DONTNEED) == 0) return;
  // Not the guest's doing, and nothing to undo: the pages just stay.
  static std::once_flag once;
  const int error = errno;
  std::call_once(once, [&] {
    std::fprintf(stderr, "virtio-balloon: madvise(MADV_DONTNEED): %s: pages not freed\n",
                 std::strerror(error));
  });
}

}  // namespace

void VirtioBalloon::read_config(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  std::array<std::byte, kConfigSize> config{};
  {
    std::lock_guard lock(mutex_);
    // Little-endian, as a VERSION_1 device's configuration is (and as x86 is).
    std::memcpy(config.data() + kNumPagesOffset, &state_.num_pages, 4);
    std::memcpy(config.data() + kActualOffset, &state_.actual, 4);
  }
  if (offset >= config.size()) return;
  const size_t length = std::min<size_t>(data.size(), config.size() - offset);
  std::memcpy(data.data(), config.data() + offset, length);
}

void VirtioBalloon::write_config(uint64_t offset, std::span<const std::byte> data) {
  // Only `actual` is the driver's; a write that reaches into num_pages changes only its part
  // in `actual`.
  std::lock_guard lock(mutex_);
  std::array<std::byte, 4> actual;
  std::memcpy(actual.data(), &state_.actual, 4);
  for (size_t i = 0; i < data.size(); ++i) {
    const uint64_t at = offset + i;
    if (at >= kActualOffset && at < kActualOffset + 4) actual[at - kActualOffset] = data[i];
  }
  std::memcpy(&state_.actual, actual.data(), 4);
}

void VirtioBalloon::activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t,
                             InterruptSink& interrupt) {
  std::lock_guard lock(mutex_);
  memory_ = &memory;
  queues_ = queues;
  interrupt_ = &interrupt;
}

void VirtioBalloon::reset() {
  std::lock_guard lock(mutex_);
  memory_ = nullptr;
  queues_ = {};
  interrupt_ = nullptr;
  // A reset driver holds no pages (a rebooted guest starts with all its memory); the host's
  // target stays.
  state_.actual = 0;
}

void VirtioBalloon::set_target_pages(uint32_t pages) {
  std::lock_guard lock(mutex_);
  if (state_.num_pages == pages) return;
  state_.num_pages = pages;
  // Without an active driver there is nobody to tell: a driver reads the target when it starts.
  if (interrupt_) interrupt_->config_changed();
}

BalloonState VirtioBalloon::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void VirtioBalloon::restore(const BalloonState& state) {
  std::lock_guard lock(mutex_);
  state_ = state;
}

bool VirtioBalloon::read_pages(const DescriptorChain& chain, std::vector<uint64_t>& pages) const {
  // The driver's buffer is an array of le32 PFNs, all device-readable (§5.5.6).
  if (!chain.ok() || chain.writable_length() != 0) return false;
  const uint64_t length = chain.readable_length();
  if (length == 0 || length % 4 != 0 || length / 4 > kMaxPfnsPerRequest) return false;
  const std::vector<std::byte> raw = chain.gather_readable(*memory_, length);
  if (raw.size() != length) return false;
  for (size_t i = 0; i < raw.size(); i += 4) {
    uint32_t pfn;
    std::memcpy(&pfn, raw.data() + i, 4);
    const uint64_t address = uint64_t{pfn} * kPageSize;
    if (!memory_->slice(address, kPageSize)) return false;  // not (wholly) guest RAM
    pages.push_back(address);
  }
  return true;
}

void VirtioBalloon::release(const std::vector<uint64_t>& pages) {
  // Runs of pages adjacent in host memory (Linux hands them over mostly in order) go in one call.
  std::byte* run = nullptr;
  size_t run_length = 0;
  for (uint64_t address : pages) {
    // writable_slice: the page's contents change (to zeros, or to the RAM file's for a restored
    // machine's private mapping), which KVM's dirty log cannot see, so it counts as the VMM's
    // own write for the next incremental snapshot.
    std::byte* page = memory_->writable_slice(address, kPageSize)->data();
    if (!is_host_page(page)) continue;
    if (run && page == run + run_length) {
      run_length += kPageSize;
      continue;
    }
    if (run) drop(run, run_length);
    run = page;
    run_length = kPageSize;
  }
  if (run) drop(run, run_length);
}

void VirtioBalloon::process_queue(size_t index) {
  if (memory_ == nullptr || index >= queues_.size()) return;
  Queue& queue = queues_[index];
  bool used = false;
  std::vector<uint64_t> pages;
  while (auto chain = queue.pop(*memory_)) {
    pages.clear();
    const bool ok = read_pages(*chain, pages);
    // Deflating needs nothing: the guest's next touch of a page brings it back.
    if (ok && index == kInflateQueue) release(pages);
    {
      std::lock_guard lock(mutex_);
      if (!ok) {
        ++state_.bad_requests;
      } else if (index == kInflateQueue) {
        state_.pages_inflated += pages.size();
      } else {
        state_.pages_deflated += pages.size();
      }
    }
    // The device writes nothing into the buffers; a bad request goes back the same way.
    used |= queue.add_used(*memory_, chain->head(), 0);
  }
  if (report_broken_queues(queues_, *interrupt_)) return;
  if (used && queue.needs_notification(*memory_)) interrupt_->used_buffers();
}

}  // namespace msb::vmm::virtio
