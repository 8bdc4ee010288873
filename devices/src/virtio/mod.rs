//! Virtio devices over the virtio-mmio transport (virtio 1.x only:
//! `VIRTIO_F_VERSION_1`, split virtqueues through the `virtio-queue` crate).
//!
//! The pieces:
//! - [`mmio::MmioTransport`]: the register file the guest driver programs
//!   (a [`crate::BusDevice`] on the MMIO bus, run on vCPU threads);
//! - a device (`block`, `vsock`, ...): implements [`VirtioDevice`] for the
//!   transport and `event_manager::MutEventSubscriber` for the VMM's event
//!   loop, where all queue processing happens;
//! - [`Interrupt`]: the device's interrupt status register and its irqfd.
//!
//! Notifications: the VMM registers each queue's eventfd (from
//! [`VirtioDevice::queue_events`]) as a KVM ioeventfd on the transport's
//! `QueueNotify` register with the queue index as datamatch, so a guest kick
//! wakes the event loop without a VM exit to userspace. Activation: when the
//! driver sets `DRIVER_OK`, the transport (on a vCPU thread) hands the device
//! its queues through [`VirtioDevice::activate`]; the device stores them and
//! writes its activate eventfd, and its event handler (VMM thread) then
//! starts watching its queue and backend fds.
//!
//! Guest input is hostile: every descriptor, address and length is checked;
//! a malformed request gets an error status (or is dropped with the queue
//! kept consistent), never a panic.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub mod activation;
pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_queue;
pub mod vsock;

/// Feature bit: the device complies with virtio 1.0+ (the only mode here).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
/// Block device id.
pub const TYPE_BLOCK: u32 = 2;
/// Socket device id.
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used buffer was added to a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up the queues the device needs.
    #[error("expected {expected} queues, the driver made {got} ready")]
    BadQueues {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver set ready.
        got: usize,
    },
    /// The device could not wake its event handler.
    #[error("cannot signal activation: {0}")]
    EventFd(std::io::Error),
    /// Backend failure at activation.
    #[error("backend: {0}")]
    Backend(String),
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register
/// shared by the transport and the device, and the irqfd that raises the
/// device's GSI.
pub struct Interrupt {
    status: AtomicU32,
    irq_evt: EventFd,
    logged_error: AtomicBool,
}

impl Interrupt {
    /// An interrupt raised by writing `irq_evt` (registered as a KVM irqfd).
    pub fn new(irq_evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq_evt,
            logged_error: AtomicBool::new(false),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq_evt.write(1) {
            if !self.logged_error.swap(true, Ordering::Relaxed) {
                tracing::error!("virtio: cannot raise interrupt: {e} (logged once)");
            }
        }
    }

    /// Tell the driver it has used buffers to look at.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tell the driver the configuration (or device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Set `bits` without raising the interrupt (a restore).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// The driver acknowledged `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd behind the interrupt (for irqfd registration).
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory, for descriptor chains.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The queues, in index order, each one set ready and valid by the driver.
    pub queues: Vec<Queue>,
    /// Features the driver accepted (a subset of `avail_features`).
    pub acked_features: u64,
}

/// A virtio device as the MMIO transport sees it.
///
/// Everything here is called from vCPU threads (through the transport, with
/// the device's lock held) and must stay cheap: queue processing belongs to
/// the device's event handler on the VMM thread.
pub trait VirtioDevice: Send {
    /// Virtio device id ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled by the guest's QueueNotify (KVM
    /// ioeventfd with datamatch = queue index).
    fn queue_events(&self) -> &[EventFd];
    /// Read the device configuration space at `offset` (guest-controlled;
    /// out-of-range bytes read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device configuration space (guest-controlled; ignore what
    /// is read-only or out of range).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver wrote 0 to Status: drop the queues and return to the
    /// pre-activation state. Backend state (open files, host sockets) may be
    /// released.
    fn reset(&mut self);
    /// Whether the device is active (between activate and reset).
    fn is_activated(&self) -> bool;
    /// Whether the device hit an error it cannot recover from without a
    /// driver reset (reported as DEVICE_NEEDS_RESET in Status).
    fn needs_reset(&self) -> bool {
        false
    }
    /// The live queues' registers while active (indices included), for a
    /// snapshot; empty when inactive.
    fn queue_states(&self) -> Vec<QueueState> {
        Vec::new()
    }
    /// Called once after a restore re-activated the device with its saved
    /// queues: the device tells the driver what did not survive (vsock:
    /// its connections, through the transport-reset event).
    fn restored(&mut self) {}
}

/// A virtqueue's registers and ring positions as a snapshot keeps them
/// (`virtio-queue`'s [`QueueState`], serialisable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Whether the driver made chains available that the device has not taken
/// (assumed so if the ring cannot be read).
pub(crate) fn ring_has_more(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    q.avail_idx(mem, Ordering::Acquire)
        .map_or(true, |idx| idx != std::num::Wrapping(q.next_avail()))
}

/// Copy a device's configuration space, starting at the guest-controlled
/// `offset`, into `data`; bytes past the end of `config` read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(start) = usize::try_from(offset).ok().filter(|&s| s < config.len()) else {
        return;
    };
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Logs a message the first time only (guest-triggered errors must not
/// flood the log).
#[derive(Debug, Default)]
pub struct LogOnce(AtomicBool);

impl LogOnce {
    /// A fresh, not-yet-fired instance.
    pub const fn new() -> Self {
        LogOnce(AtomicBool::new(false))
    }

    /// Warn with `msg` if this is the first call.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::warn!("{msg} (logged once)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_reads_are_windowed_and_zero_filled() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 3];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0]);
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0; 3]);
        let mut d = [0xffu8; 2];
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 2]);
        read_config_bytes(&cfg, 0, &mut []);
    }

    #[test]
    fn interrupt_status_is_set_signalled_and_acked() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Interrupt::new(evt.try_clone().unwrap());
        irq.signal_used_queue();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(evt.read().unwrap(), 1);
        irq.signal_config_change();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.ack(0xffff_ffff);
        assert_eq!(irq.status(), 0);
    }
}
