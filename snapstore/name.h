// Names: the user-visible references to manifests (snapshot names, archived files).
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace msb::snapstore {

inline constexpr size_t kMaxNameLength = 128;

// Why `name` is not a valid name, or nullopt if it is. Valid names are 1..128 characters of
// letters, digits, '.', '_' and '-', start with a letter or digit, and do not contain "..". They
// double as file names, command-line arguments and host names' prefixes, so the rule is strict on
// purpose.
std::optional<std::string> name_problem(std::string_view name);

// Throws StoreError("invalid name \"…\": reason") when name_problem() finds one.
void check_name(std::string_view name);

}  // namespace msb::snapstore
