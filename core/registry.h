// msb pull: images from an OCI registry (Docker Registry HTTP API v2) over HTTPS, or plain HTTP
// for loopback, with anonymous token auth as Docker Hub uses it.
#pragma once

#include <string>

#include "core/home.h"
#include "core/images.h"
#include "snapstore/store.h"

namespace msb::core {

// Pulls REF ([REGISTRY/]NAME[:TAG|@DIGEST]; Docker Hub when no registry is named) for
// linux/amd64 and imports it with import_image() under its tag.
ImageInfo pull_image(const Home& home, snapstore::Store& store, const std::string& reference,
                     const snapstore::ProgressFn& progress = {});

}  // namespace msb::core
