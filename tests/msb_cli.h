// The msb binary as the vmm-tier tests drive it: a private $MSB_HOME per test, commands run as a
// user would, and helpers for what a user checks (exit codes, one-line errors, checksums).
#pragma once

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "guest/protocol/pattern.h"
#include "tests/support.h"

namespace msb::test {

struct Msb {
  TempDir home;
  Msb() { skip_without_kvm("sandboxes need KVM"); }
  ~Msb() {
    // Leave no VMM process behind, whatever a failed check skipped.
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(home / "sandboxes", ec)) {
      std::string name = entry.path().filename().string();
      if (!name.starts_with(".")) run_process({MSB_BINARY, "rm", "--force", "--quiet", name});
    }
  }
  ProcessResult run_process(std::vector<std::string> args, const std::string& input = "") {
    return msb::test::run_process(args, {{"MSB_HOME", home.path().string()}}, input);
  }
  ProcessResult operator()(std::vector<std::string> args, const std::string& input = "") {
    args.insert(args.begin(), MSB_BINARY);
    return run_process(args, input);
  }
  // `msb exec SANDBOX ARGS...`, which must succeed; its output.
  std::string exec_in(const std::string& sandbox, std::vector<std::string> args,
                      const std::string& input = "") {
    args.insert(args.begin(), {"exec", sandbox, "--"});
    ProcessResult r = (*this)(args, input);
    INFO("msb exec " << sandbox << " " << args[3] << ": exit " << r.exit_code
                     << ", stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    REQUIRE(r.err.empty());
    return r.out;
  }
  std::string exec(std::vector<std::string> args, const std::string& input = "") {
    return exec_in("box", std::move(args), input);
  }
  nlohmann::json ls() {
    ProcessResult r = (*this)({"ls", "--json"});
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.out);
  }
  std::filesystem::path dir(const std::string& name) { return home / "sandboxes" / name; }
};

inline void require_ok(const ProcessResult& r) {
  INFO("exit " << r.exit_code << ", stdout: " << r.out << ", stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
}

// Errors are one line, "msb: error: ...", naming what was wrong.
inline void require_error(const ProcessResult& r, const std::string& needle) {
  INFO("stderr: " << r.err);
  REQUIRE(r.exit_code == 1);
  REQUIRE_THAT(r.err, Catch::StartsWith("msb: error: ") && Catch::Contains(needle));
  REQUIRE(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

// What the test guest prints for a checksum: 16 hex digits and a newline.
inline std::string checksum_line(uint64_t seed, uint64_t mib) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016" PRIx64 "\n", pattern::pattern_checksum(seed, mib << 17));
  return buf;
}

// Where two byte strings first differ (Catch would print megabytes for a plain ==), or -1.
inline long first_difference(const std::string& a, const std::string& b) {
  auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
  return ia == a.end() && ib == b.end() ? -1 : long(ia - a.begin());
}

}  // namespace msb::test
