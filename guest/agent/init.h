// PID 1's setup: the pseudo filesystems, the kernel modules the initramfs carries, the root
// disk and the switch into it, the hostname.
#pragma once

#include <string>
#include <vector>

namespace msb::agent {

// What the kernel command line asks of the agent.
struct BootOptions {
  std::string root = "/dev/vda";  // msb.root=; "none" for no root disk
  std::string rootfstype;         // msb.rootfstype=; "" for ext4
  std::string hostname;           // msb.hostname=; "" to leave it
  // msb.port=NAME: serve the virtio-serial port named NAME (/sys/class/virtio-ports/*/name)
  // instead of the console port /dev/hvc0. QEMU drops what a console port writes while the
  // host is not reading (its virtconsole has no backpressure), a named port waits instead.
  std::string port;
};

// Parses a kernel command line (the text of /proc/cmdline).
BootOptions parse_cmdline(const std::string& cmdline);

// Everything PID 1 does before it serves the host: mounts proc, sys, dev, devpts; loads the
// modules listed in /lib/modules/$(uname -r)/modules.dep (none where there is no such file, as
// for a kernel with everything built in); mounts the root disk and switches into
// it (or stays on the initramfs without one); mounts /run and /tmp; sets the hostname; brings up
// the loopback interface. Failures are logged, never fatal. Returns the command line's options.
BootOptions init_system();

// The order to load the modules of a modules.dep file in (paths as the file names them): each
// module after its dependencies, each once, in the file's order otherwise.
std::vector<std::string> module_load_order(const std::string& modules_dep);

}  // namespace msb::agent
