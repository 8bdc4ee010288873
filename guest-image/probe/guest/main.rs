//! keystone-probe: a freestanding x86-64 guest that exercises a VMM's KVM
//! path on hosts whose KVM cannot run Linux (see `src/lib.rs` for the
//! command-line protocol and the lines it prints).
//!
//! Booted like a 64-bit Linux kernel: entered at `_start` in long mode, CPL0,
//! interrupts off, `rsi` = physical address of the `boot_params` zero page,
//! identity-mapped low 4 GiB. Built by `build.rs` with `rustc` for
//! x86_64-unknown-linux-gnu, `-nostdlib`, linked by `link.ld` at 1 MiB.
//!
//! Guest kernel code runs under this host's emulator (KVM's x86 instruction
//! emulator, via PVM) at about a million instructions a second, and only
//! ordinary integer instructions are emulated. Rules for code in here:
//! - no `core::fmt` (too many instructions); print with `serial::Writer`;
//! - no popcnt, int3/int n, xsave/xrstor, cmpxchg16b, fences (`mfence`,
//!   `fence(SeqCst)`): the emulator stops the VM on them;
//! - of SSE, only plain moves (`movups`/`movaps`/`movdqu`/`movdqa`) are
//!   emulated. rustc zero-fills 16+ byte stack objects with `xorps` + `movaps`,
//!   which the emulator rejects, so do not build zeroed arrays or large
//!   zeroed structs on the stack: use statics (in .bss) or read tables in
//!   place. `src/lib.rs`'s tests disassemble the image and fail on any other
//!   SSE instruction in the probe's own code;
//! - interrupts: enable them only inside `cpu::wait_for_interrupt` (`sti;
//!   hlt; cli`) or `cpu::inb_interruptible` (`sti; in; cli`). On this host a
//!   pending interrupt is taken only at a VM exit or `hlt`, never between
//!   emulated instructions, so a bare `sti; nop; cli` window lets nothing in.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod blk;
mod boot_timer;
mod bootparams;
mod cpu;
mod echo;
mod i8042;
mod ioapic;
mod irq;
mod lapic;
mod mem;
mod mptable;
mod net;
mod pvh;
mod serial;
mod smp;
mod virtio;
mod vsock;

use core::arch::global_asm;

/// IA32_APIC_BASE MSR; bit 8 is set on the bootstrap processor.
const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_BSP: u32 = 1 << 8;

// Entry point. Only the BSP may run `rust_main`: any other CPU that the VMM
// lets in here (it should not) is parked. Then: zero .bss, take the BSP's
// stack (slot 0 of the per-CPU stacks), enable SSE (CR0.MP on, CR0.EM off,
// CR4.OSFXSR | CR4.OSXMMEXCPT) since rustc may emit SSE moves, and call
// `rust_main(boot_params)`.
global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "cld",
    "mov r12, rsi", // boot_params
    "mov ecx, {msr_apic_base}",
    "rdmsr",
    "test eax, {apic_base_bsp}",
    "jz 2f",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "shr rcx, 3", // .bss is 8-byte aligned and sized (link.ld): zero it in
    "xor eax, eax", // quadwords, each rep iteration is emulated on PVM
    "rep stosq",
    "lea rsp, [rip + __stacks_start]",
    "add rsp, {stack_size}",
    "mov rax, cr0",
    "and rax, ~(1 << 2)", // clear CR0.EM
    "or rax, 1 << 1",     // set CR0.MP
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, (1 << 9) | (1 << 10)", // CR4.OSFXSR | CR4.OSXMMEXCPT
    "mov cr4, rax",
    "mov rdi, r12",
    "xor ebp, ebp",
    "call {rust_main}",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    "",
    // core is precompiled with unwinding tables that name the personality
    // routine; with panic=abort it is never called. Crash if it ever is.
    ".global rust_eh_personality",
    "rust_eh_personality:",
    "ud2",
    msr_apic_base = const MSR_APIC_BASE,
    apic_base_bsp = const APIC_BASE_BSP,
    stack_size = const cpu::STACK_SIZE,
    rust_main = sym rust_main,
);

/// BSP entry from `_start`.
extern "C" fn rust_main(boot_params: u64) -> ! {
    let cmdline = bootparams::cmdline(boot_params);
    // The banner first: it is what boot benchmarks time. Exceptions before
    // the IDT is installed triple-fault, which the VMM reports as well.
    serial::lock()
        .str("keystone-probe: hello cmdline=\"")
        .bytes(cmdline)
        .str("\"\n");
    irq::install();

    for step in bootparams::probe_steps(cmdline).split(|&b| b == b',') {
        if step.is_empty() {
            continue;
        }
        run_step(step, cmdline);
    }
    serial::lock().str("probe: halted\n");
    cpu::halt_forever()
}

/// Runs one `probe=` step (see `src/lib.rs` for the list). Steps that end
/// the run (`reset`, `fault`, `spin`, and `ready` when there is a vsock
/// device) do not return.
fn run_step(step: &[u8], cmdline: &[u8]) {
    match step {
        b"timer" => {
            boot_timer::signal();
            serial::lock().str("probe: boot-timer written\n");
        }
        b"smp" => smp::run(),
        b"echo" => echo::run(),
        b"virtio" => {
            virtio::discover(cmdline);
        }
        b"blk" => blk::run(cmdline),
        b"blkbench" => blk::bench(cmdline),
        b"vsock" => vsock::run(cmdline),
        b"ready" => vsock::ready(cmdline),
        b"net" => net::run(cmdline),
        b"netbench" => net::bench(cmdline),
        b"reset" => {
            serial::lock().str("probe: reset\n");
            i8042::reset();
            cpu::halt_forever();
        }
        b"fault" => {
            serial::lock().str("probe: fault\n");
            cpu::triple_fault();
        }
        b"spin" => {
            serial::lock().str("probe: spinning\n");
            cpu::halt_forever();
        }
        b"fill" => fill(cmdline),
        b"count" => {
            // In RAM, not a register: what a snapshot's memory file keeps.
            static COUNT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
            loop {
                let n = COUNT.fetch_add(1, core::sync::atomic::Ordering::Relaxed) + 1;
                serial::lock().str("probe: count ").dec(n).str("\n");
                cpu::spin(10_000);
            }
        }
        unknown => {
            serial::lock()
                .str("probe: unknown step ")
                .bytes(unknown)
                .str("\n");
        }
    }
}

/// Start of the RAM the `fill` step writes (above the probe's image,
/// stacks and the blkbench buffer).
const FILL_BASE: u64 = 0x0100_0000;

/// The `fill` step: write `probe.fill_mib=` MiB (16) at 16 MiB with a
/// pattern, then read it all back forever, one pass per line (the
/// snapshot benchmark: a restored guest touches every page it had).
fn fill(cmdline: &[u8]) -> ! {
    let mib = bootparams::value(cmdline, b"probe.fill_mib=")
        .and_then(bootparams::parse_u64)
        .unwrap_or(16);
    let words = mib * (1 << 20) / 8;
    for i in 0..words {
        let p = (FILL_BASE + i * 8) as *mut u64;
        // SAFETY: identity-mapped guest RAM above everything the probe
        // uses; the host sized the VM for it (`probe.fill_mib`).
        unsafe { p.write_volatile(i ^ 0x5a5a_5a5a_5a5a_5a5a) };
    }
    serial::lock().str("probe: fill done mib=").dec(mib).str("\n");
    let mut pass = 0u64;
    loop {
        let mut bad = 0u64;
        // One word per 4 KiB page: every page is touched.
        let mut i = 0;
        while i < words {
            let p = (FILL_BASE + i * 8) as *const u64;
            // SAFETY: as above.
            if unsafe { p.read_volatile() } != i ^ 0x5a5a_5a5a_5a5a_5a5a {
                bad += 1;
            }
            i += 512;
        }
        pass += 1;
        serial::lock()
            .str("probe: fill pass ")
            .dec(pass)
            .str(" bad=")
            .dec(bad)
            .str("\n");
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut w = serial::lock_or_steal();
    w.str("\nprobe: panic");
    if let Some(location) = info.location() {
        w.str(" at ")
            .str(location.file())
            .str(":")
            .dec(u64::from(location.line()));
    }
    w.str("\n");
    drop(w);
    cpu::triple_fault()
}
