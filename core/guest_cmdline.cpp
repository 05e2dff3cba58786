#include "core/guest_cmdline.h"

#include <array>
#include <string_view>

namespace msb::core {

std::string emulated_kernel_mode_cmdline() {
  // Each option and why (measured on a nested PVM host, 2026-12):
  static constexpr std::array<std::string_view, 6> kOptions = {
      // The emulator cannot run xsave/xrstor/xgetbv: the FPU state is then saved with fxsave.
      "noxsave",
      // Instructions the emulator stops on, or features whose use at CPL0 it cannot run:
      // cmpxchg16b, popcnt, stac/clac, rd/wrfsbase, invpcid, SSSE3 (pshufb in kernel code),
      // rdtscp and rdpid (the vDSO's getcpu), rep movsb fast paths and monitor/mwait.
      "clearcpuid=cx16,popcnt,smap,fsgsbase,invpcid,ssse3,rdtscp,rdpid,erms,fsrm,monitor",
      // Speculation mitigations cost emulated instructions on every entry and exit.
      "mitigations=off",
      // Kernel text stays writable, so that text patching (static keys, alternatives) does not
      // remap pages one instruction at a time.
      "rodata=off",
      // No SMP alternatives patching when CPUs come and go.
      "noreplace-smp",
      // The serial console costs an emulated port write per character.
      "quiet",
  };
  std::string out;
  for (std::string_view option : kOptions) {
    if (!out.empty()) out += ' ';
    out += option;
  }
  return out;
}

std::string cmdline_for_host(const std::string& cmdline, bool emulated) {
  if (!emulated) return cmdline;
  std::string out = cmdline;
  if (!out.empty()) out += ' ';
  out += emulated_kernel_mode_cmdline();
  return out;
}

}  // namespace msb::core
