// The test guest's entry points, page tables, GDT, AP trampoline and interrupt stubs.
//
// Two ways in:
//   _start     Linux 64-bit boot protocol (msb): long mode, RSI = zero page.
//   pvh_entry  PVH (QEMU -kernel): 32-bit protected mode, paging off, EBX = hvm_start_info.
// Both switch to the static page tables below (identity map of [0, 4 GiB), 2 MiB pages, U bit
// set) and the GDT below, then call kernel_main(boot_ptr, kind).
//
// The interrupt paths are kept to a handful of instructions: CPL0 is emulated on msb's host.

#define PTE_FLAGS 0x87 /* present, writable, user, 2 MiB page */
#define EFER_MSR 0xc0000080
#define LAPIC_EOI 0xfee000b0
#define LAPIC_TIMER_INITIAL 0xfee00380
#define TIMER_COUNT 625000 /* 100 Hz at KVM's and QEMU's 1 GHz APIC bus, divided by 16 */

// ---------------------------------------------------------------------------------------------
// PVH note: QEMU reads the 32-bit entry point from it (XEN_ELFNOTE_PHYS32_ENTRY = 18).
        .section .note.pvh, "a"
        .balign 4
        .long 4          // namesz
        .long 8          // descsz
        .long 18         // XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .balign 4
        .quad pvh_entry

// ---------------------------------------------------------------------------------------------
        .section .text.entry, "ax"
// From 32-bit code with paging off into long mode on the image's page tables: PAE, CR3, EFER.LME,
// then CR0 with `cr0_bits` set (the far jump to a 64-bit segment follows at each use). Both the
// PVH entry and the APs' trampoline go this way.
        .macro enter_long_mode cr0_bits
        mov $0x20, %eax           // CR4.PAE
        mov %eax, %cr4
        mov $pml4, %eax
        mov %eax, %cr3
        mov $EFER_MSR, %ecx
        rdmsr
        or $0x100, %eax           // EFER.LME
        wrmsr
        mov %cr0, %eax
        or $\cr0_bits, %eax
        mov %eax, %cr0
        .endm

        .code64
        .globl _start
_start:
        cli
        mov %rsi, %rdi            // boot_params
        mov $1, %esi              // BootKind::kLinux64
        jmp common64

        .code32
        .globl pvh_entry
pvh_entry:
        cli
        mov %ebx, pvh_start_info
        enter_long_mode 0x80000001  // PG | PE
        lgdt gdtr32
        ljmp $0x08, $pvh64

        .code64
pvh64:
        mov pvh_start_info(%rip), %edi
        mov $2, %esi              // BootKind::kPvh
common64:
        mov $bsp_stack_top, %rsp
        mov $pml4, %eax
        mov %rax, %cr3
        mov $0x20, %eax           // CR4: PAE only (no SMEP/SMAP: the kernel runs on U pages)
        mov %rax, %cr4
        lgdt gdtr64(%rip)
        pushq $0x08
        lea 1f(%rip), %rax
        push %rax
        lretq
1:      mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        mov %eax, %fs
        mov %eax, %gs
        call kernel_main
2:      cli
        hlt
        jmp 2b

// An AP arrives here from the trampoline in 32-bit protected mode, paging off. Setting EFER.LME
// needs the VMM to have given the vCPU a CPUID with long mode (KVM_SET_CPUID2): KVM refuses it
// otherwise (#GP, and with no IDT yet a triple fault).
        .code32
ap_entry32:
        mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        enter_long_mode 0x80000000  // PG
        ljmp $0x08, $ap_entry64
        .code64

// In long mode on the kernel's GDT and page tables.
ap_entry64:
        mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        mov ap_stack_top(%rip), %rsp
        call ap_main
3:      cli
        hlt
        jmp 3b

// enter_user(entry, stack): iretq to CPL3 with IF set.
        .globl enter_user
enter_user:
        pushq $0x1b               // SS: user data
        push %rsi                 // RSP
        pushq $0x202              // RFLAGS: IF
        pushq $0x23               // CS: user code
        push %rdi                 // RIP
        iretq

// ---------------------------------------------------------------------------------------------
// The AP trampoline: copied to a page below 1 MiB, started by SIPI in real mode with CS = page/16.
// It enables protection and jumps to ap_entry32 in the kernel image (32-bit code segment 0x38).
        .section .rodata.trampoline, "a"
        .code16
        .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
        cli
        mov %cs, %ax
        mov %ax, %ds
        lgdtl (ap_gdtr - ap_trampoline_start)
        mov %cr0, %eax
        or $1, %eax               // PE
        mov %eax, %cr0
        ljmpl $0x38, $ap_entry32
        .balign 8
ap_gdtr:
        .word gdt_end - gdt - 1
        .long gdt
ap_trampoline_end:
        .code64

// ---------------------------------------------------------------------------------------------
// Exceptions (vectors 0-31): print and power off (exception_handler never returns).
        .text
        .balign 16
        .globl exception_stubs
exception_stubs:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        .else
        pushq $0
        .endif
        pushq $\n
        jmp exception_common
        .endr

exception_common:
        push %rax
        push %rbx
        push %rcx
        push %rdx
        push %rsi
        push %rdi
        push %rbp
        push %r8
        push %r9
        push %r10
        push %r11
        push %r12
        push %r13
        push %r14
        push %r15
        mov %rsp, %rdi
        call exception_handler
4:      cli
        hlt
        jmp 4b

// Interrupts (vectors 32-255): count, count ticks, EOI. 16 bytes per stub.
        .balign 16
        .globl irq_stubs
irq_stubs:
        .set vec, 32
        .rept 224
        .balign 16
        pushq $vec
        jmp irq_common
        .set vec, vec + 1
        .endr

irq_common:
        push %rax
        mov 8(%rsp), %rax
        cmp $0x20, %rax
        je 2f
        cmp $0xf0, %rax           // kWakeVector and up: not counted
        jae 8f
        // A device interrupt (vector kDeviceVectorBase + GSI, GSIs 0-47): mark its GSI pending,
        // so that the agent reads and acks only the devices that interrupted (every register
        // access is a VM exit). Vectors below 0x30 wrap to large values and are skipped.
        sub $0x30, %rax
        cmp $48, %rax
        jae 5f
        lock btsq %rax, g_device_irqs(%rip)
        jmp 5f
        // The timer runs one-shot, re-armed here: KVM drops the periodic bit when the VMM has
        // not set CPUID (timer_mode_mask 0), and this costs one MMIO write per tick.
2:      mov $LAPIC_TIMER_INITIAL, %eax
        movl $TIMER_COUNT, (%rax)
        lock incq g_ticks(%rip)
5:      lock incq g_irq_count(%rip)
13:     mov $LAPIC_EOI, %eax
        movl $0, (%rax)
14:     pop %rax
        add $8, %rsp
        iretq
        // The wake-up IPI an AP gets to go offline (see ap_main) needs only its EOI. The LAPIC's
        // spurious vector 0xff (a spurious interrupt, which a restored VM may also see) has
        // nothing in service, so it gets no EOI (an EOI ends the highest interrupt in service).
8:      cmp $0xff, %rax
        je 14b
        jmp 13b

// System calls are `int3` through a DPL 3 gate: under PVM (msb's development host) `int $0x80`
// from user mode raises #UD, and `syscall` needs EFER.SCE, which KVM refuses unless the VMM's
// CPUID offers it; #BP reaches the guest everywhere. The gate clears IF; RSP0 is the kernel stack.
// RAX = 0: wait for an interrupt unless g_irq_count is no longer RDI (returns the count in RAX);
// RAX = 1: power off; RAX = 2: write RSI bytes at RDI to COM1 (user mode cannot do port I/O:
// IOPL 3 does not reach it under PVM).
        .globl syscall_entry
syscall_entry:
        cmp $1, %rax
        je do_power_off
        cmp $2, %rax
        je serial_write_syscall
        cmp g_irq_count(%rip), %rdi
        jne 6f
        sti
        hlt
        cli
6:      mov g_irq_count(%rip), %rax
        iretq

serial_write_syscall:
        mov $0x3f8, %dx
10:     test %rsi, %rsi
        jz 12f
        movzbl (%rdi), %eax
        cmp $10, %al
        jne 11f
        mov $13, %al
        out %al, %dx
        mov $10, %al
11:     out %al, %dx
        inc %rdi
        dec %rsi
        jmp 10b
12:     iretq

        .globl do_power_off
do_power_off:
        cli
        mov $0xfe, %al            // i8042 pulse reset line: msb stops the VM
        out %al, $0x64
        lidt null_idtr(%rip)      // otherwise triple fault: QEMU -no-reboot exits
        int3
7:      hlt
        jmp 7b

// ---------------------------------------------------------------------------------------------
// memcpy/memset/memmove/memcmp for both levels: string instructions, no SSE.
        .globl memcpy
memcpy:
        mov %rdi, %rax
        mov %rdx, %rcx
        rep movsb
        ret

        .globl memset
memset:
        mov %rdi, %r9
        mov %esi, %eax
        mov %rdx, %rcx
        rep stosb
        mov %r9, %rax
        ret

        .globl memmove
memmove:
        mov %rdi, %rax
        cmp %rsi, %rdi
        jbe memcpy
        lea -1(%rsi, %rdx), %rsi
        lea -1(%rdi, %rdx), %rdi
        mov %rdx, %rcx
        std
        rep movsb
        cld
        ret

        .globl memcmp
memcmp:
        xor %eax, %eax
        test %rdx, %rdx
        jz 9f
8:      movzbl (%rdi), %eax
        movzbl (%rsi), %ecx
        sub %ecx, %eax
        jnz 9f
        inc %rdi
        inc %rsi
        dec %rdx
        jnz 8b
9:      ret

// ---------------------------------------------------------------------------------------------
        .data
        .balign 4096
        .globl pml4
pml4:
        .quad pdpt + 0x7
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x7
        .quad pd + 0x1000 + 0x7
        .quad pd + 0x2000 + 0x7
        .quad pd + 0x3000 + 0x7
        .fill 508, 8, 0
pd:
        .set page, 0
        .rept 2048
        .quad (page << 21) | PTE_FLAGS
        .set page, page + 1
        .endr

        .balign 16
        .globl gdt, gdt_end
gdt:
        .quad 0
        .quad 0x00af9a000000ffff  // 0x08 kernel code, 64-bit
        .quad 0x00cf92000000ffff  // 0x10 kernel data
        .quad 0x00cff2000000ffff  // 0x18 user data (0x1b)
        .quad 0x00affa000000ffff  // 0x20 user code, 64-bit (0x23)
        .quad 0, 0                // 0x28 TSS, filled in by kernel_main
        .quad 0x00cf9a000000ffff  // 0x38 kernel code, 32-bit (the AP trampoline)
gdt_end:
        .balign 8
gdtr32:
        .word gdt_end - gdt - 1
        .long gdt
        .balign 8
gdtr64:
        .word gdt_end - gdt - 1
        .quad gdt
        .balign 8
null_idtr:
        .word 0
        .quad 0
pvh_start_info:
        .long 0
        .balign 8
        .globl ap_stack_top
ap_stack_top:
        .quad 0

        .bss
        .balign 16
        .space 16384
bsp_stack_top:

        .section .note.GNU-stack, "", @progbits
