// The one exception type of the store. Messages carry their context (which store, chunk, file or
// name) so that the CLI can print them as they are.
#pragma once

#include <stdexcept>
#include <string>

namespace msb::snapstore {

class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "WHAT: strerror(errno)", thrown as StoreError.
[[noreturn]] void throw_errno(const std::string& what);
[[noreturn]] void throw_errno(const std::string& what, int error_number);

}  // namespace msb::snapstore
