#include "core/registry.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string_view>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

namespace msb::core {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kOciIndex = "application/vnd.oci.image.index.v1+json";
constexpr const char* kOciManifest = "application/vnd.oci.image.manifest.v1+json";
constexpr const char* kOciConfig = "application/vnd.oci.image.config.v1+json";
constexpr const char* kDockerList = "application/vnd.docker.distribution.manifest.list.v2+json";
constexpr const char* kDockerManifest = "application/vnd.docker.distribution.manifest.v2+json";
constexpr const char* kDockerConfig = "application/vnd.docker.container.image.v1+json";
constexpr const char* kDockerLayer = "application/vnd.docker.image.rootfs.diff.tar.gzip";
constexpr const char* kOciGzipLayer = "application/vnd.oci.image.layer.v1.tar+gzip";

// Manifests are small JSON documents; a bigger answer is not a manifest, and reading it whole
// into memory should not be an easy way to exhaust it.
constexpr uint64_t kMaxManifestBytes = 4 << 20;
// Error bodies are only read for their message.
constexpr size_t kMaxErrorBody = 64 << 10;
// The progress callback prints; once per MiB is often enough to look alive.
constexpr uint64_t kProgressStep = 1 << 20;

[[noreturn]] void fail(const std::string& message) {
  throw ImageError(message);
}

std::string lower(std::string s) {
  for (char& c : s)
    c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool is_hex64(std::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Digests name files under blobs/sha256/, so anything but sha256 and 64 lowercase hex digits is
// refused before it gets near a path.
bool is_sha256_digest(std::string_view s) {
  return s.substr(0, 7) == "sha256:" && is_hex64(s.substr(7));
}

// A string member of a JSON object, or "" when it is missing or not a string: registries' JSON is
// input, and a wrong type should read as "not there", not as a JSON library exception.
std::string string_at(const json& j, const char* key) {
  if (!j.is_object()) return "";
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

// --- references --------------------------------------------------------------------------------

bool valid_path_component(std::string_view c) {
  if (c.empty() || !std::isalnum(static_cast<unsigned char>(c.front())) ||
      !std::isalnum(static_cast<unsigned char>(c.back())))
    return false;
  return std::all_of(c.begin(), c.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' ||
           ch == '-';
  });
}

bool valid_tag(std::string_view t) {
  if (t.empty() || t.size() > 128 || t.front() == '.' || t.front() == '-') return false;
  return std::all_of(t.begin(), t.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_' || ch == '.' || ch == '-';
  });
}

// "host", "host:port", "[v6]:port" -> host without brackets, and port ("" when none).
std::pair<std::string, std::string> split_host_port(const std::string& hostport) {
  if (!hostport.empty() && hostport.front() == '[') {
    size_t close = hostport.find(']');
    if (close == std::string::npos) return {hostport, ""};
    std::string host = hostport.substr(1, close - 1);
    std::string rest = hostport.substr(close + 1);
    return {host, rest.size() > 1 && rest.front() == ':' ? rest.substr(1) : ""};
  }
  size_t colon = hostport.rfind(':');
  if (colon == std::string::npos) return {hostport, ""};
  return {hostport.substr(0, colon), hostport.substr(colon + 1)};
}

bool valid_registry(const std::string& registry) {
  auto [host, port] = split_host_port(registry);
  if (host.empty()) return false;
  bool v6 = registry.front() == '[';
  for (char c : host) {
    bool ok =
        std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || (v6 && c == ':');
    if (!ok) return false;
  }
  bool has_colon_after_host = registry.size() > (v6 ? host.size() + 2 : host.size());
  if (has_colon_after_host && port.empty()) return false;
  return port.size() <= 5 &&
         std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Only literal loopback names count: a DNS name that happens to resolve to 127.0.0.1 could resolve
// elsewhere tomorrow, and plain HTTP must never leave the machine unasked.
bool is_loopback_host(const std::string& host) {
  std::string h = lower(host);
  if (h == "localhost" || h == "::1" || h == "0:0:0:0:0:0:0:1") return true;
  if (h.rfind("127.", 0) != 0) return false;
  int dots = 0;
  for (char c : h) {
    if (c == '.') {
      ++dots;
    } else if (c < '0' || c > '9') {
      return false;
    }
  }
  return dots == 3;
}

// MSB_INSECURE_REGISTRIES: comma-separated host[:port]; an entry without a port covers every port.
bool listed_insecure(const std::string& hostport) {
  const char* env = std::getenv("MSB_INSECURE_REGISTRIES");
  if (!env) return false;
  auto [host, port] = split_host_port(hostport);
  std::string list = env;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string entry = list.substr(start, end - start);
    entry.erase(0, entry.find_first_not_of(" \t"));
    entry.erase(entry.find_last_not_of(" \t") + 1);
    if (!entry.empty()) {
      auto [ehost, eport] = split_host_port(entry);
      if (lower(ehost) == lower(host) && (eport.empty() || eport == port)) return true;
    }
    start = end + 1;
  }
  return false;
}

bool plain_http_allowed(const std::string& hostport) {
  return is_loopback_host(split_host_port(hostport).first) || listed_insecure(hostport);
}

// The local tag: the reference as written, without a digest. A reference that names only a
// digest gets "sha256-<12 hex digits>" as its tag, since the tag must say which image it is.
std::string local_tag(const std::string& reference, const RegistryReference& ref) {
  std::string name = reference.substr(0, reference.find('@'));
  if (!ref.digest.empty()) {
    size_t slash = name.rfind('/');
    bool has_tag = name.find(':', slash == std::string::npos ? 0 : slash) != std::string::npos;
    if (!has_tag) name += ":sha256-" + ref.digest.substr(7, 12);
  }
  return normalize_image_tag(name);
}

// --- digests -----------------------------------------------------------------------------------

// "sha256:<hex>" (Sha256 is images.h's, computed by libarchive: msb links no crypto library).
std::string sha256_of(std::string_view data) {
  Sha256 h;
  h.update(data.data(), data.size());
  return "sha256:" + h.hex();
}

std::string base64(std::string_view in) {
  static const char* kChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v =
        uint32_t(uint8_t(in[i])) << 16 | uint32_t(uint8_t(in[i + 1])) << 8 | uint8_t(in[i + 2]);
    out += kChars[v >> 18];
    out += kChars[(v >> 12) & 63];
    out += kChars[(v >> 6) & 63];
    out += kChars[v & 63];
  }
  if (i < in.size()) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16;
    if (i + 1 < in.size()) v |= uint32_t(uint8_t(in[i + 1])) << 8;
    out += kChars[v >> 18];
    out += kChars[(v >> 12) & 63];
    out += i + 1 < in.size() ? kChars[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

std::string url_host(const std::string& url) {
  size_t start = url.find("://");
  if (start == std::string::npos) return "";
  start += 3;
  size_t end = url.find_first_of("/?#", start);
  std::string authority = url.substr(start, end == std::string::npos ? end : end - start);
  size_t at = authority.rfind('@');
  return at == std::string::npos ? authority : authority.substr(at + 1);
}

// --- HTTP --------------------------------------------------------------------------------------

struct Response {
  long status = 0;
  std::string url;  // where the answer came from, after redirects
  std::string content_type;
  std::string www_authenticate;
  std::string body;  // the body of an answer that was not 2xx (capped), or of a small one
};

// Receives a 2xx body; returns an error message to stop the transfer, or "" to go on.
using Sink = std::function<std::string(const char* data, size_t size)>;

void curl_global() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

class Http {
 public:
  // `prefix` starts every error message ("pull REF: ").
  explicit Http(std::string prefix) : prefix_(std::move(prefix)) {
    curl_global();
    curl_ = curl_easy_init();
    if (!curl_) fail("cannot set up libcurl");
  }
  ~Http() { curl_easy_cleanup(curl_); }
  Http(const Http&) = delete;
  Http& operator=(const Http&) = delete;

  // GETs `url`; a 2xx body goes to `sink`, any other to Response::body. `allow_plain_redirects`:
  // whether a redirect may lead to plain HTTP (only where the registry itself is plain HTTP).
  // Throws for transport errors (no connection, TLS, timeouts) with the URL in the message.
  Response get(const std::string& url, const std::vector<std::string>& headers, const Sink& sink,
               bool allow_plain_redirects) {
    State state;
    state.sink = &sink;
    curl_easy_reset(curl_);
    curl_slist* list = nullptr;
    for (const std::string& h : headers)
      list = curl_slist_append(list, h.c_str());
    std::unique_ptr<curl_slist, decltype(&curl_slist_free_all)> list_owner(list,
                                                                           curl_slist_free_all);
    char error[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(curl_, CURLOPT_ERRORBUFFER, error);
    curl_easy_setopt(curl_, CURLOPT_USERAGENT, "msb");
    curl_easy_setopt(curl_, CURLOPT_NOSIGNAL, 1L);
    // Blob downloads redirect to object storage. libcurl drops our Authorization header when a
    // redirect changes host, which is what presigned storage URLs need.
    curl_easy_setopt(curl_, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(curl_, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(curl_, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl_, CURLOPT_REDIR_PROTOCOLS_STR,
                     allow_plain_redirects ? "http,https" : "https");
    // No overall limit (layers can be big and links slow), but a connection that hangs or
    // trickles below 1 KiB/s for a minute is given up.
    curl_easy_setopt(curl_, CURLOPT_CONNECTTIMEOUT, 30L);
    curl_easy_setopt(curl_, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(curl_, CURLOPT_LOW_SPEED_TIME, 60L);
    // A proxy from the environment cannot reach this machine's loopback registries.
    std::string no_proxy = "localhost,127.0.0.0/8,::1";
    for (const char* name : {"NO_PROXY", "no_proxy"}) {
      if (const char* env = std::getenv(name); env && *env) {
        no_proxy = std::string(env) + "," + no_proxy;
        break;
      }
    }
    curl_easy_setopt(curl_, CURLOPT_NOPROXY, no_proxy.c_str());
    curl_easy_setopt(curl_, CURLOPT_HEADERFUNCTION, &Http::on_header);
    curl_easy_setopt(curl_, CURLOPT_HEADERDATA, &state);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, &Http::on_data);
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &state);

    CURLcode rc = curl_easy_perform(curl_);
    if (!state.sink_error.empty()) fail(state.sink_error);
    if (rc != CURLE_OK) {
      std::string why = *error ? error : curl_easy_strerror(rc);
      char* effective = nullptr;
      curl_easy_getinfo(curl_, CURLINFO_EFFECTIVE_URL, &effective);
      const std::string where = effective ? effective : url;
      const std::string host = url_host(where);
      const bool tls = where.rfind("https://", 0) == 0;
      std::string message;
      if (rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_RESOLVE_PROXY ||
          rc == CURLE_COULDNT_CONNECT) {
        message = "cannot reach " + host;
      } else if (tls && (rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_PEER_FAILED_VERIFICATION ||
                         rc == CURLE_SSL_CERTPROBLEM || rc == CURLE_SSL_CACERT_BADFILE)) {
        message = "no trusted HTTPS connection to " + host;
      } else {
        message = "download from " + host + " failed";
      }
      message += " (GET " + where + ": " + why;
      // The usual reason HTTPS fails against a registry on a LAN: it only speaks plain HTTP.
      if (tls && rc == CURLE_SSL_CONNECT_ERROR) {
        message += "; a registry that serves plain HTTP must be listed in MSB_INSECURE_REGISTRIES";
      }
      fail(prefix_ + message + ")");
    }
    Response r = std::move(state.response);
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &r.status);
    char* effective = nullptr;
    curl_easy_getinfo(curl_, CURLINFO_EFFECTIVE_URL, &effective);
    r.url = effective ? effective : url;
    return r;
  }

 private:
  struct State {
    const Sink* sink = nullptr;
    long status = 0;  // of the answer whose headers came last
    Response response;
    std::string sink_error;
  };

  // Headers of every answer along a redirect chain arrive here; each status line starts afresh,
  // so what is kept belongs to the final answer.
  static size_t on_header(char* data, size_t size, size_t count, void* user) {
    auto* state = static_cast<State*>(user);
    size_t n = size * count;
    std::string_view line(data, n);
    while (!line.empty() && (line.back() == '\r' || line.back() == '\n'))
      line.remove_suffix(1);
    if (line.rfind("HTTP/", 0) == 0) {
      state->response = Response();
      size_t space = line.find(' ');
      state->status =
          space == std::string_view::npos
              ? 0
              : std::strtol(std::string(line.substr(space + 1, 3)).c_str(), nullptr, 10);
      return n;
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return n;
    std::string name = lower(std::string(line.substr(0, colon)));
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t'))
      value.remove_prefix(1);
    if (name == "content-type") state->response.content_type = std::string(value);
    if (name == "www-authenticate" && state->response.www_authenticate.empty())
      state->response.www_authenticate = std::string(value);
    return n;
  }

  static size_t on_data(char* data, size_t size, size_t count, void* user) {
    auto* state = static_cast<State*>(user);
    size_t n = size * count;
    if (state->status >= 200 && state->status < 300) {
      std::string error = (*state->sink)(data, n);
      if (!error.empty()) {
        state->sink_error = std::move(error);
        return 0;  // makes libcurl stop with CURLE_WRITE_ERROR
      }
    } else if (state->response.body.size() < kMaxErrorBody) {
      state->response.body.append(data, std::min(n, kMaxErrorBody - state->response.body.size()));
    }
    return n;
  }

  std::string prefix_;
  CURL* curl_ = nullptr;
};

// `Bearer realm="...",service="..."` -> scheme "bearer" and its parameters.
struct Challenge {
  std::string scheme;
  std::map<std::string, std::string> params;
};

Challenge parse_challenge(const std::string& header) {
  Challenge c;
  size_t i = header.find(' ');
  c.scheme = lower(header.substr(0, i));
  while (i != std::string::npos && i < header.size()) {
    while (i < header.size() && (header[i] == ' ' || header[i] == ','))
      ++i;
    size_t eq = header.find('=', i);
    if (eq == std::string::npos) break;
    std::string key = lower(header.substr(i, eq - i));
    std::string value;
    i = eq + 1;
    if (i < header.size() && header[i] == '"') {
      for (++i; i < header.size() && header[i] != '"'; ++i) {
        if (header[i] == '\\' && i + 1 < header.size()) ++i;
        value += header[i];
      }
      ++i;
    } else {
      size_t end = header.find(',', i);
      value = header.substr(i, end == std::string::npos ? std::string::npos : end - i);
      i = end;
    }
    c.params[key] = value;
  }
  return c;
}

// The registry's own explanation from an error body ({"errors":[{"code","message"}]}), if any.
std::string registry_message(const std::string& body) {
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("errors") ||
      !doc["errors"].is_array() || doc["errors"].empty())
    return "";
  const json& e = doc["errors"][0];
  std::string code = string_at(e, "code");
  std::string message = string_at(e, "message");
  if (code.empty()) return message;
  return message.empty() ? code : code + ": " + message;
}

std::string url_escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += char(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// --- the registry ------------------------------------------------------------------------------

struct Descriptor {
  std::string media_type;
  std::string digest;
  uint64_t size = 0;
};

class Registry {
 public:
  Registry(const RegistryReference& ref, std::string reference)
      : ref_(ref), reference_(std::move(reference)), http_("pull " + reference_ + ": ") {
    base_ = std::string(ref.plain_http ? "http://" : "https://") + ref.endpoint + "/v2/" +
            ref.repository;
  }

  // GETs a path under /v2/REPOSITORY/, answering auth challenges once. `what` names the thing
  // for error messages ("manifest 1", "blob sha256:...").
  void get(const std::string& path, const std::string& accept, const Sink& sink,
           const std::string& what, Response* out = nullptr) {
    std::string url = base_ + path;
    bool tried_auth = false;
    for (;;) {
      std::vector<std::string> headers;
      if (!accept.empty()) headers.push_back("Accept: " + accept);
      if (!authorization_.empty()) headers.push_back("Authorization: " + authorization_);
      Response r = http_.get(url, headers, sink, ref_.plain_http);
      if (r.status >= 200 && r.status < 300) {
        if (out) *out = std::move(r);
        return;
      }
      if (r.status == 401 && !tried_auth) {
        tried_auth = true;
        authenticate(r);
        continue;
      }
      std::string message = registry_message(r.body);
      std::string prefix = "pull " + reference_ + ": ";
      if (r.status == 404) {
        fail(prefix + "no " + what + " in " + ref_.registry + "/" + ref_.repository + " (GET " +
             url + ": HTTP 404" + (message.empty() ? "" : ", " + message) + ")");
      }
      if (r.status == 401 || r.status == 403) {
        fail(prefix + ref_.registry + " denied access to " + ref_.repository + " (GET " + url +
             ": HTTP " + std::to_string(r.status) + (message.empty() ? "" : ", " + message) +
             "; the repository may not exist, or may need MSB_REGISTRY_AUTH=USER:PASSWORD)");
      }
      fail(prefix + "GET " + r.url + ": HTTP " + std::to_string(r.status) +
           (message.empty() ? "" : " (" + message + ")"));
    }
  }

 private:
  std::optional<std::string> credentials() const {
    const char* env = std::getenv("MSB_REGISTRY_AUTH");
    if (!env || !*env) return std::nullopt;
    if (!std::strchr(env, ':')) fail("MSB_REGISTRY_AUTH must be USER:PASSWORD");
    return std::string(env);
  }

  void authenticate(const Response& r) {
    std::string prefix = "pull " + reference_ + ": ";
    if (r.www_authenticate.empty()) {
      fail(prefix + ref_.registry + " answered HTTP 401 without a WWW-Authenticate challenge");
    }
    Challenge c = parse_challenge(r.www_authenticate);
    if (c.scheme == "basic") {
      auto creds = credentials();
      if (!creds) {
        fail(prefix + ref_.registry +
             " requires a login (HTTP 401, Basic): set MSB_REGISTRY_AUTH=USER:PASSWORD");
      }
      authorization_ = "Basic " + base64(*creds);
      return;
    }
    if (c.scheme != "bearer") {
      fail(prefix + ref_.registry + " asks for unsupported authentication \"" + c.scheme + "\"");
    }
    std::string realm = c.params["realm"];
    if (realm.rfind("https://", 0) != 0 &&
        !(realm.rfind("http://", 0) == 0 && plain_http_allowed(url_host(realm)))) {
      fail(prefix + ref_.registry + "'s token service \"" + realm +
           "\" is not an HTTPS URL (plain HTTP only for loopback or MSB_INSECURE_REGISTRIES)");
    }
    std::string url = realm + (realm.find('?') == std::string::npos ? "?" : "&");
    if (!c.params["service"].empty()) url += "service=" + url_escape(c.params["service"]) + "&";
    url += "scope=" + url_escape("repository:" + ref_.repository + ":pull");
    std::vector<std::string> headers;
    if (auto creds = credentials()) headers.push_back("Authorization: Basic " + base64(*creds));
    std::string body;
    Sink sink = [&](const char* data, size_t size) -> std::string {
      if (body.size() + size > kMaxManifestBytes)
        return prefix + "token answer from " + realm + " is too big";
      body.append(data, size);
      return "";
    };
    Response t = http_.get(url, headers, sink, realm.rfind("http://", 0) == 0);
    if (t.status < 200 || t.status >= 300) {
      std::string message = registry_message(t.body);
      if (message.empty() && t.body.size() < 200) message = t.body;
      while (!message.empty() && std::isspace(static_cast<unsigned char>(message.back())))
        message.pop_back();
      fail(prefix + "token service " + realm + " refused a token for " + ref_.repository +
           " (HTTP " + std::to_string(t.status) + (message.empty() ? "" : ", " + message) +
           (t.status != 401 ? ""
            : credentials() ? "; check MSB_REGISTRY_AUTH"
                            : "; set MSB_REGISTRY_AUTH=USER:PASSWORD") +
           ")");
    }
    json doc = json::parse(body, nullptr, false);
    std::string token;
    if (doc.is_object()) {
      for (const char* key : {"token", "access_token"}) {
        if (doc.contains(key) && doc[key].is_string() && !doc[key].get<std::string>().empty()) {
          token = doc[key];
          break;
        }
      }
    }
    if (token.empty()) fail(prefix + "token service " + realm + " answered without a token");
    authorization_ = "Bearer " + token;
  }

  RegistryReference ref_;
  std::string reference_;
  std::string base_;
  std::string authorization_;
  Http http_;
};

Descriptor parse_descriptor(const json& j, const std::string& what, const std::string& prefix) {
  if (!j.is_object() || !j.contains("digest") || !j["digest"].is_string() || !j.contains("size") ||
      !j["size"].is_number_unsigned()) {
    fail(prefix + what + " has no valid digest and size");
  }
  Descriptor d;
  d.digest = j["digest"];
  d.size = j["size"];
  if (j.contains("mediaType") && j["mediaType"].is_string()) d.media_type = j["mediaType"];
  if (!is_sha256_digest(d.digest)) {
    fail(prefix + what + " has digest \"" + d.digest + "\": only sha256 digests are supported");
  }
  return d;
}

struct Manifest {
  std::string media_type;
  std::string bytes;
  json doc;
};

// Fetches a manifest by tag or digest; `expected` (from an index or the reference) is checked
// against what arrives.
Manifest fetch_manifest(Registry& registry, const std::string& ref, const Descriptor* expected,
                        const std::string& prefix) {
  Manifest m;
  Sink sink = [&](const char* data, size_t size) -> std::string {
    if (m.bytes.size() + size > kMaxManifestBytes) {
      return prefix + "manifest " + ref + " is bigger than " +
             std::to_string(kMaxManifestBytes >> 20) + " MiB";
    }
    m.bytes.append(data, size);
    return "";
  };
  std::string accept =
      std::string(kOciIndex) + ", " + kOciManifest + ", " + kDockerList + ", " + kDockerManifest;
  Response r;
  registry.get("/manifests/" + ref, accept, sink,
               (is_sha256_digest(ref) ? "manifest " : "tag ") + ref, &r);
  if (expected) {
    std::string got = sha256_of(m.bytes);
    if (got != expected->digest) {
      fail(prefix + "manifest " + expected->digest + " is corrupt: its content hashes to " + got);
    }
    if (expected->size && m.bytes.size() != expected->size) {
      fail(prefix + "manifest " + expected->digest + " has " + std::to_string(m.bytes.size()) +
           " bytes, not " + std::to_string(expected->size));
    }
  }
  m.doc = json::parse(m.bytes, nullptr, false);
  if (m.doc.is_discarded() || !m.doc.is_object()) {
    fail(prefix + "manifest " + ref + " is not a JSON object");
  }
  if (m.doc.contains("mediaType") && m.doc["mediaType"].is_string()) {
    m.media_type = m.doc["mediaType"];
  } else {
    m.media_type = r.content_type.substr(0, r.content_type.find(';'));
    m.media_type.erase(m.media_type.find_last_not_of(" \t") + 1);
  }
  if (m.media_type != kOciIndex && m.media_type != kOciManifest && m.media_type != kDockerList &&
      m.media_type != kDockerManifest) {
    // Registries that do not say fall back on application/json; the shape tells.
    if (m.doc.contains("manifests")) {
      m.media_type = kOciIndex;
    } else if (m.doc.contains("layers") && m.doc.contains("config")) {
      m.media_type = kOciManifest;
    } else if (m.doc.contains("schemaVersion") && m.doc["schemaVersion"] == 1) {
      fail(prefix + "manifest " + ref +
           " is a Docker schema 1 manifest, which msb does not support (re-push the image "
           "with a current client)");
    } else {
      fail(prefix + "manifest " + ref + " has unsupported media type \"" + m.media_type + "\"");
    }
  }
  return m;
}

// The linux/amd64 entry of an image index or Docker manifest list.
Descriptor choose_platform(const Manifest& index, const std::string& prefix) {
  if (!index.doc.contains("manifests") || !index.doc["manifests"].is_array()) {
    fail(prefix + "image index has no \"manifests\" list");
  }
  std::optional<Descriptor> best;
  bool best_plain = false;
  std::set<std::string> platforms;
  for (const json& entry : index.doc["manifests"]) {
    if (!entry.is_object() || !entry.contains("platform") || !entry["platform"].is_object())
      continue;
    const json& p = entry["platform"];
    std::string os = string_at(p, "os");
    std::string arch = string_at(p, "architecture");
    std::string variant = string_at(p, "variant");
    if (os == "unknown") continue;  // build attestations, not images
    platforms.insert(os + "/" + arch + (variant.empty() ? "" : "/" + variant));
    if (os != "linux" || arch != "amd64") continue;
    // Plain amd64 (no v2/v3 variant) runs on every x86-64 CPU, so it wins.
    if (!best || (variant.empty() && !best_plain)) {
      best = parse_descriptor(entry, "the linux/amd64 entry of the image index", prefix);
      best_plain = variant.empty();
    }
  }
  if (!best) {
    std::string list;
    for (const std::string& p : platforms)
      list += (list.empty() ? "" : ", ") + p;
    fail(prefix + "the image has no linux/amd64 variant (it has " +
         (list.empty() ? std::string("none named") : list) + ")");
  }
  return *best;
}

bool is_layer_type(const std::string& t) {
  return t.empty() || t.rfind("application/vnd.oci.image.layer.", 0) == 0 ||
         t.rfind("application/vnd.docker.image.rootfs.diff.tar", 0) == 0;
}

void write_text_file(const fs::path& path, std::string_view text) {
  FILE* f = std::fopen(path.c_str(), "wbx");
  if (!f) fail("cannot create " + path.string() + ": " + std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) fail("cannot write " + path.string() + ": " + std::strerror(errno));
}

// The download folder under $MSB_HOME/tmp, removed however the pull ends.
class TempTree {
 public:
  explicit TempTree(const Home& home) {
    fs::path parent = home.root() / "tmp";
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) fail("cannot create " + parent.string() + ": " + ec.message());
    std::string pattern = (parent / "pull-XXXXXX").string();
    if (!::mkdtemp(pattern.data())) {
      fail("cannot create a folder in " + parent.string() + ": " + std::strerror(errno));
    }
    path_ = pattern;
  }
  ~TempTree() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempTree(const TempTree&) = delete;
  TempTree& operator=(const TempTree&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

class Downloads {
 public:
  Downloads(uint64_t total, const snapstore::ProgressFn& progress)
      : total_(total), progress_(progress) {}
  void add(uint64_t n) {
    done_ += n;
    if (progress_ && (done_ - reported_ >= kProgressStep || done_ == total_)) {
      reported_ = done_;
      progress_(done_, total_);
    }
  }

 private:
  uint64_t total_;
  uint64_t done_ = 0;
  uint64_t reported_ = 0;
  const snapstore::ProgressFn& progress_;
};

// Streams a blob into blobs/sha256/HEX, checking its size on the way and its digest at the end.
void fetch_blob(Registry& registry, const Descriptor& d, const fs::path& blobs,
                Downloads& downloads, const std::string& prefix) {
  fs::path target = blobs / d.digest.substr(7);
  if (fs::exists(target)) return;  // the same blob twice in one image
  fs::path partial = target;
  partial += ".partial";
  FILE* f = std::fopen(partial.c_str(), "wbx");
  if (!f) fail("cannot create " + partial.string() + ": " + std::strerror(errno));
  std::unique_ptr<FILE, int (*)(FILE*)> file(f, std::fclose);
  Sha256 hash;
  uint64_t received = 0;
  Sink sink = [&](const char* data, size_t size) -> std::string {
    if (received + size > d.size) {
      return prefix + "blob " + d.digest + " is corrupt: the registry sent more than the " +
             std::to_string(d.size) + " bytes the manifest gives";
    }
    if (std::fwrite(data, 1, size, f) != size)
      return "cannot write " + partial.string() + ": " + std::strerror(errno);
    hash.update(data, size);
    received += size;
    downloads.add(size);
    return "";
  };
  registry.get("/blobs/" + d.digest, "", sink, "blob " + d.digest);
  if (std::fclose(file.release()) != 0) {
    fail("cannot write " + partial.string() + ": " + std::strerror(errno));
  }
  if (received != d.size) {
    fail(prefix + "blob " + d.digest + " is truncated: the registry sent " +
         std::to_string(received) + " of " + std::to_string(d.size) + " bytes");
  }
  std::string got = "sha256:" + hash.hex();
  if (got != d.digest) {
    fail(prefix + "blob " + d.digest + " is corrupt: its content hashes to " + got);
  }
  fs::rename(partial, target);
}

}  // namespace

RegistryReference parse_registry_reference(const std::string& reference) {
  auto bad = [&](const std::string& why) -> ImageError {
    return ImageError("invalid image reference \"" + reference + "\": " + why);
  };
  if (reference.empty()) throw bad("it is empty");
  RegistryReference ref;
  std::string rest = reference;
  if (size_t at = rest.find('@'); at != std::string::npos) {
    ref.digest = rest.substr(at + 1);
    rest.resize(at);
    if (!is_sha256_digest(ref.digest)) {
      throw bad("the digest must be sha256: and 64 lowercase hex digits");
    }
  }
  if (size_t slash = rest.find('/'); slash != std::string::npos) {
    std::string first = rest.substr(0, slash);
    if (first.find_first_of(".:") != std::string::npos || first == "localhost") {
      ref.registry = first;
      rest.erase(0, slash + 1);
      if (!valid_registry(ref.registry)) throw bad("\"" + ref.registry + "\" is not a host[:port]");
    }
  }
  size_t last_slash = rest.rfind('/');
  if (size_t colon = rest.find(':', last_slash == std::string::npos ? 0 : last_slash);
      colon != std::string::npos) {
    ref.tag = rest.substr(colon + 1);
    rest.resize(colon);
    if (!valid_tag(ref.tag)) throw bad("\"" + ref.tag + "\" is not a valid tag");
  }
  size_t start = 0;
  for (;;) {
    size_t end = rest.find('/', start);
    std::string component = rest.substr(start, end == std::string::npos ? end : end - start);
    if (!valid_path_component(component)) {
      throw bad("the name must be lowercase letters, digits and . _ - separated by /");
    }
    if (end == std::string::npos) break;
    start = end + 1;
  }
  ref.repository = rest;
  std::string reg = lower(ref.registry);
  if (reg.empty() || reg == "docker.io" || reg == "index.docker.io" ||
      reg == "registry-1.docker.io") {
    if (ref.registry.empty()) ref.registry = "docker.io";
    ref.endpoint = "registry-1.docker.io";
    if (ref.repository.find('/') == std::string::npos) ref.repository = "library/" + rest;
  } else {
    ref.endpoint = ref.registry;
  }
  if (ref.tag.empty() && ref.digest.empty()) ref.tag = "latest";
  ref.plain_http = plain_http_allowed(ref.endpoint);
  return ref;
}

ImageInfo pull_image(const Home& home, snapstore::Store& store, const std::string& reference,
                     const snapstore::ProgressFn& progress) {
  RegistryReference ref = parse_registry_reference(reference);
  const std::string tag = local_tag(reference, ref);
  const std::string prefix = "pull " + reference + ": ";
  Registry registry(ref, reference);

  // The manifest: by digest when one was given (and then checked against it), else by tag.
  Descriptor by_digest{"", ref.digest, 0};
  Manifest manifest = fetch_manifest(registry, ref.digest.empty() ? ref.tag : ref.digest,
                                     ref.digest.empty() ? nullptr : &by_digest, prefix);
  if (manifest.media_type == kOciIndex || manifest.media_type == kDockerList) {
    Descriptor chosen = choose_platform(manifest, prefix);
    manifest = fetch_manifest(registry, chosen.digest, &chosen, prefix);
    if (manifest.media_type != kOciManifest && manifest.media_type != kDockerManifest) {
      fail(prefix + "the linux/amd64 entry " + chosen.digest + " is not an image manifest (" +
           manifest.media_type + ")");
    }
  }

  if (!manifest.doc.contains("config") || !manifest.doc.contains("layers") ||
      !manifest.doc["layers"].is_array()) {
    fail(prefix + "the image manifest has no config or no layers");
  }
  Descriptor config = parse_descriptor(manifest.doc["config"], "the image config", prefix);
  if (config.media_type != kOciConfig && config.media_type != kDockerConfig) {
    fail(prefix + "not a container image: its config is \"" + config.media_type + "\"");
  }
  std::vector<Descriptor> layers;
  for (const json& l : manifest.doc["layers"]) {
    Descriptor d = parse_descriptor(l, "a layer", prefix);
    if (!is_layer_type(d.media_type)) {
      fail(prefix + "layer " + d.digest + " has media type \"" + d.media_type +
           "\", which is not a filesystem layer msb can unpack");
    }
    layers.push_back(d);
  }

  // import_image reads OCI image layouts; a Docker manifest becomes the equivalent OCI one (the
  // blobs are the same bytes, only the media types differ), as skopeo does when it converts.
  std::string manifest_bytes = manifest.bytes;
  if (manifest.media_type == kDockerManifest) {
    json oci = {
        {"schemaVersion", 2},
        {"mediaType", kOciManifest},
        {"config", {{"mediaType", kOciConfig}, {"digest", config.digest}, {"size", config.size}}},
        {"layers", json::array()}};
    for (const Descriptor& d : layers) {
      std::string type = d.media_type == kDockerLayer || d.media_type.empty()
                             ? std::string(kOciGzipLayer)
                             : d.media_type;
      oci["layers"].push_back({{"mediaType", type}, {"digest", d.digest}, {"size", d.size}});
    }
    manifest_bytes = oci.dump();
  }

  uint64_t total = config.size;
  std::set<std::string> seen{config.digest};
  for (const Descriptor& d : layers) {
    if (seen.insert(d.digest).second) total += d.size;
  }

  TempTree dir(home);
  fs::path blobs = dir.path() / "blobs" / "sha256";
  fs::create_directories(blobs);
  Downloads downloads(total, progress);
  fetch_blob(registry, config, blobs, downloads, prefix);
  for (const Descriptor& d : layers)
    fetch_blob(registry, d, blobs, downloads, prefix);

  std::string manifest_digest = sha256_of(manifest_bytes);
  write_text_file(blobs / manifest_digest.substr(7), manifest_bytes);
  write_text_file(dir.path() / "oci-layout", R"({"imageLayoutVersion":"1.0.0"})");
  json index = {{"schemaVersion", 2},
                {"manifests",
                 {{{"mediaType", kOciManifest},
                   {"digest", manifest_digest},
                   {"size", manifest_bytes.size()},
                   {"annotations", {{"org.opencontainers.image.ref.name", tag}}}}}}};
  write_text_file(dir.path() / "index.json", index.dump());

  try {
    return import_image(home, store, dir.path(), tag, progress,
                        reference.substr(0, reference.find('@')) + "@" + manifest_digest);
  } catch (const ImageError& e) {
    // The download folder is gone once this returns; the reference is what the user knows.
    std::string message = e.what();
    const std::string where = dir.path().string();
    for (size_t at; (at = message.find(where)) != std::string::npos;)
      message.replace(at, where.size(), "the downloaded image");
    throw ImageError(prefix + message);
  }
}

}  // namespace msb::core
