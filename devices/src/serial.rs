//! The 8250/16550A UART at `0x3f8`, IRQ 4, over `vm-superio`.
//!
//! Output goes to the VMM's stdout, a file, or nowhere. Input (stdin, when the
//! console is on stdio) is queued into the UART's receive FIFO; what does not
//! fit waits in a bounded host-side buffer and moves into the FIFO as the
//! guest reads. Interrupts are raised by writing the IRQ eventfd, which the
//! VMM registers as a KVM irqfd on GSI 4.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u64 = 8;
/// COM1's legacy interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Host-side input waiting for room in the guest's FIFO. Past this, input is
/// dropped (and that is logged once): a guest that never reads its console
/// cannot make the VMM grow.
pub const PENDING_INPUT_CAP: usize = 64 * 1024;

/// Interrupt line of a device: an eventfd the VMM turns into a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// A writer that passes at most `limit` bytes to `inner` and drops the rest
/// (logged once): a guest must not fill the host's disk through a console
/// log file.
pub struct CappedWriter<W> {
    inner: W,
    left: u64,
    warned: bool,
}

impl<W: Write> CappedWriter<W> {
    /// Wrap `inner`, allowing `limit` bytes.
    pub fn new(inner: W, limit: u64) -> Self {
        CappedWriter {
            inner,
            left: limit,
            warned: false,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = (buf.len() as u64).min(self.left) as usize;
        if take < buf.len() && !self.warned {
            self.warned = true;
            tracing::warn!("serial: console log reached its size limit; dropping further output");
        }
        if take > 0 {
            let n = self.inner.write(&buf[..take])?;
            self.left -= n as u64;
        }
        // Report everything as written: dropped output is not an error.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The UART's registers as a snapshot keeps them (`vm-superio`'s
/// `SerialState`, serialisable).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// Why a saved UART cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// The interrupt eventfd could not be duplicated.
    #[error("serial: cannot duplicate the interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    /// vm-superio refused the state (FIFO too long).
    #[error("serial: the saved state is not valid: {0}")]
    State(String),
}

/// The UART with its input buffer.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    pending: VecDeque<u8>,
    dropped_input: bool,
    logged_error: bool,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and prints to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
            dropped_input: false,
            logged_error: false,
        }
    }

    /// Queue bytes typed by the host user. Returns how many were accepted
    /// (into the FIFO or the pending buffer); the rest were dropped.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let mut accepted = 0;
        if self.pending.is_empty() {
            accepted = self.push_to_fifo(bytes);
        }
        let rest = &bytes[accepted..];
        let room = PENDING_INPUT_CAP.saturating_sub(self.pending.len());
        let take = rest.len().min(room);
        self.pending.extend(&rest[..take]);
        if take < rest.len() && !self.dropped_input {
            self.dropped_input = true;
            tracing::warn!(
                "serial: guest is not reading its console; dropping input (logged once)"
            );
        }
        accepted + take
    }

    /// The UART's registers and receive FIFO, for a snapshot (host input
    /// not yet in the FIFO is not kept).
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Put back a saved UART (same interrupt and output). A FIFO longer
    /// than the UART's is refused.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), SerialRestoreError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(SerialRestoreError::EventFd)?;
        let placeholder = Serial::new(
            IrqTrigger(irq.try_clone().map_err(SerialRestoreError::EventFd)?),
            Box::new(std::io::sink()) as SerialOut,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match Serial::from_state(&state, IrqTrigger(irq), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(SerialRestoreError::State(format!("{e:?}"))),
        }
    }

    /// Bytes waiting for room in the guest's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn push_to_fifo(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(done) => done,
            Err(e) => {
                self.log_error_once(&format!("cannot queue input: {e:?}"));
                0
            }
        }
    }

    fn refill_fifo(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        // At most one FIFO's worth (64 bytes) per refill.
        let chunk: Vec<u8> = self.pending.iter().take(room).copied().collect();
        let done = self.push_to_fifo(&chunk);
        self.pending.drain(..done);
    }

    fn log_error_once(&mut self, msg: &str) {
        if !self.logged_error {
            self.logged_error = true;
            tracing::warn!("serial: {msg} (logged once)");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) else {
            return;
        };
        *first = self.uart.read(reg);
        // Reading the receive buffer (offset 0) may have made room in the
        // FIFO; other registers cannot.
        if reg == 0 {
            self.refill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([byte], Ok(reg)) = (data, u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(reg, *byte) {
            self.log_error_once(&format!("write to register {reg} failed: {e:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn dev() -> (SerialDevice, Capture, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let cap = Capture::default();
        let d = SerialDevice::new(irq.try_clone().unwrap(), Box::new(cap.clone()));
        (d, cap, irq)
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut d, cap, _) = dev();
        for b in b"hi\n" {
            d.write(THR, &[*b]);
        }
        assert_eq!(cap.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_raises_the_interrupt_and_overflows_into_pending() {
        let (mut d, _, irq) = dev();
        // Enable the received-data interrupt.
        d.write(IER, &[0x01]);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(d.enqueue_input(&input), 200);
        assert!(irq.read().unwrap() >= 1);
        assert!(d.pending_input() > 0, "the FIFO holds 64 bytes at most");
        // The guest drains everything, in order, through RBR.
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            d.read(LSR, &mut b);
            if b[0] & 1 == 0 {
                break;
            }
            d.read(THR, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
        assert_eq!(d.pending_input(), 0);
    }

    #[test]
    fn pending_input_is_bounded() {
        let (mut d, _, _) = dev();
        let big = vec![b'x'; PENDING_INPUT_CAP * 2];
        let accepted = d.enqueue_input(&big);
        assert!(accepted < big.len());
        assert!(d.pending_input() <= PENDING_INPUT_CAP);
    }

    #[test]
    fn capped_writer_stops_at_its_limit() {
        let cap = Capture::default();
        let mut w = CappedWriter::new(cap.clone(), 5);
        assert_eq!(w.write(b"abc").unwrap(), 3);
        assert_eq!(w.write(b"defgh").unwrap(), 5);
        assert_eq!(w.write(b"ij").unwrap(), 2);
        assert_eq!(cap.0.lock().unwrap().as_slice(), b"abcde");
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut d, cap, _) = dev();
        d.write(THR, b"ab");
        d.write(THR, &[]);
        d.write(u64::MAX, b"c");
        let mut wide = [0xffu8; 4];
        d.read(u64::MAX, &mut wide);
        assert_eq!(wide, [0; 4]);
        d.read(LSR, &mut []);
        assert!(cap.0.lock().unwrap().is_empty());
    }
}
