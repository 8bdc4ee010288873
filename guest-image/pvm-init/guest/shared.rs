//! What the init and the host-side tests must agree on. Compiled into both
//! the guest (`guest/main.rs`) and the host library (`src/lib.rs`): plain
//! `core` only.

/// Bytes in a disk sector (`/dev/vda` offsets are in these units).
pub const SECTOR_SIZE: usize = 512;

/// The line the init sends on its guest-initiated vsock connection.
pub const VSOCK_GREETING: &str = "hello from pvm-init\n";

/// FNV-1a, 64-bit: the checksum the `disk` step prints over the sectors it
/// reads (cheap, and no tables to build in a no-libc binary).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The 512 bytes the `write` step stores at `sector`: a readable tag, then
/// a byte pattern that depends on the sector number.
pub fn write_pattern(sector: u64) -> [u8; SECTOR_SIZE] {
    let mut buf = [0u8; SECTOR_SIZE];
    let tag = b"KEYSTONE-PVM-INIT";
    buf[..tag.len()].copy_from_slice(tag);
    let mut i = tag.len();
    while i < SECTOR_SIZE {
        buf[i] = (sector.wrapping_mul(131).wrapping_add(i as u64 * 7) & 0xff) as u8;
        i += 1;
    }
    buf
}
