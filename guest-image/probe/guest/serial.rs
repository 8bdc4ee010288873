//! Polled output (and a little input) on the 8250/16550 UART at COM1.
//!
//! Every CPU prints through [`lock`], which serializes whole lines with a
//! spinlock (an `xchg`, nothing wider), so lines from different CPUs never
//! interleave. No `core::fmt`: the emulator runs about a million guest
//! instructions a second, so numbers are printed by the tiny routines below.

use crate::cpu;
use core::sync::atomic::{AtomicBool, Ordering};

/// I/O port base of COM1.
pub const COM1: u16 = 0x3f8;
/// Receiver buffer register (read, DLAB=0).
pub const RBR: u16 = COM1;
/// Transmitter holding register (write, DLAB=0).
pub const THR: u16 = COM1;
/// Interrupt enable register (DLAB=0).
pub const IER: u16 = COM1 + 1;
/// Interrupt identification register (read).
pub const IIR: u16 = COM1 + 2;
/// Modem control register.
pub const MCR: u16 = COM1 + 4;
/// Line status register.
pub const LSR: u16 = COM1 + 5;

/// IER bit 0: interrupt when received data is available.
pub const IER_RX_AVAILABLE: u8 = 0x01;
/// MCR bit 3: OUT2, which gates the UART's interrupt line on a PC.
pub const MCR_OUT2: u8 = 0x08;
/// LSR bit 0: data ready (a byte is waiting in RBR).
pub const LSR_DATA_READY: u8 = 0x01;
/// LSR bit 5: transmitter holding register empty.
pub const LSR_THR_EMPTY: u8 = 0x20;

/// The UART's interrupt line: ISA IRQ 4, wired to IOAPIC pin (GSI) 4.
pub const IRQ: u8 = 4;

/// Held while one CPU writes a line.
static LOCK: AtomicBool = AtomicBool::new(false);

/// Depth of the 16550A transmit FIFO: once LSR says the transmitter is
/// empty, this many bytes can be written without polling again (what
/// Linux's 8250 driver does). Every port access is a VM exit, so this halves
/// the cost of printing.
const TX_FIFO_DEPTH: u8 = 16;

/// Bytes that may still be written before polling LSR again. Only touched
/// with `LOCK` held (or by the crash path, where a stale value at worst
/// costs one extra poll or overruns a FIFO that never fills).
static TX_BUDGET: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Returns whether a received byte is waiting in RBR.
pub fn data_ready() -> bool {
    cpu::inb(LSR) & LSR_DATA_READY != 0
}

/// Reads the received byte from RBR (call only when [`data_ready`]).
pub fn read_byte() -> u8 {
    cpu::inb(RBR)
}

/// Writes one byte, waiting for room in the transmit FIFO.
fn write_raw(byte: u8) {
    let mut budget = TX_BUDGET.load(Ordering::Relaxed);
    if budget == 0 {
        while cpu::inb(LSR) & LSR_THR_EMPTY == 0 {
            cpu::pause();
        }
        budget = TX_FIFO_DEPTH;
    }
    cpu::outb(THR, byte);
    TX_BUDGET.store(budget - 1, Ordering::Relaxed);
}

/// Takes the serial lock; output goes through the returned guard and the
/// lock is released when it is dropped (usually at the end of a statement):
///
/// ```ignore
/// serial::lock().str("probe: cpu ").dec(3).str(" online\n");
/// ```
pub fn lock() -> Writer {
    while LOCK.swap(true, Ordering::Acquire) {
        while LOCK.load(Ordering::Relaxed) {
            cpu::pause();
        }
    }
    Writer { locked: true }
}

/// Takes the serial lock if it frees up within a bounded wait, else prints
/// anyway. For the fatal-error paths, where the lock holder may be the CPU
/// that just crashed.
pub fn lock_or_steal() -> Writer {
    for _ in 0..100_000 {
        if !LOCK.swap(true, Ordering::Acquire) {
            return Writer { locked: true };
        }
        cpu::pause();
    }
    Writer { locked: false }
}

/// Output handle; see [`lock`].
pub struct Writer {
    locked: bool,
}

impl Writer {
    /// Writes raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            write_raw(b);
        }
        self
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Writes one byte.
    pub fn byte(&mut self, b: u8) -> &mut Self {
        write_raw(b);
        self
    }

    /// Writes `n` in decimal (most significant digit first, no buffer).
    pub fn dec(&mut self, n: u64) -> &mut Self {
        let mut divisor = 1;
        while n / divisor >= 10 {
            divisor *= 10;
        }
        loop {
            write_raw(b'0' + (n / divisor % 10) as u8);
            if divisor == 1 {
                break;
            }
            divisor /= 10;
        }
        self
    }

    /// Writes `n` as `0x` followed by lower-case hex digits, no leading zeros.
    pub fn hex(&mut self, n: u64) -> &mut Self {
        self.str("0x");
        let mut shift = 60;
        // Skip leading zero nibbles, but always print the last one.
        while shift > 0 && (n >> shift) & 0xf == 0 {
            shift -= 4;
        }
        loop {
            let nibble = ((n >> shift) & 0xf) as u8;
            write_raw(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            });
            if shift == 0 {
                break;
            }
            shift -= 4;
        }
        self
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}
