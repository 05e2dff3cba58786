#include "core/initramfs.h"

#include <archive.h>
#include <archive_entry.h>
#include <elf.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "core/sandbox.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "snapstore/hash.h"

namespace msb::core {
namespace fs = std::filesystem;

namespace {

// Part of the cache key: raise it whenever the layout of the archive changes, so that caches
// built by an older msb are not reused.
constexpr const char* kFormatVersion = "msb-initramfs-1";

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

// What modprobe and modules.dep call a module: the file name without ".ko" (and a compression
// suffix), '-' read as '_' (virtio-rng.ko is the module virtio_rng).
std::string module_name(const std::string& relative_path) {
  std::string name = fs::path(relative_path).filename().string();
  for (const char* suffix : {".xz", ".zst", ".gz"}) {
    if (name.ends_with(suffix)) name.resize(name.size() - std::strlen(suffix));
  }
  if (name.ends_with(".ko")) name.resize(name.size() - 3);
  std::replace(name.begin(), name.end(), '-', '_');
  return name;
}

// A module path from modules.dep must stay inside the modules folder.
bool is_safe_relative(const std::string& path) {
  if (path.empty() || path.front() == '/') return false;
  for (const auto& part : fs::path(path)) {
    if (part == ".." || part == ".") return false;
  }
  return true;
}

// A kernel's modules: name -> path relative to the modules folder, and path -> what it needs.
struct ModuleGraph {
  std::map<std::string, std::string> path_of;
  std::map<std::string, std::vector<std::string>> depends;  // by path
};

// The kernel's own modules.dep ("kernel/a.ko: kernel/b.ko kernel/c.ko" per line), where depmod
// has written one.
ModuleGraph read_modules_dep(const fs::path& file) {
  ModuleGraph graph;
  std::ifstream in(file);
  std::string line;
  size_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    size_t colon = line.find(':');
    std::string path = line.substr(0, colon);
    if (colon == std::string::npos || !is_safe_relative(path)) {
      throw SandboxError(file.string() + " line " + std::to_string(number) +
                         ": not a modules.dep line");
    }
    std::istringstream words(line.substr(colon + 1));
    std::vector<std::string> deps;
    for (std::string dep; words >> dep;) {
      if (!is_safe_relative(dep)) {
        throw SandboxError(file.string() + " line " + std::to_string(number) + ": bad path " +
                           in_quotes(dep));
      }
      deps.push_back(dep);
    }
    graph.path_of.emplace(module_name(path), path);
    graph.depends[path] = std::move(deps);
  }
  return graph;
}

// The "depends=" entry of a module's .modinfo section: the modules it needs by name, as modpost
// recorded them from the symbols it uses (what depmod turns into modules.dep).
std::vector<std::string> modinfo_depends(const fs::path& file) {
  const std::string bytes = snapstore::read_file(file);
  auto bad = [&](const std::string& why) {
    return SandboxError("kernel module " + file.string() + ": " + why);
  };
  Elf64_Ehdr ehdr;
  if (bytes.size() < sizeof ehdr || std::memcmp(bytes.data(), ELFMAG, SELFMAG) != 0) {
    throw bad("not an ELF file (compressed modules are not supported)");
  }
  std::memcpy(&ehdr, bytes.data(), sizeof ehdr);
  if (ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_shentsize != sizeof(Elf64_Shdr) ||
      ehdr.e_shoff > bytes.size() ||
      uint64_t(ehdr.e_shnum) * sizeof(Elf64_Shdr) > bytes.size() - ehdr.e_shoff ||
      ehdr.e_shstrndx >= ehdr.e_shnum) {
    throw bad("malformed ELF section table");
  }
  auto section = [&](size_t index) {
    Elf64_Shdr shdr;
    std::memcpy(&shdr, bytes.data() + ehdr.e_shoff + index * sizeof shdr, sizeof shdr);
    if (shdr.sh_type != SHT_NOBITS &&
        (shdr.sh_offset > bytes.size() || shdr.sh_size > bytes.size() - shdr.sh_offset)) {
      throw bad("section " + std::to_string(index) + " lies outside the file");
    }
    return shdr;
  };
  const Elf64_Shdr names = section(ehdr.e_shstrndx);
  for (size_t i = 0; i < ehdr.e_shnum; ++i) {
    const Elf64_Shdr shdr = section(i);
    if (shdr.sh_name >= names.sh_size) continue;
    const std::string_view name(
        bytes.data() + names.sh_offset + shdr.sh_name,
        strnlen(bytes.data() + names.sh_offset + shdr.sh_name, names.sh_size - shdr.sh_name));
    if (name != ".modinfo" || shdr.sh_type == SHT_NOBITS) continue;
    std::string_view info(bytes.data() + shdr.sh_offset, shdr.sh_size);
    while (!info.empty()) {
      size_t end = info.find('\0');
      std::string_view entry = info.substr(0, end);
      info = end == std::string_view::npos ? std::string_view() : info.substr(end + 1);
      if (!entry.starts_with("depends=")) continue;
      std::vector<std::string> deps;
      std::istringstream list{std::string(entry.substr(8))};
      for (std::string dep; std::getline(list, dep, ',');) {
        if (!dep.empty()) deps.push_back(dep);
      }
      return deps;
    }
    return {};
  }
  throw bad("has no .modinfo section");
}

// Without a modules.dep (Debian's package ships none: depmod writes it on installation), the
// graph comes from the modules themselves: every *.ko under the folder, and the depends= of
// each one the closure reaches (read lazily, see module_closure).
ModuleGraph scan_modules(const fs::path& modules_dir) {
  ModuleGraph graph;
  std::error_code ec;
  fs::recursive_directory_iterator it(modules_dir / "kernel", ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file() || it->path().extension() != ".ko") continue;
    std::string path = it->path().lexically_relative(modules_dir).string();
    graph.path_of.emplace(module_name(path), path);
  }
  if (ec) snapstore::throw_errno("cannot list " + (modules_dir / "kernel").string(), ec.value());
  return graph;
}

// The modules to include in load order (each after everything it needs), and the trimmed
// modules.dep that lists them.
struct ModuleSet {
  std::vector<std::string> load_order;  // paths relative to the modules folder
  std::string modules_dep;
};

ModuleSet module_closure(const fs::path& modules_dir) {
  const fs::path dep_file = modules_dir / "modules.dep";
  const bool have_dep_file = fs::is_regular_file(dep_file);
  ModuleGraph graph = have_dep_file ? read_modules_dep(dep_file) : scan_modules(modules_dir);

  auto path_of = [&](const std::string& name, const std::string& needed_by) {
    auto it = graph.path_of.find(name);
    if (it == graph.path_of.end()) {
      throw SandboxError("kernel module " + name + " (" + needed_by + ") is missing from " +
                         modules_dir.string());
    }
    if (!it->second.ends_with(".ko")) {
      throw SandboxError("kernel module " + name + ": " + (modules_dir / it->second).string() +
                         " is compressed, which msb's agent cannot load");
    }
    if (!fs::is_regular_file(modules_dir / it->second)) {
      throw SandboxError("kernel module " + name + " (" + needed_by +
                         "): " + (modules_dir / it->second).string() + " is missing");
    }
    return it->second;
  };
  auto depends = [&](const std::string& path) -> std::vector<std::string> {
    std::vector<std::string> paths;
    if (have_dep_file) {
      for (const auto& dep : graph.depends[path]) {
        paths.push_back(path_of(module_name(dep), "needed by " + module_name(path)));
      }
    } else {
      for (const auto& name : modinfo_depends(modules_dir / path)) {
        paths.push_back(path_of(name, "needed by " + module_name(path)));
      }
    }
    std::sort(paths.begin(), paths.end());
    return paths;
  };

  // Depth first, each module after what it needs; the sorted dependency lists make the order
  // depend on the modules alone.
  ModuleSet set;
  std::map<std::string, std::vector<std::string>> needs;  // by path: direct dependencies
  std::set<std::string> done, visiting;
  std::function<void(const std::string&)> visit = [&](const std::string& path) {
    if (done.count(path)) return;
    if (!visiting.insert(path).second) {
      throw SandboxError("kernel modules in " + modules_dir.string() +
                         " depend on each other in "
                         "a cycle through " +
                         path);
    }
    needs[path] = depends(path);
    for (const auto& dep : needs[path])
      visit(dep);
    visiting.erase(path);
    done.insert(path);
    set.load_order.push_back(path);
  };
  for (const char* name : kAgentModules)
    visit(path_of(name, "needed by msb's agent"));

  // modules.dep lists every module's whole closure, the one to load first last (modprobe loads
  // the list from its end), and its lines here come in load order.
  std::map<std::string, size_t> position;
  for (size_t i = 0; i < set.load_order.size(); ++i)
    position[set.load_order[i]] = i;
  for (const auto& path : set.load_order) {
    std::set<std::string> closure;
    std::function<void(const std::string&)> add = [&](const std::string& p) {
      for (const auto& dep : needs[p]) {
        if (closure.insert(dep).second) add(dep);
      }
    };
    add(path);
    std::vector<std::string> deps(closure.begin(), closure.end());
    std::sort(deps.begin(), deps.end(),
              [&](const auto& a, const auto& b) { return position[a] > position[b]; });
    set.modules_dep += path + ":";
    for (const auto& dep : deps)
      set.modules_dep += " " + dep;
    set.modules_dep += "\n";
  }
  return set;
}

// Appends a length-prefixed field, so that no two different inputs hash the same bytes.
void add_field(std::string& key, std::string_view field) {
  const uint64_t size = field.size();
  key.append(reinterpret_cast<const char*>(&size), sizeof size);
  key.append(field);
}

struct ArchiveDeleter {
  void operator()(struct archive* a) const { archive_write_free(a); }
};
struct EntryDeleter {
  void operator()(archive_entry* e) const { archive_entry_free(e); }
};

struct Member {
  mode_t type = AE_IFDIR;
  mode_t permissions = 0755;
  const std::string* data = nullptr;  // regular files
  unsigned rdev_major = 0, rdev_minor = 0;
};

la_ssize_t append_to_string(struct archive*, void* out, const void* buffer, size_t size) {
  static_cast<std::string*>(out)->append(static_cast<const char*>(buffer), size);
  return static_cast<la_ssize_t>(size);
}

// The cpio: members in path order (a folder always before what it holds), every time and owner
// zero, inode numbers counted in that order, so that equal inputs give equal bytes.
std::string write_cpio(const std::map<std::string, Member>& members) {
  std::string out;
  std::unique_ptr<struct archive, ArchiveDeleter> a(archive_write_new());
  auto check = [&](int status, const std::string& what) {
    if (status != ARCHIVE_OK) {
      throw SandboxError("cannot write the initramfs (" + what +
                         "): " + archive_error_string(a.get()));
    }
  };
  check(archive_write_set_format_cpio_newc(a.get()), "newc format");
  check(archive_write_set_bytes_in_last_block(a.get(), 1), "block size");
  check(archive_write_open(a.get(), &out, nullptr, append_to_string, nullptr), "open");
  int64_t inode = 0;
  for (const auto& [path, member] : members) {
    std::unique_ptr<archive_entry, EntryDeleter> entry(archive_entry_new());
    archive_entry_set_pathname(entry.get(), path.c_str());
    archive_entry_set_filetype(entry.get(), member.type);
    archive_entry_set_perm(entry.get(), member.permissions);
    archive_entry_set_ino64(entry.get(), ++inode);
    // One link each: the kernel's unpacker treats a file with more as a hard link to find.
    archive_entry_set_nlink(entry.get(), member.type == AE_IFDIR ? 2 : 1);
    archive_entry_set_size(entry.get(), member.data ? int64_t(member.data->size()) : 0);
    if (member.type == AE_IFCHR) {
      archive_entry_set_rdevmajor(entry.get(), member.rdev_major);
      archive_entry_set_rdevminor(entry.get(), member.rdev_minor);
    }
    check(archive_write_header(a.get(), entry.get()), path);
    if (member.data && !member.data->empty()) {
      la_ssize_t written = archive_write_data(a.get(), member.data->data(), member.data->size());
      if (written != la_ssize_t(member.data->size())) check(ARCHIVE_FATAL, path);
    }
  }
  check(archive_write_close(a.get()), "close");
  return out;
}

}  // namespace

fs::path agent_binary() {
  const fs::path bin = fs::read_symlink("/proc/self/exe").parent_path();
  const fs::path libexec = (bin / ".." / "libexec" / "msb").lexically_normal();
  for (const fs::path& candidate : {bin / kAgentBinary, libexec / kAgentBinary}) {
    std::error_code ec;
    if (fs::is_regular_file(candidate, ec)) return fs::weakly_canonical(candidate);
  }
  throw SandboxError(std::string("the guest agent ") + kAgentBinary + " is not beside " +
                     bin.string() + "/msb or in " + libexec.string());
}

fs::path build_initramfs(const Home& home, const fs::path& agent, const fs::path& modules_dir) {
  std::error_code ec;
  if (!fs::is_regular_file(agent, ec)) {
    throw SandboxError("the guest agent " + agent.string() + " is not a file");
  }
  // A kernel with everything built in has no modules folder: the initramfs is the agent alone.
  const bool with_modules = !modules_dir.empty();
  std::string version;
  if (with_modules) {
    if (!fs::is_directory(modules_dir, ec)) {
      throw SandboxError("kernel modules folder " + modules_dir.string() + " does not exist");
    }
    version = fs::absolute(modules_dir).lexically_normal().filename().string();
    if (version.empty() || version == "." || version == "..") {
      throw SandboxError("kernel modules folder " + modules_dir.string() +
                         " is not named after its kernel version");
    }
  }

  const std::string agent_bytes = snapstore::read_file(agent);
  const ModuleSet modules = with_modules ? module_closure(modules_dir) : ModuleSet{};
  std::vector<std::string> module_bytes;
  for (const auto& path : modules.load_order) {
    module_bytes.push_back(snapstore::read_file(modules_dir / path));
  }

  // Without modules the key has two fields, with them at least four (VERSION is never empty),
  // so the two kinds never share a key.
  std::string key_input;
  add_field(key_input, kFormatVersion);
  add_field(key_input, agent_bytes);
  if (with_modules) {
    add_field(key_input, version);
    add_field(key_input, modules.modules_dep);
    for (size_t i = 0; i < module_bytes.size(); ++i) {
      add_field(key_input, modules.load_order[i]);
      add_field(key_input, module_bytes[i]);
    }
  }
  const std::string key = snapstore::hash_bytes(std::as_bytes(std::span(key_input))).hex();
  const fs::path cache_dir = home.root() / "cache" / "initramfs";
  const fs::path cached = cache_dir / (key + ".cpio");
  if (fs::is_regular_file(cached, ec)) return cached;

  std::map<std::string, Member> members;
  for (const char* dir : {"dev", "proc", "sys", "run", "newroot"})
    members[dir] = Member{};
  members["tmp"] = Member{.permissions = 01777};
  // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
  members["dev/console"] =
      Member{.type = AE_IFCHR, .permissions = 0600, .rdev_major = 5, .rdev_minor = 1};
  members["init"] = Member{.type = AE_IFREG, .permissions = 0755, .data = &agent_bytes};
  if (with_modules) {
    const std::string module_root = "lib/modules/" + version;
    members[module_root + "/modules.dep"] =
        Member{.type = AE_IFREG, .permissions = 0644, .data = &modules.modules_dep};
    for (size_t i = 0; i < module_bytes.size(); ++i) {
      members[module_root + "/" + modules.load_order[i]] =
          Member{.type = AE_IFREG, .permissions = 0644, .data = &module_bytes[i]};
    }
  }
  // Every folder above a member, since the kernel's unpacker makes no parents.
  std::vector<std::string> paths;
  for (const auto& [path, member] : members)
    paths.push_back(path);
  for (const auto& path : paths) {
    for (fs::path parent = fs::path(path).parent_path(); !parent.empty();
         parent = parent.parent_path()) {
      members.try_emplace(parent.string());
    }
  }

  const std::string cpio = write_cpio(members);
  fs::create_directories(cache_dir, ec);
  if (ec) snapstore::throw_errno("cannot create " + cache_dir.string(), ec.value());
  // Without replace: another msb that built the same content first wins, with the same bytes.
  snapstore::publish_file(cache_dir, cache_dir, cached.filename().string(), cpio,
                          /*replace=*/false);
  return cached;
}

}  // namespace msb::core
