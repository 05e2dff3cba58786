#include "virtio.h"

#include "common.h"

namespace testguest {

namespace {

constexpr uint32_t kMagic = 0x000;
constexpr uint32_t kVersion = 0x004;
constexpr uint32_t kDeviceFeatures = 0x010;
constexpr uint32_t kDeviceFeaturesSel = 0x014;
constexpr uint32_t kDriverFeatures = 0x020;
constexpr uint32_t kDriverFeaturesSel = 0x024;
constexpr uint32_t kQueueSel = 0x030;
constexpr uint32_t kQueueNumMax = 0x034;
constexpr uint32_t kQueueNum = 0x038;
constexpr uint32_t kQueueReady = 0x044;
constexpr uint32_t kQueueNotify = 0x050;
constexpr uint32_t kInterruptStatus = 0x060;
constexpr uint32_t kInterruptAck = 0x064;
constexpr uint32_t kStatus = 0x070;
constexpr uint32_t kQueueDescLow = 0x080;
constexpr uint32_t kQueueDescHigh = 0x084;
constexpr uint32_t kQueueDriverLow = 0x090;
constexpr uint32_t kQueueDriverHigh = 0x094;
constexpr uint32_t kQueueDeviceLow = 0x0a0;
constexpr uint32_t kQueueDeviceHigh = 0x0a4;
constexpr uint32_t kConfig = 0x100;

constexpr uint32_t kStatusAcknowledge = 1;
constexpr uint32_t kStatusDriver = 2;
constexpr uint32_t kStatusDriverOk = 4;
constexpr uint32_t kStatusFeaturesOk = 8;
constexpr uint32_t kStatusFailed = 128;
constexpr uint64_t kFeatureVersion1 = 1ull << 32;

uint32_t reg_read(const VirtioDevice& d, uint32_t reg) {
  return mmio_read32(d.regs + reg);
}
void reg_write(const VirtioDevice& d, uint32_t reg, uint32_t value) {
  mmio_write32(d.regs + reg, value);
}

void fail(VirtioDevice& device, const char* why) {
  serial_print("testguest: error: virtio device at ");
  serial_print_hex(device.regs);
  serial_print(": ");
  serial_print(why);
  serial_print("\n");
  reg_write(device, kStatus, kStatusFailed);
}

}  // namespace

bool virtio_init(VirtioDevice& device, uint64_t wanted) {
  if (reg_read(device, kMagic) != 0x74726976) {
    fail(device, "bad magic");
    return false;
  }
  if (reg_read(device, kVersion) != 2) {
    fail(device,
         "not a version 2 (modern) transport (QEMU: -global virtio-mmio.force-legacy=false)");
    return false;
  }
  reg_write(device, kStatus, 0);
  reg_write(device, kStatus, kStatusAcknowledge);
  reg_write(device, kStatus, kStatusAcknowledge | kStatusDriver);
  reg_write(device, kDeviceFeaturesSel, 0);
  uint64_t offered = reg_read(device, kDeviceFeatures);
  reg_write(device, kDeviceFeaturesSel, 1);
  offered |= static_cast<uint64_t>(reg_read(device, kDeviceFeatures)) << 32;
  if (!(offered & kFeatureVersion1)) {
    fail(device, "VERSION_1 not offered");
    return false;
  }
  device.features = (offered & wanted) | kFeatureVersion1;
  reg_write(device, kDriverFeaturesSel, 0);
  reg_write(device, kDriverFeatures, static_cast<uint32_t>(device.features));
  reg_write(device, kDriverFeaturesSel, 1);
  reg_write(device, kDriverFeatures, static_cast<uint32_t>(device.features >> 32));
  reg_write(device, kStatus, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
  if (!(reg_read(device, kStatus) & kStatusFeaturesOk)) {
    fail(device, "features not accepted");
    return false;
  }
  return true;
}

bool virtio_queue_init(VirtioDevice& device, Virtq& queue, uint32_t index, VirtqMemory* memory) {
  reg_write(device, kQueueSel, index);
  uint32_t max = reg_read(device, kQueueNumMax);
  if (max == 0) {
    fail(device, "queue not available");
    return false;
  }
  uint16_t size = kQueueMax;
  while (size > max)
    size /= 2;
  memset(memory, 0, sizeof(*memory));
  queue.regs = device.regs;
  queue.index = index;
  queue.size = size;
  queue.mem = memory;
  queue.free_head = 0;
  queue.num_free = size;
  queue.last_used = 0;
  queue.avail_idx = 0;
  for (uint16_t i = 0; i < size; ++i)
    memory->desc[i].next = static_cast<uint16_t>(i + 1);
  uint64_t desc = reinterpret_cast<uint64_t>(&memory->desc);
  uint64_t avail = reinterpret_cast<uint64_t>(&memory->avail);
  uint64_t used = reinterpret_cast<uint64_t>(&memory->used);
  reg_write(device, kQueueNum, size);
  reg_write(device, kQueueDescLow, static_cast<uint32_t>(desc));
  reg_write(device, kQueueDescHigh, static_cast<uint32_t>(desc >> 32));
  reg_write(device, kQueueDriverLow, static_cast<uint32_t>(avail));
  reg_write(device, kQueueDriverHigh, static_cast<uint32_t>(avail >> 32));
  reg_write(device, kQueueDeviceLow, static_cast<uint32_t>(used));
  reg_write(device, kQueueDeviceHigh, static_cast<uint32_t>(used >> 32));
  reg_write(device, kQueueReady, 1);
  return true;
}

void virtio_driver_ok(VirtioDevice& device) {
  reg_write(device, kStatus,
            kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk);
}

uint32_t virtio_ack(const VirtioDevice& device) {
  uint32_t status = reg_read(device, kInterruptStatus);
  if (status != 0) reg_write(device, kInterruptAck, status);
  return status;
}

uint32_t virtio_config32(const VirtioDevice& device, uint32_t offset) {
  return reg_read(device, kConfig + offset);
}

void virtio_write_config32(const VirtioDevice& device, uint32_t offset, uint32_t value) {
  reg_write(device, kConfig + offset, value);
}

bool virtq_add(Virtq& queue, const VirtqBuffer* buffers, uint16_t count, uint64_t cookie) {
  if (count == 0 || count > queue.num_free) return false;
  VirtqMemory* mem = queue.mem;
  uint16_t head = queue.free_head;
  uint16_t index = head;
  uint16_t last = head;
  for (uint16_t i = 0; i < count; ++i) {
    VirtqDesc& desc = mem->desc[index];
    desc.addr = reinterpret_cast<uint64_t>(buffers[i].addr);
    desc.len = buffers[i].len;
    desc.flags = static_cast<uint16_t>((buffers[i].device_writes ? kDescWrite : 0) |
                                       (i + 1 < count ? kDescNext : 0));
    last = index;
    index = desc.next;
  }
  queue.free_head = mem->desc[last].next;
  queue.num_free = static_cast<uint16_t>(queue.num_free - count);
  queue.cookie[head] = cookie;
  mem->avail.ring[queue.avail_idx % queue.size] = head;
  compiler_barrier();
  queue.avail_idx = static_cast<uint16_t>(queue.avail_idx + 1);
  *reinterpret_cast<volatile uint16_t*>(&mem->avail.idx) = queue.avail_idx;
  full_barrier();
  mmio_write32(queue.regs + kQueueNotify, queue.index);
  return true;
}

bool virtq_take_used(Virtq& queue, uint64_t* cookie, uint32_t* len) {
  VirtqMemory* mem = queue.mem;
  uint16_t used_idx = *reinterpret_cast<volatile uint16_t*>(&mem->used.idx);
  if (used_idx == queue.last_used) return false;
  compiler_barrier();
  VirtqUsedElem elem = mem->used.ring[queue.last_used % queue.size];
  queue.last_used = static_cast<uint16_t>(queue.last_used + 1);
  uint16_t head = static_cast<uint16_t>(elem.id);
  if (head >= queue.size) {
    serial_print("testguest: error: virtqueue used id out of range\n");
    return false;
  }
  *cookie = queue.cookie[head];
  *len = elem.len;
  // Return the chain to the free list.
  uint16_t index = head;
  uint16_t count = 1;
  while ((mem->desc[index].flags & kDescNext) && count < queue.size) {
    index = mem->desc[index].next;
    ++count;
  }
  mem->desc[index].next = queue.free_head;
  queue.free_head = head;
  queue.num_free = static_cast<uint16_t>(queue.num_free + count);
  return true;
}

}  // namespace testguest
