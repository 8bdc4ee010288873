//! Guest RAM: anonymous, private, `MAP_NORESERVE` mappings (pages are only
//! committed when the guest touches them), split around the 32-bit MMIO gap.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        /// Size of the failed mapping.
        size: u64,
        /// The mmap error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions could not be assembled (overlap or overflow).
    #[error("invalid guest memory layout")]
    Layout,
}

/// Create guest RAM of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let region = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap { size: len, source })?;
        regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(MemoryError::Layout)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn large_guest_is_split_and_gap_is_unmapped() {
        // 6 GiB of address space costs nothing with MAP_NORESERVE.
        let mem = create_guest_memory(6 << 30).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let sizes: Vec<u64> = mem.iter().map(|r| r.len()).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 6 << 30);
        assert!(mem.write_obj(1u8, GuestAddress(MMIO_GAP_START)).is_err());
        mem.write_obj(7u8, GuestAddress(FIRST_ADDR_PAST_32BITS))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(MMIO_GAP_START - 1))
            .unwrap();
    }
}
