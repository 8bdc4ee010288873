//! virtio-net (virtio 1.x spec, section 5.1) over a user-mode (passt) or
//! tap backend.
//!
//! Two queues: receive (0) and transmit (1), no control queue, no
//! multiqueue. Features offered: `VIRTIO_F_VERSION_1` and
//! `VIRTIO_NET_F_MAC` only: no checksum offload, TSO or mergeable receive
//! buffers, so every frame is a complete Ethernet frame with a valid
//! checksum, and every buffer (either way) starts with a 12-byte
//! `virtio_net_hdr_v1` that carries nothing but `num_buffers = 1` on
//! receive.
//!
//! Backends ([`NetBackend`]):
//! - `Stream`: a connected stream socket to passt, in QEMU's stream netdev
//!   framing: each Ethernet frame is preceded by its length as a 4-byte
//!   big-endian integer (no virtio header).
//! - `Tap`: a `/dev/net/tun` fd set up by [`open_tap`] (`IFF_TAP |
//!   IFF_NO_PI | IFF_VNET_HDR`, 12-byte vnet header, no offloads): one read
//!   or write is one frame after a 12-byte header.
//!
//! Flow control, both ways, holds at most one frame in the device:
//! - TX: a chain is copied into a fixed buffer and written to the backend;
//!   when the backend would block, that frame stays pending, the device
//!   stops taking TX chains and watches the backend for `EPOLLOUT`.
//! - RX: the backend is read only while the guest has a receive buffer
//!   posted (its fd is otherwise not watched for input, until the guest
//!   kicks the receive queue), and only one frame at a time, so frames wait
//!   in the backend's socket buffer, never here.
//!
//! Everything in a chain is guest-controlled: malformed chains are returned
//! (used length 0) and counted, each class of error is logged once. A
//! backend that closes or fails (EOF, `EPIPE`, `ECONNRESET`, a bad stream
//! length, ...) is logged once and dropped; the VM keeps running, its
//! transmitted frames are then dropped and counted.
//!
//! Work per wake-up is bounded: at most [`MAX_CHAINS_PER_EVENT`] chains per
//! queue (the TX queue eventfd is re-armed when more may remain; RX comes
//! back through its level-triggered backend fd).

use std::io;
use std::num::Wrapping;
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::activation::{Activation, Active};
use super::ring_has_more;
use super::{ActivateContext, ActivateError, LogOnce, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};

mod backend;
mod egress;
#[cfg(test)]
mod tests;

pub use backend::{open_macvtap, open_tap, NetBackend};
pub use egress::Egress;
use egress::Refusal;

/// Receive queue index.
pub const RXQ: usize = 0;
/// Transmit queue index.
pub const TXQ: usize = 1;
/// Number of queues (no control queue, no multiqueue).
pub const NUM_QUEUES: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (without virtio header) carried either way.
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest frame accepted from the guest (an Ethernet header).
pub const MIN_FRAME_LEN: usize = 14;
/// Most descriptor chains taken from one queue per wake-up.
pub const MAX_CHAINS_PER_EVENT: usize = QUEUE_SIZE as usize;
/// Length of the stream framing prefix (big-endian frame length).
const STREAM_PREFIX_LEN: usize = 4;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Most descriptors accepted in one chain.
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// Bytes of the configuration space backed by a field (`mac`).
const CONFIG_LEN: usize = 6;
/// Longest tap interface name (`IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME_LEN: usize = 15;

// The TX buffer holds the header and the frame; the stream prefix goes in
// the header's last four bytes.
const _: () = assert!(STREAM_PREFIX_LEN <= VNET_HDR_LEN);
// Used lengths fit a u32, frame lengths the stream prefix.
const _: () = assert!(VNET_HDR_LEN + MAX_FRAME_LEN < u32::MAX as usize);

/// Errors creating a network device or opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
    /// The backend fd could not be made non-blocking.
    #[error("cannot make the network backend non-blocking: {0}")]
    Backend(io::Error),
    /// The tap name is not a valid interface name.
    #[error("invalid tap name {0:?}: 1 to 15 bytes, no '/', ':', '%', NUL or whitespace")]
    TapName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    TapOpen(io::Error),
    /// No network interface of that name (for `macvtap=`).
    #[error("no network interface {0}: create the macvtap link first, e.g. `ip link add link eth0 name {0} type macvtap mode bridge && ip link set {0} up` (needs CAP_NET_ADMIN)")]
    NoLink(String),
    /// The interface exists but is not a macvtap link.
    #[error("{0} is not a macvtap link (no /sys/class/net/{0}/macvtap): create one with `ip link add link <parent> name <name> type macvtap mode bridge`")]
    NotMacvtap(String),
    /// The macvtap character device could not be opened.
    #[error("cannot open {path} for macvtap {name}: {source} (it needs root or read-write access to that device)")]
    MacvtapOpen {
        /// The interface name.
        name: String,
        /// `/dev/tap<ifindex>`.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A tap ioctl failed.
    #[error("cannot set up tap {name}: {op}: {source}")]
    TapIoctl {
        /// The interface name.
        name: String,
        /// The ioctl.
        op: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// Traffic counters (frames and bytes are Ethernet frames, without the
/// virtio header or stream prefix).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent that reached the backend.
    pub tx_frames: u64,
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes: u64,
    /// Bytes of the frames that reached the backend.
    pub tx_bytes: u64,
    /// Guest frames (or malformed TX chains) dropped.
    pub tx_dropped: u64,
    /// Backend frames dropped (too large for the guest's buffer, ...).
    pub rx_dropped: u64,
}

/// Classes of guest errors, each logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestError {
    /// A TX chain with a device-writable descriptor.
    TxWritable,
    /// A TX chain shorter than the virtio header.
    TxShortHeader,
    /// A TX frame shorter than an Ethernet header.
    TxShortFrame,
    /// A TX frame over [`MAX_FRAME_LEN`].
    TxTooLarge,
    /// An RX chain with a device-readable descriptor.
    RxReadable,
    /// An RX chain too small for the header and any frame.
    RxTooSmall,
    /// A frame larger than the RX chain offered for it.
    RxFrameTooLarge,
    /// A buffer (partly) outside guest memory.
    BadAddress,
    /// More descriptors in a chain than the device accepts.
    ChainTooLong,
    /// An avail ring entry names a descriptor beyond the queue.
    BadHead,
    /// A TX frame to a loopback or "this host" address ([`egress`]).
    TxToHostItself,
    /// A TX frame to a DNS-only address, not to port 53 ([`Egress`]).
    TxNotDns,
}

impl GuestError {
    const COUNT: usize = GuestError::TxNotDns as usize + 1;

    fn describe(self) -> &'static str {
        match self {
            GuestError::TxWritable => "TX chain with a device-writable descriptor (dropped)",
            GuestError::TxShortHeader => "TX chain shorter than the 12-byte header (dropped)",
            GuestError::TxShortFrame => "TX frame shorter than an Ethernet header (dropped)",
            GuestError::TxTooLarge => "TX frame larger than 65550 bytes (dropped)",
            GuestError::RxReadable => "RX chain with a device-readable descriptor (returned)",
            GuestError::RxTooSmall => "RX chain too small for any frame (returned)",
            GuestError::RxFrameTooLarge => "frame larger than the RX buffer (frame dropped)",
            GuestError::BadAddress => "buffer outside guest memory",
            GuestError::ChainTooLong => "descriptor chain too long",
            GuestError::BadHead => "avail ring entry beyond the queue (dropped)",
            GuestError::TxToHostItself => {
                "TX frame to a loopback or this-host address (dropped: the host's loopback is not the guest's)"
            }
            GuestError::TxNotDns => {
                "TX frame to the gateway other than DNS (dropped: the gateway leads to the host's loopback, where only its resolver is the guest's)"
            }
        }
    }
}

/// One descriptor, as the device needs it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    writable: bool,
}

/// The backend and how it is watched.
struct Link {
    /// `None` once the backend closed or failed.
    backend: Option<NetBackend>,
    /// A dead backend still registered with epoll, to unregister and close.
    graveyard: Option<NetBackend>,
    /// Interest registered for the backend fd (empty: not registered).
    watched: EventSet,
    closed: LogOnce,
    protocol: LogOnce,
    tap_tx: LogOnce,
}

impl Link {
    /// The backend closed or failed: stop using it (it is unregistered and
    /// closed at the next epoll sync).
    fn kill(&mut self, why: std::fmt::Arguments<'_>) {
        if let Some(b) = self.backend.take() {
            self.closed.warn(format_args!(
                "virtio-net: backend closed; the VM keeps running without network ({why})"
            ));
            self.graveyard = Some(b);
        }
    }
}

/// Transmit state: one frame buffer, `[header area][frame]`.
struct Tx {
    buf: Vec<u8>,
    /// Bytes of `buf` still to write, and the frame length.
    pending: Option<(usize, usize, usize)>,
}

/// Receive state: one frame buffer, `[header][frame]`.
struct Rx {
    buf: Vec<u8>,
    prefix: [u8; STREAM_PREFIX_LEN],
    prefix_have: usize,
    frame_len: usize,
    frame_have: usize,
    /// A whole frame is in `buf[VNET_HDR_LEN..][..frame_len]`.
    ready: bool,
    /// The guest had a receive buffer posted when last looked at.
    has_buffers: bool,
}

/// Result of trying to read one frame.
enum ReadOutcome {
    Ready,
    NotYet,
    Dropped,
    Dead,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    egress: Egress,
    link: Link,
    tx: Tx,
    rx: Rx,
    counters: NetCounters,
    activation: Activation<NUM_QUEUES>,
    descs: Vec<Desc>,
    /// Chains per queue per wake-up ([`MAX_CHAINS_PER_EVENT`]; tests lower
    /// it).
    batch: usize,
    guest_errors: [LogOnce; GuestError::COUNT],
    queue_error: LogOnce,
    unexpected: LogOnce,
    epoll_error: LogOnce,
}

impl Net {
    /// A device with MAC address `mac` in front of `backend` (made
    /// non-blocking here).
    pub fn new(mac: [u8; 6], backend: NetBackend) -> Result<Net, NetError> {
        backend.set_nonblocking().map_err(NetError::Backend)?;
        Ok(Net {
            mac,
            egress: Egress::default(),
            link: Link {
                backend: Some(backend),
                graveyard: None,
                watched: EventSet::empty(),
                closed: LogOnce::new(),
                protocol: LogOnce::new(),
                tap_tx: LogOnce::new(),
            },
            tx: Tx {
                buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
                pending: None,
            },
            rx: Rx {
                // One spare byte tells a truncated tap read.
                buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
                prefix: [0; STREAM_PREFIX_LEN],
                prefix_have: 0,
                frame_len: 0,
                frame_have: 0,
                ready: false,
                has_buffers: false,
            },
            counters: NetCounters::default(),
            activation: Activation::new(QUEUE_SIZE).map_err(NetError::EventFd)?,
            descs: Vec::with_capacity(MAX_CHAIN_DESCS + 1),
            batch: MAX_CHAINS_PER_EVENT,
            guest_errors: std::array::from_fn(|_| LogOnce::new()),
            queue_error: LogOnce::new(),
            unexpected: LogOnce::new(),
            epoll_error: LogOnce::new(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// What the guest may send (loopback destinations are always refused).
    pub fn with_egress(mut self, egress: Egress) -> Net {
        self.egress = egress;
        self
    }

    /// Traffic counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the backend is still in use (it is dropped when it closes or
    /// fails).
    pub fn backend_alive(&self) -> bool {
        self.link.backend.is_some()
    }

    /// The eventfd the device writes on activation and reset (watched by
    /// its event handler).
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.activate_evt()
    }

    fn log_guest(&self, e: GuestError) {
        self.guest_errors[e as usize]
            .warn(format_args!("virtio-net: guest error: {}", e.describe()));
    }

    /// Reads a chain's descriptors into `self.descs`; `Err` for a chain the
    /// device cannot look at.
    fn collect_chain<I>(&mut self, chain: I) -> Result<(), GuestError>
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        self.descs.clear();
        self.descs
            .extend(chain.take(MAX_CHAIN_DESCS + 1).map(|d| Desc {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            }));
        if self.descs.len() > MAX_CHAIN_DESCS {
            return Err(GuestError::ChainTooLong);
        }
        Ok(())
    }

    /// Copies the TX chain in `self.descs` into the TX buffer
    /// (`[header][frame]`); returns the frame length.
    fn gather_tx(&mut self, mem: &GuestMemoryMmap) -> Result<usize, GuestError> {
        let mut total = 0u64;
        for d in &self.descs {
            if d.writable {
                return Err(GuestError::TxWritable);
            }
            // At most MAX_CHAIN_DESCS u32 values: no overflow.
            total += u64::from(d.len);
        }
        if total < VNET_HDR_LEN as u64 {
            return Err(GuestError::TxShortHeader);
        }
        if total > (VNET_HDR_LEN + MAX_FRAME_LEN) as u64 {
            return Err(GuestError::TxTooLarge);
        }
        // Bounded by the check above.
        let total = total as usize;
        if total - VNET_HDR_LEN < MIN_FRAME_LEN {
            return Err(GuestError::TxShortFrame);
        }
        let mut pos = 0usize;
        for d in &self.descs {
            let len = d.len as usize;
            if len == 0 {
                continue;
            }
            mem.read_slice(&mut self.tx.buf[pos..pos + len], GuestAddress(d.addr))
                .map_err(|_| GuestError::BadAddress)?;
            pos += len;
        }
        Ok(total - VNET_HDR_LEN)
    }

    /// Writes the pending TX frame out. Returns whether nothing is pending
    /// any more (written, dropped, or the backend is gone).
    fn flush_tx(&mut self) -> bool {
        let Some((mut start, end, frame_len)) = self.tx.pending else {
            return true;
        };
        let Some(backend) = self.link.backend.as_ref() else {
            self.tx.pending = None;
            self.counters.tx_dropped += 1;
            return true;
        };
        loop {
            match backend.write(&self.tx.buf[start..end]) {
                Ok(n) if n > 0 => {
                    start += n;
                    // A tap write is all or nothing.
                    if start >= end || backend.is_tap() {
                        self.tx.pending = None;
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += frame_len as u64;
                        return true;
                    }
                }
                Ok(_) => {
                    self.tx.pending = None;
                    self.counters.tx_dropped += 1;
                    self.link.kill(format_args!("write returned 0"));
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tx.pending = Some((start, end, frame_len));
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The tap interface is down (EIO) or refused this frame:
                // the frame is lost, the tap stays usable.
                Err(e)
                    if backend.is_tap()
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOMEM | libc::ENOBUFS)
                        ) =>
                {
                    self.link
                        .tap_tx
                        .warn(format_args!("virtio-net: tap refused a frame: {e}"));
                    self.tx.pending = None;
                    self.counters.tx_dropped += 1;
                    return true;
                }
                Err(e) => {
                    self.tx.pending = None;
                    self.counters.tx_dropped += 1;
                    self.link.kill(format_args!("write: {e}"));
                    return true;
                }
            }
        }
    }

    /// Sends the guest's frames: first the pending one, then up to `batch`
    /// chains of the TX queue. Stops (and keeps the frame) when the backend
    /// would block.
    fn process_tx(&mut self) {
        if !self.flush_tx() {
            return;
        }
        let Some(mut active) = self.activation.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        let mut taken = 0;
        loop {
            if taken >= self.batch {
                if ring_has_more(&active.queues[TXQ], &mem) {
                    self.rearm(TXQ);
                }
                break;
            }
            let q = &mut active.queues[TXQ];
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            if head >= q.size() {
                self.log_guest(GuestError::BadHead);
                self.counters.tx_dropped += 1;
                continue;
            }
            let res = self
                .collect_chain(chain)
                .and_then(|()| self.gather_tx(&mem))
                .and_then(|len| {
                    match self
                        .egress
                        .check(&self.tx.buf[VNET_HDR_LEN..VNET_HDR_LEN + len])
                    {
                        Ok(()) => Ok(len),
                        Err(Refusal::HostItself) => Err(GuestError::TxToHostItself),
                        Err(Refusal::NotDns) => Err(GuestError::TxNotDns),
                    }
                });
            let mut blocked = false;
            match res {
                Ok(frame_len) => {
                    if self.link.backend.as_ref().is_some_and(|b| b.is_tap()) {
                        // No offloads negotiated: a plain header whatever
                        // the guest wrote.
                        self.tx.buf[..VNET_HDR_LEN].fill(0);
                        self.tx.pending = Some((0, VNET_HDR_LEN + frame_len, frame_len));
                    } else {
                        let start = VNET_HDR_LEN - STREAM_PREFIX_LEN;
                        // Bounded by MAX_FRAME_LEN.
                        self.tx.buf[start..VNET_HDR_LEN]
                            .copy_from_slice(&(frame_len as u32).to_be_bytes());
                        self.tx.pending = Some((start, VNET_HDR_LEN + frame_len, frame_len));
                    }
                    blocked = !self.flush_tx();
                }
                Err(e) => {
                    self.log_guest(e);
                    self.counters.tx_dropped += 1;
                }
            }
            let q = &mut active.queues[TXQ];
            if let Err(e) = q.add_used(&mem, head, 0) {
                self.queue_error
                    .warn(format_args!("virtio-net: cannot return a TX buffer: {e}"));
                break;
            }
            used = true;
            if blocked {
                // Back on EPOLLOUT; the chains left wait in the ring.
                break;
            }
        }
        let q = &mut active.queues[TXQ];
        if used && q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        self.activation.restore(active);
    }

    fn rearm(&self, queue: usize) {
        if let Err(e) = self.activation.queue_evt(queue).write(1) {
            self.queue_error.warn(format_args!(
                "virtio-net: cannot re-arm a queue eventfd: {e}"
            ));
        }
    }

    /// Reads (the rest of) one frame from the backend into the RX buffer.
    fn read_frame(&mut self) -> ReadOutcome {
        let Some(backend) = self.link.backend.as_ref() else {
            return ReadOutcome::Dead;
        };
        let rx = &mut self.rx;
        loop {
            let res = match backend {
                NetBackend::Tap(_) => backend.read(&mut rx.buf),
                NetBackend::Stream(_) if rx.prefix_have < STREAM_PREFIX_LEN => {
                    backend.read(&mut rx.prefix[rx.prefix_have..])
                }
                NetBackend::Stream(_) => {
                    let from = VNET_HDR_LEN + rx.frame_have;
                    let to = VNET_HDR_LEN + rx.frame_len;
                    backend.read(&mut rx.buf[from..to])
                }
            };
            let n = match res {
                Ok(0) => {
                    self.link.kill(format_args!("end of file"));
                    return ReadOutcome::Dead;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::NotYet,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.link.kill(format_args!("read: {e}"));
                    return ReadOutcome::Dead;
                }
            };
            match backend {
                NetBackend::Tap(_) => {
                    if n < VNET_HDR_LEN + MIN_FRAME_LEN || n >= rx.buf.len() {
                        self.counters.rx_dropped += 1;
                        return ReadOutcome::Dropped;
                    }
                    rx.frame_len = n - VNET_HDR_LEN;
                    rx.ready = true;
                    return ReadOutcome::Ready;
                }
                NetBackend::Stream(_) if rx.prefix_have < STREAM_PREFIX_LEN => {
                    rx.prefix_have += n;
                    if rx.prefix_have == STREAM_PREFIX_LEN {
                        let len = u32::from_be_bytes(rx.prefix) as usize;
                        if len == 0 || len > MAX_FRAME_LEN {
                            self.link.protocol.warn(format_args!(
                                "virtio-net: backend sent an invalid frame length {len}"
                            ));
                            self.link.kill(format_args!("invalid frame length {len}"));
                            return ReadOutcome::Dead;
                        }
                        rx.frame_len = len;
                        rx.frame_have = 0;
                    }
                }
                NetBackend::Stream(_) => {
                    rx.frame_have += n;
                    if rx.frame_have == rx.frame_len {
                        rx.prefix_have = 0;
                        rx.ready = true;
                        return ReadOutcome::Ready;
                    }
                }
            }
        }
    }

    /// Whether the RX ring has a chain for the device (a corrupt ring reads
    /// as empty).
    fn rx_ring_ready(&self, active: &Active<NUM_QUEUES>) -> bool {
        let q = &active.queues[RXQ];
        match q.avail_idx(&active.mem, Ordering::Acquire) {
            Ok(idx) => {
                let ahead = (idx - Wrapping(q.next_avail())).0;
                if ahead > q.size() {
                    self.queue_error
                        .warn(format_args!("virtio-net: invalid RX available ring"));
                    false
                } else {
                    ahead > 0
                }
            }
            Err(e) => {
                self.queue_error
                    .warn(format_args!("virtio-net: RX queue unusable: {e}"));
                false
            }
        }
    }

    /// Puts the ready frame into the RX chain in `self.descs`. `Ok(true)`:
    /// delivered; `Ok(false)`: the frame does not fit (the chain is fine).
    fn deliver_rx(&mut self, mem: &GuestMemoryMmap) -> Result<bool, GuestError> {
        let mut capacity = 0u64;
        for d in &self.descs {
            if !d.writable {
                return Err(GuestError::RxReadable);
            }
            if d.len > 0
                && !mem.check_range(GuestAddress(d.addr), d.len as usize, Permissions::Write)
            {
                return Err(GuestError::BadAddress);
            }
            capacity += u64::from(d.len);
        }
        if capacity < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
            return Err(GuestError::RxTooSmall);
        }
        let total = VNET_HDR_LEN + self.rx.frame_len;
        if capacity < total as u64 {
            return Ok(false);
        }
        let hdr = &mut self.rx.buf[..VNET_HDR_LEN];
        hdr.fill(0);
        hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
        let mut pos = 0usize;
        for d in &self.descs {
            if pos >= total {
                break;
            }
            let n = (d.len as usize).min(total - pos);
            if n == 0 {
                continue;
            }
            mem.write_slice(&self.rx.buf[pos..pos + n], GuestAddress(d.addr))
                .map_err(|_| GuestError::BadAddress)?;
            pos += n;
        }
        Ok(true)
    }

    /// Moves frames from the backend into the guest's RX buffers: reads
    /// only while a buffer is posted, at most `batch` frames.
    fn process_rx(&mut self) {
        let Some(mut active) = self.activation.take() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used = false;
        let mut budget = self.batch;
        loop {
            // Every chain counts, usable or not: a guest refilling bad
            // chains while a frame waits must not pin the event loop.
            if budget == 0 {
                // With a frame in hand the backend fd is not watched: come
                // back through the RX eventfd while buffers are posted.
                if self.rx.ready && ring_has_more(&active.queues[RXQ], &mem) {
                    self.rearm(RXQ);
                }
                break;
            }
            if !self.rx.ready {
                if self.link.backend.is_none() {
                    break;
                }
                self.rx.has_buffers = self.rx_ring_ready(&active);
                if !self.rx.has_buffers {
                    break;
                }
                match self.read_frame() {
                    ReadOutcome::Ready => {}
                    ReadOutcome::Dropped => {
                        budget -= 1;
                        continue;
                    }
                    ReadOutcome::NotYet | ReadOutcome::Dead => break,
                }
            }
            let q = &mut active.queues[RXQ];
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                self.rx.has_buffers = false;
                break;
            };
            budget = budget.saturating_sub(1);
            let head = chain.head_index();
            if head >= q.size() {
                self.log_guest(GuestError::BadHead);
                continue;
            }
            let res = self
                .collect_chain(chain)
                .and_then(|()| self.deliver_rx(&mem));
            let len = match res {
                Ok(true) => {
                    self.rx.ready = false;
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += self.rx.frame_len as u64;
                    (VNET_HDR_LEN + self.rx.frame_len) as u32
                }
                Ok(false) => {
                    // Keep the buffer for the next (smaller) frame.
                    self.log_guest(GuestError::RxFrameTooLarge);
                    self.rx.ready = false;
                    self.counters.rx_dropped += 1;
                    active.queues[RXQ].go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    // The frame waits for the next buffer.
                    self.log_guest(e);
                    0
                }
            };
            if let Err(e) = active.queues[RXQ].add_used(&mem, head, len) {
                self.queue_error
                    .warn(format_args!("virtio-net: cannot return an RX buffer: {e}"));
                break;
            }
            used = true;
        }
        let q = &mut active.queues[RXQ];
        if used && q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        self.activation.restore(active);
    }

    /// The epoll interest the backend fd needs now.
    fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.link.backend.is_none() {
            return set;
        }
        if self.activation.is_activated() && self.rx.has_buffers && !self.rx.ready {
            set |= EventSet::IN;
        }
        if self.tx.pending.is_some() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Brings the epoll registration of the backend fd in line with what
    /// the device waits for (an fd with nothing to wait for is not
    /// registered at all: epoll would still report hang-ups on it).
    fn sync(&mut self, ops: &mut EventOps) {
        if let Some(dead) = self.link.graveyard.take() {
            if !self.link.watched.is_empty() {
                if let Err(e) = ops.remove(Events::empty(&dead)) {
                    self.epoll_error
                        .warn(format_args!("virtio-net: cannot unwatch the backend: {e}"));
                }
            }
            self.link.watched = EventSet::empty();
            // Closed here, after leaving epoll.
            drop(dead);
        }
        let want = self.interest();
        let have = self.link.watched;
        if want == have {
            return;
        }
        let Some(backend) = self.link.backend.as_ref() else {
            return;
        };
        let fd = backend.fd();
        let res = if have.is_empty() {
            ops.add(Events::new_raw(fd, want))
        } else if want.is_empty() {
            ops.remove(Events::empty_raw(fd))
        } else {
            ops.modify(Events::new_raw(fd, want))
        };
        match res {
            Ok(()) => self.link.watched = want,
            Err(e) => self
                .epoll_error
                .warn(format_args!("virtio-net: cannot watch the backend: {e}")),
        }
    }

    /// Handles one event on `fd` (the body of `process`, epoll aside).
    fn handle_event(&mut self, fd: RawFd, set: EventSet) {
        if let Some(q) = self.activation.queue_of(fd) {
            let _ = self.activation.queue_evt(q).read();
            if q == TXQ {
                self.process_tx();
            } else {
                self.process_rx();
            }
        } else if self.link.backend.as_ref().is_some_and(|b| b.fd() == fd) {
            let hup = EventSet::HANG_UP | EventSet::ERROR;
            if set.intersects(EventSet::OUT | hup) && self.tx.pending.is_some() {
                self.process_tx();
            }
            if set.intersects(EventSet::IN | hup) {
                self.process_rx();
            }
        } else {
            self.unexpected
                .warn(format_args!("virtio-net: event on unexpected fd {fd}"));
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.activation.queue_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.activation.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac[..CONFIG_LEN], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // `mac` is read-only (no VIRTIO_NET_F_CTRL_MAC_ADDR).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.rx.has_buffers = false;
        self.activation.activate(ctx)
    }

    fn reset(&mut self) {
        // The backend and its framing state stay: a stream must not lose
        // its place in the middle of a frame.
        self.activation.reset();
        self.rx.has_buffers = false;
        // Wake the event loop so it stops reading the backend.
        let _ = self.activation.activate_evt().write(1);
    }

    fn is_activated(&self) -> bool {
        self.activation.is_activated()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.activation.queue_states()
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops, "virtio-net");
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.activation.on_activate_event(fd, ops, "virtio-net") {
            // The driver may have queued buffers before we watched.
            self.process_tx();
            self.process_rx();
        } else {
            self.handle_event(fd, events.event_set());
        }
        self.sync(ops);
    }
}
