//! The I/O APIC (KVM's in-kernel model, 24 pins, at 0xFEC0_0000).

use crate::cpu;

/// Physical base address of the I/O APIC.
pub const BASE: u64 = 0xfec0_0000;
/// IOREGSEL: index of the register IOWIN accesses.
const IOREGSEL: u64 = BASE;
/// IOWIN: data window of the selected register.
const IOWIN: u64 = BASE + 0x10;
/// Number of redirection entries (pins) of KVM's I/O APIC.
pub const PINS: u8 = 24;
/// Index of the low half of redirection entry 0; entry n is at 0x10 + 2n.
const REDIR_BASE: u32 = 0x10;

/// Redirection entry low bits: fixed delivery (bits 10:8 = 0), physical
/// destination (bit 11 = 0), active high (bit 13 = 0), edge (bit 15 = 0),
/// unmasked (bit 16 = 0); the vector goes in bits 7:0.
pub const FIXED_EDGE_HIGH: u32 = 0;
/// Redirection entry low bit 16: masked.
pub const MASKED: u32 = 1 << 16;

fn write(reg: u32, value: u32) {
    // SAFETY: IOREGSEL/IOWIN are the I/O APIC's two MMIO registers; selecting
    // a register and writing it only affects interrupt routing.
    unsafe {
        cpu::mmio_write32(IOREGSEL, reg);
        cpu::mmio_write32(IOWIN, value);
    }
}

/// Routes `pin` to `vector` on the CPU with APIC id `dest`; `flags` are
/// OR-ed into the low half (e.g. [`FIXED_EDGE_HIGH`] or [`MASKED`]).
/// The high half is written first, so the entry is never live half-written.
pub fn route(pin: u8, vector: u8, dest: u8, flags: u32) {
    let index = REDIR_BASE + 2 * u32::from(pin);
    write(index, MASKED | u32::from(vector));
    write(index + 1, u32::from(dest) << 24);
    write(index, flags | u32::from(vector));
}
