#include "vmm/event_loop.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <system_error>

namespace msb::vmm {
namespace {

[[noreturn]] void throw_system(const std::string& what) {
  throw std::system_error(errno, std::generic_category(), what);
}

}  // namespace

EventLoop::EventLoop()
    : epoll_(epoll_create1(EPOLL_CLOEXEC)), wake_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (!epoll_) throw_system("event loop: epoll_create1");
  if (!wake_) throw_system("event loop: eventfd");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = wake_.get();
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, wake_.get(), &event) != 0) {
    throw_system("event loop: watching the wake eventfd");
  }
}

EventLoop::~EventLoop() = default;

void EventLoop::add(int fd, uint32_t events, Handler handler) {
  std::lock_guard lock(mutex_);
  epoll_event event{};
  event.events = events;
  event.data.fd = fd;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    throw_system("event loop: watching fd " + std::to_string(fd));
  }
  handlers_[fd] = std::make_shared<Handler>(std::move(handler));
}

void EventLoop::modify(int fd, uint32_t events) {
  std::lock_guard lock(mutex_);
  epoll_event event{};
  event.events = events;
  event.data.fd = fd;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &event) != 0) {
    throw_system("event loop: changing events of fd " + std::to_string(fd));
  }
}

void EventLoop::remove(int fd) {
  std::lock_guard lock(mutex_);
  // The fd may already be closed (and so gone from the epoll set): ignore errors.
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  handlers_.erase(fd);
}

size_t EventLoop::run_once(int timeout_ms) {
  epoll_event events[32];
  int count = epoll_wait(epoll_.get(), events, 32, timeout_ms);
  if (count < 0) {
    if (errno == EINTR) return 0;
    throw_system("event loop: epoll_wait");
  }
  size_t handled = 0;
  for (int i = 0; i < count; ++i) {
    int fd = events[i].data.fd;
    if (fd == wake_.get()) {
      uint64_t value;
      while (::read(wake_.get(), &value, sizeof value) < 0 && errno == EINTR) {
      }
      continue;
    }
    std::shared_ptr<Handler> handler;
    {
      std::lock_guard lock(mutex_);
      auto it = handlers_.find(fd);
      if (it == handlers_.end()) continue;  // removed by an earlier handler of this batch
      handler = it->second;
    }
    // Called without the lock, so that the handler may add, modify or remove fds.
    (*handler)(events[i].events);
    ++handled;
  }
  return handled;
}

void EventLoop::run() {
  {
    std::lock_guard lock(mutex_);
    running_ = true;
  }
  // However run() ends (stop, or a handler's exception), a pause() waiting for it returns.
  struct NotRunning {
    EventLoop& loop;
    ~NotRunning() {
      std::lock_guard lock(loop.mutex_);
      loop.running_ = false;
      loop.parked_ = false;
      loop.paused_changed_.notify_all();
    }
  } not_running{*this};
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      // The pause point is here, between batches: no handler is half-way through its device
      // work, so a snapshot sees every device between requests.
      if (pause_requested_ && !stopping_) {
        parked_ = true;
        paused_changed_.notify_all();
        paused_changed_.wait(lock, [this] { return !pause_requested_ || stopping_; });
        parked_ = false;
      }
      if (stopping_) {
        stopping_ = false;
        return;
      }
    }
    run_once(-1);
  }
}

void EventLoop::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  paused_changed_.notify_all();
  uint64_t one = 1;
  while (::write(wake_.get(), &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void EventLoop::pause() {
  std::unique_lock lock(mutex_);
  pause_requested_ = true;
  if (!running_) return;
  // Wake epoll_wait so that run() reaches its pause point without waiting for an event.
  uint64_t one = 1;
  while (::write(wake_.get(), &one, sizeof one) < 0 && errno == EINTR) {
  }
  paused_changed_.wait(lock, [this] { return parked_ || !running_; });
}

void EventLoop::resume() {
  {
    std::lock_guard lock(mutex_);
    pause_requested_ = false;
  }
  paused_changed_.notify_all();
}

}  // namespace msb::vmm
