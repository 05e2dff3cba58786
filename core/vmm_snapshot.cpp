#include "core/vmm_snapshot.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/snapshot_staging.h"
#include "snapstore/error.h"
#include "vmm/disk_overlay.h"
#include "vmm/machine_state.h"

namespace msb::core {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

bool all_zero(const std::byte* data, size_t size) {
  // Word-wise: a chunk of untouched guest memory reads the kernel's shared zero page.
  const auto* words = reinterpret_cast<const uint64_t*>(data);
  for (size_t i = 0; i < size / 8; ++i)
    if (words[i]) return false;
  for (size_t i = size / 8 * 8; i < size; ++i)
    if (data[i] != std::byte{0}) return false;
  return true;
}

void or_into(std::vector<uint64_t>& into, const std::vector<uint64_t>& from) {
  if (into.size() < from.size()) into.resize(from.size(), 0);
  for (size_t i = 0; i < from.size(); ++i)
    into[i] |= from[i];
}

std::vector<uint64_t> merge_sorted(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  std::vector<uint64_t> out;
  out.reserve(a.size() + b.size());
  std::set_union(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(out));
  return out;
}

// pwrite of all of [data, data + length) at `offset`; false with errno set on failure. (Not
// snapstore::pwrite_all: this runs on worker threads, where an exception would end the VMM.)
bool pwrite_whole(int fd, const std::byte* data, size_t length, uint64_t offset) {
  while (length > 0) {
    ssize_t n = ::pwrite(fd, data, length, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    length -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

// Runs body(i) for i in [0, n) on up to two threads (this machine class has two cores; more
// threads would only compete with the vCPUs once they run again).
template <class Body>
void parallel_for(size_t n, Body body) {
  const size_t threads = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), 4);
  if (n < 64 || threads < 2) {
    for (size_t i = 0; i < n; ++i)
      body(i);
    return;
  }
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (size_t i = t; i < n; i += threads)
        body(i);
    });
  }
  for (auto& thread : pool)
    thread.join();
}

// Which chunks of anonymous guest RAM hold a page that was ever touched: /proc/self/pagemap's
// present and swapped bits (a page with neither has never been written, so it reads as zero).
// Where the kernel does not say (no pagemap), or for file-backed RAM (a restored machine, whose
// untouched pages come from the file), every chunk counts as touched.
std::vector<char> touched_chunks(std::span<const std::byte> ram, uint64_t chunk) {
  const size_t chunks = (ram.size() + chunk - 1) / chunk;
  std::vector<char> touched(chunks, 1);
  snapstore::UniqueFd maps(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!maps) return touched;
  const uint64_t first_page = reinterpret_cast<uintptr_t>(ram.data()) / kPageSize;
  const uint64_t pages = ram.size() / kPageSize;
  const uint64_t pages_per_chunk = chunk / kPageSize;
  constexpr uint64_t kPresent = 1ull << 63, kSwapped = 1ull << 62, kFilePage = 1ull << 61;
  std::vector<uint64_t> entries(std::min<uint64_t>(pages, 1 << 16));
  for (uint64_t page = 0; page < pages;) {
    const uint64_t count = std::min<uint64_t>(entries.size(), pages - page);
    const ssize_t want = static_cast<ssize_t>(count * 8);
    if (::pread(maps.get(), entries.data(), size_t(want), off_t((first_page + page) * 8)) != want) {
      return std::vector<char>(chunks, 1);
    }
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t c = (page + i) / pages_per_chunk;
      if ((page + i) % pages_per_chunk == 0) touched[c] = 0;
      if (entries[i] & kFilePage) return std::vector<char>(chunks, 1);
      if (entries[i] & (kPresent | kSwapped)) touched[c] = 1;
    }
    page += count;
  }
  return touched;
}

}  // namespace

SnapshotSource::SnapshotSource(vmm::Machine& machine, std::string parent, uint32_t chunk_size)
    : machine_(machine), parent_(std::move(parent)), chunk_size_(chunk_size) {}

nlohmann::json SnapshotSource::capture(bool resume) {
  if (capture_in_flight()) {
    throw snapstore::StoreError("a snapshot of this sandbox is being stored already");
  }
  const auto start = Clock::now();
  const bool was_paused = machine_.paused();
  machine_.pause();
  // Whatever fails from here on, a machine this call paused must run again.
  struct Resumer {
    vmm::Machine& machine;
    bool armed;
    ~Resumer() {
      if (armed) machine.resume();
    }
  } resumer{machine_, !was_paused};

  const double pause_ms = ms_since(start);
  vmm::MachineState state = machine_.capture();
  const double state_ms = ms_since(start);
  std::span<const std::byte> ram = machine_.ram();
  const uint64_t chunk = chunk_size_;
  const size_t memory_chunks = (ram.size() + chunk - 1) / chunk;

  // Which memory chunks changed since the parent: all of them for a first snapshot.
  const bool incremental = !parent_.empty() && machine_.dirty_tracking();
  std::vector<uint64_t> dirty_pages;
  if (machine_.dirty_tracking()) dirty_pages = machine_.take_dirty_pages();
  // Tracking starts now, while the guest is stopped, so that the next snapshot is incremental.
  machine_.start_dirty_tracking();
  std::vector<uint64_t> all_dirty = dirty_pages;
  or_into(all_dirty, pending_pages_);
  std::vector<size_t> changed;
  const uint64_t pages_per_chunk = chunk / kPageSize;
  for (size_t c = 0; c < memory_chunks; ++c) {
    bool dirty = !incremental;
    for (uint64_t p = c * pages_per_chunk; !dirty && p < (c + 1) * pages_per_chunk; ++p) {
      dirty = p / 64 < all_dirty.size() && (all_dirty[p / 64] >> (p % 64)) & 1;
    }
    if (dirty) changed.push_back(c);
  }

  // Disk: blocks written since the parent (every delta block for a first snapshot).
  vmm::DiskOverlay* disk = machine_.disk();
  std::vector<uint64_t> changed_blocks;
  std::string disk_map;
  std::vector<size_t> disk_changed;
  if (disk) {
    changed_blocks = merge_sorted(disk->take_changed_blocks(), pending_blocks_);
    disk_map = disk->delta_map();
    const uint64_t blocks_per_chunk = chunk / vmm::DiskOverlay::kBlockSize;
    const size_t disk_chunks = (disk->size() + chunk - 1) / chunk;
    if (incremental) {
      for (uint64_t block : changed_blocks) {
        size_t c = block / blocks_per_chunk;
        if (disk_changed.empty() || disk_changed.back() != c) disk_changed.push_back(c);
      }
    } else {
      // The map's bitmap (its last bytes) says which blocks the delta holds.
      const uint64_t blocks =
          (disk->size() + vmm::DiskOverlay::kBlockSize - 1) / vmm::DiskOverlay::kBlockSize;
      const size_t bitmap_bytes = (blocks + 7) / 8;
      const size_t header = disk_map.size() - std::min(disk_map.size(), bitmap_bytes);
      for (size_t c = 0; c < disk_chunks; ++c) {
        bool any = false;
        for (uint64_t b = c * blocks_per_chunk;
             !any && b < std::min(blocks, (c + 1) * blocks_per_chunk); ++b) {
          any = (static_cast<uint8_t>(disk_map[header + b / 8]) >> (b % 8)) & 1;
        }
        if (any) disk_changed.push_back(c);
      }
    }
  }

  // Memory chunks that are all zero need no staging: the store records them as zero. Pages the
  // guest never touched are known to be zero without reading them (which would fault each one in).
  const double dirty_ms = ms_since(start);
  std::vector<char> touched = touched_chunks(ram, chunk);
  const double pagemap_ms = ms_since(start);
  std::vector<char> nonzero(changed.size(), 0);
  parallel_for(changed.size(), [&](size_t i) {
    uint64_t offset = changed[i] * chunk;
    size_t length = std::min<uint64_t>(chunk, ram.size() - offset);
    nonzero[i] = touched[changed[i]] && !all_zero(ram.data() + offset, length);
  });
  const double zero_ms = ms_since(start);
  StagingLayout layout;
  layout.memory_size = ram.size();
  layout.chunk_size = chunk_size_;
  for (size_t i = 0; i < changed.size(); ++i) {
    if (nonzero[i]) {
      layout.memory_staged.push_back(changed[i]);
    } else {
      layout.memory_zero.push_back(changed[i]);
    }
  }
  if (disk) {
    layout.has_disk = true;
    layout.disk_size = disk->size();
    layout.disk_staged.assign(disk_changed.begin(), disk_changed.end());
  }
  nlohmann::json header = {{"format", "msb-snapshot-staging"},
                           {"parent", parent_.empty() ? nlohmann::json() : nlohmann::json(parent_)},
                           {"state", state.to_json()},
                           {"disk_map", disk_map.size()}};
  layout.header = header.dump();
  layout.disk_map_size = disk_map.size();
  layout.compute();

  snapstore::UniqueFd staging(::memfd_create("msb-snapshot-staging", MFD_CLOEXEC));
  if (!staging) snapstore::throw_errno("memfd_create for the snapshot's staging area");
  if (::ftruncate(staging.get(), static_cast<off_t>(layout.total_size)) != 0) {
    snapstore::throw_errno("cannot size the snapshot's staging area to " +
                           std::to_string(layout.total_size) + " bytes");
  }
  void* map =
      ::mmap(nullptr, layout.total_size, PROT_READ | PROT_WRITE, MAP_SHARED, staging.get(), 0);
  if (map == MAP_FAILED) snapstore::throw_errno("cannot map the snapshot's staging area");
  auto* out = static_cast<std::byte*>(map);
  const double staging_ms = ms_since(start);
  write_staging_prefix(layout, out);
  // The disk delta first: the guest writes its disk again as soon as it runs.
  std::string disk_error;
  for (size_t i = 0; i < layout.disk_staged.size() && disk; ++i) {
    uint64_t offset = layout.disk_staged[i] * chunk;
    size_t length = std::min<uint64_t>(chunk, disk->size() - offset);
    try {
      disk->read_delta(offset, std::span(out + layout.disk_slot(i), length));
    } catch (const std::exception& e) {
      disk_error = e.what();
      break;
    }
  }
  std::memcpy(out + layout.disk_map_offset, disk_map.data(), disk_map.size());
  ::munmap(map, layout.total_size);
  if (!disk_error.empty()) throw snapstore::StoreError("disk delta: " + disk_error);

  // Memory. With --resume the guest need not wait for the copy: a fork of this process sees
  // guest RAM as it is now (copy-on-write), copies it out, and exits, while the guest runs again
  // here. Only the fork itself (page tables) is paid with the guest stopped.
  double paused_ms = 0;
  bool copied = false;
  if (resume && !was_paused) {
    pid_t child = ::fork();
    if (child == 0) {
      // Only async-signal-safe calls from here: the other threads of this process are gone. It
      // shares the VMM's descriptors (vmm.lock among them), so it must not outlive the VMM.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() == 1) ::_exit(1);
      for (size_t i = 0; i < layout.memory_staged.size(); ++i) {
        uint64_t offset = layout.memory_staged[i] * chunk;
        size_t length = std::min<uint64_t>(chunk, ram.size() - offset);
        if (!pwrite_whole(staging.get(), ram.data() + offset, length, layout.memory_slot(i))) {
          ::_exit(1);
        }
      }
      ::_exit(0);
    }
    if (child > 0) {
      resumer.armed = false;
      machine_.resume();
      paused_ms = ms_since(start);  // the guest stopped within pause(), early in this interval
      int status = 0;
      while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
      }
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        throw snapstore::StoreError("copying guest memory into the snapshot's staging area failed");
      }
      copied = true;
    }
    // fork failed: copy with the guest stopped, below.
  }
  if (!copied) {
    // pwrite rather than memcpy into the mapping: the kernel allocates the memfd's pages as it
    // copies, where stores through the mapping would take one page fault per 4 KiB (most of the
    // pause, measured).
    std::atomic<int> copy_errno{0};
    parallel_for(layout.memory_staged.size(), [&](size_t i) {
      uint64_t offset = layout.memory_staged[i] * chunk;
      size_t length = std::min<uint64_t>(chunk, ram.size() - offset);
      if (!pwrite_whole(staging.get(), ram.data() + offset, length, layout.memory_slot(i))) {
        copy_errno = errno;
      }
    });
    if (copy_errno) {
      errno = copy_errno;
      snapstore::throw_errno("cannot copy guest memory into the snapshot's staging area");
    }
  }

  const double capture_ms = ms_since(start);
  std::fprintf(stderr,
               "snapshot capture: paused %.1f, state %.1f, dirty %.1f, pagemap %.1f, zero %.1f, "
               "staging %.1f, copied %.1f ms (guest paused %.1f ms)\n",
               pause_ms, state_ms, dirty_ms, pagemap_ms, zero_ms, staging_ms, capture_ms,
               copied ? paused_ms : capture_ms);
  if (copied) {
    // Resumed above, after the fork.
  } else if (resume) {
    resumer.armed = false;
    machine_.resume();
    if (!was_paused) paused_ms = ms_since(start);
  } else {
    resumer.armed = false;  // stays paused until msb resume
  }

  staged_pages_ = std::move(all_dirty);
  staged_blocks_ = std::move(changed_blocks);
  staged_full_ = !incremental;
  pending_pages_.clear();
  pending_blocks_.clear();
  staging_ = std::move(staging);
  return {
      {"pid", int(::getpid())}, {"staging_fd", staging_.get()}, {"staging_size", layout.total_size},
      {"paused_ms", paused_ms}, {"capture_ms", capture_ms},     {"paused", machine_.paused()}};
}

void SnapshotSource::commit(const std::string& handle) {
  parent_ = handle;
  staged_pages_.clear();
  staged_blocks_.clear();
  staging_.reset();
}

void SnapshotSource::abort() {
  if (!capture_in_flight()) return;
  // What the capture took out of the dirty log is still unsaved: the next capture needs it.
  if (!staged_full_) {
    or_into(pending_pages_, staged_pages_);
    pending_blocks_ = merge_sorted(pending_blocks_, staged_blocks_);
  }
  staged_pages_.clear();
  staged_blocks_.clear();
  staging_.reset();
}

}  // namespace msb::core
