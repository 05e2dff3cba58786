// Starting a command for a kExec: its own session and process group, pipes for stdin, stdout
// and stderr, the merged environment, the working directory and the user.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "core/frames.h"

namespace msb::agent {

// The environment every command starts from, before the sandbox's and the exec's own.
std::vector<std::string> base_environment(const std::string& home);

// `base`, then `sandbox`, then `exec` ("K=V" each; a later key wins, keeping its first place).
std::vector<std::string> merge_environment(const std::vector<std::string>& base,
                                           const std::vector<std::string>& sandbox,
                                           const std::vector<std::string>& exec);

struct Process {
  pid_t pid = -1;     // also its process group
  int stdin_fd = -1;  // the agent's ends, non-blocking, close-on-exec
  int stdout_fd = -1;
  int stderr_fd = -1;
};

struct StartError {
  int code = 126;  // 127: not found, 126: cannot run
  std::string message;
};

// Starts `request` with `sandbox_env`; on failure returns false with `error` filled (nothing is
// left running).
bool start_process(const core::ExecRequest& request, const std::vector<std::string>& sandbox_env,
                   Process& process, StartError& error);

}  // namespace msb::agent
