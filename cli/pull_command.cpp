#include "cli/pull_command.h"

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli/image_commands.h"
#include "cli/output.h"
#include "core/home.h"
#include "core/registry.h"

namespace msb::cli {
namespace {

struct PullArgs {
  std::string reference;
  bool json = false;
};

int run_pull(const GlobalOptions& global, const PullArgs& args) {
  core::Home home = core::Home::resolve(
      global.home.empty() ? std::nullopt : std::optional<std::filesystem::path>(global.home));
  auto store = home.open_store();
  core::ImageInfo info;
  {
    // Scoped so that the progress line is cleared before the result is printed.
    Progress progress("pulling " + args.reference, global.quiet || args.json);
    info = core::pull_image(home, *store, args.reference, progress.callback());
  }
  print_new_image(global, args.json, info);
  return 0;
}

}  // namespace

std::function<int()> add_pull_command(CLI::App& app, const GlobalOptions& global) {
  auto args = std::make_shared<PullArgs>();
  CLI::App* pull = app.add_subcommand(
      "pull", "Download an image from a registry (Docker Hub unless REF names one) and import it");
  pull->add_option("reference", args->reference, "[REGISTRY/]NAME[:TAG][@sha256:DIGEST]")
      ->required();
  pull->add_flag("--json", args->json, "Print the image as JSON");
  return [pull, args, &global]() -> int {
    if (!pull->parsed()) return -1;
    return run_pull(global, *args);
  };
}

}  // namespace msb::cli
