// Instructions the CPU could not emulate, on real KVM (vmm tier): tiny kernels run at CPL0 what
// a nested PVM host's emulator lacks (shared/environment.md). There the VMM completes int3 and
// fwait and reports anything else; on hosts with VMX/SVM the same guests run natively and never
// exit, so each test accepts both. Also the hypercall probe (vmm/hypercall_probe.h).
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/support.h"
#include "vmm/hypercall_probe.h"
#include "vmm/machine.h"

using namespace msb;
using namespace msb::vmm;

namespace {

// The tiny kernel's page at 1 MiB: code at 0, handlers, the IDT and the IDTR.
constexpr uint32_t kBase = 0x100000;
constexpr size_t kBreakpointHandler = 0x400;
constexpr size_t kInvalidOpcodeHandler = 0x480;
constexpr size_t kIdt = 0x800;
constexpr size_t kIdtr = 0xf00;
constexpr unsigned kIdtVectors = 7;  // up to #UD

void append(std::vector<uint8_t>& code, std::initializer_list<uint8_t> bytes) {
  code.insert(code.end(), bytes);
}

void append32(std::vector<uint8_t>& code, uint32_t value) {
  for (int i = 0; i < 4; ++i)
    code.push_back(uint8_t(value >> (8 * i)));
}

// mov dx, 0x3f8; then per byte: mov al, byte; out dx, al
void print(std::vector<uint8_t>& code, const std::string& text) {
  append(code, {0x66, 0xba, 0xf8, 0x03});
  for (char c : text)
    append(code, {0xb0, uint8_t(c), 0xee});
}

// Pulse reset through the i8042 (the machine powers off), then hlt.
void power_off(std::vector<uint8_t>& code) {
  append(code, {0x66, 0xba, 0x64, 0x00, 0xb0, 0xfe, 0xee, 0xf4});
}

// A 64-bit interrupt gate to kBase + handler in code segment 0x10, DPL 0.
void set_gate(std::vector<uint8_t>& image, unsigned vector, size_t handler) {
  const uint64_t target = kBase + handler;
  uint8_t* gate = &image[kIdt + 16 * vector];
  gate[0] = uint8_t(target);
  gate[1] = uint8_t(target >> 8);
  gate[2] = 0x10;  // selector
  gate[3] = 0;
  gate[4] = 0;     // no IST
  gate[5] = 0x8e;  // present, DPL 0, 64-bit interrupt gate
  gate[6] = uint8_t(target >> 16);
  gate[7] = uint8_t(target >> 24);
  for (int i = 0; i < 4; ++i)
    gate[8 + i] = uint8_t(target >> (32 + 8 * i));
}

// The offset in the image where a guest's own code starts (after the stack and IDT setup).
constexpr size_t kBodyOffset = 15;

// A kernel that sets a stack and an IDT, then runs `body` at kBase + kBodyOffset. #BP's
// handler counts in r15 and keeps the return address from its frame in r14; #UD's prints "#UD"
// and powers off.
std::string kernel_with_idt(const std::vector<uint8_t>& body) {
  std::vector<uint8_t> image(0x1000, 0);
  std::vector<uint8_t> code = {
      0x48, 0xc7, 0xc4, 0x00, 0x00, 0x18, 0x00,        // mov rsp, 0x180000
      0x0f, 0x01, 0x1c, 0x25, 0x00, 0x0f, 0x10, 0x00,  // lidt [0x100f00]
  };
  REQUIRE(code.size() == kBodyOffset);
  REQUIRE(kBase + kIdtr == 0x100f00);
  code.insert(code.end(), body.begin(), body.end());
  REQUIRE(code.size() <= kBreakpointHandler);
  std::copy(code.begin(), code.end(), image.begin());

  const std::vector<uint8_t> breakpoint = {
      0x4c, 0x8b, 0x34, 0x24,  // mov r14, [rsp]: the return address
      0x49, 0xff, 0xc7,        // inc r15
      0x48, 0xcf,              // iretq
  };
  std::copy(breakpoint.begin(), breakpoint.end(), image.begin() + kBreakpointHandler);
  std::vector<uint8_t> invalid_opcode;
  print(invalid_opcode, "#UD\n");
  power_off(invalid_opcode);
  std::copy(invalid_opcode.begin(), invalid_opcode.end(), image.begin() + kInvalidOpcodeHandler);

  set_gate(image, 3, kBreakpointHandler);
  set_gate(image, 6, kInvalidOpcodeHandler);
  const uint16_t limit = kIdtVectors * 16 - 1;
  image[kIdtr] = uint8_t(limit);
  image[kIdtr + 1] = uint8_t(limit >> 8);
  const uint64_t idt = kBase + kIdt;
  for (int i = 0; i < 8; ++i)
    image[kIdtr + 2 + i] = uint8_t(idt >> (8 * i));
  return test::tiny_kernel(image);
}

struct Booted {
  MachineExit exit;
  std::string console;
};

Booted boot(const std::string& kernel) {
  test::TempDir dir;
  test::write_text(dir.path() / "kernel", kernel);
  Booted booted;
  {
    MachineConfig config;
    config.kernel_path = dir.path() / "kernel";
    config.memory_mib = config.max_memory_mib = 64;
    const int log = ::open((dir.path() / "console.log").c_str(),
                           O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    REQUIRE(log >= 0);
    config.console_log_fd = log;
    auto machine = Machine::create(config);
    machine->start();
    // A guest whose breakpoint handler returns to the int3 itself would loop forever: stop it
    // after a minute (the guests take milliseconds even emulated), and the console tells.
    std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    std::thread watchdog([&] {
      std::unique_lock lock(mutex);
      if (!finished.wait_for(lock, std::chrono::seconds(60), [&] { return done; })) {
        machine->stop();
      }
    });
    booted.exit = machine->wait();
    {
      std::lock_guard lock(mutex);
      done = true;
    }
    finished.notify_all();
    watchdog.join();
    machine.reset();
    ::close(log);
  }
  booted.console = test::read_text(dir.path() / "console.log");
  return booted;
}

}  // namespace

TEST_CASE("int3 and fwait at CPL0 behave as on hardware", "[emulation][kvm]") {
  test::skip_without_kvm();
  std::vector<uint8_t> body = {
      0x45, 0x31, 0xff,  // xor r15d, r15d: #BP count
      0x45, 0x31, 0xf6,  // xor r14d, r14d: #BP return address
      0xcc,              // int3
      0xcc,              // int3
      0x9b,              // fwait
      0x66, 0x9b,        // fwait with an operand-size prefix
      0xcc,              // int3
  };
  const auto after_last_int3 = static_cast<uint32_t>(kBase + kBodyOffset + body.size());
  append(body, {
                   0x44, 0x89, 0xf8,        // mov eax, r15d
                   0x04, 0x30,              // add al, '0'
                   0x66, 0xba, 0xf8, 0x03,  // mov dx, 0x3f8
                   0xee,                    // out dx, al
                   0xb8,                    // mov eax, after_last_int3
               });
  append32(body, after_last_int3);
  append(body, {
                   0x49, 0x39, 0xc6,  // cmp r14, rax
                   0xb0, 'r',         // mov al, 'r' (the frame held the next RIP)
                   0x74, 0x02,        // je +2
                   0xb0, 'x',         // mov al, 'x'
                   0xee,              // out dx, al
                   0xb0, '\n',        // mov al, '\n'
                   0xee,              // out dx, al
               });
  power_off(body);
  auto booted = boot(kernel_with_idt(body));
  INFO("exit: " << booted.exit.detail << "\nconsole: " << booted.console);
  REQUIRE(booted.exit.reason == MachineExit::Reason::kPoweredOff);
  // Three breakpoints taken, the last one's frame holding the address after it.
  REQUIRE(booted.console == "3r\n");
}

TEST_CASE("an instruction the CPU cannot emulate is reported by name and bytes",
          "[emulation][kvm]") {
  test::skip_without_kvm();
  struct Case {
    std::vector<uint8_t> instruction;
    std::string reported;
    std::string native_console;  // what the guest prints where the CPU runs it natively
  };
  const Case cases[] = {
      // popcnt rax, rbx
      {{0xf3, 0x48, 0x0f, 0xb8, 0xc3}, "`popcnt` (f3 48 0f b8 c3)", "ran\n"},
      // The boot state leaves CR4.OSXSAVE clear, so hardware raises #UD.
      {{0x0f, 0x01, 0xd0}, "`xgetbv` (0f 01 d0)", "#UD\n"},
  };
  for (const auto& c : cases) {
    std::vector<uint8_t> body = c.instruction;
    print(body, "ran\n");
    power_off(body);
    auto booted = boot(kernel_with_idt(body));
    INFO("exit: " << booted.exit.detail << "\nconsole: " << booted.console);
    if (booted.exit.reason == MachineExit::Reason::kInternalError) {
      // A host whose emulator lacks the instruction (nested PVM): the report says what and where.
      const uint64_t rip = kBase + kBodyOffset;
      char where[64];
      std::snprintf(where, sizeof where, " at rip %#llx", static_cast<unsigned long long>(rip));
      REQUIRE(booted.exit.detail ==
              "vCPU 0: the CPU could not emulate " + c.reported + std::string(where));
    } else {
      // VMX/SVM: the guest runs natively and never exits for it; hardware gives its answer.
      REQUIRE(booted.exit.reason == MachineExit::Reason::kPoweredOff);
      REQUIRE(booted.console == c.native_console);
    }
  }
}

TEST_CASE("the hypercall probe tells whether vmcall returns", "[emulation][kvm]") {
  test::skip_without_kvm();
  // The probe returns whether or not vmcall does (it kicks a vCPU that hangs out of KVM_RUN):
  // it runs on a thread of its own, and a probe still out after two minutes has hung. (A thread
  // left running then is taken with the process when the failed test ends it.)
  auto result = std::make_shared<std::promise<hypercall_probe::Outcome>>();
  std::future<hypercall_probe::Outcome> returned = result->get_future();
  std::thread([result] {
    try {
      result->set_value(hypercall_probe::probe(std::chrono::milliseconds(50)));
    } catch (...) {
      result->set_exception(std::current_exception());
    }
  }).detach();
  REQUIRE(returned.wait_for(std::chrono::seconds(120)) == std::future_status::ready);
  const hypercall_probe::Outcome outcome = returned.get();
  INFO(outcome.detail);
  if (hypercall_probe::hardware_virtualization()) {
    // Hardware virtualization: a hypercall is an ordinary exit KVM handles, and msb does not
    // even probe.
    REQUIRE(outcome.works);
    REQUIRE(hypercall_probe::hypercalls_work());
  } else {
    // Nested PVM (shared/environment.md): vmcall never comes back by itself.
    REQUIRE_FALSE(outcome.works);
    REQUIRE(outcome.detail.find("did not come back") != std::string::npos);
    REQUIRE_FALSE(hypercall_probe::hypercalls_work());
  }
}
