//! The ACPI sleep control and status registers of a hardware-reduced ACPI
//! platform (ACPI 6.5 §4.8.3.7), reduced to what a microVM needs: power
//! off.
//!
//! The FADT names these two one-byte I/O ports as `SLEEP_CONTROL_REG` and
//! `SLEEP_STATUS_REG`, and the DSDT's `\_S5_` package gives S5 (soft off)
//! the sleep type [`S5_SLEEP_TYPE`]. Linux powers off by writing
//! `SLP_TYP << 2 | SLP_EN` to the control register: that signals the
//! VMM's exit eventfd, which ends the VM with exit code 0, as a reset
//! does. Every other write (another sleep state, no `SLP_EN`) is ignored
//! and logged once: the VM has no sleep states to enter. Reads return 0
//! (no wake status). There is no interrupt.
//!
//! Ports: [`ACPI_SLEEP_BASE`] control (offset 0), status (offset 1).

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port: the sleep control register; the status register follows.
pub const ACPI_SLEEP_BASE: u64 = 0x600;
/// Length of the port range (two one-byte registers).
pub const ACPI_SLEEP_LEN: u64 = 2;
/// Offset of the sleep control register.
pub const CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const STATUS_OFFSET: u64 = 1;
/// The sleep type the DSDT gives `\_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;

/// `SLP_EN`: enter the sleep state in `SLP_TYP`.
const SLP_EN: u8 = 1 << 5;
/// `SLP_TYP`: bits 2..=4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The registers; see the module docs.
pub struct AcpiSleep {
    exit_evt: EventFd,
    powered_off: bool,
    logged_other: bool,
}

impl AcpiSleep {
    /// Registers that signal `exit_evt` when the guest powers off.
    pub fn new(exit_evt: EventFd) -> Self {
        AcpiSleep {
            exit_evt,
            powered_off: false,
            logged_other: false,
        }
    }

    /// Whether the guest asked for S5.
    pub fn powered_off(&self) -> bool {
        self.powered_off
    }

    fn control(&mut self, value: u8) {
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            if !self.powered_off {
                self.powered_off = true;
                tracing::info!("guest powered off (ACPI S5)");
                if let Err(e) = self.exit_evt.write(1) {
                    tracing::error!("cannot signal the poweroff: {e}");
                }
            }
        } else if !self.logged_other {
            self.logged_other = true;
            tracing::warn!("ACPI sleep control write {value:#04x} ignored (only S5 exists)");
        }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // One-byte registers; the status register's write-1-to-clear bits
        // have nothing to clear.
        if let ([value], CONTROL_OFFSET) = (data, offset) {
            self.control(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (AcpiSleep, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (AcpiSleep::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn s5_with_slp_en_powers_off_once() {
        let (mut d, evt) = dev();
        let poweroff = (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;
        assert_eq!(poweroff, 0x34, "what Linux writes for \\_S5_ = 5");
        d.write(CONTROL_OFFSET, &[poweroff]);
        assert!(d.powered_off());
        d.write(CONTROL_OFFSET, &[poweroff]);
        assert_eq!(
            evt.read().unwrap(),
            1,
            "one exit signal for repeated writes"
        );
    }

    #[test]
    fn other_states_widths_and_offsets_do_nothing() {
        let (mut d, evt) = dev();
        d.write(CONTROL_OFFSET, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN
        d.write(CONTROL_OFFSET, &[(3 << SLP_TYP_SHIFT) | SLP_EN]); // S3
        d.write(STATUS_OFFSET, &[0x34]);
        d.write(CONTROL_OFFSET, &[0x34, 0]);
        d.write(CONTROL_OFFSET, &[]);
        d.write(u64::MAX, &[0x34]);
        assert!(!d.powered_off());
        assert!(evt.read().is_err(), "no exit signal");
        let mut buf = [0xffu8; 4];
        d.read(STATUS_OFFSET, &mut buf);
        assert_eq!(buf, [0; 4]);
        d.read(u64::MAX, &mut buf[..0]);
    }
}
