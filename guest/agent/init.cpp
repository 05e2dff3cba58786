#include "guest/agent/init.h"

#include <dirent.h>
#include <fcntl.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "guest/agent/log.h"
#include "guest/agent/util.h"

namespace msb::agent {
namespace {

void mount_or_log(const char* source, const char* target, const char* type, unsigned long flags,
                  const char* data) {
  ::mkdir(target, 0755);
  if (::mount(source, target, type, flags, data) != 0 && errno != EBUSY) {
    log_errno(std::string("cannot mount ") + type + " on " + target);
  }
}

void mount_early() {
  mount_or_log("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  mount_or_log("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  mount_or_log("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
}

// Descriptors 0-2 must be taken, so that pipes never land there (the kernel leaves them closed
// when the initramfs has no /dev/console).
void fill_stdio() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) >= 0) continue;
    int opened = ::open("/dev/null", O_RDWR);
    if (opened >= 0 && opened != fd) {
      ::dup2(opened, fd);
      ::close(opened);
    }
  }
}

// What needs /dev and /proc in the final root: devpts, /dev/shm, the /dev/fd links, /run, /tmp.
void mount_late() {
  mount_or_log("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
               "gid=5,mode=0620,ptmxmode=0666");
  mount_or_log("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
  (void)!::symlink("/proc/self/fd", "/dev/fd");
  (void)!::symlink("/proc/self/fd/0", "/dev/stdin");
  (void)!::symlink("/proc/self/fd/1", "/dev/stdout");
  (void)!::symlink("/proc/self/fd/2", "/dev/stderr");
  mount_or_log("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
  mount_or_log("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
}

// A kernel with everything built in (msb's own) comes with an initramfs without lib/modules:
// no modules.dep (or an empty one) means nothing to load, and nothing to log.
void load_modules() {
  utsname uts{};
  ::uname(&uts);
  const std::string dir = std::string("/lib/modules/") + uts.release;
  std::string dep_text;
  if (!read_file(dir + "/modules.dep", dep_text)) {
    if (errno != ENOENT) log_errno("cannot read " + dir + "/modules.dep");
    return;
  }
  for (const auto& path : module_load_order(dep_text)) {
    std::string name = path.substr(path.rfind('/') + 1);
    name = name.substr(0, name.find('.'));
    int fd = ::open((dir + "/" + path).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      log_errno("module " + name);
      continue;
    }
    // EEXIST: built in, or loaded already.
    if (::syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) {
      log_errno("cannot load module " + name);
    }
    ::close(fd);
  }
}

bool wait_for_path(const std::string& path, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  struct stat st;
  while (::stat(path.c_str(), &st) != 0) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Removes what the initramfs holds (it is RAM), staying on its filesystem: the mounts moved
// into the new root and the new root itself are other filesystems.
void remove_tree(int dir_fd, dev_t dev) {
  DIR* dir = ::fdopendir(dir_fd);
  if (!dir) {
    ::close(dir_fd);
    return;
  }
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name == "." || name == "..") continue;
    struct stat st;
    if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || st.st_dev != dev) {
      continue;
    }
    if (S_ISDIR(st.st_mode)) {
      int child = ::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (child >= 0) remove_tree(child, dev);
      ::unlinkat(dir_fd, name.c_str(), AT_REMOVEDIR);
    } else {
      ::unlinkat(dir_fd, name.c_str(), 0);
    }
  }
  ::closedir(dir);
}

// Mounts the root disk on /newroot and makes it / (what switch_root does). False if it stays on
// the initramfs.
bool switch_root(const BootOptions& options) {
  if (options.root.empty() || options.root == "none") return false;
  if (!wait_for_path(options.root, std::chrono::seconds(5))) {
    log_line("the root disk " + options.root + " did not appear; staying on the initramfs");
    return false;
  }
  const char* newroot = "/newroot";
  ::mkdir(newroot, 0755);
  std::string type = options.rootfstype.empty() ? "ext4" : options.rootfstype;
  if (::mount(options.root.c_str(), newroot, type.c_str(), 0, nullptr) != 0) {
    log_errno("cannot mount " + options.root + " (" + type + "); staying on the initramfs");
    return false;
  }
  for (const char* mount_point : {"/dev", "/proc", "/sys"}) {
    std::string target = std::string(newroot) + mount_point;
    ::mkdir(target.c_str(), 0755);
    if (::mount(mount_point, target.c_str(), nullptr, MS_MOVE, nullptr) != 0) {
      log_errno(std::string("cannot move ") + mount_point + " into the root");
      ::umount2(mount_point, MNT_DETACH);
    }
  }
  struct stat root_st;
  if (::stat("/", &root_st) == 0) {
    int fd = ::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) remove_tree(fd, root_st.st_dev);
  }
  if (::chdir(newroot) != 0 || ::mount(newroot, "/", nullptr, MS_MOVE, nullptr) != 0 ||
      ::chroot(".") != 0 || ::chdir("/") != 0) {
    log_errno("cannot switch to the root disk");
    return false;
  }
  return true;
}

void loopback_up() {
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  ifreq request{};
  std::strncpy(request.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(fd, SIOCGIFFLAGS, &request) == 0) {
    request.ifr_flags |= IFF_UP;
    if (::ioctl(fd, SIOCSIFFLAGS, &request) != 0) log_errno("cannot bring up lo");
  }
  ::close(fd);
}

}  // namespace

BootOptions parse_cmdline(const std::string& cmdline) {
  BootOptions options;
  std::istringstream words(cmdline);
  std::string word;
  while (words >> word) {
    auto value_of = [&](std::string_view key) -> const char* {
      return word.compare(0, key.size(), key) == 0 ? word.c_str() + key.size() : nullptr;
    };
    if (const char* v = value_of("msb.root=")) options.root = v;
    if (const char* v = value_of("msb.rootfstype=")) options.rootfstype = v;
    if (const char* v = value_of("msb.hostname=")) options.hostname = v;
    if (const char* v = value_of("msb.port=")) options.port = v;
  }
  return options;
}

std::vector<std::string> module_load_order(const std::string& modules_dep) {
  std::vector<std::string> listed;
  std::map<std::string, std::vector<std::string>> deps;
  std::istringstream lines(modules_dep);
  std::string line;
  while (std::getline(lines, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos || colon == 0) continue;
    std::string module = line.substr(0, colon);
    std::istringstream rest(line.substr(colon + 1));
    std::vector<std::string> list;
    for (std::string dep; rest >> dep;)
      list.push_back(dep);
    if (deps.emplace(module, std::move(list)).second) listed.push_back(module);
  }
  std::vector<std::string> order;
  std::set<std::string> placed;
  std::function<void(const std::string&, int)> place = [&](const std::string& module, int depth) {
    if (depth > 64 || placed.count(module)) return;
    placed.insert(module);
    // modules.dep lists a module's dependencies (all of them, transitively), the ones to load
    // first last, as modprobe reads them.
    auto it = deps.find(module);
    if (it != deps.end()) {
      for (auto dep = it->second.rbegin(); dep != it->second.rend(); ++dep)
        place(*dep, depth + 1);
    }
    order.push_back(module);
  };
  for (const auto& module : listed)
    place(module, 0);
  return order;
}

BootOptions init_system() {
  mount_early();
  open_log();
  fill_stdio();
  ::umask(022);
  load_modules();
  std::string cmdline;
  read_file("/proc/cmdline", cmdline);
  BootOptions options = parse_cmdline(cmdline);
  switch_root(options);
  mount_late();
  if (!options.hostname.empty() &&
      ::sethostname(options.hostname.data(), options.hostname.size()) != 0) {
    log_errno("cannot set the hostname");
  }
  loopback_up();
  ::setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
  return options;
}

}  // namespace msb::agent
