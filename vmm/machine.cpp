// Builds and runs a microVM. The order of construction matters to KVM and is noted where it does.
#include "vmm/machine.h"

#include <linux/kvm.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

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
#include "vmm/vcpu.h"
#include "vmm/virtio/block.h"
#include "vmm/virtio/console.h"
#include "vmm/virtio/mmio.h"
#include "vmm/virtio/rng.h"

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

class MachineImpl final : public Machine {
 public:
  explicit MachineImpl(const MachineConfig& config);
  ~MachineImpl() override;

  void start() override;
  MachineExit wait() override;
  void stop() override;

 private:
  void create_vm();
  void create_memory();
  void create_vcpus();
  void create_devices();
  void add_virtio(std::unique_ptr<virtio::VirtioDevice> device);
  void load_guest();
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
  std::vector<std::unique_ptr<Interrupt>> virtio_interrupts_;
  std::vector<std::unique_ptr<virtio::VirtioMmioTransport>> transports_;
  std::vector<acpi::VirtioMmioDevice> virtio_layout_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;

  std::vector<std::thread> threads_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::condition_variable stopped_;
  std::optional<MachineExit> exit_;
};

MachineImpl::MachineImpl(const MachineConfig& config) : config_(config) {
  if (config_.cpus == 0 || config_.max_cpus < config_.cpus || config_.max_cpus > 254) {
    throw VmmError("invalid vCPU count: " + std::to_string(config_.cpus) + " of at most " +
                   std::to_string(config_.max_cpus) + " (1 to 254)");
  }
  if (config_.memory_mib < 16 || config_.max_memory_mib < config_.memory_mib) {
    throw VmmError("invalid memory size: " + std::to_string(config_.memory_mib) +
                   " MiB of at most " + std::to_string(config_.max_memory_mib) +
                   " MiB (16 MiB or more)");
  }
  create_vm();
  create_memory();
  create_vcpus();
  create_devices();
  load_guest();
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

void MachineImpl::create_memory() {
  // The VM is built for the ceiling: memory between --memory and --max-memory is mapped (and
  // costs nothing until touched) but left out of the e820 map.
  const uint64_t ram_size = config_.max_memory_mib << 20;
  void* ram = ::mmap(nullptr, ram_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (ram == MAP_FAILED) {
    throw VmmError("cannot reserve " + std::to_string(config_.max_memory_mib) +
                   " MiB of guest memory: " + std::strerror(errno));
  }
  ram_ = std::unique_ptr<std::byte, Unmap>(static_cast<std::byte*>(ram), Unmap{ram_size});
  ::madvise(ram, ram_size, MADV_MERGEABLE);
  uint64_t host_offset = 0;
  uint32_t slot = 0;
  for (const auto& range : boot::ram_ranges(ram_size)) {
    std::span<std::byte> host(ram_.get() + host_offset, range.size);
    memory_.add_region(range.start, host);
    kvm_userspace_memory_region region{};
    region.slot = slot++;
    region.guest_phys_addr = range.start;
    region.memory_size = range.size;
    region.userspace_addr = reinterpret_cast<uint64_t>(host.data());
    kvm::ioctl_or_throw(vm_.get(), KVM_SET_USER_MEMORY_REGION, &region,
                        "KVM_SET_USER_MEMORY_REGION at " + hex_address(range.start));
    host_offset += range.size;
  }
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
  for (unsigned i = 0; i < config_.max_cpus; ++i) {
    auto vcpu = std::make_unique<Vcpu>(vm_.get(), i, static_cast<size_t>(run_size));
    vcpu->configure(supported_cpuid, msrs_settable, config_.max_cpus);
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

  // The order fixes each device's address and GSI (vmm/machine.h): the guest relies on it.
  add_virtio(std::make_unique<virtio::VirtioConsole>(config_.agent_fd, loop_));
  // No base image and no size: a machine without a disk.
  if (!config_.disk_base_path.empty() || config_.disk_size > 0) {
    try {
      add_virtio(std::make_unique<virtio::VirtioBlock>(
          DiskOverlay::open(config_.disk_base_path, config_.disk_overlay_path, config_.disk_size)));
    } catch (const std::exception& e) {
      throw VmmError(std::string("disk: ") + e.what());
    }
  }
  add_virtio(std::make_unique<virtio::VirtioRng>());
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

  // Kernels built with VIRTIO_MMIO_CMDLINE_DEVICES, and msb's test guest, find the devices here
  // rather than in the DSDT.
  std::string cmdline = config_.cmdline;
  for (const auto& device : virtio_layout_) {
    if (!cmdline.empty()) cmdline += ' ';
    cmdline +=
        "virtio_mmio.device=4K@" + hex_address(device.base) + ":" + std::to_string(device.gsi);
  }
  cmdline += " msb.cpus=" + std::to_string(config_.cpus);

  boot::BootConfig boot_config;
  boot_config.cmdline = cmdline;
  boot_config.initrd = as_bytes(initrd_file);
  boot_config.ram = boot::ram_ranges(config_.memory_mib << 20);
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
        if (auto exit = vcpu->run(ports_, mmio_, stopping_)) finish(*exit);
      } catch (const std::exception& e) {
        finish(MachineExit{MachineExit::Reason::kVmmError,
                           "vCPU " + std::to_string(vcpu->index()) + ": " + e.what()});
      }
    });
  }
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
  loop_.stop();
  stopped_.notify_all();
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
  return std::make_unique<MachineImpl>(config);
}

}  // namespace msb::vmm
