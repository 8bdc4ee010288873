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

/// The value of the first space-separated token of `cmdline` that starts
/// with `key` (which includes the `=`), e.g. `value(c, b"probe.vsock_connect=")`.
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ')
        .find(|token| token.starts_with(key))
        .map(|token| &token[key.len()..])
}

/// Parses an unsigned number: decimal, or hexadecimal after `0x`/`0X`.
/// `None` for an empty string, any other character, or overflow.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        n = n.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(n)
}
