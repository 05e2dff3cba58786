// Everything Machine::capture() returns and Machine::restore() takes: the whole state of a paused
// machine except its RAM (Machine::ram()) and its disk (Machine::disk()), as plain data, with a
// JSON form that round-trips exactly (KVM's structs as hex strings of their bytes).
//
// A state file is untrusted input: from_json checks every field's presence, type, range and,
// for KVM's structs, exact size; Machine::restore checks the rest (counts against the config,
// queues against guest memory, features against what each device offers) and KVM checks the
// vCPU state itself.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "vmm/devices/i8042.h"
#include "vmm/devices/serial.h"
#include "vmm/vcpu_state.h"
#include "vmm/virtio/balloon.h"
#include "vmm/virtio/block.h"
#include "vmm/virtio/console.h"
#include "vmm/virtio/mmio.h"
#include "vmm/virtio/queue.h"
#include "vmm/virtio/rng.h"
#include "vmm/vm_state.h"

namespace msb::vmm {

// One virtio-mmio transport and its device, in the machine's device order (machine.h).
struct VirtioDeviceState {
  std::string name;  // the device's name(): "virtio-console", "virtio-blk", "virtio-rng",
                     // "virtio-balloon"
  virtio::MmioState mmio;
  std::vector<virtio::QueueState> queues;
  uint32_t interrupt_status = 0;
  uint32_t config_generation = 0;
  // Device-specific: virtio-console {pending_output (hex), backend_closed, receive_starved},
  // virtio-blk {requests, errors}, virtio-rng {bytes_delivered}, virtio-balloon {num_pages,
  // actual, pages_inflated, pages_deflated, bad_requests}.
  nlohmann::json device = nlohmann::json::object();
};

struct MachineState {
  static constexpr unsigned kFormat = 1;  // "format" in the JSON; from_json refuses others

  unsigned cpus = 0;  // the config the machine was built with; restore must match it
  unsigned max_cpus = 0;
  uint64_t memory_mib = 0;
  uint64_t max_memory_mib = 0;
  uint64_t disk_size = 0;  // bytes (the disk's actual size); 0 without a disk
  bool has_disk = false;

  std::vector<VcpuState> vcpus;  // one per max_cpus, by index (= APIC id)
  VmState vm;
  SerialState serial;
  I8042State i8042;
  std::vector<VirtioDeviceState> virtio;

  nlohmann::json to_json() const;
  // Throws VmmError("snapshot state: <field>: <what is wrong>") for anything malformed.
  static MachineState from_json(const nlohmann::json& json);
};

// VirtioDeviceState::device for each kind of device; the from_json ones throw VmmError
// ("snapshot state: ...") for anything malformed.
nlohmann::json console_state_to_json(const virtio::ConsoleState& state);
virtio::ConsoleState console_state_from_json(const nlohmann::json& json);
nlohmann::json block_state_to_json(const virtio::BlockState& state);
virtio::BlockState block_state_from_json(const nlohmann::json& json);
nlohmann::json rng_state_to_json(const virtio::RngState& state);
virtio::RngState rng_state_from_json(const nlohmann::json& json);
nlohmann::json balloon_state_to_json(const virtio::BalloonState& state);
virtio::BalloonState balloon_state_from_json(const nlohmann::json& json);

}  // namespace msb::vmm
