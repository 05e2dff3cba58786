#include "vmm/virtio/rng.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace msb::vmm::virtio {

void VirtioRng::read_config(uint64_t, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());  // virtio-rng has no configuration space
}

void VirtioRng::activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t,
                         InterruptSink& interrupt) {
  memory_ = &memory;
  queues_ = queues;
  interrupt_ = &interrupt;
}

void VirtioRng::reset() {
  memory_ = nullptr;
  queues_ = {};
  interrupt_ = nullptr;
}

void VirtioRng::process_queue(size_t index) {
  if (memory_ == nullptr || index >= queues_.size()) return;
  Queue& queue = queues_[index];
  std::vector<std::byte> random;
  bool used = false;
  while (auto chain = queue.pop(*memory_)) {
    uint32_t written = 0;
    if (chain->ok()) {
      const size_t wanted =
          static_cast<size_t>(std::min<uint64_t>(chain->writable_length(), kMaxBytesPerRequest));
      random.resize(wanted);
      size_t filled = 0;
      while (filled < wanted) {
        ssize_t got = getrandom(random.data() + filled, wanted - filled, 0);
        if (got < 0) {
          if (errno == EINTR) continue;
          break;  // cannot happen after boot; hand back what we have
        }
        filled += static_cast<size_t>(got);
      }
      written = static_cast<uint32_t>(chain->scatter(*memory_, std::span(random.data(), filled)));
      state_.bytes_delivered += written;
    }
    // A malformed chain goes back empty.
    used |= queue.add_used(*memory_, chain->head(), written);
  }
  if (report_broken_queues(queues_, *interrupt_)) return;
  if (used && queue.needs_notification(*memory_)) interrupt_->used_buffers();
}

}  // namespace msb::vmm::virtio
