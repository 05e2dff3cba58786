// virtio-blk (virtio 1.x §5.2) over a DiskOverlay.
//
// Features: FLUSH, SEG_MAX (queue size - 2, so a request's data descriptors plus header and
// status fit the ring), BLK_SIZE = 512. The logical block size stays 512 so that file systems
// made with 1 KiB blocks mount; the overlay's 4 KiB granularity is internal.
// Requests: T_IN, T_OUT, T_FLUSH and T_GET_ID (serial "msb"); any other type gets
// VIRTIO_BLK_S_UNSUPP. Each request is checked: a readable 16-byte header, a writable status
// byte at the end, data lengths in whole sectors, and the sector range inside the capacity
// (VIRTIO_BLK_S_IOERR otherwise). I/O is synchronous pread/pwrite on the loop thread, straight
// between the disk files and the guest's buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "vmm/disk_overlay.h"
#include "vmm/virtio/device.h"

namespace msb::vmm::virtio {

inline constexpr uint64_t kBlockFeatureSegMax = 1ull << 2;
inline constexpr uint64_t kBlockFeatureBlkSize = 1ull << 6;
inline constexpr uint64_t kBlockFeatureFlush = 1ull << 9;

inline constexpr uint32_t kBlockTypeIn = 0;
inline constexpr uint32_t kBlockTypeOut = 1;
inline constexpr uint32_t kBlockTypeFlush = 4;
inline constexpr uint32_t kBlockTypeGetId = 8;

inline constexpr uint8_t kBlockStatusOk = 0;
inline constexpr uint8_t kBlockStatusIoErr = 1;
inline constexpr uint8_t kBlockStatusUnsupported = 2;

inline constexpr uint64_t kSectorSize = 512;
inline constexpr size_t kBlockIdBytes = 20;

struct BlockRequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(BlockRequestHeader) == 16);

struct BlockState {
  uint64_t requests = 0;  // statistics only
  uint64_t errors = 0;
};

class VirtioBlock : public VirtioDevice {
 public:
  static constexpr uint16_t kQueueSize = 256;

  explicit VirtioBlock(std::unique_ptr<DiskOverlay> disk);

  uint32_t device_id() const override { return kDeviceIdBlock; }
  std::string name() const override { return "virtio-blk"; }
  uint64_t device_features() const override;
  std::vector<uint16_t> queue_max_sizes() const override { return {kQueueSize}; }
  void read_config(uint64_t offset, std::span<std::byte> data) override;
  void activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t acked_features,
                InterruptSink& interrupt) override;
  void process_queue(size_t index) override;
  void reset() override;

  DiskOverlay& disk() { return *disk_; }
  const BlockState& state() const { return state_; }
  void restore(const BlockState& state) { state_ = state; }

 private:
  // Handles one valid chain; returns the used length.
  uint32_t handle(const DescriptorChain& chain);
  uint8_t transfer(const DescriptorChain& chain, const BlockRequestHeader& header,
                   uint64_t data_length, uint32_t& written);

  std::unique_ptr<DiskOverlay> disk_;
  std::vector<std::byte> config_;
  BlockState state_;
  const GuestMemory* memory_ = nullptr;
  std::span<Queue> queues_;
  InterruptSink* interrupt_ = nullptr;
};

}  // namespace msb::vmm::virtio
