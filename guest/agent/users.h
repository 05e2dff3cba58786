// Who an exec runs as: "NAME", "UID", "NAME:GROUP" or "UID:GID", resolved against the root
// filesystem's /etc/passwd and /etc/group, parsed here (a static binary has no NSS).
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace msb::agent {

struct Credentials {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups (the primary one included)
  std::string home = "/";
};

// Resolves `spec` with the files at `passwd` and `group` (either may be missing). A numeric UID
// that /etc/passwd does not know runs with GID 0 and HOME /, as container runtimes do. Returns
// nullopt and sets `error` for an unknown name or a malformed spec.
std::optional<Credentials> resolve_user(const std::string& spec, std::string& error,
                                        const std::string& passwd = "/etc/passwd",
                                        const std::string& group = "/etc/group");

}  // namespace msb::agent
