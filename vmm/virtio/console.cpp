#include "vmm/virtio/console.h"

#include <sys/epoll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace msb::vmm::virtio {

VirtioConsole::VirtioConsole(int backend_fd, EventLoop& loop)
    : backend_fd_(backend_fd), loop_(loop) {}

VirtioConsole::~VirtioConsole() {
  std::lock_guard lock(mutex_);
  if (watching_) loop_.remove(backend_fd_);
}

void VirtioConsole::read_config(uint64_t, std::span<std::byte> data) {
  // cols, rows, max_nr_ports and emerg_wr: none is offered (no SIZE, MULTIPORT or EMERG_WRITE).
  std::memset(data.data(), 0, data.size());
}

void VirtioConsole::activate(const GuestMemory& memory, std::span<Queue> queues, uint64_t,
                             InterruptSink& interrupt) {
  std::lock_guard lock(mutex_);
  memory_ = &memory;
  queues_ = queues;
  interrupt_ = &interrupt;
  state_.receive_starved = false;
  update_interest_locked();
}

void VirtioConsole::reset() {
  std::lock_guard lock(mutex_);
  if (watching_) loop_.remove(backend_fd_);
  watching_ = false;
  memory_ = nullptr;
  queues_ = {};
  interrupt_ = nullptr;
  // Bytes the old driver sent still go out; the backend's state survives a driver reset.
  state_.receive_starved = false;
}

ConsoleState VirtioConsole::save() const {
  std::lock_guard lock(mutex_);
  return state_;
}

void VirtioConsole::restore(const ConsoleState& state) {
  if (state.pending_output.size() > kMaxTransmitChain) {
    throw std::invalid_argument("virtio-console: " + std::to_string(state.pending_output.size()) +
                                " bytes of pending output, more than one transmit chain");
  }
  std::lock_guard lock(mutex_);
  state_.pending_output = state.pending_output;
  state_.backend_closed = false;
  // Whether input waits for buffers is found out again: the machine processes every queue once
  // after a restore.
  state_.receive_starved = false;
  update_interest_locked();
}

void VirtioConsole::process_queue(size_t index) {
  std::lock_guard lock(mutex_);
  if (memory_ == nullptr) return;
  if (index == kReceiveQueue) {
    // New receive buffers: read input again.
    state_.receive_starved = false;
    receive_locked();
  } else if (index == kTransmitQueue) {
    transmit_locked();
  }
  update_interest_locked();
}

void VirtioConsole::on_backend(uint32_t events) {
  std::lock_guard lock(mutex_);
  if (memory_ == nullptr || !watching_) return;  // reset raced with this event
  if (events & EPOLLOUT) {
    if (flush_pending_locked()) transmit_locked();
  }
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) receive_locked();
  // EPOLLHUP/EPOLLERR with nothing left to read: receive_locked saw EOF or the error and closed.
  if ((events & (EPOLLHUP | EPOLLERR)) && !state_.backend_closed && !state_.receive_starved) {
    close_backend_locked();
  }
  update_interest_locked();
}

void VirtioConsole::notify_locked(Queue& queue) {
  if (report_broken_queues(queues_, *interrupt_)) return;
  if (queue.needs_notification(*memory_)) interrupt_->used_buffers();
}

void VirtioConsole::receive_locked() {
  if (state_.backend_closed || queues_.size() <= kReceiveQueue) return;
  Queue& queue = queues_[kReceiveQueue];
  std::vector<std::byte> buffer;
  bool used = false;
  while (!state_.backend_closed) {
    auto chain = queue.pop(*memory_);
    if (!chain) {
      // No buffer posted: leave the input in the socket (backpressure) until the driver posts.
      state_.receive_starved = true;
      break;
    }
    if (!chain->ok() || chain->writable_length() == 0) {
      used |= queue.add_used(*memory_, chain->head(), 0);
      continue;
    }
    buffer.resize(
        static_cast<size_t>(std::min<uint64_t>(chain->writable_length(), kMaxReceiveChunk)));
    ssize_t got = recv(backend_fd_, buffer.data(), buffer.size(), MSG_DONTWAIT);
    if (got < 0 && errno == EINTR) {
      queue.undo_pop();
      continue;
    }
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      queue.undo_pop();
      break;
    }
    if (got <= 0) {
      queue.undo_pop();
      close_backend_locked();
      break;
    }
    const size_t written =
        chain->scatter(*memory_, std::span(buffer.data(), static_cast<size_t>(got)));
    used |= queue.add_used(*memory_, chain->head(), static_cast<uint32_t>(written));
  }
  if (used) notify_locked(queue);
}

bool VirtioConsole::flush_pending_locked() {
  auto& pending = state_.pending_output;
  if (state_.backend_closed) pending.clear();
  size_t sent = 0;
  while (sent < pending.size()) {
    ssize_t put = send(backend_fd_, pending.data() + sent, pending.size() - sent,
                       MSG_DONTWAIT | MSG_NOSIGNAL);
    if (put < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      close_backend_locked();
      pending.clear();
      return true;
    }
    sent += static_cast<size_t>(put);
  }
  pending.erase(pending.begin(), pending.begin() + static_cast<ptrdiff_t>(sent));
  return pending.empty();
}

void VirtioConsole::transmit_locked() {
  if (queues_.size() <= kTransmitQueue) return;
  Queue& queue = queues_[kTransmitQueue];
  bool used = false;
  // One chain at a time, and none while earlier output waits for the socket.
  while (flush_pending_locked()) {
    auto chain = queue.pop(*memory_);
    if (!chain) break;
    if (chain->ok() && !state_.backend_closed) {
      state_.pending_output = chain->gather_readable(*memory_, kMaxTransmitChain);
    }
    // The bytes are copied out: the guest may reuse its buffer at once.
    used |= queue.add_used(*memory_, chain->head(), 0);
  }
  if (used) notify_locked(queue);
}

void VirtioConsole::close_backend_locked() {
  state_.backend_closed = true;
  state_.pending_output.clear();
  if (watching_) loop_.remove(backend_fd_);
  watching_ = false;
}

void VirtioConsole::update_interest_locked() {
  uint32_t interest = 0;
  if (memory_ != nullptr && !state_.backend_closed && backend_fd_ >= 0) {
    if (!state_.receive_starved) interest |= EPOLLIN;
    if (!state_.pending_output.empty()) interest |= EPOLLOUT;
  }
  // Nothing wanted: leave the epoll set altogether, since a hung-up socket would report EPOLLHUP
  // over and over even with no events asked for.
  if (interest == 0) {
    if (watching_) loop_.remove(backend_fd_);
    watching_ = false;
  } else if (!watching_) {
    loop_.add(backend_fd_, interest, [this](uint32_t events) { on_backend(events); });
    watching_ = true;
  } else if (interest != interest_) {
    loop_.modify(backend_fd_, interest);
  }
  interest_ = interest;
}

}  // namespace msb::vmm::virtio
