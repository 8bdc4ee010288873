//! Kernel, initrd and command-line loading, through linux-loader.
//!
//! An ELF vmlinux (or the probe guest, which is an ELF with a 64-bit entry)
//! is entered at `e_entry`; a bzImage at its 64-bit entry, 0x200 past the
//! start of the protected-mode kernel.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START};

/// Kernel image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF64 x86_64 (vmlinux, the probe guest).
    Elf,
    /// Linux bzImage.
    BzImage,
}

/// Errors loading the kernel, initrd or command line.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file cannot be opened or read.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Neither ELF nor bzImage.
    #[error("not a kernel: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// No kernel was given (and nothing to restore).
    #[error("no kernel to boot: give --kernel (or --restore DIR)")]
    NoKernel,
    /// linux-loader refused the image.
    #[error("cannot load the kernel: {0}")]
    Kernel(linux_loader::loader::Error),
    /// The command line is not acceptable.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initrd does not fit.
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Tell an ELF from a bzImage by their magic numbers.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, LoaderError> {
    let mut f = File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(LoaderError::Io(std::io::Error::other("not a regular file")));
    }
    let mut head = Vec::with_capacity(0x210);
    f.by_ref().take(0x210).read_to_end(&mut head)?;
    format_from_header(&head)
}

fn format_from_header(head: &[u8]) -> Result<KernelFormat, LoaderError> {
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::UnknownFormat)
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte past the kernel image.
    pub end: u64,
    /// bzImage setup header, for the zero page.
    pub setup_header: Option<setup_header>,
}

/// Load the kernel at `path` (already identified as `format`).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    format: KernelFormat,
) -> Result<LoadedKernel, LoaderError> {
    let mut f = File::open(path)?;
    let res = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(LoaderError::Kernel)?;
    let start = res.kernel_load.0;
    let entry = match format {
        KernelFormat::Elf => start,
        KernelFormat::BzImage => start + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel {
        entry,
        end: res.kernel_end,
        setup_header: res.setup_header,
    })
}

/// Load the initrd at the top of RAM below the MMIO gap, page aligned,
/// above the kernel. Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u32), LoaderError> {
    let mut f = File::open(path)?;
    let size = f.metadata()?.len();
    let low_end = mem
        .iter()
        .filter(|r| r.start_addr().0 < MMIO_GAP_START)
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0);
    let size32 = u32::try_from(size).map_err(|_| LoaderError::InitrdTooBig { size })?;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(LoaderError::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)?;
    Ok((addr, size32))
}

/// Write the command line at `CMDLINE_ADDR` (surrounding spaces trimmed);
/// returns the size written, NUL included.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, LoaderError> {
    let cmdline = cmdline.trim();
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(LoaderError::Cmdline(format!(
            "{} bytes with the virtio device entries, more than the {} the kernel accepts",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(LoaderError::Kernel)?;
    let written = cl
        .as_cstring()
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_magic() {
        assert_eq!(
            format_from_header(b"\x7fELF\x02\x01").unwrap(),
            KernelFormat::Elf
        );
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(format_from_header(&bz).unwrap(), KernelFormat::BzImage);
        assert!(matches!(
            format_from_header(b"#!/bin/sh\n"),
            Err(LoaderError::UnknownFormat)
        ));
        assert!(matches!(
            format_from_header(&[]),
            Err(LoaderError::UnknownFormat)
        ));
        assert!(matches!(
            detect_kernel_format(Path::new("/nonexistent/vmlinux")),
            Err(LoaderError::Io(_))
        ));
        assert!(matches!(
            detect_kernel_format(Path::new("/")),
            Err(LoaderError::Io(_))
        ));
    }

    #[test]
    fn malformed_elf_is_an_error_not_a_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("ks-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.elf");
        // A truncated ELF header, then a header with absurd program headers.
        std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(load_kernel(&mem, &p, KernelFormat::Elf).is_err());
        let mut hdr = vec![0u8; 64];
        hdr[..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 2; // ELF64
        hdr[5] = 1; // little endian
        hdr[18] = 62; // x86_64
        hdr[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        hdr[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        hdr[56..58].copy_from_slice(&1000u16.to_le_bytes()); // phnum
        std::fs::write(&p, &hdr).unwrap();
        assert!(load_kernel(&mem, &p, KernelFormat::Elf).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bzimage_is_loaded_at_code32_start_and_entered_at_plus_0x200() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("ks-bz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bzImage");
        // One setup sector plus the boot sector, then the protected-mode part.
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        img.extend_from_slice(&payload);
        std::fs::write(&p, &img).unwrap();

        assert_eq!(detect_kernel_format(&p).unwrap(), KernelFormat::BzImage);
        let k = load_kernel(&mem, &p, KernelFormat::BzImage).unwrap();
        assert_eq!(k.entry, 0x10_0200);
        assert_eq!(k.end, 0x10_0000 + 4096);
        let hdr = k.setup_header.expect("setup header");
        let version = hdr.version;
        assert_eq!(version, 0x020f);
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(back, payload);

        // A protocol older than 2.00 is refused, not loaded.
        img[0x206..0x208].copy_from_slice(&0x0100u16.to_le_bytes());
        std::fs::write(&p, &img).unwrap();
        assert!(matches!(
            load_kernel(&mem, &p, KernelFormat::BzImage),
            Err(LoaderError::Kernel(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("ks-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let (addr, size) = load_initrd(&mem, &p, 2 << 20).unwrap();
        assert_eq!(size, 10000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10000 <= 16 << 20);
        let mut back = vec![0u8; 10000];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
        // Above the kernel or not at all.
        assert!(matches!(
            load_initrd(&mem, &p, 16 << 20),
            Err(LoaderError::InitrdTooBig { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cmdline_is_nul_terminated_at_its_address() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let n = write_cmdline(&mem, "console=ttyS0 probe=timer").unwrap();
        assert_eq!(n, 26);
        let mut b = vec![0u8; 26];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b, b"console=ttyS0 probe=timer\0");
        // Found by the kernel_loader fuzz target: surrounding spaces are
        // trimmed and the size reported is the size written.
        let n = write_cmdline(&mem, " @ ").unwrap();
        assert_eq!(n, 2);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b, b"@\0");
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(CMDLINE_MAX_SIZE)),
            Err(LoaderError::Cmdline(_))
        ));
    }
}
