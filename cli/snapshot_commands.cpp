#include "cli/snapshot_commands.h"

#include <unistd.h>

#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/output.h"
#include "core/sandbox.h"
#include "core/snapshot.h"

namespace msb::cli {
namespace {

struct SnapshotArgs {
  std::string sandbox, ref, name, memory, cpus, fork;
  std::vector<std::string> refs, env;
  bool resume = false, json = false, force = false, verify = false;
};

core::Home home_of(const GlobalOptions& global) {
  return core::Home::resolve(
      global.home.empty() ? std::nullopt : std::optional<std::filesystem::path>(global.home));
}

// Guest memory this large or more gets a progress line on a terminal.
constexpr uint64_t kProgressThreshold = 64ull << 20;

std::string names_or_dash(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& name : names)
    out += (out.empty() ? "" : ",") + name;
  return out.empty() ? "-" : out;
}

std::string date_of(const std::string& iso) {
  // "2026-11-28T13:45:00Z" -> "2026-11-28 13:45:00"
  std::string out = iso;
  if (out.size() >= 19) out = out.substr(0, 10) + " " + out.substr(11, 8);
  return out;
}

int run_snapshot_create(const GlobalOptions& global, const SnapshotArgs& args) {
  core::Home home = home_of(global);
  Progress progress("storing the snapshot of " + args.sandbox, global.quiet || args.json);
  core::SnapshotCreateOptions options;
  options.resume = args.resume;
  auto callback = progress.callback();
  options.progress = [callback](uint64_t done, uint64_t total) {
    if (callback && total >= kProgressThreshold) callback(done, total);
  };
  core::SnapshotCreateResult result = core::create_snapshot(home, args.sandbox, options);
  if (args.json) {
    std::printf("%s\n", result.to_json(args.sandbox).dump(2).c_str());
  } else {
    std::printf("%s\n", result.handle.c_str());
    // A line for people at a terminal; scripts get the handle alone.
    if (!global.quiet && ::isatty(STDERR_FILENO)) {
      std::fprintf(stderr, "sandbox %s is %s; %s of memory, %s newly stored%s\n",
                   args.sandbox.c_str(), args.resume ? "running" : "paused (msb resume runs it)",
                   human_bytes(result.memory_bytes).c_str(),
                   human_bytes(result.stored_bytes).c_str(),
                   result.parent.empty() ? "" : " (incremental)");
    }
  }
  return 0;
}

int run_save_named(const GlobalOptions& global, const SnapshotArgs& args) {
  std::string handle = core::save_named(home_of(global), args.ref, args.name, args.force);
  if (!global.quiet) std::printf("%s -> %s\n", args.name.c_str(), handle.c_str());
  return 0;
}

int run_snapshot_ls(const GlobalOptions& global, const SnapshotArgs& args) {
  auto list = core::list_snapshots(home_of(global));
  if (args.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& info : list)
      out.push_back(info.to_json());
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%-20s %-12s %-16s %-19s %9s %9s  %s\n", "NAME", "HANDLE", "SOURCE", "CREATED",
              "MEMORY", "STORED", "PARENT");
  for (const auto& info : list) {
    std::printf("%-20s %-12s %-16s %-19s %9s %9s  %s\n", names_or_dash(info.names).c_str(),
                info.handle.substr(0, 12).c_str(), info.source.c_str(),
                date_of(info.created).c_str(), human_bytes(info.memory_bytes).c_str(),
                human_bytes(info.stored_bytes).c_str(),
                info.parent.empty() ? "-" : info.parent.substr(0, 12).c_str());
  }
  return 0;
}

int run_snapshot_inspect(const GlobalOptions& global, const SnapshotArgs& args) {
  std::vector<std::string> problems;
  nlohmann::json meta;
  core::SnapshotInfo info =
      core::inspect_snapshot(home_of(global), args.ref, args.verify, &problems, &meta);
  if (args.json) {
    nlohmann::json out = info.to_json();
    out["config"] = meta.value("config", nlohmann::json::object());
    out["format"] = meta.value("format", "");
    out["version"] = meta.value("version", 0);
    if (args.verify) out["problems"] = problems;
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::printf("handle:   %s\n", info.handle.c_str());
    std::printf("names:    %s%s\n", names_or_dash(info.names).c_str(),
                info.unnamed_alive ? " (and unnamed, held by its source)" : "");
    std::printf("source:   %s\n", info.source.c_str());
    std::printf("created:  %s\n", info.created.c_str());
    std::printf("parent:   %s\n", info.parent.empty() ? "-" : info.parent.c_str());
    std::printf("cpus:     %u (at most %u)\n", info.cpus, info.max_cpus);
    std::printf("memory:   %llu MiB (at most %llu MiB)\n", (unsigned long long)info.memory_mib,
                (unsigned long long)info.max_memory_mib);
    std::printf("disk:     %s, delta %s\n", human_bytes(info.disk_bytes).c_str(),
                human_bytes(info.disk_delta_bytes).c_str());
    std::printf("stored:   %s new over its parent, %s in all\n",
                human_bytes(info.stored_bytes).c_str(), human_bytes(info.total_bytes).c_str());
    if (args.verify) {
      for (const auto& problem : problems)
        std::printf("problem:  %s\n", problem.c_str());
      std::printf("verify:   %s\n", problems.empty() ? "every chunk is intact" : "DAMAGED");
    }
  }
  if (args.verify && !problems.empty()) {
    std::fprintf(stderr, "msb: error: snapshot %s is damaged: %s\n", info.handle.c_str(),
                 problems.front().c_str());
    return 1;
  }
  return 0;
}

int run_snapshot_rm(const GlobalOptions& global, const SnapshotArgs& args) {
  core::Home home = home_of(global);
  for (const auto& ref : args.refs)
    core::remove_snapshot(home, ref);
  if (!global.quiet) {
    std::printf("removed %zu snapshot name%s (msb store gc reclaims the space)\n", args.refs.size(),
                args.refs.size() == 1 ? "" : "s");
  }
  return 0;
}

int run_pause(const GlobalOptions& global, const SnapshotArgs& args) {
  core::pause_sandbox(home_of(global), args.sandbox);
  return 0;
}

int run_resume(const GlobalOptions& global, const SnapshotArgs& args) {
  core::resume_sandbox(home_of(global), args.sandbox);
  return 0;
}

int run_restore(const GlobalOptions& global, const SnapshotArgs& args) {
  core::RestoreOptions options;
  options.name = args.name;
  if (!args.fork.empty()) {
    options.fork = core::parse_count("--fork", args.fork);
    if (options.fork == 0) throw core::SandboxError("--fork must be at least 1");
  }
  if (!args.memory.empty()) options.memory_mib = core::parse_mib("--memory", args.memory);
  if (!args.cpus.empty()) options.cpus = core::parse_count("--cpus", args.cpus);
  for (const auto& entry : args.env)
    core::check_env_entry("--env", entry);
  options.env = args.env;
  Progress progress("materializing " + args.ref, global.quiet || args.json);
  auto callback = progress.callback();
  options.progress = [callback](uint64_t done, uint64_t total) {
    if (callback && total >= kProgressThreshold) callback(done, total);
  };
  core::RestoreResult result = core::restore_snapshot(home_of(global), args.ref, options);
  if (args.json) {
    std::printf("%s\n", nlohmann::json{{"sandboxes", result.sandboxes},
                                       {"materialize_ms", result.materialize_ms},
                                       {"total_ms", result.total_ms}}
                            .dump(2)
                            .c_str());
  } else if (!global.quiet) {
    for (const auto& name : result.sandboxes)
      std::printf("%s\n", name.c_str());
  }
  return 0;
}

}  // namespace

std::function<int()> add_snapshot_commands(CLI::App& app, const GlobalOptions& global) {
  auto args = std::make_shared<SnapshotArgs>();

  CLI::App* snapshot = app.add_subcommand("snapshot", "Capture, name, list and remove snapshots");
  snapshot->require_subcommand(1);
  CLI::App* create = snapshot->add_subcommand(
      "create", "Pause a sandbox, capture its whole state and print the snapshot's handle");
  create->add_option("SANDBOX", args->sandbox, "Sandbox to capture")->required();
  create->add_flag("--resume", args->resume, "Let the sandbox run again once it is captured");
  create->add_flag("--json", args->json, "Print timings and sizes as JSON");

  CLI::App* save_named = snapshot->add_subcommand(
      "save-named", "Keep a snapshot under a name that outlives its sandbox");
  save_named->add_option("HANDLE", args->ref, "Snapshot handle (or a name)")->required();
  save_named->add_option("NAME", args->name, "Name to keep it under")->required();
  save_named->add_flag("-f,--force", args->force, "Replace an existing name");

  CLI::App* ls = snapshot->add_subcommand("ls", "List snapshots");
  ls->add_flag("--json", args->json, "Print JSON");

  CLI::App* inspect = snapshot->add_subcommand("inspect", "Show a snapshot");
  inspect->add_option("SNAPSHOT", args->ref, "Name or handle")->required();
  inspect->add_flag("--json", args->json, "Print JSON");
  inspect->add_flag("--verify", args->verify, "Re-read and check every chunk it references");

  CLI::App* rm = snapshot->add_subcommand("rm", "Remove snapshot names");
  rm->add_option("NAME", args->refs, "Snapshot names")->required();

  CLI::App* pause = app.add_subcommand("pause", "Pause a running sandbox (its vCPUs stop)");
  pause->add_option("SANDBOX", args->sandbox, "Sandbox")->required();
  CLI::App* resume = app.add_subcommand("resume", "Let a paused sandbox run again");
  resume->add_option("SANDBOX", args->sandbox, "Sandbox")->required();

  CLI::App* restore = app.add_subcommand(
      "restore", "Start sandboxes from a snapshot, where it left off, without booting");
  restore->add_option("SNAPSHOT", args->ref, "Name or handle")->required();
  restore->add_option("--name", args->name, "Name of the new sandbox (with --fork, their prefix)")
      ->required();
  restore->add_option("--fork", args->fork, "Start K sandboxes, NAME-0 .. NAME-(K-1), at once");
  restore->add_option("--memory", args->memory,
                      "Memory to grant in MiB (within the snapshot's --max-memory)");
  restore->add_option("--cpus", args->cpus, "vCPUs to have online (within its --max-cpus)");
  restore->add_option("--env", args->env, "KEY=VALUE over the snapshot's environment (repeatable)")
      ->allow_extra_args(false);
  restore->add_flag("--json", args->json, "Print the sandboxes and timings as JSON");

  return [=, &global]() -> int {
    if (create->parsed()) return run_snapshot_create(global, *args);
    if (save_named->parsed()) return run_save_named(global, *args);
    if (ls->parsed()) return run_snapshot_ls(global, *args);
    if (inspect->parsed()) return run_snapshot_inspect(global, *args);
    if (rm->parsed()) return run_snapshot_rm(global, *args);
    if (pause->parsed()) return run_pause(global, *args);
    if (resume->parsed()) return run_resume(global, *args);
    if (restore->parsed()) return run_restore(global, *args);
    return -1;
  };
}

}  // namespace msb::cli
