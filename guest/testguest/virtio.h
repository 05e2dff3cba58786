// A minimal virtio-mmio (version 2, "modern") driver with split virtqueues, run by the agent at
// CPL3. It polls: the caller waits for any interrupt, acks the devices, then checks used rings.
#pragma once

#include <stdint.h>

namespace testguest {

inline constexpr uint16_t kQueueMax = 128;

struct VirtqDesc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
inline constexpr uint16_t kDescNext = 1;
inline constexpr uint16_t kDescWrite = 2;
inline constexpr uint16_t kAvailNoInterrupt = 1;  // VIRTQ_AVAIL_F_NO_INTERRUPT

struct VirtqUsedElem {
  uint32_t id;
  uint32_t len;
};

// The rings' memory, sized for kQueueMax.
struct alignas(4096) VirtqMemory {
  VirtqDesc desc[kQueueMax];
  struct {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[kQueueMax];
    uint16_t used_event;
  } avail;
  alignas(4) struct {
    uint16_t flags;
    uint16_t idx;
    VirtqUsedElem ring[kQueueMax];
    uint16_t avail_event;
  } used;
};

struct Virtq {
  uint64_t regs;  // the device's register base
  uint32_t index;
  uint16_t size;
  uint16_t free_head;
  uint16_t num_free;
  uint16_t last_used;
  uint16_t avail_idx;
  VirtqMemory* mem;
  uint64_t cookie[kQueueMax];  // per chain head
};

struct VirtioDevice {
  uint64_t regs;
  uint32_t gsi;
  uint32_t device_id;
  uint64_t features;  // negotiated
};

struct VirtqBuffer {
  const void* addr;
  uint32_t len;
  bool device_writes;
};

// Resets and negotiates VERSION_1 plus `wanted` of the offered features. Returns false (after
// printing why on COM1) when the device cannot be driven.
bool virtio_init(VirtioDevice& device, uint64_t wanted);
// Sets up queue `index` with at most kQueueMax entries.
bool virtio_queue_init(VirtioDevice& device, Virtq& queue, uint32_t index, VirtqMemory* memory);
void virtio_driver_ok(VirtioDevice& device);
// Reads and acks InterruptStatus; returns what it acked (bit 0: used buffers, bit 1: a
// configuration change).
uint32_t virtio_ack(const VirtioDevice& device);
inline constexpr uint32_t kInterruptConfig = 2;
uint32_t virtio_config32(const VirtioDevice& device, uint32_t offset);
void virtio_write_config32(const VirtioDevice& device, uint32_t offset, uint32_t value);

// Adds a chain (false when there are not enough free descriptors) and notifies the device.
bool virtq_add(Virtq& queue, const VirtqBuffer* buffers, uint16_t count, uint64_t cookie);
// Takes one used chain: true and its cookie and written length, or false when none is used.
bool virtq_take_used(Virtq& queue, uint64_t* cookie, uint32_t* len);

}  // namespace testguest
