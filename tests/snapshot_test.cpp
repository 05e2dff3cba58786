// vmm tier: snapshots end to end through the msb binary and the test guest: pause, capture,
// restore, forks, overrides, names and lifetimes, integrity, and what an interrupted snapshot
// leaves. Each test exits 77 with the reason printed where /dev/kvm is missing.
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <set>
#include <thread>

#include "tests/msb_cli.h"

using msb::test::checksum_line;
using msb::test::Msb;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
namespace fs = std::filesystem;

namespace {

// `msb snapshot create ARGS --json`, which must succeed.
nlohmann::json snapshot(Msb& msb, std::vector<std::string> args) {
  args.insert(args.begin(), {"snapshot", "create"});
  args.push_back("--json");
  ProcessResult r = msb(args);
  require_ok(r);
  return nlohmann::json::parse(r.out);
}

std::string handle_of(Msb& msb, std::vector<std::string> args) {
  return snapshot(msb, std::move(args)).at("handle").get<std::string>();
}

std::string state_of(Msb& msb, const std::string& name) {
  for (const auto& box : msb.ls())
    if (box.at("name") == name) return box.at("state");
  return "absent";
}

nlohmann::json snapshot_list(Msb& msb) {
  ProcessResult r = msb({"snapshot", "ls", "--json"});
  require_ok(r);
  return nlohmann::json::parse(r.out);
}

bool listed(const nlohmann::json& list, const std::string& handle) {
  for (const auto& s : list)
    if (s.at("handle") == handle) return true;
  return false;
}

}  // namespace

TEST_CASE("a restored sandbox continues where its snapshot left off, then goes its own way",
          "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--disk-size", "16"}));
  REQUIRE(msb.exec({"fill", "8", "7"}) == checksum_line(7, 8));
  REQUIRE(msb.exec({"disk-write", "1", "5"}) == checksum_line(5, 1));
  uint64_t ticks_before = std::stoull(msb.exec({"ticks"}));

  // Without --resume the sandbox stays paused: its commands wait for msb resume.
  std::string handle = handle_of(msb, {"box"});
  REQUIRE(handle.size() == 32);
  REQUIRE(state_of(msb, "box") == "paused");
  require_error(msb({"exec", "box", "--", "echo", "hi"}), "paused");
  require_ok(msb({"resume", "box"}));
  REQUIRE(state_of(msb, "box") == "running");
  REQUIRE(msb.exec({"echo", "back"}) == "back\n");

  // The fork starts from the snapshot (a handle prefix is enough), with the same memory, disk
  // and a tick counter that goes on from where it was.
  ProcessResult restored = msb({"restore", handle.substr(0, 10), "--name", "fork"});
  require_ok(restored);
  REQUIRE(restored.out == "fork\n");
  REQUIRE(state_of(msb, "fork") == "running");
  REQUIRE(msb.exec_in("fork", {"sum", "8"}) == checksum_line(7, 8));
  REQUIRE(msb.exec_in("fork", {"disk-read", "1"}) == checksum_line(5, 1));
  REQUIRE(std::stoull(msb.exec_in("fork", {"ticks"})) >= ticks_before);
  REQUIRE(msb.exec_in("fork", {"hostname"}) == "fork\n");

  // From here each one writes its own memory and disk; neither sees the other's.
  REQUIRE(msb.exec({"fill", "8", "9"}) == checksum_line(9, 8));
  REQUIRE(msb.exec_in("fork", {"sum", "8"}) == checksum_line(7, 8));
  REQUIRE(msb.exec_in("fork", {"fill", "8", "11"}) == checksum_line(11, 8));
  REQUIRE(msb.exec({"sum", "8"}) == checksum_line(9, 8));
  REQUIRE(msb.exec_in("fork", {"disk-write", "1", "6"}) == checksum_line(6, 1));
  REQUIRE(msb.exec({"disk-read", "1"}) == checksum_line(5, 1));

  // msb pause and msb resume stand alone too.
  require_ok(msb({"pause", "fork"}));
  REQUIRE(state_of(msb, "fork") == "paused");
  require_ok(msb({"resume", "fork"}));
  REQUIRE(msb.exec_in("fork", {"sum", "8"}) == checksum_line(11, 8));

  // A stopped restored sandbox boots again, on the snapshot's disk under its own overlay.
  require_ok(msb({"stop", "fork"}));
  require_ok(msb({"start", "fork"}));
  REQUIRE(msb.exec_in("fork", {"disk-read", "1"}) == checksum_line(6, 1));
}

TEST_CASE("ten forks run at once with their own memory, disks, names and random numbers",
          "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--disk-size", "8"}));
  REQUIRE(msb.exec({"fill", "4", "3"}) == checksum_line(3, 4));
  std::string handle = handle_of(msb, {"box", "--resume"});
  ProcessResult r = msb({"restore", handle, "--name", "w", "--fork", "10"});
  require_ok(r);
  REQUIRE(r.out == "w-0\nw-1\nw-2\nw-3\nw-4\nw-5\nw-6\nw-7\nw-8\nw-9\n");
  std::set<std::string> randoms;
  for (int i = 0; i < 10; ++i) {
    std::string name = "w-" + std::to_string(i);
    REQUIRE(state_of(msb, name) == "running");
    REQUIRE(msb.exec_in(name, {"sum", "4"}) == checksum_line(3, 4));
    REQUIRE(msb.exec_in(name, {"fill", "4", std::to_string(100 + i)}) == checksum_line(100 + i, 4));
    REQUIRE(msb.exec_in(name, {"disk-write", "1", std::to_string(200 + i)}) ==
            checksum_line(200 + i, 1));
    REQUIRE(msb.exec_in(name, {"hostname"}) == name + "\n");
    randoms.insert(msb.exec_in(name, {"random"}));
  }
  REQUIRE(randoms.size() == 10);  // fresh entropy per fork
  for (int i = 0; i < 10; ++i) {
    std::string name = "w-" + std::to_string(i);
    REQUIRE(msb.exec_in(name, {"sum", "4"}) == checksum_line(100 + i, 4));
    REQUIRE(msb.exec_in(name, {"disk-read", "1"}) == checksum_line(200 + i, 1));
  }
  REQUIRE(msb.exec({"sum", "4"}) == checksum_line(3, 4));
}

TEST_CASE("restore overrides reach the guest within the ceilings, and over them are refused",
          "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--max-memory", "128", "--cpus", "1",
                  "--max-cpus", "2", "--env", "A=1", "--env", "KEEP=yes"}));
  REQUIRE(msb.exec({"cpus"}) == "1\n");
  REQUIRE(msb.exec({"mem"}) == "64\n");
  std::string handle = handle_of(msb, {"box", "--resume"});

  require_ok(msb({"restore", handle, "--name", "big", "--cpus", "2", "--memory", "96", "--env",
                  "A=3", "--env", "B=2"}));
  REQUIRE(msb.exec_in("big", {"cpus"}) == "2\n");
  REQUIRE(msb.exec_in("big", {"mem"}) == "96\n");
  std::string env = msb.exec_in("big", {"env"});
  REQUIRE_THAT(env, Catch::Contains("A=3\n") && Catch::Contains("B=2\n") &&
                        Catch::Contains("KEEP=yes\n") && !Catch::Contains("A=1\n"));
  // Without overrides a restore keeps what the snapshot had.
  require_ok(msb({"restore", handle, "--name", "same"}));
  REQUIRE(msb.exec_in("same", {"cpus"}) == "1\n");
  REQUIRE(msb.exec_in("same", {"mem"}) == "64\n");
  REQUIRE_THAT(msb.exec_in("same", {"env"}), Catch::Contains("A=1\n"));

  require_error(msb({"restore", handle, "--name", "x", "--cpus", "3"}), "--max-cpus 2");
  require_error(msb({"restore", handle, "--name", "x", "--memory", "256"}), "--max-memory 128");
  require_error(msb({"restore", handle, "--name", "x", "--fork", "3", "--cpus", "0"}),
                "--cpus must be at least 1");
  require_error(msb({"restore", handle, "--name", "x", "--env", "NOEQUALS"}), "KEY=VALUE");
  for (const auto& box : msb.ls())
    REQUIRE(box.at("name").get<std::string>().substr(0, 1) != "x");
}

TEST_CASE(
    "a named snapshot outlives its sandbox, an unnamed one does not, and a second "
    "snapshot stores only its changes",
    "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "96"}));
  REQUIRE(msb.exec({"fill", "32", "21"}) == checksum_line(21, 32));
  nlohmann::json first = snapshot(msb, {"box", "--resume"});
  REQUIRE(first.at("parent").is_null());
  REQUIRE(first.at("stored_bytes").get<uint64_t>() > (31ull << 20));  // the random pattern

  // 1 MiB more: the second snapshot reads a few chunks and stores about that much.
  REQUIRE(msb.exec({"fill", "1", "22"}) == checksum_line(22, 1));
  nlohmann::json second = snapshot(msb, {"box", "--resume"});
  REQUIRE(second.at("parent") == first.at("handle"));
  REQUIRE(second.at("stored_bytes").get<uint64_t>() < (3ull << 20));
  REQUIRE(second.at("memory_chunks_read").get<uint64_t>() <
          second.at("memory_chunks").get<uint64_t>() / 10);

  std::string named = first.at("handle");
  std::string unnamed = second.at("handle");
  require_ok(msb({"snapshot", "save-named", named, "keep"}));
  require_error(msb({"snapshot", "save-named", unnamed, "keep"}), "taken");
  require_ok(msb({"snapshot", "save-named", unnamed, "newer"}));
  require_ok(msb({"snapshot", "save-named", unnamed, "keep", "--force"}));
  require_ok(msb({"snapshot", "save-named", named, "keep", "--force"}));
  require_ok(msb({"snapshot", "rm", "newer"}));
  require_error(msb({"snapshot", "rm", unnamed}), "lives until sandbox \"box\" is removed");

  nlohmann::json list = snapshot_list(msb);
  REQUIRE(listed(list, named));
  REQUIRE(listed(list, unnamed));
  ProcessResult inspect = msb({"snapshot", "inspect", "keep", "--json"});
  require_ok(inspect);
  nlohmann::json info = nlohmann::json::parse(inspect.out);
  REQUIRE(info.at("handle") == named);
  REQUIRE(info.at("source") == "box");
  REQUIRE(info.at("names") == nlohmann::json::array({"keep"}));
  REQUIRE(info.at("memory_bytes") == 96ull << 20);

  require_ok(msb({"rm", "--force", "box"}));
  list = snapshot_list(msb);
  REQUIRE(listed(list, named));
  REQUIRE_FALSE(listed(list, unnamed));
  require_ok(msb({"store", "gc"}));
  require_error(msb({"restore", unnamed, "--name", "gone"}), "no snapshot");
  require_ok(msb({"restore", "keep", "--name", "back"}));
  REQUIRE(msb.exec_in("back", {"sum", "32"}) == checksum_line(21, 32));
  ProcessResult verify = msb({"store", "verify"});
  require_ok(verify);
}

TEST_CASE("a corrupted chunk is named, and nothing starts from it", "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64"}));
  REQUIRE(msb.exec({"fill", "2", "5"}) == checksum_line(5, 2));
  std::string handle = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"snapshot", "inspect", handle, "--verify"}));

  // Damage every chunk file of the store (the snapshot's among them): flip bytes in the middle.
  size_t damaged = 0;
  for (const auto& entry : fs::recursive_directory_iterator(msb.home / "store" / "chunks")) {
    if (!entry.is_regular_file()) continue;
    std::fstream file(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(entry.file_size() / 2));
    file.write("\xde\xad\xbe\xef", 4);
    ++damaged;
  }
  REQUIRE(damaged > 0);
  ProcessResult verify = msb({"snapshot", "inspect", handle, "--verify"});
  REQUIRE(verify.exit_code == 1);
  REQUIRE_THAT(verify.err, Catch::Contains("snapshot " + handle) && Catch::Contains("chunk"));

  ProcessResult restore = msb({"restore", handle, "--name", "bad"});
  require_error(restore, "snapshot " + handle);
  REQUIRE_THAT(restore.err, Catch::Contains("chunk"));
  REQUIRE_FALSE(fs::exists(msb.dir("bad")));
  REQUIRE_FALSE(fs::exists(msb.home / "cache" / "snapshots" / handle));
}

TEST_CASE("killing the VMM or the client during snapshot create leaves a consistent store",
          "[snapshot]") {
  Msb msb;
  ::setenv("MSB_HOME", msb.home.path().c_str(), 1);
  require_ok(msb({"create", "box", "--memory", "160"}));
  REQUIRE(msb.exec({"fill", "96", "13"}) == checksum_line(13, 96));

  // The client killed while it stores: the sandbox keeps running and snapshots again.
  pid_t client = msb::test::spawn_process({MSB_BINARY, "snapshot", "create", "box", "--resume"});
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ::kill(client, SIGKILL);
  msb::test::wait_process(client);
  require_ok(msb({"store", "verify"}));
  REQUIRE(msb.exec({"sum", "96"}) == checksum_line(13, 96));
  std::string handle = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"restore", handle, "--name", "after"}));
  REQUIRE(msb.exec_in("after", {"sum", "96"}) == checksum_line(13, 96));

  // The VMM killed while a snapshot is taken.
  REQUIRE(msb.exec({"fill", "64", "14"}) == checksum_line(14, 64));
  int vmm = 0;
  std::ifstream(msb.dir("box") / "pid") >> vmm;
  REQUIRE(vmm > 0);
  pid_t taker = msb::test::spawn_process({MSB_BINARY, "snapshot", "create", "box"});
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  ::kill(vmm, SIGKILL);
  int code = msb::test::wait_process(taker);
  INFO("snapshot create exit code " << code);
  REQUIRE((code == 0 || code == 1));
  ::unsetenv("MSB_HOME");
  require_ok(msb({"store", "verify"}));
  REQUIRE(state_of(msb, "box") == "failed");
  // What was stored before is intact.
  REQUIRE(msb.exec_in("after", {"sum", "96"}) == checksum_line(13, 96));
}

TEST_CASE("removing a snapshot and collecting garbage while its forks run breaks none of them",
          "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--disk-size", "8"}));
  REQUIRE(msb.exec({"fill", "4", "31"}) == checksum_line(31, 4));
  REQUIRE(msb.exec({"disk-write", "1", "32"}) == checksum_line(32, 1));
  std::string handle = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"snapshot", "save-named", handle, "base"}));
  require_ok(msb({"restore", "base", "--name", "g", "--fork", "2"}));
  require_ok(msb({"rm", "--force", "box"}));
  require_ok(msb({"snapshot", "rm", "base"}));
  require_ok(msb({"store", "gc"}));
  REQUIRE(snapshot_list(msb).empty());
  for (const char* name : {"g-0", "g-1"}) {
    REQUIRE(msb.exec_in(name, {"sum", "4"}) == checksum_line(31, 4));
    REQUIRE(msb.exec_in(name, {"disk-read", "1"}) == checksum_line(32, 1));
  }
  // A fork still holds its snapshot: it can stop, have its cache pruned, and start again.
  require_ok(msb({"stop", "g-0"}));
  fs::remove_all(msb.home / "cache");
  require_ok(msb({"start", "g-0"}));
  REQUIRE(msb.exec_in("g-0", {"disk-read", "1"}) == checksum_line(32, 1));
  // Once the forks are gone, gc reclaims everything.
  require_ok(msb({"rm", "--force", "g-0", "g-1"}));
  require_ok(msb({"store", "gc"}));
  ProcessResult stats = msb({"store", "stats", "--json"});
  require_ok(stats);
  REQUIRE(nlohmann::json::parse(stats.out).at("chunks") == 0);
  require_ok(msb({"store", "verify"}));
}

TEST_CASE("snapshot commands refuse bad input with one clear line", "[snapshot]") {
  Msb msb;
  require_error(msb({"snapshot", "create", "nobox"}), "no sandbox \"nobox\"");
  require_error(msb({"pause", "nobox"}), "no sandbox \"nobox\"");
  require_error(msb({"restore", "nothing", "--name", "x"}), "no snapshot \"nothing\"");
  require_error(msb({"snapshot", "inspect", "abcdef"}), "no snapshot \"abcdef\"");
  require_error(msb({"snapshot", "rm", "nothing"}), "no snapshot \"nothing\"");

  require_ok(msb({"create", "box", "--memory", "32"}));
  // A snapshot needs the agent idle: not while a command runs.
  pid_t cat =
      msb::test::spawn_process({"/bin/sh", "-c",
                                std::string("sleep 2 | MSB_HOME=") + msb.home.path().string() +
                                    " " + MSB_BINARY + " exec box -- cat"});
  bool refused = false;
  for (int i = 0; i < 100 && !refused; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ProcessResult r = msb({"snapshot", "create", "box", "--resume"});
    if (r.exit_code != 0) {
      require_error(r, "running in the sandbox");
      refused = true;
    }
  }
  REQUIRE(refused);
  REQUIRE(msb::test::wait_process(cat) == 0);  // cat ends with its input

  std::string handle = handle_of(msb, {"box", "--resume"});
  require_error(msb({"snapshot", "save-named", handle, "sandbox.mine"}), "msb's own");
  require_error(msb({"snapshot", "save-named", handle, "image.mine"}), "image tags");
  require_error(msb({"snapshot", "save-named", handle, "bad/name"}), "invalid snapshot name");
  require_error(msb({"restore", handle, "--name", "box"}), "already exists");
  require_error(msb({"restore", handle, "--name", "bad/name"}), "invalid sandbox name");
  require_error(msb({"restore", handle, "--name", "y", "--fork", "1001"}), "over the limit");
  require_error(msb({"restore", handle, "--name", "y", "--fork", "0"}),
                "--fork must be at least 1");
  require_error(msb({"restore", handle, "--name", "y", "--memory", "8"}),
                "--memory must be at least 16 MiB");
  require_error(msb({"restore", handle, "--name", "y", "--memory", "lots"}), "not a size in MiB");
  REQUIRE_FALSE(fs::exists(msb.dir("y")));
  require_ok(msb({"stop", "box"}));
  require_error(msb({"snapshot", "create", "box"}), "is not running");
}

// The image a sandbox's disk is a layer over outlives its tag for as long as a sandbox or a
// snapshot needs it; gc takes its cached ext4 once nothing does. (The test guest reads the disk
// raw, which is all this needs.)
TEST_CASE("sandboxes and snapshots hold their image through image rm and gc", "[snapshot]") {
  Msb msb;
  require_ok(msb({"create", "box", "--memory", "64", "--image", "busybox:latest"}));
  REQUIRE(msb.ls().at(0).at("image") == "busybox:latest");
  auto cached_images = [&] {
    size_t n = 0;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(msb.home / "cache" / "images", ec))
      n += entry.path().extension() == ".ext4";
    return n;
  };
  REQUIRE(cached_images() == 1);
  require_ok(msb({"image", "rm", "busybox:latest"}));
  require_ok(msb({"store", "gc"}));
  REQUIRE(cached_images() == 1);  // the sandbox holds it
  require_ok(msb({"stop", "box"}));
  require_ok(msb({"start", "box"}));
  REQUIRE(msb.exec({"echo", "up"}) == "up\n");

  std::string handle = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"snapshot", "save-named", handle, "keep"}));
  require_ok(msb({"rm", "--force", "box"}));
  require_ok(msb({"store", "gc"}));
  REQUIRE(cached_images() == 1);  // the named snapshot lists it
  // Even with its cache gone, a restore materializes it again from the store.
  fs::remove_all(msb.home / "cache" / "images");
  require_ok(msb({"restore", "keep", "--name", "fork"}));
  REQUIRE(cached_images() == 1);
  REQUIRE(msb.exec_in("fork", {"echo", "up"}) == "up\n");
  require_ok(msb({"snapshot", "rm", "keep"}));
  require_ok(msb({"store", "gc"}));
  REQUIRE(cached_images() == 1);  // the fork holds it
  require_ok(msb({"rm", "--force", "fork"}));
  require_ok(msb({"store", "gc"}));
  REQUIRE(cached_images() == 0);
}
