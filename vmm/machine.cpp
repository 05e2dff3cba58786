// Builds and runs a microVM. The order of construction matters to KVM and is noted where it does.
#include "vmm/machine.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "vmm/acpi.h"
#include "vmm/cpuid.h"
#include "vmm/devices/acpi_sleep.h"
#include "vmm/devices/i8042.h"
#include "vmm/devices/serial.h"
#include "vmm/disk_overlay.h"
#include "vmm/event_loop.h"
#include "vmm/guest_memory.h"
#include "vmm/interrupt.h"
#include "vmm/io_bus.h"
#include "vmm/kvm.h"
#include "vmm/linux_boot.h"
#include "vmm/long_mode.h"
#include "vmm/machine_state.h"
#include "vmm/vcpu.h"
#include "vmm/vcpu_state.h"
#include "vmm/virtio/balloon.h"
#include "vmm/virtio/block.h"
#include "vmm/virtio/console.h"
#include "vmm/virtio/mmio.h"
#include "vmm/virtio/rng.h"
#include "vmm/vm_state.h"

namespace msb::vmm {

namespace {

// Addresses KVM needs for its own use on Intel hosts (the real-mode TSS and identity-map pages),
// in the MMIO gap above the IOAPIC and LAPIC, where nothing else lives.
constexpr uint64_t kTssAddress = 0xfffbd000;
constexpr uint64_t kIdentityMapAddress = 0xfffbc000;
constexpr uint64_t kAcpiTablesAddress = boot::kRsdpAddress + 0x1000;
constexpr uint32_t kSerialGsi = acpi::kSerialIrq;
constexpr uint16_t kI8042Base = 0x60;  // data at 0x60, status and command at 0x64
constexpr uint16_t kI8042Size = 5;

std::string read_whole_file(const std::string& path, const char* what) {
  try {
    return snapstore::read_file(path);
  } catch (const std::exception& e) {
    throw VmmError(std::string(what) + " " + path + ": " + e.what());
  }
}

std::span<const std::byte> as_bytes(const std::string& text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

// The deleter of guest RAM's mapping.
struct Unmap {
  uint64_t size = 0;
  void operator()(std::byte* address) const { ::munmap(address, size); }
};

// A memory slot as registered with KVM, kept to re-register it with dirty logging and to map
// its dirty log onto ram().
struct Slot {
  uint32_t slot = 0;
  uint64_t guest_address = 0;
  uint64_t size = 0;
  uint64_t host_offset = 0;  // in ram()
};

class MachineImpl final : public Machine {
 public:
  // Boots from config's kernel, or, with `state`, restores it over config.memory_path's RAM.
  MachineImpl(const MachineConfig& config, const MachineState* state);
  ~MachineImpl() override;

  void start() override;
  MachineExit wait() override;
  void stop() override;

  void pause() override;
  void resume() override;
  bool paused() const override { return paused_.load(); }
  MachineState capture() override;
  std::span<const std::byte> ram() const override {
    return {ram_.get(), static_cast<size_t>(config_.max_memory_mib << 20)};
  }
  void start_dirty_tracking() override;
  bool dirty_tracking() const override { return tracking_.load(); }
  std::vector<uint64_t> take_dirty_pages() override;
  DiskOverlay* disk() override { return block_ ? &block_->disk() : nullptr; }
  void set_balloon_target_mib(uint64_t mib) override;
  BalloonStatus balloon() const override;
  const std::string& kernel_cmdline() const override { return kernel_cmdline_; }

 private:
  // The RAM the guest's e820 map describes.
  uint64_t e820_ram_mib() const {
    return config_.balloon_holds_excess ? config_.max_memory_mib : config_.memory_mib;
  }
  void create_vm();
  void create_memory(bool from_file);
  bool register_slot(const Slot& slot, bool log_dirty);
  void create_vcpus();
  void create_devices();
  void add_virtio(std::unique_ptr<virtio::VirtioDevice> device);
  void load_guest();
  void restore_state(const MachineState& state);
  void kvm_dirty_log_failed(const std::string& why);
  void finish(MachineExit exit);

  MachineConfig config_;
  // Freed after everything that maps it (declared first, destroyed last), including when the
  // constructor throws half-way.
  std::unique_ptr<std::byte, Unmap> ram_;
  snapstore::UniqueFd kvm_;
  snapstore::UniqueFd vm_;
  GuestMemory memory_;
  IoBus ports_;
  IoBus mmio_;
  EventLoop loop_;

  Interrupt serial_interrupt_;
  std::unique_ptr<Serial> serial_;
  std::unique_ptr<I8042> i8042_;
  std::unique_ptr<AcpiSleep> acpi_sleep_;  // stateless: not in MachineState
  std::vector<std::unique_ptr<Interrupt>> virtio_interrupts_;
  std::vector<std::unique_ptr<virtio::VirtioMmioTransport>> transports_;
  std::vector<acpi::VirtioMmioDevice> virtio_layout_;
  std::string kernel_cmdline_;  // what load_guest() gave the kernel
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  std::vector<uint32_t> msr_indexes_;  // what capture() saves of each vCPU
  // The devices, typed, for their own state (owned by transports_).
  virtio::VirtioConsole* console_ = nullptr;
  virtio::VirtioBlock* block_ = nullptr;
  virtio::VirtioRng* rng_ = nullptr;
  virtio::VirtioBalloon* balloon_ = nullptr;
  bool restored_ = false;

  // Dirty tracking: KVM's log per slot, and the pages the VMM writes (GuestMemory marks them).
  std::vector<Slot> slots_;
  DirtyBitmap vmm_dirty_;
  std::mutex dirty_mutex_;
  std::atomic<bool> tracking_{false};
  bool kvm_dirty_log_ = true;  // false: KVM refused, every page counts as dirty

  std::vector<std::thread> threads_;
  std::atomic<bool> stopping_{false};
  PauseGate gate_;
  std::mutex pause_mutex_;  // serializes pause() and resume()
  std::atomic<bool> paused_{false};
  std::mutex mutex_;
  std::condition_variable stopped_;
  std::optional<MachineExit> exit_;
};

MachineImpl::MachineImpl(const MachineConfig& config, const MachineState* state) : config_(config) {
  if (config_.cpus == 0 || config_.max_cpus < config_.cpus || config_.max_cpus > 254) {
    throw VmmError("invalid vCPU count: " + std::to_string(config_.cpus) + " of at most " +
                   std::to_string(config_.max_cpus) + " (1 to 254)");
  }
  if (config_.memory_mib < 16 || config_.max_memory_mib < config_.memory_mib) {
    throw VmmError("invalid memory size: " + std::to_string(config_.memory_mib) +
                   " MiB of at most " + std::to_string(config_.max_memory_mib) +
                   " MiB (16 MiB or more)");
  }
  if (state) {
    // The state says what machine it was captured from; a restore builds that machine.
    auto mismatch = [](const char* what, uint64_t config, uint64_t saved) {
      return VmmError("snapshot state: " + std::string(what) + " is " + std::to_string(saved) +
                      " in the snapshot but " + std::to_string(config) + " in the config");
    };
    if (config_.cpus != state->cpus) throw mismatch("cpus", config_.cpus, state->cpus);
    if (config_.max_cpus != state->max_cpus) {
      throw mismatch("max_cpus", config_.max_cpus, state->max_cpus);
    }
    if (config_.memory_mib != state->memory_mib) {
      throw mismatch("memory_mib", config_.memory_mib, state->memory_mib);
    }
    if (config_.max_memory_mib != state->max_memory_mib) {
      throw mismatch("max_memory_mib", config_.max_memory_mib, state->max_memory_mib);
    }
    if (state->vcpus.size() != config_.max_cpus) {
      throw VmmError("snapshot state: " + std::to_string(state->vcpus.size()) +
                     " vCPUs saved for max_cpus " + std::to_string(config_.max_cpus));
    }
  }
  // The order below is KVM's, for a restore as for a boot (see create_vm and restore_state).
  create_vm();
  create_memory(state != nullptr);
  create_vcpus();
  create_devices();
  if (state) {
    restore_state(*state);
  } else {
    load_guest();
    // The balloon holds what is above --memory from the start; the driver inflates as it loads.
    if (config_.balloon_holds_excess) set_balloon_target_mib(config_.memory_mib);
  }
}

MachineImpl::~MachineImpl() {
  if (!threads_.empty()) {
    stop();
    for (auto& thread : threads_)
      thread.join();
  }
  // The vCPUs and the VM go before the memory they map.
  vcpus_.clear();
  transports_.clear();
  vm_.reset();
}

void MachineImpl::create_vm() {
  kvm_ = kvm::open_system();
  vm_.reset(kvm::ioctl_or_throw(kvm_.get(), KVM_CREATE_VM, 0ul, "KVM_CREATE_VM"));
  kvm::ioctl_or_throw(vm_.get(), KVM_SET_TSS_ADDR, kTssAddress, "KVM_SET_TSS_ADDR");
  uint64_t identity_map = kIdentityMapAddress;
  kvm::ioctl_or_throw(vm_.get(), KVM_SET_IDENTITY_MAP_ADDR, &identity_map,
                      "KVM_SET_IDENTITY_MAP_ADDR");
  // The irqchip comes before the memory slots: slots registered first make closing the VM block
  // for ~15 ms on this kind of host (shared/environment.md), and before the vCPUs, which KVM
  // requires so that each vCPU gets an in-kernel LAPIC.
  kvm::ioctl_or_throw(vm_.get(), KVM_CREATE_IRQCHIP, 0ul, "KVM_CREATE_IRQCHIP");
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;
  kvm::ioctl_or_throw(vm_.get(), KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");
}

void MachineImpl::create_memory(bool from_file) {
  // The VM is built for the ceiling: memory between --memory and --max-memory is mapped (and
  // costs nothing until touched) but left out of the e820 map.
  const uint64_t ram_size = config_.max_memory_mib << 20;
  void* ram = MAP_FAILED;
  if (!from_file) {
    ram = ::mmap(nullptr, ram_size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) {
      throw VmmError("cannot reserve " + std::to_string(config_.max_memory_mib) +
                     " MiB of guest memory: " + std::strerror(errno));
    }
  } else {
    // A restore: the snapshot's RAM file, mapped private. Pages the guest only reads stay the
    // page cache's, shared by every machine restored from the file; a write copies the page
    // (MAP_NORESERVE: without charging the whole size up front). The file never changes.
    snapstore::UniqueFd file(::open(config_.memory_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!file) {
      throw VmmError("memory file " + config_.memory_path + ": " + std::strerror(errno));
    }
    struct stat info {};
    if (::fstat(file.get(), &info) != 0) {
      throw VmmError("memory file " + config_.memory_path + ": " + std::strerror(errno));
    }
    if (!S_ISREG(info.st_mode) || static_cast<uint64_t>(info.st_size) != ram_size) {
      throw VmmError("memory file " + config_.memory_path + ": " + std::to_string(info.st_size) +
                     " bytes, not the " + std::to_string(config_.max_memory_mib) +
                     " MiB of max_memory");
    }
    ram = ::mmap(nullptr, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, file.get(),
                 0);
    if (ram == MAP_FAILED) {
      throw VmmError("memory file " + config_.memory_path + ": mmap: " + std::strerror(errno));
    }
  }
  ram_ = std::unique_ptr<std::byte, Unmap>(static_cast<std::byte*>(ram), Unmap{ram_size});
  // KSM merges anonymous memory only; file-backed RAM is shared through the page cache already.
  if (!from_file) ::madvise(ram, ram_size, MADV_MERGEABLE);
  vmm_dirty_.reset(ram_size / kPageSize);
  memory_.track_writes(&vmm_dirty_, ram_.get());
  uint64_t host_offset = 0;
  uint32_t slot = 0;
  for (const auto& range : boot::ram_ranges(ram_size)) {
    std::span<std::byte> host(ram_.get() + host_offset, range.size);
    memory_.add_region(range.start, host);
    slots_.push_back({slot++, range.start, range.size, host_offset});
    host_offset += range.size;
  }
  // A restored machine tracks dirty pages from its first instruction: a snapshot of it then
  // needs only what changed since the RAM file (an incremental snapshot).
  bool log_dirty = from_file;
  for (const Slot& s : slots_) {
    if (!register_slot(s, log_dirty)) {
      log_dirty = false;
      kvm_dirty_log_failed("KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES: " +
                           std::string(std::strerror(errno)));
      if (!register_slot(s, false)) {
        throw VmmError("KVM_SET_USER_MEMORY_REGION at " + hex_address(s.guest_address) + ": " +
                       std::strerror(errno));
      }
    }
  }
  if (from_file) {
    vmm_dirty_.enable();
    tracking_.store(true);
  }
}

bool MachineImpl::register_slot(const Slot& s, bool log_dirty) {
  kvm_userspace_memory_region region{};
  region.slot = s.slot;
  region.flags = log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = s.guest_address;
  region.memory_size = s.size;
  region.userspace_addr = reinterpret_cast<uint64_t>(ram_.get() + s.host_offset);
  return ::ioctl(vm_.get(), KVM_SET_USER_MEMORY_REGION, &region) == 0;
}

void MachineImpl::kvm_dirty_log_failed(const std::string& why) {
  // Correctness first: without KVM's log, every page counts as written.
  if (kvm_dirty_log_) {
    std::fprintf(stderr, "msb vmm: dirty logging unavailable (%s): every page counts as dirty\n",
                 why.c_str());
  }
  kvm_dirty_log_ = false;
}

void MachineImpl::create_vcpus() {
  int run_size =
      kvm::ioctl_or_throw(kvm_.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, "KVM_GET_VCPU_MMAP_SIZE");
  std::string why_no_cpuid;
  auto supported_cpuid = cpuid::supported(kvm_.get(), why_no_cpuid);
  if (!supported_cpuid) {
    std::fprintf(stderr, "msb vmm: the guest sees the host's CPUID: %s\n", why_no_cpuid.c_str());
  }
  // A KVM without an MSR index list (nested PVM) accepts no MSRs from userspace at all; the
  // guest then starts with the MSRs KVM chose.
  kvm::MsrIndexList<1> probe{};  // nmsrs 0: E2BIG where the list exists
  const bool msrs_settable =
      ::ioctl(kvm_.get(), kvm::kGetMsrIndexList, &probe) == 0 || errno == E2BIG;
  if (!msrs_settable) {
    std::fprintf(stderr, "msb vmm: KVM_GET_MSR_INDEX_LIST: %s: boot MSRs left as KVM set them\n",
                 std::strerror(errno));
  }
  // What capture() saves of each vCPU: KVM's MSR index list, where there is one.
  if (msrs_settable) {
    try {
      msr_indexes_ = saved_msr_indexes(kvm_.get());
    } catch (const VmmError& e) {
      std::fprintf(stderr, "msb vmm: snapshots will save no MSRs: %s\n", e.what());
    }
  }
  for (unsigned i = 0; i < config_.max_cpus; ++i) {
    auto vcpu = std::make_unique<Vcpu>(vm_.get(), i, static_cast<size_t>(run_size));
    vcpu->configure(supported_cpuid, msrs_settable, config_.max_cpus);
    vcpu->set_guest_memory(&memory_);
    vcpus_.push_back(std::move(vcpu));
  }
}

void MachineImpl::create_devices() {
  kvm_irqfd serial_irqfd{};
  serial_irqfd.fd = static_cast<uint32_t>(serial_interrupt_.fd());
  serial_irqfd.gsi = kSerialGsi;
  kvm::ioctl_or_throw(vm_.get(), KVM_IRQFD, &serial_irqfd, "KVM_IRQFD for the serial port");
  serial_ = std::make_unique<Serial>(config_.console_log_fd, serial_interrupt_);
  ports_.add(acpi::kSerialPort, 8, serial_.get(), "serial port COM1");
  i8042_ = std::make_unique<I8042>([this] {
    finish(MachineExit{MachineExit::Reason::kPoweredOff, "the guest reset through the i8042"});
  });
  ports_.add(kI8042Base, kI8042Size, i8042_.get(), "i8042");
  // Linux's poweroff: S5 through the FADT's sleep control register.
  acpi_sleep_ = std::make_unique<AcpiSleep>([this] {
    finish(MachineExit{MachineExit::Reason::kPoweredOff, "the guest powered off through ACPI S5"});
  });
  ports_.add(kAcpiSleepBase, kAcpiSleepPorts, acpi_sleep_.get(), "ACPI sleep registers");

  // The order fixes each device's address and GSI (vmm/machine.h): the guest relies on it.
  auto console = std::make_unique<virtio::VirtioConsole>(config_.agent_fd, loop_);
  console_ = console.get();
  add_virtio(std::move(console));
  // No base image and no size: a machine without a disk.
  if (!config_.disk_base_path.empty() || config_.disk_size > 0) {
    std::unique_ptr<virtio::VirtioBlock> block;
    try {
      block = std::make_unique<virtio::VirtioBlock>(
          DiskOverlay::open(config_.disk_base_path, config_.disk_overlay_path, config_.disk_size,
                            config_.disk_layer_path));
    } catch (const std::exception& e) {
      throw VmmError(std::string("disk: ") + e.what());
    }
    block_ = block.get();
    add_virtio(std::move(block));
  }
  auto rng = std::make_unique<virtio::VirtioRng>();
  rng_ = rng.get();
  add_virtio(std::move(rng));
  // Last, so that the devices before it keep the addresses and GSIs they had without it.
  auto balloon = std::make_unique<virtio::VirtioBalloon>();
  balloon_ = balloon.get();
  add_virtio(std::move(balloon));
}

void MachineImpl::add_virtio(std::unique_ptr<virtio::VirtioDevice> device) {
  const size_t index = transports_.size();
  const uint64_t base = kVirtioMmioBase + index * kVirtioMmioStride;
  const uint32_t gsi = kVirtioFirstGsi + static_cast<uint32_t>(index);
  const std::string name = device->name();
  auto interrupt = std::make_unique<Interrupt>();
  kvm_irqfd irqfd{};
  irqfd.fd = static_cast<uint32_t>(interrupt->fd());
  irqfd.gsi = gsi;
  kvm::ioctl_or_throw(vm_.get(), KVM_IRQFD, &irqfd, "KVM_IRQFD for " + name);
  auto transport =
      std::make_unique<virtio::VirtioMmioTransport>(std::move(device), memory_, loop_, *interrupt);
  // Queue notifications become eventfd signals inside KVM, handled by the device thread, so a
  // guest's kick costs no exit to this process's vCPU threads.
  for (const auto& notify : transport->notify_eventfds()) {
    kvm_ioeventfd ioeventfd{};
    ioeventfd.addr = base + notify.offset;
    ioeventfd.len = 4;
    ioeventfd.datamatch = notify.datamatch;
    ioeventfd.fd = notify.fd;
    ioeventfd.flags = KVM_IOEVENTFD_FLAG_DATAMATCH;
    kvm::ioctl_or_throw(vm_.get(), KVM_IOEVENTFD, &ioeventfd,
                        "KVM_IOEVENTFD for " + name + " queue " + std::to_string(notify.datamatch));
  }
  mmio_.add(base, kVirtioMmioStride, transport.get(), name);
  virtio_layout_.push_back({base, static_cast<uint32_t>(kVirtioMmioStride), gsi});
  virtio_interrupts_.push_back(std::move(interrupt));
  transports_.push_back(std::move(transport));
}

void MachineImpl::load_guest() {
  const std::string kernel_file = read_whole_file(config_.kernel_path, "kernel");
  std::string initrd_file;
  if (!config_.initrd_path.empty()) initrd_file = read_whole_file(config_.initrd_path, "initrd");

  boot::KernelImage kernel;
  try {
    kernel = boot::load_kernel(memory_, as_bytes(kernel_file));
  } catch (const boot::BootError& e) {
    throw VmmError("kernel " + config_.kernel_path + ": " + e.what());
  }

  acpi::Config tables;
  tables.cpus = config_.max_cpus;
  tables.virtio = virtio_layout_;
  try {
    acpi::write_tables(memory_, tables, boot::kRsdpAddress, kAcpiTablesAddress);
  } catch (const std::exception& e) {
    throw VmmError(std::string("ACPI tables: ") + e.what());
  }

  const std::string cmdline = boot_cmdline(config_, virtio_layout_);
  kernel_cmdline_ = cmdline;

  boot::BootConfig boot_config;
  boot_config.cmdline = cmdline;
  boot_config.initrd = as_bytes(initrd_file);
  boot_config.ram = boot::ram_ranges(e820_ram_mib() << 20);
  boot::BootInfo info;
  try {
    info = boot::write_boot_params(memory_, kernel, boot_config);
    long_mode::write_tables(memory_);
  } catch (const std::exception& e) {
    throw VmmError("kernel " + config_.kernel_path + ": " + e.what());
  }
  vcpus_.front()->set_boot_registers(info.entry, info.zero_page);
}

void MachineImpl::start() {
  // Counted before the threads exist, so that a pause() from now on waits for them to park.
  for (size_t i = 0; i < vcpus_.size(); ++i)
    gate_.enter();
  if (restored_) {
    // Queued before the device thread runs: its first round looks at every queue and re-raises
    // pending interrupts (see resume_after_restore).
    for (auto& transport : transports_)
      transport->resume_after_restore();
  }
  threads_.emplace_back([this] {
    try {
      loop_.run();
    } catch (const std::exception& e) {
      finish(
          MachineExit{MachineExit::Reason::kVmmError, std::string("device thread: ") + e.what()});
    }
  });
  for (auto& vcpu : vcpus_) {
    threads_.emplace_back([this, vcpu = vcpu.get()] {
      try {
        if (auto exit = vcpu->run(ports_, mmio_, stopping_, &gate_)) finish(*exit);
      } catch (const std::exception& e) {
        finish(MachineExit{MachineExit::Reason::kVmmError,
                           "vCPU " + std::to_string(vcpu->index()) + ": " + e.what()});
      }
      gate_.leave();
    });
  }
  // Started while paused: the vCPU threads park before running any guest code (pause() set
  // their immediate_exit); wait for that, so that the machine is as paused as pause() leaves it.
  if (paused_.load()) gate_.wait_parked(stopping_);
}

void MachineImpl::finish(MachineExit exit) {
  {
    std::lock_guard lock(mutex_);
    if (exit_) return;
    exit_ = std::move(exit);
    stopping_.store(true);
  }
  for (auto& vcpu : vcpus_)
    vcpu->kick();
  // Parked vCPU threads and a parked device thread see the stop too.
  gate_.wake();
  loop_.stop();
  stopped_.notify_all();
}

void MachineImpl::pause() {
  std::lock_guard lock(pause_mutex_);
  if (paused_.load()) return;
  // vCPUs first: a vCPU thread may be half-way through an MMIO exit that queues device work
  // (a QueueNotify without ioeventfd); the device thread, paused second, then finishes it.
  gate_.request();
  for (auto& vcpu : vcpus_)
    vcpu->kick();
  gate_.wait_parked(stopping_);
  loop_.pause();
  paused_.store(true);
}

void MachineImpl::resume() {
  std::lock_guard lock(pause_mutex_);
  if (!paused_.load()) return;
  // The guest's kvmclock jumped by the pause; KVM_KVMCLOCK_CTRL tells a kvmclock guest so (its
  // soft-lockup watchdog then stays quiet). Done while the vCPUs are parked, out of KVM_RUN.
  for (auto& vcpu : vcpus_) {
    const int error = vcpu->kvmclock_ctrl();
    // EINVAL: this guest has not turned kvmclock on (the test guest); nothing to tell.
    if (error != 0 && error != EINVAL) {
      static std::once_flag once;
      std::call_once(once, [&] {
        std::fprintf(stderr, "msb vmm: KVM_KVMCLOCK_CTRL: %s\n", std::strerror(error));
      });
    }
  }
  // The device thread first, so that the vCPUs' first notifications find it running.
  loop_.resume();
  gate_.release();
  paused_.store(false);
}

MachineState MachineImpl::capture() {
  std::lock_guard lock(pause_mutex_);
  if (!paused_.load()) throw VmmError("capture: the machine is not paused");
  MachineState state;
  state.cpus = config_.cpus;
  state.max_cpus = config_.max_cpus;
  state.memory_mib = config_.memory_mib;
  state.max_memory_mib = config_.max_memory_mib;
  state.has_disk = block_ != nullptr;
  state.disk_size = block_ ? block_->disk().size() : 0;
  if (block_) {
    // The overlay's map reaches its file only at a flush: flush, so that the files a snapshot
    // reads (or a restored machine opens as its layer) name every block written so far.
    try {
      block_->disk().flush();
    } catch (const std::exception& e) {
      throw VmmError(std::string("capture: flushing the disk: ") + e.what());
    }
  }
  // Every vCPU thread is parked out of KVM_RUN with nothing pending, so these ioctls (from this
  // thread) see whole states.
  for (auto& vcpu : vcpus_)
    state.vcpus.push_back(capture_vcpu(kvm_.get(), vcpu->fd(), msr_indexes_));
  state.vm = capture_vm(vm_.get());
  state.serial = serial_->save();
  state.i8042 = i8042_->save();
  for (auto& transport : transports_) {
    VirtioDeviceState device;
    device.name = transport->device().name();
    device.mmio = transport->save();
    device.queues = transport->save_queues();
    device.interrupt_status = transport->interrupt_status();
    device.config_generation = transport->config_generation();
    virtio::VirtioDevice* raw = &transport->device();
    if (raw == console_) {
      device.device = console_state_to_json(console_->save());
    } else if (raw == block_) {
      device.device = block_state_to_json(block_->state());
    } else if (raw == rng_) {
      device.device = rng_state_to_json(rng_->state());
    } else if (raw == balloon_) {
      device.device = balloon_state_to_json(balloon_->state());
    }
    state.virtio.push_back(std::move(device));
  }
  return state;
}

void MachineImpl::restore_state(const MachineState& state) {
  restored_ = true;
  // The disk is the config's (base, the snapshot's layer, a fresh overlay); it must be the
  // disk the state's virtio-blk was driving.
  if (state.has_disk != (block_ != nullptr)) {
    throw VmmError(std::string("snapshot state: the snapshot ") +
                   (state.has_disk ? "has a disk but the config has none"
                                   : "has no disk but the config has one"));
  }
  if (block_ && block_->disk().size() != state.disk_size) {
    throw VmmError("snapshot state: disk_size is " + std::to_string(state.disk_size) +
                   " in the snapshot but the disk is " + std::to_string(block_->disk().size()) +
                   " bytes");
  }
  if (state.virtio.size() != transports_.size()) {
    throw VmmError("snapshot state: " + std::to_string(state.virtio.size()) +
                   " virtio devices saved, the machine has " + std::to_string(transports_.size()));
  }
  for (size_t i = 0; i < transports_.size(); ++i) {
    if (state.virtio[i].name != transports_[i]->device().name()) {
      throw VmmError("snapshot state: virtio device " + std::to_string(i) + " is \"" +
                     state.virtio[i].name + "\" in the snapshot but \"" +
                     transports_[i]->device().name() + "\" here");
    }
  }

  // KVM's order. The irqchip and PIT exist (create_vm) and the vCPUs have their CPUID
  // (create_vcpus: KVM checks restored XSAVE features and MSRs against it). Then:
  // 1. the VM: PIT and kvmclock, then the PICs and IOAPIC (vm_state.cpp), before any vCPU, since
  //    a LAPIC's restored state may hold interrupts the IOAPIC routed;
  restore_vm(vm_.get(), state.vm);
  // 2. each vCPU (vcpu_state.cpp's order: MP state, registers, ..., the TSC deadline, events);
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    try {
      restore_vcpu(vcpus_[i]->fd(), state.vcpus[i]);
    } catch (const VmmError& e) {
      throw VmmError("snapshot state: vCPU " + std::to_string(i) + ": " + e.what());
    }
    // The guest's clock jumped between capture and now: as after a pause (see resume()).
    vcpus_[i]->kvmclock_ctrl();
  }
  // 3. the port devices (their state is plain registers; Serial and I8042 bound their buffers);
  serial_->restore(state.serial);
  i8042_->restore(state.i8042);
  // 4. each virtio device: its own state first (the console's pending output must be there
  //    when activation starts watching the socket), then the transport, which validates
  //    everything against guest memory and what it offers and re-activates the device.
  for (size_t i = 0; i < transports_.size(); ++i) {
    const VirtioDeviceState& saved = state.virtio[i];
    virtio::VirtioDevice* raw = &transports_[i]->device();
    try {
      const nlohmann::json& device = saved.device;
      if (raw == console_) {
        console_->restore(console_state_from_json(device));
      } else if (raw == block_) {
        block_->restore(block_state_from_json(device));
      } else if (raw == rng_) {
        rng_->restore(rng_state_from_json(device));
      } else if (raw == balloon_) {
        const virtio::BalloonState balloon = balloon_state_from_json(device);
        // A target beyond the guest's RAM would have its driver chase pages it cannot have.
        const uint64_t ram_pages = (e820_ram_mib() << 20) / virtio::VirtioBalloon::kPageSize;
        if (balloon.num_pages > ram_pages) {
          throw std::invalid_argument("num_pages " + std::to_string(balloon.num_pages) +
                                      " is more than the " + std::to_string(ram_pages) +
                                      " pages of RAM");
        }
        balloon_->restore(balloon);
      }
      transports_[i]->restore(saved.mmio, saved.queues, saved.interrupt_status,
                              saved.config_generation);
    } catch (const VmmError&) {
      throw;
    } catch (const std::exception& e) {
      throw VmmError("snapshot state: " + saved.name + ": " + e.what());
    }
  }
}

void MachineImpl::start_dirty_tracking() {
  std::lock_guard lock(dirty_mutex_);
  if (tracking_.load()) return;
  // KVM logs writes per slot once the slot is registered again with KVM_MEM_LOG_DIRTY_PAGES
  // (KVM then write-protects its pages and records each first write). That misses what this
  // process writes through its own mapping (device work), hence the VMM's bitmap beside it.
  vmm_dirty_.enable();
  if (kvm_dirty_log_) {
    for (const Slot& s : slots_) {
      if (!register_slot(s, true)) {
        kvm_dirty_log_failed("KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES: " +
                             std::string(std::strerror(errno)));
        break;
      }
    }
  }
  tracking_.store(true);
}

std::vector<uint64_t> MachineImpl::take_dirty_pages() {
  std::lock_guard lock(dirty_mutex_);
  if (!paused_.load()) throw VmmError("take_dirty_pages: the machine is not paused");
  if (!tracking_.load()) throw VmmError("take_dirty_pages: dirty tracking is off");
  const uint64_t pages = (config_.max_memory_mib << 20) / kPageSize;
  std::vector<uint64_t> dirty(bitmap_words(pages));
  if (kvm_dirty_log_) {
    std::vector<uint64_t> slot_bitmap;
    for (const Slot& s : slots_) {
      // KVM_GET_DIRTY_LOG copies the slot's log (one bit per page, in longs) and clears it.
      const uint64_t slot_pages = s.size / kPageSize;
      slot_bitmap.assign(bitmap_words(slot_pages), 0);
      kvm_dirty_log log{};
      log.slot = s.slot;
      log.dirty_bitmap = slot_bitmap.data();
      if (::ioctl(vm_.get(), KVM_GET_DIRTY_LOG, &log) != 0) {
        kvm_dirty_log_failed("KVM_GET_DIRTY_LOG: " + std::string(std::strerror(errno)));
        break;
      }
      bitmap_or(dirty, s.host_offset / kPageSize, slot_bitmap, slot_pages);
    }
  }
  if (!kvm_dirty_log_) bitmap_set(dirty, 0, pages);
  const std::vector<uint64_t> vmm = vmm_dirty_.take();
  for (size_t i = 0; i < dirty.size(); ++i)
    dirty[i] |= vmm[i];
  return dirty;
}

void MachineImpl::set_balloon_target_mib(uint64_t mib) {
  const uint64_t ram_mib = e820_ram_mib();
  const uint64_t balloon_mib = mib >= ram_mib ? 0 : ram_mib - mib;
  // memory_mib is at most 1 TiB (2^28 pages), so the page count fits the 32-bit field.
  balloon_->set_target_pages(
      static_cast<uint32_t>(balloon_mib * (1024 * 1024 / virtio::VirtioBalloon::kPageSize)));
}

BalloonStatus MachineImpl::balloon() const {
  const virtio::BalloonState state = balloon_->state();
  return {state.num_pages, state.actual, e820_ram_mib()};
}

void MachineImpl::stop() {
  finish(MachineExit{MachineExit::Reason::kPoweredOff, "stopped by msb"});
}

MachineExit MachineImpl::wait() {
  {
    std::unique_lock lock(mutex_);
    stopped_.wait(lock, [this] { return exit_.has_value(); });
  }
  for (auto& thread : threads_)
    thread.join();
  threads_.clear();
  return *exit_;
}

}  // namespace

std::unique_ptr<Machine> Machine::create(const MachineConfig& config) {
  return std::make_unique<MachineImpl>(config, nullptr);
}

std::unique_ptr<Machine> Machine::restore(const MachineConfig& config, const MachineState& state) {
  return std::make_unique<MachineImpl>(config, &state);
}

std::string boot_cmdline(const MachineConfig& config,
                         std::span<const acpi::VirtioMmioDevice> virtio) {
  // Kernels built with VIRTIO_MMIO_CMDLINE_DEVICES, and msb's test guest, find the devices here
  // rather than in the DSDT.
  std::string cmdline = config.cmdline;
  for (const auto& device : virtio) {
    if (!config.virtio_on_cmdline) break;
    if (!cmdline.empty()) cmdline += ' ';
    cmdline +=
        "virtio_mmio.device=4K@" + hex_address(device.base) + ":" + std::to_string(device.gsi);
  }
  cmdline += " msb.cpus=" + std::to_string(config.cpus);
  return cmdline;
}

}  // namespace msb::vmm
