//! The guest-visible device surface, in one place. Reviewers: this is all
//! the guest can reach outside its RAM and KVM's in-kernel LAPIC, IOAPIC,
//! PIC and PIT.
//!
//! | device      | where                         | interrupt |
//! |-------------|-------------------------------|-----------|
//! | 8250 UART   | ports 0x3f8-0x3ff             | GSI 4     |
//! | i8042       | ports 0x60-0x64 (reset only)  | none      |
//! | boot timer  | MMIO 0xc000_0000, 4 KiB (with `--boot-timer`) | none |

use std::fs::OpenOptions;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use keystone_devices::boot_timer::{
    BootTime, BootTimer, Timestamp, BOOT_TIMER_ADDR, BOOT_TIMER_LEN,
};
use keystone_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use keystone_devices::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use keystone_devices::{Bus, BusError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::SerialConfig;
use crate::vm::Vm;

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// eventfd creation failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The serial output file cannot be opened.
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Registering an irqfd failed.
    #[error("KVM_IRQFD for GSI {gsi} failed: {source}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Two devices claim the same addresses.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
}

/// The devices of one VM and the buses that route guest accesses to them.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The UART, also fed by the event loop with stdin.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Written by the i8042 when the guest resets.
    pub reset_evt: EventFd,
}

impl DeviceManager {
    /// Create every device and attach it.
    pub fn new(
        vm: &Vm,
        serial_cfg: &SerialConfig,
        boot_timer: bool,
        start: Timestamp,
        boot_time_tx: Option<Sender<BootTime>>,
    ) -> Result<Self, DeviceError> {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let out: SerialOut = match serial_cfg {
            SerialConfig::Stdio => Box::new(std::io::stdout()),
            SerialConfig::None => Box::new(std::io::sink()),
            SerialConfig::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| DeviceError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                gsi: COM1_IRQ,
                source,
            })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)?;

        let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(DeviceError::EventFd)?);
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;

        if boot_timer {
            let timer = BootTimer::new(start, boot_time_tx);
            mmio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)?;
        }

        Ok(DeviceManager {
            pio,
            mmio,
            serial,
            reset_evt,
        })
    }
}
