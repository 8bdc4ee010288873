//! The virtio-mmio transport (virtio 1.x, "version 2" register layout):
//! the register file a guest driver programs to negotiate features, set up
//! split virtqueues and drive the device status machine.
//!
//! Every access is guest-controlled: registers are 32 bits wide and any
//! other access width is ignored (reads as zero); writes outside the phase
//! in which the spec allows them are ignored; each class of misuse is logged
//! once.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    ActivateContext, ActivateError, Interrupt, LogOnce, QueueSnapshot, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::bus::{lock, BusDevice};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify (where the VMM puts the queue ioeventfds).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Register offsets.
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
const REG_QUEUE_USED_LOW: u64 = 0xa0;
const REG_QUEUE_USED_HIGH: u64 = 0xa4;
const REG_CONFIG_GENERATION: u64 = 0xfc;

/// Device status bits (virtio spec 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// What a snapshot keeps of one transport: its registers, the queues as
/// the driver programmed them, and (active) the device's live queues with
/// their ring positions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device behind it (checked on restore).
    pub device_type: u32,
    /// Status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The transport's view of each queue (what the driver wrote).
    pub queues: Vec<QueueSnapshot>,
    /// The device's queues while active, ring positions included.
    pub live_queues: Vec<QueueSnapshot>,
}

/// Why a saved transport cannot be put back.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    /// The saved state is of another device type.
    #[error("the snapshot has virtio device type {saved} here, this VM has {here}")]
    DeviceType {
        /// Saved.
        saved: u32,
        /// This VM's.
        here: u32,
    },
    /// The saved state has another number of queues.
    #[error("the snapshot's device has {saved} queues, this one {here}")]
    QueueCount {
        /// Saved.
        saved: usize,
        /// This VM's.
        here: usize,
    },
    /// A saved queue is not valid (size, addresses).
    #[error("saved queue {0} is not valid")]
    Queue(usize),
    /// The device refused its saved queues.
    #[error("the device refused its saved queues: {0}")]
    Activate(ActivateError),
}

/// One virtio device behind its MMIO register file.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    // Fixed for the device's life: read once so that guest register reads
    // do not wait on the device lock (held by the event loop during I/O).
    device_type: u32,
    avail_features: u64,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    device_status: u32,
    needs_reset: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_unoffered: bool,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    log_width: LogOnce,
    log_phase: LogOnce,
    log_queue: LogOnce,
    log_activate: LogOnce,
}

impl MmioTransport {
    /// Put `device` behind a register file. Queues are created from the
    /// device's maximum sizes (each must be a power of two ≤ 32768; a bad
    /// size is a VMM bug, reported as an error).
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let (queues, device_type, avail_features) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, dev.device_type(), dev.avail_features())
        };
        Ok(MmioTransport {
            device,
            device_type,
            avail_features,
            mem,
            interrupt,
            device_status: 0,
            needs_reset: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unoffered: false,
            queue_sel: 0,
            queues,
            config_generation: 0,
            log_width: LogOnce::new(),
            log_phase: LogOnce::new(),
            log_queue: LogOnce::new(),
            log_activate: LogOnce::new(),
        })
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The state a snapshot keeps (the VM is paused: no vCPU is in here).
    pub fn state(&self) -> TransportState {
        let live_queues = lock(&self.device)
            .queue_states()
            .into_iter()
            .map(QueueSnapshot::from)
            .collect();
        TransportState {
            device_type: self.device_type,
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            live_queues,
        }
    }

    /// Put back a saved state. An active device gets its saved live queues
    /// (the driver does not set DRIVER_OK again), is told it was restored,
    /// and its interrupt is raised once so the driver looks at its rings.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), TransportRestoreError> {
        if s.device_type != self.device_type {
            return Err(TransportRestoreError::DeviceType {
                saved: s.device_type,
                here: self.device_type,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: s.queues.len(),
                here: self.queues.len(),
            });
        }
        let to_queue = |(i, q): (usize, &QueueSnapshot)| {
            Queue::try_from(virtio_queue::QueueState::from(*q))
                .map_err(|_| TransportRestoreError::Queue(i))
        };
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        let active = s.device_status & status::DRIVER_OK != 0;
        let live = if active {
            let live = s
                .live_queues
                .iter()
                .enumerate()
                .map(to_queue)
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(bad) = live.iter().position(|q| !q.is_valid(&self.mem)) {
                return Err(TransportRestoreError::Queue(bad));
            }
            Some(live)
        } else {
            None
        };
        self.queues = queues;
        self.device_status = s.device_status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.ack(u32::MAX);
        self.interrupt.set(s.interrupt_status);
        if let Some(live) = live {
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                queues: live,
                acked_features: self.acked_features,
            };
            let mut dev = lock(&self.device);
            dev.activate(ctx).map_err(TransportRestoreError::Activate)?;
            dev.restored();
            drop(dev);
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Current Status register value.
    pub fn device_status(&self) -> u32 {
        let mut s = self.device_status;
        if self.needs_reset || lock(&self.device).needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn has(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_setup_phase(&self) -> bool {
        self.has(status::FEATURES_OK) && !self.has(status::DRIVER_OK) && !self.has(status::FAILED)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_setup_phase() {
            self.log_phase.warn(format_args!(
                "virtio-mmio: queue register written outside queue setup"
            ));
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => self.log_queue.warn(format_args!(
                "virtio-mmio: guest selected a queue that does not exist"
            )),
        }
    }

    fn reset(&mut self) {
        {
            let mut dev = lock(&self.device);
            if dev.is_activated() {
                dev.reset();
            }
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.needs_reset = false;
        self.acked_features = 0;
        self.acked_unoffered = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn activate(&mut self) -> bool {
        // The device gets its own copies; the transport keeps its view of
        // the registers (QueueReady still reads 1).
        let ready: Vec<Queue> = self
            .queues
            .iter()
            .filter(|q| q.ready())
            .filter_map(|q| Queue::try_from(q.state()).ok())
            .collect();
        if ready.len() != self.queues.iter().filter(|q| q.ready()).count() {
            self.log_activate.warn(format_args!(
                "virtio-mmio: a ready queue has an invalid state"
            ));
            return false;
        }
        if let Some(bad) = ready.iter().position(|q| !q.is_valid(&self.mem)) {
            self.log_activate.warn(format_args!(
                "virtio-mmio: queue {bad} is not valid (size or ring addresses); device needs reset"
            ));
            return false;
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues: ready,
            acked_features: self.acked_features,
        };
        match lock(&self.device).activate(ctx) {
            Ok(()) => true,
            Err(e) => {
                self.log_activate
                    .warn(format_args!("virtio-mmio: activation failed: {e}"));
                false
            }
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (clearing needs a reset).
        if v & self.device_status != self.device_status {
            self.log_phase.warn(format_args!(
                "virtio-mmio: status {v:#x} clears bits of {:#x} without a reset",
                self.device_status
            ));
            return;
        }
        let new = v & !self.device_status;
        let mut accepted = v & !status::DEVICE_NEEDS_RESET;
        if new & status::FEATURES_OK != 0 {
            let avail = self.avail_features;
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.acked_unoffered
                || self.acked_features & !avail != 0
                || self.acked_features & version_1 == 0
            {
                // Refuse: FEATURES_OK does not stick, the driver sees that.
                accepted &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            let features_ok = accepted & status::FEATURES_OK != 0;
            if !features_ok || self.has(status::DRIVER_OK) || !self.activate() {
                accepted &= !status::DRIVER_OK;
                self.needs_reset = features_ok;
                if self.needs_reset {
                    self.interrupt.signal_config_change();
                }
            }
        }
        self.device_status = accepted;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = self.avail_features;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status(),
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if !self.has(status::DRIVER) || self.has(status::FEATURES_OK) {
                    self.log_phase.warn(format_args!(
                        "virtio-mmio: features written outside negotiation"
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Feature words past the first 64 bits: none is offered,
                    // so accepting any makes FEATURES_OK fail.
                    _ => self.acked_unoffered |= v != 0,
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                let mut bad = false;
                self.with_queue(|q| {
                    bad = u16::try_from(v).map_or(true, |n| q.try_set_size(n).is_err());
                });
                if bad {
                    self.log_queue
                        .warn(format_args!("virtio-mmio: invalid queue size {v}"));
                }
            }
            REG_QUEUE_READY => self.with_queue(|q| q.set_ready(v == 1)),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => {
                // Normally caught by the queue's KVM ioeventfd before it gets
                // here; without one (tests, or a host that refused it), kick
                // the device's event loop ourselves.
                let dev = lock(&self.device);
                if let Some(evt) = dev.queue_events().get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            _ => self.log_phase.warn(format_args!(
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            )),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => *word = self.read_reg(offset).to_le_bytes(),
            _ => {
                data.fill(0);
                self.log_width.warn(format_args!(
                    "virtio-mmio: ignoring {}-byte access at {offset:#x} (registers are 32-bit)",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(word))
            }
            _ => self.log_width.warn(format_args!(
                "virtio-mmio: ignoring {}-byte access at {offset:#x} (registers are 32-bit)",
                data.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dummy {
        evts: Vec<EventFd>,
        active: Option<ActivateContext>,
        resets: u32,
        fail_activate: bool,
        config: [u8; 8],
        broken: AtomicBool,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            super::super::TYPE_BLOCK
        }
        fn avail_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 9
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            if let Some(b) = self.config.get_mut(offset as usize) {
                *b = data[0];
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::ActivateError> {
            if self.fail_activate {
                return Err(super::super::ActivateError::Backend("no".into()));
            }
            self.active = Some(ctx);
            Ok(())
        }
        fn reset(&mut self) {
            self.active = None;
            self.resets += 1;
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn needs_reset(&self) -> bool {
            self.broken.load(Ordering::Relaxed)
        }
    }

    fn setup(fail_activate: bool) -> (MmioTransport, Arc<Mutex<Dummy>>, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy {
            evts: vec![
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            ],
            active: None,
            resets: 0,
            fail_activate,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            broken: AtomicBool::new(false),
        }));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let t = MmioTransport::new(mem, dev.clone(), interrupt).unwrap();
        (t, dev, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiate features and set up both queues in valid memory.
    fn bring_up(t: &mut MmioTransport) {
        w(t, REG_STATUS, status::ACKNOWLEDGE);
        w(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, 1 << 9);
        w(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(t, REG_STATUS) & status::FEATURES_OK, 0);
        for (i, size) in [(0u32, 16u32), (1, 8)] {
            w(t, REG_QUEUE_SEL, i);
            w(t, REG_QUEUE_NUM, size);
            let base = 0x1000 * (i + 1) * 4;
            w(t, REG_QUEUE_DESC_LOW, base);
            w(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
            w(t, REG_QUEUE_USED_LOW, base + 0x2000);
            w(t, REG_QUEUE_READY, 1);
        }
    }

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = setup(false);
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 2);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1 << 9);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 4];
        t.read(CONFIG_SPACE_OFFSET + 6, &mut cfg);
        assert_eq!(cfg, [7, 8, 0, 0]);
    }

    #[test]
    fn full_bring_up_activates_with_ready_queues() {
        let (mut t, dev, _) = setup(false);
        bring_up(&mut t);
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);
        let d = dev.lock().unwrap();
        let ctx = d.active.as_ref().expect("activated");
        assert_eq!(ctx.queues.len(), 2);
        assert_eq!(ctx.acked_features, 1 << 32 | 1 << 9);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        let (mut t, _, _) = setup(false);
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 9);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, REG_STATUS) & status::FEATURES_OK,
            0,
            "no VERSION_1"
        );

        let (mut t, _, _) = setup(false);
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1 | 1 << 4);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, REG_STATUS) & status::FEATURES_OK,
            0,
            "unoffered bit"
        );

        let (mut t, _, _) = setup(false);
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 5);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0, "word 5");
    }

    #[test]
    fn invalid_queues_or_failed_activation_need_reset() {
        // A queue whose rings lie outside guest memory.
        let (mut t, dev, irq) = setup(false);
        bring_up(&mut t);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0xffff_ffff);
        w(&mut t, REG_STATUS, 0xf);
        let st = r(&mut t, REG_STATUS);
        assert_eq!(st & status::DRIVER_OK, 0);
        assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().active.is_none());
        assert_eq!(irq.read().unwrap(), 1, "config interrupt");
        // Reset clears it and the device can come up again.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        bring_up(&mut t);
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf);

        let (mut t, _, _) = setup(true);
        bring_up(&mut t);
        w(&mut t, REG_STATUS, 0xf);
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_only_in_setup_phase_and_sizes_checked() {
        let (mut t, _, _) = setup(false);
        // Before FEATURES_OK: ignored.
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        bring_up(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 3); // not a power of two
        w(&mut t, REG_QUEUE_NUM, 1 << 20); // not even 16 bits
        w(&mut t, REG_QUEUE_SEL, 99);
        w(&mut t, REG_QUEUE_READY, 1); // no such queue
        w(&mut t, REG_STATUS, 0xf);
        assert_eq!(r(&mut t, REG_STATUS), 0xf, "bad writes were ignored");
        // After DRIVER_OK queue registers are frozen.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
    }

    #[test]
    fn hostile_widths_offsets_and_status_games() {
        let (mut t, dev, _) = setup(false);
        let mut b2 = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(REG_STATUS, &[0xf]);
        t.write(REG_STATUS + 2, &0xfu32.to_le_bytes());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        // DRIVER_OK without FEATURES_OK never activates.
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert!(dev.lock().unwrap().active.is_none());
        // Clearing bits without a reset is ignored.
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        for off in (0..0x100).step_by(4) {
            w(&mut t, off, 0xffff_ffff);
            let _ = r(&mut t, off);
        }
        let mut big = [0u8; 64];
        t.read(u64::MAX - 8, &mut big[..8]);
        t.write(u64::MAX - 8, &big[..8]);
        // The device-reported error shows in Status.
        dev.lock().unwrap().broken.store(true, Ordering::Relaxed);
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn notify_and_interrupt_ack() {
        let (mut t, dev, irq) = setup(false);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(dev.lock().unwrap().evts[1].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 1000); // no such queue: ignored
        t.interrupt().signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        // Reset after activation resets the device.
        bring_up(&mut t);
        w(&mut t, REG_STATUS, 0xf);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }
}
