#include "vmm/devices/serial.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace msb::vmm {
namespace {

// Register offsets.
constexpr uint64_t kData = 0;  // RBR/THR, DLL with DLAB
constexpr uint64_t kIer = 1;   // DLM with DLAB
constexpr uint64_t kIir = 2;   // FCR on write
constexpr uint64_t kLcr = 3;
constexpr uint64_t kMcr = 4;
constexpr uint64_t kLsr = 5;
constexpr uint64_t kMsr = 6;
constexpr uint64_t kScr = 7;

constexpr uint8_t kIerReceivedData = 0x01;
constexpr uint8_t kIerThrEmpty = 0x02;
constexpr uint8_t kIerMask = 0x0f;

constexpr uint8_t kIirNoInterrupt = 0x01;
constexpr uint8_t kIirThrEmpty = 0x02;
constexpr uint8_t kIirReceivedData = 0x04;
constexpr uint8_t kIirFifoEnabled = 0xc0;

constexpr uint8_t kFcrFifoEnable = 0x01;
constexpr uint8_t kFcrClearReceive = 0x02;

constexpr uint8_t kLcrDlab = 0x80;

constexpr uint8_t kMcrDtr = 0x01;
constexpr uint8_t kMcrRts = 0x02;
constexpr uint8_t kMcrOut1 = 0x04;
constexpr uint8_t kMcrOut2 = 0x08;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kMcrMask = 0x1f;

constexpr uint8_t kLsrDataReady = 0x01;
constexpr uint8_t kLsrThrEmpty = 0x20;
constexpr uint8_t kLsrTransmitterEmpty = 0x40;

constexpr uint8_t kMsrCts = 0x10;
constexpr uint8_t kMsrDsr = 0x20;
constexpr uint8_t kMsrRi = 0x40;
constexpr uint8_t kMsrDcd = 0x80;

}  // namespace

Serial::Serial(int sink_fd, Interrupt& interrupt, uint64_t max_log_bytes)
    : sink_fd_(sink_fd), interrupt_(interrupt), max_log_bytes_(max_log_bytes) {}

void Serial::read(uint64_t offset, std::span<std::byte> data) {
  std::lock_guard lock(mutex_);
  // The UART's registers are bytes: a wider access reads the first and zeros.
  std::memset(data.data(), 0, data.size());
  if (data.empty() || offset >= kSerialPorts) return;
  data[0] = std::byte{read_register(offset)};
}

void Serial::write(uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lock(mutex_);
  if (data.empty() || offset >= kSerialPorts) return;
  const uint8_t before = interrupt_identification();
  write_register(offset, std::to_integer<uint8_t>(data[0]));
  raise_if_new(before);
}

bool Serial::loopback() const {
  return (state_.mcr & kMcrLoop) != 0;
}

uint8_t Serial::interrupt_identification() const {
  // Priority: received data above THR empty (the line-status and modem-status sources never fire
  // here).
  if ((state_.ier & kIerReceivedData) && !state_.receive.empty()) return kIirReceivedData;
  if ((state_.ier & kIerThrEmpty) && state_.thr_empty_pending) return kIirThrEmpty;
  return kIirNoInterrupt;
}

void Serial::raise_if_new(uint8_t before) {
  // An edge per interrupt that becomes pending, as Firecracker's serial does: the line is an
  // edge-triggered IOAPIC pin, and the driver identifies (and so clears) each one through IIR.
  if (before == kIirNoInterrupt && interrupt_identification() != kIirNoInterrupt) {
    interrupt_.trigger();
  }
}

uint8_t Serial::read_register(uint64_t offset) {
  const bool dlab = (state_.lcr & kLcrDlab) != 0;
  switch (offset) {
    case kData: {
      if (dlab) return state_.divisor_low;
      if (state_.receive.empty()) return 0;
      uint8_t byte = state_.receive.front();
      state_.receive.pop_front();
      return byte;
    }
    case kIer:
      return dlab ? state_.divisor_high : state_.ier;
    case kIir: {
      uint8_t identification = interrupt_identification();
      // Identifying the THR-empty interrupt acknowledges it (8250 datasheet; Linux relies on it).
      if (identification == kIirThrEmpty) state_.thr_empty_pending = false;
      return identification | ((state_.fcr & kFcrFifoEnable) ? kIirFifoEnabled : 0);
    }
    case kLcr:
      return state_.lcr;
    case kMcr:
      return state_.mcr;
    case kLsr:
      return kLsrThrEmpty | kLsrTransmitterEmpty | (state_.receive.empty() ? 0 : kLsrDataReady);
    case kMsr:
      if (loopback()) {
        // The outputs wired back to the inputs: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
        return ((state_.mcr & kMcrDtr) ? kMsrDsr : 0) | ((state_.mcr & kMcrRts) ? kMsrCts : 0) |
               ((state_.mcr & kMcrOut1) ? kMsrRi : 0) | ((state_.mcr & kMcrOut2) ? kMsrDcd : 0);
      }
      // A modem that is always there and ready.
      return kMsrDcd | kMsrDsr | kMsrCts;
    case kScr:
      return state_.scr;
  }
  return 0;
}

void Serial::write_register(uint64_t offset, uint8_t value) {
  const bool dlab = (state_.lcr & kLcrDlab) != 0;
  switch (offset) {
    case kData:
      if (dlab) {
        state_.divisor_low = value;
        return;
      }
      if (loopback()) {
        enqueue(value);
      } else {
        transmit(value);
      }
      // The byte left at once: the holding register is empty again.
      state_.thr_empty_pending = true;
      return;
    case kIer: {
      if (dlab) {
        state_.divisor_high = value;
        return;
      }
      const bool was_enabled = (state_.ier & kIerThrEmpty) != 0;
      state_.ier = value & kIerMask;
      // Enabling the THR-empty interrupt while the register is empty raises it at once: Linux's
      // driver starts a transmission this way.
      if (!was_enabled && (state_.ier & kIerThrEmpty)) state_.thr_empty_pending = true;
      return;
    }
    case kIir:  // FCR
      state_.fcr = value & kFcrFifoEnable;
      if (value & kFcrClearReceive) state_.receive.clear();
      return;
    case kLcr:
      state_.lcr = value;
      return;
    case kMcr:
      state_.mcr = value & kMcrMask;
      return;
    case kScr:
      state_.scr = value;
      return;
  }
  // LSR and MSR are read-only.
}

void Serial::transmit(uint8_t byte) {
  if (sink_fd_ < 0 || !sink_error_.empty()) return;
  if (++logged_bytes_ > max_log_bytes_) {
    static constexpr char kFull[] =
        "\nmsb: the console log reached its size limit; "
        "later guest output is dropped\n";
    (void)!::write(sink_fd_, kFull, sizeof kFull - 1);
    sink_error_ = "serial: the console log reached its size limit";
    return;
  }
  for (;;) {
    ssize_t written = ::write(sink_fd_, &byte, 1);
    if (written == 1) return;
    if (written < 0 && errno == EINTR) continue;
    // The log is best effort: a full disk or a closed pipe must not stop the guest.
    sink_error_ = std::string("serial: writing the console log: ") +
                  (written < 0 ? std::strerror(errno) : "nothing written");
    return;
  }
}

void Serial::enqueue(uint8_t byte) {
  if (state_.receive.size() < kReceiveCapacity) state_.receive.push_back(byte);
}

void Serial::receive(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  const uint8_t before = interrupt_identification();
  for (uint8_t byte : bytes)
    enqueue(byte);
  raise_if_new(before);
}

SerialState Serial::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void Serial::restore(const SerialState& state) {
  std::lock_guard lock(mutex_);
  state_ = state;
  while (state_.receive.size() > kReceiveCapacity)
    state_.receive.pop_back();
}

std::string Serial::sink_error() const {
  std::lock_guard lock(mutex_);
  return sink_error_;
}

}  // namespace msb::vmm
