//! The Linux zero page (`boot_params`): the setup header (from a bzImage, or
//! a minimal one for an ELF kernel), the command line and initrd location,
//! and the e820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::layout::{
    EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_ADDR,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: the kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
const E820_MAX_ENTRIES: usize = 128;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The e820 map has more entries than the zero page holds.
    #[error("the e820 map has too many entries")]
    TooManyE820Entries,
    /// Writing the zero page failed.
    #[error("cannot write the zero page: {0}")]
    Write(linux_loader::configurator::Error),
}

/// Where the pieces the kernel needs to find are.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// Setup header read from a bzImage; `None` for an ELF kernel.
    pub setup_header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Length of the command line including its NUL.
    pub cmdline_size: u32,
    /// Initrd location and size, if any.
    pub initrd: Option<(u64, u32)>,
}

/// The e820 map for `mem_size` bytes of RAM: low memory up to the EBDA,
/// the EBDA reserved, RAM from 1 MiB to the gap, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, t: u32| boot_e820_entry {
        addr,
        size,
        r#type: t,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_size > MMIO_GAP_START {
        map.push(entry(
            FIRST_ADDR_PAST_32BITS,
            mem_size - MMIO_GAP_START,
            E820_RAM,
        ));
    }
    map
}

/// Build the zero page.
pub fn build_boot_params(mem_size: u64, info: &BootInfo) -> Result<boot_params, BootParamsError> {
    let zeroes = vec![0u8; std::mem::size_of::<boot_params>()];
    // `boot_params` is plain old data and packed: any byte pattern of the
    // right length is valid and alignment is 1.
    let mut params = match boot_params::from_slice(&zeroes) {
        Some(p) => *p,
        None => unreachable!("boot_params is packed and the slice has its size"),
    };
    params.hdr = match info.setup_header {
        Some(hdr) => hdr,
        None => setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        },
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_size;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    let map = e820_map(mem_size);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootParamsError::TooManyE820Entries);
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Write the zero page at `ZERO_PAGE_ADDR`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let map = e820_map(512 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the EBDA..1 MiB hole.
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
        let big = e820_map(8 << 30);
        let last = big.last().unwrap();
        let (addr, size) = (last.addr, last.size);
        assert_eq!(addr, FIRST_ADDR_PAST_32BITS);
        assert_eq!(size, (8u64 << 30) - MMIO_GAP_START);
        // No RAM entry touches the MMIO gap.
        for e in &big {
            let (a, s, t) = (e.addr, e.size, e.r#type);
            if t == E820_RAM {
                assert!(a + s <= MMIO_GAP_START || a >= FIRST_ADDR_PAST_32BITS);
            }
        }
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_map() {
        let info = BootInfo {
            setup_header: None,
            cmdline_addr: 0x20000,
            cmdline_size: 12,
            initrd: Some((0x1f00_0000, 4096)),
        };
        let p = build_boot_params(256 << 20, &info).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x228)).unwrap();
        assert_eq!(ptr, 0x20000);
        let size: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x238)).unwrap();
        assert_eq!(size, 12);
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let ramdisk: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x218)).unwrap();
        assert_eq!(ramdisk, 0x1f00_0000);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
        let first_type: u32 = mem
            .read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x2d0 + 16))
            .unwrap();
        assert_eq!(first_type, E820_RAM);
        let loader: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x210)).unwrap();
        assert_eq!(loader, KERNEL_LOADER_OTHER);
    }
}
