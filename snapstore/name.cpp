#include "snapstore/name.h"

#include <cstdio>

#include "snapstore/error.h"

namespace msb::snapstore {
namespace {

bool is_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

// The name as it can be shown in a one-line error: control characters escaped.
std::string printable(std::string_view name) {
  std::string out;
  for (char c : name.substr(0, kMaxNameLength + 8)) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f || c == '"' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  if (name.size() > kMaxNameLength + 8) out += "...";
  return out;
}

}  // namespace

std::optional<std::string> name_problem(std::string_view name) {
  if (name.empty()) return "a name cannot be empty";
  if (name.size() > kMaxNameLength) {
    return "a name is at most " + std::to_string(kMaxNameLength) + " characters, this one has " +
           std::to_string(name.size());
  }
  for (char c : name) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return "control characters are not allowed";
    if (c == '/') return "'/' is not allowed";
    if (!is_alnum(c) && c != '.' && c != '_' && c != '-') {
      return std::string("'") + (u >= 0x80 ? std::string("non-ASCII") : std::string(1, c)) +
             "' is not allowed (use letters, digits, '.', '_' and '-')";
    }
  }
  if (!is_alnum(name.front())) return "a name must start with a letter or digit";
  if (name.find("..") != std::string_view::npos) return "\"..\" is not allowed";
  return std::nullopt;
}

void check_name(std::string_view name) {
  if (auto problem = name_problem(name)) {
    throw StoreError("invalid name \"" + printable(name) + "\": " + *problem);
  }
}

}  // namespace msb::snapstore
