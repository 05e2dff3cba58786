// What msb adds to a Linux guest's kernel command line for the host it runs on.
//
// Where the host's KVM runs guest kernel-mode code emulated (nested PVM, no VMX/SVM: see
// shared/environment.md and docs/linux-guests.md), some instructions cannot be emulated at all
// and others are slow. The kernel is told not to use them, and to skip work that costs much
// emulated time for no sandbox's benefit. Hosts with hardware virtualization get nothing added.
#pragma once

#include <string>

namespace msb::core {

// The options for a host whose KVM emulates kernel mode, each for a reason given beside it in
// guest_cmdline.cpp.
std::string emulated_kernel_mode_cmdline();

// `cmdline` with what this host needs appended (nothing where the host has VMX or SVM).
// `emulated` says whether kernel mode is emulated here (host_has_hardware_virtualization()'s
// opposite), given so that tests can ask for either host.
std::string cmdline_for_host(const std::string& cmdline, bool emulated);

}  // namespace msb::core
