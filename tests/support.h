// Test support: temporary folders, child processes, deterministic test data.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace msb::test {

// A fresh folder under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct ProcessResult {
  int exit_code = -1;  // 128+N if killed by signal N
  std::string out;
  std::string err;
};

// Runs argv[0] (a path) with `env` added to the environment, `input` on stdin; waits for it.
ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::map<std::string, std::string>& env = {},
                          const std::string& input = "");

// Runs argv[0] (a path) with `env` added to the environment and its stdin, stdout and stderr on a
// new terminal `columns` wide, as a user at a terminal runs it: what the terminal received (both
// streams, in `out`) and the exit status.
ProcessResult run_on_terminal(const std::vector<std::string>& argv,
                              const std::map<std::string, std::string>& env = {},
                              unsigned short columns = 120);

// Starts argv[0] in the background with stdout/stderr to /dev/null (or `output` if given).
pid_t spawn_process(const std::vector<std::string>& argv, const std::string& output = "");
// Waits for a child; returns its exit code, or 128+N if killed by signal N.
int wait_process(pid_t pid);

// Deterministic bytes that look like guest memory: a mix of zero pages, random pages, pages from a
// small shared pool (so that separate objects share chunks) and compressible text.
std::vector<std::byte> make_data(uint64_t seed, size_t size);

// For the vmm tier: where /dev/kvm cannot be opened, prints "SKIPPED: ... (why): `needs`" and
// exits 77, which CTest reports as skipped (SKIP_RETURN_CODE).
void skip_without_kvm(const std::string& needs = "this test needs KVM");

// `size` bytes of guest/protocol/pattern.h's pattern `seed` (its 64-bit words, little-endian): what
// the test guest's `out SIZE SEED` writes.
std::string pattern_bytes(uint64_t seed, size_t size);

std::string read_text(const std::filesystem::path& path);
void write_text(const std::filesystem::path& path, const std::string& text);

// A minimal "kernel" for msb: an ELF64 executable whose one segment holds `code` at 1 MiB (the
// entry), which the VMM runs in long mode.
std::string tiny_kernel(const std::vector<uint8_t>& code);

}  // namespace msb::test
