#include "vmm/machine_state.h"

#include <cstring>
#include <limits>
#include <span>
#include <type_traits>

#include "vmm/machine.h"

namespace msb::vmm {

namespace {

using nlohmann::json;

// The largest XSAVE area accepted (KVM's XSAVE2 sizes are a few KiB; AMX adds 8 KiB).
constexpr size_t kMaxXsaveBytes = 1 << 20;
constexpr size_t kMaxMsrs = 1024;
constexpr size_t kMaxPendingOutput = virtio::VirtioConsole::kMaxTransmitChain;
constexpr size_t kMaxVirtioDevices = 64;
constexpr size_t kMaxQueues = 64;

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw VmmError("snapshot state: " + where + ": " + what);
}

std::string to_hex(std::span<const std::byte> bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text(bytes.size() * 2, '0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    const auto byte = static_cast<uint8_t>(bytes[i]);
    text[2 * i] = kDigits[byte >> 4];
    text[2 * i + 1] = kDigits[byte & 15];
  }
  return text;
}

template <class T>
std::string struct_hex(const T& value) {
  static_assert(std::is_trivially_copyable_v<T>);
  return to_hex(std::as_bytes(std::span(&value, 1)));
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reads an object's fields, naming the path of whatever is missing or wrong.
class Reader {
 public:
  Reader(const json& object, std::string where) : object_(object), where_(std::move(where)) {
    if (!object_.is_object()) fail(where_, "not an object");
  }

  const json& field(const char* key) const {
    auto it = object_.find(key);
    if (it == object_.end()) fail(where_, std::string("missing \"") + key + "\"");
    return *it;
  }
  std::string path(const char* key) const { return where_ + "." + key; }

  template <class T>
  T number(const char* key) const {
    static_assert(std::is_unsigned_v<T>);
    const json& value = field(key);
    if (!value.is_number_unsigned() && !(value.is_number_integer() && value.get<int64_t>() >= 0)) {
      fail(path(key), "not a non-negative integer");
    }
    const auto n = value.get<uint64_t>();
    if (n > std::numeric_limits<T>::max()) fail(path(key), "out of range");
    return static_cast<T>(n);
  }
  bool boolean(const char* key) const {
    const json& value = field(key);
    if (!value.is_boolean()) fail(path(key), "not a boolean");
    return value.get<bool>();
  }
  std::string string(const char* key) const {
    const json& value = field(key);
    if (!value.is_string()) fail(path(key), "not a string");
    return value.get<std::string>();
  }
  const json& array(const char* key, size_t max_size) const {
    const json& value = field(key);
    if (!value.is_array()) fail(path(key), "not an array");
    if (value.size() > max_size)
      fail(path(key), "more than " + std::to_string(max_size) + " entries");
    return value;
  }
  std::vector<std::byte> bytes(const char* key, size_t max_size) const {
    const std::string text = string(key);
    if (text.size() % 2 != 0) fail(path(key), "odd number of hex digits");
    if (text.size() / 2 > max_size)
      fail(path(key), "longer than " + std::to_string(max_size) + " bytes");
    std::vector<std::byte> out(text.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      const int high = hex_digit(text[2 * i]);
      const int low = hex_digit(text[2 * i + 1]);
      if (high < 0 || low < 0) fail(path(key), "not hex");
      out[i] = static_cast<std::byte>(high * 16 + low);
    }
    return out;
  }
  template <class T>
  T kvm_struct(const char* key) const {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto raw = bytes(key, sizeof(T));
    if (raw.size() != sizeof(T)) {
      fail(path(key), std::to_string(raw.size()) + " bytes, not " + std::to_string(sizeof(T)));
    }
    T value;
    std::memcpy(&value, raw.data(), sizeof(T));
    return value;
  }
  const std::string& where() const { return where_; }

 private:
  const json& object_;
  std::string where_;
};

// ---- vCPUs and the VM ----

json vcpu_to_json(const VcpuState& vcpu) {
  json msrs = json::array();
  for (const auto& msr : vcpu.msrs)
    msrs.push_back({{"index", msr.index}, {"data", msr.data}});
  return {
      {"regs", struct_hex(vcpu.regs)},
      {"sregs", struct_hex(vcpu.sregs)},
      {"xsave", to_hex(std::as_bytes(std::span(vcpu.xsave)))},
      {"xcrs", struct_hex(vcpu.xcrs)},
      {"debugregs", struct_hex(vcpu.debugregs)},
      {"lapic", struct_hex(vcpu.lapic)},
      {"msrs", std::move(msrs)},
      {"events", struct_hex(vcpu.events)},
      {"mp_state", vcpu.mp_state.mp_state},
      {"tsc_khz", vcpu.tsc_khz},
  };
}

VcpuState vcpu_from_json(const Reader& in) {
  VcpuState vcpu;
  vcpu.regs = in.kvm_struct<kvm_regs>("regs");
  vcpu.sregs = in.kvm_struct<kvm_sregs>("sregs");
  const auto xsave = in.bytes("xsave", kMaxXsaveBytes);
  if (xsave.size() < 4096 || xsave.size() % 4 != 0) {
    fail(in.path("xsave"),
         std::to_string(xsave.size()) + " bytes: not a multiple of 4 of at least 4096");
  }
  vcpu.xsave.resize(xsave.size() / 4);
  std::memcpy(vcpu.xsave.data(), xsave.data(), xsave.size());
  vcpu.xcrs = in.kvm_struct<kvm_xcrs>("xcrs");
  vcpu.debugregs = in.kvm_struct<kvm_debugregs>("debugregs");
  vcpu.lapic = in.kvm_struct<kvm_lapic_state>("lapic");
  const json& msrs = in.array("msrs", kMaxMsrs);
  for (size_t i = 0; i < msrs.size(); ++i) {
    Reader msr(msrs[i], in.path("msrs") + "[" + std::to_string(i) + "]");
    vcpu.msrs.push_back(
        kvm_msr_entry{msr.number<uint32_t>("index"), 0, msr.number<uint64_t>("data")});
  }
  vcpu.events = in.kvm_struct<kvm_vcpu_events>("events");
  vcpu.mp_state.mp_state = in.number<uint32_t>("mp_state");
  vcpu.tsc_khz = in.number<uint32_t>("tsc_khz");
  return vcpu;
}

json vm_to_json(const VmState& vm) {
  return {
      {"pic_master", struct_hex(vm.pic_master)}, {"pic_slave", struct_hex(vm.pic_slave)},
      {"ioapic", struct_hex(vm.ioapic)},         {"pit", struct_hex(vm.pit)},
      {"clock", struct_hex(vm.clock)},
  };
}

VmState vm_from_json(const Reader& in) {
  VmState vm;
  vm.pic_master = in.kvm_struct<kvm_irqchip>("pic_master");
  vm.pic_slave = in.kvm_struct<kvm_irqchip>("pic_slave");
  vm.ioapic = in.kvm_struct<kvm_irqchip>("ioapic");
  vm.pit = in.kvm_struct<kvm_pit_state2>("pit");
  vm.clock = in.kvm_struct<kvm_clock_data>("clock");
  // Each chip must be the one its field names: KVM_SET_IRQCHIP picks the chip by chip_id.
  const std::pair<const kvm_irqchip*, uint32_t> chips[] = {{&vm.pic_master, KVM_IRQCHIP_PIC_MASTER},
                                                           {&vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE},
                                                           {&vm.ioapic, KVM_IRQCHIP_IOAPIC}};
  for (const auto& [chip, id] : chips) {
    if (chip->chip_id != id) fail(in.where(), "an interrupt controller has the wrong chip id");
  }
  return vm;
}

// ---- port devices ----

template <class Deque>
json byte_list(const Deque& bytes) {
  json out = json::array();
  for (uint8_t byte : bytes)
    out.push_back(byte);
  return out;
}

template <class Deque>
Deque byte_list_from(const Reader& in, const char* key, size_t max_size) {
  const json& list = in.array(key, max_size);
  Deque out;
  for (const auto& item : list) {
    if (!item.is_number_unsigned() || item.get<uint64_t>() > 255) fail(in.path(key), "not bytes");
    out.push_back(static_cast<uint8_t>(item.get<uint64_t>()));
  }
  return out;
}

json serial_to_json(const SerialState& serial) {
  return {
      {"divisor_low", serial.divisor_low},
      {"divisor_high", serial.divisor_high},
      {"ier", serial.ier},
      {"fcr", serial.fcr},
      {"lcr", serial.lcr},
      {"mcr", serial.mcr},
      {"scr", serial.scr},
      {"thr_empty_pending", serial.thr_empty_pending},
      {"receive", byte_list(serial.receive)},
  };
}

SerialState serial_from_json(const Reader& in) {
  SerialState serial;
  serial.divisor_low = in.number<uint8_t>("divisor_low");
  serial.divisor_high = in.number<uint8_t>("divisor_high");
  serial.ier = in.number<uint8_t>("ier");
  serial.fcr = in.number<uint8_t>("fcr");
  serial.lcr = in.number<uint8_t>("lcr");
  serial.mcr = in.number<uint8_t>("mcr");
  serial.scr = in.number<uint8_t>("scr");
  serial.thr_empty_pending = in.boolean("thr_empty_pending");
  serial.receive = byte_list_from<std::deque<uint8_t>>(in, "receive", Serial::kReceiveCapacity);
  return serial;
}

json i8042_to_json(const I8042State& i8042) {
  return {
      {"status", i8042.status},
      {"control", i8042.control},
      {"output_port", i8042.output_port},
      {"pending_command", i8042.pending_command},
      {"output", byte_list(i8042.output)},
  };
}

I8042State i8042_from_json(const Reader& in) {
  I8042State i8042;
  i8042.status = in.number<uint8_t>("status");
  i8042.control = in.number<uint8_t>("control");
  i8042.output_port = in.number<uint8_t>("output_port");
  i8042.pending_command = in.number<uint8_t>("pending_command");
  i8042.output = byte_list_from<std::deque<uint8_t>>(in, "output", 16);
  return i8042;
}

// ---- virtio ----

json mmio_to_json(const virtio::MmioState& mmio) {
  return {
      {"status", mmio.status},
      {"device_features_select", mmio.device_features_select},
      {"driver_features_select", mmio.driver_features_select},
      {"driver_features", mmio.driver_features},
      {"queue_select", mmio.queue_select},
      {"activated", mmio.activated},
      {"needs_reset", mmio.needs_reset},
  };
}

virtio::MmioState mmio_from_json(const Reader& in) {
  virtio::MmioState mmio;
  mmio.status = in.number<uint32_t>("status");
  mmio.device_features_select = in.number<uint32_t>("device_features_select");
  mmio.driver_features_select = in.number<uint32_t>("driver_features_select");
  mmio.driver_features = in.number<uint64_t>("driver_features");
  mmio.queue_select = in.number<uint32_t>("queue_select");
  mmio.activated = in.boolean("activated");
  mmio.needs_reset = in.boolean("needs_reset");
  return mmio;
}

json queue_to_json(const virtio::QueueState& queue) {
  return {
      {"max_size", queue.max_size},     {"size", queue.size},
      {"ready", queue.ready},           {"desc_table", queue.desc_table},
      {"avail_ring", queue.avail_ring}, {"used_ring", queue.used_ring},
      {"next_avail", queue.next_avail}, {"next_used", queue.next_used},
      {"event_idx", queue.event_idx},
  };
}

virtio::QueueState queue_from_json(const Reader& in) {
  virtio::QueueState queue;
  queue.max_size = in.number<uint16_t>("max_size");
  queue.size = in.number<uint16_t>("size");
  queue.ready = in.boolean("ready");
  queue.desc_table = in.number<uint64_t>("desc_table");
  queue.avail_ring = in.number<uint64_t>("avail_ring");
  queue.used_ring = in.number<uint64_t>("used_ring");
  queue.next_avail = in.number<uint16_t>("next_avail");
  queue.next_used = in.number<uint16_t>("next_used");
  queue.event_idx = in.boolean("event_idx");
  return queue;
}

virtio::ConsoleState console_from(const Reader& in) {
  virtio::ConsoleState state;
  state.pending_output = in.bytes("pending_output", kMaxPendingOutput);
  state.backend_closed = in.boolean("backend_closed");
  state.receive_starved = in.boolean("receive_starved");
  return state;
}

virtio::BlockState block_from(const Reader& in) {
  return {in.number<uint64_t>("requests"), in.number<uint64_t>("errors")};
}

virtio::RngState rng_from(const Reader& in) {
  return {in.number<uint64_t>("bytes_delivered")};
}

virtio::BalloonState balloon_from(const Reader& in) {
  virtio::BalloonState state;
  state.num_pages = in.number<uint32_t>("num_pages");
  state.actual = in.number<uint32_t>("actual");
  state.pages_inflated = in.number<uint64_t>("pages_inflated");
  state.pages_deflated = in.number<uint64_t>("pages_deflated");
  state.bad_requests = in.number<uint64_t>("bad_requests");
  return state;
}

// The device-specific part, checked per kind (and written back in canonical form).
json device_from_json(const std::string& name, const Reader& in) {
  if (name == "virtio-console") return console_state_to_json(console_from(in));
  if (name == "virtio-blk") return block_state_to_json(block_from(in));
  if (name == "virtio-rng") return rng_state_to_json(rng_from(in));
  if (name == "virtio-balloon") return balloon_state_to_json(balloon_from(in));
  fail(in.where(), "unknown device \"" + name + "\"");
}

}  // namespace

json console_state_to_json(const virtio::ConsoleState& state) {
  return {{"pending_output", to_hex(state.pending_output)},
          {"backend_closed", state.backend_closed},
          {"receive_starved", state.receive_starved}};
}

virtio::ConsoleState console_state_from_json(const json& value) {
  return console_from(Reader(value, "virtio-console"));
}

json block_state_to_json(const virtio::BlockState& state) {
  return {{"requests", state.requests}, {"errors", state.errors}};
}

virtio::BlockState block_state_from_json(const json& value) {
  return block_from(Reader(value, "virtio-blk"));
}

json rng_state_to_json(const virtio::RngState& state) {
  return {{"bytes_delivered", state.bytes_delivered}};
}

virtio::RngState rng_state_from_json(const json& value) {
  return rng_from(Reader(value, "virtio-rng"));
}

json balloon_state_to_json(const virtio::BalloonState& state) {
  return {{"num_pages", state.num_pages},
          {"actual", state.actual},
          {"pages_inflated", state.pages_inflated},
          {"pages_deflated", state.pages_deflated},
          {"bad_requests", state.bad_requests}};
}

virtio::BalloonState balloon_state_from_json(const json& value) {
  return balloon_from(Reader(value, "virtio-balloon"));
}

json MachineState::to_json() const {
  json vcpu_list = json::array();
  for (const auto& vcpu : vcpus)
    vcpu_list.push_back(vcpu_to_json(vcpu));
  json devices = json::array();
  for (const auto& device : virtio) {
    json queue_list = json::array();
    for (const auto& queue : device.queues)
      queue_list.push_back(queue_to_json(queue));
    devices.push_back({
        {"name", device.name},
        {"mmio", mmio_to_json(device.mmio)},
        {"queues", std::move(queue_list)},
        {"interrupt_status", device.interrupt_status},
        {"config_generation", device.config_generation},
        {"device", device.device},
    });
  }
  return {
      {"format", kFormat},
      {"cpus", cpus},
      {"max_cpus", max_cpus},
      {"memory_mib", memory_mib},
      {"max_memory_mib", max_memory_mib},
      {"disk_size", disk_size},
      {"has_disk", has_disk},
      {"vcpus", std::move(vcpu_list)},
      {"vm", vm_to_json(vm)},
      {"serial", serial_to_json(serial)},
      {"i8042", i8042_to_json(i8042)},
      {"virtio", std::move(devices)},
  };
}

MachineState MachineState::from_json(const json& input) {
  Reader in(input, "machine");
  if (in.number<uint32_t>("format") != kFormat) {
    fail(in.path("format"), "format " + std::to_string(in.number<uint32_t>("format")) +
                                ", this msb reads " + std::to_string(kFormat));
  }
  MachineState state;
  state.cpus = in.number<uint32_t>("cpus");
  state.max_cpus = in.number<uint32_t>("max_cpus");
  state.memory_mib = in.number<uint64_t>("memory_mib");
  state.max_memory_mib = in.number<uint64_t>("max_memory_mib");
  state.disk_size = in.number<uint64_t>("disk_size");
  state.has_disk = in.boolean("has_disk");
  if (state.cpus == 0 || state.max_cpus < state.cpus || state.max_cpus > 254) {
    fail(in.where(), "invalid vCPU count " + std::to_string(state.cpus) + " of " +
                         std::to_string(state.max_cpus));
  }
  if (state.memory_mib == 0 || state.max_memory_mib < state.memory_mib ||
      state.max_memory_mib > (uint64_t{1} << 30)) {
    fail(in.where(), "invalid memory size");
  }
  const json& vcpus = in.array("vcpus", 254);
  if (vcpus.size() != state.max_cpus) {
    fail(in.path("vcpus"),
         std::to_string(vcpus.size()) + " vCPUs for max_cpus " + std::to_string(state.max_cpus));
  }
  for (size_t i = 0; i < vcpus.size(); ++i)
    state.vcpus.push_back(
        vcpu_from_json(Reader(vcpus[i], in.path("vcpus") + "[" + std::to_string(i) + "]")));
  state.vm = vm_from_json(Reader(in.field("vm"), in.path("vm")));
  state.serial = serial_from_json(Reader(in.field("serial"), in.path("serial")));
  state.i8042 = i8042_from_json(Reader(in.field("i8042"), in.path("i8042")));
  const json& devices = in.array("virtio", kMaxVirtioDevices);
  for (size_t i = 0; i < devices.size(); ++i) {
    Reader device(devices[i], in.path("virtio") + "[" + std::to_string(i) + "]");
    VirtioDeviceState out;
    out.name = device.string("name");
    out.mmio = mmio_from_json(Reader(device.field("mmio"), device.path("mmio")));
    const json& queues = device.array("queues", kMaxQueues);
    for (size_t q = 0; q < queues.size(); ++q) {
      out.queues.push_back(queue_from_json(
          Reader(queues[q], device.path("queues") + "[" + std::to_string(q) + "]")));
    }
    out.interrupt_status = device.number<uint32_t>("interrupt_status");
    out.config_generation = device.number<uint32_t>("config_generation");
    out.device = device_from_json(out.name, Reader(device.field("device"), device.path("device")));
    state.virtio.push_back(std::move(out));
  }
  return state;
}

}  // namespace msb::vmm
