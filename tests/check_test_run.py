#!/usr/bin/env python3
"""Checks that a ctest run means what it says: every registered test ran, and a test skipped only
because this host lacks something the test is labelled as needing.

    cd BUILD_DIR && ctest --output-junit results.xml [ARGS...]
    python3 tests/check_test_run.py results.xml [ARGS...]     (in BUILD_DIR, with the same ARGS)

A test may skip (exit with its SKIP_RETURN_CODE, 77) only where it carries a CTest label
"needs-CAPABILITY" (tests/CMakeLists.txt) for a capability in CAPABILITIES below that this host
lacks. Any other skip fails the run: a missing kernel, QEMU or registry is a broken setup, not a
reason to go green. So does a registered test that did not run at all (ctest stopped early, a test
binary could not list its tests) and a test that reported nothing.

CAPABILITIES is the one place that says what a host may lack.
"""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET


def kvm_usable():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def hardware_virtualization():
    # VMX or SVM (not only a /dev/kvm, which a nested PVM host offers without either): guest
    # kernel code runs natively and KVM takes a CPUID table.
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
        return kvm_usable() and ("vmx" in flags or "svm" in flags)
    except OSError:
        return False


# label suffix -> (what the host must have, check)
CAPABILITIES = {
    "kvm": ("/dev/kvm that opens read-write", kvm_usable),
    "hw-virt": ("KVM with VMX or SVM (not nested PVM)", hardware_virtualization),
    "root": ("root (network namespaces, files owned by other users)", lambda: os.geteuid() == 0),
}


def registered_tests(ctest_args):
    # The tests this selection holds, with their labels, as ctest itself lists them.
    out = subprocess.run(["ctest", "--show-only=json-v1", *ctest_args], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    tests = {}
    for test in json.loads(out)["tests"]:
        labels = []
        for prop in test.get("properties", []):
            if prop["name"] == "LABELS":
                labels = prop["value"]
        tests[test["name"]] = labels
    return tests


def main():
    if len(sys.argv) < 2:
        print("usage: check_test_run.py JUNIT_XML [CTEST_ARGS...]", file=sys.stderr)
        return 2
    junit, ctest_args = sys.argv[1], sys.argv[2:]
    # ctest's own options that only change how tests run, not which.
    ctest_args = [a for a in ctest_args if a not in ("--output-on-failure",) and
                  not a.startswith("-j")]
    missing = {name for name, (_, present) in CAPABILITIES.items() if not present()}
    for name in sorted(missing):
        print(f"check: this host lacks {CAPABILITIES[name][0]}: tests labelled needs-{name} may skip")

    registered = registered_tests(ctest_args)
    try:
        cases = ET.parse(junit).getroot().iter("testcase")
    except (OSError, ET.ParseError) as e:
        print(f"check: cannot read ctest's results {junit}: {e}")
        return 1
    problems = []
    seen = set()
    counts = {"run": 0, "skipped": 0, "failed": 0}
    for case in cases:
        name = case.get("name")
        seen.add(name)
        status = case.get("status")
        if status == "run":
            counts["run"] += 1
            continue
        if status == "fail":
            counts["failed"] += 1  # ctest has reported it already
            continue
        skipped = case.find("skipped")
        output = (case.findtext("system-out") or "").strip().splitlines()
        reason = next((line for line in output if "SKIPPED" in line), "no reason printed")
        if skipped is None or "SKIP_RETURN_CODE" not in (skipped.get("message") or ""):
            problems.append(f"did not run ({status}): {name}: {reason}")
            continue
        allowed = [label for label in registered.get(name, [])
                   if label.startswith("needs-") and label[len("needs-"):] in missing]
        if allowed:
            counts["skipped"] += 1
        else:
            needs = [l for l in registered.get(name, []) if l.startswith("needs-")] or ["nothing"]
            problems.append(f"unexpected skip: {name} (needs {', '.join(needs)}, which this host "
                            f"has): {reason}")
    for name in sorted(set(registered) - seen):
        problems.append(f"registered but not run: {name}")

    for problem in problems:
        print(f"check: {problem}")
    print(f"check: {len(registered)} tests registered: {counts['run']} passed, "
          f"{counts['failed']} failed, {counts['skipped']} skipped as allowed"
          if not problems else f"check: {len(problems)} problems in a run of {len(registered)} tests")
    return 1 if problems or counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
