//! Thin wrappers around the privileged x86-64 instructions the probe uses:
//! port I/O, MMIO, control registers, MSRs, CPUID and halting.
//!
//! Everything here must run under this host's KVM emulator (PVM), which
//! executes guest kernel code one instruction at a time and only knows the
//! plain integer instruction set: keep these to single, ordinary instructions.

use core::arch::asm;

/// Size of each CPU's stack, in bytes. `link.ld` reserves
/// `MAX_CPUS * STACK_SIZE` bytes in its `.stacks` section; keep them in sync.
pub const STACK_SIZE: usize = 16 * 1024;

/// Number of CPUs that have a stack (APIC ids `0..MAX_CPUS`).
pub const MAX_CPUS: usize = 64;

/// Writes one byte to an I/O port (`out dx, al`).
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no effect on Rust-visible memory; the probe is the
    // only software in the VM and each caller names a port of a device it owns.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port (`in al, dx`).
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reading a port only has device side effects.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a 32-bit MMIO register at physical (= identity-mapped virtual) `addr`.
///
/// # Safety
/// `addr` must be a 4-byte aligned device register (or RAM) inside the
/// VMM's identity map.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Reads an 8-bit MMIO register at physical (= identity-mapped virtual) `addr`.
///
/// # Safety
/// As for [`mmio_read32`] (any alignment).
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Writes a 32-bit MMIO register at physical (= identity-mapped virtual) `addr`.
///
/// # Safety
/// As for [`mmio_read32`], and the write must not break memory Rust owns.
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Writes an 8-bit MMIO register at physical (= identity-mapped virtual) `addr`.
///
/// # Safety
/// As for [`mmio_write32`].
pub unsafe fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Result of one `cpuid` leaf.
#[allow(dead_code)] // not every register is used by every caller yet
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes `cpuid` for `leaf` (sub-leaf 0).
pub fn cpuid(leaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx);
    // SAFETY: cpuid only reads CPU identification. rbx is reserved by LLVM, so
    // it is saved in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    }
    Cpuid { eax, ebx, ecx, edx }
}

/// Reads CR3 (the physical address of the PML4 the VMM built).
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Hint to the CPU (and to KVM) that this is a spin-wait loop.
#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Spins for roughly `iterations` pause loops. Under this host's emulator one
/// iteration costs a few microseconds; on real hardware much less.
pub fn spin(iterations: u32) {
    for _ in 0..iterations {
        pause();
    }
}

/// Waits for the next interrupt with interrupts enabled, then disables them
/// again: `sti; hlt; cli`.
///
/// `sti` delays interrupt recognition by one instruction, so an interrupt
/// that became pending before this point wakes the `hlt` instead of being
/// lost. Interrupts are only ever enabled inside this block, so handlers run
/// at a point where the compiler keeps nothing below the stack pointer (no
/// `nostack`: the red zone is free) and nothing live in caller-saved
/// registers (`clobber_abi("C")`).
pub fn wait_for_interrupt() {
    // SAFETY: the interrupt handlers installed by `irq` preserve every
    // register they touch and return with `iretq`.
    unsafe { asm!("sti", "hlt", "cli", clobber_abi("C")) }
}

/// Reads an I/O port with interrupts enabled for that one instruction:
/// `sti; in al, dx; cli`, so an interrupt that is already pending is taken
/// right after the read (`sti` holds interrupts off for one instruction).
///
/// Why the port read: on this host (PVM) a pending interrupt is only taken
/// at a VM exit (such as this port access) or at `hlt`, not between emulated
/// instructions, so `sti; nop; cli` would not let it in. Same guarantees for
/// handlers as [`wait_for_interrupt`].
pub fn inb_interruptible(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `inb` and `wait_for_interrupt`.
    unsafe {
        asm!(
            "sti",
            "in al, dx",
            "cli",
            out("al") value,
            in("dx") port,
            clobber_abi("C"),
        )
    }
    value
}

/// Disables interrupts and halts this CPU forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Loads an IDT with limit 0 and executes `ud2`: the #UD cannot be delivered,
/// nor the #GP/#DF that follow, so the CPU shuts down (a triple fault). The
/// VMM sees `KVM_EXIT_SHUTDOWN` (or an internal error) and must exit non-zero.
pub fn triple_fault() -> ! {
    #[repr(C, packed)]
    struct EmptyIdt {
        limit: u16,
        base: u64,
    }
    let idt = EmptyIdt { limit: 0, base: 0 };
    // SAFETY: deliberately crashes the VM; nothing runs afterwards.
    unsafe {
        asm!(
            "cli",
            "lidt [{}]",
            "ud2",
            in(reg) &idt,
            options(noreturn, nostack),
        )
    }
}
