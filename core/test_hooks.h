// Test hooks: named points in msb's code where a test can stop the process, so that it can kill
// it in exactly that state (tests/snapshot_test.cpp kills `msb snapshot create` and the VMM at
// each step of a snapshot). They exist only for tests, and do nothing unless the environment
// variable MSB_TEST_HOOKS names a folder (the VMM process inherits it from the msb create or msb
// start that spawned it).
//
// With MSB_TEST_HOOKS=FOLDER, test_hook("POINT") fires when the file FOLDER/POINT.arm exists:
// the process claims it (removes it, so a point fires once per arming, in one process), writes
// its pid and a newline to FOLDER/POINT (atomically: the file appears complete), and stops
// itself with SIGSTOP. The test waits for FOLDER/POINT, checks that the pid is the process it
// expects, and kills it (or lets it go on with SIGCONT). Without MSB_TEST_HOOKS a call costs a
// test of a cached pointer; with it, one unlink(2).
#pragma once

#include <string_view>

namespace msb::core {

void test_hook(std::string_view point);

}  // namespace msb::core
