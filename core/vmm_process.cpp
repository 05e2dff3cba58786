#include "core/vmm_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sys/random.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/archive.h"
#include "core/control_client.h"
#include "core/exec_mux.h"
#include "core/guest_cmdline.h"
#include "core/home.h"
#include "core/kernels.h"
#include "core/test_hooks.h"
#include "core/vmm_snapshot.h"
#include "guest/protocol/agent_protocol.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "snapstore/store.h"
#include "vmm/machine.h"
#include "vmm/machine_state.h"

namespace msb::core {
namespace {

using snapstore::UniqueFd;

void log_line(const std::string& message) {
  std::fprintf(stderr, "%s msb vmm[%d]: %s\n", utc_timestamp().c_str(), int(::getpid()),
               message.c_str());
  std::fflush(stderr);
}

// Writes `name` in the current folder (the sandbox's) atomically.
void publish(const std::string& name, const std::string& text) {
  write_file_atomically(name, text);
}

void record_exit(const std::string& state, const std::string& reason, const std::string& detail) {
  nlohmann::json doc = {
      {"state", state}, {"reason", reason}, {"detail", detail}, {"time", utc_timestamp()}};
  publish("exit.json", doc.dump(2) + "\n");
  log_line("stopped: " + reason + (detail.empty() ? "" : ": " + detail));
}

const char* reason_name(vmm::MachineExit::Reason reason) {
  switch (reason) {
    case vmm::MachineExit::Reason::kPoweredOff:
      return "powered-off";
    case vmm::MachineExit::Reason::kTripleFault:
      return "triple-fault";
    case vmm::MachineExit::Reason::kInternalError:
      return "internal-error";
    case vmm::MachineExit::Reason::kVmmError:
      return "vmm-error";
  }
  return "unknown";
}

// The kRestore frame's payload: what a restored guest must learn before its first exec.
std::string restore_payload(const nlohmann::json& config) {
  agent::RestorePayload payload{};
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  payload.wall_clock_ns = uint64_t(now.tv_sec) * 1'000'000'000ull + uint64_t(now.tv_nsec);
  payload.memory_mib = config.at("memory_mib").get<uint64_t>();
  payload.cpus = config.at("cpus").get<uint32_t>();
  // Every fork must draw different random numbers from then on (docs/snapshots.md).
  size_t got = 0;
  while (got < sizeof payload.entropy) {
    ssize_t n = ::getrandom(payload.entropy + got, sizeof payload.entropy - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) snapstore::throw_errno("getrandom for the restored guest's entropy");
    got += static_cast<size_t>(n);
  }
  std::string out(reinterpret_cast<const char*>(&payload), sizeof payload);
  out += config.at("name").get<std::string>();
  out += '\0';
  return out;
}

// Whether this start continues a snapshot (the sandbox's first start after msb restore).
bool restoring(const nlohmann::json& config) {
  return config.contains("restore") && !std::filesystem::exists("restored");
}

}  // namespace

vmm::MachineConfig machine_config(const nlohmann::json& config, int console_fd, int agent_fd,
                                  bool kernel_mode_emulated) {
  vmm::MachineConfig machine;
  machine.kernel_path = config.at("kernel").get<std::string>();
  machine.initrd_path = config.value("initrd", std::string());
  machine.cmdline = config.value("cmdline", std::string());
  machine.cpus = config.at("cpus").get<unsigned>();
  machine.max_cpus = config.at("max_cpus").get<unsigned>();
  machine.memory_mib = config.at("memory_mib").get<uint64_t>();
  machine.max_memory_mib = config.at("max_memory_mib").get<uint64_t>();
  machine.disk_base_path = config.value("disk", std::string());
  machine.disk_overlay_path = std::filesystem::absolute("disk.overlay").string();
  machine.disk_size = config.value("disk_size_mib", uint64_t{1024}) << 20;
  // A Linux guest (msb's agent loads the balloon driver at boot) sees RAM up to the ceiling with
  // the balloon holding what is above --memory, and learns the sandbox's name for its hostname.
  // Its devices are described by ACPI alone: a kernel that also reads virtio_mmio.device=
  // would probe each device twice and fail the second time. Where this host emulates kernel
  // mode, msb adds the options that make Linux run there (core/guest_cmdline.h).
  if (config.value("linux", false)) {
    machine.balloon_holds_excess = true;
    machine.virtio_on_cmdline = false;
    machine.cmdline += " msb.hostname=" + config.at("name").get<std::string>();
    machine.cmdline = cmdline_for_host(machine.cmdline, kernel_mode_emulated);
  }
  machine.console_log_fd = console_fd;
  machine.agent_fd = agent_fd;
  // A sandbox restored from a snapshot keeps that snapshot's disk delta under its overlay, for
  // every later boot too; the first start continues the snapshot's RAM.
  if (config.contains("restore")) {
    std::filesystem::path cache = config["restore"].at("cache").get<std::string>();
    if (std::filesystem::exists(cache / "disk"))
      machine.disk_layer_path = (cache / "disk").string();
    machine.memory_path = (cache / "memory").string();
  }
  return machine;
}

int run_vmm_process(const std::filesystem::path& dir) {
  ::signal(SIGPIPE, SIG_IGN);
  if (::chdir(dir.c_str()) != 0) {
    log_line("cannot enter " + dir.string() + ": " + std::strerror(errno));
    return 1;
  }
  // Held for as long as this process lives: it is how every msb knows the sandbox runs.
  UniqueFd vmm_lock(::open("vmm.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!vmm_lock || ::flock(vmm_lock.get(), LOCK_EX) != 0) {
    log_line(std::string("cannot lock vmm.lock: ") + std::strerror(errno));
    return 1;
  }
  ::unlink("exit.json");
  ::unlink("paused");
  UniqueFd listen_fd;
  UniqueFd agent_host, agent_guest, console;
  // After the fds it uses, so that it is destroyed before they close.
  std::unique_ptr<vmm::Machine> machine;
  nlohmann::json config;
  std::string restore_frame;
  std::string parent;  // the snapshot the running machine continues, for incremental snapshots
  try {
    publish("pid", std::to_string(::getpid()) + "\n");
    listen_fd = listen_unix("control.sock");
    std::ifstream in("config.json");
    config = nlohmann::json::parse(in);
    console.reset(::open("console.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
    if (!console) snapstore::throw_errno("cannot open console.log");
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
      snapstore::throw_errno("socketpair for the agent channel");
    }
    agent_host.reset(pair[0]);
    agent_guest.reset(pair[1]);
    auto machine_settings = machine_config(config, console.get(), agent_guest.get(),
                                           !host_has_hardware_virtualization());
    if (restoring(config)) {
      std::filesystem::path cache = config["restore"].at("cache").get<std::string>();
      nlohmann::json state_doc = nlohmann::json::parse(snapstore::read_file(cache / "state.json"));
      vmm::MachineState state = vmm::MachineState::from_json(state_doc);
      // The machine is the snapshot's; what the restore grants (cpus, memory within the
      // ceilings) reaches the guest in kRestore, and the guest applies it.
      machine_settings.cpus = state.cpus;
      machine_settings.memory_mib = state.memory_mib;
      machine = vmm::Machine::restore(machine_settings, state);
      // The granted memory: the balloon's new target, set before kRestore so that the agent
      // finds it when it waits for the balloon.
      machine->set_balloon_target_mib(config.at("memory_mib").get<uint64_t>());
      restore_frame = restore_payload(config);
      parent = config["restore"].at("handle").get<std::string>();
      // From now on a start boots (the RAM image is this sandbox's past, not its present).
      publish("restored", parent + "\n");
    } else {
      machine_settings.memory_path.clear();
      machine = vmm::Machine::create(machine_settings);
      // The console log starts with what the kernel was given: a quiet kernel does not print
      // it, and msb adds options of its own on some hosts (core/guest_cmdline.h).
      const std::string line = "msb: kernel command line: " + machine->kernel_cmdline() + "\n";
      (void)!::write(console.get(), line.data(), line.size());
      if (config.contains("restore")) parent.clear();
    }
    machine->start();
  } catch (const std::exception& e) {
    record_exit("failed", "vmm-error", e.what());
    ::unlink("control.sock");
    ::unlink("pid");
    return 1;
  }
  log_line("started " + config.value("name", std::string()));

  UniqueFd machine_stopped(::eventfd(0, EFD_CLOEXEC));
  if (!machine_stopped) {
    log_line(std::string("eventfd: ") + std::strerror(errno));
    machine->stop();
  }
  vmm::MachineExit exit;
  std::thread waiter([&] {
    exit = machine->wait();
    uint64_t one = 1;
    if (machine_stopped) (void)!::write(machine_stopped.get(), &one, sizeof one);
  });

  MuxOptions options;
  options.env = config.value("env", std::vector<std::string>{});
  options.restore_payload = restore_frame;
  ExecMux mux(agent_host.get(), listen_fd.get(), options);
  SnapshotSource snapshots(*machine, parent, snapstore::kDefaultChunkSize);
  mux.on_machine_request = [&](const std::string& op, const nlohmann::json& request) {
    nlohmann::json response;
    if (op == "pause") {
      machine->pause();
      publish("paused", utc_timestamp() + "\n");
      log_line("paused");
      response = {{"paused", true}};
    } else if (op == "resume") {
      machine->resume();
      ::unlink("paused");
      log_line("resumed");
      response = {{"paused", false}};
    } else if (op == "snapshot") {
      // Test hooks (core/test_hooks.h): the request taken, the guest not yet paused; then the
      // capture staged and the guest paused (or running again with --resume), not yet answered.
      test_hook("vmm-snapshot-capture");
      response = snapshots.capture(request.value("resume", false));
      if (response.value("paused", false)) {
        publish("paused", utc_timestamp() + "\n");
      } else {
        ::unlink("paused");
      }
      log_line("captured for a snapshot in " + std::to_string(response.value("capture_ms", 0.0)) +
               " ms");
      test_hook("vmm-snapshot-captured");
    } else if (op == "snapshot_commit") {
      std::string handle = request.at("handle").get<std::string>();
      // Test hook: the client stored and named the snapshot; this VMM has not taken it as the
      // parent of its next one yet.
      test_hook("vmm-snapshot-commit");
      snapshots.commit(handle);
      log_line("snapshot " + handle + " stored");
      response = {{"committed", true}};
    }
    return response;
  };
  // The balloon as the guest's driver left it: how much of its RAM the guest really has.
  mux.on_status = [&] {
    const vmm::BalloonStatus balloon = machine->balloon();
    constexpr uint64_t kPagesPerMib = (1 << 20) / 4096;
    return nlohmann::json{{"balloon",
                           {{"ram_mib", balloon.ram_mib},
                            {"target_mib", balloon.target_pages / kPagesPerMib},
                            {"actual_mib", balloon.actual_pages / kPagesPerMib},
                            {"target_pages", balloon.target_pages},
                            {"actual_pages", balloon.actual_pages}}}};
  };
  mux.on_capture_abandoned = [&] {
    snapshots.abort();
    log_line("a snapshot's capture was abandoned before it was stored");
  };
  std::atomic<bool> stop_timed_out = false;
  mux.log = log_line;
  mux.on_stop_timeout = [&] {
    // A paused guest cannot power itself off: stopping it at once is what was asked.
    if (!machine->paused()) stop_timed_out = true;
    machine->stop();
  };
  try {
    if (machine_stopped) mux.run(machine_stopped.get());
  } catch (const std::exception& e) {
    // Whatever went wrong serving clients, the machine must stop and the reason be recorded.
    log_line(std::string("serving clients failed: ") + e.what());
    machine->stop();
  }
  waiter.join();

  bool clean = exit.reason == vmm::MachineExit::Reason::kPoweredOff;
  if (clean && stop_timed_out) {
    record_exit("stopped", "stop-timeout",
                "the guest did not power off in time; msb stopped the machine");
  } else {
    record_exit(clean ? "stopped" : "failed", reason_name(exit.reason), exit.detail);
  }
  ::unlink("control.sock");
  ::unlink("pid");
  ::unlink("paused");
  mux.close_clients();
  return clean ? 0 : 1;
}

}  // namespace msb::core
