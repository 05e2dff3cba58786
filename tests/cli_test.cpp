// Unit tier: the msb executable's store commands, run as a user would (no KVM needed).
#include <pty.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "cli/output.h"
#include "core/sandbox.h"
#include "tests/support.h"

using msb::test::ProcessResult;
using msb::test::TempDir;
namespace fs = std::filesystem;

namespace {

struct Msb {
  TempDir home;
  ProcessResult operator()(std::vector<std::string> args,
                           std::map<std::string, std::string> env = {}) {
    args.insert(args.begin(), MSB_BINARY);
    env.emplace("MSB_HOME", home.path().string());
    return msb::test::run_process(args, env);
  }
};

// Errors are one line, "msb: error: ...", naming what was wrong.
void require_error(const ProcessResult& r, int code, const std::string& needle) {
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == code);
  REQUIRE_THAT(r.err, Catch::StartsWith("msb: error: ") && Catch::Contains(needle));
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

fs::path make_file(const TempDir& dir, const std::string& name, uint64_t seed, size_t size) {
  auto data = msb::test::make_data(seed, size);
  fs::path path = dir / name;
  msb::test::write_text(path, std::string(reinterpret_cast<const char*>(data.data()), data.size()));
  return path;
}

// `msb ARGS...` on a terminal, as a user at a terminal runs it.
ProcessResult run_on_terminal(const Msb& msb, std::vector<std::string> args) {
  args.insert(args.begin(), MSB_BINARY);
  return msb::test::run_on_terminal(args, {{"MSB_HOME", msb.home.path().string()}});
}

uint64_t stored_bytes(Msb& msb) {
  ProcessResult r = msb({"store", "stats", "--json"});
  REQUIRE(r.exit_code == 0);
  return nlohmann::json::parse(r.out).at("stored_bytes").get<uint64_t>();
}

}  // namespace

TEST_CASE("msb store put, get, ls, stats, rm and gc work together", "[cli]") {
  Msb msb;
  TempDir files;
  fs::path big = make_file(files, "big.bin", 1, 3 * 1024 * 1024 + 77);

  ProcessResult put = msb({"store", "put", "first", big.string()});
  INFO(put.err);
  REQUIRE(put.exit_code == 0);
  REQUIRE_THAT(put.out, Catch::StartsWith("first: 3.0 MiB in 13 chunks"));
  REQUIRE(msb({"store", "put", "second", big.string()}).exit_code == 0);

  ProcessResult get = msb({"store", "get", "second", (files / "back.bin").string()});
  REQUIRE(get.exit_code == 0);
  REQUIRE(msb::test::read_text(files / "back.bin") == msb::test::read_text(big));

  auto ls = nlohmann::json::parse(msb({"store", "ls", "--json"}).out);
  REQUIRE(ls.size() == 2);
  REQUIRE(ls[0]["name"] == "first");
  REQUIRE(ls[0]["kind"] == "file");
  REQUIRE(ls[0]["size"] == 3 * 1024 * 1024 + 77);
  REQUIRE(ls[0]["source"] == big.string());
  REQUIRE_THAT(msb({"store", "ls"}).out, Catch::Contains("second") && Catch::Contains("3.0 MiB"));

  auto stats = nlohmann::json::parse(msb({"store", "stats", "--json"}).out);
  REQUIRE(stats["names"] == 2);
  REQUIRE(stats["chunks"].get<int>() < 13);  // zero chunks are not stored, the rest once
  REQUIRE(stats["stored_bytes"].get<uint64_t>() < stats["chunk_bytes"].get<uint64_t>());
  REQUIRE_THAT(msb({"store", "stats"}).out,
               Catch::Contains("compression") && Catch::Contains("dedup"));

  ProcessResult verify = msb({"store", "verify"});
  REQUIRE(verify.exit_code == 0);
  REQUIRE_THAT(verify.out, Catch::Contains("0 problems"));

  REQUIRE(msb({"store", "rm", "first", "second"}).exit_code == 0);
  ProcessResult dry = msb({"store", "gc", "--dry-run"});
  REQUIRE_THAT(dry.out, Catch::StartsWith("would remove"));
  REQUIRE(nlohmann::json::parse(msb({"store", "stats", "--json"}).out)["chunks"] ==
          stats["chunks"]);
  ProcessResult gc = msb({"store", "gc"});
  REQUIRE(gc.exit_code == 0);
  REQUIRE_THAT(gc.out, Catch::StartsWith("removed " + std::to_string(stats["chunks"].get<int>()) +
                                         " chunks"));
  REQUIRE(nlohmann::json::parse(msb({"store", "stats", "--json"}).out)["chunks"] == 0);
}

TEST_CASE("the state directory comes from the home option or MSB_HOME", "[cli]") {
  Msb msb;
  TempDir other, files;
  fs::path file = make_file(files, "f", 2, 5000);
  REQUIRE(msb({"--home", other.path().string(), "store", "put", "x", file.string()}).exit_code ==
          0);
  REQUIRE(fs::exists(other / "store" / "names" / "x"));
  REQUIRE_FALSE(fs::exists(msb.home / "store" / "names" / "x"));
  REQUIRE(msb({"store", "ls", "--home", other.path().string()}).out.find("x ") !=
          std::string::npos);
}

TEST_CASE("bad input gets a one-line error and changes nothing", "[cli]") {
  Msb msb;
  TempDir files;
  fs::path file = make_file(files, "f", 3, 100000);
  REQUIRE(msb({"store", "put", "keep", file.string()}).exit_code == 0);
  std::string before = msb({"store", "ls", "--json"}).out;

  require_error(msb({"store", "put", "keep", file.string()}), 1, "already exists (use --force");
  require_error(msb({"store", "put", "a/b", file.string()}), 1, "invalid name \"a/b\": '/'");
  require_error(msb({"store", "put", "..", file.string()}), 1, "invalid name");
  require_error(msb({"store", "put", "", file.string()}), 1, "cannot be empty");
  require_error(msb({"store", "put", "new", (files / "missing").string()}), 1, "missing");
  require_error(msb({"store", "put", "new", files.path().string()}), 1, "is a directory");
  require_error(msb({"store", "get", "nope", (files / "out").string()}), 1, "no name \"nope\"");
  require_error(msb({"store", "get", "keep", (files / "no-such-dir" / "out").string()}), 1,
                "cannot write " + (files / "no-such-dir" / "out").string() + ": No such file");
  require_error(msb({"store", "get", "keep", files.path().string()}), 1, "it is a directory");
  REQUIRE_FALSE(fs::exists(files / "out"));
  require_error(msb({"store", "rm", "keep", "nope"}), 1, "no name \"nope\"");
  require_error(msb({"store", "frobnicate"}), 2, "frobnicate");
  require_error(msb({"store"}), 2, "subcommand is required");
  require_error(msb({"store", "put", "only-name"}), 2, "FILE");
  require_error(msb({"store", "stats"}, {{"MSB_ZSTD_LEVEL", "fast"}}), 1, "MSB_ZSTD_LEVEL");
  require_error(msb({"store", "put", "new", file.string()}, {{"MSB_ZSTD_LEVEL", "99"}}), 1,
                "zstd level 99");

  REQUIRE(msb({"store", "ls", "--json"}).out == before);  // "keep" survived the failed rm
  REQUIRE(msb({"store", "verify"}).exit_code == 0);
  REQUIRE(msb({"store", "put", "keep", file.string(), "--force"}).exit_code == 0);
}

TEST_CASE("MSB_ZSTD_LEVEL sets how hard new chunks are compressed", "[cli]") {
  TempDir files;
  fs::path file = make_file(files, "f", 6, 4 * 1024 * 1024);
  // The same file stored at the default level, at level 1 (the documented default), at 19 and
  // at -7 (the fastest), each in a store of its own.
  std::map<std::string, uint64_t> stored;
  for (const char* level : {"", "1", "19", "-7"}) {
    Msb msb;
    ProcessResult put = msb({"store", "put", "f", file.string()}, {{"MSB_ZSTD_LEVEL", level}});
    INFO("MSB_ZSTD_LEVEL=" << level << ": " << put.err);
    REQUIRE(put.exit_code == 0);
    stored[level] = stored_bytes(msb);
    // Whatever the level, the file comes back as it was.
    REQUIRE(msb({"store", "get", "f", (files / "back").string()}).exit_code == 0);
    REQUIRE(msb::test::read_text(files / "back") == msb::test::read_text(file));
    REQUIRE(msb({"store", "verify"}).exit_code == 0);
  }
  INFO("stored bytes: default " << stored[""] << ", 1: " << stored["1"] << ", 19: " << stored["19"]
                                << ", -7: " << stored["-7"]);
  REQUIRE(stored[""] == stored["1"]);
  REQUIRE(stored["19"] < stored["1"]);
  REQUIRE(stored["-7"] > stored["1"]);

  // Chunks already stored keep their level: the same data stored again at another level
  // deduplicates to the chunks there are.
  Msb msb;
  REQUIRE(msb({"store", "put", "a", file.string()}, {{"MSB_ZSTD_LEVEL", "19"}}).exit_code == 0);
  REQUIRE(msb({"store", "put", "b", file.string()}, {{"MSB_ZSTD_LEVEL", "1"}}).exit_code == 0);
  REQUIRE(stored_bytes(msb) == stored["19"]);
}

TEST_CASE("msb -q and --quiet leave out progress and messages but not results", "[cli]") {
  Msb msb;
  TempDir files;
  fs::path file = make_file(files, "f", 7, 5 * 1024 * 1024);

  // On a terminal, store put shows its progress; -q leaves it out, and the result stays.
  ProcessResult put = run_on_terminal(msb, {"store", "put", "first", file.string()});
  INFO(put.out);
  REQUIRE(put.exit_code == 0);
  REQUIRE_THAT(put.out, Catch::Contains("storing " + file.string()) && Catch::Contains("100%") &&
                            Catch::Contains("first: 5.0 MiB in "));
  put = run_on_terminal(msb, {"-q", "store", "put", "second", file.string()});
  INFO(put.out);
  REQUIRE(put.exit_code == 0);
  REQUIRE_THAT(put.out, Catch::StartsWith("second: 5.0 MiB in "));
  REQUIRE(put.out.find("storing") == std::string::npos);
  REQUIRE(put.out.find('\x1b') == std::string::npos);  // no progress line drawn and erased

  ProcessResult get = run_on_terminal(msb, {"store", "get", "first", (files / "a").string()});
  REQUIRE(get.exit_code == 0);
  REQUIRE_THAT(get.out, Catch::Contains("writing ") && Catch::Contains("first: wrote 5.0 MiB"));
  get = run_on_terminal(msb, {"store", "get", "--quiet", "first", (files / "b").string()});
  REQUIRE(get.exit_code == 0);
  REQUIRE(get.out.empty());  // the option may follow the command
  REQUIRE(msb::test::read_text(files / "b") == msb::test::read_text(file));

  // Off a terminal: the messages of get and rm go, errors stay.
  ProcessResult r = msb({"store", "get", "first", (files / "c").string()});
  REQUIRE(r.exit_code == 0);
  REQUIRE_THAT(r.out, Catch::StartsWith("first: wrote 5.0 MiB to "));
  r = msb({"--quiet", "store", "get", "first", (files / "d").string()});
  REQUIRE(r.exit_code == 0);
  REQUIRE(r.out.empty());
  REQUIRE(r.err.empty());
  REQUIRE(msb::test::read_text(files / "d") == msb::test::read_text(file));
  r = msb({"store", "rm", "first"});
  REQUIRE_THAT(r.out, Catch::StartsWith("removed 1 name"));
  r = msb({"-q", "store", "rm", "second"});
  REQUIRE(r.exit_code == 0);
  REQUIRE(r.out.empty());
  require_error(msb({"-q", "store", "rm", "second"}), 1, "no name \"second\"");
  REQUIRE(nlohmann::json::parse(msb({"store", "ls", "--json"}).out).empty());
}

TEST_CASE("verify exits non-zero naming a corrupt chunk", "[cli]") {
  Msb msb;
  TempDir files;
  fs::path file = make_file(files, "f", 4, 600000);
  REQUIRE(msb({"store", "put", "x", file.string()}).exit_code == 0);
  fs::path chunk;
  for (const auto& e : fs::recursive_directory_iterator(msb.home / "store" / "chunks")) {
    if (e.is_regular_file()) chunk = e.path();
  }
  REQUIRE_FALSE(chunk.empty());
  fs::permissions(chunk, fs::perms::owner_write, fs::perm_options::add);
  std::string bytes = msb::test::read_text(chunk);
  bytes[bytes.size() / 2] ^= 1;
  msb::test::write_text(chunk, bytes);

  ProcessResult verify = msb({"store", "verify"});
  REQUIRE(verify.exit_code == 1);
  REQUIRE_THAT(verify.out, Catch::Contains("problem: chunk " + chunk.filename().string()));
  require_error(verify, 1, "1 problem");
  require_error(msb({"store", "get", "x", (files / "out").string()}), 1, chunk.filename().string());
  REQUIRE_FALSE(fs::exists(files / "out"));
}

TEST_CASE("a newer store is refused", "[cli]") {
  Msb msb;
  REQUIRE(msb({"store", "stats"}).exit_code == 0);
  msb::test::write_text(msb.home / "store" / "store.json",
                        R"({"format": "msb-store", "version": "7.1"})");
  require_error(msb({"store", "ls"}), 1, "format version 7.1");
}

TEST_CASE("bad sandbox input gets a one-line error before anything starts", "[cli]") {
  Msb msb;
  TempDir files;
  fs::path kernel = make_file(files, "kernel", 5, 4096);
  std::string k = kernel.string();
  for (const char* command : {"exec", "stop", "start", "logs", "rm"}) {
    std::vector<std::string> args = {command, "nope"};
    if (std::string(command) == "exec") args.push_back("echo");
    require_error(msb(args), 1, "no sandbox \"nope\"");
  }
  require_error(msb({"create", "a/b", "--kernel", k}), 1, "invalid name \"a/b\"");
  require_error(msb({"create", "..", "--kernel", k}), 1, "invalid name");
  require_error(msb({"create", "box", "--kernel", k, "--memory", "lots"}), 1,
                "--memory \"lots\": not a size in MiB");
  require_error(msb({"create", "box", "--kernel", k, "--max-memory", "1T"}), 1, "--max-memory");
  require_error(msb({"create", "box", "--kernel", k, "--disk-size", "-1"}), 1, "--disk-size");
  require_error(msb({"create", "box", "--kernel", k, "--cpus", "two"}), 1,
                "--cpus \"two\": not a whole number");
  require_error(msb({"create", "box", "--kernel", k, "--cpus", "0"}), 1, "at least 1");
  require_error(msb({"create", "box", "--kernel", k, "--cpus", "255"}), 1, "over the limit of 254");
  require_error(msb({"create", "box", "--kernel", k, "--cpus", "4", "--max-cpus", "2"}), 1,
                "--cpus 4 is over --max-cpus 2");
  require_error(msb({"create", "box", "--kernel", k, "--memory", "512", "--max-memory", "256"}), 1,
                "--memory 512 MiB is over --max-memory 256 MiB");
  require_error(msb({"create", "box", "--kernel", k, "--env", "BIG=" + std::string(70000, 'x')}), 1,
                "at most 65536 fit");
  require_error(msb({"run", "--kernel", k, "--timeout", "5000000", "--", "echo"}), 1,
                "at most 4000000");
  require_error(msb({"create", "box", "--kernel", k, "--env", "NOEQUALS"}), 1,
                "--env \"NOEQUALS\": expected KEY=VALUE");
  require_error(msb({"create", "box", "--kernel", (files / "missing").string()}), 1,
                "kernel " + (files / "missing").string() + ": not found");
  require_error(msb({"create", "box", "--kernel", k, "--initrd", (files / "gone").string()}), 1,
                "initrd " + (files / "gone").string() + ": not found");
  require_error(msb({"create", "box", "--kernel", k, "--disk", (files / "gone").string()}), 1,
                "disk " + (files / "gone").string() + ": not found");
  require_error(msb({"create", "box", "--kernel", k, "--disk", k, "--disk-size", "5"}), 1,
                "--disk-size is for a blank disk");
  require_error(msb({"create", "box", "--kernel", k}, {{"MSB_BOOT_TIMEOUT", "soon"}}), 1,
                "MSB_BOOT_TIMEOUT");
  require_error(msb({"run", "--kernel", k, "--timeout", "0", "--", "echo"}), 1,
                "--timeout \"0\": not a positive number of seconds");
  require_error(msb({"exec", "nope"}), 2, "COMMAND");
  // msb run checks create's options the same way, before anything starts.
  require_error(msb({"run", "--kernel", k, "--memory", "512", "--max-memory", "256", "--", "echo"}),
                1, "--memory 512 MiB is over --max-memory 256 MiB");
  require_error(msb({"run", "--kernel", k, "--cpus", "4", "--max-cpus", "2", "--", "echo"}), 1,
                "--cpus 4 is over --max-cpus 2");
  require_error(msb({"run", "--kernel", k, "--initrd", (files / "gone").string(), "--", "echo"}), 1,
                "initrd " + (files / "gone").string() + ": not found");
  require_error(msb({"run", "--kernel", k, "--disk", (files / "gone").string(), "--", "echo"}), 1,
                "disk " + (files / "gone").string() + ": not found");
  require_error(msb({"run", "--kernel", k, "--disk-size", "0", "--", "echo"}), 1,
                "--disk-size must be at least 1 MiB");
  require_error(msb({"run", "--kernel", k, "--env", "NOEQUALS", "--", "echo"}), 1,
                "--env \"NOEQUALS\": expected KEY=VALUE");
  require_error(msb({"run", "--kernel", k, "--image", "nope:1", "--", "echo"}), 1,
                "no image nope:1");

  // None of them left a sandbox behind.
  ProcessResult ls = msb({"ls", "--json"});
  REQUIRE(ls.exit_code == 0);
  REQUIRE(nlohmann::json::parse(ls.out).empty());
  REQUIRE(msb({"ls"}).out.find("box") == std::string::npos);
}

TEST_CASE("help and version", "[cli]") {
  Msb msb;
  ProcessResult help = msb({"--help"});
  REQUIRE(help.exit_code == 0);
  REQUIRE_THAT(help.out, Catch::Contains("store"));
  ProcessResult version = msb({"--version"});
  REQUIRE(version.exit_code == 0);
  REQUIRE_THAT(version.out, Catch::StartsWith("msb "));
}

TEST_CASE("a guest's console line is made safe and fitted for a terminal", "[cli]") {
  using msb::cli::terminal_line;
  REQUIRE(terminal_line("[    3.141] virtio_blk virtio1: [vda]", 80) ==
          "[    3.141] virtio_blk virtio1: [vda]");
  // Control characters go; tabs are spaces.
  REQUIRE(terminal_line(std::string("a\rb\0c\x07"
                                    "d\x7f\be\tf",
                                    12),
                        80) == "abcde f");
  // Escape sequences go whole: colours, cursor moves, a window title (OSC, ended by BEL or ST).
  REQUIRE(terminal_line("\x1b[1;31mred\x1b[0m \x1b[2J\x1b[Hhome", 80) == "red home");
  REQUIRE(terminal_line("\x1b]0;pwned\x07title \x1b]2;x\x1b\\st \x1b"
                        "cx",
                        80) == "title st x");
  REQUIRE(terminal_line("cut \x1b[", 80) == "cut ");
  // C1 controls and other non-ASCII characters are one '?' each: every byte shown is one column.
  REQUIRE(terminal_line("\xc2\x9b"
                        "2J caf\xc3\xa9 \xe2\x82\xac \x80",
                        80) == "?2J caf? ? ?");
  // Cut to the width, ending in "...".
  REQUIRE(terminal_line("0123456789", 10) == "0123456789");
  REQUIRE(terminal_line("0123456789abc", 10) == "0123456...");
  REQUIRE(terminal_line("0123456789", 2) == "..");
  REQUIRE(terminal_line("0123456789", 0).empty());

  msb::core::BootProgress progress;
  progress.name = "x";
  progress.waited = std::chrono::milliseconds(12'400);
  progress.console_line = "[    3.141] virtio_blk virtio1: [vda] 2097152 512-byte blocks\r";
  REQUIRE(msb::cli::boot_progress_text(progress, 200) ==
          "booting x: 12 s: [    3.141] virtio_blk virtio1: [vda] 2097152 512-byte blocks");
  REQUIRE(msb::cli::boot_progress_text(progress, 30) == "booting x: 12 s: [    3.141...");
  REQUIRE(msb::cli::boot_progress_text(progress, 20) == "booting x: 12 s");  // too little room
  progress.console_line.clear();
  REQUIRE(msb::cli::boot_progress_text(progress, 80) == "booting x: 12 s");
  progress.console_line = "\x1b[2J\x1b[H\x1b]0;evil\x07";  // nothing shown of it
  REQUIRE(msb::cli::boot_progress_text(progress, 80) == "booting x: 12 s");
}

TEST_CASE("the boot timeout fits the host unless MSB_BOOT_TIMEOUT says otherwise", "[cli]") {
  using msb::core::boot_timeout;
  using std::chrono::seconds;
  REQUIRE(boot_timeout(nullptr, true) == seconds(60));
  REQUIRE(boot_timeout("", true) == seconds(60));
  // Without VMX/SVM guest kernel code is emulated: a Linux guest takes 20-60 s to boot.
  REQUIRE(boot_timeout(nullptr, false) == seconds(300));
  REQUIRE(boot_timeout("", false) == seconds(300));
  REQUIRE(boot_timeout("7", true) == seconds(7));
  REQUIRE(boot_timeout("7", false) == seconds(7));
  REQUIRE(boot_timeout("1000", false) == seconds(1000));
  for (const char* bad : {"0", "soon", "5s", "-1", " 5", "1.5", "99999999999"}) {
    INFO(bad);
    REQUIRE_THROWS_WITH(boot_timeout(bad, true),
                        Catch::Contains("MSB_BOOT_TIMEOUT=") && Catch::Contains("positive number"));
  }
}
