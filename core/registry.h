// msb pull: images from an OCI registry (Docker Registry HTTP API v2) over HTTPS, or plain HTTP
// for loopback, with anonymous token auth as Docker Hub uses it.
//
// Environment:
//   MSB_INSECURE_REGISTRIES  HOST[:PORT],... that may be reached over plain HTTP (loopback
//                            registries always may: localhost, 127.0.0.0/8, ::1)
//   MSB_REGISTRY_AUTH        USER:PASSWORD, sent as basic credentials to the token service (or to
//                            a registry that asks for basic auth); anonymous when unset
#pragma once

#include <string>

#include "core/home.h"
#include "core/images.h"
#include "snapstore/store.h"

namespace msb::core {

// A reference split the way Docker splits it.
struct RegistryReference {
  std::string registry;     // "host[:port]" as written; "docker.io" when none was named
  std::string endpoint;     // where the API is: "registry-1.docker.io" for Docker Hub
  std::string repository;   // "library/busybox", "test/busybox"
  std::string tag;          // "latest" when neither a tag nor a digest was given
  std::string digest;       // "sha256:<hex>" or ""
  bool plain_http = false;  // loopback or listed in MSB_INSECURE_REGISTRIES
};

// Parses [REGISTRY/]NAME[:TAG][@sha256:DIGEST]; throws ImageError for a malformed reference.
RegistryReference parse_registry_reference(const std::string& reference);

// Pulls REF ([REGISTRY/]NAME[:TAG|@DIGEST]; Docker Hub when no registry is named) for
// linux/amd64 and imports it with import_image() under its tag.
ImageInfo pull_image(const Home& home, snapstore::Store& store, const std::string& reference,
                     const snapstore::ProgressFn& progress = {});

}  // namespace msb::core
