#include "vmm/virtio/block.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace msb::vmm::virtio {
namespace {

// struct virtio_blk_config (§5.2.4), as far as the offered features need it.
struct BlockConfig {
  uint64_t capacity;  // in 512-byte sectors
  uint32_t size_max;
  uint32_t seg_max;
  uint16_t cylinders;
  uint8_t heads;
  uint8_t sectors;
  uint32_t blk_size;
};
static_assert(sizeof(BlockConfig) == 24);

}  // namespace

VirtioBlock::VirtioBlock(std::unique_ptr<DiskOverlay> disk) : disk_(std::move(disk)) {
  BlockConfig config{};
  config.capacity = disk_->size() / kSectorSize;
  config.seg_max = kQueueSize - 2;
  config.blk_size = kSectorSize;
  config_.resize(sizeof config);
  std::memcpy(config_.data(), &config, sizeof config);
}

uint64_t VirtioBlock::device_features() const {
  return kBlockFeatureSegMax | kBlockFeatureBlkSize | kBlockFeatureFlush;
}

void VirtioBlock::read_config(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  if (offset >= config_.size()) return;
  const size_t length = std::min<size_t>(data.size(), config_.size() - offset);
  std::memcpy(data.data(), config_.data() + offset, length);
}

void VirtioBlock::activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t,
                           InterruptSink& interrupt) {
  memory_ = &memory;
  queues_ = queues;
  interrupt_ = &interrupt;
}

void VirtioBlock::reset() {
  memory_ = nullptr;
  queues_ = {};
  interrupt_ = nullptr;
}

void VirtioBlock::process_queue(size_t index) {
  if (memory_ == nullptr || index >= queues_.size()) return;
  Queue& queue = queues_[index];
  bool used = false;
  while (auto chain = queue.pop(*memory_)) {
    const uint32_t length = chain->ok() ? handle(*chain) : 0;
    used |= queue.add_used(*memory_, chain->head(), length);
  }
  if (report_broken_queues(queues_, *interrupt_)) return;
  if (used && queue.needs_notification(*memory_)) interrupt_->used_buffers();
}

uint32_t VirtioBlock::handle(const DescriptorChain& chain) {
  ++state_.requests;
  // The status byte is the last writable byte; without one there is no way to answer.
  const uint64_t writable = chain.writable_length();
  if (writable == 0) {
    ++state_.errors;
    return 0;
  }
  BlockRequestHeader header{};
  uint32_t written = 0;
  uint8_t status = kBlockStatusIoErr;
  if (chain.gather(*memory_, std::as_writable_bytes(std::span(&header, 1))) == sizeof header) {
    // For T_IN and GET_ID the data is the writable part but the status byte; for T_OUT the
    // readable part after the header.
    switch (header.type) {
      case kBlockTypeIn:
        status = transfer(chain, header, writable - 1, written);
        break;
      case kBlockTypeOut:
        status = transfer(chain, header, chain.readable_length() - sizeof header, written);
        break;
      case kBlockTypeFlush:
        try {
          disk_->flush();
          status = kBlockStatusOk;
        } catch (const DiskError& error) {
          std::fprintf(stderr, "virtio-blk: flush: %s\n", error.what());
        }
        break;
      case kBlockTypeGetId: {
        std::byte id[kBlockIdBytes] = {};
        std::memcpy(id, "msb", 3);
        written = static_cast<uint32_t>(chain.scatter(
            *memory_, std::span(id, std::min<uint64_t>(kBlockIdBytes, writable - 1))));
        status = kBlockStatusOk;
        break;
      }
      default:
        status = kBlockStatusUnsupported;
        break;
    }
  }
  if (status != kBlockStatusOk) ++state_.errors;
  const std::byte status_byte{status};
  chain.scatter(*memory_, std::span(&status_byte, 1), writable - 1);
  return written + 1;
}

uint8_t VirtioBlock::transfer(const DescriptorChain& chain, const BlockRequestHeader& header,
                              uint64_t data_length, uint32_t& written) {
  const uint64_t capacity = disk_->size() / kSectorSize;
  const uint64_t sectors = data_length / kSectorSize;
  if (data_length % kSectorSize != 0 || header.sector > capacity ||
      sectors > capacity - header.sector) {
    return kBlockStatusIoErr;
  }
  const bool is_read = header.type == kBlockTypeIn;
  // Walk the data descriptors: for a read the writable ones (but the status byte), for a write
  // the readable ones after the 16-byte header. Each lies in guest memory (Queue checked it), so
  // the disk is read into and written from guest memory directly.
  uint64_t skip = is_read ? 0 : sizeof(BlockRequestHeader);
  uint64_t remaining = data_length;
  uint64_t disk_offset = header.sector * kSectorSize;
  try {
    for (const Descriptor& descriptor : chain) {
      if (remaining == 0) break;
      if (descriptor.write_only != is_read) continue;
      uint64_t start = std::min<uint64_t>(skip, descriptor.len);
      skip -= start;
      const uint64_t length = std::min<uint64_t>(descriptor.len - start, remaining);
      if (length == 0) continue;
      // A read writes into guest memory: writable_slice marks those pages for dirty tracking.
      auto host = is_read ? memory_->writable_slice(descriptor.addr + start, length)
                          : memory_->slice(descriptor.addr + start, length);
      if (!host) return kBlockStatusIoErr;  // cannot happen: validated when popped
      if (is_read) {
        disk_->read(disk_offset, *host);
      } else {
        disk_->write(disk_offset, *host);
      }
      disk_offset += length;
      remaining -= length;
    }
  } catch (const DiskError& error) {
    std::fprintf(stderr, "virtio-blk: %s\n", error.what());
    return kBlockStatusIoErr;
  }
  if (is_read) written = static_cast<uint32_t>(data_length);
  return kBlockStatusOk;
}

}  // namespace msb::vmm::virtio
