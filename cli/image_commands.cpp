#include "cli/image_commands.h"

#include <algorithm>
#include <cstdio>
#include <memory>

#include <nlohmann/json.hpp>

#include "cli/output.h"
#include "core/home.h"
#include "core/images.h"

namespace msb::cli {

void print_new_image(const GlobalOptions& global, bool json, const core::ImageInfo& info) {
  if (json) {
    std::printf("%s\n", info.to_json().dump(2).c_str());
  } else if (!global.quiet) {
    std::printf("%s: image %s, %s ext4\n", info.tag.c_str(), info.id.substr(0, 12).c_str(),
                human_bytes(info.size).c_str());
  }
}

namespace {

struct ImageArgs {
  std::string source, tag;
  std::vector<std::string> tags;
  bool json = false;
};

core::Home home_of(const GlobalOptions& global) {
  return core::Home::resolve(
      global.home.empty() ? std::nullopt : std::optional<std::filesystem::path>(global.home));
}

std::string date_of(const std::string& iso) {
  // "2026-11-28T13:45:00Z" -> "2026-11-28 13:45:00"
  std::string out = iso;
  if (out.size() >= 19) out = out.substr(0, 10) + " " + out.substr(11, 8);
  return out;
}

int run_import(const GlobalOptions& global, const ImageArgs& args) {
  core::Home home = home_of(global);
  auto store = home.open_store();
  core::ImageInfo info;
  {
    // Gone (its line cleared) before the result is printed.
    Progress progress("importing " + args.source, global.quiet || args.json);
    info = core::import_image(home, *store, args.source, args.tag, progress.callback());
  }
  print_new_image(global, args.json, info);
  return 0;
}

int run_ls(const GlobalOptions& global, const ImageArgs& args) {
  auto store = home_of(global).open_store();
  std::vector<core::ImageInfo> images = core::list_images(*store);
  if (args.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& info : images)
      list.push_back(info.to_json());
    std::printf("%s\n", list.dump(2).c_str());
    return 0;
  }
  int width = 24;
  for (const auto& info : images)
    width = std::max(width, int(info.tag.size()));
  std::printf("%-*s %-12s %10s  %-19s  %s\n", width, "TAG", "ID", "SIZE", "CREATED", "SOURCE");
  for (const auto& info : images) {
    std::printf("%-*s %-12s %10s  %-19s  %s\n", width, info.tag.c_str(),
                info.id.substr(0, 12).c_str(), human_bytes(info.size).c_str(),
                date_of(info.created).c_str(), info.source.c_str());
  }
  return 0;
}

int run_rm(const GlobalOptions& global, const ImageArgs& args) {
  auto store = home_of(global).open_store();
  // Every tag is checked before any is removed, so a typo removes nothing.
  std::vector<core::ImageInfo> images = core::list_images(*store);
  for (const std::string& tag : args.tags) {
    std::string normal = core::normalize_image_tag(tag);
    if (std::none_of(images.begin(), images.end(),
                     [&](const core::ImageInfo& info) { return info.tag == normal; })) {
      throw core::ImageError("no image " + normal);
    }
  }
  for (const std::string& tag : args.tags)
    core::remove_image(*store, tag);
  if (!global.quiet) {
    std::printf("removed %zu image tag%s (msb store gc reclaims what no tag or sandbox uses)\n",
                args.tags.size(), args.tags.size() == 1 ? "" : "s");
  }
  return 0;
}

}  // namespace

std::function<int()> add_image_commands(CLI::App& app, const GlobalOptions& global) {
  auto args = std::make_shared<ImageArgs>();
  CLI::App* image = app.add_subcommand("image", "Import, list and remove root file system images");
  image->require_subcommand(1);

  CLI::App* import = image->add_subcommand(
      "import", "Import an OCI image layout or a docker save tarball as an ext4 root image");
  import
      ->add_option(
          "PATH", args->source,
          "OCI image layout folder (oci-layout, index.json, blobs/) or docker save tarball")
      ->required();
  import
      ->add_option("--tag", args->tag,
                   "NAME[:TAG] to keep it under (:latest if no tag); picks that image when PATH "
                   "holds several")
      ->required();
  import->add_flag("--json", args->json, "Print the image as JSON");

  CLI::App* ls = image->add_subcommand("ls", "List images: tag, id, ext4 size, created, source");
  ls->add_flag("--json", args->json, "Print JSON");

  CLI::App* rm = image->add_subcommand(
      "rm", "Remove image tags (msb store gc reclaims what no tag or sandbox uses)");
  rm->add_option("TAG", args->tags, "Tags to remove (NAME[:TAG])")->required();

  // msb pull REF (core/registry.h) registers here, beside image import.

  return [=, &global]() -> int {
    if (import->parsed()) return run_import(global, *args);
    if (ls->parsed()) return run_ls(global, *args);
    if (rm->parsed()) return run_rm(global, *args);
    // msb pull dispatches here.
    return -1;
  };
}

}  // namespace msb::cli
