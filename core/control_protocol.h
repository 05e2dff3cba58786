// msb's control protocol: how an msb command talks to a sandbox's VMM process over
// $MSB_HOME/sandboxes/NAME/control.sock. It uses the agent protocol's framing (core/frames.h) with
// two frame types of its own; docs/sandboxes.md describes the conversation.
//
//   client: kRequest (JSON: {"op": "exec"|"status"|"wait_ready"|"stop", ...})
//   exec:   client kStdin...(empty = end of input); server kStdout/kStderr..., then kExit
//           (flag kExitTimedOut when --timeout ended it)
//   others: server kResponse (JSON); stop keeps the connection open until the VMM exits
//   any:    server kResponse {"error": "..."} and closes, when the request cannot be served
#pragma once

#include <cstdint>

namespace msb::core::control {

inline constexpr uint16_t kRequest = 100;     // client -> server: a JSON request
inline constexpr uint16_t kResponse = 101;    // server -> client: a JSON response
inline constexpr uint16_t kExitTimedOut = 1;  // kExit flag: the exec's timeout killed it

}  // namespace msb::core::control
