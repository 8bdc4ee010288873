//! The Linux `boot_params` "zero page" the VMM hands over in `rsi`, and the
//! kernel command line it points to.
//!
//! Only the command line is read. Layout: Linux
//! `arch/x86/include/uapi/asm/bootparam.h` (`struct boot_params`, with
//! `struct setup_header` at offset 0x1f1).

/// Offset of `hdr.cmd_line_ptr` (u32): physical address of the NUL-terminated
/// command line.
const CMD_LINE_PTR: u64 = 0x228;
/// Offset of `hdr.cmdline_size` (u32): maximum command-line length.
const CMDLINE_SIZE: u64 = 0x238;
/// Upper bound on the command line we read, whatever the zero page claims.
const CMDLINE_MAX: usize = 4096;

/// Returns the kernel command line as bytes (without the NUL), or an empty
/// slice when the zero page carries none.
pub fn cmdline(boot_params: u64) -> &'static [u8] {
    if boot_params == 0 {
        return &[];
    }
    // SAFETY: the boot contract puts the zero page at `boot_params` in
    // identity-mapped RAM; these are two aligned u32 fields inside it.
    let (ptr, size) = unsafe {
        (
            core::ptr::read_volatile((boot_params + CMD_LINE_PTR) as *const u32),
            core::ptr::read_volatile((boot_params + CMDLINE_SIZE) as *const u32),
        )
    };
    if ptr == 0 {
        return &[];
    }
    // `cmdline_size` is a maximum; 0 (unset) means "no limit given".
    let max = match size as usize {
        0 => CMDLINE_MAX,
        n => n.min(CMDLINE_MAX),
    };
    let base = ptr as u64 as *const u8;
    let mut len = 0;
    // SAFETY: the command line is a NUL-terminated string in RAM that the VMM
    // wrote and nobody changes; we read at most `max` bytes of it.
    while len < max && unsafe { core::ptr::read_volatile(base.add(len)) } != 0 {
        len += 1;
    }
    // SAFETY: `base..base+len` was just read and stays unchanged for the life
    // of the probe (nothing writes the command line).
    unsafe { core::slice::from_raw_parts(base, len) }
}

/// The value of the first `probe=` token of `cmdline` (tokens are separated
/// by spaces), or an empty slice when there is none.
pub fn probe_steps(cmdline: &[u8]) -> &[u8] {
    const KEY: &[u8] = b"probe=";
    cmdline
        .split(|&b| b == b' ')
        .find(|token| token.starts_with(KEY))
        .map_or(&[], |token| &token[KEY.len()..])
}
