// Powering the machine off as PID 1: every process ended (SIGTERM, a short grace, SIGKILL),
// the filesystems synced and unmounted or made read-only, then reboot(RB_POWER_OFF).
#pragma once

namespace msb::agent {

[[noreturn]] void shutdown_machine();

}  // namespace msb::agent
