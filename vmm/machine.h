// A microVM: the KVM VM, its vCPU threads, its devices and its device thread, built from a
// MachineConfig. This is what msb's VMM process (`msb` in its hidden VMM mode) owns.
//
// Guest physical layout (see vmm/linux_boot.h for RAM): the devices sit in the MMIO gap below
// 4 GiB, virtio-mmio transport i at kVirtioMmioBase + i * kVirtioMmioStride raising GSI
// kVirtioFirstGsi + i, in this order: console (the agent channel), block (unless there is no
// disk), rng. The guest learns them from the DSDT or the virtio_mmio.device= arguments.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace msb::vmm {

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
  std::string cmdline;      // msb appends virtio_mmio.device=... and msb.cpus=N to it
  unsigned cpus = 1;        // vCPUs started; the VM is built for max_cpus
  unsigned max_cpus = 1;
  uint64_t memory_mib = 256;  // RAM in the e820 map
  uint64_t max_memory_mib = 256;
  std::string disk_base_path;     // read-only base image; "" for a blank disk
  std::string disk_overlay_path;  // the sandbox's writable overlay (created if missing)
  uint64_t disk_size = 0;         // bytes; with a base image, its size wins; 0 and no base:
                                  // no disk at all
  int console_log_fd = -1;        // serial output is appended here (not owned)
  int agent_fd = -1;              // a stream socket: bytes to and from the guest's console port
                                  // (not owned; msb keeps the other end)
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
  virtual ~Machine() = default;

  // Starts the vCPU threads and the device thread.
  virtual void start() = 0;
  // Blocks until the guest stops for any reason, then joins every thread.
  virtual MachineExit wait() = 0;
  // Asks the machine to stop now (as if the guest powered off). Safe from any thread.
  virtual void stop() = 0;
};

}  // namespace msb::vmm
