// vmm tier: snapshots end to end through the msb binary and the test guest: pause, capture,
// restore, forks, overrides, names and lifetimes, integrity, and what an interrupted snapshot
// leaves. Each test exits 77 with the reason printed where /dev/kvm is missing.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tests/msb_cli.h"

using msb::test::Background;
using msb::test::checksum_line;
using msb::test::handle_of;
using msb::test::Msb;
using msb::test::ProcessResult;
using msb::test::require_error;
using msb::test::require_ok;
using msb::test::snapshot_create;
namespace fs = std::filesystem;

namespace {

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

std::set<std::string> handles(Msb& msb) {
  std::set<std::string> out;
  for (const auto& s : snapshot_list(msb))
    out.insert(s.at("handle").get<std::string>());
  return out;
}

// Whether process `pid` has a snapshot's staging memfd open (core/vmm_snapshot.h): a VMM holds it
// from its capture until the commit, or until it abandons the capture.
bool holds_staging(int pid) {
  std::error_code ec;
  for (const auto& fd : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    std::error_code unreadable;
    const fs::path target = fs::read_symlink(fd.path(), unreadable);
    if (!unreadable && target.string().find("msb-snapshot-staging") != std::string::npos) {
      return true;
    }
  }
  return false;
}

size_t entries(const fs::path& dir) {
  size_t n = 0;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec))
    ++n;
  return n;
}

// Which process a snapshot create's test hook stops, and what the test does to it.
enum class Kill {
  kClient,                // SIGKILL the client (msb snapshot create) stopped at the point
  kVmm,                   // SIGKILL the VMM stopped at the point
  kVmmWhileClientStores,  // SIGKILL the VMM while the client stands at the point; then SIGCONT it
};

struct Interruption {
  const char* point;  // the test hook, in core/snapshot.cpp (the client) or core/vmm_process.cpp
  Kill kill;
  bool vmm_holds_staging;  // the VMM holds its staging area at the point
  bool stored;             // the snapshot ends up stored and named
};

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
  nlohmann::json first = snapshot_create(msb, {"box", "--resume"});
  REQUIRE(first.at("parent").is_null());
  REQUIRE(first.at("stored_bytes").get<uint64_t>() > (31ull << 20));  // the random pattern

  // 1 MiB more: the second snapshot reads a few chunks and stores about that much.
  REQUIRE(msb.exec({"fill", "1", "22"}) == checksum_line(22, 1));
  nlohmann::json second = snapshot_create(msb, {"box", "--resume"});
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

// Each step of `msb snapshot create` interrupted in turn, at a test hook (core/test_hooks.h) where
// the process that reached it stopped itself: what each step leaves must be a consistent store, no
// name for a snapshot that was not stored whole, a sandbox that goes on (or, its VMM killed, is
// failed and starts again), and every snapshot taken before or since restoring as it was.
TEST_CASE("killing the client or the VMM at each step of snapshot create leaves a consistent store",
          "[snapshot]") {
  Msb msb;
  msb::test::TempDir hooks;
  // In every msb command this test runs, and in the VMMs msb create and msb start spawn.
  msb.env["MSB_TEST_HOOKS"] = hooks.path().string();
  require_ok(msb({"create", "box", "--memory", "64"}));

  // Each round fills this much guest memory with a pattern of its own before its snapshot.
  constexpr uint64_t kMib = 16;
  const std::string mib = std::to_string(kMib);
  auto fill = [&](uint64_t seed) {
    REQUIRE(msb.exec({"fill", mib, std::to_string(seed)}) == checksum_line(seed, kMib));
  };
  // Every snapshot that must restore: its memory's checksum, and where it came from.
  std::map<std::string, std::pair<std::string, std::string>> expected;
  uint64_t seed = 13;
  fill(seed);
  const std::string first = handle_of(msb, {"box", "--resume"});
  require_ok(msb({"snapshot", "save-named", first, "first"}));
  expected[first] = {checksum_line(seed, kMib), "the first snapshot"};

  const Interruption interruptions[] = {
      // The client, from the capture it was given to what it told the VMM.
      {"snapshot-captured", Kill::kClient, true, false},
      {"snapshot-storing-memory", Kill::kClient, true, false},
      {"snapshot-stored", Kill::kClient, true, false},
      {"snapshot-manifest", Kill::kClient, true, false},
      {"snapshot-named", Kill::kClient, true, true},
      {"snapshot-committed", Kill::kClient, false, true},
      // The VMM: before its capture, with the capture staged but not yet handed over, and when
      // the client, done, tells it the handle.
      {"vmm-snapshot-capture", Kill::kVmm, false, false},
      {"vmm-snapshot-captured", Kill::kVmm, true, false},
      {"vmm-snapshot-commit", Kill::kVmm, true, true},
      // The VMM while the client stores what it staged: the client finishes from the staging
      // area it mapped.
      {"snapshot-storing-memory", Kill::kVmmWhileClientStores, true, true},
  };
  for (const Interruption& at : interruptions) {
    ++seed;
    const std::string point = at.point;
    const std::string label = at.kill == Kill::kClient ? "the client killed at " + point
                              : at.kill == Kill::kVmm
                                  ? "the VMM killed at " + point
                                  : "the VMM killed while the client stood at " + point;
    INFO(label);
    fill(seed);
    const std::set<std::string> before = handles(msb);
    const int vmm = std::stoi(msb::test::read_text(msb.dir("box") / "pid"));
    REQUIRE(msb::test::process_alive(vmm));

    msb::test::write_text(hooks / (point + ".arm"), "");
    Background client(msb, {"snapshot", "create", "box", "--resume", "--json"});
    // The process that reaches the point writes its pid there, then stops itself.
    const fs::path reached = hooks / point;
    REQUIRE(msb::test::eventually([&] { return fs::exists(reached) || client.exited(); }));
    {
      INFO("msb snapshot create: exit " << client.result().exit_code
                                        << ", stderr: " << client.result().err);
      REQUIRE(fs::exists(reached));
    }
    REQUIRE_FALSE(fs::exists(hooks / (point + ".arm")));  // claimed
    const int stopped = std::stoi(msb::test::read_text(reached));
    REQUIRE(stopped == (at.kill == Kill::kVmm ? vmm : client.pid()));
    REQUIRE(msb::test::eventually([&] { return msb::test::process_state(stopped) == 'T'; }));
    // Where it stands: the VMM holds its staging area from its capture to the commit.
    REQUIRE(holds_staging(vmm) == at.vmm_holds_staging);
    const size_t temp_files = entries(msb.home / "store" / "tmp");
    fs::remove(reached);

    ProcessResult result;
    if (at.kill == Kill::kClient) {
      REQUIRE(::kill(client.pid(), SIGKILL) == 0);
      result = client.wait();
      REQUIRE(result.exit_code == 128 + SIGKILL);
    } else {
      REQUIRE(::kill(vmm, SIGKILL) == 0);
      REQUIRE(msb::test::eventually([&] { return !msb::test::process_alive(vmm); }));
      if (at.kill == Kill::kVmmWhileClientStores) REQUIRE(::kill(client.pid(), SIGCONT) == 0);
      result = client.wait();
      if (at.stored) {
        // The snapshot was (or is then) stored and named: the client says so, whatever the VMM.
        require_ok(result);
      } else {
        require_error(result, "snapshot of sandbox \"box\": its VMM went away");
      }
    }

    // The store is intact. An interrupted writer leaves temporary files at most, which gc takes
    // with whatever no name holds.
    ProcessResult verify = msb({"store", "verify"});
    require_ok(verify);
    if (at.kill == Kill::kClient && temp_files > 0) {
      REQUIRE_THAT(verify.out, Catch::Contains("temporary files left by interrupted writers"));
    }
    require_ok(msb({"store", "gc"}));
    verify = msb({"store", "verify"});
    require_ok(verify);
    REQUIRE_THAT(verify.out, !Catch::Contains("temporary files"));

    // A snapshot is listed once it is stored whole, and only then; none listed before is lost.
    const std::set<std::string> after = handles(msb);
    REQUIRE(std::includes(after.begin(), after.end(), before.begin(), before.end()));
    std::vector<std::string> added;
    std::set_difference(after.begin(), after.end(), before.begin(), before.end(),
                        std::back_inserter(added));
    REQUIRE(added.size() == (at.stored ? 1u : 0u));
    if (at.stored) {
      if (result.exit_code == 0)
        REQUIRE(nlohmann::json::parse(result.out).at("handle") == added[0]);
      require_ok(msb({"snapshot", "inspect", added[0], "--verify"}));
      expected[added[0]] = {checksum_line(seed, kMib), "the snapshot taken with " + label};
    }

    if (at.kill == Kill::kClient) {
      // The VMM lets go of the capture its client left behind, and the sandbox runs on.
      REQUIRE(msb::test::eventually([&] { return !holds_staging(vmm); }));
      REQUIRE(state_of(msb, "box") == "running");
      REQUIRE(msb::test::process_alive(vmm));
    } else {
      REQUIRE(msb::test::eventually([&] { return state_of(msb, "box") == "failed"; }));
      nlohmann::json box = msb.ls().at(0);
      REQUIRE(box.at("reason") == "killed");
      require_ok(msb({"start", "box"}));
      REQUIRE(state_of(msb, "box") == "running");
      fill(seed);  // a boot: the guest's memory starts over
    }
    // Either way it snapshots again, with everything that changed since its last stored snapshot.
    const std::string again = handle_of(msb, {"box", "--resume"});
    expected[again] = {checksum_line(seed, kMib), "the snapshot after " + label};
  }

  // Every snapshot taken, first to last, restores with its memory as it was.
  int n = 0;
  for (const auto& [handle, what] : expected) {
    INFO(what.second << ": " << handle);
    const std::string name = "check-" + std::to_string(n++);
    require_ok(msb({"restore", handle, "--name", name}));
    REQUIRE(msb.exec_in(name, {"sum", mib}) == what.first);
    require_ok(msb({"rm", "--force", name}));
    fs::remove_all(msb.home / "cache" / "snapshots" / handle);  // a cache: rebuilt when needed
  }
  require_ok(msb({"store", "verify"}));
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
  // gc runs to the end, with no snapshot listed any more, and keeps what the forks hold: every
  // chunk left is one it decided to keep ("kept N chunks"), not one it never looked at.
  ProcessResult gc = msb({"store", "gc"});
  require_ok(gc);
  const size_t kept_at = gc.out.find("; kept ");
  REQUIRE(kept_at != std::string::npos);
  const uint64_t kept = std::stoull(gc.out.substr(kept_at + 7));
  REQUIRE(kept > 0);
  ProcessResult held = msb({"store", "stats", "--json"});
  require_ok(held);
  REQUIRE(nlohmann::json::parse(held.out).at("chunks") == kept);
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
  // A snapshot needs the agent idle: not while a command runs. The cat runs (the VMM says so)
  // until its input ends.
  msb::test::InputFifo input;
  Background cat(msb, {"exec", "box", "--", "cat"}, input.path());
  REQUIRE(msb::test::eventually(
      [&] { return cat.exited() || msb.vmm_status("box").at("running") == 1; }));
  REQUIRE_FALSE(cat.exited());
  require_error(msb({"snapshot", "create", "box", "--resume"}),
                "1 command(s) are running in the sandbox");
  REQUIRE(state_of(msb, "box") == "running");  // refused before it paused anything
  input.write("the end\n");
  input.close();
  ProcessResult cat_result = cat.wait();
  require_ok(cat_result);
  REQUIRE(cat_result.out == "the end\n");

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
