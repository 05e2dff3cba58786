// vmm tier: the flags of the sandbox and snapshot commands that only a booted guest shows at work,
// run through the msb binary with msb's test guest: logs --follow, stop --timeout, create and
// run with --cmdline, --initrd and the rest of create's options, run's --name, --workdir,
// --user and --timeout, restore --json, and the human-readable snapshot ls and inspect.
// tests/check_cli_coverage.py checks that every command and flag has a test like these. Each test
// exits 77 with the reason printed where /dev/kvm is missing.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <sstream>
#include <thread>

#include "cli/output.h"
#include "tests/msb_cli.h"

using msb::test::Background;
using msb::test::checksum_line;
using msb::test::eventually;
using msb::test::InputFifo;
using msb::test::Msb;
using msb::test::pattern_bytes;
using msb::test::ProcessResult;
using msb::test::read_text;
using msb::test::require_error;
using msb::test::require_ok;
using msb::test::TempDir;
using msb::test::write_text;
using nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace {

json box_info(Msb& msb, const std::string& name) {
  for (const json& box : msb.ls())
    if (box.at("name") == name) return box;
  FAIL("no sandbox " << name << " in msb ls");
  return {};
}

// What the test guest prints as the checksum of `mib` MiB of zeros.
std::string zero_checksum_line(uint64_t mib) {
  uint64_t checksum = msb::pattern::kChecksumInit;
  for (uint64_t i = 0; i < (mib << 17); ++i)
    checksum = msb::pattern::checksum_update(checksum, 0);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016" PRIx64 "\n", checksum);
  return buf;
}

std::vector<std::string> words_of(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> out;
  for (std::string word; in >> word;)
    out.push_back(word);
  return out;
}

std::string sha256_of(const fs::path& file) {
  ProcessResult r = msb::test::run_process({"/usr/bin/sha256sum", file.string()});
  REQUIRE(r.exit_code == 0);
  return r.out.substr(0, 64);
}

// An OCI image layout at `dir` with one image per (tag, config): images without layers (an
// empty root file system), whose configs say what msb takes from an image: Cmd, Env, User.
void write_oci_layout(const fs::path& dir,
                      const std::vector<std::pair<std::string, json>>& images) {
  fs::create_directories(dir / "blobs/sha256");
  write_text(dir / "oci-layout", R"({"imageLayoutVersion":"1.0.0"})");
  auto add_blob = [&](const std::string& text) {
    write_text(dir / "blob", text);
    std::string digest = sha256_of(dir / "blob");
    fs::rename(dir / "blob", dir / "blobs/sha256" / digest);
    return json{{"digest", "sha256:" + digest}, {"size", text.size()}};
  };
  json manifests = json::array();
  for (const auto& [tag, config] : images) {
    json config_doc = {{"architecture", "amd64"},
                       {"os", "linux"},
                       {"config", config},
                       {"rootfs", {{"type", "layers"}, {"diff_ids", json::array()}}}};
    json config_descriptor = add_blob(config_doc.dump());
    config_descriptor["mediaType"] = "application/vnd.oci.image.config.v1+json";
    json manifest = {{"schemaVersion", 2},
                     {"mediaType", "application/vnd.oci.image.manifest.v1+json"},
                     {"config", config_descriptor},
                     {"layers", json::array()}};
    json descriptor = add_blob(manifest.dump());
    descriptor["mediaType"] = "application/vnd.oci.image.manifest.v1+json";
    descriptor["annotations"] = {{"org.opencontainers.image.ref.name", tag}};
    manifests.push_back(descriptor);
  }
  write_text(dir / "index.json", json{{"schemaVersion", 2}, {"manifests", manifests}}.dump());
}

}  // namespace

TEST_CASE("msb logs --follow prints what the console gets until the sandbox stops", "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box"}));
  Background follow(msb, {"logs", "--follow", "box"});
  // It prints the log so far (the VMM's line, then the test guest's boot lines)...
  REQUIRE(eventually([&] {
    return follow.result().out.find(", Linux boot\n") != std::string::npos || follow.exited();
  }));
  REQUIRE_THAT(follow.result().out, Catch::StartsWith("msb: kernel command line: "));
  // ... and keeps waiting for more while the sandbox runs (it would have ended by now if not).
  REQUIRE(msb.exec({"echo", "still here"}) == "still here\n");
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  REQUIRE_FALSE(follow.exited());
  REQUIRE(follow.result().out.find("testguest: power off") == std::string::npos);

  // msb stop: the test guest says "power off" on its console as it goes; msb logs --follow
  // prints that line, which came after it started, and ends by itself once the sandbox stopped.
  require_ok(msb({"stop", "box"}));
  ProcessResult followed = follow.wait(std::chrono::seconds(60));
  require_ok(followed);
  REQUIRE(followed.err.empty());
  REQUIRE_THAT(followed.out, Catch::EndsWith("\ntestguest: power off\n"));
  REQUIRE(followed.out == read_text(msb.dir("box") / "console.log"));
  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE(logs.out == followed.out);

  // On a stopped sandbox there is nothing to wait for: --follow prints the log and returns.
  ProcessResult again = msb({"logs", "-f", "box"});
  require_ok(again);
  REQUIRE(again.out == followed.out);
}

TEST_CASE("msb stop --timeout stops a guest that does not power off once the time is up",
          "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box"}));
  const int vmm = std::stoi(read_text(msb.dir("box") / "pid"));
  // The test guest's `out` streams for hours and reads no request meanwhile: the power-off that
  // msb stop sends after it stays unread. Once the VMM counts the exec as running, the guest has
  // its request ahead of the power-off's.
  Background streaming(msb, {"exec", "box", "--", "out", "1000000", "1"}, "/dev/null",
                       /*discard_stdout=*/true);
  REQUIRE(eventually(
      [&] { return streaming.exited() || msb.vmm_status("box").value("running", 0) == 1; }));
  REQUIRE_FALSE(streaming.exited());

  const auto before = Clock::now();
  ProcessResult stop = msb({"stop", "--timeout", "1", "box"});
  const auto took = Clock::now() - before;
  require_ok(stop);
  // The VMM stopped the machine itself once the second was up, well before the default 10 s.
  REQUIRE(stop.out == "stopped box (stop-timeout)\n");
  REQUIRE(took >= std::chrono::seconds(1));
  REQUIRE(took < std::chrono::seconds(8));
  json info = box_info(msb, "box");
  REQUIRE(info["state"] == "stopped");
  REQUIRE(info["reason"] == "stop-timeout");
  REQUIRE_THAT(info["detail"].get<std::string>(), Catch::Contains("did not power off in time"));
  REQUIRE(info["pid"].is_null());
  REQUIRE(eventually([&] { return !msb::test::process_alive(vmm); }, std::chrono::seconds(10)));
  REQUIRE_THAT(msb({"ls"}).out, Catch::Contains("stopped") && Catch::Contains("stop-timeout"));

  // The command it cut short says so.
  ProcessResult cut = streaming.wait(std::chrono::seconds(60));
  REQUIRE(cut.exit_code == 1);
  REQUIRE_THAT(cut.err, Catch::StartsWith("msb: error: sandbox \"box\" stopped while the "
                                          "command ran (stop-timeout: "));

  // A guest that does power off is not kept waiting for the timeout.
  require_ok(msb({"start", "box"}));
  const auto restarted = Clock::now();
  stop = msb({"stop", "--timeout", "30", "box"});
  require_ok(stop);
  REQUIRE(stop.out == "stopped box (powered-off)\n");
  REQUIRE(Clock::now() - restarted < std::chrono::seconds(20));
  REQUIRE(box_info(msb, "box")["reason"] == "powered-off");
}

TEST_CASE("msb create --cmdline and --initrd reach the guest", "[sandbox]") {
  Msb msb;
  TempDir files;

  // The guest gets --cmdline in place of the default; msb appends its devices and vCPUs. The
  // VMM's first console line and the test guest's own both show it.
  const std::string cmdline = "console=ttyS0 msb.flag-test=cmdline";
  require_ok(msb({"create", "box", "--cmdline", cmdline}));
  REQUIRE(msb.exec({"echo", "up"}) == "up\n");
  ProcessResult logs = msb({"logs", "box"});
  require_ok(logs);
  REQUIRE_THAT(logs.out,
               Catch::StartsWith("msb: kernel command line: " + cmdline + " virtio_mmio.device=") &&
                   Catch::Contains("\ntestguest: cmdline: " + cmdline + " virtio_mmio.device="));
  REQUIRE(logs.out.find("reboot=k") == std::string::npos);
  // Without it, the default.
  require_ok(msb({"create", "plain"}));
  REQUIRE_THAT(msb({"logs", "plain"}).out,
               Catch::Contains("\ntestguest: cmdline: console=ttyS0 reboot=k panic=-1 "
                               "virtio_mmio.device="));

  // The VMM loads the initrd at the top of low memory: with 64 MiB of memory, a 32 MiB initrd
  // lies at 32 MiB, where the test guest's `sum` reads. Its checksum is the file's.
  const fs::path initrd = files / "initrd";
  write_text(initrd, pattern_bytes(31, 32 << 20));
  require_ok(msb({"create", "rd", "--memory", "64", "--initrd", initrd.string()}));
  REQUIRE(msb.exec_in("rd", {"sum", "32"}) == checksum_line(31, 32));
  // Without one that memory is blank.
  require_ok(msb({"create", "blank", "--memory", "64"}));
  REQUIRE(msb.exec_in("blank", {"sum", "32"}) == zero_checksum_line(32));
}

TEST_CASE("msb run --name names the sandbox while its command runs", "[sandbox]") {
  Msb msb;
  // The command is `cat` of a FIFO this test holds: it runs until the test ends its input.
  InputFifo input;
  Background run(msb, {"run", "--name", "named", "--", "cat"}, input.path());
  REQUIRE(eventually([&] {
    if (run.exited()) return true;
    for (const json& box : msb.ls())
      if (box.at("name") == "named" && box.at("state") == "running") return true;
    return false;
  }));
  REQUIRE_FALSE(run.exited());
  // It is a sandbox like any other meanwhile (the test guest runs one command at a time, so
  // not exec): it has a console log, and its name is taken.
  ProcessResult logs = msb({"logs", "named"});
  require_ok(logs);
  REQUIRE_THAT(logs.out, Catch::StartsWith("msb: kernel command line: "));
  require_error(msb({"create", "named"}), "sandbox \"named\" already exists");

  input.write("through the fifo\n");
  input.close();
  ProcessResult r = run.wait();
  require_ok(r);
  REQUIRE(r.out == "through the fifo\n");
  REQUIRE(msb.ls().empty());  // removed when its command ended
}

TEST_CASE("msb run --workdir --user and --timeout reach the command", "[sandbox]") {
  Msb msb;
  TempDir files;
  // An image whose user is not root: the test guest runs commands as root only (exit 126 for
  // anyone else), so it shows whose user a command got.
  write_oci_layout(files / "layout", {{"1", {{"User", "1000"}}}});
  require_ok(msb({"image", "import", (files / "layout").string(), "--tag", "test/user:1"}));

  // --user: as root, fine; as another user the guest refuses, which shows it got the user.
  ProcessResult r = msb({"run", "--user", "root", "--", "echo", "as root"});
  require_ok(r);
  REQUIRE(r.out == "as root\n");
  r = msb({"run", "--user", "1000:1000", "--", "echo", "nope"});
  REQUIRE(r.exit_code == 126);
  REQUIRE(r.err == "testguest: cannot run as another user than root\n");
  // The image's user applies unless --user says otherwise.
  r = msb({"run", "--image", "test/user:1", "--", "echo", "nope"});
  REQUIRE(r.exit_code == 126);
  r = msb({"run", "--image", "test/user:1", "--user", "0:0", "--", "echo", "overridden"});
  require_ok(r);
  REQUIRE(r.out == "overridden\n");

  // --workdir: the test guest takes the directory and does not look at it (the linux-on-msb
  // tier shows a Linux guest's pwd); it goes to the guest with the command, in the request that
  // must fit in one frame.
  r = msb({"run", "--workdir", "/tmp", "--", "echo", "in /tmp"});
  require_ok(r);
  REQUIRE(r.out == "in /tmp\n");
  r = msb({"run", "--workdir", "/" + std::string(70000, 'w'), "--", "echo", "too long"});
  INFO(r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.err, Catch::StartsWith("msb: error: the request is 700") &&
                          Catch::Contains(" bytes (command, arguments and environment)"));
  REQUIRE(r.out.empty());

  // --timeout: a command whose input never ends is killed after a second (exit 124); one that
  // ends in time is not.
  {
    InputFifo endless;
    Background timed(msb, {"run", "--timeout", "1", "--", "cat"}, endless.path());
    r = timed.wait();
    REQUIRE(r.exit_code == 124);
    REQUIRE(r.out.empty());
    REQUIRE(r.err == "msb: the command timed out after 1 s and was killed\n");
  }
  r = msb({"run", "--timeout", "30", "--", "echo", "in time"});
  require_ok(r);
  REQUIRE(r.out == "in time\n");
  REQUIRE(msb.ls().empty());
}

TEST_CASE("msb run boots with create's options", "[sandbox]") {
  Msb msb;
  TempDir files;

  // --memory and --initrd: as with create, the initrd lies at 32 MiB of 64.
  const fs::path initrd = files / "initrd";
  write_text(initrd, pattern_bytes(41, 32 << 20));
  ProcessResult r = msb({"run", "--memory", "64", "--initrd", initrd.string(), "--", "sum", "32"});
  require_ok(r);
  REQUIRE(r.out == checksum_line(41, 32));

  // --cpus within --max-cpus, --memory within --max-memory: the guest gets --cpus and --memory;
  // the ceilings are what the VM is built for.
  r = msb({"run", "--cpus", "2", "--max-cpus", "4", "--memory", "48", "--max-memory", "96", "--",
           "cpus"});
  require_ok(r);
  REQUIRE(r.out == "2\n");
  r = msb({"run", "--memory", "48", "--max-memory", "96", "--", "mem"});
  require_ok(r);
  REQUIRE(r.out == "48\n");

  // --env: the sandbox's environment.
  r = msb({"run", "--env", "RUN_FLAG=yes", "--", "env"});
  require_ok(r);
  REQUIRE_THAT(r.out, Catch::Contains("RUN_FLAG=yes\n"));

  // --disk: the base shows through, and writes go to the sandbox's overlay, not to the file.
  const fs::path base = files / "base.img";
  const std::string base_bytes = pattern_bytes(43, 2 << 20);
  write_text(base, base_bytes);
  r = msb({"run", "--disk", base.string(), "--", "disk-read", "2"});
  require_ok(r);
  REQUIRE(r.out == checksum_line(43, 2));
  require_ok(msb({"run", "--disk", base.string(), "--", "disk-write", "1", "44"}));
  REQUIRE(read_text(base) == base_bytes);

  // --disk-size: a blank disk of that many MiB.
  r = msb({"run", "--disk-size", "2", "--", "disk-read", "2"});
  require_ok(r);
  REQUIRE(r.out == zero_checksum_line(2));
  r = msb({"run", "--disk-size", "1", "--", "disk-read", "2"});
  REQUIRE(r.exit_code == 2);
  REQUIRE(r.err == "testguest: disk-read: the disk is too small\n");

  // --cmdline: the test guest brings up as many vCPUs as the first msb.cpus= on its command line
  // says, and msb appends its own (--cpus) after what --cmdline gives: a command line that asks
  // for 2 of the VM's 2 shows it reached the guest.
  r = msb({"run", "--max-cpus", "2", "--", "cpus"});
  require_ok(r);
  REQUIRE(r.out == "1\n");
  r = msb({"run", "--max-cpus", "2", "--cmdline", "console=ttyS0 msb.cpus=2", "--", "cpus"});
  require_ok(r);
  REQUIRE(r.out == "2\n");

  // --image: the image's disk, environment and command (run without a command runs it).
  write_oci_layout(files / "layout",
                   {{"1", {{"Cmd", {"echo", "hello from the image"}}, {"Env", {"IMAGE_ENV=1"}}}}});
  require_ok(msb({"image", "import", (files / "layout").string(), "--tag", "test/app:1"}));
  r = msb({"run", "--image", "test/app:1"});
  require_ok(r);
  REQUIRE(r.out == "hello from the image\n");
  r = msb({"run", "--image", "test/app:1", "--env", "MORE=2", "--", "env"});
  require_ok(r);
  REQUIRE_THAT(r.out, Catch::Contains("IMAGE_ENV=1\n") && Catch::Contains("MORE=2\n"));
  REQUIRE(msb.ls().empty());
}

TEST_CASE("snapshot ls and inspect print their columns and restore --json its sandboxes",
          "[sandbox]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--max-memory", "96", "--max-cpus", "2"}));
  REQUIRE(msb.exec({"fill", "4", "5"}) == checksum_line(5, 4));

  // Without --json, snapshot create prints the handle alone (scripts take it from there).
  ProcessResult created = msb({"snapshot", "create", "box", "--resume"});
  require_ok(created);
  REQUIRE(created.out.size() == 33);
  REQUIRE(created.err.empty());
  const std::string first = created.out.substr(0, 32);
  REQUIRE(box_info(msb, "box")["state"] == "running");  // --resume
  ProcessResult named = msb({"snapshot", "save-named", first, "keep"});
  require_ok(named);
  REQUIRE(named.out == "keep -> " + first + "\n");
  REQUIRE(msb.exec({"fill", "1", "6"}) == checksum_line(6, 1));
  ProcessResult second_json = msb({"snapshot", "create", "box", "--resume", "--json"});
  require_ok(second_json);
  const std::string second = json::parse(second_json.out).at("handle");
  REQUIRE(json::parse(second_json.out).at("parent") == first);

  // snapshot ls: a header, then a row per snapshot with what --json says.
  ProcessResult ls = msb({"snapshot", "ls"});
  require_ok(ls);
  ProcessResult ls_json = msb({"snapshot", "ls", "--json"});
  require_ok(ls_json);
  std::vector<std::string> lines;
  std::istringstream in(ls.out);
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  REQUIRE(lines.size() == 3);
  REQUIRE(words_of(lines[0]) == std::vector<std::string>{"NAME", "HANDLE", "SOURCE", "CREATED",
                                                         "MEMORY", "STORED", "PARENT"});
  for (const json& info : json::parse(ls_json.out)) {
    const std::string handle = info.at("handle");
    INFO(ls.out << "\nsnapshot " << handle);
    auto row = std::find_if(lines.begin() + 1, lines.end(), [&](const std::string& line) {
      return words_of(line).size() > 1 && words_of(line)[1] == handle.substr(0, 12);
    });
    REQUIRE(row != lines.end());
    const std::string created_at = info.at("created");  // 2026-11-28T13:45:00Z
    const std::string memory = msb::cli::human_bytes(info.at("memory_bytes").get<uint64_t>());
    const std::string stored = msb::cli::human_bytes(info.at("stored_bytes").get<uint64_t>());
    std::vector<std::string> expected = {handle == first ? "keep" : "-",
                                         handle.substr(0, 12),
                                         "box",
                                         created_at.substr(0, 10),
                                         created_at.substr(11, 8),
                                         words_of(memory)[0],
                                         words_of(memory)[1],
                                         words_of(stored)[0],
                                         words_of(stored)[1],
                                         handle == first ? "-" : first.substr(0, 12)};
    REQUIRE(words_of(*row) == expected);
    REQUIRE(memory == "96.0 MiB");  // the ceiling's worth of memory is captured
  }

  // snapshot inspect: a line per field, from the same information as --json.
  for (const std::string& ref : {std::string("keep"), second}) {
    ProcessResult inspect_json = msb({"snapshot", "inspect", ref, "--json"});
    require_ok(inspect_json);
    const json info = json::parse(inspect_json.out);
    std::string names;
    for (const json& name : info.at("names"))
      names += (names.empty() ? "" : ",") + name.get<std::string>();
    const std::string expected =
        "handle:   " + info.at("handle").get<std::string>() + "\n" +
        "names:    " + (names.empty() ? "-" : names) +
        (info.at("unnamed").get<bool>() ? " (and unnamed, held by its source)" : "") + "\n" +
        "source:   box\n" + "created:  " + info.at("created").get<std::string>() + "\n" +
        "parent:   " + (info.at("parent").is_null() ? "-" : info.at("parent").get<std::string>()) +
        "\n" + "cpus:     1 (at most 2)\n" + "memory:   64 MiB (at most 96 MiB)\n" +
        "disk:     " + msb::cli::human_bytes(info.at("disk_bytes")) + ", delta " +
        msb::cli::human_bytes(info.at("disk_delta_bytes")) + "\n" +
        "stored:   " + msb::cli::human_bytes(info.at("stored_bytes")) + " new over its parent, " +
        msb::cli::human_bytes(info.at("total_bytes")) + " in all\n";
    ProcessResult inspect = msb({"snapshot", "inspect", ref});
    require_ok(inspect);
    REQUIRE(inspect.out == expected);
    ProcessResult verified = msb({"snapshot", "inspect", "--verify", ref});
    require_ok(verified);
    REQUIRE(verified.out == expected + "verify:   every chunk is intact\n");
  }
  REQUIRE_THAT(msb({"snapshot", "inspect", "keep"}).out,
               Catch::Contains("names:    keep") && Catch::Contains("\nparent:   -\n"));
  REQUIRE_THAT(msb({"snapshot", "inspect", second}).out,
               Catch::Contains("\nparent:   " + first + "\n"));

  // restore --json: the sandboxes it started and its timings. The first restore of a snapshot
  // materializes it; the next finds it materialized.
  ProcessResult restored = msb({"restore", "keep", "--name", "r", "--json"});
  require_ok(restored);
  json result = json::parse(restored.out);
  REQUIRE(result.size() == 3);
  REQUIRE(result.at("sandboxes") == json::array({"r"}));
  REQUIRE(result.at("materialize_ms").get<double>() > 0);
  REQUIRE(result.at("total_ms").get<double>() >= result.at("materialize_ms").get<double>());
  REQUIRE(msb.exec_in("r", {"sum", "4"}) == checksum_line(5, 4));
  REQUIRE(msb.exec_in("r", {"hostname"}) == "r\n");
  restored = msb({"restore", "keep", "--name", "f", "--fork", "2", "--json"});
  require_ok(restored);
  result = json::parse(restored.out);
  REQUIRE(result.at("sandboxes") == json::array({"f-0", "f-1"}));
  REQUIRE(result.at("materialize_ms").get<double>() == 0);
  REQUIRE(result.at("total_ms").get<double>() > 0);
  REQUIRE(msb.exec_in("f-1", {"hostname"}) == "f-1\n");
  // -q: no names printed, the sandbox started all the same.
  restored = msb({"-q", "restore", "keep", "--name", "quiet"});
  require_ok(restored);
  REQUIRE(restored.out.empty());
  REQUIRE(box_info(msb, "quiet")["state"] == "running");
}
