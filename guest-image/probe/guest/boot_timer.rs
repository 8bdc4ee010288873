//! Firecracker's boot timer: a guest write of the magic byte to its MMIO
//! address makes the VMM log (and here: record) the time since start.

use crate::cpu;

/// Guest-physical address of the boot timer device.
const ADDRESS: u64 = 0xc000_0000;
/// The byte Firecracker's `BootTimer` recognizes.
const MAGIC: u8 = 123;

/// Signals "boot finished" to the VMM.
pub fn signal() {
    // SAFETY: 0xC000_0000 is the boot timer's MMIO register (in the 32-bit
    // MMIO gap, identity-mapped); the write only reaches the VMM.
    unsafe { cpu::mmio_write8(ADDRESS, MAGIC) }
}
