//! Console lines. Each line is built in a fixed buffer and written to fd 1
//! (the kernel's /dev/console) with one write(2), so lines from the init
//! and a forked child never interleave mid-line.

use crate::sys;

const CAP: usize = 1024;

pub struct Line {
    buf: [u8; CAP],
    len: usize,
}

/// A line starting with `pvm-init: `.
pub fn line() -> Line {
    let mut l = Line {
        buf: [0; CAP],
        len: 0,
    };
    l.push(b"pvm-init: ");
    l
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = CAP - 1 - self.len; // keep one byte for the newline
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub fn str(mut self, s: &str) -> Self {
        self.push(s.as_bytes());
        self
    }

    /// Raw bytes; control characters (a trailing newline included) are
    /// dropped so one line stays one line.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        for &c in b {
            if c >= 0x20 && c != 0x7f {
                self.push(&[c]);
            }
        }
        self
    }

    pub fn dec(mut self, mut v: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
        self
    }

    /// `0x` and 16 lowercase hex digits.
    pub fn hex64(mut self, v: u64) -> Self {
        let mut s = [0u8; 18];
        s[0] = b'0';
        s[1] = b'x';
        for i in 0..16 {
            let nib = ((v >> ((15 - i) * 4)) & 0xf) as u8;
            s[2 + i] = if nib < 10 { b'0' + nib } else { b'a' + nib - 10 };
        }
        self.push(&s);
        self
    }

    /// Guest uptime as ` (t=S.mmm s)`.
    pub fn uptime(self) -> Self {
        let us = sys::uptime_us();
        let ms = us / 1000;
        let frac = ms % 1000;
        let s = self.str(" (t=").dec(ms / 1000).str(".");
        let s = if frac < 100 { s.str("0") } else { s };
        let s = if frac < 10 { s.str("0") } else { s };
        s.dec(frac).str(" s)")
    }

    /// Writes the line and a newline to fd 1.
    pub fn print(mut self) {
        self.buf[self.len] = b'\n';
        self.len += 1;
        let _ = sys::write_all(1, &self.buf[..self.len]);
    }
}
