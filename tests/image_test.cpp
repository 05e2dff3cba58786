// Images: msb image import of OCI layouts and docker save tarballs (layers with whiteouts, opaque
// folders, links, owners, device nodes), ls, rm, sharing between tags, gc, refusals, and the
// default image built from busybox-static. The ext4 files are read back with debugfs.
#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/home.h"
#include "core/images.h"
#include "tests/support.h"

namespace fs = std::filesystem;
using msb::test::ProcessResult;
using msb::test::run_process;
using msb::test::TempDir;
using nlohmann::json;

namespace {

// The host tools these tests drive: without them they skip (exit 77) and say why.
void need_tools() {
  for (const char* tool : {"mke2fs", "debugfs", "tar", "sha256sum", "e2fsck"}) {
    std::string command =
        std::string("PATH=$PATH:/usr/sbin:/sbin command -v ") + tool + " >/dev/null 2>&1";
    if (std::system(command.c_str()) != 0) {
      std::printf("SKIPPED: image tests need %s (Debian packages e2fsprogs, tar, coreutils)\n",
                  tool);
      std::exit(77);
    }
  }
}

std::string tool(const std::string& name) {
  for (const char* dir : {"/usr/sbin", "/sbin", "/usr/bin", "/bin"}) {
    if (::access((std::string(dir) + "/" + name).c_str(), X_OK) == 0)
      return std::string(dir) + "/" + name;
  }
  return name;
}

std::string sha256_of(const fs::path& file) {
  ProcessResult r = run_process({tool("sha256sum"), file.string()});
  REQUIRE(r.exit_code == 0);
  return r.out.substr(0, 64);
}

// One entry of a layer tarball.
struct Entry {
  std::string path;
  char type = 'f';   // f file, d folder, l symlink, h hard link, c character device
  std::string data;  // file content, or the link target
  unsigned mode = 0644;
  unsigned uid = 0, gid = 0;
  unsigned major = 0, minor = 0;
};

Entry file(std::string path, std::string data, unsigned mode = 0644, unsigned uid = 0,
           unsigned gid = 0) {
  return {std::move(path), 'f', std::move(data), mode, uid, gid};
}
Entry dir(std::string path, unsigned mode = 0755, unsigned uid = 0, unsigned gid = 0) {
  return {std::move(path), 'd', "", mode, uid, gid};
}
Entry symlink(std::string path, std::string target) {
  return {std::move(path), 'l', std::move(target), 0777};
}
Entry hardlink(std::string path, std::string target) {
  return {std::move(path), 'h', std::move(target), 0644};
}

// Writes a tar layer (pax, as docker and umoci write them) with libarchive, compressed with
// "gzip", "zstd" or "" (none).
void write_layer(const fs::path& out, const std::vector<Entry>& entries,
                 const std::string& compression) {
  archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  if (compression == "gzip") archive_write_add_filter_gzip(a);
  if (compression == "zstd") archive_write_add_filter_zstd(a);
  REQUIRE(archive_write_open_filename(a, out.c_str()) == ARCHIVE_OK);
  for (const Entry& e : entries) {
    archive_entry* entry = archive_entry_new();
    archive_entry_set_pathname(entry, e.path.c_str());
    archive_entry_set_uid(entry, e.uid);
    archive_entry_set_gid(entry, e.gid);
    archive_entry_set_mtime(entry, 1700000000, 0);
    switch (e.type) {
      case 'f':
        archive_entry_set_filetype(entry, AE_IFREG);
        archive_entry_set_size(entry, la_int64_t(e.data.size()));
        break;
      case 'd':
        archive_entry_set_filetype(entry, AE_IFDIR);
        break;
      case 'l':
        archive_entry_set_filetype(entry, AE_IFLNK);
        archive_entry_set_symlink(entry, e.data.c_str());
        break;
      case 'h':
        archive_entry_set_filetype(entry, AE_IFREG);
        archive_entry_set_hardlink(entry, e.data.c_str());
        break;
      case 'c':
        archive_entry_set_filetype(entry, AE_IFCHR);
        archive_entry_set_rdev(entry, makedev(e.major, e.minor));
        break;
    }
    archive_entry_set_perm(entry, e.mode);
    REQUIRE(archive_write_header(a, entry) == ARCHIVE_OK);
    if (e.type == 'f' && !e.data.empty()) {
      REQUIRE(archive_write_data(a, e.data.data(), e.data.size()) == la_ssize_t(e.data.size()));
    }
    archive_entry_free(entry);
  }
  REQUIRE(archive_write_close(a) == ARCHIVE_OK);
  archive_write_free(a);
}

// A blob in an OCI layout: its file named by its digest; the descriptor.
json add_blob(const fs::path& layout, const fs::path& file, const std::string& media_type) {
  std::string hex = sha256_of(file);
  fs::create_directories(layout / "blobs" / "sha256");
  fs::copy_file(file, layout / "blobs" / "sha256" / hex, fs::copy_options::overwrite_existing);
  return {{"mediaType", media_type}, {"digest", "sha256:" + hex}, {"size", fs::file_size(file)}};
}

json add_json_blob(const fs::path& layout, const json& doc, const std::string& media_type,
                   const fs::path& scratch) {
  fs::path file = scratch / "blob.json";
  msb::test::write_text(file, doc.dump());
  return add_blob(layout, file, media_type);
}

const char* kLayerTar = "application/vnd.oci.image.layer.v1.tar";
const char* kLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip";
const char* kLayerZstd = "application/vnd.oci.image.layer.v1.tar+zstd";
const char* kManifestType = "application/vnd.oci.image.manifest.v1+json";
const char* kIndexType = "application/vnd.oci.image.index.v1+json";
const char* kConfigType = "application/vnd.oci.image.config.v1+json";

json image_config(const std::string& arch = "amd64") {
  return {{"architecture", arch},
          {"os", "linux"},
          {"config",
           {{"Env", {"PATH=/usr/bin:/bin", "GREETING=hello world"}},
            {"Entrypoint", {"/bin/tool"}},
            {"Cmd", {"--help"}},
            {"WorkingDir", "/home/u"},
            {"User", "1000:1000"}}},
          {"rootfs", {{"type", "layers"}, {"diff_ids", json::array()}}}};
}

// The three layers of the test image: the second deletes a file, makes a folder opaque and adds
// to it; the third replaces a file that has a hard link (the link keeps the old content).
// Compressed (gzip, zstd, none) as an OCI layout may have them, or all plain as docker save has.
std::vector<fs::path> write_test_layers(const fs::path& scratch, bool compressed = true) {
  std::vector<fs::path> layers = {scratch / "layer1.tar.gz", scratch / "layer2.tar.zst",
                                  scratch / "layer3.tar"};
  if (!compressed)
    layers = {scratch / "plain1.tar", scratch / "plain2.tar", scratch / "plain3.tar"};
  write_layer(layers[0],
              {dir("./", 0751),
               dir("etc"),
               file("etc/hello", "v1\n"),
               file("gone.txt", "bye\n"),
               dir("opaque"),
               file("opaque/old1", "old\n"),
               dir("opaque/sub"),
               file("opaque/sub/old2", "old\n"),
               dir("keep"),
               file("keep/a", "a\n"),
               dir("bin"),
               file("bin/tool", "#!\n", 04755),
               dir("home"),
               dir("home/u", 0750, 1000, 1000),
               file("home/u/secret", "s\n", 0640, 1000, 1000),
               symlink("link", "etc/hello"),
               hardlink("hard", "etc/hello"),
               dir("dev"),
               Entry{"dev/null", 'c', "", 0666, 0, 0, 1, 3},
               file("./dotted", "dot\n"),
               dir("odd name"),
               file("odd name/a \"quoted\" file", "q\n", 0600, 1000, 1000)},
              compressed ? "gzip" : "");
  write_layer(layers[1],
              {file("opaque/new", "new\n"), file("opaque/implied/new2", "new\n"),
               file(".wh.gone.txt", ""), file("opaque/.wh..wh..opq", ""), file("keep/b", "b\n")},
              compressed ? "zstd" : "");
  write_layer(layers[2], {file("etc/hello", "v2\n", 0600)}, "");
  return layers;
}

// An OCI image layout with the test image, its ref name `ref`.
void write_oci_layout(const fs::path& layout, const fs::path& scratch, const std::string& ref,
                      bool compressed = true) {
  fs::create_directories(layout);
  std::vector<fs::path> files = write_test_layers(scratch, compressed);
  json layers = {add_blob(layout, files[0], compressed ? kLayerGzip : kLayerTar),
                 add_blob(layout, files[1], compressed ? kLayerZstd : kLayerTar),
                 add_blob(layout, files[2], kLayerTar)};
  json manifest = {{"schemaVersion", 2},
                   {"mediaType", kManifestType},
                   {"config", add_json_blob(layout, image_config(), kConfigType, scratch)},
                   {"layers", layers}};
  json descriptor = add_json_blob(layout, manifest, kManifestType, scratch);
  descriptor["annotations"] = {{"org.opencontainers.image.ref.name", ref}};
  msb::test::write_text(layout / "oci-layout", R"({"imageLayoutVersion":"1.0.0"})");
  msb::test::write_text(layout / "index.json",
                        json{{"schemaVersion", 2}, {"manifests", {descriptor}}}.dump());
}

struct MsbHome {
  TempDir dir;
  ProcessResult operator()(std::vector<std::string> args) {
    args.insert(args.begin(), {MSB_BINARY, "--home", dir.path().string()});
    return run_process(args);
  }
  json images() {
    ProcessResult r = (*this)({"image", "ls", "--json"});
    REQUIRE(r.exit_code == 0);
    return json::parse(r.out);
  }
  json stats() {
    ProcessResult r = (*this)({"store", "stats", "--json"});
    REQUIRE(r.exit_code == 0);
    return json::parse(r.out);
  }
  // The image's ext4, materialized as a sandbox would get it.
  fs::path ext4(const std::string& tag) {
    msb::core::Home home = msb::core::Home::resolve(dir.path());
    auto store = home.open_store();
    return msb::core::prepare_image(home, *store, tag).ext4;
  }
  // Nothing of a failed import is left: no image, no chunk, no scratch folder.
  void require_nothing_left() {
    REQUIRE(images().empty());
    REQUIRE(stats()["chunks"] == 0);
    std::error_code ec;
    REQUIRE(fs::is_empty(dir / "tmp", ec));
  }
};

void require_ok(const ProcessResult& r) {
  INFO("exit " << r.exit_code << ", stdout: " << r.out << ", stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
}

void require_error(const ProcessResult& r, const std::string& needle) {
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.err, Catch::StartsWith("msb: error: ") && Catch::Contains(needle));
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

// What debugfs's "ls -p" says of a folder's entries: name -> inode, mode (octal), uid, gid.
struct Inode {
  unsigned long ino = 0;
  unsigned mode = 0, uid = 0, gid = 0;
};
std::map<std::string, Inode> list_dir(const fs::path& ext4, const std::string& path) {
  ProcessResult r = run_process({tool("debugfs"), "-R", "ls -p " + path, ext4.string()});
  REQUIRE(r.exit_code == 0);
  std::map<std::string, Inode> out;
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    // "/12/100644/0/0/name/size/"
    std::vector<std::string> f;
    size_t start = 1;
    while (start < line.size()) {
      size_t end = line.find('/', start);
      if (end == std::string::npos) break;
      f.push_back(line.substr(start, end - start));
      start = end + 1;
    }
    if (f.size() < 5 || f[4] == "." || f[4] == "..") continue;
    out[f[4]] = Inode{std::stoul(f[0]), unsigned(std::stoul(f[1], nullptr, 8)),
                      unsigned(std::stoul(f[2])), unsigned(std::stoul(f[3]))};
  }
  return out;
}

std::string debugfs(const fs::path& ext4, const std::string& request) {
  ProcessResult r = run_process({tool("debugfs"), "-R", request, ext4.string()});
  REQUIRE(r.exit_code == 0);
  return r.out;
}

// The checks of the test image's content, whoever imported it.
void check_test_image(const fs::path& ext4) {
  auto root = list_dir(ext4, "/");
  CHECK(root.count("gone.txt") == 0);  // whiteout
  CHECK(root.count("dotted") == 1);    // "./dotted"
  CHECK(root.at("link").mode == 0120777);
  CHECK_THAT(debugfs(ext4, "stat /link"), Catch::Contains("Fast link dest: \"etc/hello\""));
  auto etc = list_dir(ext4, "/etc");
  // The third layer replaced etc/hello; "hard" was a hard link of the old file and keeps it.
  CHECK(debugfs(ext4, "cat /etc/hello") == "v2\n");
  CHECK(etc.at("hello").mode == 0100600);
  CHECK(debugfs(ext4, "cat /hard") == "v1\n");
  CHECK(root.at("hard").ino != etc.at("hello").ino);
  CHECK(root.at("hard").mode == 0100644);
  auto opaque = list_dir(ext4, "/opaque");
  // old1 and sub/ hidden by the opaque whiteout; new and implied/ (no entry of its own) added
  // before the whiteout in the same layer stay.
  CHECK(opaque.size() == 2);
  CHECK(opaque.count("new") == 1);
  CHECK(list_dir(ext4, "/opaque/implied").count("new2") == 1);
  auto keep = list_dir(ext4, "/keep");
  CHECK(keep.size() == 2);
  CHECK(debugfs(ext4, "cat /keep/a") == "a\n");
  auto bin = list_dir(ext4, "/bin");
  CHECK(bin.at("tool").mode == 0104755);  // setuid kept
  CHECK(bin.at("tool").uid == 0);
  auto home = list_dir(ext4, "/home");
  CHECK(home.at("u").mode == 040750);
  CHECK(home.at("u").uid == 1000);
  CHECK(home.at("u").gid == 1000);
  auto u = list_dir(ext4, "/home/u");
  CHECK(u.at("secret").mode == 0100640);
  CHECK(u.at("secret").uid == 1000);
  CHECK(u.at("secret").gid == 1000);
  auto dev = list_dir(ext4, "/dev");
  CHECK(dev.at("null").mode == 020666);
  CHECK_THAT(debugfs(ext4, "stat /dev/null"), Catch::Contains("Device major/minor number: 01:03"));
  // The root folder as the first layer has it.
  CHECK_THAT(debugfs(ext4, "stat /"),
             Catch::Contains("Mode:  0751") && Catch::Contains("User:     0   Group:     0"));
  // Names debugfs needs quoted (owners are set with it without root).
  auto odd = list_dir(ext4, "\"/odd name\"");
  CHECK(odd.at("a \"quoted\" file").uid == 1000);
  CHECK(odd.at("a \"quoted\" file").mode == 0100600);
  // No whiteout file made it in.
  CHECK(list_dir(ext4, "/opaque").count(".wh..wh..opq") == 0);
  // A clean file system.
  ProcessResult fsck = run_process({tool("e2fsck"), "-fn", ext4.string()});
  INFO(fsck.out << fsck.err);
  CHECK(fsck.exit_code == 0);
}

}  // namespace

TEST_CASE("an OCI layout imports with whiteouts, opaque folders, links, owners and its config") {
  need_tools();
  TempDir work;
  write_oci_layout(work / "layout", work.path(), "v1");
  MsbHome msb;
  ProcessResult r =
      msb({"image", "import", (work / "layout").string(), "--tag", "example/app:v1", "--json"});
  require_ok(r);
  json imported = json::parse(r.out);
  CHECK(imported["tag"] == "example/app:v1");
  CHECK(imported["id"].get<std::string>().size() == 64);
  CHECK(imported["size"].get<uint64_t>() >= (1ull << 30));

  json images = msb.images();
  REQUIRE(images.size() == 1);
  const json& image = images[0];
  CHECK(image["tag"] == "example/app:v1");
  CHECK(image["id"] == imported["id"]);
  CHECK(image["config"]["env"] == json({"PATH=/usr/bin:/bin", "GREETING=hello world"}));
  CHECK(image["config"]["entrypoint"] == json({"/bin/tool"}));
  CHECK(image["config"]["cmd"] == json({"--help"}));
  CHECK(image["config"]["workdir"] == "/home/u");
  CHECK(image["config"]["user"] == "1000:1000");
  CHECK_THAT(image["source"].get<std::string>(), Catch::EndsWith("layout"));
  // The id is the config blob's digest, as docker's image ids are.
  json index = json::parse(msb::test::read_text(work / "layout" / "index.json"));
  std::string manifest_hex = index["manifests"][0]["digest"].get<std::string>().substr(7);
  json manifest =
      json::parse(msb::test::read_text(work / "layout" / "blobs" / "sha256" / manifest_hex));
  CHECK("sha256:" + image["id"].get<std::string>() == manifest["config"]["digest"]);

  fs::path ext4 = msb.ext4("example/app:v1");
  CHECK(ext4.parent_path() == msb.dir / "cache" / "images");
  CHECK((fs::status(ext4).permissions() & fs::perms::owner_write) == fs::perms::none);
  check_test_image(ext4);

  // The table has the columns and the short id.
  r = msb({"image", "ls"});
  require_ok(r);
  CHECK_THAT(r.out, Catch::StartsWith("TAG") && Catch::Contains("SOURCE") &&
                        Catch::Contains(image["id"].get<std::string>().substr(0, 12)) &&
                        Catch::Contains("example/app:v1"));
  // Nothing left in the scratch space.
  CHECK(fs::is_empty(msb.dir / "tmp"));
}

TEST_CASE("a docker save tarball imports, and the image named by --tag is picked among several") {
  need_tools();
  TempDir work;
  fs::path save = work / "save";
  fs::create_directories(save);
  std::vector<fs::path> files = write_test_layers(work.path(), /*compressed=*/false);
  // Docker's older format: plain tar layers in ID/layer.tar, checked against the config's
  // diff_ids, and the config in HEX.json.
  json config = image_config();
  json layer_paths = json::array();
  for (size_t i = 0; i < files.size(); ++i) {
    const fs::path& plain = files[i];
    std::string hex = sha256_of(plain);
    config["rootfs"]["diff_ids"].push_back("sha256:" + hex);
    fs::create_directories(save / ("layer" + std::to_string(i)));
    fs::copy_file(plain, save / ("layer" + std::to_string(i)) / "layer.tar");
    layer_paths.push_back("layer" + std::to_string(i) + "/layer.tar");
  }
  msb::test::write_text(work / "config.json", config.dump());
  std::string config_hex = sha256_of(work / "config.json");
  fs::copy_file(work / "config.json", save / (config_hex + ".json"));
  // A second image in the same tarball: only its first layer, another config.
  json other_config = image_config();
  other_config["config"]["Env"] = {"OTHER=1"};
  other_config["rootfs"]["diff_ids"] = {config["rootfs"]["diff_ids"][0]};
  msb::test::write_text(work / "other.json", other_config.dump());
  std::string other_hex = sha256_of(work / "other.json");
  fs::copy_file(work / "other.json", save / (other_hex + ".json"));
  json manifest = json::array({{{"Config", other_hex + ".json"},
                                {"RepoTags", {"docker.io/library/other:1"}},
                                {"Layers", {layer_paths[0]}}},
                               {{"Config", config_hex + ".json"},
                                {"RepoTags", {"example/app:1.0"}},
                                {"Layers", layer_paths}}});
  msb::test::write_text(save / "manifest.json", manifest.dump());
  fs::path tarball = work / "app.tar";
  require_ok(run_process({tool("tar"), "-C", save.string(), "-cf", tarball.string(), "."}));

  MsbHome msb;
  require_ok(msb({"image", "import", tarball.string(), "--tag", "example/app:1.0"}));
  json images = msb.images();
  REQUIRE(images.size() == 1);
  CHECK(images[0]["id"] == config_hex);
  CHECK(images[0]["config"]["user"] == "1000:1000");
  check_test_image(msb.ext4("example/app:1.0"));

  // Docker Hub's implicit "docker.io/library/" matches the short name.
  require_ok(msb({"image", "import", tarball.string(), "--tag", "other:1"}));
  images = msb.images();
  REQUIRE(images.size() == 2);
  CHECK(images[0]["tag"] == "example/app:1.0");
  CHECK(images[1]["tag"] == "other:1");
  CHECK(images[1]["config"]["env"] == json({"OTHER=1"}));
  auto other_root = list_dir(msb.ext4("other:1"), "/");
  CHECK(other_root.count("gone.txt") == 1);  // its one layer has no whiteout on top

  // skopeo's docker-archive: layers named HEX.tar, ID/layer.tar links to them.
  if (::access("/usr/bin/skopeo", X_OK) == 0) {
    TempDir oci;
    write_oci_layout(oci / "layout", oci.path(), "v1", /*compressed=*/false);  // docker has no zstd
    fs::path archive = oci / "skopeo.tar";
    require_ok(run_process({"/usr/bin/skopeo", "copy", "--quiet",
                            "oci:" + (oci / "layout").string() + ":v1",
                            "docker-archive:" + archive.string() + ":example/skopeo:v1"}));
    require_ok(msb({"image", "import", archive.string(), "--tag", "example/skopeo:v1"}));
    check_test_image(msb.ext4("example/skopeo:v1"));
    require_ok(msb({"image", "rm", "example/skopeo:v1"}));
  } else {
    WARN("skopeo is not installed: its docker-archive format goes untested");
  }
  require_error(msb({"image", "import", tarball.string(), "--tag", "nope:1"}),
                "holds 2 images (docker.io/library/other:1, example/app:1.0) and none is nope:1");
  CHECK(fs::is_empty(msb.dir / "tmp"));

  // A corrupt layer (same size, one byte changed) is refused by its diff_id.
  {
    std::fstream f(save / "layer1" / "layer.tar", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(700);
    f.put('X');
  }
  fs::path bad = work / "bad.tar";
  require_ok(run_process({tool("tar"), "-C", save.string(), "-cf", bad.string(), "."}));
  MsbHome fresh;
  require_error(fresh({"image", "import", bad.string(), "--tag", "example/app:1.0"}), "is corrupt");
  fresh.require_nothing_left();
}

TEST_CASE("two tags of one image share one ext4, and rm and gc reclaim it") {
  need_tools();
  TempDir work;
  write_oci_layout(work / "layout", work.path(), "v1");
  MsbHome msb;
  require_ok(msb({"image", "import", (work / "layout").string(), "--tag", "app:a"}));
  json before = msb.stats();
  CHECK(before["chunks"].get<uint64_t>() > 0);
  auto start = std::chrono::steady_clock::now();
  require_ok(msb({"image", "import", (work / "layout").string(), "--tag", "app:b"}));
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  json after = msb.stats();
  CHECK(after["chunks"] == before["chunks"]);  // nothing was built or stored again
  CHECK(after["stored_bytes"] == before["stored_bytes"]);
  CHECK(seconds < 5);
  json images = msb.images();
  REQUIRE(images.size() == 2);
  CHECK(images[0]["id"] == images[1]["id"]);
  CHECK(msb.ext4("app:a") == msb.ext4("app:b"));

  // Re-importing a tag replaces it.
  require_ok(msb({"image", "import", (work / "layout").string(), "--tag", "app:a"}));
  CHECK(msb.images().size() == 2);

  // A typo removes nothing.
  require_error(msb({"image", "rm", "app:a", "app:nope"}), "no image app:nope");
  CHECK(msb.images().size() == 2);
  require_ok(msb({"image", "rm", "app:a"}));
  require_ok(msb({"store", "gc"}));
  CHECK(msb.stats()["chunks"] == before["chunks"]);  // app:b holds it
  CHECK(msb.images().size() == 1);
  require_ok(msb({"image", "rm", "app:b"}));
  CHECK(msb.images().empty());
  require_ok(msb({"store", "gc"}));
  CHECK(msb.stats()["chunks"] == 0);
  CHECK(msb.stats()["names"] == 0);
  require_error(msb({"image", "rm", "app:b"}), "no image app:b");
  require_error(msb({"image", "rm", "Bad:Tag"}), "invalid image reference");

  // gc pruned the cached ext4 of the image no name reaches any more; nothing is left to prune.
  msb::core::Home home = msb::core::Home::resolve(msb.dir.path());
  auto store = home.open_store();
  CHECK(!fs::exists(msb::core::image_cache_path(home, images[0]["id"])));
  CHECK(msb::core::prune_image_caches(home, *store) == 0);
}

TEST_CASE("an index with several platforms yields linux/amd64, and several images need --tag") {
  need_tools();
  TempDir work;
  fs::path layout = work / "layout";
  write_oci_layout(layout, work.path(), "v1");
  json index = json::parse(msb::test::read_text(layout / "index.json"));
  json amd64 = index["manifests"][0];
  amd64.erase("annotations");
  amd64["platform"] = {{"os", "linux"}, {"architecture", "amd64"}};
  // An arm64 image: another config, the same layers.
  std::string amd64_hex = amd64["digest"].get<std::string>().substr(7);
  json manifest = json::parse(msb::test::read_text(layout / "blobs" / "sha256" / amd64_hex));
  manifest["config"] = add_json_blob(layout, image_config("arm64"), kConfigType, work.path());
  json arm64 = add_json_blob(layout, manifest, kManifestType, work.path());
  arm64["platform"] = {{"os", "linux"}, {"architecture", "arm64"}};
  json nested = add_json_blob(layout, json{{"schemaVersion", 2}, {"manifests", {arm64, amd64}}},
                              kIndexType, work.path());
  nested["annotations"] = {{"org.opencontainers.image.ref.name", "multi"}};
  json arm_only = arm64;
  arm_only["annotations"] = {{"org.opencontainers.image.ref.name", "arm"}};
  index["manifests"].push_back(nested);
  index["manifests"].push_back(arm_only);
  msb::test::write_text(layout / "index.json", index.dump());

  MsbHome msb;
  require_ok(msb({"image", "import", layout.string(), "--tag", "app:multi"}));
  CHECK(msb.images()[0]["config"]["user"] == "1000:1000");
  require_error(msb({"image", "import", layout.string(), "--tag", "app:arm"}),
                "linux/arm64; msb runs linux/amd64");
  require_error(msb({"image", "import", layout.string(), "--tag", "app:v2"}),
                "holds 3 images (arm, multi, v1) and none is app:v2");
  CHECK(msb.images().size() == 1);
  CHECK(fs::is_empty(msb.dir / "tmp"));
}

TEST_CASE("bad sources, unsafe layers and bad tags are refused with one line, leaving nothing") {
  need_tools();
  TempDir work;
  MsbHome msb;
  require_error(msb({"image", "import", (work / "missing").string(), "--tag", "a:b"}),
                "cannot import " + (work / "missing").string() + ": No such file or directory");
  fs::create_directories(work / "empty");
  require_error(msb({"image", "import", (work / "empty").string(), "--tag", "a:b"}),
                "is neither an OCI image layout (oci-layout, index.json) nor a docker save");
  msb::test::write_text(work / "notes.txt", "not an image\n");
  require_error(msb({"image", "import", (work / "notes.txt").string(), "--tag", "a:b"}),
                "is neither an OCI image layout nor a docker save tarball");
  msb.require_nothing_left();

  for (const char* tag : {"Upper:case", "a:b:c", "a@sha256:00", ":t", "a:-t", "a//b"}) {
    INFO(tag);
    require_error(msb({"image", "import", (work / "empty").string(), "--tag", tag}),
                  "invalid image reference");
  }

  // A corrupt blob: one byte of a layer changed, same size.
  write_oci_layout(work / "layout", work.path(), "v1");
  json index = json::parse(msb::test::read_text(work / "layout" / "index.json"));
  std::string manifest_hex = index["manifests"][0]["digest"].get<std::string>().substr(7);
  json manifest =
      json::parse(msb::test::read_text(work / "layout" / "blobs" / "sha256" / manifest_hex));
  fs::path layer = work / "layout" / "blobs" / "sha256" /
                   manifest["layers"][1]["digest"].get<std::string>().substr(7);
  {
    std::fstream f(layer, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(20);
    f.put('X');
  }
  require_error(msb({"image", "import", (work / "layout").string(), "--tag", "a:b"}),
                "layer 2 of 3");
  require_error(msb({"image", "import", (work / "layout").string(), "--tag", "a:b"}), "is corrupt");
  msb.require_nothing_left();

  // Layers that would write outside the root file system.
  struct Unsafe {
    std::vector<Entry> lower, upper;
    std::string error;
  };
  const fs::path outside = work / "outside";
  fs::create_directories(outside);
  msb::test::write_text(outside / "keep.txt", "keep\n");
  std::vector<Unsafe> cases = {
      {{file("../escape", "x")}, {}, "unsafe path \"../escape\""},
      {{file("/abs", "x")}, {}, "unsafe path \"/abs\" (absolute)"},
      {{symlink("esc", outside.string())},
       {file("esc/planted", "x")},
       "unsafe path \"esc/planted\" (through the symbolic link \"/esc\")"},
      {{symlink("esc", outside.string())},
       {file("esc/.wh.keep.txt", "")},
       "through the symbolic link"},
      {{hardlink("h", "../../etc/passwd")}, {}, "unsafe path \"../../etc/passwd\""},
      {{symlink("./", outside.string())},
       {file(".wh.planted", "")},
       "unsafe path \"./\" (the root must be a folder)"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    INFO("case " << i);
    fs::path dir_i = work / ("unsafe" + std::to_string(i));
    fs::create_directories(dir_i / "layout");
    write_layer(dir_i / "l1.tar", cases[i].lower, "");
    json layers = {add_blob(dir_i / "layout", dir_i / "l1.tar", kLayerTar)};
    if (!cases[i].upper.empty()) {
      write_layer(dir_i / "l2.tar", cases[i].upper, "");
      layers.push_back(add_blob(dir_i / "layout", dir_i / "l2.tar", kLayerTar));
    }
    json m = {{"schemaVersion", 2},
              {"config", add_json_blob(dir_i / "layout", image_config(), kConfigType, dir_i)},
              {"layers", layers}};
    json d = add_json_blob(dir_i / "layout", m, kManifestType, dir_i);
    msb::test::write_text(dir_i / "layout" / "oci-layout", R"({"imageLayoutVersion":"1.0.0"})");
    msb::test::write_text(dir_i / "layout" / "index.json",
                          json{{"schemaVersion", 2}, {"manifests", {d}}}.dump());
    require_error(msb({"image", "import", (dir_i / "layout").string(), "--tag", "a:b"}),
                  cases[i].error);
    CHECK(std::distance(fs::directory_iterator(outside), fs::directory_iterator()) == 1);
    CHECK(msb::test::read_text(outside / "keep.txt") == "keep\n");
    msb.require_nothing_left();
  }

  // A tarball whose manifest.json is a link to a host file.
  fs::create_directories(work / "linked");
  fs::create_symlink("/etc/hostname", work / "linked" / "manifest.json");
  require_ok(run_process(
      {tool("tar"), "-C", (work / "linked").string(), "-cf", (work / "linked.tar").string(), "."}));
  require_error(msb({"image", "import", (work / "linked.tar").string(), "--tag", "a:b"}),
                "unsafe path \"manifest.json\" (a symbolic link that leads outside the archive)");
  msb.require_nothing_left();

  // User store names may not take an image's.
  msb::test::write_text(work / "f", "x");
  require_error(msb({"store", "put", "image.x", (work / "f").string()}), "msb's own");
}

// Root runs msb as nobody here; without root, the other tests in this file take that path.
TEST_CASE("without root, owners, modes and device nodes still come out right (debugfs)",
          "[needs-root]") {
  need_tools();
  if (::geteuid() != 0) {
    std::printf("SKIPPED: not root: this test runs msb as nobody with setpriv\n");
    std::exit(77);
  }
  TempDir work;
  write_oci_layout(work / "layout", work.path(), "v1");
  MsbHome msb;
  // nobody's own state directory, and a layout it can read.
  for (const auto& p : fs::recursive_directory_iterator(work.path())) {
    ::chown(p.path().c_str(), 65534, 65534);
  }
  ::chown(work.path().c_str(), 65534, 65534);
  ::chown(msb.dir.path().c_str(), 65534, 65534);
  ProcessResult r = run_process({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534",
                                 "--clear-groups", MSB_BINARY, "--home", msb.dir.path().string(),
                                 "image", "import", (work / "layout").string(), "--tag", "app:v1"});
  require_ok(r);
  check_test_image(msb.ext4("app:v1"));
  // The root folder and the folders made on the way belong to root.
  auto root = list_dir(msb.ext4("app:v1"), "/");
  CHECK(root.at("etc").uid == 0);
  CHECK(root.at("lost+found").uid == 0);
  CHECK_THAT(debugfs(msb.ext4("app:v1"), "stat /"), Catch::Contains("User:     0   Group:     0"));
}

TEST_CASE("the default image is built from busybox-static once and has a shell") {
  need_tools();
  if (::access("/bin/busybox", X_OK) != 0) {
    std::printf("SKIPPED: the default image needs /bin/busybox (Debian package busybox-static)\n");
    std::exit(77);
  }
  MsbHome msb;
  msb::core::Home home = msb::core::Home::resolve(msb.dir.path());
  msb::core::PreparedImage prepared;
  {
    auto store = home.open_store();
    prepared = msb::core::prepare_image(home, *store, msb::core::kDefaultImage);
  }
  CHECK(prepared.info.tag == "busybox:latest");
  CHECK_THAT(prepared.info.source, Catch::StartsWith("busybox-static "));
  CHECK(prepared.info.config.env ==
        std::vector<std::string>{
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"});
  CHECK(prepared.info.config.cmd == std::vector<std::string>{"/bin/sh"});
  const fs::path ext4 = prepared.ext4;
  auto bin = list_dir(ext4, "/bin");
  CHECK(bin.at("busybox").mode == 0100755);
  CHECK(bin.at("sh").mode == 0120777);
  CHECK_THAT(debugfs(ext4, "stat /bin/sh"), Catch::Contains("Fast link dest: \"/bin/busybox\""));
  CHECK(list_dir(ext4, "/usr/bin").count("awk") == 1);
  CHECK_THAT(debugfs(ext4, "cat /etc/passwd"),
             Catch::Contains("root:x:0:0:") && Catch::Contains("user:x:1000:1000:"));
  auto root = list_dir(ext4, "/");
  CHECK(root.at("tmp").mode == 041777);
  CHECK(root.at("root").mode == 040700);
  for (const char* d : {"proc", "sys", "dev", "run", "etc", "sbin"})
    CHECK(root.count(d) == 1);
  auto home_dir = list_dir(ext4, "/home");
  CHECK(home_dir.at("user").uid == 1000);
  CHECK(home_dir.at("user").gid == 1000);
  CHECK(msb.images().size() == 1);

  // The second time it is there already: the same file, not written again.
  struct stat before {
  }, after{};
  REQUIRE(::stat(ext4.c_str(), &before) == 0);
  {
    auto store = home.open_store();
    msb::core::PreparedImage again = msb::core::prepare_image(home, *store, "busybox");
    CHECK(again.ext4 == ext4);
    CHECK(again.manifest == prepared.manifest);  // the stored image, not a second build
  }
  REQUIRE(::stat(ext4.c_str(), &after) == 0);
  CHECK(after.st_ino == before.st_ino);
  CHECK(after.st_mtim.tv_sec == before.st_mtim.tv_sec);
  CHECK(after.st_mtim.tv_nsec == before.st_mtim.tv_nsec);
  CHECK(msb.images().size() == 1);
  // Gone from the store, it is built again with the same id.
  std::string id = prepared.info.id;
  require_ok(msb({"image", "rm", "busybox"}));
  {
    auto store = home.open_store();
    CHECK(msb::core::prepare_image(home, *store, "busybox:latest").info.id == id);
  }
}

TEST_CASE("image references are normalized to NAME:TAG") {
  using msb::core::normalize_image_tag;
  CHECK(normalize_image_tag("busybox") == "busybox:latest");
  CHECK(normalize_image_tag("busybox:1.36") == "busybox:1.36");
  CHECK(normalize_image_tag("library/debian:bookworm-slim") == "library/debian:bookworm-slim");
  CHECK(normalize_image_tag("localhost:5000/team/app") == "localhost:5000/team/app:latest");
  CHECK(normalize_image_tag("registry.example.com:5000/a_b/c-d.e:V1_2.3-x") ==
        "registry.example.com:5000/a_b/c-d.e:V1_2.3-x");
  for (const std::string& bad :
       {std::string(""), std::string("Busybox"), std::string("a:"), std::string("a:.x"),
        std::string("a b"), std::string("a@sha256:abc"), std::string("-a"), std::string("a/"),
        std::string("a:") + std::string(129, 't')}) {
    INFO(bad);
    CHECK_THROWS_AS(normalize_image_tag(bad), msb::core::ImageError);
  }
}
