// The VMM process's side of a snapshot: pause the machine, capture its state, copy what changed
// since the parent snapshot into a staging memfd, and let the guest run again; the msb command
// that asked (core/snapshot.cpp) then reads the staging through /proc/PID/fd/N, stores it and
// reports the snapshot's handle back (commit), so that the next snapshot is incremental to it.
//
// Invariant: every page or disk block written since the last committed snapshot is either in
// the machine's dirty log or in pending_pages_/pending_blocks_, so a capture that is never
// committed (its msb was killed) loses no change: abort() puts its dirty set back.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "snapstore/file_util.h"
#include "vmm/machine.h"

namespace msb::core {

// Page and chunk geometry shared by the capture and the store side.
inline constexpr uint64_t kPageSize = 4096;

class SnapshotSource {
 public:
  // `parent`: the snapshot the machine was restored from ("" for a booted machine).
  SnapshotSource(vmm::Machine& machine, std::string parent, uint32_t chunk_size);

  // Pauses (unless paused), captures, stages, resumes when asked. The JSON is the control
  // response (see core/control_protocol.h, op "snapshot"). Throws on failure, after resuming a
  // machine that it paused.
  nlohmann::json capture(bool resume);
  bool capture_in_flight() const { return staging_.get() >= 0; }
  // The capture was stored as `handle`: the next snapshot is incremental to it.
  void commit(const std::string& handle);
  // The capture was not stored: its changes stay pending for the next one.
  void abort();

 private:
  vmm::Machine& machine_;
  std::string parent_;
  uint32_t chunk_size_;
  std::vector<uint64_t> pending_pages_;   // bitmap, as Machine::take_dirty_pages
  std::vector<uint64_t> pending_blocks_;  // disk blocks, ascending
  std::vector<uint64_t> staged_pages_;    // the in-flight capture's dirty set
  std::vector<uint64_t> staged_blocks_;
  bool staged_full_ = false;  // the in-flight capture was a full one (no dirty log yet)
  snapstore::UniqueFd staging_;
};

}  // namespace msb::core
