#include "guest/agent/users.h"

#include <charconv>
#include <sstream>

#include "guest/agent/util.h"

namespace msb::agent {
namespace {

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> fields;
  size_t start = 0;
  for (;;) {
    size_t end = text.find(separator, start);
    fields.push_back(text.substr(start, end - start));
    if (end == std::string::npos) return fields;
    start = end + 1;
  }
}

std::optional<uint32_t> number(const std::string& text) {
  uint32_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// The lines of a colon-separated database with at least `fields` fields.
std::vector<std::vector<std::string>> entries(const std::string& path, size_t fields) {
  std::vector<std::vector<std::string>> out;
  std::string text;
  if (!read_file(path, text)) return out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    auto parts = split(line, ':');
    if (parts.size() >= fields) out.push_back(std::move(parts));
  }
  return out;
}

}  // namespace

std::optional<Credentials> resolve_user(const std::string& spec, std::string& error,
                                        const std::string& passwd, const std::string& group) {
  size_t colon = spec.find(':');
  std::string user_part = spec.substr(0, colon);
  std::string group_part = colon == std::string::npos ? "" : spec.substr(colon + 1);
  if (user_part.empty() || (colon != std::string::npos && group_part.empty())) {
    error = "malformed user \"" + spec + "\"";
    return std::nullopt;
  }
  Credentials creds;
  std::string name;
  bool found = false;
  auto numeric_uid = number(user_part);
  for (const auto& entry : entries(passwd, 7)) {
    auto uid = number(entry[2]);
    auto gid = number(entry[3]);
    if (!uid || !gid) continue;
    if (numeric_uid ? *uid == *numeric_uid : entry[0] == user_part) {
      creds.uid = *uid;
      creds.gid = *gid;
      creds.home = entry[5].empty() ? "/" : entry[5];
      name = entry[0];
      found = true;
      break;
    }
  }
  if (!found) {
    if (!numeric_uid) {
      error = "no user \"" + user_part + "\" in /etc/passwd";
      return std::nullopt;
    }
    creds.uid = *numeric_uid;
  }
  auto groups = entries(group, 4);
  if (!group_part.empty()) {
    auto numeric_gid = number(group_part);
    bool group_found = numeric_gid.has_value();
    if (numeric_gid) creds.gid = *numeric_gid;
    for (const auto& entry : groups) {
      if (!numeric_gid && entry[0] == group_part) {
        if (auto gid = number(entry[2])) {
          creds.gid = *gid;
          group_found = true;
          break;
        }
      }
    }
    if (!group_found) {
      error = "no group \"" + group_part + "\" in /etc/group";
      return std::nullopt;
    }
  }
  creds.groups.push_back(creds.gid);
  if (!name.empty()) {
    for (const auto& entry : groups) {
      auto gid = number(entry[2]);
      if (!gid || *gid == creds.gid) continue;
      for (const auto& member : split(entry[3], ','))
        if (member == name) creds.groups.push_back(*gid);
    }
  }
  return creds;
}

}  // namespace msb::agent
