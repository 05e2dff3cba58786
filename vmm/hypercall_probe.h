// Whether KVM hypercalls (`vmcall`/`vmmcall`) return on this host. On nested PVM hosts without
// VMX/SVM (shared/environment.md) they never do: KVM_RUN spins until a signal. Linux issues them
// for KVM's paravirt features PV_UNHALT, PV_SEND_IPI and PV_SCHED_YIELD, so where they hang the
// guest must not be offered those features (cpuid::for_vcpu's `hypercalls_work`).
#pragma once

#include <chrono>
#include <string>

namespace msb::vmm::hypercall_probe {

// Whether /proc/cpuinfo's flags name vmx or svm: then guest code runs natively and hypercalls
// are KVM's ordinary exits.
bool hardware_virtualization();

struct Outcome {
  bool works = false;
  std::string detail;  // what happened, for humans: "KVM_RUN came back with exit reason 5 (HLT)"
};

// Builds a one-page VM whose one vCPU runs, in real mode, the host vendor's hypercall
// instruction then `hlt`, and waits up to `wait` for KVM_RUN to come back by itself; after that
// it kicks the vCPU out with a signal and the hypercall counts as hanging. Throws VmmError when
// the VM cannot be built.
Outcome probe(std::chrono::milliseconds wait = std::chrono::milliseconds(50));

// The answer msb uses: true without probing where hardware_virtualization(); otherwise probe()'s,
// false when the probe fails. Probes at most once per process (and says once on stderr when
// hypercalls do not work).
bool hypercalls_work();

}  // namespace msb::vmm::hypercall_probe
