#include "vmm/devices/i8042.h"

#include <cstring>

namespace msb::vmm {
namespace {

constexpr uint64_t kDataPort = 0;
constexpr uint64_t kCommandPort = 4;

constexpr uint8_t kStatusOutputFull = 0x01;
constexpr uint8_t kStatusCommand = 0x08;  // the last write was to the command port

constexpr uint8_t kCommandReadControl = 0x20;
constexpr uint8_t kCommandWriteControl = 0x60;
constexpr uint8_t kCommandDisableAux = 0xa7;
constexpr uint8_t kCommandEnableAux = 0xa8;
constexpr uint8_t kCommandTestAux = 0xa9;
constexpr uint8_t kCommandSelfTest = 0xaa;
constexpr uint8_t kCommandTestKeyboard = 0xab;
constexpr uint8_t kCommandDisableKeyboard = 0xad;
constexpr uint8_t kCommandEnableKeyboard = 0xae;
constexpr uint8_t kCommandReadOutputPort = 0xd0;
constexpr uint8_t kCommandWriteOutputPort = 0xd1;
constexpr uint8_t kCommandPulseReset = 0xfe;

constexpr uint8_t kSelfTestPassed = 0x55;
constexpr uint8_t kInterfaceTestPassed = 0x00;
constexpr size_t kOutputCapacity = 16;

}  // namespace

I8042::I8042(std::function<void()> on_reset) : on_reset_(std::move(on_reset)) {}

void I8042::push_output(uint8_t byte) {
  if (state_.output.size() < kOutputCapacity) state_.output.push_back(byte);
  state_.status |= kStatusOutputFull;
}

void I8042::read(uint64_t offset, std::span<std::byte> data) {
  std::lock_guard lock(mutex_);
  std::memset(data.data(), 0, data.size());
  if (data.empty()) return;
  if (offset == kDataPort) {
    if (!state_.output.empty()) {
      data[0] = std::byte{state_.output.front()};
      state_.output.pop_front();
    }
    if (state_.output.empty()) state_.status &= ~kStatusOutputFull;
  } else if (offset == kCommandPort) {
    data[0] = std::byte{state_.status};
  }
}

void I8042::write(uint64_t offset, std::span<const std::byte> data) {
  if (data.empty()) return;
  const auto value = std::to_integer<uint8_t>(data[0]);
  if (offset == kCommandPort && value == kCommandPulseReset) {
    // Outside the lock: the callback may stop the machine, which may touch devices.
    if (on_reset_) on_reset_();
    return;
  }
  std::lock_guard lock(mutex_);
  if (offset == kCommandPort) {
    command(value);
  } else if (offset == kDataPort) {
    this->data(value);
  }
}

void I8042::command(uint8_t value) {
  state_.status |= kStatusCommand;
  state_.pending_command = 0;
  switch (value) {
    case kCommandReadControl:
      push_output(state_.control);
      break;
    case kCommandWriteControl:
    case kCommandWriteOutputPort:
      state_.pending_command = value;
      break;
    case kCommandReadOutputPort:
      push_output(state_.output_port);
      break;
    case kCommandSelfTest:
      push_output(kSelfTestPassed);
      break;
    case kCommandTestKeyboard:
      push_output(kInterfaceTestPassed);
      break;
    case kCommandDisableKeyboard:
    case kCommandEnableKeyboard:
    case kCommandDisableAux:
    case kCommandEnableAux:
      break;
    case kCommandTestAux:
      // No aux port: answer "clock line stuck low" so that Linux gives up on a mouse quickly.
      push_output(0x01);
      break;
    default:
      break;  // unknown commands are ignored
  }
}

void I8042::data(uint8_t value) {
  state_.status &= ~kStatusCommand;
  switch (state_.pending_command) {
    case kCommandWriteControl:
      state_.control = value;
      break;
    case kCommandWriteOutputPort:
      state_.output_port = value;
      break;
    default:
      // A byte for the keyboard, which is absent: no answer, so the driver times out and finds
      // no keyboard.
      break;
  }
  state_.pending_command = 0;
}

I8042State I8042::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void I8042::restore(const I8042State& state) {
  std::lock_guard lock(mutex_);
  state_ = state;
  // A saved state is untrusted input: keep the output buffer's bound.
  while (state_.output.size() > kOutputCapacity)
    state_.output.pop_back();
}

}  // namespace msb::vmm
