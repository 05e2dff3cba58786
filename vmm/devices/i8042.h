// The i8042 keyboard controller, only as far as a guest needs it: Linux probes it at boot and
// resets the machine through it (command 0xFE, "pulse reset line"), which msb treats as the
// guest powering off. There is no keyboard or mouse behind it.
//
// Ports (offsets from 0x60, the device claims 0x60..0x64): 0 data, 4 status (read) / command
// (write). Like Firecracker's i8042, the controller answers the commands Linux's probe sends
// (read/write the control byte and the output port, self tests) so the probe finishes at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>

#include "vmm/io_bus.h"

namespace msb::vmm {

inline constexpr uint64_t kI8042Base = 0x60;
inline constexpr uint64_t kI8042Ports = 5;  // 0x60 to 0x64; 0x61-0x63 read as zero

struct I8042State {
  uint8_t status = 0x10;        // keyboard enabled (not inhibited)
  uint8_t control = 0x05;       // keyboard interrupt on, self test passed
  uint8_t output_port = 0x01;   // the reset line not asserted
  uint8_t pending_command = 0;  // a command that waits for its data byte (0x60, 0xd1), or 0
  std::deque<uint8_t> output;   // bytes for the data port
};

class I8042 : public BusDevice {
 public:
  // `on_reset` runs (on the vCPU thread, without the device's lock) when the guest pulses the
  // reset line.
  explicit I8042(std::function<void()> on_reset);

  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  I8042State save() const;
  void restore(const I8042State& state);

 private:
  void command(uint8_t value);
  void data(uint8_t value);
  void push_output(uint8_t byte);

  mutable std::mutex mutex_;
  I8042State state_;
  std::function<void()> on_reset_;
};

}  // namespace msb::vmm
