// An 8250/16550A UART (the guest's ttyS0 at COM1): enough of the chip for Linux's 8250 driver and
// for early printk, with output appended to a log fd.
//
// Registers (offsets from 0x3f8, DLAB = LCR bit 7): 0 RBR/THR (DLL with DLAB), 1 IER (DLM with
// DLAB), 2 IIR (read) / FCR (write), 3 LCR, 4 MCR, 5 LSR, 6 MSR, 7 SCR. Output never blocks, so
// the transmitter is always empty (LSR THRE|TEMT) and a written byte leaves at once; like a real
// UART the chip then raises its THR-empty interrupt if IER enables it, which Linux's driver waits
// for before it writes the next batch. Reading IIR while it reports THR empty clears that
// interrupt (as on the real chip). The line (an irqfd edge) is raised when an interrupt becomes
// pending while none was. MCR loopback routes THR to RBR and MCR's outputs to MSR's
// inputs, which Linux's probe checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <string>

#include "vmm/interrupt.h"
#include "vmm/io_bus.h"

namespace msb::vmm {

inline constexpr uint64_t kSerialCom1Base = 0x3f8;
inline constexpr uint64_t kSerialPorts = 8;
inline constexpr uint32_t kSerialCom1Irq = 4;

// Everything the UART is, as plain data (a snapshot saves and restores it as-is).
struct SerialState {
  uint8_t divisor_low = 0x0c;  // DLL/DLM: 9600 baud, never used for timing
  uint8_t divisor_high = 0;
  uint8_t ier = 0;
  uint8_t fcr = 0;     // only bit 0 (FIFO enable) is kept; it sets IIR's FIFO bits
  uint8_t lcr = 0x03;  // 8N1
  uint8_t mcr = 0x08;  // OUT2, as firmware leaves it
  uint8_t scr = 0;
  bool thr_empty_pending = false;  // the THR-empty interrupt is raised and not yet identified
  std::deque<uint8_t> receive;     // bytes for RBR: loopback, later console input
};

class Serial : public BusDevice {
 public:
  // How many received bytes the UART holds (a 16550A has a 16-byte FIFO; more is dropped).
  static constexpr size_t kReceiveCapacity = 64;

  // A guest must not be able to fill the host's disk through its console: past `max_log_bytes`
  // the log gets one line saying so and the rest of the output is dropped.
  static constexpr uint64_t kMaxLogBytes = 64ull << 20;

  // Output bytes are written to `sink_fd` (not owned; -1 discards them). `interrupt` (not owned)
  // is IRQ 4's line.
  Serial(int sink_fd, Interrupt& interrupt, uint64_t max_log_bytes = kMaxLogBytes);

  void read(uint64_t offset, std::span<std::byte> data) override;
  void write(uint64_t offset, std::span<const std::byte> data) override;

  // Input from the host (the hook for a later interactive console): queued for RBR, raising the
  // data-available interrupt when IER enables it. Bytes past kReceiveCapacity are dropped.
  void receive(std::span<const uint8_t> bytes);

  SerialState save() const;
  void restore(const SerialState& state);
  // The first error writing to the sink, or "" (later writes are skipped silently).
  std::string sink_error() const;

 private:
  uint8_t read_register(uint64_t offset);
  void write_register(uint64_t offset, uint8_t value);
  void transmit(uint8_t byte);
  void enqueue(uint8_t byte);
  bool loopback() const;
  uint8_t interrupt_identification() const;
  // Raises the line when an interrupt is pending now and none was at `before` (an IIR value).
  void raise_if_new(uint8_t before);

  mutable std::mutex mutex_;
  SerialState state_;
  int sink_fd_;
  Interrupt& interrupt_;
  std::string sink_error_;
  uint64_t max_log_bytes_;
  uint64_t logged_bytes_ = 0;
};

}  // namespace msb::vmm
