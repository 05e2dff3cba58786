#include "vmm/kvm.h"

#include <fcntl.h>
#include <linux/kvm.h>

#include <cerrno>
#include <cstring>

namespace msb::vmm::kvm {

int ioctl_or_throw(int fd, unsigned long request, const void* arg, const std::string& what) {
  for (;;) {
    int rc = ::ioctl(fd, request, arg);
    if (rc >= 0) return rc;
    if (errno == EINTR) continue;
    throw VmmError(what + ": " + std::strerror(errno));
  }
}

snapstore::UniqueFd open_system() {
  snapstore::UniqueFd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm) {
    throw VmmError(std::string("cannot open /dev/kvm: ") + std::strerror(errno) +
                   (errno == ENOENT ? " (KVM is not available on this host)" : ""));
  }
  int version = ioctl_or_throw(kvm.get(), KVM_GET_API_VERSION, 0ul, "KVM_GET_API_VERSION");
  if (version != KVM_API_VERSION) {
    throw VmmError("/dev/kvm speaks API version " + std::to_string(version) + ", msb needs " +
                   std::to_string(KVM_API_VERSION));
  }
  struct Needed {
    int cap;
    const char* name;
  };
  for (auto [cap, name] :
       {Needed{KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"}, Needed{KVM_CAP_PIT2, "KVM_CAP_PIT2"},
        Needed{KVM_CAP_IRQFD, "KVM_CAP_IRQFD"}, Needed{KVM_CAP_IOEVENTFD, "KVM_CAP_IOEVENTFD"},
        Needed{KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
        Needed{KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"}}) {
    if (::ioctl(kvm.get(), KVM_CHECK_EXTENSION, cap) <= 0) {
      throw VmmError(std::string("/dev/kvm lacks ") + name + ", which msb needs");
    }
  }
  return kvm;
}

}  // namespace msb::vmm::kvm
