//! The guest-visible device surface, in one place. Reviewers: this is all
//! the guest can reach outside its RAM and KVM's in-kernel LAPIC, IOAPIC,
//! PIC and PIT.
//!
//! | device      | where                         | interrupt |
//! |-------------|-------------------------------|-----------|
//! | 8250 UART   | ports 0x3f8-0x3ff             | GSI 4     |
//! | i8042       | ports 0x60-0x64 (reset only)  | none      |
//! | ACPI sleep registers | ports 0x600-0x601 (poweroff only) | none |
//! | boot timer  | MMIO 0xc000_0000, 4 KiB (with `--boot-timer`) | none |
//! | virtio-mmio | MMIO 0xc000_1000 + 4 KiB × n, one per device  | GSI 5 + n |
//!
//! virtio devices, in order: each `--disk` (virtio-blk, 1 queue of 256),
//! then `--net` (virtio-net, rx + tx queues of 256, passt or tap backend),
//! then `--vsock` (3 queues of 256). Each is announced to the guest kernel
//! as `virtio_mmio.device=4K@<base>:<gsi>` on its command line and in the
//! ACPI DSDT (`arch::x86_64::acpi`); queue notifications are KVM
//! ioeventfds and interrupts KVM irqfds.

use std::fs::OpenOptions;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use keystone_devices::acpi_sleep::{AcpiSleep, ACPI_SLEEP_BASE, ACPI_SLEEP_LEN};
use keystone_devices::bus::lock;

use event_manager::MutEventSubscriber;
use keystone_devices::boot_timer::{
    BootTime, BootTimer, Timestamp, BOOT_TIMER_ADDR, BOOT_TIMER_LEN,
};
use keystone_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use keystone_devices::serial::{
    CappedWriter, SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use keystone_devices::virtio::block::{Block, BlockError};
use keystone_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
use keystone_devices::virtio::net::{open_macvtap, open_tap, Egress, Net, NetBackend};
use keystone_devices::virtio::vsock::{Vsock, VsockError};
use keystone_devices::virtio::{Interrupt, VirtioDevice};
use keystone_devices::{Bus, BusError};
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::acpi::MmioDevice;
use crate::config::{SerialConfig, VmConfig};
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
    /// Registering an ioeventfd failed.
    #[error("KVM_IOEVENTFD at {addr:#x} failed: {source}")]
    Ioeventfd {
        /// The MMIO address.
        addr: u64,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A disk image cannot be used.
    #[error("--disk {path}: {source}")]
    Block {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        source: BlockError,
    },
    /// The network backend cannot be set up.
    #[error(transparent)]
    NetSetup(#[from] crate::net::NetError),
    /// The virtio-net device cannot be created.
    #[error("--net: {0}")]
    Net(#[from] keystone_devices::virtio::net::NetError),
    /// The vsock device cannot be created.
    #[error("--vsock: {0}")]
    Vsock(#[from] VsockError),
    /// A virtio queue size is not valid (a VMM bug).
    #[error("virtio queue setup: {0:?}")]
    Queue(virtio_queue::Error),
    /// More virtio devices than GSIs.
    #[error("too many virtio devices")]
    TooManyDevices,
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
    /// Written by the i8042 when the guest resets: ends the VM.
    pub reset_evt: EventFd,
    /// Written by the ACPI sleep registers when the guest powers off: ends
    /// the VM.
    pub poweroff_evt: EventFd,
    /// Devices with work for the event loop (virtio queue processing).
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub cmdline_entries: Vec<String>,
    /// The virtio-mmio windows, for the ACPI DSDT.
    pub mmio_devices: Vec<MmioDevice>,
    /// The virtio-mmio transports, in window order (snapshots).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Whether the boot timer is present.
    pub boot_timer: bool,
    /// The passt process serving `--net user`, if any. It quits when the
    /// VMM's end of its socket closes, and dies with the VMM.
    pub passt: Option<std::process::Child>,
}

/// Most bytes of guest console output written to a `--serial file:` log.
pub const SERIAL_FILE_LIMIT: u64 = 64 << 20;

/// Base of the first virtio-mmio window (right after the boot timer).
pub const VIRTIO_MMIO_BASE: u64 = BOOT_TIMER_ADDR + BOOT_TIMER_LEN;
/// GSI of the first virtio device; they go up to the IOAPIC's last pin.
pub const VIRTIO_FIRST_GSI: u32 = 5;
const IOAPIC_LAST_GSI: u32 = 23;

impl DeviceManager {
    /// Create every device of `config` and attach it.
    pub fn new(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        config: &VmConfig,
        start: Timestamp,
        boot_time_tx: Option<Sender<BootTime>>,
    ) -> Result<Self, DeviceError> {
        let serial_cfg = &config.serial;
        let boot_timer = config.boot_timer;
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let out: SerialOut = match serial_cfg {
            // Redirected to a regular file (e.g. a sandbox's console.log):
            // the same cap as --serial file:, so a chatty guest cannot fill
            // the host's disk.
            SerialConfig::Stdio if stdout_is_regular_file() => {
                Box::new(CappedWriter::new(std::io::stdout(), SERIAL_FILE_LIMIT))
            }
            SerialConfig::Stdio => Box::new(std::io::stdout()),
            SerialConfig::None => Box::new(std::io::sink()),
            SerialConfig::File(path) => Box::new(CappedWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| DeviceError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
                SERIAL_FILE_LIMIT,
            )),
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
        let poweroff_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let sleep = AcpiSleep::new(poweroff_evt.try_clone().map_err(DeviceError::EventFd)?);
        pio.insert(Arc::new(Mutex::new(sleep)), ACPI_SLEEP_BASE, ACPI_SLEEP_LEN)?;

        if boot_timer {
            let timer = BootTimer::new(start, boot_time_tx);
            mmio.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)?;
        }

        let mut dm = DeviceManager {
            pio,
            mmio,
            serial,
            reset_evt,
            poweroff_evt,
            subscribers: Vec::new(),
            cmdline_entries: Vec::new(),
            mmio_devices: Vec::new(),
            transports: Vec::new(),
            boot_timer,
            passt: None,
        };
        for disk in &config.disks {
            let block =
                Block::new(&disk.path, disk.read_only).map_err(|source| DeviceError::Block {
                    path: disk.path.clone(),
                    source,
                })?;
            dm.add_virtio(vm, mem, Arc::new(Mutex::new(block)))?;
        }
        if let Some(n) = &config.net {
            let mut mac = n.mac;
            let (backend, egress) = match &n.mode {
                crate::net::NetMode::User => {
                    let plan = crate::net::host_passt_plan();
                    if plan.no_dns {
                        tracing::warn!(
                            "the host's resolver is on loopback and there is no default route \
                             to reach it through: the guest gets no DNS"
                        );
                    }
                    let (child, sock) = crate::net::spawn_passt(&plan)?;
                    dm.passt = Some(child);
                    (NetBackend::Stream(sock), Egress::dns_only(plan.dns_only))
                }
                crate::net::NetMode::Tap(name) => {
                    (NetBackend::Tap(open_tap(name)?), Egress::default())
                }
                crate::net::NetMode::Macvtap(name) => {
                    let (file, link_mac) = open_macvtap(name)?;
                    mac = link_mac;
                    (NetBackend::Tap(file), Egress::default())
                }
            };
            let net = Net::new(mac, backend)?.with_egress(egress);
            dm.add_virtio(vm, mem, Arc::new(Mutex::new(net)))?;
        }
        if let Some(v) = &config.vsock {
            let vsock = Vsock::new(u64::from(v.cid), &v.uds_path)?;
            dm.add_virtio(vm, mem, Arc::new(Mutex::new(vsock)))?;
        }
        Ok(dm)
    }

    /// Put a virtio device behind the next MMIO window and GSI.
    fn add_virtio<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        dev: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let index = self.cmdline_entries.len() as u32;
        let gsi = VIRTIO_FIRST_GSI + index;
        if gsi > IOAPIC_LAST_GSI {
            return Err(DeviceError::TooManyDevices);
        }
        let base = VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE;

        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.fd
            .register_irqfd(&irq_evt, gsi)
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        let interrupt = Arc::new(Interrupt::new(irq_evt));

        let notify = base + NOTIFY_REG_OFFSET;
        for (queue, evt) in lock(&dev).queue_events().iter().enumerate() {
            vm.fd
                .register_ioevent(evt, &IoEventAddress::Mmio(notify), queue as u32)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: notify,
                    source,
                })?;
        }
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport =
            MmioTransport::new(mem.clone(), as_virtio, interrupt).map_err(DeviceError::Queue)?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.transports.push(transport);
        self.subscribers.push(dev);
        self.cmdline_entries
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.mmio_devices.push(MmioDevice {
            base,
            len: MMIO_WINDOW_SIZE,
            gsi,
        });
        Ok(())
    }
}

impl DeviceManager {
    /// Our devices' state, for a snapshot (the vCPUs are paused).
    pub fn save_state(&self) -> crate::snapshot::DeviceStates {
        crate::snapshot::DeviceStates {
            serial: lock(&self.serial).state(),
            boot_timer: self.boot_timer,
            virtio: self.transports.iter().map(|t| lock(t).state()).collect(),
        }
    }

    /// Put back saved device state: the same devices, in the same order,
    /// or an error naming the difference.
    pub fn restore_state(
        &self,
        s: &crate::snapshot::DeviceStates,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        use crate::snapshot::SnapshotError;
        if s.virtio.len() != self.transports.len() {
            return Err(SnapshotError::Device(format!(
                "the snapshot has {} virtio devices, this VM {} (give the same --disk/--net/--vsock)",
                s.virtio.len(),
                self.transports.len()
            )));
        }
        lock(&self.serial)
            .restore(&s.serial)
            .map_err(|e| SnapshotError::Device(e.to_string()))?;
        for (i, (t, state)) in self.transports.iter().zip(&s.virtio).enumerate() {
            lock(t)
                .restore(state)
                .map_err(|e| SnapshotError::Device(format!("virtio device {i}: {e}")))?;
        }
        Ok(())
    }
}

/// Whether our stdout is a regular file (not a terminal or a pipe).
fn stdout_is_regular_file() -> bool {
    std::fs::metadata("/proc/self/fd/1").is_ok_and(|m| m.is_file())
}
