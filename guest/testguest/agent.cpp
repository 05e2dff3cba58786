// The test guest's agent: runs at CPL3 (native speed on msb's host), drives the virtio console,
// block and balloon devices by polling after each interrupt, and speaks the agent protocol.
#include "../protocol/agent_protocol.h"
#include "../protocol/pattern.h"
#include "common.h"
#include "random_pool.h"
#include "virtio.h"

namespace testguest {

namespace {

namespace agent = msb::agent;

constexpr uint32_t kDeviceBlock = 2;
constexpr uint32_t kDeviceConsole = 3;
constexpr uint32_t kDeviceRng = 4;
constexpr uint32_t kDeviceBalloon = 5;
constexpr uint64_t kBlkFeatureFlush = 1ull << 9;

constexpr uint32_t kRxBuffers = 16;
constexpr uint32_t kRxBufferSize = 4096;
constexpr uint32_t kTxSlots = 8;
constexpr uint32_t kTxSlotSize = sizeof(agent::FrameHeader) + agent::kMaxPayload;
constexpr uint32_t kBlkChunk = 128 * 1024;
constexpr uint32_t kBlkSegment = 64 * 1024;
// The balloon's page (virtio 1.x §5.5: always 4 KiB), the PFNs one request carries (one page of
// them; msb's device takes up to 4096, Linux sends 256), and what a page holds when it is given
// away (Linux's PAGE_POISON).
constexpr uint64_t kBalloonPage = 4096;
constexpr uint32_t kBalloonBatch = 1024;
constexpr uint8_t kBalloonPoison = 0xaa;

// ---- system calls --------------------------------------------------------------------------

// Sleeps until an interrupt arrives, unless one arrived since g_irq_count was `seen`.
void sys_wait(uint64_t seen) {
  uint64_t rax = 0;
  asm volatile("int3" : "+a"(rax) : "D"(seen) : "memory");
}

// Sleeps until `n` more timer ticks (10 ms each) have passed.
void sleep_ticks(uint64_t n) {
  const uint64_t target = g_ticks + n;
  for (;;) {
    uint64_t seen = g_irq_count;
    if (g_ticks >= target) return;
    sys_wait(seen);
  }
}

[[noreturn]] void sys_power_off() {
  uint64_t rax = 1;
  asm volatile("int3" : "+a"(rax) : : "memory");
  __builtin_unreachable();
}

// ---- state ---------------------------------------------------------------------------------

VirtioDevice g_console;
VirtioDevice g_block;
bool g_have_console;
bool g_have_block;
uint64_t g_block_sectors;
VirtioDevice g_balloon;
bool g_have_balloon;

VirtqMemory g_console_rx_mem;
VirtqMemory g_console_tx_mem;
VirtqMemory g_block_mem;
Virtq g_console_rx;
Virtq g_console_tx;
Virtq g_blockq;
VirtqMemory g_inflate_mem;
VirtqMemory g_deflate_mem;
Virtq g_inflateq;
Virtq g_deflateq;

alignas(4096) uint8_t g_rx_buffers[kRxBuffers][kRxBufferSize];
alignas(4096) uint8_t g_tx_slots[kTxSlots][kTxSlotSize];
bool g_tx_busy[kTxSlots];
alignas(4096) uint8_t g_block_buffer[kBlkChunk];
alignas(4096) uint32_t g_balloon_pfns[kBalloonBatch];

// The balloon's pages are RAM from kFillBase up (below kMappedLimit), taken from the top down:
// page i of the balloon is the i-th 4 KiB page counting down from the top of that RAM. The
// driver holds the first g_balloon_held of them, so every RAM page from the lowest held one up
// is the balloon's, and fill/sum/load stay below it.
MemRegion g_balloon_ranges[64];  // page-aligned [addr, addr + size), highest first
uint32_t g_balloon_range_count;
uint32_t g_balloon_capacity;  // pages
uint32_t g_balloon_held;      // what the device has (and `actual` says)
uint32_t g_balloon_target;    // num_pages as the driver last read it
uint32_t g_balloon_refused;   // the last target over capacity that was logged
bool g_balloon_check;         // a configuration change came: look at num_pages again

// Received bytes not parsed yet: at most one partial frame plus one receive buffer.
alignas(16) uint8_t g_parse[sizeof(agent::FrameHeader) + agent::kMaxPayload + kRxBufferSize];
uint32_t g_parse_len;

// kSetEnv's strings, copied.
char g_env_storage[agent::kMaxPayload];
const char* g_env[4096];
uint32_t g_env_count;

// The running `cat`, if any (every other command finishes inside its kExec).
bool g_cat_running;
uint32_t g_cat_id;
// `load` is `cat` that keeps its input: bytes go into the fill area instead of back out.
bool g_cat_loads;
uint64_t g_load_bytes;    // stored so far, from kFillBase
uint64_t g_load_limit;    // the MIB asked for, in bytes; input past it is dropped
uint64_t g_cat_deadline;  // in ticks; 0: none

uint64_t g_irq_seen;

// Output assembly for echo/env and messages.
char g_text[2 * agent::kMaxPayload + 4096];

// What a kRestore sets (handle_restore). Before the first one: the clock is unknown (0), the name
// is the agent's, the memory is the e820 map's RAM.
RandomPool g_pool;
uint64_t g_wall_clock_ns;     // the host's wall clock at g_wall_clock_ticks; 0: unknown
uint64_t g_wall_clock_ticks;  // g_ticks when the wall clock was set
char g_hostname[256] = "testguest";
uint64_t g_memory_mib;

// The VM's vCPUs by APIC id, in the MADT's order (without a MADT: the CPUs started at boot).
uint32_t g_vm_apic_ids[kMaxCpus];
uint32_t g_vm_cpus;

// ---- small helpers -------------------------------------------------------------------------

void log(const char* text) {
  serial_print(text);
}

bool str_eq(const char* a, const char* b) {
  while (*a != 0 && *a == *b)
    ++a, ++b;
  return *a == *b;
}

// Decimal, no sign, no overflow.
bool parse_u64(const char* s, uint64_t* value) {
  if (*s == 0) return false;
  uint64_t v = 0;
  for (; *s != 0; ++s) {
    if (*s < '0' || *s > '9') return false;
    uint64_t digit = static_cast<uint64_t>(*s - '0');
    if (v > (~0ull - digit) / 10) return false;
    v = v * 10 + digit;
  }
  *value = v;
  return true;
}

// Linux's memparse/"%lli" style: 0x hex, leading 0 octal, else decimal; optional K/M/G suffix.
const char* parse_number(const char* s, uint64_t* value, bool allow_suffix) {
  uint64_t base = 10;
  if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    base = 16;
    s += 2;
  } else if (s[0] == '0' && s[1] >= '0' && s[1] <= '7') {
    base = 8;
  }
  uint64_t v = 0;
  const char* start = s;
  for (;; ++s) {
    uint64_t digit;
    if (*s >= '0' && *s <= '9')
      digit = static_cast<uint64_t>(*s - '0');
    else if (*s >= 'a' && *s <= 'f')
      digit = static_cast<uint64_t>(*s - 'a' + 10);
    else if (*s >= 'A' && *s <= 'F')
      digit = static_cast<uint64_t>(*s - 'A' + 10);
    else
      break;
    if (digit >= base) break;
    v = v * base + digit;
  }
  if (s == start) return nullptr;
  if (allow_suffix) {
    if (*s == 'K' || *s == 'k')
      v <<= 10, ++s;
    else if (*s == 'M' || *s == 'm')
      v <<= 20, ++s;
    else if (*s == 'G' || *s == 'g')
      v <<= 30, ++s;
  }
  *value = v;
  return s;
}

char* append(char* out, const char* end, const char* text) {
  while (*text != 0 && out < end)
    *out++ = *text++;
  return out;
}

char* append_dec(char* out, const char* end, uint64_t value) {
  char digits[21];
  int n = 0;
  do {
    digits[n++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0);
  while (n > 0 && out < end)
    *out++ = digits[--n];
  return out;
}

char* append_hex16(char* out, const char* end, uint64_t value) {
  for (int i = 0; i < 16 && out < end; ++i)
    *out++ = "0123456789abcdef"[(value >> (60 - 4 * i)) & 0xf];
  return out;
}

// ---- interrupts and waiting ----------------------------------------------------------------

// Acks the devices when an interrupt arrived since last time. Call before checking used rings.
void poll_interrupts() {
  uint64_t now = g_irq_count;
  if (now == g_irq_seen) return;
  g_irq_seen = now;
  const uint64_t pending = __atomic_exchange_n(&g_device_irqs, 0, __ATOMIC_SEQ_CST);
  if (g_have_console && (pending >> g_console.gsi) & 1) virtio_ack(g_console);
  if (g_have_block && (pending >> g_block.gsi) & 1) virtio_ack(g_block);
  if (g_have_balloon && (pending >> g_balloon.gsi) & 1 &&
      (virtio_ack(g_balloon) & kInterruptConfig) != 0)
    g_balloon_check = true;
}

// Sleeps until the next interrupt (returns at once if one came after poll_interrupts()).
void wait_for_interrupt() {
  sys_wait(g_irq_seen);
  poll_interrupts();
}

// ---- console transmit ----------------------------------------------------------------------

void reclaim_tx() {
  uint64_t cookie;
  uint32_t len;
  while (virtq_take_used(g_console_tx, &cookie, &len))
    if (cookie < kTxSlots) g_tx_busy[cookie] = false;
}

// Transmit completions interrupt the guest only while it waits for a free slot: otherwise the
// agent reclaims slots as it goes, and each interrupt it avoids saves a wake-up and the register
// accesses (VM exits) of its ack.
void set_tx_interrupts(bool enabled) {
  *reinterpret_cast<volatile uint16_t*>(&g_console_tx.mem->avail.flags) =
      enabled ? 0 : kAvailNoInterrupt;
  full_barrier();
}

bool find_free_tx_slot(uint32_t* slot) {
  for (uint32_t i = 0; i < kTxSlots; ++i) {
    if (!g_tx_busy[i]) {
      *slot = i;
      return true;
    }
  }
  return false;
}

// A free transmit slot, waiting for one if all are in flight.
uint32_t acquire_tx_slot() {
  uint32_t slot;
  for (;;) {
    poll_interrupts();
    reclaim_tx();
    if (find_free_tx_slot(&slot)) return slot;
    // Ask for an interrupt, then look again: a completion may have landed before the device saw
    // the request, and it would not interrupt for that one.
    set_tx_interrupts(true);
    reclaim_tx();
    bool found = find_free_tx_slot(&slot);
    if (!found) wait_for_interrupt();
    set_tx_interrupts(false);
    if (found) return slot;
  }
}

uint8_t* tx_payload(uint32_t slot) {
  return g_tx_slots[slot] + sizeof(agent::FrameHeader);
}

void tx_commit(uint32_t slot, uint16_t type, uint32_t id, uint32_t len) {
  agent::FrameHeader header{len, type, 0, id};
  memcpy(g_tx_slots[slot], &header, sizeof(header));
  g_tx_busy[slot] = true;
  VirtqBuffer buffer{g_tx_slots[slot], static_cast<uint32_t>(sizeof(header) + len), false};
  while (!virtq_add(g_console_tx, &buffer, 1, slot)) {
    set_tx_interrupts(true);
    poll_interrupts();
    reclaim_tx();
    if (g_console_tx.num_free == 0) wait_for_interrupt();
    set_tx_interrupts(false);
  }
}

void send_frame(uint16_t type, uint32_t id, const void* data, uint32_t len) {
  if (!g_have_console) return;
  uint32_t slot = acquire_tx_slot();
  memcpy(tx_payload(slot), data, len);
  tx_commit(slot, type, id, len);
}

// kStdout/kStderr, split into frames of at most kMaxPayload; nothing for empty output.
void write_output(uint16_t type, uint32_t id, const char* data, size_t len) {
  while (len > 0) {
    uint32_t n = len > agent::kMaxPayload ? agent::kMaxPayload : static_cast<uint32_t>(len);
    send_frame(type, id, data, n);
    data += n;
    len -= n;
  }
}

void write_stderr(uint32_t id, const char* text) {
  write_output(agent::kStderr, id, text, str_len(text));
}

void send_exit(uint32_t id, int32_t code, int32_t signal) {
  agent::ExitPayload exit{code, signal};
  send_frame(agent::kExit, id, &exit, sizeof(exit));
}

// "testguest: CMD: MESSAGE\n" on stderr, then exit 2.
void fail_usage(uint32_t id, const char* command, const char* message) {
  char* out = g_text;
  const char* end = g_text + sizeof(g_text) - 1;
  out = append(out, end, "testguest: ");
  out = append(out, end, command);
  out = append(out, end, ": ");
  out = append(out, end, message);
  out = append(out, end, "\n");
  write_output(agent::kStderr, id, g_text, static_cast<size_t>(out - g_text));
  send_exit(id, 2, 0);
}

void print_checksum_and_exit(uint32_t id, uint64_t checksum) {
  char line[17];
  append_hex16(line, line + 16, checksum);
  line[16] = '\n';
  write_output(agent::kStdout, id, line, sizeof(line));
  send_exit(id, 0, 0);
}

// ---- block device --------------------------------------------------------------------------

struct BlockRequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
constexpr uint32_t kBlkIn = 0;
constexpr uint32_t kBlkOut = 1;
constexpr uint32_t kBlkFlush = 4;

BlockRequestHeader g_block_header;
volatile uint8_t g_block_status;

// One request on g_block_buffer; true when the device reports success.
bool block_request(uint32_t type, uint64_t sector, uint32_t bytes) {
  g_block_header = BlockRequestHeader{type, 0, sector};
  g_block_status = 0xff;
  VirtqBuffer chain[2 + kBlkChunk / kBlkSegment];
  uint16_t count = 0;
  chain[count++] = VirtqBuffer{&g_block_header, sizeof(g_block_header), false};
  for (uint32_t offset = 0; offset < bytes; offset += kBlkSegment) {
    uint32_t n = bytes - offset < kBlkSegment ? bytes - offset : kBlkSegment;
    chain[count++] = VirtqBuffer{g_block_buffer + offset, n, type == kBlkIn};
  }
  chain[count++] = VirtqBuffer{const_cast<uint8_t*>(&g_block_status), 1, true};
  if (!virtq_add(g_blockq, chain, count, 1)) return false;
  for (;;) {
    poll_interrupts();
    uint64_t cookie;
    uint32_t len;
    if (virtq_take_used(g_blockq, &cookie, &len)) break;
    wait_for_interrupt();
  }
  return g_block_status == 0;
}

// ---- balloon -------------------------------------------------------------------------------

// The balloon's page `index` (0 .. g_balloon_capacity - 1) as a PFN.
uint32_t balloon_pfn(uint32_t index) {
  uint64_t i = index;
  for (uint32_t r = 0; r < g_balloon_range_count; ++r) {
    const MemRegion& range = g_balloon_ranges[r];
    const uint64_t pages = range.size / kBalloonPage;
    if (i < pages) return static_cast<uint32_t>((range.addr + range.size) / kBalloonPage - 1 - i);
    i -= pages;
  }
  return 0;  // not reached: callers stay below g_balloon_capacity
}

// The lowest address the balloon holds; the top of its RAM when it holds nothing.
uint64_t balloon_floor() {
  if (g_balloon_held == 0) return kMappedLimit;
  return static_cast<uint64_t>(balloon_pfn(g_balloon_held - 1)) * kBalloonPage;
}

// The RAM map's pages from kFillBase up, below kMappedLimit, highest range first.
void balloon_find_pages() {
  g_balloon_range_count = 0;
  g_balloon_capacity = 0;
  for (uint32_t i = 0; i < g_boot_info.ram_count && g_balloon_range_count < 64; ++i) {
    uint64_t start = g_boot_info.ram[i].addr;
    uint64_t end = start + g_boot_info.ram[i].size;
    if (start < kFillBase) start = kFillBase;
    if (end > kMappedLimit) end = kMappedLimit;
    start = (start + kBalloonPage - 1) & ~(kBalloonPage - 1);
    end &= ~(kBalloonPage - 1);
    if (end <= start) continue;
    // Insertion sort, highest first.
    uint32_t at = g_balloon_range_count++;
    while (at > 0 && g_balloon_ranges[at - 1].addr < start) {
      g_balloon_ranges[at] = g_balloon_ranges[at - 1];
      --at;
    }
    g_balloon_ranges[at] = MemRegion{start, end - start};
    g_balloon_capacity += static_cast<uint32_t>((end - start) / kBalloonPage);
  }
}

// One request of `count` PFNs from g_balloon_pfns on `queue`, waited for.
void balloon_request(Virtq& queue, uint32_t count) {
  VirtqBuffer buffer{g_balloon_pfns, count * 4, false};
  // One request at a time: the queue always has room.
  if (!virtq_add(queue, &buffer, 1, 1)) return;
  for (;;) {
    poll_interrupts();
    uint64_t cookie;
    uint32_t len;
    if (virtq_take_used(queue, &cookie, &len)) return;
    wait_for_interrupt();
  }
}

// Brings what the driver holds to the host's target (num_pages), at most kBalloonBatch pages a
// request, re-reading the target after each; `actual` follows every request. Inflating writes
// kBalloonPoison over each page first (as Linux's page poisoning does), so the host's RSS shows
// whether it really frees what it is given. Deferred while `load` fills RAM the balloon may take.
void balloon_adjust() {
  if (!g_have_balloon) return;
  if (g_cat_loads) {
    g_balloon_check = true;
    return;
  }
  g_balloon_check = false;
  for (;;) {
    const uint32_t wanted = virtio_config32(g_balloon, 0);
    g_balloon_target = wanted;
    uint32_t target = wanted;
    if (target > g_balloon_capacity) {
      target = g_balloon_capacity;
      if (g_balloon_refused != wanted) {
        g_balloon_refused = wanted;
        log("testguest: balloon: the host asks for ");
        serial_print_dec(wanted);
        log(" pages; RAM from 32 MiB up has ");
        serial_print_dec(g_balloon_capacity);
        log("\n");
      }
    }
    if (g_balloon_held == target) return;
    if (g_balloon_held < target) {
      const uint32_t n =
          target - g_balloon_held < kBalloonBatch ? target - g_balloon_held : kBalloonBatch;
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t pfn = balloon_pfn(g_balloon_held + i);
        memset(reinterpret_cast<void*>(static_cast<uint64_t>(pfn) * kBalloonPage), kBalloonPoison,
               kBalloonPage);
        g_balloon_pfns[i] = pfn;
      }
      balloon_request(g_inflateq, n);
      g_balloon_held += n;
    } else {
      // The most recently given pages come back first, so the held ones stay the top of RAM.
      const uint32_t n =
          g_balloon_held - target < kBalloonBatch ? g_balloon_held - target : kBalloonBatch;
      for (uint32_t i = 0; i < n; ++i)
        g_balloon_pfns[i] = balloon_pfn(g_balloon_held - n + i);
      balloon_request(g_deflateq, n);
      g_balloon_held -= n;
    }
    virtio_write_config32(g_balloon, 4, g_balloon_held);
  }
}

// ---- commands ------------------------------------------------------------------------------

struct Exec {
  uint32_t id;
  uint32_t argc;
  const char* argv[1024];
  uint32_t envc;
  const char* envp[1024];
  uint32_t timeout_ms;
};
Exec g_exec;

// The RAM range [kFillBase, kFillBase + mib MiB) must be usable RAM below 4 GiB.
bool fill_range_ok(uint64_t mib) {
  if (mib > (kMappedLimit >> 20)) return false;
  uint64_t end = kFillBase + (mib << 20);
  if (end > kMappedLimit) return false;
  uint64_t covered = kFillBase;
  // Regions may be listed in any order and split: extend coverage until nothing grows it.
  for (bool grew = true; grew && covered < end;) {
    grew = false;
    for (uint32_t i = 0; i < g_boot_info.ram_count; ++i) {
      const MemRegion& r = g_boot_info.ram[i];
      if (r.addr <= covered && r.addr + r.size > covered) {
        covered = r.addr + r.size;
        grew = true;
      }
    }
  }
  return covered >= end;
}

// fill_range_ok, and none of it the balloon's; otherwise says why (exit 2) and returns false.
bool fill_area_ok(const char* command, uint64_t mib) {
  if (!fill_range_ok(mib)) {
    fail_usage(g_exec.id, command, "not that much RAM above 32 MiB");
    return false;
  }
  if (kFillBase + (mib << 20) > balloon_floor()) {
    fail_usage(g_exec.id, command, "the balloon holds RAM in that range");
    return false;
  }
  return true;
}

// Parses argv[1] as MiB and, when `with_seed`, argv[2] as the seed.
bool parse_mib_args(const char* command, bool with_seed, uint64_t* mib, uint64_t* seed) {
  uint32_t want = with_seed ? 3 : 2;
  if (g_exec.argc != want || !parse_u64(g_exec.argv[1], mib) ||
      (with_seed && !parse_u64(g_exec.argv[2], seed))) {
    fail_usage(g_exec.id, command,
               with_seed ? "usage: MIB SEED (decimal numbers)" : "usage: MIB (a decimal number)");
    return false;
  }
  return true;
}

void cmd_echo() {
  char* out = g_text;
  const char* end = g_text + sizeof(g_text) - 1;
  for (uint32_t i = 1; i < g_exec.argc; ++i) {
    if (i > 1) out = append(out, end, " ");
    out = append(out, end, g_exec.argv[i]);
  }
  *out++ = '\n';
  write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 0, 0);
}

size_t key_len(const char* kv) {
  size_t n = 0;
  while (kv[n] != 0 && kv[n] != '=')
    ++n;
  return n;
}

bool same_key(const char* a, const char* b) {
  size_t n = key_len(a);
  return n == key_len(b) && memcmp(a, b, n) == 0;
}

void cmd_env() {
  // Sandbox env with the exec's entries overriding same-named ones, then the exec's new ones.
  char* out = g_text;
  const char* end = g_text + sizeof(g_text) - 1;
  auto flush_if_full = [&]() {
    if (out - g_text >= static_cast<ptrdiff_t>(agent::kMaxPayload)) {
      write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
      out = g_text;
    }
  };
  for (uint32_t i = 0; i < g_env_count; ++i) {
    const char* entry = g_env[i];
    for (uint32_t j = 0; j < g_exec.envc; ++j)
      if (same_key(entry, g_exec.envp[j])) entry = g_exec.envp[j];
    out = append(out, end, entry);
    out = append(out, end, "\n");
    flush_if_full();
  }
  for (uint32_t j = 0; j < g_exec.envc; ++j) {
    bool seen = false;
    for (uint32_t i = 0; i < g_env_count && !seen; ++i)
      seen = same_key(g_env[i], g_exec.envp[j]);
    for (uint32_t k = 0; k < j && !seen; ++k)
      seen = same_key(g_exec.envp[k], g_exec.envp[j]);
    if (seen) continue;
    // A later duplicate in the exec's env wins.
    const char* entry = g_exec.envp[j];
    for (uint32_t k = j + 1; k < g_exec.envc; ++k)
      if (same_key(g_exec.envp[k], entry)) entry = g_exec.envp[k];
    out = append(out, end, entry);
    out = append(out, end, "\n");
    flush_if_full();
  }
  write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 0, 0);
}

void cmd_number(uint64_t value) {
  char* out = append_dec(g_text, g_text + 32, value);
  *out++ = '\n';
  write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 0, 0);
}

void cmd_fill_or_sum(bool fill) {
  const char* name = fill ? "fill" : "sum";
  uint64_t mib = 0, seed = 0;
  if (!parse_mib_args(name, fill, &mib, &seed)) return;
  if (!fill_area_ok(name, mib)) return;
  volatile uint64_t* words = reinterpret_cast<volatile uint64_t*>(kFillBase);
  uint64_t count = mib << 17;
  uint64_t checksum = msb::pattern::kChecksumInit;
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t word;
    if (fill) {
      word = msb::pattern::pattern_word(seed, i);
      words[i] = word;
    } else {
      word = words[i];
    }
    checksum = msb::pattern::checksum_update(checksum, word);
  }
  print_checksum_and_exit(g_exec.id, checksum);
}

void cmd_disk(bool write) {
  const char* name = write ? "disk-write" : "disk-read";
  uint64_t mib = 0, seed = 0;
  if (!parse_mib_args(name, write, &mib, &seed)) return;
  if (!g_have_block) {
    fail_usage(g_exec.id, name, "no block device");
    return;
  }
  if (mib > (g_block_sectors >> 11)) {
    fail_usage(g_exec.id, name, "the disk is too small");
    return;
  }
  uint64_t checksum = msb::pattern::kChecksumInit;
  uint64_t total = mib << 20;
  uint64_t word_index = 0;
  for (uint64_t offset = 0; offset < total; offset += kBlkChunk) {
    uint32_t bytes = static_cast<uint32_t>(total - offset < kBlkChunk ? total - offset : kBlkChunk);
    uint64_t* words = reinterpret_cast<uint64_t*>(g_block_buffer);
    if (write) {
      for (uint32_t i = 0; i < bytes / 8; ++i) {
        words[i] = msb::pattern::pattern_word(seed, word_index + i);
        checksum = msb::pattern::checksum_update(checksum, words[i]);
      }
    }
    if (!block_request(write ? kBlkOut : kBlkIn, offset >> 9, bytes)) {
      fail_usage(g_exec.id, name, "I/O error");
      return;
    }
    if (!write) {
      for (uint32_t i = 0; i < bytes / 8; ++i)
        checksum = msb::pattern::checksum_update(checksum, words[i]);
    }
    word_index += bytes / 8;
  }
  if (write && (g_block.features & kBlkFeatureFlush) && !block_request(kBlkFlush, 0, 0)) {
    fail_usage(g_exec.id, name, "flush failed");
    return;
  }
  print_checksum_and_exit(g_exec.id, checksum);
}

void cmd_out() {
  uint64_t mib = 0, seed = 0;
  if (!parse_mib_args("out", true, &mib, &seed)) return;
  if (mib > 1024 * 1024) {
    fail_usage(g_exec.id, "out", "at most 1048576 MiB");
    return;
  }
  uint64_t total_words = mib << 17;
  constexpr uint32_t kWordsPerFrame = agent::kMaxPayload / 8;
  for (uint64_t index = 0; index < total_words; index += kWordsPerFrame) {
    uint32_t slot = acquire_tx_slot();
    uint64_t* words = reinterpret_cast<uint64_t*>(tx_payload(slot));
    uint32_t n = total_words - index < kWordsPerFrame ? static_cast<uint32_t>(total_words - index)
                                                      : kWordsPerFrame;
    for (uint32_t i = 0; i < n; ++i)
      words[i] = msb::pattern::pattern_word(seed, index + i);
    tx_commit(slot, agent::kStdout, g_exec.id, n * 8);
  }
  send_exit(g_exec.id, 0, 0);
}

void cmd_exit() {
  uint64_t code = 0;
  if (g_exec.argc != 2 || !parse_u64(g_exec.argv[1], &code) || code > 255) {
    fail_usage(g_exec.id, "exit", "usage: exit N (0-255)");
    return;
  }
  send_exit(g_exec.id, static_cast<int32_t>(code), 0);
}

void cmd_text_line(const char* text) {
  char* out = append(g_text, g_text + sizeof(g_text) - 1, text);
  *out++ = '\n';
  write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 0, 0);
}

// 16 bytes from the pool as 32 hex digits.
void cmd_random() {
  char line[33];
  append_hex16(line, line + 16, pool_next(g_pool));
  append_hex16(line + 16, line + 32, pool_next(g_pool));
  line[32] = '\n';
  write_output(agent::kStdout, g_exec.id, line, sizeof(line));
  send_exit(g_exec.id, 0, 0);
}

// Unix time in whole seconds: the last kRestore's wall clock plus the ticks since; 0 before any.
uint64_t clock_seconds() {
  if (g_wall_clock_ns == 0) return 0;
  constexpr uint64_t kNsPerTick = 1000000000ull / kTimerHz;
  return (g_wall_clock_ns + (g_ticks - g_wall_clock_ticks) * kNsPerTick) / 1000000000ull;
}

void cmd_cat() {
  g_cat_running = true;
  g_cat_id = g_exec.id;
  g_cat_deadline = 0;
  if (g_exec.timeout_ms != 0)
    g_cat_deadline = g_ticks + (static_cast<uint64_t>(g_exec.timeout_ms) * kTimerHz + 999) / 1000;
}

void cmd_load() {
  uint64_t mib = 0;
  if (!parse_mib_args("load", false, &mib, nullptr)) return;
  if (!fill_area_ok("load", mib)) return;
  cmd_cat();
  g_cat_loads = true;
  g_load_bytes = 0;
  g_load_limit = mib << 20;
}

// The end of `load`'s input: the checksum of the words it stored (a last partial word counts with
// the bytes that were there before).
void finish_load() {
  g_cat_loads = false;
  volatile uint64_t* words = reinterpret_cast<volatile uint64_t*>(kFillBase);
  uint64_t checksum = msb::pattern::kChecksumInit;
  for (uint64_t i = 0; i < (g_load_bytes + 7) / 8; ++i)
    checksum = msb::pattern::checksum_update(checksum, words[i]);
  print_checksum_and_exit(g_cat_id, checksum);
}

// `balloon`: the pages the driver holds and the target it last read ("HELD TARGET", 4 KiB pages).
void cmd_balloon() {
  if (!g_have_balloon) {
    fail_usage(g_exec.id, "balloon", "no balloon device");
    return;
  }
  char* out = append_dec(g_text, g_text + 32, g_balloon_held);
  *out++ = ' ';
  out = append_dec(out, g_text + 64, g_balloon_target);
  *out++ = '\n';
  write_output(agent::kStdout, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 0, 0);
}

void run_exec() {
  const char* command = g_exec.argv[0];
  if (str_eq(command, "echo")) return cmd_echo();
  if (str_eq(command, "env")) return cmd_env();
  if (str_eq(command, "cpus")) return cmd_number(g_cpus_online);
  if (str_eq(command, "ticks")) return cmd_number(g_ticks);
  if (str_eq(command, "mem")) return cmd_number(g_memory_mib);
  if (str_eq(command, "balloon")) return cmd_balloon();
  if (str_eq(command, "hostname")) return cmd_text_line(g_hostname);
  if (str_eq(command, "clock")) return cmd_number(clock_seconds());
  if (str_eq(command, "random")) return cmd_random();
  if (str_eq(command, "interrupts")) return cmd_number(g_irq_count - g_ticks);
  if (str_eq(command, "fill")) return cmd_fill_or_sum(true);
  if (str_eq(command, "sum")) return cmd_fill_or_sum(false);
  if (str_eq(command, "disk-write")) return cmd_disk(true);
  if (str_eq(command, "disk-read")) return cmd_disk(false);
  if (str_eq(command, "out")) return cmd_out();
  if (str_eq(command, "cat")) return cmd_cat();
  if (str_eq(command, "load")) return cmd_load();
  if (str_eq(command, "exit")) return cmd_exit();
  char* out = g_text;
  const char* end = g_text + sizeof(g_text) - 1;
  out = append(out, end, "testguest: ");
  out = append(out, end, command);
  out = append(out, end, ": command not found\n");
  write_output(agent::kStderr, g_exec.id, g_text, static_cast<size_t>(out - g_text));
  send_exit(g_exec.id, 127, 0);
}

// ---- frames --------------------------------------------------------------------------------

// Reads `count` NUL-terminated strings from [*p, end); false when one is unterminated.
bool take_strings(const char** p, const char* end, uint32_t count, const char** out) {
  for (uint32_t i = 0; i < count; ++i) {
    const char* s = *p;
    const char* q = s;
    while (q < end && *q != 0)
      ++q;
    if (q == end) return false;
    out[i] = s;
    *p = q + 1;
  }
  return true;
}

void handle_exec(uint32_t id, const uint8_t* payload, uint32_t len) {
  if (g_cat_running) {
    write_stderr(id, "testguest: busy: one command at a time\n");
    send_exit(id, 126, 0);
    return;
  }
  agent::ExecPayload exec;
  const char* end = reinterpret_cast<const char*>(payload + len);
  const char* p = reinterpret_cast<const char*>(payload + sizeof(exec));
  if (len < sizeof(exec)) {
    write_stderr(id, "testguest: malformed exec frame\n");
    send_exit(id, 126, 0);
    return;
  }
  memcpy(&exec, payload, sizeof(exec));
  const char* cwd;
  const char* user = "root";
  if (exec.argc < 1 || exec.argc > 1024 || exec.envc > 1024 ||
      (exec.flags & ~uint32_t{agent::kExecFlagUser}) != 0 ||
      !take_strings(&p, end, exec.argc, g_exec.argv) ||
      !take_strings(&p, end, exec.envc, g_exec.envp) || !take_strings(&p, end, 1, &cwd) ||
      ((exec.flags & agent::kExecFlagUser) && !take_strings(&p, end, 1, &user))) {
    write_stderr(id, "testguest: malformed exec frame\n");
    send_exit(id, 126, 0);
    return;
  }
  // The test guest has one context: root's (an image's default user may name it).
  if (!str_eq(user, "root") && !str_eq(user, "0") && !str_eq(user, "root:root") &&
      !str_eq(user, "0:0")) {
    write_stderr(id, "testguest: cannot run as another user than root\n");
    send_exit(id, 126, 0);
    return;
  }
  g_exec.id = id;
  g_exec.argc = exec.argc;
  g_exec.envc = exec.envc;
  g_exec.timeout_ms = exec.timeout_ms;
  run_exec();
}

void handle_set_env(const uint8_t* payload, uint32_t len) {
  uint32_t count;
  if (len < sizeof(count)) return;
  memcpy(&count, payload, sizeof(count));
  if (count > sizeof(g_env) / sizeof(g_env[0])) return;
  memcpy(g_env_storage, payload + 4, len - 4);
  const char* p = g_env_storage;
  if (!take_strings(&p, g_env_storage + (len - 4), count, g_env)) {
    log("testguest: error: malformed kSetEnv frame ignored\n");
    g_env_count = 0;
    return;
  }
  g_env_count = count;
}

// ---- kRestore: entropy, clock, name, memory, vCPUs -----------------------------------------

uint64_t rdtsc() {
  uint32_t low, high;
  asm volatile("rdtsc" : "=a"(low), "=d"(high));
  return low | static_cast<uint64_t>(high) << 32;
}

bool cpu_has_rdrand() {
  uint32_t eax = 1, ebx, ecx = 0, edx;
  asm volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
  return (ecx >> 30) & 1;
}

bool rdrand64(uint64_t* value) {
  for (int attempt = 0; attempt < 10; ++attempt) {
    uint8_t ok;
    asm volatile("rdrand %0; setc %1" : "=r"(*value), "=qm"(ok) : : "cc");
    if (ok) return true;
  }
  return false;
}

// Boot randomness: RDRAND where CPUID has it, and the TSC (which differs from boot to boot).
void seed_pool() {
  uint64_t words[8];
  uint32_t count = 0;
  words[count++] = rdtsc();
  if (cpu_has_rdrand()) {
    for (int i = 0; i < 4; ++i)
      if (rdrand64(&words[count])) ++count;
  }
  words[count++] = g_ticks;
  words[count++] = rdtsc();
  pool_absorb(g_pool, words, count);
}

// RAM in the e820 map (or PVH memory map), rounded to the nearest MiB: msb's --memory, whose map
// leaves out only the 385 KiB from the EBDA to 1 MiB.
uint64_t boot_memory_mib() {
  uint64_t bytes = 0;
  for (uint32_t i = 0; i < g_boot_info.ram_count; ++i)
    bytes += g_boot_info.ram[i].size;
  return (bytes + (1ull << 19)) >> 20;
}

uint32_t read_u32(const uint8_t* p) {
  uint32_t v;
  memcpy(&v, p, sizeof(v));
  return v;
}
uint64_t read_u64(const uint8_t* p) {
  uint64_t v;
  memcpy(&v, p, sizeof(v));
  return v;
}

// [addr, addr + len) in the identity map, or null.
const uint8_t* phys(uint64_t addr, uint64_t len) {
  if (addr == 0 || addr >= kMappedLimit || len > kMappedLimit - addr) return nullptr;
  return reinterpret_cast<const uint8_t*>(addr);
}

bool acpi_sum_ok(const uint8_t* p, uint32_t len) {
  uint8_t sum = 0;
  for (uint32_t i = 0; i < len; ++i)
    sum = static_cast<uint8_t>(sum + p[i]);
  return sum == 0;
}

// A whole ACPI table with signature `sig` at `addr`, checked; its length in *len.
const uint8_t* acpi_table(uint64_t addr, const char* sig, uint32_t* len) {
  const uint8_t* header = phys(addr, 36);
  if (header == nullptr || memcmp(header, sig, 4) != 0) return nullptr;
  uint32_t n = read_u32(header + 4);
  if (n < 36 || n > (1u << 20) || phys(addr, n) == nullptr || !acpi_sum_ok(header, n))
    return nullptr;
  *len = n;
  return header;
}

const uint8_t* find_rsdp() {
  auto valid = [](uint64_t addr) -> const uint8_t* {
    const uint8_t* p = phys(addr, 36);
    return p != nullptr && memcmp(p, "RSD PTR ", 8) == 0 && acpi_sum_ok(p, 20) ? p : nullptr;
  };
  if (const uint8_t* p = valid(g_boot_info.rsdp)) return p;
  for (uint64_t addr = 0xe0000; addr < 0x100000; addr += 16)  // where PC firmware puts it
    if (const uint8_t* p = valid(addr)) return p;
  return nullptr;
}

const uint8_t* find_madt(uint32_t* len) {
  const uint8_t* rsdp = find_rsdp();
  if (rsdp == nullptr) return nullptr;
  uint32_t root_len = 0;
  const uint8_t* root = nullptr;
  uint32_t entry_size = 8;
  if (rsdp[15] >= 2) root = acpi_table(read_u64(rsdp + 24), "XSDT", &root_len);
  if (root == nullptr) {
    root = acpi_table(read_u32(rsdp + 16), "RSDT", &root_len);
    entry_size = 4;
  }
  if (root == nullptr) return nullptr;
  for (uint32_t offset = 36; offset + entry_size <= root_len; offset += entry_size) {
    uint64_t addr = entry_size == 8 ? read_u64(root + offset) : read_u32(root + offset);
    if (const uint8_t* madt = acpi_table(addr, "APIC", len)) return madt;
  }
  return nullptr;
}

void add_vm_cpu(uint32_t apic_id) {
  if (apic_id >= kMaxCpus) {
    log("testguest: error: a vCPU with APIC id ");
    serial_print_dec(apic_id);
    log(" is beyond this guest's ids; not used\n");
    return;
  }
  for (uint32_t i = 0; i < g_vm_cpus; ++i)
    if (g_vm_apic_ids[i] == apic_id) return;
  g_vm_apic_ids[g_vm_cpus++] = apic_id;
}

// The VM's vCPUs: the MADT's processor entries (Local APIC and x2APIC, enabled or online
// capable). Without a MADT (QEMU's microvm with acpi=off) the guest knows only the CPUs it
// started at boot (msb.cpus), and those are its ceiling.
void find_vm_cpus() {
  uint32_t len = 0;
  const uint8_t* madt = find_madt(&len);
  add_vm_cpu(g_bsp_apic_id);
  if (madt == nullptr) {
    for (uint32_t id = 0; id < kMaxCpus; ++id)
      if (g_cpu_state[id] == kCpuOnline) add_vm_cpu(id);
    return;
  }
  for (uint32_t offset = 44; offset + 2 <= len;) {
    uint8_t type = madt[offset];
    uint8_t size = madt[offset + 1];
    if (size < 2 || offset + size > len) break;
    if (type == 0 && size >= 8 && (read_u32(madt + offset + 4) & 3) != 0)
      add_vm_cpu(madt[offset + 3]);
    else if (type == 9 && size >= 16 && (read_u32(madt + offset + 8) & 3) != 0)
      add_vm_cpu(read_u32(madt + offset + 4));
    offset += size;
  }
}

// Waits up to a second for `apic_id`'s state to become `state`: a short spin first (an AP reacts
// within microseconds to tens of them), then in timer ticks.
bool wait_cpu_state(uint32_t apic_id, uint32_t state, bool resend_startup) {
  for (uint32_t spin = 0; spin < 100000; ++spin) {
    if (g_cpu_state[apic_id] == state) return true;
    asm volatile("pause" ::: "memory");
  }
  for (uint32_t tick = 0; tick < 100; ++tick) {
    if (g_cpu_state[apic_id] == state) return true;
    if (resend_startup && tick == 2)  // the second SIPI, if the first was lost
      send_ipi(apic_id, kIpiStartup | (kTrampolineAddr >> 12));
    sleep_ticks(1);
  }
  return g_cpu_state[apic_id] == state;
}

// INIT-SIPI-SIPI, as the kernel does at boot: works for an AP never started and for one that
// parked itself offline (INIT takes it out of its `cli; hlt`).
bool start_ap(uint32_t apic_id) {
  g_cpu_offline_request[apic_id] = 0;
  ap_stack_top = reinterpret_cast<uint64_t>(g_ap_stacks[apic_id] + sizeof(g_ap_stacks[apic_id]));
  full_barrier();
  send_ipi(apic_id, kIpiInit);
  sleep_ticks(1);
  send_ipi(apic_id, kIpiStartup | (kTrampolineAddr >> 12));
  return wait_cpu_state(apic_id, kCpuOnline, true);
}

bool stop_ap(uint32_t apic_id) {
  g_cpu_offline_request[apic_id] = 1;
  full_barrier();
  send_ipi(apic_id, kIpiFixed | kWakeVector);
  return wait_cpu_state(apic_id, kCpuOffline, false);
}

void log_cpu_failure(uint32_t apic_id, const char* what) {
  log("testguest: error: vCPU with APIC id ");
  serial_print_dec(apic_id);
  log(what);
}

// Brings the online vCPUs to `wanted`, clamped to 1 .. the VM's vCPUs: starts the first APs of
// the VM's list that are not online, or parks the last online ones. vCPU 0 (the BSP) stays.
void set_online_cpus(uint32_t wanted) {
  uint32_t target = wanted < 1 ? 1 : wanted > g_vm_cpus ? g_vm_cpus : wanted;
  if (target != wanted) {
    log("testguest: kRestore asks for ");
    serial_print_dec(wanted);
    log(" vCPUs; this VM has 1 to ");
    serial_print_dec(g_vm_cpus);
    log(": clamped to ");
    serial_print_dec(target);
    log("\n");
  }
  if (g_cpus_online < target && !g_aps_startable) {
    log("testguest: error: CPUID shows no long mode: not starting APs\n");
    target = g_cpus_online;
  }
  for (uint32_t i = 0; i < g_vm_cpus && g_cpus_online < target; ++i) {
    uint32_t id = g_vm_apic_ids[i];
    if (id == g_bsp_apic_id || g_cpu_state[id] == kCpuOnline) continue;
    if (!start_ap(id)) log_cpu_failure(id, " did not start\n");
  }
  for (uint32_t i = g_vm_cpus; i-- > 0 && g_cpus_online > target;) {
    uint32_t id = g_vm_apic_ids[i];
    if (id == g_bsp_apic_id || g_cpu_state[id] != kCpuOnline) continue;
    if (!stop_ap(id)) log_cpu_failure(id, " did not go offline\n");
  }
}

void send_ready() {
  struct {
    agent::ReadyPayload ready;
    char name[10];
  } ready{{agent::kProtocolVersion, 1}, "testguest"};
  send_frame(agent::kReady, 0, &ready, sizeof(ready));
}

// kRestore (agent_protocol.h): applied in full, then kReady. A frame too short for its payload
// and a name is ignored, like other malformed frames.
void handle_restore(const uint8_t* payload, uint32_t len) {
  agent::RestorePayload restore;
  const char* name = reinterpret_cast<const char*>(payload + sizeof(restore));
  const char* end = reinterpret_cast<const char*>(payload + len);
  const char* name_end = name;
  while (name_end < end && *name_end != 0)
    ++name_end;
  if (len < sizeof(restore) + 1 || name_end == end) {
    log("testguest: error: malformed kRestore frame ignored\n");
    return;
  }
  memcpy(&restore, payload, sizeof(restore));

  uint64_t words[agent::kRestoreEntropyBytes / 8 + 1];
  memcpy(words, restore.entropy, agent::kRestoreEntropyBytes);
  words[agent::kRestoreEntropyBytes / 8] = rdtsc();
  pool_absorb(g_pool, words, agent::kRestoreEntropyBytes / 8 + 1);

  g_wall_clock_ns = restore.wall_clock_ns;
  g_wall_clock_ticks = g_ticks;

  size_t name_len = static_cast<size_t>(name_end - name);
  if (name_len >= sizeof(g_hostname)) {
    log("testguest: kRestore's name is longer than 255 bytes: cut\n");
    name_len = sizeof(g_hostname) - 1;
  }
  memcpy(g_hostname, name, name_len);
  g_hostname[name_len] = 0;

  g_memory_mib = restore.memory_mib;
  set_online_cpus(restore.cpus);
  // The host set the balloon's target (from the grant) before kRestore: like Linux's agent, the
  // test guest answers once the balloon holds it.
  balloon_adjust();

  log("testguest: restored as ");
  log(g_hostname);
  log(": ");
  serial_print_dec(g_cpus_online);
  log(" of ");
  serial_print_dec(g_vm_cpus);
  log(" vCPUs online, ");
  serial_print_dec(g_memory_mib);
  log(" MiB, balloon ");
  serial_print_dec(g_balloon_held);
  log(" pages\n");
  send_ready();
}

void handle_frame(const agent::FrameHeader& header, const uint8_t* payload) {
  switch (header.type) {
    case agent::kExec:
      handle_exec(header.id, payload, header.length);
      break;
    case agent::kStdin:
      if (g_cat_running && header.id == g_cat_id) {
        if (header.length == 0) {
          g_cat_running = false;
          if (g_cat_loads) {
            finish_load();
          } else {
            send_exit(g_cat_id, 0, 0);
          }
        } else if (g_cat_loads) {
          uint64_t room = g_load_limit - g_load_bytes;
          uint64_t n = header.length < room ? header.length : room;
          memcpy(reinterpret_cast<uint8_t*>(kFillBase) + g_load_bytes, payload, n);
          g_load_bytes += n;
        } else {
          send_frame(agent::kStdout, g_cat_id, payload, header.length);
        }
      }
      break;
    case agent::kSignal:
      if (g_cat_running && header.id == g_cat_id && header.length >= 4) {
        int32_t signal;
        memcpy(&signal, payload, sizeof(signal));
        g_cat_running = false;
        g_cat_loads = false;
        send_exit(g_cat_id, -1, signal);
      }
      break;
    case agent::kSetEnv:
      handle_set_env(payload, header.length);
      break;
    case agent::kRestore:
      handle_restore(payload, header.length);
      break;
    case agent::kPowerOff:
      log("testguest: power off\n");
      sys_power_off();
    default:
      break;  // unknown: skipped by its length
  }
}

// Parses every complete frame in g_parse and keeps the remainder.
void parse_frames() {
  uint32_t pos = 0;
  while (g_parse_len - pos >= sizeof(agent::FrameHeader)) {
    agent::FrameHeader header;
    memcpy(&header, g_parse + pos, sizeof(header));
    if (header.length > agent::kMaxPayload) {
      log("testguest: error: frame with a bad length skipped\n");
      pos += sizeof(header);
      continue;
    }
    if (g_parse_len - pos - sizeof(header) < header.length) break;
    handle_frame(header, g_parse + pos + sizeof(header));
    pos += static_cast<uint32_t>(sizeof(header)) + header.length;
  }
  if (pos != 0) {
    memmove(g_parse, g_parse + pos, g_parse_len - pos);
    g_parse_len -= pos;
  }
}

void post_rx(uint32_t index) {
  VirtqBuffer buffer{g_rx_buffers[index], kRxBufferSize, true};
  virtq_add(g_console_rx, &buffer, 1, index);
}

// Takes received buffers, parses them, reposts them. True when anything arrived.
bool process_rx() {
  bool any = false;
  uint64_t cookie;
  uint32_t len;
  while (virtq_take_used(g_console_rx, &cookie, &len)) {
    any = true;
    if (cookie >= kRxBuffers) continue;
    if (len > kRxBufferSize) len = kRxBufferSize;
    memcpy(g_parse + g_parse_len, g_rx_buffers[cookie], len);
    g_parse_len += len;
    post_rx(static_cast<uint32_t>(cookie));
    parse_frames();
  }
  return any;
}

// ---- setup ---------------------------------------------------------------------------------

void route_gsi(uint32_t gsi) {
  uint64_t base = kIoapicBase;
  uint32_t pin = gsi;
  if (gsi >= 24) {
    base = kIoapic2Base;
    pin = gsi - 24;
  }
  if (pin >= 24) return;
  // Edge triggered, active high, fixed delivery to the BSP.
  mmio_write32(base, 0x10 + 2 * pin + 1);
  mmio_write32(base + 0x10, g_bsp_apic_id << 24);
  mmio_write32(base, 0x10 + 2 * pin);
  mmio_write32(base + 0x10, kDeviceVectorBase + gsi);
}

void setup_console(VirtioDevice& device) {
  if (!virtio_init(device, 0)) return;  // no MULTIPORT: port 0 on queues 0 and 1
  if (!virtio_queue_init(device, g_console_rx, 0, &g_console_rx_mem) ||
      !virtio_queue_init(device, g_console_tx, 1, &g_console_tx_mem))
    return;
  virtio_driver_ok(device);
  g_console = device;
  g_have_console = true;
  set_tx_interrupts(false);
  for (uint32_t i = 0; i < kRxBuffers && i + 1 < g_console_rx.size; ++i)
    post_rx(i);
}

void setup_block(VirtioDevice& device) {
  if (!virtio_init(device, kBlkFeatureFlush)) return;
  if (!virtio_queue_init(device, g_blockq, 0, &g_block_mem)) return;
  if (g_blockq.size < 4) {
    log("testguest: error: block queue too small\n");
    return;
  }
  g_block_sectors = virtio_config32(device, 0) | static_cast<uint64_t>(virtio_config32(device, 4))
                                                     << 32;
  virtio_driver_ok(device);
  g_block = device;
  g_have_block = true;
}

void setup_balloon(VirtioDevice& device) {
  if (!virtio_init(device, 0)) return;  // VERSION_1 only: no MUST_TELL_HOST, no stats
  if (!virtio_queue_init(device, g_inflateq, 0, &g_inflate_mem) ||
      !virtio_queue_init(device, g_deflateq, 1, &g_deflate_mem))
    return;
  virtio_driver_ok(device);
  g_balloon = device;
  g_have_balloon = true;
  balloon_find_pages();
  g_balloon_check = true;  // the host may have set a target before the driver came
}

// Every `virtio_mmio.device=<size>@<addr>:<gsi>` on the command line, in order.
void probe_devices() {
  const char* s = g_boot_info.cmdline;
  const char key[] = "virtio_mmio.device=";
  uint64_t seen[32];
  uint32_t seen_count = 0;
  for (uint32_t i = 0; s[i] != 0; ++i) {
    if ((i != 0 && s[i - 1] != ' ') || memcmp(s + i, key, sizeof(key) - 1) != 0) continue;
    uint64_t size = 0, addr = 0, gsi = 0;
    const char* p = parse_number(s + i + sizeof(key) - 1, &size, true);
    if (p != nullptr && *p == '@')
      p = parse_number(p + 1, &addr, false);
    else
      p = nullptr;
    if (p != nullptr && *p == ':')
      p = parse_number(p + 1, &gsi, false);
    else
      p = nullptr;
    if (p == nullptr || size < 0x100 || addr == 0 || addr >= kMappedLimit || gsi >= 48) {
      log("testguest: error: bad virtio_mmio.device= argument ignored\n");
      continue;
    }
    bool duplicate = false;
    for (uint32_t k = 0; k < seen_count; ++k)
      duplicate |= seen[k] == addr;
    if (duplicate || seen_count == 32) continue;
    seen[seen_count++] = addr;
    if (mmio_read32(addr) != 0x74726976) continue;
    VirtioDevice device{addr, static_cast<uint32_t>(gsi), mmio_read32(addr + 8), 0};
    if (device.device_id == kDeviceConsole && !g_have_console) {
      route_gsi(device.gsi);
      setup_console(device);
    } else if (device.device_id == kDeviceBlock && !g_have_block) {
      route_gsi(device.gsi);
      setup_block(device);
    } else if (device.device_id == kDeviceBalloon && !g_have_balloon) {
      route_gsi(device.gsi);
      setup_balloon(device);
    } else if (device.device_id == kDeviceRng) {
      // Not used; noted so the boot log shows it was found.
    }
  }
}

void print_boot_line() {
  serial_print("testguest: ");
  serial_print_dec(g_cpus_online);
  serial_print(g_cpus_online == 1 ? " vCPU" : " vCPUs");
  if (g_vm_cpus != g_cpus_online) {
    serial_print(" of ");
    serial_print_dec(g_vm_cpus);
  }
  serial_print(", ");
  serial_print_dec(g_memory_mib);
  serial_print(" MiB, virtio");
  if (g_have_console) {
    serial_print(" console@");
    serial_print_hex(g_console.regs);
  }
  if (g_have_block) {
    serial_print(" block@");
    serial_print_hex(g_block.regs);
    serial_print(" (");
    serial_print_dec(g_block_sectors >> 11);
    serial_print(" MiB)");
  }
  if (g_have_balloon) {
    serial_print(" balloon@");
    serial_print_hex(g_balloon.regs);
  }
  serial_print(g_boot_info.kind == BootKind::kPvh ? ", PVH boot\n" : ", Linux boot\n");
}

}  // namespace

extern "C" [[noreturn]] void agent_main() {
  serial_print("testguest: cmdline: ");
  serial_print(g_boot_info.cmdline);
  serial_print("\n");
  seed_pool();
  g_memory_mib = boot_memory_mib();
  find_vm_cpus();
  probe_devices();
  print_boot_line();
  if (!g_have_console) {
    log("testguest: error: no virtio console; powering off\n");
    sys_power_off();
  }
  // Ack every device once: an interrupt may predate the IOAPIC routing.
  g_irq_seen = g_irq_count - 1;
  __atomic_fetch_or(&g_device_irqs, ~uint64_t{0}, __ATOMIC_SEQ_CST);
  poll_interrupts();
  balloon_adjust();
  send_ready();

  for (;;) {
    poll_interrupts();
    bool progress = process_rx();
    if (g_balloon_check && !g_cat_loads) {
      balloon_adjust();
      progress = true;
    }
    reclaim_tx();
    if (g_cat_running && g_cat_deadline != 0 && g_ticks >= g_cat_deadline) {
      g_cat_running = false;
      g_cat_loads = false;
      send_exit(g_cat_id, -1, 9);
      progress = true;
    }
    if (!progress) sys_wait(g_irq_seen);
  }
}

}  // namespace testguest
