//! Guest physical memory layout (the same as Firecracker's where they
//! overlap, so that tools and kernels built for it work).
//!
//! ```text
//! 0x0000_0500  GDT                 (4 entries)
//! 0x0000_0520  IDT                 (empty: the kernel loads its own)
//! 0x0000_7000  zero page           (Linux boot_params), rsi at entry
//! 0x0000_8ff0  boot stack top      (rsp at entry)
//! 0x0000_9000  PML4                (CR3 at entry)
//! 0x0000_a000  PDPT
//! 0x0000_b000  4 page directories  (identity map of 0..4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000f_0000  MP table          (BIOS area, where Linux scans for it)
//! 0x0010_0000  kernel (HIMEM_START)
//!   ...        RAM, initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (1 GiB): boot timer, later virtio-mmio devices
//! 0xfec0_0000    IOAPIC (in-kernel)
//! 0xfee0_0000    LAPIC (in-kernel)
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location.
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (boot_params).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the four page directories.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line, NUL included (Linux x86's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area (reserved in the e820 map).
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table: the BIOS area 0xf0000-0xfffff, which Linux scans for the
/// floating pointer. (The 1 KiB EBDA holds a table for 32 vCPUs at most.)
pub const MPTABLE_START: u64 = 0xf0000;
/// Room for the MP table.
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// Where the kernel is loaded, and where high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past 32 bits.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// Where KVM keeps the TSS for real-mode emulation (three pages, in the gap).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// In-kernel IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// In-kernel LAPIC (xAPIC mode).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's IOAPIC).
pub const IOAPIC_PINS: u8 = 24;

// The boot stack sits between the zero page and the page tables, and the MP
// table below the kernel: checked at compile time.
const _: () =
    assert!(BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 0x1000 && BOOT_STACK_POINTER < PML4_ADDR);
const _: () = assert!(MPTABLE_START + MPTABLE_MAX_SIZE <= HIMEM_START);

/// The guest RAM ranges for `mem_size` bytes: one range below the MMIO gap
/// and, for guests larger than 3 GiB, one above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (FIRST_ADDR_PAST_32BITS, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        let eight_gib = 8u64 << 30;
        let r = ram_ranges(eight_gib);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, FIRST_ADDR_PAST_32BITS);
        assert_eq!(r[0].1 + r[1].1, eight_gib);
        // Nothing of the gap is RAM.
        for (start, len) in r {
            assert!(start + len <= MMIO_GAP_START || start >= FIRST_ADDR_PAST_32BITS);
        }
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 4 * 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
            (MPTABLE_START, MPTABLE_MAX_SIZE),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }
}
