//! PVH entry point: lets QEMU (`-M microvm -kernel probe.elf`, or any loader
//! that speaks Xen's x86/HVM direct boot ABI) start the same ELF that the VMM
//! enters at `_start`.
//!
//! The ELF note `.note.Xen` (type 18, XEN_ELFNOTE_PHYS32_ENTRY) names
//! `_pvh_start`. A PVH loader enters there in 32-bit protected mode, paging
//! off, flat CS/DS/ES/SS, interrupts off, no stack, `ebx` = physical address
//! of `struct hvm_start_info`. `_pvh_start` recreates the state `_start`
//! expects from the VMM (long mode, identity-mapped low 4 GiB, the VMM's GDT
//! selectors, `rsi` = a Linux zero page carrying the command line) and jumps
//! to `_start`. Memory it uses: the NOLOAD `.pvh` area of `link.ld` (page
//! tables, then the zero page), and the BSP's stack slot as its stack.
//! Integer instructions only; the VMM never runs any of it.

use core::arch::global_asm;

/// `struct hvm_start_info.magic` (Xen `XEN_HVM_START_MAGIC_VALUE`).
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of `hvm_start_info.cmdline_paddr` (u64).
const HVM_CMDLINE_PADDR: u32 = 24;
/// Offsets of `boot_params.hdr.cmd_line_ptr` and `cmdline_size` (u32 each).
const ZP_CMD_LINE_PTR: u32 = 0x228;
const ZP_CMDLINE_SIZE: u32 = 0x238;
/// The longest command line (without its NUL) the fake zero page admits.
const ZP_CMDLINE_MAX: u32 = 4095;

// The note: name "Xen\0", desc the entry address as 8 bytes (low 32 bits
// the address, high 32 bits 0), as Linux's x86-64 vmlinux writes it: loaders
// that read 4 bytes (linux-loader, newer QEMU) and ones that read 8 (QEMU up
// to 9.x reads a 64-bit ELF's desc as a u64) agree on it.
//
// Page tables at __pvh_tables (link.ld): PML4 at +0, PDPT at +0x1000, four
// page directories of 2 MiB pages at +0x2000..+0x6000; the zero page at
// __pvh_zero_page. All are rewritten here (nothing assumes zeroed RAM).
global_asm!(
    ".section .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4",  // n_namesz
    ".long 8",  // n_descsz
    ".long 18", // n_type: XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".balign 4",
    ".quad _pvh_start",
    ".balign 4",
    "",
    ".section .text.pvh, \"ax\"",
    ".code32",
    ".global _pvh_start",
    "_pvh_start:",
    "cli",
    "cld",
    "movl %ebx, %ebp", // hvm_start_info; rep stos and wrmsr clobber others
    "movl $__stacks_start + {stack_size}, %esp",
    // Zero the PML4 and the PDPT.
    "movl $__pvh_tables, %edi",
    "movl $2 * 4096 / 4, %ecx",
    "xorl %eax, %eax",
    "rep stosl",
    // PML4[0] -> PDPT; PDPT[0..4] -> the four PDs (present, writable).
    "movl $__pvh_tables + 0x1003, __pvh_tables",
    "movl $__pvh_tables + 0x2003, %eax",
    "movl $__pvh_tables + 0x1000, %edi",
    "1:",
    "movl %eax, (%edi)",
    "addl $0x1000, %eax",
    "addl $8, %edi",
    "cmpl $__pvh_tables + 0x1000 + 4 * 8, %edi",
    "jb 1b",
    // PD entries: 2048 x 2 MiB pages (present, writable, PS) = 0..4 GiB.
    "movl $0x83, %eax",
    "movl $__pvh_tables + 0x2000, %edi",
    "2:",
    "movl %eax, (%edi)",
    "movl $0, 4(%edi)",
    "addl $0x200000, %eax",
    "addl $8, %edi",
    "cmpl $__pvh_tables + 0x6000, %edi",
    "jb 2b",
    // CR4.PAE, CR3, EFER.LME, then CR0: PG | ET | PE, CD and NW clear (the
    // VMM's CR0). The far jump activates long mode.
    "movl %cr4, %eax",
    "orl $0x20, %eax",
    "movl %eax, %cr4",
    "movl $__pvh_tables, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    "lgdtl probe_pvh_gdt_ptr",
    "movl %cr0, %eax",
    "andl $0x9fffffff, %eax",
    "orl $0x80000011, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, $probe_pvh_long",
    "",
    ".code64",
    "probe_pvh_long:",
    "movl $0x10, %eax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movw %ax, %fs",
    "movw %ax, %gs",
    "movl %ebp, %ebx", // the upper halves are undefined after the switch
    "movl %esp, %esp",
    // The zero page: 4 KiB of zeros plus the command line fields.
    "movl $__pvh_zero_page, %edi",
    "movl $4096 / 8, %ecx",
    "xorl %eax, %eax",
    "rep stosq",
    "cmpl ${magic}, (%rbx)",
    "jne 3f",
    "cmpl $0, {cmdline} + 4(%rbx)", // cmdline_paddr above 4 GiB: none
    "jne 3f",
    "movl {cmdline}(%rbx), %eax",
    "3:",
    "movl $__pvh_zero_page, %esi",
    "movl %eax, {cmd_line_ptr}(%rsi)",
    "movl ${cmdline_max}, {cmdline_size}(%rsi)",
    "jmp _start",
    "",
    ".section .rodata.probe_pvh_gdt, \"a\"",
    ".balign 8",
    "probe_pvh_gdt:",
    ".quad 0",                  // 0x00 null
    ".quad 0x00af9b000000ffff", // 0x08 64-bit code (the VMM's)
    ".quad 0x00cf93000000ffff", // 0x10 data, 4 GiB (the VMM's)
    "probe_pvh_gdt_ptr:",
    ".word probe_pvh_gdt_ptr - probe_pvh_gdt - 1",
    ".long probe_pvh_gdt",
    ".text",
    stack_size = const crate::cpu::STACK_SIZE,
    magic = const HVM_START_MAGIC,
    cmdline = const HVM_CMDLINE_PADDR,
    cmd_line_ptr = const ZP_CMD_LINE_PTR,
    cmdline_size = const ZP_CMDLINE_SIZE,
    cmdline_max = const ZP_CMDLINE_MAX,
    options(att_syntax),
);
