#include "vmm/linux_boot.h"

#include <asm/bootparam.h>
#include <elf.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace msb::vmm::boot {
namespace {

constexpr uint16_t kBootFlag = 0xaa55;
constexpr uint32_t kHeaderMagic = 0x53726448;  // "HdrS"
constexpr size_t kSetupHeaderOffset = 0x1f1;
// Protocol 2.12 added xloadflags, which says whether the kernel has a 64-bit entry point.
constexpr uint16_t kMinProtocol = 0x020c;
constexpr uint32_t kE820Ram = 1;
constexpr uint32_t kE820Reserved = 2;

template <class T>
T read_le(std::span<const std::byte> file, size_t offset) {
  T value{};
  std::memcpy(&value, file.data() + offset, sizeof value);
  return value;
}

std::string mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

void copy_in(const GuestMemory& memory, uint64_t address, std::span<const std::byte> bytes,
             const std::string& what) {
  if (!memory.write(address, bytes)) {
    throw BootError(what + " (" + std::to_string(bytes.size()) + " bytes at " +
                    hex_address(address) + ") does not fit in guest memory");
  }
}

KernelImage load_bzimage(const GuestMemory& memory, std::span<const std::byte> file) {
  KernelImage image;
  image.format = KernelImage::Format::kBzImage;
  image.protocol = read_le<uint16_t>(file, 0x206);
  if (image.protocol < kMinProtocol) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "the kernel uses boot protocol %d.%02d; msb needs 2.12 or newer",
                  image.protocol >> 8, image.protocol & 0xff);
    throw BootError(buf);
  }
  if (!(read_le<uint8_t>(file, 0x211) & LOADED_HIGH)) {
    throw BootError("the kernel is a zImage, not a bzImage: msb boots only bzImages");
  }
  if (!(read_le<uint16_t>(file, 0x236) & XLF_KERNEL_64)) {
    throw BootError("the kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)");
  }
  size_t setup_sects = read_le<uint8_t>(file, kSetupHeaderOffset);
  if (setup_sects == 0) setup_sects = 4;  // as the protocol says for old kernels
  size_t kernel_offset = (setup_sects + 1) * 512;
  if (kernel_offset >= file.size()) throw BootError("the bzImage is truncated: it has no kernel");

  // The header runs from 0x1f1 to the end of the jump at 0x200 plus its offset.
  size_t header_end = 0x202 + read_le<uint8_t>(file, 0x201);
  size_t header_length = std::min(header_end - kSetupHeaderOffset, sizeof(setup_header));
  image.setup_header.assign(file.begin() + kSetupHeaderOffset,
                            file.begin() + kSetupHeaderOffset + header_length);

  std::span<const std::byte> kernel = file.subspan(kernel_offset);
  copy_in(memory, kKernelAddress, kernel, "the kernel");
  uint32_t init_size = read_le<uint32_t>(file, 0x260);
  image.end = kKernelAddress + std::max<uint64_t>(kernel.size(), init_size);
  if (!memory.slice(kKernelAddress, image.end - kKernelAddress)) {
    throw BootError("the kernel needs " + mib(init_size) +
                    " from 1 MiB up to decompress, more than guest memory has");
  }
  image.entry = kKernelAddress + 0x200;  // the 64-bit entry is 0x200 past the 32-bit one
  return image;
}

KernelImage load_elf(const GuestMemory& memory, std::span<const std::byte> file) {
  if (file.size() < sizeof(Elf64_Ehdr)) throw BootError("the ELF kernel is truncated");
  auto ehdr = read_le<Elf64_Ehdr>(file, 0);
  if (ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_ident[EI_DATA] != ELFDATA2LSB ||
      ehdr.e_machine != EM_X86_64) {
    throw BootError("the ELF kernel is not a 64-bit x86-64 executable");
  }
  if (ehdr.e_phentsize != sizeof(Elf64_Phdr) || ehdr.e_phnum == 0 || ehdr.e_phoff > file.size() ||
      uint64_t{ehdr.e_phnum} * sizeof(Elf64_Phdr) > file.size() - ehdr.e_phoff) {
    throw BootError("the ELF kernel's program headers are malformed");
  }
  KernelImage image;
  image.format = KernelImage::Format::kElf;
  bool entry_loaded = false;
  for (size_t i = 0; i < ehdr.e_phnum; ++i) {
    auto phdr = read_le<Elf64_Phdr>(file, ehdr.e_phoff + i * sizeof(Elf64_Phdr));
    if (phdr.p_type != PT_LOAD) continue;
    if (phdr.p_offset > file.size() || phdr.p_filesz > file.size() - phdr.p_offset ||
        phdr.p_filesz > phdr.p_memsz) {
      throw BootError("ELF segment " + std::to_string(i) + " lies outside the file");
    }
    if (phdr.p_paddr < kKernelAddress) {
      throw BootError("ELF segment " + std::to_string(i) +
                      " loads below 1 MiB, where msb keeps the boot structures");
    }
    auto whole = memory.slice(phdr.p_paddr, phdr.p_memsz);
    if (!whole)
      throw BootError("ELF segment " + std::to_string(i) + " does not fit in guest memory");
    std::memcpy(whole->data(), file.data() + phdr.p_offset, phdr.p_filesz);
    std::memset(whole->data() + phdr.p_filesz, 0, phdr.p_memsz - phdr.p_filesz);
    image.end = std::max(image.end, phdr.p_paddr + phdr.p_memsz);
    entry_loaded |= ehdr.e_entry >= phdr.p_paddr && ehdr.e_entry < phdr.p_paddr + phdr.p_memsz;
  }
  if (!entry_loaded) {
    throw BootError(
        "the ELF kernel's entry point is not in a loaded segment (msb needs a "
        "physical entry address, as vmlinux has)");
  }
  image.entry = ehdr.e_entry;
  return image;
}

}  // namespace

std::vector<RamRange> ram_ranges(uint64_t memory_size) {
  std::vector<RamRange> ranges;
  uint64_t low = std::min(memory_size, kMmioGapStart);
  ranges.push_back({0, low});
  if (memory_size > low) ranges.push_back({kMmioGapEnd, memory_size - low});
  return ranges;
}

KernelImage load_kernel(const GuestMemory& memory, std::span<const std::byte> file) {
  if (file.size() >= 0x264 && read_le<uint16_t>(file, 0x1fe) == kBootFlag &&
      read_le<uint32_t>(file, 0x202) == kHeaderMagic) {
    return load_bzimage(memory, file);
  }
  if (file.size() >= 4 && std::memcmp(file.data(), ELFMAG, SELFMAG) == 0) {
    return load_elf(memory, file);
  }
  throw BootError("the kernel is neither a bzImage nor an ELF vmlinux");
}

BootInfo write_boot_params(const GuestMemory& memory, const KernelImage& kernel,
                           const BootConfig& config) {
  if (config.ram.empty() || config.ram[0].start != 0 || config.ram[0].size <= kernel.end) {
    throw BootError("guest memory is too small for the kernel");
  }
  boot_params params{};
  if (kernel.format == KernelImage::Format::kBzImage) {
    std::memcpy(&params.hdr, kernel.setup_header.data(),
                std::min(kernel.setup_header.size(), sizeof params.hdr));
  } else {
    // An ELF kernel has no header of its own; Linux still checks these fields.
    params.hdr.boot_flag = kBootFlag;
    params.hdr.header = kHeaderMagic;
    params.hdr.kernel_alignment = 0x1000000;
  }
  params.hdr.type_of_loader = 0xff;  // "undefined" loader

  // Command line. cmdline_size (protocol 2.06+) excludes the terminating NUL.
  uint64_t limit = kCmdlineMax - 1;
  if (kernel.format == KernelImage::Format::kBzImage && params.hdr.cmdline_size != 0) {
    limit = std::min<uint64_t>(limit, params.hdr.cmdline_size);
  }
  if (config.cmdline.size() > limit) {
    throw BootError("the kernel command line has " + std::to_string(config.cmdline.size()) +
                    " bytes; this kernel accepts at most " + std::to_string(limit));
  }
  std::string cmdline = config.cmdline;
  cmdline.push_back('\0');
  copy_in(memory, kCmdlineAddress, std::as_bytes(std::span(cmdline)), "the command line");
  params.hdr.cmd_line_ptr = static_cast<uint32_t>(kCmdlineAddress);
  params.hdr.cmdline_size = static_cast<uint32_t>(limit);

  // Initrd: as high in low RAM as the kernel reads it, above the kernel, page-aligned.
  BootInfo info;
  info.entry = kernel.entry;
  if (!config.initrd.empty()) {
    uint64_t top = config.ram[0].start + config.ram[0].size;
    if (kernel.format == KernelImage::Format::kBzImage && params.hdr.initrd_addr_max != 0) {
      top = std::min<uint64_t>(top, uint64_t{params.hdr.initrd_addr_max} + 1);
    }
    uint64_t size = config.initrd.size();
    if (size > top || ((top - size) & ~uint64_t{0xfff}) < kernel.end) {
      throw BootError("the initrd of " + mib(size) + " does not fit between the kernel and " +
                      mib(top) + " of low guest memory");
    }
    info.initrd_address = (top - size) & ~uint64_t{0xfff};
    copy_in(memory, info.initrd_address, config.initrd, "the initrd");
    params.hdr.ramdisk_image = static_cast<uint32_t>(info.initrd_address);
    params.hdr.ramdisk_size = static_cast<uint32_t>(size);
    params.ext_ramdisk_image = static_cast<uint32_t>(info.initrd_address >> 32);
    params.ext_ramdisk_size = static_cast<uint32_t>(size >> 32);
  }

  // e820: low RAM minus the EBDA/BIOS hole, then the rest of RAM as given.
  std::vector<boot_e820_entry> map;
  map.push_back({0, kEbdaStart, kE820Ram});
  map.push_back({kEbdaStart, kKernelAddress - kEbdaStart, kE820Reserved});
  map.push_back({kKernelAddress, config.ram[0].size - kKernelAddress, kE820Ram});
  for (size_t i = 1; i < config.ram.size(); ++i) {
    map.push_back({config.ram[i].start, config.ram[i].size, kE820Ram});
  }
  if (map.size() > E820_MAX_ENTRIES_ZEROPAGE) throw BootError("too many guest memory ranges");
  std::copy(map.begin(), map.end(), params.e820_table);
  params.e820_entries = static_cast<uint8_t>(map.size());

  params.acpi_rsdp_addr = config.rsdp_address;  // protocol 2.14+; older kernels scan for it
  if (!memory.write_obj(kZeroPageAddress, params)) {
    throw BootError("the zero page does not fit in guest memory");
  }
  return info;
}

}  // namespace msb::vmm::boot
