// Unit tier: the Linux boot protocol (vmm/linux_boot.h) on synthetic kernels in fake guest memory.
#include <asm/bootparam.h>
#include <elf.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "vmm/linux_boot.h"

using namespace msb::vmm;
using namespace msb::vmm::boot;

namespace {

struct FakeGuest {
  explicit FakeGuest(uint64_t size) : ram(size) { memory.add_region(0, ram); }
  std::vector<std::byte> ram;
  GuestMemory memory;
};

template <class T>
void put(std::vector<std::byte>& file, size_t offset, T value) {
  std::memcpy(file.data() + offset, &value, sizeof value);
}

// A bzImage as the kernel's build lays it out: setup sectors with the header at 0x1f1, then the
// protected-mode kernel.
std::vector<std::byte> make_bzimage(size_t kernel_size, uint16_t protocol = 0x020f,
                                    uint16_t xloadflags = XLF_KERNEL_64, uint32_t init_size = 0) {
  const uint8_t setup_sects = 3;
  std::vector<std::byte> file((setup_sects + 1) * 512 + kernel_size);
  put<uint8_t>(file, 0x1f1, setup_sects);
  put<uint16_t>(file, 0x1fe, 0xaa55);
  put<uint8_t>(file, 0x201, 0x66);  // jump offset: the header ends at 0x268
  put<uint32_t>(file, 0x202, 0x53726448);
  put<uint16_t>(file, 0x206, protocol);
  put<uint8_t>(file, 0x211, LOADED_HIGH);
  put<uint32_t>(file, 0x22c, 0x7fffffff);  // initrd_addr_max
  put<uint16_t>(file, 0x236, xloadflags);
  put<uint32_t>(file, 0x238, 2048);  // cmdline_size
  put<uint32_t>(file, 0x260, init_size);
  for (size_t i = 0; i < kernel_size; ++i)
    file[(setup_sects + 1) * 512 + i] = std::byte(i * 7);
  return file;
}

boot_params zero_page(const FakeGuest& guest) {
  return *guest.memory.read_obj<boot_params>(kZeroPageAddress);
}

}  // namespace

TEST_CASE("guest RAM goes below the MMIO gap and above 4 GiB", "[boot]") {
  REQUIRE(ram_ranges(256 << 20) == std::vector<RamRange>{{0, 256 << 20}});
  REQUIRE(ram_ranges(3ull << 30) == std::vector<RamRange>{{0, 3ull << 30}});
  REQUIRE(ram_ranges(5ull << 30) ==
          std::vector<RamRange>{{0, 3ull << 30}, {4ull << 30, 2ull << 30}});
}

TEST_CASE("a bzImage is loaded at 1 MiB with its header in the zero page", "[boot]") {
  FakeGuest guest(64 << 20);
  auto file = make_bzimage(300000, 0x020f, XLF_KERNEL_64, 8 << 20);
  KernelImage kernel = load_kernel(guest.memory, file);
  REQUIRE(kernel.format == KernelImage::Format::kBzImage);
  REQUIRE(kernel.entry == kKernelAddress + 0x200);
  REQUIRE(kernel.end == kKernelAddress + (8 << 20));  // init_size, not the file, bounds it
  REQUIRE(std::memcmp(guest.ram.data() + kKernelAddress, file.data() + 2048, 300000) == 0);

  std::vector<std::byte> initrd(3 << 20, std::byte{0x42});
  BootInfo info = write_boot_params(
      guest.memory, kernel, {"console=ttyS0 panic=-1", initrd, kRsdpAddress, ram_ranges(64 << 20)});
  REQUIRE(info.entry == kernel.entry);
  boot_params params = zero_page(guest);
  REQUIRE(params.hdr.header == 0x53726448);
  REQUIRE(params.hdr.version == 0x020f);
  REQUIRE(params.hdr.type_of_loader == 0xff);
  REQUIRE(params.hdr.cmd_line_ptr == kCmdlineAddress);
  REQUIRE(std::string(reinterpret_cast<const char*>(guest.ram.data() + kCmdlineAddress)) ==
          "console=ttyS0 panic=-1");
  REQUIRE(params.acpi_rsdp_addr == kRsdpAddress);

  // The initrd sits page-aligned at the top of RAM, above the kernel.
  REQUIRE(info.initrd_address == ((64 << 20) - (3 << 20)));
  REQUIRE(params.hdr.ramdisk_image == info.initrd_address);
  REQUIRE(params.hdr.ramdisk_size == 3 << 20);
  REQUIRE(guest.ram[info.initrd_address] == std::byte{0x42});

  REQUIRE(params.e820_entries == 3);
  REQUIRE(params.e820_table[0].addr == 0);
  REQUIRE(params.e820_table[0].size == kEbdaStart);
  REQUIRE(params.e820_table[0].type == 1);
  REQUIRE(params.e820_table[1].addr == kEbdaStart);
  REQUIRE(params.e820_table[1].type == 2);
  REQUIRE(params.e820_table[2].addr == kKernelAddress);
  REQUIRE(params.e820_table[2].size == (64 << 20) - kKernelAddress);
}

TEST_CASE("memory above 4 GiB gets its own e820 entry", "[boot]") {
  // The fake guest holds only low memory; the map is what matters here.
  FakeGuest guest(32 << 20);
  KernelImage kernel = load_kernel(guest.memory, make_bzimage(4096));
  std::vector<RamRange> ram = {{0, 32 << 20}, {kMmioGapEnd, 1ull << 30}};
  write_boot_params(guest.memory, kernel, {"", {}, kRsdpAddress, ram});
  boot_params params = zero_page(guest);
  REQUIRE(params.e820_entries == 4);
  REQUIRE(params.e820_table[3].addr == kMmioGapEnd);
  REQUIRE(params.e820_table[3].size == 1ull << 30);
  REQUIRE(params.hdr.ramdisk_image == 0);
}

TEST_CASE("an ELF vmlinux is loaded where its segments say", "[boot]") {
  FakeGuest guest(16 << 20);
  std::vector<std::byte> file(0x3000);
  Elf64_Ehdr ehdr{};
  std::memcpy(ehdr.e_ident, ELFMAG, SELFMAG);
  ehdr.e_ident[EI_CLASS] = ELFCLASS64;
  ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
  ehdr.e_type = ET_EXEC;
  ehdr.e_machine = EM_X86_64;
  ehdr.e_entry = 0x200010;
  ehdr.e_phoff = sizeof ehdr;
  ehdr.e_phentsize = sizeof(Elf64_Phdr);
  ehdr.e_phnum = 2;
  put(file, 0, ehdr);
  Elf64_Phdr text{PT_LOAD,  PF_R | PF_X, 0x1000, 0xffffffff81000000,
                  0x200000, 0x1000,      0x1000, 0x1000};
  Elf64_Phdr bss{PT_LOAD, PF_R | PF_W, 0x2000, 0xffffffff81400000, 0x400000, 0x800, 0x5000, 0x1000};
  put(file, sizeof ehdr, text);
  put(file, sizeof ehdr + sizeof text, bss);
  for (size_t i = 0x1000; i < 0x3000; ++i)
    file[i] = std::byte(0xcc);
  guest.ram[0x400000 + 0x900] = std::byte{0x77};  // must be zeroed as bss

  KernelImage kernel = load_kernel(guest.memory, file);
  REQUIRE(kernel.format == KernelImage::Format::kElf);
  REQUIRE(kernel.entry == 0x200010);
  REQUIRE(kernel.end == 0x405000);
  REQUIRE(guest.ram[0x200000] == std::byte{0xcc});
  REQUIRE(guest.ram[0x400000 + 0x7ff] == std::byte{0xcc});
  REQUIRE(guest.ram[0x400000 + 0x900] == std::byte{0});
  write_boot_params(guest.memory, kernel, {"quiet", {}, kRsdpAddress, ram_ranges(16 << 20)});
  boot_params params = zero_page(guest);
  REQUIRE(params.hdr.boot_flag == 0xaa55);
  REQUIRE(params.hdr.header == 0x53726448);

  SECTION("an entry outside the segments is refused") {
    ehdr.e_entry = 0x900000;
    put(file, 0, ehdr);
    REQUIRE_THROWS_WITH(load_kernel(guest.memory, file), Catch::Contains("entry point"));
  }
  SECTION("a segment below 1 MiB is refused") {
    text.p_paddr = 0x8000;
    put(file, sizeof ehdr, text);
    REQUIRE_THROWS_WITH(load_kernel(guest.memory, file), Catch::Contains("below 1 MiB"));
  }
  SECTION("a segment beyond guest memory is refused") {
    bss.p_paddr = 15 << 20;
    bss.p_memsz = 2 << 20;
    put(file, sizeof ehdr + sizeof text, bss);
    REQUIRE_THROWS_WITH(load_kernel(guest.memory, file), Catch::Contains("does not fit"));
  }
  SECTION("a segment past the end of the file is refused") {
    text.p_filesz = 0x10000;
    text.p_memsz = 0x10000;
    put(file, sizeof ehdr, text);
    REQUIRE_THROWS_WITH(load_kernel(guest.memory, file), Catch::Contains("outside the file"));
  }
  SECTION("a 32-bit or foreign ELF is refused") {
    ehdr.e_machine = EM_AARCH64;
    put(file, 0, ehdr);
    REQUIRE_THROWS_WITH(load_kernel(guest.memory, file), Catch::Contains("not a 64-bit x86-64"));
  }
}

TEST_CASE("unbootable kernels and bad boot settings are refused with the reason", "[boot]") {
  FakeGuest guest(16 << 20);
  std::vector<std::byte> junk(10000, std::byte{0x90});
  REQUIRE_THROWS_WITH(load_kernel(guest.memory, junk),
                      Catch::Contains("neither a bzImage nor an ELF"));
  REQUIRE_THROWS_WITH(load_kernel(guest.memory, make_bzimage(4096, 0x020a)),
                      Catch::Contains("boot protocol 2.10") && Catch::Contains("2.12"));
  REQUIRE_THROWS_WITH(load_kernel(guest.memory, make_bzimage(4096, 0x020f, 0)),
                      Catch::Contains("64-bit entry"));
  auto truncated = make_bzimage(4096);
  truncated.resize(2048);
  REQUIRE_THROWS_WITH(load_kernel(guest.memory, truncated), Catch::Contains("truncated"));
  REQUIRE_THROWS_WITH(
      load_kernel(guest.memory, make_bzimage(4096, 0x020f, XLF_KERNEL_64, 64 << 20)),
      Catch::Contains("to decompress"));

  KernelImage kernel = load_kernel(guest.memory, make_bzimage(4096));
  REQUIRE_THROWS_WITH(
      write_boot_params(guest.memory, kernel,
                        {std::string(2049, 'x'), {}, kRsdpAddress, ram_ranges(16 << 20)}),
      Catch::Contains("2049 bytes") && Catch::Contains("at most 2048"));
  std::vector<std::byte> huge(15 << 20);
  REQUIRE_THROWS_WITH(
      write_boot_params(guest.memory, kernel, {"", huge, kRsdpAddress, ram_ranges(16 << 20)}),
      Catch::Contains("initrd of 15 MiB does not fit"));
}
