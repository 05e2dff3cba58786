#include "vmm/virtio/mmio.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <system_error>

namespace msb::vmm::virtio {
namespace {

// Register offsets (§4.2.2).
constexpr uint64_t kMagicValue = 0x000;
constexpr uint64_t kVersion = 0x004;
constexpr uint64_t kDeviceId = 0x008;
constexpr uint64_t kVendorId = 0x00c;
constexpr uint64_t kDeviceFeatures = 0x010;
constexpr uint64_t kDeviceFeaturesSel = 0x014;
constexpr uint64_t kDriverFeatures = 0x020;
constexpr uint64_t kDriverFeaturesSel = 0x024;
constexpr uint64_t kQueueSel = 0x030;
constexpr uint64_t kQueueNumMax = 0x034;
constexpr uint64_t kQueueNum = 0x038;
constexpr uint64_t kQueueReady = 0x044;
constexpr uint64_t kQueueNotify = 0x050;
constexpr uint64_t kInterruptStatus = 0x060;
constexpr uint64_t kInterruptAck = 0x064;
constexpr uint64_t kStatus = 0x070;
constexpr uint64_t kQueueDescLow = 0x080;
constexpr uint64_t kQueueDescHigh = 0x084;
constexpr uint64_t kQueueDriverLow = 0x090;
constexpr uint64_t kQueueDriverHigh = 0x094;
constexpr uint64_t kQueueDeviceLow = 0x0a0;
constexpr uint64_t kQueueDeviceHigh = 0x0a4;
constexpr uint64_t kConfigGeneration = 0x0fc;
constexpr uint64_t kConfig = 0x100;

constexpr uint64_t kTransportFeatures =
    kFeatureVersion1 | kFeatureRingEventIdx | kFeatureRingIndirectDesc;

}  // namespace

VirtioMmioTransport::VirtioMmioTransport(std::unique_ptr<VirtioDevice> device,
                                         const GuestMemory& memory, EventLoop& loop,
                                         Interrupt& interrupt)
    : device_(std::move(device)),
      memory_(memory),
      loop_(loop),
      interrupt_(interrupt),
      offered_features_(device_->device_features() | kTransportFeatures) {
  for (uint16_t max_size : device_->queue_max_sizes())
    queues_.emplace_back(max_size);
  for (size_t index = 0; index < queues_.size(); ++index) {
    snapstore::UniqueFd fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!fd) {
      throw std::system_error(
          errno, std::generic_category(),
          device_->name() + ": notify eventfd of queue " + std::to_string(index));
    }
    notify_fds_.push_back(std::move(fd));
  }
  for (size_t index = 0; index < queues_.size(); ++index) {
    loop_.add(notify_fds_[index].get(), EPOLLIN, [this, index](uint32_t) { notified(index); });
  }
}

VirtioMmioTransport::~VirtioMmioTransport() {
  for (const auto& fd : notify_fds_)
    loop_.remove(fd.get());
  std::lock_guard lock(mutex_);
  if (state_.activated) device_->reset();
}

std::vector<NotifyEventFd> VirtioMmioTransport::notify_eventfds() const {
  std::vector<NotifyEventFd> result;
  for (size_t index = 0; index < notify_fds_.size(); ++index) {
    result.push_back({notify_fds_[index].get(), kNotifyOffset, static_cast<uint32_t>(index)});
  }
  return result;
}

void VirtioMmioTransport::read(uint64_t offset, std::span<std::byte> data) {
  std::memset(data.data(), 0, data.size());
  std::lock_guard lock(mutex_);
  if (offset >= kConfig) {
    device_->read_config(offset - kConfig, data);
    return;
  }
  // Registers take aligned 32-bit accesses only (§4.2.2.2); anything else reads as zero.
  if (data.size() != 4 || offset % 4 != 0) return;
  uint32_t value = read_register(offset);
  std::memcpy(data.data(), &value, 4);
}

void VirtioMmioTransport::write(uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lock(mutex_);
  if (offset >= kConfig) {
    device_->write_config(offset - kConfig, data);
    return;
  }
  if (data.size() != 4 || offset % 4 != 0) return;
  uint32_t value;
  std::memcpy(&value, data.data(), 4);
  write_register(offset, value);
}

Queue* VirtioMmioTransport::selected_queue() {
  if (state_.queue_select >= queues_.size()) return nullptr;
  return &queues_[state_.queue_select];
}

uint32_t VirtioMmioTransport::read_register(uint64_t offset) {
  switch (offset) {
    case kMagicValue:
      return kMmioMagic;
    case kVersion:
      return kMmioVersion;
    case kDeviceId:
      return device_->device_id();
    case kVendorId:
      return kMmioVendorId;
    case kDeviceFeatures:
      if (state_.device_features_select > 1) return 0;
      return static_cast<uint32_t>(offered_features_ >> (32 * state_.device_features_select));
    case kQueueNumMax: {
      Queue* queue = selected_queue();
      return queue ? queue->max_size() : 0;
    }
    case kQueueReady: {
      Queue* queue = selected_queue();
      return queue && queue->ready() ? 1 : 0;
    }
    case kInterruptStatus:
      return interrupt_status_.load();
    case kStatus:
      return state_.status | (device_needs_reset_.load() ? kStatusDeviceNeedsReset : 0);
    case kConfigGeneration:
      return config_generation_.load();
  }
  return 0;
}

void VirtioMmioTransport::write_register(uint64_t offset, uint32_t value) {
  // Queue configuration is frozen from DRIVER_OK until reset: the device then uses the queues
  // on the loop thread, partly outside this lock (virtio-console's backend handler).
  Queue* queue = state_.activated ? nullptr : selected_queue();
  switch (offset) {
    case kDeviceFeaturesSel:
      state_.device_features_select = value;
      return;
    case kDriverFeatures:
      // Features are fixed once FEATURES_OK is accepted.
      if ((state_.status & kStatusFeaturesOk) || state_.driver_features_select > 1) return;
      if (state_.driver_features_select == 0) {
        state_.driver_features = (state_.driver_features & ~0xffffffffull) | value;
      } else {
        state_.driver_features =
            (state_.driver_features & 0xffffffffull) | (static_cast<uint64_t>(value) << 32);
      }
      return;
    case kDriverFeaturesSel:
      state_.driver_features_select = value;
      return;
    case kQueueSel:
      state_.queue_select = value;
      return;
    case kQueueNum:
      if (queue && value <= kMaxQueueSize) queue->set_size(static_cast<uint16_t>(value));
      return;
    case kQueueReady:
      if (queue) queue->set_ready(memory_, value == 1);
      return;
    case kQueueNotify:
      // No ioeventfd caught this write: pass it on the same way.
      if (value < notify_fds_.size()) {
        uint64_t one = 1;
        while (::write(notify_fds_[value].get(), &one, sizeof one) < 0 && errno == EINTR) {
        }
      }
      return;
    case kInterruptAck:
      interrupt_status_.fetch_and(~value);
      return;
    case kStatus:
      write_status(value);
      return;
    case kQueueDescLow:
      if (queue) queue->set_desc_table_low(value);
      return;
    case kQueueDescHigh:
      if (queue) queue->set_desc_table_high(value);
      return;
    case kQueueDriverLow:
      if (queue) queue->set_avail_ring_low(value);
      return;
    case kQueueDriverHigh:
      if (queue) queue->set_avail_ring_high(value);
      return;
    case kQueueDeviceLow:
      if (queue) queue->set_used_ring_low(value);
      return;
    case kQueueDeviceHigh:
      if (queue) queue->set_used_ring_high(value);
      return;
  }
  // Read-only and unknown registers ignore writes.
}

void VirtioMmioTransport::write_status(uint32_t value) {
  if (value == 0) {
    reset_locked();
    return;
  }
  // DEVICE_NEEDS_RESET is the device's to set; the driver only adds bits (§2.1.2).
  value &= ~kStatusDeviceNeedsReset;
  value |= state_.status;
  if ((value & kStatusFeaturesOk) && !(state_.status & kStatusFeaturesOk)) {
    // Refuse features the device did not offer, and legacy drivers (§6.1: VERSION_1 required).
    const uint64_t features = state_.driver_features;
    if ((features & ~offered_features_) != 0 || !(features & kFeatureVersion1)) {
      value &= ~kStatusFeaturesOk;
    } else {
      for (Queue& queue : queues_)
        queue.set_event_idx(features & kFeatureRingEventIdx);
    }
  }
  if ((value & kStatusDriverOk) && !(value & kStatusFeaturesOk)) value &= ~kStatusDriverOk;
  state_.status = value;
  if ((value & kStatusDriverOk) && !state_.activated && !device_needs_reset_.load()) {
    state_.activated = true;
    try {
      device_->activate(memory_, queues_, state_.driver_features, *this);
    } catch (const std::exception& error) {
      std::fprintf(stderr, "%s: activation failed: %s\n", device_->name().c_str(), error.what());
      needs_reset();
    }
    // Buffers made available before DRIVER_OK are the device's now.
    for (const auto& fd : notify_fds_) {
      uint64_t one = 1;
      while (::write(fd.get(), &one, sizeof one) < 0 && errno == EINTR) {
      }
    }
  }
}

void VirtioMmioTransport::reset_locked() {
  if (state_.activated) device_->reset();
  for (Queue& queue : queues_)
    queue.reset();
  state_ = MmioState{};
  interrupt_status_.store(0);
  device_needs_reset_.store(false);
}

void VirtioMmioTransport::notified(size_t index) {
  uint64_t count;
  while (::read(notify_fds_[index].get(), &count, sizeof count) < 0 && errno == EINTR) {
  }
  std::lock_guard lock(mutex_);
  if (!state_.activated || device_needs_reset_.load()) return;
  try {
    device_->process_queue(index);
  } catch (const std::exception& error) {
    // A device failure stops that device, never the VMM.
    std::fprintf(stderr, "%s: queue %zu: %s\n", device_->name().c_str(), index, error.what());
    needs_reset();
  }
}

void VirtioMmioTransport::used_buffers() {
  interrupt_status_.fetch_or(kInterruptUsedBuffer);
  interrupt_.trigger();
}

void VirtioMmioTransport::config_changed() {
  config_generation_.fetch_add(1);
  interrupt_status_.fetch_or(kInterruptConfigChange);
  interrupt_.trigger();
}

void VirtioMmioTransport::needs_reset() {
  if (device_needs_reset_.exchange(true)) return;
  interrupt_status_.fetch_or(kInterruptConfigChange);
  interrupt_.trigger();
}

std::vector<QueueState> VirtioMmioTransport::save_queues() const {
  std::lock_guard lock(mutex_);
  std::vector<QueueState> result;
  for (const Queue& queue : queues_)
    result.push_back(queue.save());
  return result;
}

void VirtioMmioTransport::restore(const MmioState& state, const std::vector<QueueState>& queues,
                                  uint32_t interrupt_status, uint32_t config_generation) {
  const std::string name = device_->name();
  auto invalid = [](const std::string& what) { return std::invalid_argument(what); };
  constexpr uint32_t kKnownStatus =
      kStatusAcknowledge | kStatusDriver | kStatusDriverOk | kStatusFeaturesOk | kStatusFailed;
  if ((state.status & ~kKnownStatus) != 0) {
    throw invalid("device status " + std::to_string(state.status) + " has unknown bits");
  }
  if ((state.driver_features & ~offered_features_) != 0) {
    throw invalid("driver features " + hex_address(state.driver_features) +
                  " include ones the device does not offer");
  }
  if ((state.status & kStatusFeaturesOk) && !(state.driver_features & kFeatureVersion1)) {
    throw invalid("FEATURES_OK without VERSION_1");
  }
  // write_status activates exactly when DRIVER_OK is accepted (which needs FEATURES_OK), unless
  // the device already needed a reset; any other combination is not a state this transport has.
  const bool driver_ok = state.status & kStatusDriverOk;
  if (driver_ok && !(state.status & kStatusFeaturesOk))
    throw invalid("DRIVER_OK without FEATURES_OK");
  if (state.activated != driver_ok && !(state.needs_reset && driver_ok)) {
    throw invalid(state.activated ? "activated without DRIVER_OK" : "DRIVER_OK but not activated");
  }
  if ((interrupt_status & ~(kInterruptUsedBuffer | kInterruptConfigChange)) != 0) {
    throw invalid("interrupt status " + std::to_string(interrupt_status) + " has unknown bits");
  }
  if (queues.size() != queues_.size()) {
    throw invalid(std::to_string(queues.size()) + " queues saved, the device has " +
                  std::to_string(queues_.size()));
  }

  std::lock_guard lock(mutex_);
  // Queue::restore validates each state against guest memory (sizes, alignment, rings inside
  // RAM); restore them into copies first so that a bad one leaves the transport as it was.
  std::vector<Queue> restored = queues_;
  for (size_t index = 0; index < queues.size(); ++index) {
    try {
      restored[index].restore(queues[index], memory_);
    } catch (const std::invalid_argument& e) {
      throw invalid("queue " + std::to_string(index) + ": " + e.what());
    }
  }
  reset_locked();
  // Element by element: the vector's storage stays where devices' spans point.
  for (size_t index = 0; index < queues_.size(); ++index)
    queues_[index] = restored[index];
  state_ = state;
  state_.needs_reset = false;
  interrupt_status_.store(interrupt_status);
  config_generation_.store(config_generation);
  device_needs_reset_.store(state.needs_reset);
  if (state_.activated && !state.needs_reset) {
    try {
      device_->activate(memory_, queues_, state_.driver_features, *this);
    } catch (const std::exception& error) {
      std::fprintf(stderr, "%s: activation failed: %s\n", name.c_str(), error.what());
      needs_reset();
    }
  }
}

void VirtioMmioTransport::resume_after_restore() {
  std::lock_guard lock(mutex_);
  if (state_.activated) {
    for (const auto& fd : notify_fds_) {
      uint64_t one = 1;
      while (::write(fd.get(), &one, sizeof one) < 0 && errno == EINTR) {
      }
    }
  }
  if (interrupt_status_.load() != 0) interrupt_.trigger();
}

MmioState VirtioMmioTransport::save() const {
  std::lock_guard lock(mutex_);
  MmioState state = state_;
  state.needs_reset = device_needs_reset_.load();
  return state;
}

}  // namespace msb::vmm::virtio
