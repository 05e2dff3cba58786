#include "vmm/hypercall_probe.h"

#include <cpuid.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "snapstore/file_util.h"
#include "vmm/kvm.h"
#include "vmm/machine.h"
#include "vmm/vcpu.h"

namespace msb::vmm::hypercall_probe {

namespace {

constexpr size_t kPage = 4096;

// What Linux issues: vmmcall on AMD and Hygon, vmcall elsewhere (its X86_FEATURE_VMMCALL
// alternative).
bool host_is_amd() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::strcmp(vendor, "AuthenticAMD") == 0 || std::strcmp(vendor, "HygonGenuine") == 0;
}

struct Mapping {
  void* address = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (address != MAP_FAILED) ::munmap(address, size);
  }
};

}  // namespace

bool hardware_virtualization() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::istringstream flags(line.substr(colon + 1));
    std::string flag;
    while (flags >> flag) {
      if (flag == "vmx" || flag == "svm") return true;
    }
  }
  return false;
}

Outcome probe(std::chrono::milliseconds wait) {
  const int kick = kick_signal();
  const std::string what = "hypercall probe: ";
  snapstore::UniqueFd kvm_fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm_fd) throw VmmError(what + "opening /dev/kvm: " + std::strerror(errno));
  // Declared before the VM, so it is unmapped after the VM is gone.
  Mapping memory;
  memory.size = kPage;
  memory.address =
      ::mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory.address == MAP_FAILED) {
    throw VmmError(what + "mapping its memory: " + std::strerror(errno));
  }
  snapstore::UniqueFd vm(
      kvm::ioctl_or_throw(kvm_fd.get(), KVM_CREATE_VM, 0ul, what + "KVM_CREATE_VM"));
  // Real mode on Intel hosts without unrestricted guest needs the TSS pages; elsewhere KVM may
  // refuse them, which does not matter.
  ::ioctl(vm.get(), KVM_SET_TSS_ADDR, 0xfffbd000ul);

  // At 0: vmcall (or vmmcall); hlt. RAX = 0 is no hypercall KVM knows: it returns -KVM_ENOSYS.
  const uint8_t hypercall_modrm = host_is_amd() ? 0xd9 : 0xc1;
  const uint8_t code[] = {0x0f, 0x01, hypercall_modrm, 0xf4};
  std::memcpy(memory.address, code, sizeof code);
  kvm_userspace_memory_region region{};
  region.memory_size = kPage;
  region.userspace_addr = reinterpret_cast<uint64_t>(memory.address);
  kvm::ioctl_or_throw(vm.get(), KVM_SET_USER_MEMORY_REGION, &region,
                      what + "KVM_SET_USER_MEMORY_REGION");

  snapstore::UniqueFd vcpu(
      kvm::ioctl_or_throw(vm.get(), KVM_CREATE_VCPU, 0ul, what + "KVM_CREATE_VCPU"));
  const int run_size =
      kvm::ioctl_or_throw(kvm_fd.get(), KVM_GET_VCPU_MMAP_SIZE, 0ul, what + "mmap size");
  Mapping run_mapping;
  run_mapping.size = static_cast<size_t>(run_size);
  run_mapping.address =
      ::mmap(nullptr, run_mapping.size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0);
  if (run_mapping.address == MAP_FAILED) {
    throw VmmError(what + "mapping kvm_run: " + std::strerror(errno));
  }
  auto* run = static_cast<kvm_run*>(run_mapping.address);

  // Real mode at 0:0 (the vCPU starts at the reset vector f000:fff0).
  kvm_sregs sregs{};
  kvm::ioctl_or_throw(vcpu.get(), KVM_GET_SREGS, &sregs, what + "KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  kvm::ioctl_or_throw(vcpu.get(), KVM_SET_SREGS, &sregs, what + "KVM_SET_SREGS");
  kvm_regs regs{};
  regs.rflags = 2;
  kvm::ioctl_or_throw(vcpu.get(), KVM_SET_REGS, &regs, what + "KVM_SET_REGS");

  std::mutex mutex;
  std::condition_variable finished;
  bool done = false;
  int rc = 0;
  int run_errno = 0;
  std::thread runner([&] {
    sigset_t kick_set;
    sigemptyset(&kick_set);
    sigaddset(&kick_set, kick);
    ::pthread_sigmask(SIG_UNBLOCK, &kick_set, nullptr);
    const int result = ::ioctl(vcpu.get(), KVM_RUN, 0);
    const int saved_errno = errno;
    std::lock_guard lock(mutex);
    rc = result;
    run_errno = saved_errno;
    done = true;
    finished.notify_all();
  });
  bool kicked = false;
  {
    std::unique_lock lock(mutex);
    if (!finished.wait_for(lock, wait, [&] { return done; })) {
      kicked = true;
      // immediate_exit catches a kick that lands before the thread enters KVM_RUN, the signal
      // one that lands inside it; repeat until it is out.
      while (!done) {
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        ::pthread_kill(runner.native_handle(), kick);
        finished.wait_for(lock, std::chrono::milliseconds(10), [&] { return done; });
      }
    }
  }
  runner.join();

  const std::string waited = std::to_string(wait.count()) + " ms";
  if (kicked) {
    return {false, "KVM_RUN did not come back from a hypercall within " + waited};
  }
  if (rc != 0) {
    return {false, std::string("KVM_RUN failed: ") + std::strerror(run_errno)};
  }
  if (run->exit_reason == KVM_EXIT_HLT) {
    return {true, "the hypercall returned and the vCPU reached its hlt"};
  }
  return {false, "KVM_RUN came back with exit reason " + std::to_string(run->exit_reason) +
                     " instead of the hlt after the hypercall"};
}

bool hypercalls_work() {
  static const bool works = [] {
    if (hardware_virtualization()) return true;
    std::string why;
    try {
      auto outcome = probe();
      if (outcome.works) return true;
      why = outcome.detail;
    } catch (const std::exception& e) {
      why = e.what();
    }
    std::fprintf(stderr,
                 "msb vmm: hypercalls do not work on this host (%s): the guest is not offered "
                 "KVM's PV unhalt, send-IPI and sched-yield\n",
                 why.c_str());
    return false;
  }();
  return works;
}

}  // namespace msb::vmm::hypercall_probe
