// The linux-guest tier for images: one OCI image layout, built with umoci, imported with
// `msb image import` and pulled with `msb pull` from a loopback registry (pushed there with
// skopeo), boots under msb's agent the same way: its layers (with a whiteout, owners and a setuid
// bit) as the root file system, and its config (Env, WorkingDir, User) as the image says.
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/home.h"
#include "core/images.h"
#include "core/sandbox.h"
#include "tests/linux_guest.h"
#include "tests/registry.h"

namespace {

namespace fs = std::filesystem;
using msb::test::Command;
using msb::test::GuestResult;
using msb::test::LinuxGuest;
using msb::test::LinuxGuestOptions;
using msb::test::require_run;
using msb::test::TempDir;
using nlohmann::json;
using namespace std::chrono_literals;

void prerequisites() {
  msb::test::skip_without_linux_guest();
  msb::test::skip_without_busybox();
  msb::test::skip_without_tools({msb::test::kRegistry, msb::test::kSkopeo, msb::test::kUmoci},
                                "the linux-guest image tests");
  // umoci unpack and repack keep the layers' owners only as root (--rootless records them in
  // xattrs that the layer tars do not get from a chown).
  if (::geteuid() != 0) {
    std::printf(
        "SKIPPED: not root: the linux-guest image tests build a layer with umoci that holds files "
        "owned by 1000:1000\n");
    std::exit(77);
  }
}

// An OCI image layout with tag "1" that boots under the agent:
//   layer 1: lay_out_busybox_root's tree (busybox, root and tester 1000:1000), /etc/layer1-only
//            and /etc/layer1-kept
//   layer 2: umoci's repack of layer 1 with /etc/layer1-only deleted (a whiteout), /srv/owned
//            owned by 1000:1000 and /usr/bin/setuid-file with mode 4755
//   config:  Env GREETING=hi, WorkingDir /srv, User tester, Entrypoint sh -c,
//            Cmd "echo from-cmd $(id -u) $GREETING $EXTRA"
struct BootableLayout {
  TempDir dir;
  fs::path layout = dir / "layout";
  const std::string image = layout.string() + ":1";

  BootableLayout() {
    using msb::test::kUmoci;
    require_run({kUmoci, "init", "--layout", layout.string()});
    require_run({kUmoci, "new", "--image", image});

    const fs::path first = dir / "bundle1";
    msb::test::umoci_unpack(image, first);
    msb::test::lay_out_busybox_root(first / "rootfs", {{"tester", 1000, 1000, "/home/tester"}});
    msb::test::write_text(first / "rootfs/etc/layer1-only", "deleted by layer 2\n");
    msb::test::write_text(first / "rootfs/etc/layer1-kept", "kept\n");
    require_run({kUmoci, "repack", "--image", image, first.string()});

    const fs::path second = dir / "bundle2";
    msb::test::umoci_unpack(image, second);
    const fs::path root = second / "rootfs";
    REQUIRE(fs::exists(root / "etc/layer1-only"));
    fs::remove(root / "etc/layer1-only");
    fs::create_directories(root / "srv");
    msb::test::write_text(root / "srv/owned", "tester's\n");
    REQUIRE(::chown((root / "srv/owned").c_str(), 1000, 1000) == 0);
    msb::test::write_text(root / "usr/bin/setuid-file", "#!/bin/sh\nid -u\n");
    // fs::permissions cannot set the setuid bit on every library version: chmod.
    require_run({"/bin/chmod", "4755", (root / "usr/bin/setuid-file").string()});
    require_run({kUmoci, "repack", "--image", image, second.string()});
    require_run({kUmoci, "config", "--image", image, "--config.env", "GREETING=hi",
                 "--config.workingdir", "/srv", "--config.user", "tester", "--config.entrypoint=sh",
                 "--config.entrypoint=-c", "--config.cmd=echo from-cmd $(id -u) $GREETING $EXTRA"});
  }

  // The digest (hex) of tag "1"'s config blob: what msb takes as the image's id.
  std::string config_hex() const {
    const json index = json::parse(msb::test::read_text(layout / "index.json"));
    REQUIRE(index["manifests"].size() == 1);
    const std::string manifest_digest = index["manifests"][0]["digest"];
    const json manifest =
        json::parse(msb::test::read_text(layout / "blobs/sha256" / manifest_digest.substr(7)));
    REQUIRE(manifest["layers"].size() == 2);
    return manifest["config"]["digest"].get<std::string>().substr(7);
  }
};

// `msb --home HOME ARGS... --json`, which must exit 0; its JSON.
json msb_json(const fs::path& home, std::vector<std::string> args) {
  args.insert(args.begin(), {MSB_BINARY, "--home", home.string()});
  args.push_back("--json");
  msb::test::ProcessResult r = msb::test::run_process(args);
  INFO("msb " << args.at(3) << ": exit " << r.exit_code << "\nstdout: " << r.out
              << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  return json::parse(r.out);
}

bool has(const std::vector<std::string>& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

// Boots `image` and checks what BootableLayout put in it. One boot: each costs seconds.
void check_image_boots(const msb::core::PreparedImage& image) {
  const msb::core::ImageConfig& config = image.info.config;
  INFO("image " << image.info.tag << " (" << image.info.id << ") at " << image.ext4);
  CHECK(has(config.env, "GREETING=hi"));
  CHECK(config.workdir == "/srv");
  CHECK(config.user == "tester");
  CHECK(config.entrypoint == std::vector<std::string>{"sh", "-c"});
  CHECK(config.cmd == std::vector<std::string>{"echo from-cmd $(id -u) $GREETING $EXTRA"});

  LinuxGuestOptions options;
  // The sandbox's environment as msb create makes it: the image's, under `--env EXTRA=1`.
  options.env = msb::core::merge_env(config.env, {"EXTRA=1"});
  options.root_image = image.ext4;
  options.cpus = 1;
  options.memory_mib = 256;
  options.hostname = "image-test";
  LinuxGuest guest(options);

  // The image's ext4 is the root file system.
  std::string mounts = guest.sh("cat /proc/mounts");
  INFO(mounts);
  CHECK(mounts.find("/dev/vda / ext4 rw") != std::string::npos);

  // Layer 2 over layer 1: the whiteout removed its file (and is not itself a file), the rest of
  // layer 1 is there, owners and modes are the layers'.
  CHECK(guest.exec(Command({"test", "-e", "/etc/layer1-only"})).code == 1);
  CHECK(guest.sh("cat /etc/layer1-kept") == "kept\n");
  CHECK(guest.sh("find / -xdev -name '.wh.*'").empty());
  CHECK(guest.sh("stat -c %u:%g /srv/owned; cat /srv/owned") == "1000:1000\ntester's\n");
  CHECK(guest.sh("stat -c %a:%u:%g /usr/bin/setuid-file") == "4755:0:0\n");
  CHECK(guest.exec(Command({"test", "-u", "/usr/bin/setuid-file"})).code == 0);
  CHECK(guest.sh("stat -c %a:%u:%g /home/tester /bin/busybox") == "777:0:0\n755:0:0\n");

  // Commands run, with their exit codes.
  CHECK(guest.exec(Command({"sh", "-c", "exit 7"})).code == 7);
  CHECK(guest.exec(Command({"true"})).code == 0);
  GuestResult missing = guest.exec(Command({"no-such-command"}));
  CHECK(missing.code == 127);
  CHECK(guest.exec(Command({"id", "-u"})).out == "0\n");

  // The image's config applied to an exec by msb exec's own rule (core::with_image_defaults):
  // its user and working folder; the environment is the sandbox's.
  GuestResult configured = guest.exec(msb::core::with_image_defaults(
      Command({"sh", "-c", "id -u; id -g; pwd; echo $GREETING $EXTRA"}), config));
  INFO("stderr: " << configured.err);
  CHECK(configured.code == 0);
  CHECK(configured.out == "1000\n1000\n/srv\nhi 1\n");
  // msb run --image without a command: the entrypoint, then the command.
  GuestResult ran = guest.exec(msb::core::with_image_defaults({}, config));
  INFO("stderr: " << ran.err);
  CHECK(ran.code == 0);
  CHECK(ran.out == "from-cmd 1000 hi 1\n");
  // tester may write what it owns, not what root does.
  CHECK(guest.exec(Command({"sh", "-c", "echo more >> /srv/owned"}).as(config.user)).code == 0);
  CHECK(guest.exec(Command({"touch", "/srv/not-yours"}).as(config.user)).code != 0);

  CHECK(guest.power_off(120s) == 0);
}

}  // namespace

TEST_CASE("An imported OCI image and a pulled one boot the same way", "[linux-guest][needs-root]") {
  prerequisites();
  BootableLayout layout;
  const std::string config_hex = layout.config_hex();

  // msb image import, then the ext4 as a sandbox gets it.
  TempDir import_dir;
  const json imported = msb_json(
      import_dir.path(), {"image", "import", layout.layout.string(), "--tag", "local/busybox:1"});
  CHECK(imported["tag"] == "local/busybox:1");
  CHECK(imported["id"] == config_hex);  // the id is the config blob's digest
  auto import_home = msb::core::Home::resolve(import_dir.path());
  auto import_store = import_home.open_store();
  const msb::core::PreparedImage local =
      msb::core::prepare_image(import_home, *import_store, "local/busybox:1");
  CHECK(local.info.id == imported["id"].get<std::string>());
  check_image_boots(local);

  // The same layout through a registry: skopeo copies an OCI layout's config blob (and layers)
  // unchanged to a registry that takes OCI manifests, so the pulled image has the same id.
  msb::test::Registry registry;
  const std::string reference = registry.address() + "/local/busybox:1";
  msb::test::skopeo_push(layout.layout, "1", reference);
  TempDir pull_dir;
  const json pulled = msb_json(pull_dir.path(), {"pull", reference});
  CHECK(pulled["tag"] == reference);
  auto pull_home = msb::core::Home::resolve(pull_dir.path());
  auto pull_store = pull_home.open_store();
  const msb::core::PreparedImage remote =
      msb::core::prepare_image(pull_home, *pull_store, reference);
  CHECK(remote.info.id == pulled["id"].get<std::string>());
  CHECK(remote.info.id == local.info.id);
  CHECK(remote.info.size == local.info.size);
  check_image_boots(remote);
}
