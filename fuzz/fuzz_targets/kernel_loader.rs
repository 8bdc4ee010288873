//! Kernel image and command-line loading (`keystone_vmm::loader`).
//!
//! The input is written to a temp file (one per process) and identified
//! with `detect_kernel_format`; an ELF or bzImage is then loaded with
//! `load_kernel` into a 4 MiB guest memory. The same bytes, when UTF-8, are
//! a kernel command line for `config::check_cmdline` and
//! `loader::write_cmdline`.
//!
//! Invariants: no panic; the format follows the magic numbers (`\x7fELF`
//! at 0, else `HdrS` at 0x202); a loaded bzImage is entered 0x200 past
//! its load address with a setup header; a command line `check_cmdline`
//! accepts is written by `write_cmdline`, NUL-terminated at the address and
//! with the size it reports.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use keystone_fuzz::temp_dir;
use keystone_vmm::arch::x86_64::layout::CMDLINE_ADDR;
use keystone_vmm::config::check_cmdline;
use keystone_vmm::loader::{detect_kernel_format, load_kernel, write_cmdline, KernelFormat};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| temp_dir("loader").join("kernel"))
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).unwrap();
    let expected = if data.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if data.get(0x202..0x206) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else {
        None
    };
    let format = detect_kernel_format(path()).ok();
    assert_eq!(format, expected);
    if let Some(format) = format {
        let mem = memory();
        if let Ok(k) = load_kernel(&mem, path(), format) {
            if format == KernelFormat::BzImage {
                assert!(k.setup_header.is_some());
                assert!(k.entry >= 0x200);
            }
        }
    }

    if let Ok(cmdline) = std::str::from_utf8(data) {
        if check_cmdline(cmdline).is_ok() {
            let mem = memory();
            let n = write_cmdline(&mem, cmdline)
                .unwrap_or_else(|e| panic!("check_cmdline accepted {cmdline:?}: {e}"));
            let mut back = vec![0u8; n as usize];
            mem.read_slice(&mut back, GuestAddress(CMDLINE_ADDR))
                .unwrap();
            assert_eq!(back.last(), Some(&0), "NUL at the reported size");
            assert!(!back[..back.len() - 1].contains(&0), "no NUL before it");
        }
    }
});
