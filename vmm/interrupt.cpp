#include "vmm/interrupt.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace msb::vmm {

Interrupt::Interrupt() : fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (!fd_) throw std::system_error(errno, std::generic_category(), "interrupt eventfd");
}

void Interrupt::trigger() const {
  uint64_t one = 1;
  // EAGAIN means the counter is saturated, i.e. the line is already raised: nothing to do.
  while (::write(fd_.get(), &one, sizeof one) < 0 && errno == EINTR) {
  }
}

uint64_t Interrupt::take_count() const {
  uint64_t count = 0;
  while (::read(fd_.get(), &count, sizeof count) < 0) {
    if (errno != EINTR) return 0;  // EAGAIN: not triggered since the last call
  }
  return count;
}

}  // namespace msb::vmm
