// Unit tier: the kernels msb boots (--kernel resolution, the default kernel) and the initramfs it
// builds for a Linux guest, from Debian's cloud kernel (scripts/fetch-linux-kernel). The tests
// that need that kernel exit 77 with the reason where it is not installed.
#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <catch2/catch.hpp>

#include "core/initramfs.h"
#include "core/kernels.h"
#include "core/sandbox.h"
#include "snapstore/file_util.h"
#include "tests/support.h"

namespace msb {
namespace {
namespace fs = std::filesystem;
using core::Home;
using core::KernelChoice;
using core::SandboxError;
using test::read_text;
using test::TempDir;
using test::write_text;

// Debian's kernel's lib/modules/VERSION; exits 77 (skipped) where it is not installed.
fs::path debian_modules() {
  const fs::path root = fs::path(MSB_LINUX_KERNEL_DIR) / "lib" / "modules";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (entry.is_directory() && fs::exists(entry.path() / "kernel")) return entry.path();
  }
  std::printf(
      "SKIPPED: no Debian kernel modules in %s (scripts/fetch-linux-kernel %s installs "
      "them): this test builds an initramfs from them\n",
      root.c_str(), MSB_LINUX_KERNEL_DIR);
  std::exit(77);
}

struct Member {
  mode_t type = 0;
  mode_t permissions = 0;
  int64_t uid = -1, gid = -1, mtime = -1;
  unsigned rdev_major = 0, rdev_minor = 0;
  std::string data;
};

// The cpio read back with libarchive: path -> member, in archive order too.
std::map<std::string, Member> read_cpio(const fs::path& file,
                                        std::vector<std::string>* order = nullptr) {
  std::map<std::string, Member> members;
  struct archive* a = archive_read_new();
  archive_read_support_format_cpio(a);
  REQUIRE(archive_read_open_filename(a, file.c_str(), 1 << 16) == ARCHIVE_OK);
  archive_entry* entry = nullptr;
  int status;
  while ((status = archive_read_next_header(a, &entry)) == ARCHIVE_OK) {
    Member m;
    m.type = archive_entry_filetype(entry);
    m.permissions = archive_entry_perm(entry);
    m.uid = archive_entry_uid(entry);
    m.gid = archive_entry_gid(entry);
    m.mtime = archive_entry_mtime(entry);
    m.rdev_major = archive_entry_rdevmajor(entry);
    m.rdev_minor = archive_entry_rdevminor(entry);
    m.data.resize(size_t(archive_entry_size(entry)));
    if (!m.data.empty()) {
      REQUIRE(archive_read_data(a, m.data.data(), m.data.size()) == la_ssize_t(m.data.size()));
    }
    std::string path = archive_entry_pathname(entry);
    if (order) order->push_back(path);
    CHECK(members.emplace(path, std::move(m)).second);
  }
  CHECK(status == ARCHIVE_EOF);
  CHECK(archive_format(a) == ARCHIVE_FORMAT_CPIO_SVR4_NOCRC);  // newc
  archive_read_free(a);
  return members;
}

// modules.dep as lines of (module, dependencies), in file order.
std::vector<std::pair<std::string, std::vector<std::string>>> parse_modules_dep(
    const std::string& text) {
  std::vector<std::pair<std::string, std::vector<std::string>>> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    size_t colon = line.find(':');
    REQUIRE(colon != std::string::npos);
    std::istringstream words(line.substr(colon + 1));
    std::vector<std::string> deps;
    for (std::string dep; words >> dep;)
      deps.push_back(dep);
    lines.emplace_back(line.substr(0, colon), deps);
  }
  return lines;
}

fs::path write_agent(const TempDir& dir, const std::string& text) {
  fs::path agent = dir / "msb-agent";
  write_text(agent, text);
  return agent;
}

// A fake kernel module tree with a modules.dep (as depmod writes it): `deps` maps each module's
// path to its dependencies (the whole closure, load-last first).
fs::path fake_modules(const fs::path& root,
                      const std::vector<std::pair<std::string, std::vector<std::string>>>& deps) {
  const fs::path dir = root / "lib" / "modules" / "9.9.9-test";
  std::string text;
  for (const auto& [path, list] : deps) {
    fs::create_directories((dir / path).parent_path());
    write_text(dir / path, "module " + path);
    text += path + ":";
    for (const auto& dep : list)
      text += " " + dep;
    text += "\n";
  }
  write_text(dir / "modules.dep", text);
  return dir;
}

const std::vector<std::pair<std::string, std::vector<std::string>>> kFakeTree = {
    {"kernel/drivers/virtio/virtio.ko", {}},
    {"kernel/drivers/virtio/virtio_ring.ko", {}},
    {"kernel/drivers/virtio/virtio_mmio.ko",
     {"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/char/virtio_console.ko",
     {"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/block/virtio_blk.ko",
     {"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/char/hw_random/virtio-rng.ko",
     {"kernel/drivers/char/hw_random/rng-core.ko", "kernel/drivers/virtio/virtio_ring.ko",
      "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/char/hw_random/rng-core.ko", {}},
    {"kernel/drivers/virtio/virtio_balloon.ko",
     {"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/net/virtio_net.ko",
     {"kernel/drivers/net/net_failover.ko", "kernel/drivers/virtio/virtio_ring.ko",
      "kernel/drivers/virtio/virtio.ko"}},
    {"kernel/drivers/net/net_failover.ko", {}},
};

TEST_CASE("the initramfs holds the agent, the device nodes and the agent's modules",
          "[initramfs]") {
  const fs::path modules = debian_modules();
  const std::string version = modules.filename().string();
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path cpio = core::build_initramfs(home, write_agent(dir, "agent bytes"), modules);
  CHECK(cpio.parent_path() == home.root() / "cache" / "initramfs");
  CHECK(std::regex_match(cpio.filename().string(), std::regex("[0-9a-f]{32}\\.cpio")));

  std::vector<std::string> order;
  const auto members = read_cpio(cpio, &order);
  const std::string m = "lib/modules/" + version;
  // Debian 6.1's cloud kernel: virtio and virtio_ring are modules, everything else each of the
  // five needs is built in.
  const std::set<std::string> files = {
      "init",
      m + "/modules.dep",
      m + "/kernel/drivers/virtio/virtio.ko",
      m + "/kernel/drivers/virtio/virtio_ring.ko",
      m + "/kernel/drivers/virtio/virtio_mmio.ko",
      m + "/kernel/drivers/virtio/virtio_balloon.ko",
      m + "/kernel/drivers/char/virtio_console.ko",
      m + "/kernel/drivers/char/hw_random/virtio-rng.ko",
      m + "/kernel/drivers/block/virtio_blk.ko",
  };
  const std::set<std::string> dirs = {"dev",
                                      "proc",
                                      "sys",
                                      "run",
                                      "tmp",
                                      "newroot",
                                      "lib",
                                      "lib/modules",
                                      m,
                                      m + "/kernel",
                                      m + "/kernel/drivers",
                                      m + "/kernel/drivers/virtio",
                                      m + "/kernel/drivers/char",
                                      m + "/kernel/drivers/char/hw_random",
                                      m + "/kernel/drivers/block"};
  std::set<std::string> want = files;
  want.insert(dirs.begin(), dirs.end());
  want.insert("dev/console");
  std::set<std::string> got;
  for (const auto& [path, member] : members)
    got.insert(path);
  CHECK(got == want);

  for (const auto& [path, member] : members) {
    INFO(path);
    CHECK(member.uid == 0);
    CHECK(member.gid == 0);
    CHECK(member.mtime == 0);
    if (dirs.count(path)) {
      CHECK(member.type == AE_IFDIR);
      CHECK(member.permissions == (path == "tmp" ? 01777 : 0755));
    } else if (files.count(path)) {
      CHECK(member.type == AE_IFREG);
      CHECK(member.permissions == (path == "init" ? 0755 : 0644));
    }
    // A folder comes before anything in it: the kernel's unpacker makes no parents.
    size_t at = std::find(order.begin(), order.end(), path) - order.begin();
    for (fs::path parent = fs::path(path).parent_path(); !parent.empty();
         parent = parent.parent_path()) {
      CHECK(std::find(order.begin(), order.end(), parent.string()) - order.begin() < long(at));
    }
  }
  CHECK(std::is_sorted(order.begin(), order.end()));
  const Member& console = members.at("dev/console");
  CHECK(console.type == AE_IFCHR);
  CHECK(console.rdev_major == 5);
  CHECK(console.rdev_minor == 1);
  CHECK(members.at("init").data == "agent bytes");
  for (const auto& path : files) {
    if (path.ends_with(".ko")) {
      INFO(path);
      CHECK(members.at(path).data == read_text(modules / fs::path(path).lexically_relative(m)));
    }
  }

  // GNU cpio reads it the same way.
  if (fs::exists("/usr/bin/cpio")) {
    auto listed = test::run_process({"/bin/sh", "-c", "cpio -it --quiet < \"$0\"", cpio.string()});
    REQUIRE(listed.exit_code == 0);
    std::vector<std::string> names;
    std::istringstream lines(listed.out);
    for (std::string line; std::getline(lines, line);)
      names.push_back(line);
    CHECK(names == order);
  }
}

TEST_CASE("the initramfs's modules.dep lists just its modules, each with all it needs",
          "[initramfs]") {
  const fs::path modules = debian_modules();
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path cpio = core::build_initramfs(home, write_agent(dir, "agent"), modules);
  const auto members = read_cpio(cpio);
  const std::string m = "lib/modules/" + modules.filename().string() + "/";
  const auto lines = parse_modules_dep(members.at(m + "modules.dep").data);

  std::set<std::string> listed, in_archive;
  for (const auto& [path, member] : members) {
    if (path.ends_with(".ko")) in_archive.insert(path.substr(m.size()));
  }
  for (const auto& [module, deps] : lines) {
    INFO(module);
    CHECK(listed.insert(module).second);  // once each
    // Load order: whatever a module needs is on an earlier line; and a dependency's own
    // dependencies are on the module's line too (the list is closed).
    for (const auto& dep : deps) {
      CHECK(listed.count(dep));
      for (const auto& [other, other_deps] : lines) {
        if (other != dep) continue;
        for (const auto& indirect : other_deps) {
          CHECK(std::find(deps.begin(), deps.end(), indirect) != deps.end());
        }
      }
    }
  }
  CHECK(listed == in_archive);
  const std::map<std::string, std::vector<std::string>> by_module(lines.begin(), lines.end());
  // The modules' modinfo says: virtio needs virtio_ring, and virtio_mmio both; the list is
  // loaded from its end.
  CHECK(by_module.at("kernel/drivers/virtio/virtio_mmio.ko") ==
        std::vector<std::string>{"kernel/drivers/virtio/virtio.ko",
                                 "kernel/drivers/virtio/virtio_ring.ko"});
  CHECK(by_module.at("kernel/drivers/virtio/virtio.ko") ==
        std::vector<std::string>{"kernel/drivers/virtio/virtio_ring.ko"});
  CHECK(by_module.at("kernel/drivers/virtio/virtio_ring.ko").empty());
  CHECK(lines.front().first == "kernel/drivers/virtio/virtio_ring.ko");
}

TEST_CASE("the initramfs is the same bytes every time and is built once per content",
          "[initramfs]") {
  const fs::path modules = debian_modules();
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const Home other = Home::resolve(dir / "other");
  const fs::path agent = write_agent(dir, "agent v1");
  const fs::path first = core::build_initramfs(home, agent, modules);
  const fs::path elsewhere = core::build_initramfs(other, agent, modules);
  CHECK(first.filename() == elsewhere.filename());
  CHECK(read_text(first) == read_text(elsewhere));

  // Reused, not rebuilt: the file keeps its (back-dated) time and inode.
  const auto old_time = fs::file_time_type::clock::now() - std::chrono::hours(24);
  fs::last_write_time(first, old_time);
  struct stat before {};
  REQUIRE(::stat(first.c_str(), &before) == 0);
  CHECK(core::build_initramfs(home, agent, modules) == first);
  struct stat after {};
  REQUIRE(::stat(first.c_str(), &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  CHECK(fs::last_write_time(first) == old_time);

  // A changed agent is a new initramfs beside the old one.
  write_text(agent, "agent v2");
  const fs::path second = core::build_initramfs(home, agent, modules);
  CHECK(second != first);
  CHECK(fs::exists(first));
  CHECK(read_cpio(second).at("init").data == "agent v2");
  size_t files = 0;
  for (const auto& entry : fs::directory_iterator(home.root() / "cache" / "initramfs")) {
    CHECK(entry.path().extension() == ".cpio");  // no temporary left behind
    ++files;
  }
  CHECK(files == 2);
}

TEST_CASE("a module missing from the kernel's tree is an error naming it", "[initramfs]") {
  const fs::path modules = debian_modules();
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path agent = write_agent(dir, "agent");
  // A copy of the driver folders the agent's modules live in, by links, less one file.
  auto tree_without = [&](const std::string& left_out) {
    const fs::path copy =
        dir / ("without-" + fs::path(left_out).stem().string()) / modules.filename();
    for (const char* folder : {"virtio", "char", "block"}) {
      for (const auto& entry :
           fs::recursive_directory_iterator(modules / "kernel" / "drivers" / folder)) {
        if (!entry.is_regular_file()) continue;
        const fs::path relative = entry.path().lexically_relative(modules);
        if (relative == left_out) continue;
        fs::create_directories((copy / relative).parent_path());
        fs::create_symlink(entry.path(), copy / relative);
      }
    }
    return copy;
  };
  const fs::path no_balloon = tree_without("kernel/drivers/virtio/virtio_balloon.ko");
  CHECK_THROWS_MATCHES(core::build_initramfs(home, agent, no_balloon), SandboxError,
                       Catch::Matchers::Message("kernel module virtio_balloon (needed by msb's "
                                                "agent) is missing from " +
                                                no_balloon.string()));
  const fs::path no_virtio = tree_without("kernel/drivers/virtio/virtio.ko");
  CHECK_THROWS_WITH(core::build_initramfs(home, agent, no_virtio),
                    Catch::Contains("kernel module virtio (needed by ") &&
                        Catch::Contains("is missing from " + no_virtio.string()));
  CHECK_THROWS_WITH(
      core::build_initramfs(home, dir / "no-agent", modules),
      Catch::Contains((dir / "no-agent").string()) && Catch::Contains("is not a file"));
  CHECK_THROWS_WITH(core::build_initramfs(home, agent, dir / "no-modules"),
                    Catch::Contains((dir / "no-modules").string()));
  CHECK_FALSE(fs::exists(home.root() / "cache" / "initramfs"));
}

TEST_CASE("a kernel's own modules.dep decides the modules and is trimmed", "[initramfs]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path modules = fake_modules(dir / "kernel", kFakeTree);
  const fs::path cpio = core::build_initramfs(home, write_agent(dir, "agent"), modules);
  const auto members = read_cpio(cpio);
  const std::string m = "lib/modules/9.9.9-test/";
  // virtio_net and net_failover are left out; rng-core comes with virtio-rng.
  CHECK(members.at(m + "modules.dep").data ==
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/char/hw_random/rng-core.ko:\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/char/hw_random/rng-core.ko "
        "kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_balloon.ko: kernel/drivers/virtio/virtio_ring.ko "
        "kernel/drivers/virtio/virtio.ko\n");
  size_t modules_in_archive = 0;
  for (const auto& [path, member] : members) {
    if (!path.ends_with(".ko")) continue;
    ++modules_in_archive;
    CHECK(member.data == "module " + path.substr(m.size()));
  }
  CHECK(modules_in_archive == 8);

  // A modules.dep entry that points at a missing file, or outside the tree, is refused.
  fs::remove(modules / "kernel/drivers/char/hw_random/rng-core.ko");
  CHECK_THROWS_WITH(core::build_initramfs(home, write_agent(dir, "agent 2"), modules),
                    Catch::Contains("kernel module rng_core (needed by virtio_rng)") &&
                        Catch::Contains("rng-core.ko is missing"));
  write_text(modules / "modules.dep", "../../evil.ko:\n");
  CHECK_THROWS_WITH(core::build_initramfs(home, write_agent(dir, "agent 3"), modules),
                    Catch::Contains((modules / "modules.dep").string() + " line 1"));
}

TEST_CASE("a kernel without modules gets an initramfs with just the agent", "[initramfs]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path agent = write_agent(dir, "agent alone");
  const fs::path cpio = core::build_initramfs(home, agent, fs::path());
  CHECK(cpio.parent_path() == home.root() / "cache" / "initramfs");
  CHECK(std::regex_match(cpio.filename().string(), std::regex("[0-9a-f]{32}\\.cpio")));

  std::vector<std::string> order;
  const auto members = read_cpio(cpio, &order);
  // The agent, the console and the mount points the agent uses: no lib/, no modules.dep.
  CHECK(order == std::vector<std::string>{"dev", "dev/console", "init", "newroot", "proc", "run",
                                          "sys", "tmp"});
  for (const auto& [path, member] : members) {
    INFO(path);
    CHECK(member.uid == 0);
    CHECK(member.gid == 0);
    CHECK(member.mtime == 0);
  }
  CHECK(members.at("init").type == AE_IFREG);
  CHECK(members.at("init").permissions == 0755);
  CHECK(members.at("init").data == "agent alone");
  const Member& console = members.at("dev/console");
  CHECK(console.type == AE_IFCHR);
  CHECK(console.permissions == 0600);
  CHECK(console.rdev_major == 5);
  CHECK(console.rdev_minor == 1);
  CHECK(members.at("tmp").permissions == 01777);

  // Cached by content: the same agent reuses it; another agent, or the same agent with modules,
  // is another initramfs.
  CHECK(core::build_initramfs(home, agent, "") == cpio);
  const fs::path other = core::build_initramfs(home, write_agent(dir, "agent v2"), "");
  CHECK(other != cpio);
  CHECK(read_cpio(other).at("init").data == "agent v2");
  write_agent(dir, "agent alone");
  const fs::path with_modules =
      core::build_initramfs(home, agent, fake_modules(dir / "kernel", kFakeTree));
  CHECK(with_modules != cpio);
  CHECK(read_cpio(with_modules).count("lib/modules/9.9.9-test/modules.dep"));
}

// ---- Kernels ----

// A kernel installed the way scripts/fetch-linux-kernel lays one out.
fs::path install_fake_kernel(const Home& home, const std::string& name,
                             const std::vector<std::string>& files) {
  const fs::path dir = home.root() / "kernels" / name;
  fs::create_directories(dir / "lib" / "modules" / "6.1.0-test");
  for (const auto& file : files)
    write_text(dir / file, file);
  return dir;
}

// A kernel installed the way scripts/build-guest-kernel lays msb's out: everything built in, no
// lib/modules.
fs::path install_builtin_kernel(const Home& home, const std::string& name,
                                const std::vector<std::string>& files) {
  const fs::path dir = home.root() / "kernels" / name;
  fs::create_directories(dir);
  for (const auto& file : files)
    write_text(dir / file, file);
  return dir;
}

TEST_CASE("an installed kernel resolves by name to its image and modules", "[kernels]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path kernel = install_fake_kernel(home, "mine", {"vmlinuz", "config"});
  KernelChoice choice = core::resolve_kernel(home, "mine");
  CHECK(choice.name == "mine");
  CHECK(choice.image == kernel / "vmlinuz");
  CHECK(choice.modules == kernel / "lib" / "modules" / "6.1.0-test");
  CHECK(choice.linux_guest);

  // The uncompressed ELF wins where present.
  write_text(kernel / "vmlinux", "elf");
  CHECK(core::resolve_kernel(home, "mine").image == kernel / "vmlinux");

  // A second kernel version in lib/modules is ambiguous; none is an error too.
  fs::create_directories(kernel / "lib" / "modules" / "6.2.0-test");
  CHECK_THROWS_WITH(
      core::resolve_kernel(home, "mine"),
      Catch::Contains("kernel \"mine\"") && Catch::Contains("6.1.0-test, 6.2.0-test"));
  // Where lib/modules exists it must hold one version: none is an error too.
  fs::remove_all(kernel / "lib" / "modules" / "6.1.0-test");
  fs::remove_all(kernel / "lib" / "modules" / "6.2.0-test");
  CHECK_THROWS_WITH(
      core::resolve_kernel(home, "mine"),
      Catch::Contains("kernel \"mine\": no modules in " + (kernel / "lib" / "modules").string()));
  const fs::path empty = install_fake_kernel(home, "empty", {});
  CHECK_THROWS_WITH(core::resolve_kernel(home, "empty"),
                    Catch::Matches("kernel \"empty\": .*/kernels/empty has neither vmlinux nor "
                                   "vmlinuz"));
}

TEST_CASE("a kernel with everything built in resolves without modules", "[kernels]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  const fs::path kernel = install_builtin_kernel(home, "msb", {"vmlinux", "config", "build-key"});
  for (const std::string& name : {std::string("msb"), kernel.string()}) {
    INFO(name);
    KernelChoice choice = core::resolve_kernel(home, name);
    CHECK(choice.name == name);
    CHECK(choice.image == kernel / "vmlinux");
    CHECK(choice.modules.empty());
    CHECK(choice.linux_guest);
  }
  // Its vmlinux named as a file boots as that kernel: its config beside it marks the folder.
  KernelChoice file = core::resolve_kernel(home, (kernel / "vmlinux").string());
  CHECK(file.image == kernel / "vmlinux");
  CHECK(file.modules.empty());
  CHECK(file.linux_guest);
  CHECK(core::installed_kernels(home) == std::vector<std::string>{"msb"});

  // A vmlinux alone in a folder is a bare kernel file.
  fs::create_directories(dir / "bare");
  write_text(dir / "bare" / "vmlinux", "elf");
  CHECK_FALSE(core::resolve_kernel(home, (dir / "bare" / "vmlinux").string()).linux_guest);
}

TEST_CASE("an unknown kernel name is an error listing the installed ones", "[kernels]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  CHECK_THROWS_MATCHES(
      core::resolve_kernel(home, "nope"), SandboxError,
      Catch::Matchers::Message("kernel \"nope\" is not installed in " +
                               (home.root() / "kernels").string() +
                               " (known kernels: the built-in testguest; a kernel file is named by "
                               "a path with a '/')"));
  install_fake_kernel(home, "zeta", {"vmlinuz"});
  install_fake_kernel(home, "alpha", {"vmlinux"});
  install_fake_kernel(home, "half", {});                 // no image yet: not listed
  install_fake_kernel(home, ".alpha.tmp", {"vmlinuz"});  // the fetch script's work folder
  CHECK(core::installed_kernels(home) == std::vector<std::string>{"alpha", "zeta"});
  CHECK_THROWS_WITH(core::resolve_kernel(home, "nope"),
                    Catch::Contains("(known kernels: the built-in testguest, alpha, zeta;"));
  CHECK_THROWS_WITH(core::resolve_kernel(home, ".."), Catch::Contains("kernel \"..\" is not "
                                                                      "installed"));
}

TEST_CASE("a kernel path names a file or an installed kernel's folder", "[kernels]") {
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  write_text(dir / "bzImage", "kernel");
  KernelChoice file = core::resolve_kernel(home, (dir / "bzImage").string());
  CHECK(file.image == dir / "bzImage");
  CHECK(file.modules.empty());
  CHECK_FALSE(file.linux_guest);

  const fs::path kernel = install_fake_kernel(home, "k", {"vmlinuz", "vmlinux"});
  KernelChoice folder = core::resolve_kernel(home, kernel.string());
  CHECK(folder.name == kernel.string());
  CHECK(folder.image == kernel / "vmlinux");
  CHECK(folder.modules == kernel / "lib" / "modules" / "6.1.0-test");
  CHECK(folder.linux_guest);
  // A file of such a folder boots itself, with the folder's modules.
  KernelChoice inside = core::resolve_kernel(home, (kernel / "vmlinuz").string());
  CHECK(inside.image == kernel / "vmlinuz");
  CHECK(inside.modules == folder.modules);
  CHECK(inside.linux_guest);

  CHECK_THROWS_MATCHES(
      core::resolve_kernel(home, (dir / "missing").string()), SandboxError,
      Catch::Matchers::Message("kernel " + (dir / "missing").string() + ": not found"));
}

TEST_CASE("Debian's installed kernel resolves to its vmlinux and modules", "[kernels]") {
  const fs::path modules = debian_modules();
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  KernelChoice choice = core::resolve_kernel(home, MSB_LINUX_KERNEL_DIR);
  CHECK(choice.image == fs::path(MSB_LINUX_KERNEL_DIR) / "vmlinux");
  CHECK(choice.modules == modules);
  CHECK(choice.linux_guest);
}

TEST_CASE("the default kernel is msb's wherever installed and Debian's only with VMX/SVM",
          "[kernels]") {
  for (const bool msb : {false, true}) {
    for (const bool debian : {false, true}) {
      for (const bool hardware : {false, true}) {
        INFO("msb " << msb << ", debian-cloud " << debian << ", hardware virtualization "
                    << hardware);
        TempDir dir;
        const Home home = Home::resolve(dir / "home");
        const fs::path kernels = home.root() / "kernels";
        if (msb) install_builtin_kernel(home, "msb", {"vmlinux", "config", "build-key"});
        if (debian) install_fake_kernel(home, "debian-cloud", {"vmlinuz", "vmlinux", "config"});
        std::string why;
        const std::string choice = core::default_kernel(home, hardware, &why);
        CHECK(core::default_kernel(home, hardware, nullptr) == choice);
        if (msb) {
          CHECK(choice == "msb");
          CHECK(why == "msb: msb's own guest kernel, installed in " + (kernels / "msb").string());
        } else if (debian && hardware) {
          CHECK(choice == "debian-cloud");
          CHECK(why == "debian-cloud: installed in " + (kernels / "debian-cloud").string() +
                           " and the host has hardware virtualization (msb's own kernel is not "
                           "installed in " +
                           (kernels / "msb").string() + ": scripts/build-guest-kernel builds it)");
        } else if (debian) {
          CHECK(choice == "testguest");
          CHECK(why == "testguest: msb's own kernel is not installed in " +
                           (kernels / "msb").string() +
                           " (scripts/build-guest-kernel builds it), and Debian's in " +
                           (kernels / "debian-cloud").string() +
                           " boots in useful time only with hardware virtualization (no vmx or "
                           "svm in /proc/cpuinfo)");
        } else {
          CHECK(choice == "testguest");
          CHECK(why == "testguest: no Linux kernel installed in " + kernels.string() +
                           " (scripts/setup builds msb's with scripts/build-guest-kernel)");
        }
        // Never the old claim that Linux cannot boot here.
        CHECK_THAT(why, !Catch::Contains("far too slowly"));
      }
    }
  }

  // A folder that is not a whole kernel yet (the build script's work) does not count.
  TempDir dir;
  const Home home = Home::resolve(dir / "home");
  install_builtin_kernel(home, "msb", {"config"});
  CHECK(core::default_kernel(home, true, nullptr) == "testguest");

  // The host's own answer: vmx or svm among /proc/cpuinfo's flags.
  const bool flags = std::regex_search(read_text("/proc/cpuinfo"),
                                       std::regex("\nflags\\s*:[^\n]*\\b(vmx|svm)\\b"));
  CHECK(core::host_has_hardware_virtualization() == flags);
  install_fake_kernel(home, "debian-cloud", {"vmlinuz"});
  CHECK(core::default_kernel(home) == (flags ? "debian-cloud" : "testguest"));
  write_text(home.root() / "kernels" / "msb" / "vmlinux", "elf");
  CHECK(core::default_kernel(home) == "msb");
}

// Run in a copy of this binary (see below): prints what resolve_kernel("testguest") and
// agent_binary() find beside it.
TEST_CASE("print the built-in files found beside this binary", "[.helper]") {
  TempDir dir;
  for (const auto& [what, find] : std::vector<std::pair<std::string, std::function<fs::path()>>>{
           {"testguest",
            [&] {
              KernelChoice choice = core::resolve_kernel(Home::resolve(dir / "home"), "testguest");
              CHECK_FALSE(choice.linux_guest);
              CHECK(choice.modules.empty());
              return choice.image;
            }},
           {"agent", [] { return core::agent_binary(); }}}) {
    try {
      std::printf("%s=%s\n", what.c_str(), find().c_str());
    } catch (const SandboxError& e) {
      std::printf("%s error=%s\n", what.c_str(), e.what());
    }
  }
}

TEST_CASE("the test guest and the agent are found beside msb or in ../libexec/msb",
          "[kernels][initramfs]") {
  TempDir dir;
  auto put = [&](const std::string& path) {
    fs::create_directories((dir / path).parent_path());
    write_text(dir / path, path);
  };
  auto run_copy = [&](const fs::path& bin) {
    fs::create_directories(bin);
    fs::copy_file("/proc/self/exe", bin / "msb");
    fs::permissions(bin / "msb", fs::perms::owner_all);
    auto result = test::run_process({(bin / "msb").string(), "[.helper]"});
    REQUIRE(result.exit_code == 0);
    return result.out;
  };
  // Beside.
  put("a/bin/testguest");
  put("a/bin/msb-agent");
  CHECK_THAT(run_copy(dir / "a/bin"),
             Catch::Contains("testguest=" + (dir / "a/bin/testguest").string() + "\n") &&
                 Catch::Contains("agent=" + (dir / "a/bin/msb-agent").string() + "\n"));
  // Installed: PREFIX/bin/msb, PREFIX/libexec/msb/.
  put("b/libexec/msb/testguest");
  put("b/libexec/msb/msb-agent");
  CHECK_THAT(run_copy(dir / "b/bin"),
             Catch::Contains("testguest=" + (dir / "b/libexec/msb/testguest").string() + "\n") &&
                 Catch::Contains("agent=" + (dir / "b/libexec/msb/msb-agent").string() + "\n"));
  // Neither.
  CHECK_THAT(run_copy(dir / "c/bin"),
             Catch::Contains("testguest error=built-in kernel \"testguest\" not found beside " +
                             (dir / "c/bin").string() + "/msb or in " +
                             (dir / "c/libexec/msb").string() + "\n") &&
                 Catch::Contains("agent error=the guest agent msb-agent is not beside " +
                                 (dir / "c/bin").string() + "/msb or in " +
                                 (dir / "c/libexec/msb").string() + "\n"));
}

}  // namespace
}  // namespace msb
