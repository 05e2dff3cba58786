// The agent protocol: how the host (msb's VMM process) and the agent inside a guest (the Linux
// agent, or the test guest) talk over the guest's virtio-console port.
//
// This header is shared by host code and freestanding guest code, so it uses nothing beyond
// <stdint.h>. Everything is little-endian. The byte stream is a sequence of frames:
//
//   FrameHeader (12 bytes) then `length` payload bytes (length <= kMaxPayload).
//
// A frame's `id` names the exec it belongs to (chosen by the host, never 0); frames that belong
// to no exec carry id 0. Strings in payloads are NUL-terminated, UTF-8.
//
// Conversation:
//   guest: kReady                      once the agent is up (after every boot)
//   host:  kSetEnv                     the sandbox's environment (replaces the previous one)
//   host:  kExec (id N)                run a command; then any number of kStdin (id N), an empty
//                                      kStdin meaning end of input, and kSignal (id N)
//   guest: kStdout/kStderr (id N)      output as it comes
//   guest: kExit (id N)                the command ended; nothing more for id N follows
//   host:  kPowerOff                   the guest powers off (the VMM sees it stop)
//
// After a restore from a snapshot the guest is already running and sends no kReady of its own.
// The host's first frame is then kRestore: fresh entropy, the wall clock, the sandbox's new
// name and the resources it was granted. The guest applies them (reseeds its random pool, sets
// its clock and hostname, onlines or offlines vCPUs, sizes its memory) and answers kReady, after
// which the host sends kSetEnv with the restored sandbox's environment, as after a boot.
//
// The guest says in kReady how many execs it runs at once; the host queues the rest. A frame
// the receiver does not know is skipped by its length. A guest that cannot start a command
// answers kStderr with the reason and kExit with code 127 (not found) or 126 (cannot run).
#pragma once

#include <stdint.h>

namespace msb::agent {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kMaxPayload = 64 * 1024;

struct FrameHeader {
  uint32_t length;  // payload bytes that follow
  uint16_t type;    // a FrameType
  uint16_t flags;   // 0; reserved
  uint32_t id;      // the exec this frame belongs to, or 0
};
static_assert(sizeof(FrameHeader) == 12);

enum FrameType : uint16_t {
  // guest -> host
  kReady = 1,   // payload: ReadyPayload, then the agent's name (string)
  kStdout = 2,  // payload: output bytes (never empty)
  kStderr = 3,  // payload: output bytes (never empty)
  kExit = 4,    // payload: ExitPayload

  // host -> guest
  kExec = 16,      // payload: ExecPayload, then argc strings, envc "K=V" strings, the working
                   // directory (a string, empty for the default) and, with kExecFlagUser, the
                   // user to run as (a string: NAME, UID, NAME:GROUP or UID:GID)
  kStdin = 17,     // payload: input bytes; empty = end of input
  kSignal = 18,    // payload: int32_t signal number (9 = kill) for the exec's process
  kSetEnv = 19,    // payload: uint32_t count, then count "K=V" strings
  kPowerOff = 20,  // no payload
  kRestore = 21,   // payload: RestorePayload, then the sandbox's new name (string)
};

struct ReadyPayload {
  uint32_t version;         // kProtocolVersion
  uint32_t max_concurrent;  // execs the agent runs at once (>= 1)
};

struct ExecPayload {
  uint32_t argc;        // >= 1
  uint32_t envc;        // extra environment for this exec, over the sandbox's
  uint32_t timeout_ms;  // 0: none; the agent kills the command when it expires
  uint32_t flags;       // ExecFlags; unknown bits are refused
};

enum ExecFlags : uint32_t {
  kExecFlagUser = 1u << 0,  // a user string follows the working directory
};

inline constexpr uint32_t kRestoreEntropyBytes = 32;

struct RestorePayload {
  uint64_t wall_clock_ns;                 // the host's CLOCK_REALTIME, ns since the Unix epoch
  uint64_t memory_mib;                    // memory granted (within the machine's ceiling)
  uint32_t cpus;                          // vCPUs to have online, 1 to the machine's vCPU count
  uint32_t reserved;                      // 0
  uint8_t entropy[kRestoreEntropyBytes];  // fresh random bytes from the host
};
static_assert(sizeof(RestorePayload) == 56);

struct ExitPayload {
  int32_t code;    // exit code, or -1 when killed by a signal
  int32_t signal;  // the signal that ended it, 0 if it exited
};

}  // namespace msb::agent
