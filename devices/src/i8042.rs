//! The i8042 keyboard controller, reduced to what a microVM needs: a guest
//! reset line.
//!
//! The guest reboots by writing `0xFE` (pulse the reset line) to the command
//! port, or by clearing bit 0 of the output port with command `0xD1`. Both
//! signal the VMM's reset eventfd, which ends the VM with exit code 0. The
//! controller answers the probing that Linux's i8042 driver does (self test,
//! control register, interface test) so the guest sees a sane controller, but
//! there is no keyboard behind it and no interrupt line: the device raises
//! no IRQ.
//!
//! Ports: `0x60` data (offset 0), `0x64` status/command (offset 4).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of the controller; the device spans `0x60..=0x64`.
pub const I8042_BASE: u64 = 0x60;
/// Length of the port range.
pub const I8042_LEN: u64 = 5;

const OFS_DATA: u64 = 0;
const OFS_STATUS_CMD: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;

// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_TEST_AUX: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_TEST_KBD: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_RESET_CPU: u8 = 0xFE;

// Replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
const KBD_ACK: u8 = 0xFA;
const KBD_RESET_OK: u8 = 0xAA;
const KBD_CMD_RESET: u8 = 0xFF;

/// Output port bit 0 held low resets the CPU.
const OUTP_RESET_N: u8 = 0x01;
/// Bounded reply queue: a guest that never reads cannot grow it.
const OUT_BUF_CAP: usize = 16;

/// The i8042 controller; see the module docs.
pub struct I8042 {
    reset_evt: EventFd,
    status: u8,
    control: u8,
    outp: u8,
    /// Command waiting for its parameter byte on the data port.
    pending_cmd: Option<u8>,
    out_buf: VecDeque<u8>,
    logged_unknown: bool,
    /// A reset was signalled: the VM is going down. A vCPU writing 0xFE in
    /// a loop until then gets one log line and one eventfd count.
    reset_signalled: bool,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest resets.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            reset_evt,
            status: SB_SYSTEM_FLAG,
            // Keyboard interrupt enabled, system flag, translation: what a
            // PC BIOS leaves behind.
            control: 0x45,
            outp: OUTP_RESET_N,
            pending_cmd: None,
            out_buf: VecDeque::new(),
            logged_unknown: false,
            reset_signalled: false,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.out_buf.len() < OUT_BUF_CAP {
            self.out_buf.push_back(byte);
        }
        self.status |= SB_OUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let byte = self.out_buf.pop_front().unwrap_or(0);
        if self.out_buf.is_empty() {
            self.status &= !SB_OUT_FULL;
        }
        byte
    }

    fn trigger_reset(&mut self) {
        if self.reset_signalled {
            return;
        }
        self.reset_signalled = true;
        tracing::info!("guest requested a reset through the i8042");
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("i8042: cannot signal reset: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_cmd = Some(cmd),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(INTERFACE_OK),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_DISABLE_KBD | CMD_ENABLE_KBD | CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => self.trigger_reset(),
            other => {
                if !self.logged_unknown {
                    self.logged_unknown = true;
                    tracing::warn!(
                        "i8042: ignoring unsupported command {other:#04x} (logged once)"
                    );
                }
            }
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTP) => {
                self.outp = byte;
                if byte & OUTP_RESET_N == 0 {
                    self.trigger_reset();
                }
            }
            // A byte for the (absent) keyboard: acknowledge it the way a
            // keyboard would, so a driver waiting for an ACK moves on.
            _ => {
                self.push(KBD_ACK);
                if byte == KBD_CMD_RESET {
                    self.push(KBD_RESET_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS_CMD => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The controller's registers are one byte wide.
        let [byte] = data else {
            return;
        };
        match offset {
            OFS_DATA => self.data(*byte),
            OFS_STATUS_CMD => self.command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn read(d: &mut I8042, ofs: u64) -> u8 {
        let mut b = [0u8];
        d.read(ofs, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_eventfd() {
        let (mut d, evt) = dev();
        assert!(evt.read().is_err(), "no reset before the command");
        d.write(OFS_STATUS_CMD, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn a_reset_loop_signals_and_logs_once() {
        // A guest writing 0xFE until the VMM stops it: one reset, not one
        // log line per write.
        let (mut d, evt) = dev();
        for _ in 0..1000 {
            d.write(OFS_STATUS_CMD, &[CMD_RESET_CPU]);
            d.write(OFS_STATUS_CMD, &[CMD_WRITE_OUTP]);
            d.write(OFS_DATA, &[0x02]);
        }
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_bit_resets() {
        let (mut d, evt) = dev();
        d.write(OFS_STATUS_CMD, &[CMD_WRITE_OUTP]);
        d.write(OFS_DATA, &[0x03]);
        assert!(evt.read().is_err(), "bit 0 set: no reset");
        d.write(OFS_STATUS_CMD, &[CMD_WRITE_OUTP]);
        d.write(OFS_DATA, &[0x02]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn answers_linux_probe_sequence() {
        let (mut d, evt) = dev();
        d.write(OFS_STATUS_CMD, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, OFS_STATUS_CMD) & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(read(&mut d, OFS_DATA), SELF_TEST_OK);
        assert_eq!(read(&mut d, OFS_STATUS_CMD) & SB_OUT_FULL, 0);

        d.write(OFS_STATUS_CMD, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x61]);
        d.write(OFS_STATUS_CMD, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFS_DATA), 0x61);

        d.write(OFS_DATA, &[KBD_CMD_RESET]);
        assert_eq!(read(&mut d, OFS_DATA), KBD_ACK);
        assert_eq!(read(&mut d, OFS_DATA), KBD_RESET_OK);
        assert!(evt.read().is_err());
    }

    #[test]
    fn hostile_accesses_are_harmless() {
        let (mut d, evt) = dev();
        // Wide writes, empty writes, unknown offsets and commands.
        d.write(OFS_STATUS_CMD, &[CMD_RESET_CPU, 0]);
        d.write(OFS_STATUS_CMD, &[]);
        d.write(2, &[CMD_RESET_CPU]);
        d.write(OFS_STATUS_CMD, &[0x12]);
        d.write(OFS_STATUS_CMD, &[0x13]);
        let mut wide = [0xAAu8; 4];
        d.read(OFS_STATUS_CMD, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        d.read(OFS_DATA, &mut []);
        assert!(evt.read().is_err(), "none of these is a reset");
        // The reply queue is bounded.
        for _ in 0..1000 {
            d.write(OFS_DATA, &[KBD_CMD_RESET]);
        }
        assert!(d.out_buf.len() <= OUT_BUF_CAP);
    }
}
