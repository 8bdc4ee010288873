//! The `smp` step: read the MP table, then start every application
//! processor (AP) with INIT-SIPI-SIPI and count the ones that check in.
//!
//! An AP starts in 16-bit real mode at `SIPI vector * 4 KiB`. The trampoline
//! below is assembled into the image and copied at run time to physical
//! [`TRAMPOLINE_PHYS`] (the VMM uses 0x500 for its GDT and 0x7000-0xefff for
//! the zero page and page tables, so 0x1000-0x1fff is free). It goes:
//! real mode -> `lgdt` (its own GDT) -> 32-bit protected mode -> PAE, CR3
//! (from the mailbox), EFER.LME -> paging on -> far jump to 64-bit code ->
//! `probe_ap_entry` in the image proper, which picks the AP's stack by its
//! local APIC id and calls [`ap_main`].

use crate::{cpu, irq, lapic, mptable, serial};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

/// Physical address the trampoline is copied to; must be 4 KiB aligned and
/// below 1 MiB. The SIPI vector is its page number.
const TRAMPOLINE_PHYS: u64 = 0x1000;
/// Start-up IPI vector: the AP starts at CS:IP = 0x0100:0000 = 0x1000.
const SIPI_VECTOR: u32 = (TRAMPOLINE_PHYS >> 12) as u32;

/// Pause-loop iterations after INIT and after each SIPI. KVM needs no real
/// delay, these only keep the spirit of the MP spec's 10 ms / 200 us.
const INIT_DELAY: u32 = 1000;
const SIPI_DELAY: u32 = 200;
/// Pause-loop iterations to wait for one AP to check in, and for all APs
/// together (each iteration is a few instructions; this host's emulator runs
/// about a million a second).
const AP_WAIT: u32 = 500_000;
const TOTAL_WAIT: u32 = 3_000_000;

/// CPUs that have run `ap_main` (plus the BSP).
static ONLINE: AtomicU32 = AtomicU32::new(0);

extern "C" {
    /// First byte of the trampoline in the image.
    static probe_ap_trampoline_start: u8;
    /// One past its last byte.
    static probe_ap_trampoline_end: u8;
    /// The mailbox at the end of the trampoline: the CR3 value (u32) the AP
    /// loads before turning on paging.
    static probe_ap_mailbox_cr3: u8;
}

// The trampoline: position independent except through `phys`, the address
// it runs at. Its GDT mirrors the VMM's layout where it matters: 0x08 is
// 64-bit code (the selector the IDT's gates use) and 0x10 is data; 0x18 is
// the 32-bit code segment used on the way.
global_asm!(
    ".section .text.probe_ap_trampoline, \"ax\"",
    ".code16",
    ".global probe_ap_trampoline_start",
    "probe_ap_trampoline_start:",
    "cli",
    "cld",
    "movw %cs, %ax",
    "movw %ax, %ds",
    // lgdt via DS (= CS = phys >> 4), so the operand is the offset.
    "lgdtl probe_ap_gdt_ptr - probe_ap_trampoline_start",
    "movl %cr0, %eax",
    "orl $1, %eax", // CR0.PE
    "movl %eax, %cr0",
    "ljmpl $0x18, ${phys} + probe_ap_pm32 - probe_ap_trampoline_start",
    "",
    ".code32",
    "probe_ap_pm32:",
    "movw $0x10, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movw %ax, %fs",
    "movw %ax, %gs",
    // CR4: PAE (bit 5), OSFXSR (bit 9), OSXMMEXCPT (bit 10).
    "movl %cr4, %eax",
    "orl $0x620, %eax",
    "movl %eax, %cr4",
    "movl {phys} + probe_ap_mailbox_cr3 - probe_ap_trampoline_start, %eax",
    "movl %eax, %cr3",
    // EFER (MSR 0xC0000080): LME (bit 8).
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    // CR0: PG (31) | NE (5) | ET (4) | MP (1) | PE (0); EM, CD, NW clear.
    "movl $0x80000033, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, ${phys} + probe_ap_lm64 - probe_ap_trampoline_start",
    "",
    ".code64",
    "probe_ap_lm64:",
    "movabsq $probe_ap_entry, %rax",
    "jmpq *%rax",
    "",
    ".balign 8",
    "probe_ap_gdt:",
    ".quad 0",                  // 0x00 null
    ".quad 0x00af9a000000ffff", // 0x08 64-bit code, ring 0
    ".quad 0x00cf92000000ffff", // 0x10 data, 4 GiB, writable
    ".quad 0x00cf9a000000ffff", // 0x18 32-bit code, 4 GiB
    "probe_ap_gdt_ptr:",
    ".word probe_ap_gdt_ptr - probe_ap_gdt - 1",
    ".long {phys} + probe_ap_gdt - probe_ap_trampoline_start",
    ".balign 4",
    ".global probe_ap_mailbox_cr3",
    "probe_ap_mailbox_cr3:",
    ".long 0",
    ".global probe_ap_trampoline_end",
    "probe_ap_trampoline_end:",
    "",
    // 64-bit entry in the image: stack = __stacks_start + (id + 1) *
    // STACK_SIZE, parked if that is past __stacks_end.
    ".text",
    ".global probe_ap_entry",
    "probe_ap_entry:",
    "movl $0xfee00020, %eax", // local APIC ID register (zero-extended)
    "movl (%rax), %edi",
    "shrl $24, %edi",
    "leaq 1(%rdi), %rax",
    "imulq ${stack_size}, %rax",
    "leaq __stacks_start(%rip), %rsp",
    "addq %rax, %rsp",
    "leaq __stacks_end(%rip), %rax",
    "cmpq %rax, %rsp",
    "ja 2f",
    "xorl %ebp, %ebp",
    "call {ap_main}",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    phys = const TRAMPOLINE_PHYS,
    stack_size = const cpu::STACK_SIZE,
    ap_main = sym ap_main,
    options(att_syntax),
);

/// Address of a symbol defined in the assembly above.
fn addr_of(symbol: &u8) -> u64 {
    symbol as *const u8 as u64
}

/// Copies the trampoline to [`TRAMPOLINE_PHYS`] and fills in its mailbox.
fn install_trampoline() {
    // SAFETY: the three symbols are labels in the image's .text; only their
    // addresses are taken.
    let (start, end, mailbox) = unsafe {
        (
            addr_of(&probe_ap_trampoline_start),
            addr_of(&probe_ap_trampoline_end),
            addr_of(&probe_ap_mailbox_cr3),
        )
    };
    let len = (end - start) as usize;
    let dest = TRAMPOLINE_PHYS as *mut u8;
    // SAFETY: physical 0x1000-0x1fff is RAM nobody else uses (see the module
    // docs), identity-mapped; the trampoline is far smaller than 4 KiB.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, dest, len);
        core::ptr::write_volatile(
            (TRAMPOLINE_PHYS + (mailbox - start)) as *mut u32,
            cpu::read_cr3() as u32,
        );
    }
}

/// Runs the `smp` step.
pub fn run() {
    let table = match mptable::find() {
        Ok(table) => table,
        Err(error) => {
            serial::lock()
                .str("probe: mptable error: ")
                .str(error.as_str())
                .str("\n");
            return;
        }
    };
    let cpus = table.processors().count() as u64;
    serial::lock()
        .str("probe: mptable cpus=")
        .dec(cpus)
        .str(" ioapic=")
        .hex(table.ioapic())
        .str("\n");
    let leaf1 = cpu::cpuid(1);
    serial::lock()
        .str("probe: cpuid apic-id=")
        .dec(u64::from(leaf1.ebx >> 24))
        .str(" logical=")
        .dec(u64::from((leaf1.ebx >> 16) & 0xff))
        .str("\n");

    lapic::enable();
    let self_id = lapic::id();
    install_trampoline();
    ONLINE.store(1, Ordering::Release);
    serial::lock()
        .str("probe: cpu ")
        .dec(u64::from(self_id))
        .str(" online\n");

    let mut budget = TOTAL_WAIT;
    for processor in table.processors() {
        let id = processor.apic_id;
        if processor.is_bsp || u32::from(id) == self_id {
            continue;
        }
        if usize::from(id) >= cpu::MAX_CPUS {
            serial::lock()
                .str("probe: cpu ")
                .dec(u64::from(id))
                .str(" has no stack\n");
            continue;
        }
        let before = ONLINE.load(Ordering::Acquire);
        start_ap(id);
        let mut waited = 0;
        while ONLINE.load(Ordering::Acquire) == before && waited < AP_WAIT && budget > 0 {
            cpu::pause();
            waited += 1;
            budget -= 1;
        }
        if ONLINE.load(Ordering::Acquire) == before {
            serial::lock()
                .str("probe: cpu ")
                .dec(u64::from(id))
                .str(" timeout\n");
        }
    }

    serial::lock()
        .str("probe: smp online=")
        .dec(u64::from(ONLINE.load(Ordering::Acquire)))
        .str("/")
        .dec(cpus)
        .str("\n");
}

/// INIT, then two start-up IPIs (Intel SDM vol. 3, "MP initialization").
fn start_ap(id: u8) {
    lapic::send_ipi(id, lapic::ICR_INIT_ASSERT);
    lapic::send_ipi(id, lapic::ICR_INIT_DEASSERT);
    cpu::spin(INIT_DELAY);
    for _ in 0..2 {
        lapic::send_ipi(id, lapic::ICR_STARTUP | SIPI_VECTOR);
        cpu::spin(SIPI_DELAY);
    }
}

/// First Rust code an AP runs, on its own stack, with interrupts disabled.
extern "C" fn ap_main(apic_id: u32) -> ! {
    irq::load();
    serial::lock()
        .str("probe: cpu ")
        .dec(u64::from(apic_id))
        .str(" online\n");
    ONLINE.fetch_add(1, Ordering::Release);
    cpu::halt_forever()
}
