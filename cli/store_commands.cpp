#include "cli/store_commands.h"

#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli/output.h"
#include "core/archive.h"
#include "core/home.h"
#include "core/images.h"
#include "core/snapshot.h"
#include "snapstore/error.h"

namespace msb::cli {
namespace {

struct StoreArgs {
  std::string name;
  std::vector<std::string> names;
  std::string file;
  bool force = false;
  bool json = false;
  bool dry_run = false;
};

core::Home home_of(const GlobalOptions& global) {
  return core::Home::resolve(
      global.home.empty() ? std::nullopt : std::optional<std::filesystem::path>(global.home));
}

std::string ratio(double r) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2fx", r);
  return buf;
}

int run_put(const GlobalOptions& global, const StoreArgs& args) {
  auto store = home_of(global).open_store();
  core::PutResult result;
  {
    // Erased (on destruction) before the result line, which would otherwise follow it.
    Progress progress("storing " + args.file, global.quiet);
    result = core::put_file(*store, args.name, args.file, args.force, progress.callback());
  }
  size_t zero = 0;
  for (const auto& c : result.object.chunks)
    zero += c ? 0 : 1;
  std::printf("%s: %s in %zu chunks (%zu zero), manifest %s\n", args.name.c_str(),
              human_bytes(result.object.size).c_str(), result.object.chunks.size(), zero,
              result.manifest.hex().c_str());
  return 0;
}

int run_get(const GlobalOptions& global, const StoreArgs& args) {
  auto store = home_of(global).open_store();
  uint64_t size = 0;
  {
    Progress progress("writing " + args.file, global.quiet);
    size = core::get_file(*store, args.name, args.file, progress.callback());
  }
  if (!global.quiet) {
    std::printf("%s: wrote %s to %s\n", args.name.c_str(), human_bytes(size).c_str(),
                args.file.c_str());
  }
  return 0;
}

int run_ls(const GlobalOptions& global, const StoreArgs& args) {
  auto store = home_of(global).open_store();
  std::vector<core::NamedEntry> entries = core::list_entries(*store);
  if (args.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& e : entries) {
      list.push_back({{"name", e.name},
                      {"manifest", e.manifest.hex()},
                      {"kind", e.kind},
                      {"size", e.size},
                      {"created", e.created},
                      {"source", e.source}});
    }
    std::printf("%s\n", list.dump(2).c_str());
    return 0;
  }
  std::printf("%-24s %-10s %10s  %-20s  %s\n", "NAME", "KIND", "SIZE", "CREATED", "MANIFEST");
  for (const auto& e : entries) {
    std::printf("%-24s %-10s %10s  %-20s  %s\n", e.name.c_str(), e.kind.c_str(),
                human_bytes(e.size).c_str(), e.created.c_str(), e.manifest.hex().c_str());
  }
  return 0;
}

int run_rm(const GlobalOptions& global, const StoreArgs& args) {
  auto store = home_of(global).open_store();
  // Every name is checked before any is removed, so a typo removes nothing.
  for (const std::string& name : args.names) {
    if (!store->find_name(name))
      throw snapstore::StoreError("no name \"" + name + "\" in the store");
  }
  for (const std::string& name : args.names)
    store->remove_name(name);
  if (!global.quiet) {
    std::printf("removed %zu name%s; msb store gc reclaims the space\n", args.names.size(),
                args.names.size() == 1 ? "" : "s");
  }
  return 0;
}

int run_stats(const GlobalOptions& global, const StoreArgs& args) {
  auto store = home_of(global).open_store();
  snapstore::StoreStats s = store->stats();
  if (args.json) {
    nlohmann::json doc = {{"path", store->root().string()},
                          {"chunks", s.chunks},
                          {"chunk_bytes", s.chunk_bytes},
                          {"stored_bytes", s.stored_bytes},
                          {"manifests", s.manifests},
                          {"manifest_bytes", s.manifest_bytes},
                          {"names", s.names},
                          {"live_pins", s.live_pins},
                          {"objects", s.objects},
                          {"logical_bytes", s.logical_bytes},
                          {"referenced_bytes", s.referenced_bytes},
                          {"dedup_ratio", s.dedup_ratio},
                          {"compression_ratio", s.compression_ratio},
                          {"temp_files", s.temp_files}};
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }
  double overall = s.stored_bytes ? double(s.logical_bytes) / double(s.stored_bytes) : 1.0;
  std::printf("store         %s\n", store->root().string().c_str());
  std::printf("chunks        %llu: %s of data in %s on disk\n", (unsigned long long)s.chunks,
              human_bytes(s.chunk_bytes).c_str(), human_bytes(s.stored_bytes).c_str());
  std::printf("manifests     %llu (%s)\n", (unsigned long long)s.manifests,
              human_bytes(s.manifest_bytes).c_str());
  std::printf("names         %llu\n", (unsigned long long)s.names);
  std::printf("live pins     %llu\n", (unsigned long long)s.live_pins);
  std::printf("objects       %llu: %s logical, %s in non-zero chunks\n",
              (unsigned long long)s.objects, human_bytes(s.logical_bytes).c_str(),
              human_bytes(s.referenced_bytes).c_str());
  std::printf("dedup         %s\n", ratio(s.dedup_ratio).c_str());
  std::printf("compression   %s\n", ratio(s.compression_ratio).c_str());
  std::printf("overall       %s (logical bytes per stored byte)\n", ratio(overall).c_str());
  if (s.temp_files) {
    std::printf("temp files    %llu (left by interrupted writers; msb store gc removes them)\n",
                (unsigned long long)s.temp_files);
  }
  return 0;
}

int run_verify(const GlobalOptions& global, const StoreArgs&) {
  auto store = home_of(global).open_store();
  snapstore::VerifyReport report = store->verify();
  for (const std::string& problem : report.problems)
    std::printf("problem: %s\n", problem.c_str());
  std::printf("checked %llu chunks, %llu manifests, %llu names, %llu live pins: %zu problem%s\n",
              (unsigned long long)report.chunks, (unsigned long long)report.manifests,
              (unsigned long long)report.names, (unsigned long long)report.pins,
              report.problems.size(), report.problems.size() == 1 ? "" : "s");
  if (report.temp_files) {
    std::printf("%llu temporary files left by interrupted writers (msb store gc removes them)\n",
                (unsigned long long)report.temp_files);
  }
  if (!report.ok()) {
    std::fprintf(stderr, "msb: error: the store at %s has %zu problem%s\n",
                 store->root().string().c_str(), report.problems.size(),
                 report.problems.size() == 1 ? "" : "s");
    return 1;
  }
  return 0;
}

int run_gc(const GlobalOptions& global, const StoreArgs& args) {
  core::Home home = home_of(global);
  auto store = home.open_store(/*exclusive=*/true);
  snapstore::GcReport r = store->gc(args.dry_run);
  // Restores' materialized copies of snapshots that are gone now (running sandboxes keep theirs
  // mapped; a stopped one rebuilds it from the snapshot it holds).
  if (!args.dry_run) {
    core::prune_snapshot_caches(home, *store);
    core::prune_image_caches(home, *store);
  }
  std::printf(
      "%s %llu chunks (%s), %llu manifests, %llu stale pins, %llu temporary files; "
      "kept %llu chunks, %llu manifests\n",
      args.dry_run ? "would remove" : "removed", (unsigned long long)r.chunks_removed,
      human_bytes(r.chunk_bytes_removed).c_str(), (unsigned long long)r.manifests_removed,
      (unsigned long long)r.pins_removed, (unsigned long long)r.temp_files_removed,
      (unsigned long long)r.chunks_kept, (unsigned long long)r.manifests_kept);
  return 0;
}

}  // namespace

std::function<int()> add_store_commands(CLI::App& app, const GlobalOptions& global) {
  auto args = std::make_shared<StoreArgs>();
  CLI::App* store = app.add_subcommand("store", "Inspect and maintain the content-addressed store");
  store->require_subcommand(1);

  CLI::App* put = store->add_subcommand("put", "Store a file under a name (chunked, deduplicated)");
  put->add_option("NAME", args->name, "Name to store it under")->required();
  put->add_option("FILE", args->file, "File to store")->required();
  put->add_flag("-f,--force", args->force, "Replace the name if it exists");

  CLI::App* get = store->add_subcommand("get", "Write a file stored under a name");
  get->add_option("NAME", args->name, "Name it was stored under")->required();
  get->add_option("FILE", args->file, "Where to write it")->required();

  CLI::App* ls = store->add_subcommand("ls", "List the names in the store");
  ls->add_flag("--json", args->json, "Print JSON");

  CLI::App* rm = store->add_subcommand("rm", "Remove names (gc reclaims their space)");
  rm->add_option("NAME", args->names, "Names to remove")->required();

  CLI::App* stats =
      store->add_subcommand("stats", "Show chunk counts, sizes, dedup and compression");
  stats->add_flag("--json", args->json, "Print JSON");

  CLI::App* verify =
      store->add_subcommand("verify", "Re-hash every chunk and check every reference");

  CLI::App* gc = store->add_subcommand("gc", "Delete what no name or running sandbox uses");
  gc->add_flag("-n,--dry-run", args->dry_run, "Only report what would be removed");

  return [=, &global]() -> int {
    if (put->parsed()) return run_put(global, *args);
    if (get->parsed()) return run_get(global, *args);
    if (ls->parsed()) return run_ls(global, *args);
    if (rm->parsed()) return run_rm(global, *args);
    if (stats->parsed()) return run_stats(global, *args);
    if (verify->parsed()) return run_verify(global, *args);
    if (gc->parsed()) return run_gc(global, *args);
    return 2;
  };
}

}  // namespace msb::cli
