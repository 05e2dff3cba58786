#include "core/vmm_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/archive.h"
#include "core/control_client.h"
#include "core/exec_mux.h"
#include "core/home.h"
#include "snapstore/error.h"
#include "snapstore/file_util.h"
#include "vmm/machine.h"

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

vmm::MachineConfig machine_config(const nlohmann::json& config, int console_fd, int agent_fd) {
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
  machine.console_log_fd = console_fd;
  machine.agent_fd = agent_fd;
  return machine;
}

}  // namespace

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
  UniqueFd listen_fd;
  UniqueFd agent_host, agent_guest, console;
  // After the fds it uses, so that it is destroyed before they close.
  std::unique_ptr<vmm::Machine> machine;
  nlohmann::json config;
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
    machine = vmm::Machine::create(machine_config(config, console.get(), agent_guest.get()));
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
  ExecMux mux(agent_host.get(), listen_fd.get(), options);
  std::atomic<bool> stop_timed_out = false;
  mux.log = log_line;
  mux.on_stop_timeout = [&] {
    stop_timed_out = true;
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
  mux.close_clients();
  return clean ? 0 : 1;
}

}  // namespace msb::core
