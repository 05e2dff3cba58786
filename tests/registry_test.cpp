// msb pull against Debian's docker-registry on loopback: images built with umoci and pushed with
// skopeo, pulled directly and through tests/registry_token_proxy.py, which authenticates the way
// Docker Hub does (401, Bearer challenge, token service, blob redirects to "storage").
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "core/registry.h"
#include "tests/registry.h"
#include "tests/support.h"

namespace {

namespace fs = std::filesystem;
using msb::test::free_port;
using msb::test::kPython;
using msb::test::kRegistry;
using msb::test::kSkopeo;
using msb::test::kUmoci;
using msb::test::ProcessResult;
using msb::test::read_text;
using msb::test::Registry;
using msb::test::require_run;
using msb::test::run_process;
using msb::test::Server;
using msb::test::TempDir;
using msb::test::write_text;
using nlohmann::json;

void skip_without_tools() {
  msb::test::skip_without_tools({kRegistry, kSkopeo, kUmoci, kPython}, "msb pull's tests");
}

// tests/registry_token_proxy.py in front of a registry.
class TokenProxy {
 public:
  TokenProxy(const Registry& registry, std::vector<std::string> options,
             const std::string& host = "127.0.0.1")
      : host_(host), port_(free_port(host)) {
    std::vector<std::string> argv = {
        kPython,      std::string(MSB_TEST_DIR) + "/registry_token_proxy.py",
        "--host",     host_,
        "--port",     std::to_string(port_),
        "--registry", "http://" + registry.address(),
        "--log",      (dir_ / "requests.log").string()};
    argv.insert(argv.end(), options.begin(), options.end());
    server_.emplace(argv, host_, port_, dir_ / "proxy.log");
  }
  std::string address() const { return host_ + ":" + std::to_string(port_); }
  // One line per request: "GET PATH auth|-".
  std::string requests() const {
    std::error_code ec;
    return fs::exists(dir_ / "requests.log", ec) ? read_text(dir_ / "requests.log") : "";
  }

 private:
  TempDir dir_;
  std::string host_;
  uint16_t port_;
  std::optional<Server> server_;
};

// tests/registry_token_proxy.py as a plain forward proxy (what http_proxy and https_proxy name),
// on loopback: it forwards http:// requests and answers CONNECT with 502, logging each request.
class ForwardProxy {
 public:
  ForwardProxy() : port_(free_port("127.0.0.1")) {
    server_.emplace(
        std::vector<std::string>{kPython, std::string(MSB_TEST_DIR) + "/registry_token_proxy.py",
                                 "--port", std::to_string(port_), "--forward-proxy", "--log",
                                 (dir_ / "requests.log").string()},
        "127.0.0.1", port_, dir_ / "proxy.log");
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  // One line per request: "GET http://HOST:PORT/PATH auth|-", "CONNECT HOST:PORT -".
  std::string requests() const {
    std::error_code ec;
    return fs::exists(dir_ / "requests.log", ec) ? read_text(dir_ / "requests.log") : "";
  }

 private:
  TempDir dir_;
  uint16_t port_;
  std::optional<Server> server_;
};

// An OCI image layout with tag "1": three files, Env A=B, WorkingDir /w, Cmd /bin/hello.
struct TestImage {
  TempDir dir;
  fs::path layout = dir / "layout";

  TestImage() {
    std::string image = layout.string() + ":1";
    fs::path bundle = dir / "bundle";
    require_run({kUmoci, "init", "--layout", layout.string()});
    require_run({kUmoci, "new", "--image", image});
    msb::test::umoci_unpack(image, bundle);
    fs::create_directories(bundle / "rootfs/w");
    fs::create_directories(bundle / "rootfs/bin");
    fs::create_directories(bundle / "rootfs/etc");
    write_text(bundle / "rootfs/bin/hello", "#!/bin/sh\necho hello from the registry\n");
    write_text(bundle / "rootfs/etc/msb-pull-test", "pulled\n");
    write_text(bundle / "rootfs/w/data", std::string(100000, 'x'));
    require_run({kUmoci, "repack", "--image", image, bundle.string()});
    require_run({kUmoci, "config", "--image", image, "--config.env", "A=B", "--config.workingdir",
                 "/w", "--config.cmd", "/bin/hello"});
  }

  json index() const { return json::parse(read_text(layout / "index.json")); }
  // The descriptor of tag `tag` in the layout's index.json.
  json descriptor(const std::string& tag) const {
    const json top = index();  // named: a temporary's member would not live through the loop
    for (const json& m : top["manifests"]) {
      if (m["annotations"]["org.opencontainers.image.ref.name"] == tag) return m;
    }
    FAIL("no tag " << tag << " in " << layout);
    return {};
  }
  json blob(const std::string& digest) const {
    return json::parse(read_text(layout / "blobs/sha256" / digest.substr(7)));
  }

  // Adds tag `tag`: an image index with one entry per (tag of this layout, architecture).
  void add_index(const std::string& tag,
                 const std::vector<std::pair<std::string, std::string>>& entries) {
    json manifests = json::array();
    for (const auto& [image_tag, arch] : entries) {
      json d = descriptor(image_tag);
      d.erase("annotations");
      d["platform"] = {{"os", "linux"}, {"architecture", arch}};
      manifests.push_back(d);
    }
    std::string text = json{
        {"schemaVersion", 2},
        {"mediaType", "application/vnd.oci.image.index.v1+json"},
        {"manifests",
         manifests}}.dump();
    TempDir scratch;
    write_text(scratch / "index", text);
    ProcessResult r = require_run({"/usr/bin/sha256sum", (scratch / "index").string()});
    std::string digest = "sha256:" + r.out.substr(0, 64);
    write_text(layout / "blobs/sha256" / digest.substr(7), text);
    json top = index();
    top["manifests"].push_back({{"mediaType", "application/vnd.oci.image.index.v1+json"},
                                {"digest", digest},
                                {"size", text.size()},
                                {"annotations", {{"org.opencontainers.image.ref.name", tag}}}});
    write_text(layout / "index.json", top.dump());
  }

  // skopeo copy oci:LAYOUT:TAG docker://DEST, plain HTTP.
  void push(const std::string& tag, const std::string& dest,
            const std::vector<std::string>& options = {}) const {
    msb::test::skopeo_push(layout, tag, dest, options);
  }
};

// msb with a private $MSB_HOME.
struct Msb {
  TempDir home;
  ProcessResult operator()(std::vector<std::string> args,
                           std::map<std::string, std::string> env = {}) {
    args.insert(args.begin(), MSB_BINARY);
    env["MSB_HOME"] = home.path().string();
    return run_process(args, env);
  }
  json pull(const std::string& reference, std::map<std::string, std::string> env = {}) {
    ProcessResult r = (*this)({"pull", "--json", reference}, std::move(env));
    INFO("msb pull " << reference << ": exit " << r.exit_code << ", stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return json::parse(r.out);
  }
  // A failed pull: exit 1 and one line on stderr, which is returned.
  std::string pull_fails(const std::string& reference,
                         std::map<std::string, std::string> env = {}) {
    ProcessResult r = (*this)({"pull", reference}, std::move(env));
    INFO("msb pull " << reference << ": exit " << r.exit_code << ", stdout: " << r.out
                     << ", stderr: " << r.err);
    REQUIRE(r.exit_code == 1);
    REQUIRE(r.out.empty());
    REQUIRE(r.err.starts_with("msb: error: "));
    REQUIRE(r.err.find('\n') == r.err.size() - 1);
    return r.err;
  }
  json images() {
    ProcessResult r = (*this)({"image", "ls", "--json"});
    INFO("msb image ls --json: exit " << r.exit_code << ", stderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    return json::parse(r.out);
  }
  std::optional<json> image(const std::string& tag) {
    for (const json& i : images()) {
      if (i.value("tag", "") == tag) return i;
    }
    return std::nullopt;
  }
  // Nothing may be left of a pull's downloads, whatever happened.
  void require_no_downloads() {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(home / "tmp", ec)) {
      FAIL("left behind: " << entry.path());
    }
  }
};

bool has(const json& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

void require_test_config(const json& image) {
  INFO(image.dump(2));
  REQUIRE(!image.value("id", "").empty());
  REQUIRE(has(image["config"]["env"], "A=B"));
  REQUIRE(image["config"]["workdir"] == "/w");
  REQUIRE(image["config"]["cmd"] == json::array({"/bin/hello"}));
}

// A non-loopback IPv4 address of this machine, if it has one.
std::optional<std::string> non_loopback_address() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::nullopt;
  std::optional<std::string> found;
  for (ifaddrs* a = list; a && !found; a = a->ifa_next) {
    if (!a->ifa_addr || a->ifa_addr->sa_family != AF_INET || (a->ifa_flags & IFF_LOOPBACK) ||
        !(a->ifa_flags & IFF_UP))
      continue;
    char text[INET_ADDRSTRLEN];
    ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, text, sizeof text);
    found = text;
  }
  ::freeifaddrs(list);
  return found;
}

// The first of /usr/sbin/ip, /sbin/ip, /bin/ip that exists (Debian's iproute2), or "".
std::string ip_tool() {
  for (const char* path : {"/usr/sbin/ip", "/sbin/ip", "/bin/ip", "/usr/bin/ip"}) {
    if (::access(path, X_OK) == 0) return path;
  }
  return "";
}

// A non-loopback IPv4 address that msb can reach a registry at. As root, this test process moves
// into a network namespace of its own (put back when this ends), with lo up and 10.203.0.1 on a
// dummy interface (on lo where the kernel has no dummy driver): what msb does with an address
// that is not loopback does not depend on the host's network then. Otherwise the host's own
// non-loopback address, if it has one. Without either the test is skipped (exit 77), saying why:
// it must not pass without checking anything.
class NonLoopbackAddress {
 public:
  explicit NonLoopbackAddress(const std::string& who) {
    std::string why_not;
    if (::geteuid() != 0) {
      why_not = "not running as root";
    } else if (std::string ip = ip_tool(); ip.empty()) {
      why_not = "no ip command (Debian package iproute2)";
    } else {
      enter_namespace(ip, why_not);
    }
    if (!address_.empty()) return;
    if (std::optional<std::string> host = non_loopback_address()) {
      std::printf("note: no network namespace (%s): using this host's address %s\n",
                  why_not.c_str(), host->c_str());
      address_ = *host;
      return;
    }
    std::printf(
        "SKIPPED: %s needs root (for a network namespace with a non-loopback address) or a "
        "non-loopback IPv4 address on this host, and has neither (%s)\n",
        who.c_str(), why_not.c_str());
    std::exit(77);
  }
  ~NonLoopbackAddress() {
    if (original_ >= 0) {
      ::setns(original_, CLONE_NEWNET);
      ::close(original_);
    }
  }
  NonLoopbackAddress(const NonLoopbackAddress&) = delete;
  NonLoopbackAddress& operator=(const NonLoopbackAddress&) = delete;
  const std::string& address() const { return address_; }

 private:
  void enter_namespace(const std::string& ip, std::string& why_not) {
    original_ = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (original_ < 0 || ::unshare(CLONE_NEWNET) != 0) {
      why_not = std::string("unshare(CLONE_NEWNET): ") + std::strerror(errno);
      if (original_ >= 0) ::close(original_);
      original_ = -1;
      return;
    }
    auto ip_ok = [&](std::vector<std::string> args) {
      args.insert(args.begin(), ip);
      return run_process(args).exit_code == 0;
    };
    const std::string address = "10.203.0.1";
    bool ok = ip_ok({"link", "set", "lo", "up"});
    if (ok && ip_ok({"link", "add", "msbtest0", "type", "dummy"})) {
      ok = ip_ok({"addr", "add", address + "/24", "dev", "msbtest0"}) &&
           ip_ok({"link", "set", "msbtest0", "up"});
    } else if (ok) {
      ok = ip_ok({"addr", "add", address + "/24", "dev", "lo"});
    }
    if (!ok) {
      why_not = "ip could not set up the network namespace";
      ::setns(original_, CLONE_NEWNET);
      ::close(original_);
      original_ = -1;
      return;
    }
    address_ = address;
  }

  std::string address_;
  int original_ = -1;  // this process's network namespace before, while in a new one
};

}  // namespace

TEST_CASE("msb pull imports an image from a loopback registry, by tag and by digest", "[pull]") {
  skip_without_tools();
  Registry registry;
  TestImage image;
  image.push("1", registry.address() + "/test/busybox:1");
  Msb msb;

  const std::string tag = registry.address() + "/test/busybox:1";
  json pulled = msb.pull(tag);
  CHECK(pulled["tag"] == tag);
  require_test_config(pulled);
  std::optional<json> listed = msb.image(tag);
  REQUIRE(listed);
  CHECK((*listed)["id"] == pulled["id"]);
  require_test_config(*listed);
  msb.require_no_downloads();

  // Without --json: the tag and the image id, one line.
  ProcessResult again = msb({"pull", tag});
  REQUIRE(again.exit_code == 0);
  CHECK(again.out.find(tag) != std::string::npos);
  CHECK(again.out.find(pulled["id"].get<std::string>().substr(0, 12)) != std::string::npos);
  // -q: nothing but errors, the image pulled all the same.
  Msb quiet;
  ProcessResult silent = quiet({"-q", "pull", tag});
  INFO(silent.err);
  REQUIRE(silent.exit_code == 0);
  CHECK(silent.out.empty());
  CHECK(silent.err.empty());
  REQUIRE(quiet.image(tag));
  CHECK((*quiet.image(tag))["id"] == pulled["id"]);

  // By digest: checked against the manifest, tagged NAME:sha256-<12 hex digits>.
  std::string digest = image.descriptor("1")["digest"];
  json by_digest = msb.pull(registry.address() + "/test/busybox@" + digest);
  CHECK(by_digest["tag"] == registry.address() + "/test/busybox:sha256-" + digest.substr(7, 12));
  CHECK(by_digest["id"] == pulled["id"]);
  // Where each came from: the reference and the manifest it got (not the download folder).
  CHECK(pulled["source"] == tag + "@" + digest);
  CHECK(by_digest["source"] == registry.address() + "/test/busybox@" + digest);
}

TEST_CASE("msb pull reads Docker v2 manifests and picks linux/amd64 from an index", "[pull]") {
  skip_without_tools();
  Registry registry;
  TestImage image;
  Msb msb;

  // The same image as a Docker schema 2 manifest (skopeo converts the media types).
  image.push("1", registry.address() + "/test/docker:1", {"--format", "v2s2"});
  json docker = msb.pull(registry.address() + "/test/docker:1");
  require_test_config(docker);

  // An index whose arm64 image says so in its environment; msb must take the amd64 one.
  require_run({kUmoci, "config", "--image", image.layout.string() + ":1", "--tag", "arm",
               "--architecture", "arm64", "--config.env", "ARCH=arm64"});
  image.add_index("multi", {{"arm", "arm64"}, {"1", "amd64"}});
  image.push("multi", registry.address() + "/test/multi:1", {"--multi-arch", "all"});
  json multi = msb.pull(registry.address() + "/test/multi:1");
  require_test_config(multi);
  CHECK(!has(multi["config"]["env"], "ARCH=arm64"));

  image.add_index("armonly", {{"arm", "arm64"}});
  image.push("armonly", registry.address() + "/test/armonly:1", {"--multi-arch", "all"});
  std::string err = msb.pull_fails(registry.address() + "/test/armonly:1");
  CHECK(err.find("no linux/amd64") != std::string::npos);
  CHECK(err.find("linux/arm64") != std::string::npos);
  CHECK(!msb.image(registry.address() + "/test/armonly:1"));
  msb.require_no_downloads();
}

TEST_CASE("msb pull gets a token from the registry's token service, as from Docker Hub", "[pull]") {
  skip_without_tools();
  Registry registry;
  TestImage image;
  image.push("1", registry.address() + "/test/busybox:1");
  Msb msb;

  SECTION("anonymous, with blobs redirected to storage") {
    TokenProxy proxy(registry, {"--redirect-blobs"});
    const std::string tag = proxy.address() + "/test/busybox:1";
    require_test_config(msb.pull(tag));
    REQUIRE(msb.image(tag));
    std::string log = proxy.requests();
    INFO(log);
    CHECK(log.find("GET /v2/test/busybox/manifests/1 -") != std::string::npos);
    CHECK(log.find("GET /token?service=msb-test&scope=repository%3Atest%2Fbusybox%3Apull") !=
          std::string::npos);
    CHECK(log.find("GET /v2/test/busybox/manifests/1 auth") != std::string::npos);
    CHECK(log.find("GET /storage/test/busybox/blobs/sha256:") != std::string::npos);
  }
  SECTION("with MSB_REGISTRY_AUTH, the token as access_token") {
    TokenProxy proxy(registry, {"--basic", "user:secret", "--access-token-only"});
    const std::string tag = proxy.address() + "/test/busybox:1";
    std::string err = msb.pull_fails(tag);
    CHECK(err.find("HTTP 401") != std::string::npos);
    CHECK(err.find("MSB_REGISTRY_AUTH") != std::string::npos);
    err = msb.pull_fails(tag, {{"MSB_REGISTRY_AUTH", "user:wrong"}});
    CHECK(err.find("token service") != std::string::npos);
    CHECK(!msb.image(tag));
    require_test_config(msb.pull(tag, {{"MSB_REGISTRY_AUTH", "user:secret"}}));
  }
  msb.require_no_downloads();
}

TEST_CASE("msb pull fails with the reference and the reason, and stores nothing", "[pull]") {
  skip_without_tools();
  Registry registry;
  TestImage image;
  image.push("1", registry.address() + "/test/busybox:1");
  Msb msb;

  SECTION("an unknown tag") {
    std::string ref = registry.address() + "/test/busybox:nope";
    std::string err = msb.pull_fails(ref);
    CHECK(err.find(ref) != std::string::npos);
    CHECK(err.find("HTTP 404") != std::string::npos);
    err = msb.pull_fails(registry.address() + "/test/nothing:1");
    CHECK(err.find("HTTP 404") != std::string::npos);
  }
  SECTION("an unreachable registry") {
    std::string address = "127.0.0.1:" + std::to_string(free_port("127.0.0.1"));
    std::string err = msb.pull_fails(address + "/test/busybox:1");
    CHECK(err.find("cannot reach " + address) != std::string::npos);
  }
  SECTION("a corrupt layer in the registry's storage") {
    json manifest = image.blob(image.descriptor("1")["digest"]);
    std::string layer = manifest["layers"][0]["digest"];
    fs::path file = registry.blob_file(layer);
    std::string bytes = read_text(file);
    bytes[bytes.size() / 2] ^= 0x55;
    write_text(file, bytes);
    std::string err = msb.pull_fails(registry.address() + "/test/busybox:1");
    CHECK(err.find("blob " + layer + " is corrupt") != std::string::npos);
  }
  SECTION("a corrupt blob from the network") {
    json manifest = image.blob(image.descriptor("1")["digest"]);
    std::string config = manifest["config"]["digest"];
    TokenProxy proxy(registry, {"--corrupt-blob", config});
    std::string err = msb.pull_fails(proxy.address() + "/test/busybox:1");
    CHECK(err.find("blob " + config + " is corrupt") != std::string::npos);
  }
  SECTION("a digest that does not match the manifest") {
    std::string other = "sha256:" + std::string(64, '0');
    std::string err = msb.pull_fails(registry.address() + "/test/busybox@" + other);
    CHECK(err.find(other) != std::string::npos);
  }
  SECTION("a malformed reference") {
    std::string err = msb.pull_fails("Upper/Case:1");
    CHECK(err.find("invalid image reference \"Upper/Case:1\"") != std::string::npos);
  }
  CHECK(msb.images().empty());
  msb.require_no_downloads();
}

// Both need a non-loopback address: a network namespace of their own as root, else the host's
// (without either they skip, which the label allows).
TEST_CASE("msb pull uses plain HTTP only for loopback and MSB_INSECURE_REGISTRIES",
          "[pull][needs-root]") {
  skip_without_tools();
  NonLoopbackAddress network("the plain-HTTP rule's test");
  const std::string host = network.address();
  Registry registry;
  TestImage image;
  image.push("1", registry.address() + "/test/busybox:1");
  TokenProxy proxy(registry, {}, host);  // the registry at a non-loopback address
  Msb msb;
  const std::string tag = proxy.address() + "/test/busybox:1";

  // Refused: msb speaks HTTPS to it, which a plain-HTTP registry cannot answer; the error says
  // what to do. Nothing reached the registry over plain HTTP.
  std::string err = msb.pull_fails(tag);
  CHECK(err.find("https://" + proxy.address()) != std::string::npos);
  CHECK(err.find("MSB_INSECURE_REGISTRIES") != std::string::npos);
  err = msb.pull_fails(tag, {{"MSB_INSECURE_REGISTRIES", host + ":1"}});
  CHECK(err.find("https://") != std::string::npos);
  CHECK(proxy.requests().empty());
  CHECK(!msb.image(tag));

  // Allowed where MSB_INSECURE_REGISTRIES lists it, by HOST:PORT or by HOST (every port).
  require_test_config(
      msb.pull(tag, {{"MSB_INSECURE_REGISTRIES", "other.example," + proxy.address()}}));
  REQUIRE(msb.image(tag));
  CHECK(proxy.requests().find("GET /v2/test/busybox/manifests/1") != std::string::npos);
  Msb by_host;
  require_test_config(by_host.pull(tag, {{"MSB_INSECURE_REGISTRIES", host}}));
  msb.require_no_downloads();
}

TEST_CASE("msb pull goes through http_proxy and https_proxy but not for what NO_PROXY names",
          "[pull][needs-root]") {
  skip_without_tools();
  // Loopback never goes through a proxy (msb adds it to NO_PROXY): the registry is reached at
  // a non-loopback address.
  NonLoopbackAddress network("the proxy test");
  const std::string host = network.address();
  Registry registry;
  TestImage image;
  image.push("1", registry.address() + "/test/busybox:1");
  TokenProxy front(registry, {}, host);
  ForwardProxy proxy;
  const std::string tag = front.address() + "/test/busybox:1";
  const std::map<std::string, std::string> insecure = {
      {"MSB_INSECURE_REGISTRIES", front.address()}};
  auto with = [&](std::map<std::string, std::string> env) {
    env.insert(insecure.begin(), insecure.end());
    return env;
  };

  SECTION("plain HTTP through http_proxy") {
    Msb msb;
    require_test_config(msb.pull(tag, with({{"http_proxy", proxy.url()}})));
    std::string log = proxy.requests();
    INFO(log);
    // Every request went to the proxy, in absolute form: the manifest, the token, the blobs.
    CHECK(log.find("GET http://" + front.address() + "/v2/test/busybox/manifests/1 -") !=
          std::string::npos);
    CHECK(log.find("GET http://" + front.address() + "/token?") != std::string::npos);
    CHECK(log.find("GET http://" + front.address() + "/v2/test/busybox/blobs/sha256:") !=
          std::string::npos);
    CHECK(log.find("GET /") == std::string::npos);
    CHECK(front.requests().find("GET /v2/test/busybox/manifests/1 auth") != std::string::npos);
  }
  SECTION("NO_PROXY sends the registry's requests past the proxy") {
    Msb msb;
    require_test_config(msb.pull(tag, with({{"http_proxy", proxy.url()}, {"NO_PROXY", host}})));
    CHECK(proxy.requests().empty());
    CHECK(front.requests().find("GET /v2/test/busybox/manifests/1") != std::string::npos);
    // A proxy that is not there: the pull fails unless NO_PROXY names the registry.
    const std::string dead = "http://127.0.0.1:" + std::to_string(free_port("127.0.0.1"));
    Msb other;
    std::string err = other.pull_fails(tag, with({{"http_proxy", dead}}));
    CHECK(err.find("cannot reach") != std::string::npos);
    CHECK(!other.image(tag));
    require_test_config(other.pull(tag, with({{"http_proxy", dead}, {"NO_PROXY", host}})));
  }
  SECTION("HTTPS through https_proxy, as a CONNECT tunnel") {
    // Without MSB_INSECURE_REGISTRIES msb speaks HTTPS, and asks the proxy for a tunnel (which
    // this proxy refuses: there is no TLS server to tunnel to).
    Msb msb;
    std::string err = msb.pull_fails(tag, {{"https_proxy", proxy.url()}});
    CHECK(err.find(front.address()) != std::string::npos);
    CHECK(proxy.requests().find("CONNECT " + front.address() + " -") != std::string::npos);
    // https_proxy is for HTTPS only; NO_PROXY takes the registry past it.
    const std::string before = proxy.requests();
    require_test_config(msb.pull(tag, with({{"https_proxy", proxy.url()}})));
    msb.pull_fails(tag + "-none", {{"https_proxy", proxy.url()}, {"NO_PROXY", host}});
    CHECK(proxy.requests() == before);
  }
}

TEST_CASE("References name the registry, repository, tag and digest as Docker reads them",
          "[pull]") {
  using msb::core::parse_registry_reference;
  ::unsetenv("MSB_INSECURE_REGISTRIES");
  const std::string digest = "sha256:" + std::string(64, 'a');

  auto hub = parse_registry_reference("busybox");
  CHECK(hub.registry == "docker.io");
  CHECK(hub.endpoint == "registry-1.docker.io");
  CHECK(hub.repository == "library/busybox");
  CHECK(hub.tag == "latest");
  CHECK(hub.digest.empty());
  CHECK(!hub.plain_http);
  CHECK(parse_registry_reference("docker.io/busybox:1.36").repository == "library/busybox");
  CHECK(parse_registry_reference("docker.io/busybox:1.36").tag == "1.36");
  auto user = parse_registry_reference("someone/tool:v2");
  CHECK(user.endpoint == "registry-1.docker.io");
  CHECK(user.repository == "someone/tool");

  auto full = parse_registry_reference("ghcr.io/org/group/app:v1@" + digest);
  CHECK(full.registry == "ghcr.io");
  CHECK(full.endpoint == "ghcr.io");
  CHECK(full.repository == "org/group/app");
  CHECK(full.tag == "v1");
  CHECK(full.digest == digest);
  CHECK(!full.plain_http);
  auto by_digest = parse_registry_reference("quay.io/x/y@" + digest);
  CHECK(by_digest.tag.empty());
  CHECK(by_digest.digest == digest);

  // Plain HTTP: loopback written as such, and what MSB_INSECURE_REGISTRIES lists.
  for (const char* ref :
       {"localhost/x", "localhost:5000/x:1", "127.0.0.1:5000/x", "127.1.2.3/x", "[::1]:5000/x"}) {
    INFO(ref);
    CHECK(parse_registry_reference(ref).plain_http);
  }
  for (const char* ref : {"10.0.0.1:5000/x", "127.0.0.1.nip.io/x", "example.com/x"}) {
    INFO(ref);
    CHECK(!parse_registry_reference(ref).plain_http);
  }
  ::setenv("MSB_INSECURE_REGISTRIES", "example.com, 10.0.0.1:5000", 1);
  CHECK(parse_registry_reference("10.0.0.1:5000/x").plain_http);
  CHECK(!parse_registry_reference("10.0.0.1:5001/x").plain_http);
  CHECK(parse_registry_reference("example.com:8080/x").plain_http);
  ::unsetenv("MSB_INSECURE_REGISTRIES");

  for (const std::string bad : {"", "Busybox", "a//b", "x:", "x@sha256:abc", "x:bad/tag",
                                "host:port/x", "x/", "/x", "x:-1"}) {
    INFO("\"" << bad << "\"");
    CHECK_THROWS_AS(parse_registry_reference(bad), msb::core::ImageError);
  }
}
