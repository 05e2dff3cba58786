// A microVM: the KVM VM, its vCPU threads, its devices and its device thread, built from a
// MachineConfig. This is what msb's VMM process (`msb` in its hidden VMM mode) owns.
//
// Guest physical layout (see vmm/linux_boot.h for RAM): the devices sit in the MMIO gap below
// 4 GiB, virtio-mmio transport i at kVirtioMmioBase + i * kVirtioMmioStride raising GSI
// kVirtioFirstGsi + i, in this order: console (the agent channel), block (unless there is no
// disk), rng, balloon. The guest learns them from the DSDT or the virtio_mmio.device= arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "vmm/acpi.h"
#include "vmm/machine_state.h"

namespace msb::vmm {

class DiskOverlay;

inline constexpr uint64_t kVirtioMmioBase = 0xd0000000;
inline constexpr uint64_t kVirtioMmioStride = 0x1000;
inline constexpr uint32_t kVirtioFirstGsi = 5;

// A machine that cannot be built or run, with what and why ("kernel /x: not a bzImage").
class VmmError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct MachineConfig {
  std::string kernel_path;  // bzImage or ELF vmlinux (the test guest is an ELF)
  std::string initrd_path;  // "" for none
  std::string cmdline;      // msb appends virtio_mmio.device=... (see virtio_on_cmdline) and
                            // msb.cpus=N to it
  unsigned cpus = 1;        // vCPUs started; the VM is built for max_cpus
  unsigned max_cpus = 1;
  uint64_t memory_mib = 256;  // RAM in the e820 map
  uint64_t max_memory_mib = 256;
  std::string disk_base_path;     // read-only base image; "" for a blank disk
  std::string disk_overlay_path;  // the sandbox's writable overlay (created if missing)
  std::string disk_layer_path;    // a read-only middle layer (a snapshot's disk delta), "" for
                                  // none: see DiskOverlay::open
  uint64_t disk_size = 0;         // bytes; with a base image, its size wins; 0 and no base:
                                  // no disk at all
  // The virtio-mmio devices are in the DSDT; they are also named on the command line
  // (virtio_mmio.device=SIZE@BASE:GSI) for kernels that read them there (the test guest).
  bool virtio_on_cmdline = true;
  int console_log_fd = -1;  // serial output is appended here (not owned)
  int agent_fd = -1;        // a stream socket: bytes to and from the guest's console port
                            // (not owned; msb keeps the other end)
  // The e820 map gives the guest max_memory_mib of RAM and the balloon starts out holding what
  // is above memory_mib (for a guest whose driver inflates it early: Linux with msb's agent), so
  // that a restore can grant more memory as well as less. Off: the map holds memory_mib.
  bool balloon_holds_excess = false;
  std::string memory_path;  // Machine::restore only: a file of exactly max_memory_mib MiB
                            // that becomes guest RAM, mapped MAP_PRIVATE (copy-on-write:
                            // machines restored from it share its page-cache pages until
                            // they write); the file itself never changes
};

// The kernel command line a machine boots with: config.cmdline, the virtio-mmio devices as
// virtio_mmio.device=4K@BASE:GSI (unless config.virtio_on_cmdline is off), then msb.cpus=N.
std::string boot_cmdline(const MachineConfig& config,
                         std::span<const acpi::VirtioMmioDevice> virtio);

// The balloon as the guest's driver left it (vmm/virtio/balloon.h), in 4 KiB pages.
struct BalloonStatus {
  uint32_t target_pages = 0;  // what the host asked for (set_balloon_target_mib)
  uint32_t actual_pages = 0;  // what the driver says it holds; 0 without a driver
  uint64_t ram_mib = 0;       // the RAM the e820 map describes, which the balloon takes from
};

// Why a machine stopped.
struct MachineExit {
  enum class Reason {
    kPoweredOff,     // the guest reset through the i8042 (its way to power off) or stop() ran
    kTripleFault,    // KVM_EXIT_SHUTDOWN
    kInternalError,  // KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_FAIL_ENTRY, an unexpected exit
    kVmmError,       // a device or vCPU thread failed
  } reason = Reason::kPoweredOff;
  std::string detail;  // for humans: "vCPU 0: KVM internal error, suberror 1 at rip 0x..."
};

class Machine {
 public:
  // Builds the VM (memory, irqchip, PIT, vCPUs, devices, ACPI tables, boot parameters). Throws
  // VmmError naming the file or the KVM call that failed.
  static std::unique_ptr<Machine> create(const MachineConfig& config);
  // Builds a machine from `state` (from capture(), possibly in another process) and the RAM in
  // config.memory_path, without loading a kernel: after start() the guest continues exactly
  // where it was captured. config's cpus, max_cpus, memory_mib, max_memory_mib and disk (its
  // size, or none) must match the state's; kernel_path, initrd_path and cmdline are ignored. The
  // disk is opened from config (base, layer, overlay); the console talks to config.agent_fd,
  // where output the guest had sent but the old socket had not taken goes first. Dirty tracking
  // is on from the start. Throws VmmError naming what is malformed or inconsistent.
  static std::unique_ptr<Machine> restore(const MachineConfig& config, const MachineState& state);
  virtual ~Machine() = default;

  // Starts the vCPU threads and the device thread. A machine paused before start() starts
  // paused.
  virtual void start() = 0;
  // Blocks until the guest stops for any reason, then joins every thread.
  virtual MachineExit wait() = 0;
  // Asks the machine to stop now (as if the guest powered off). Safe from any thread, also
  // while paused.
  virtual void stop() = 0;

  // Stops the guest: returns once every vCPU thread is out of KVM_RUN with its pending I/O or
  // MMIO completed and parked, and the device thread is parked between handlers. Idempotent.
  // Safe from any thread but the machine's own (a device handler or vCPU exit would wait for
  // itself).
  virtual void pause() = 0;
  // Lets a paused guest go on (telling a kvmclock guest it was paused). Idempotent.
  virtual void resume() = 0;
  virtual bool paused() const = 0;

  // While paused: the whole state but RAM and disk. Flushes the disk overlay first, so that its
  // files are consistent. Throws VmmError when not paused.
  virtual MachineState capture() = 0;
  // Guest RAM, host-linear: max_memory_mib MiB in the layout boot::ram_ranges gives (RAM below
  // the MMIO gap first, then RAM above 4 GiB). What Machine::restore takes as memory_path. Read
  // it only while paused.
  virtual std::span<const std::byte> ram() const = 0;

  // Turns on dirty tracking (idempotent): KVM's dirty log on every memory slot, plus a bitmap
  // of the pages the VMM itself writes into guest memory (used rings, virtio-blk reads, console
  // input). Where KVM refuses dirty logging, every page is reported dirty (said once on
  // stderr).
  virtual void start_dirty_tracking() = 0;
  virtual bool dirty_tracking() const = 0;
  // While paused and tracking: the 4 KiB pages of ram() written since tracking began or the
  // previous call (bit i of word i / 64 is page i, at offset i * 4096 of ram()); clears them.
  // Throws VmmError when not paused or not tracking.
  virtual std::vector<uint64_t> take_dirty_pages() = 0;

  // The disk, for reading a snapshot's disk delta while paused (the device thread is parked, so
  // nothing else uses it); nullptr for a machine without a disk.
  virtual DiskOverlay* disk() = 0;

  // Asks the guest to keep `mib` MiB of its RAM (the e820 map's: memory_mib, or max_memory_mib
  // with balloon_holds_excess): the balloon's target becomes that RAM - mib (none when mib is
  // at least the RAM) and the guest's driver hears
  // of it through a configuration-change interrupt; it inflates (its MemTotal shrinks, the
  // host frees the pages) or deflates towards it in its own time. Safe from any thread, also
  // before start() and while paused (the guest then acts on resume). A guest without a balloon
  // driver ignores it (Linux with msb's agent and msb's test guest have one).
  virtual void set_balloon_target_mib(uint64_t mib) = 0;
  // The command line the kernel was booted with, all of it (config.cmdline and what msb
  // appended); "" for a restored machine, which boots nothing.
  virtual const std::string& kernel_cmdline() const = 0;
  virtual BalloonStatus balloon() const = 0;
};

}  // namespace msb::vmm
