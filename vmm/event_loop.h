// The VMM's device thread: one epoll loop that runs device work when an fd becomes ready (queue
// notifications through ioeventfd, a backend socket that became readable or writable, a timer).
// Keeping all device work on one thread means a device's queue processing never races itself;
// vCPU threads only touch device registers, under the device's lock.
#pragma once

#include <sys/epoll.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#include "snapstore/file_util.h"

namespace msb::vmm {

class EventLoop {
 public:
  // Called on the loop thread with the epoll events that fired.
  using Handler = std::function<void(uint32_t events)>;

  EventLoop();
  ~EventLoop();

  // Watches `fd` for `events` (EPOLLIN, EPOLLOUT, ...). Safe from any thread, including from a
  // handler. Throws std::system_error (naming the fd) when epoll refuses it.
  void add(int fd, uint32_t events, Handler handler);
  void modify(int fd, uint32_t events);
  void remove(int fd);

  // Runs handlers until stop(); returns then. Exceptions from a handler propagate out of run().
  void run();
  // Waits up to `timeout_ms` (-1: forever) for ready fds and runs their handlers once; returns
  // how many handlers ran. For tests, and for callers that drive the loop themselves.
  size_t run_once(int timeout_ms);
  // Makes run() return soon. Safe from any thread and from a signal-free context. Also ends a
  // pause: a parked run() returns.
  void stop();

  // Parks run() between handler batches: returns once no handler runs and none will until
  // resume() (at once when run() is not running; a later run() parks before its first batch).
  // Idempotent. Never from a handler (it would wait for itself).
  void pause();
  // Lets a parked run() go on. Idempotent.
  void resume();

 private:
  snapstore::UniqueFd epoll_;
  snapstore::UniqueFd wake_;  // eventfd written by stop()
  std::mutex mutex_;
  std::map<int, std::shared_ptr<Handler>> handlers_;
  bool stopping_ = false;
  bool pause_requested_ = false;
  bool parked_ = false;   // run() is waiting in its pause
  bool running_ = false;  // run() is on a thread
  std::condition_variable paused_changed_;
};

}  // namespace msb::vmm
