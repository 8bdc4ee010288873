//! The memory routines the compiler may call (`memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp`). There is no libc here, and this target's
//! `compiler_builtins` does not provide them.
//!
//! The same routines as the probe guest's (`guest-image/probe/guest/mem.rs`):
//! single `rep movsb`/`rep stosb` instructions, which the compiler cannot
//! turn back into calls to these functions; the comparison reads bytes with
//! volatile loads for the same reason.

use core::arch::asm;

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: guaranteed by the caller; DF is clear (the ABI requires it).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        )
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy is safe.
        // SAFETY: guaranteed by the caller.
        return unsafe { memcpy(dest, src, n) };
    }
    // Overlap with `dest` above `src`: copy backwards, from the last byte.
    // SAFETY: guaranteed by the caller; DF is set only for this one
    // instruction and cleared again.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        )
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: guaranteed by the caller; DF is clear.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") value as u8,
            options(nostack, preserves_flags),
        )
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: guaranteed by the caller; `i < n`.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
