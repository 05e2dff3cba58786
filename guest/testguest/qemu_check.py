#!/usr/bin/env python3
"""Boots msb's test guest under QEMU (microvm, TCG) and checks every command over the agent
protocol (guest/protocol/agent_protocol.h) against pattern.h's formulas, and its balloon driver
against QEMU's virtio-balloon (set and read over QMP). A development tool:

    guest/testguest/qemu_check.py build/cli/testguest [--cpus 2] [--max-cpus N] [--acpi on|off] [--keep]

--max-cpus gives QEMU more vCPUs (-smp) than the guest starts at boot (msb.cpus=--cpus); with
--acpi on the guest finds them in the MADT and a kRestore can bring them online.

Exit status 0 when every check passed.
"""
import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

K_READY, K_STDOUT, K_STDERR, K_EXIT = 1, 2, 3, 4
K_EXEC, K_STDIN, K_SIGNAL, K_SETENV, K_POWEROFF, K_RESTORE = 16, 17, 18, 19, 20, 21
MASK = (1 << 64) - 1


def pattern_word(seed, index):
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def pattern_checksum(seed, words):
    checksum = 0xCBF29CE484222325
    for i in range(words):
        checksum = ((checksum ^ pattern_word(seed, i)) * 0x100000001B3) & MASK
    return checksum


def checksum_bytes(data):
    checksum = 0xCBF29CE484222325
    for (word,) in struct.iter_unpack("<Q", data):
        checksum = ((checksum ^ word) * 0x100000001B3) & MASK
    return checksum


def restore_payload(cpus, memory_mib, name, entropy=None, wall_clock_ns=None):
    """kRestore's payload: RestorePayload (56 bytes), then the name."""
    if wall_clock_ns is None:
        wall_clock_ns = time.time_ns()
    if entropy is None:
        entropy = os.urandom(32)
    return struct.pack("<QQII", wall_clock_ns, memory_mib, cpus, 0) + entropy + name.encode() + b"\0"


def pattern_bytes(seed, words):
    return b"".join(struct.pack("<Q", pattern_word(seed, i)) for i in range(words))


def connect_when_listening(new_socket, address, wait_s=10):
    """A socket from new_socket() connected to address, retried while QEMU starts listening."""
    deadline = time.time() + wait_s
    while True:
        sock = new_socket()
        try:
            sock.connect(address)
            return sock
        except OSError:
            sock.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)


class Agent:
    def __init__(self, port, timeout=60):
        # QEMU's virtconsole drops what its socket cannot take at once (EAGAIN), so a TCP
        # socket with big buffers it is: a Unix socket's ~200 KiB fill up.
        def tcp_socket():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            return sock
        self.sock = connect_when_listening(tcp_socket, ("127.0.0.1", port))
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.next_id = 1

    def send(self, frame_type, frame_id, payload=b""):
        self.sock.sendall(struct.pack("<IHHI", len(payload), frame_type, 0, frame_id) + payload)

    def recv(self):
        while True:
            if len(self.buffer) >= 12:
                length, frame_type, _, frame_id = struct.unpack("<IHHI", self.buffer[:12])
                if len(self.buffer) >= 12 + length:
                    payload = self.buffer[12 : 12 + length]
                    self.buffer = self.buffer[12 + length :]
                    return frame_type, frame_id, payload
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("agent socket closed")
            self.buffer += data

    def start(self, argv, env=(), timeout_ms=0):
        frame_id = self.next_id
        self.next_id += 1
        payload = struct.pack("<IIII", len(argv), len(env), timeout_ms, 0)
        payload += b"".join(s.encode() + b"\0" for s in list(argv) + list(env) + [""])
        self.send(K_EXEC, frame_id, payload)
        return frame_id

    def wait(self, frame_id):
        out, err = bytearray(), bytearray()
        while True:
            frame_type, fid, payload = self.recv()
            if fid != frame_id:
                raise AssertionError(f"frame for id {fid} while waiting for {frame_id}")
            if frame_type == K_STDOUT:
                out += payload
            elif frame_type == K_STDERR:
                err += payload
            elif frame_type == K_EXIT:
                return struct.unpack("<ii", payload), bytes(out), bytes(err)

    def run(self, argv, env=(), timeout_ms=0):
        return self.wait(self.start(argv, env, timeout_ms))


class Qmp:
    """QEMU's monitor on a Unix socket: commands and their answers, events skipped."""

    def __init__(self, path, timeout=60):
        self.sock = connect_when_listening(
            lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.read()  # the greeting
        self.execute("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP socket closed")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None):
        request = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer = self.read()
            if "event" in answer:
                continue
            if "error" in answer:
                raise RuntimeError(f"QMP {command}: {answer['error']}")
            return answer["return"]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("kernel")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--max-cpus", type=int, default=0, help="QEMU's vCPUs (default: --cpus)")
    parser.add_argument("--acpi", default="off")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    max_cpus = max(args.max_cpus, args.cpus)
    # The most vCPUs a kRestore can bring online: the MADT's (QEMU's -smp) with ACPI, else the
    # ones the guest started at boot.
    ceiling = max_cpus if args.acpi == "on" else args.cpus

    tmp = tempfile.mkdtemp(prefix="testguest-")
    disk, log, qmp_path = (os.path.join(tmp, n) for n in ("disk.img", "serial.log", "qmp.sock"))
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    # With acpi=off, microvm appends virtio_mmio.device= for each transport in use itself. With
    # acpi=on it declares them in ACPI only: 24 transports on GSIs 24-47 (the second IOAPIC), listed here.
    append = f"msb.cpus={args.cpus}"
    if args.acpi == "on":
        append += "".join(f" virtio_mmio.device=512@{0xFEB00000 + 512 * i:#x}:{24 + i}" for i in range(24))
    cmd = ["qemu-system-x86_64", "-M", f"microvm,acpi={args.acpi}", "-accel", "tcg", "-m", "256",
           "-smp", str(max_cpus), "-nodefaults", "-no-user-config", "-nographic",
           "-serial", f"file:{log}", "-kernel", args.kernel, "-append", append,
           "-global", "virtio-mmio.force-legacy=false",
           "-device", "virtio-serial-device",
           "-chardev", f"socket,id=agent,host=127.0.0.1,port={port},server=on,wait=on",
           "-device", "virtconsole,chardev=agent",
           "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-device,drive=d0",
           "-device", "virtio-balloon-device", "-qmp", f"unix:{qmp_path},server=on,wait=off",
           "-no-reboot"]
    qemu = subprocess.Popen(cmd)
    failures = []

    def check(name, got, want):
        if got != want:
            failures.append(name)
            print(f"FAIL {name}: got {got!r}, want {want!r}")
        else:
            print(f"ok   {name}")

    try:
        agent = Agent(port)
        frame_type, frame_id, payload = agent.recv()
        check("ready", (frame_type, frame_id, payload[:8]), (K_READY, 0, struct.pack("<II", 1, 1)))
        env = ["HOME=/root", "PATH=/bin", "A=1"]
        agent.send(K_SETENV, 0, struct.pack("<I", len(env)) + b"".join(e.encode() + b"\0" for e in env))

        check("echo", agent.run(["echo", "hello", "world"]), ((0, 0), b"hello world\n", b""))
        check("echo empty", agent.run(["echo"]), ((0, 0), b"\n", b""))
        check("env", agent.run(["env"], env=["A=2", "B=3"]),
              ((0, 0), b"HOME=/root\nPATH=/bin\nA=2\nB=3\n", b""))
        check("cpus", agent.run(["cpus"]), ((0, 0), f"{args.cpus}\n".encode(), b""))
        check("mem", agent.run(["mem"]), ((0, 0), b"256\n", b""))
        check("hostname", agent.run(["hostname"]), ((0, 0), b"testguest\n", b""))
        check("clock before kRestore", agent.run(["clock"]), ((0, 0), b"0\n", b""))
        first, second = agent.run(["random"]), agent.run(["random"])
        check("random", (first[0], len(first[1]), first[1][-1:], first[2]), ((0, 0), 33, b"\n", b""))
        check("random is fresh each time", first[1] != second[1], True)

        # kRestore: a malformed one is ignored; a good one is applied, then answered with kReady.
        agent.send(K_RESTORE, 0, b"short")
        check("malformed kRestore ignored", agent.run(["echo", "still", "here"]),
              ((0, 0), b"still here\n", b""))

        def restore(cpus, memory_mib, name):
            agent.send(K_RESTORE, 0, restore_payload(cpus, memory_mib, name))
            frame_type, frame_id, payload = agent.recv()
            check(f"kRestore cpus={cpus} answered kReady", (frame_type, frame_id, payload[:8]),
                  (K_READY, 0, struct.pack("<II", 1, 1)))

        # The guest's vCPU ceiling: the MADT's CPUs with acpi=on (-smp), those it started without.
        restore(1, 200, "fork-1")
        check("cpus after kRestore 1", agent.run(["cpus"]), ((0, 0), b"1\n", b""))
        check("mem after kRestore", agent.run(["mem"]), ((0, 0), b"200\n", b""))
        check("hostname after kRestore", agent.run(["hostname"]), ((0, 0), b"fork-1\n", b""))
        clock = int(agent.run(["clock"])[1])
        check(f"clock after kRestore ({clock} vs {int(time.time())})", abs(clock - time.time()) <= 2, True)
        check("random after kRestore", agent.run(["random"])[1] not in (first[1], second[1]), True)
        restore(ceiling, 256, "fork-2")
        check(f"cpus after kRestore {ceiling}", agent.run(["cpus"]), ((0, 0), f"{ceiling}\n".encode(), b""))
        restore(99, 256, "fork-3")
        check("kRestore cpus=99 clamped", agent.run(["cpus"]), ((0, 0), f"{ceiling}\n".encode(), b""))
        restore(0, 256, "fork-4")
        check("kRestore cpus=0 clamped", agent.run(["cpus"]), ((0, 0), b"1\n", b""))
        restore(args.cpus, 256, "fork-5")
        check(f"cpus back to {args.cpus}", agent.run(["cpus"]), ((0, 0), f"{args.cpus}\n".encode(), b""))
        agent.send(K_SETENV, 0, struct.pack("<I", len(env)) + b"".join(e.encode() + b"\0" for e in env))
        (code, _), out, _ = agent.run(["ticks"])
        check("ticks", code == 0 and int(out) >= 0, True)
        time.sleep(1)
        ticks = int(agent.run(["ticks"])[1]) - int(out)
        check(f"timer rate ({ticks} ticks in ~1 s, 100 Hz)", 50 <= ticks <= 200, True)
        interrupts = int(agent.run(["interrupts"])[1])
        seed, mib = 7, 4
        want = f"{pattern_checksum(seed, mib << 17):016x}\n".encode()
        check("fill", agent.run(["fill", str(mib), str(seed)]), ((0, 0), want, b""))
        check("sum", agent.run(["sum", str(mib)]), ((0, 0), want, b""))
        check("fill too much", agent.run(["fill", "100000", "1"])[0], (2, 0))
        check("fill bad number", agent.run(["fill", "x", "1"])[0], (2, 0))
        check("disk-write", agent.run(["disk-write", "2", "9"]),
              ((0, 0), f"{pattern_checksum(9, 2 << 17):016x}\n".encode(), b""))
        check("disk-read", agent.run(["disk-read", "2"]),
              ((0, 0), f"{pattern_checksum(9, 2 << 17):016x}\n".encode(), b""))
        check("device interrupts arrive", int(agent.run(["interrupts"])[1]) > interrupts, True)
        check("disk-read too big", agent.run(["disk-read", "17"])[0], (2, 0))
        (code, sig), out, err = agent.run(["out", "1", "5"])
        check("out", (code, sig, out == pattern_bytes(5, 1 << 17), err), (0, 0, True, b""))
        check("out 0", agent.run(["out", "0", "5"]), ((0, 0), b"", b""))
        check("exit 3", agent.run(["exit", "3"]), ((3, 0), b"", b""))
        check("not found", agent.run(["nope", "x"]),
              ((127, 0), b"", b"testguest: nope: command not found\n"))
        # Unknown frames are skipped.
        agent.send(99, 0, b"junk")

        # The balloon: QEMU's target is the RAM the guest keeps (`value`, bytes of its 256 MiB);
        # the driver takes pages from the top of RAM down, which fill/sum/load then leave alone.
        qmp = Qmp(qmp_path)
        mib = 1 << 20

        def wait_balloon(keep_mib):
            deadline = time.time() + 120
            while qmp.execute("query-balloon")["actual"] != keep_mib * mib and time.time() < deadline:
                time.sleep(0.1)
            return qmp.execute("query-balloon")["actual"] // mib

        check("balloon at boot", agent.run(["balloon"]), ((0, 0), b"0 0\n", b""))
        want = f"{pattern_checksum(11, 200 << 17):016x}\n".encode()
        check("fill 200 (all but 24 MiB above 32 MiB)", agent.run(["fill", "200", "11"]), ((0, 0), want, b""))
        rss_filled = rss_kib(qemu.pid)
        qmp.execute("balloon", {"value": 64 * mib})
        check("QEMU sees the balloon inflate to the target", wait_balloon(64), 64)
        check("balloon inflated", agent.run(["balloon"]), ((0, 0), b"49152 49152\n", b""))
        rss_ballooned = rss_kib(qemu.pid)
        check(f"QEMU's RSS drops as the balloon inflates ({rss_filled} -> {rss_ballooned} KiB)",
              rss_filled - rss_ballooned > 120 * 1024, True)
        check("fill stays below the balloon", agent.run(["fill", "32", "12"]),
              ((0, 0), f"{pattern_checksum(12, 32 << 17):016x}\n".encode(), b""))
        check("fill into the balloon refused", agent.run(["fill", "33", "12"]),
              ((2, 0), b"", b"testguest: fill: the balloon holds RAM in that range\n"))
        check("sum into the balloon refused", agent.run(["sum", "100"])[0], (2, 0))
        qmp.execute("balloon", {"value": 192 * mib})
        check("QEMU sees the balloon deflate to the target", wait_balloon(192), 192)
        check("balloon deflated", agent.run(["balloon"]), ((0, 0), b"16384 16384\n", b""))
        check("fill in the pages given back", agent.run(["fill", "160", "13"]),
              ((0, 0), f"{pattern_checksum(13, 160 << 17):016x}\n".encode(), b""))
        # A kRestore is answered once the balloon holds the target the host set before it.
        qmp.execute("balloon", {"value": 128 * mib})
        restore(args.cpus, 128, "fork-6")
        check("balloon at the target when kRestore is answered", agent.run(["balloon"]),
              ((0, 0), b"32768 32768\n", b""))
        qmp.execute("balloon", {"value": 256 * mib})
        check("QEMU sees the balloon empty", wait_balloon(256), 256)
        check("balloon empty", agent.run(["balloon"]), ((0, 0), b"0 0\n", b""))

        cat = agent.start(["cat"])
        agent.send(K_STDIN, cat, b"abc")
        agent.send(K_STDIN, cat, b"def" * 1000)
        agent.send(K_STDIN, cat, b"")
        check("cat", agent.wait(cat), ((0, 0), b"abc" + b"def" * 1000, b""))
        cat = agent.start(["cat"])
        agent.send(K_STDIN, cat, b"hi")
        agent.send(K_SIGNAL, cat, struct.pack("<i", 15))
        check("cat signal", agent.wait(cat), ((-1, 15), b"hi", b""))
        start = time.time()
        check("cat timeout", agent.run(["cat"], timeout_ms=300), ((-1, 9), b"", b""))
        check("cat timeout took >= 0.25 s", time.time() - start >= 0.25, True)

        # A frame split into single bytes across receive buffers.
        frame_id = agent.next_id
        agent.next_id += 1
        payload = struct.pack("<IIII", 2, 0, 0, 0) + b"echo\0split\0\0"
        for b in struct.pack("<IHHI", len(payload), K_EXEC, 0, frame_id) + payload:
            agent.sock.sendall(bytes([b]))
            time.sleep(0.002)
        check("split frame", agent.wait(frame_id), ((0, 0), b"split\n", b""))

        agent.send(K_POWEROFF, 0)
        check("power off", qemu.wait(timeout=30) is not None, True)
    except Exception as error:  # report, then clean up
        failures.append(f"exception: {error!r}")
        print(f"FAIL {error!r}")
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        print("--- serial log ---")
        with open(log, errors="replace") as f:
            print(f.read())
        if not args.keep:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
