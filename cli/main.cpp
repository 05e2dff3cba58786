// msb's command line: parses arguments, calls core, prints results. Holds no state of its own.
#include <cstdio>
#include <cstring>
#include <exception>

#include <CLI/CLI.hpp>

#include "cli/context.h"
#include "cli/image_commands.h"
#include "cli/pull_command.h"
#include "cli/sandbox_commands.h"
#include "cli/snapshot_commands.h"
#include "cli/store_commands.h"
#include "core/vmm_process.h"

int main(int argc, char** argv) {
  // `msb __vmm DIR`: the VMM process that msb create and msb start spawn. Not a user command, so
  // it stays out of CLI11 and --help.
  if (argc == 3 && std::strcmp(argv[1], msb::core::kVmmModeArgument) == 0) {
    try {
      return msb::core::run_vmm_process(argv[2]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "msb __vmm: %s\n", e.what());
      return 1;
    }
  }
  CLI::App app{
      "msb runs Linux sandboxes as KVM microVMs and makes their whole state cheap to snapshot,\n"
      "name and fork. State lives in $MSB_HOME (default ~/.msb).",
      "msb"};
  msb::cli::GlobalOptions global;
  // Global options may follow the subcommand too ("msb store ls --home DIR").
  app.fallthrough();
  app.add_option("--home", global.home, "State directory (default: $MSB_HOME, else ~/.msb)");
  app.add_flag("-q,--quiet", global.quiet, "Print no progress and no extra messages");
  app.set_version_flag("--version", "msb " MSB_VERSION);
  app.require_subcommand(1);
  auto run_sandbox = msb::cli::add_sandbox_commands(app, global);
  auto run_snapshot = msb::cli::add_snapshot_commands(app, global);
  auto run_store = msb::cli::add_store_commands(app, global);
  auto run_image = msb::cli::add_image_commands(app, global);
  auto run_pull = msb::cli::add_pull_command(app, global);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // CLI11 checks for a missing subcommand before it reports unexpected words, so a mistyped
    // command would read "A subcommand is required"; name the word instead.
    std::vector<std::string> unexpected = app.remaining();
    for (CLI::App* sub = &app; !sub->get_subcommands().empty();) {
      sub = sub->get_subcommands().front();
      for (const std::string& word : sub->remaining())
        unexpected.push_back(word);
    }
    if (dynamic_cast<const CLI::RequiredError*>(&e) && !unexpected.empty()) {
      std::fprintf(stderr, "msb: error: unknown command \"%s\" (see msb --help)\n",
                   unexpected.front().c_str());
    } else {
      std::fprintf(stderr, "msb: error: %s (see msb --help)\n", e.what());
    }
    return 2;
  }
  try {
    int code = run_sandbox();
    if (code < 0) code = run_snapshot();
    if (code < 0) code = run_image();
    if (code < 0) code = run_pull();
    return code >= 0 ? code : run_store();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "msb: error: %s\n", e.what());
    return 1;
  }
}
