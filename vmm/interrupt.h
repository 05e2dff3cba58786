// An interrupt line a device raises: an eventfd that KVM turns into an interrupt on a GSI of the
// in-kernel IOAPIC (irqfd), so raising it costs one write(2) and no VM exit.
#pragma once

#include "snapstore/file_util.h"

namespace msb::vmm {

class Interrupt {
 public:
  Interrupt();  // a fresh non-blocking eventfd; throws std::system_error
  // Raises the line (an edge: KVM injects once per trigger). Safe from any thread.
  void trigger() const;
  // Tests: how many times trigger() ran since the last call.
  uint64_t take_count() const;
  int fd() const { return fd_.get(); }

 private:
  snapstore::UniqueFd fd_;
};

}  // namespace msb::vmm
