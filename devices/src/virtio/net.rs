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

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::activation::{Activation, Active};
use super::{ActivateContext, ActivateError, LogOnce, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};

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

/// Where the guest's frames go.
#[derive(Debug)]
pub enum NetBackend {
    /// A connected stream socket to passt (QEMU stream netdev framing: a
    /// 4-byte big-endian length before each frame).
    Stream(UnixStream),
    /// A tap fd from [`open_tap`] (12-byte vnet header before each frame).
    Tap(File),
}

impl AsRawFd for NetBackend {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NetBackend::Stream(s) => s.as_raw_fd(),
            NetBackend::Tap(f) => f.as_raw_fd(),
        }
    }
}

impl NetBackend {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn is_tap(&self) -> bool {
        matches!(self, NetBackend::Tap(_))
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            NetBackend::Stream(s) => s.set_nonblocking(true),
            NetBackend::Tap(f) => set_fd_nonblocking(f.as_raw_fd()),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NetBackend::Stream(s) => (&*s).read(buf),
            NetBackend::Tap(f) => (&*f).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NetBackend::Stream(s) => {
                // SAFETY: `buf` is valid for reads of `buf.len()` bytes for
                // the duration of the call, and `s` owns an open socket fd.
                // MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE.
                let n = unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // Non-negative and at most `buf.len()`.
                    Ok(n as usize)
                }
            }
            NetBackend::Tap(f) => (&*f).write(buf),
        }
    }
}

fn set_fd_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own reads its flags; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest
/// of the union padded to the size of `struct ifreq` on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether `name` is a valid, explicit interface name (the kernel's
/// `dev_valid_name`, minus `%` templates whose result we would not know).
fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
}

/// Opens (creating it if needed, which takes `CAP_NET_ADMIN`) the tap
/// interface `name`: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet
/// header (`virtio_net_hdr_v1`), no offloads; the fd is non-blocking and
/// close-on-exec.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if !valid_tap_name(name) {
        return Err(NetError::TapName(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        // O_CLOEXEC is std's default; named for the reader.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::TapOpen)?;
    let fd = file.as_raw_fd();
    let fail = |op: &'static str| NetError::TapIoctl {
        name: name.to_string(),
        op,
        source: io::Error::last_os_error(),
    };

    let mut ifr = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    // At most 15 bytes (checked above): the name stays NUL-terminated.
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a
    // properly sized (40 bytes, as large as the kernel's struct on any
    // Linux target), initialized, exclusively borrowed one that lives for
    // the call, and `fd` is an open /dev/net/tun fd.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut IfReq) } < 0 {
        return Err(fail("TUNSETIFF"));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at a live `c_int`; `fd` is an attached tap fd.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
        return Err(fail("TUNSETVNETHDRSZ"));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
    // long of TUN_F_* flags, none here); no memory is passed.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(fail("TUNSETOFFLOAD"));
    }
    Ok(file)
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
}

impl GuestError {
    const COUNT: usize = GuestError::BadHead as usize + 1;

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
                .and_then(|()| self.gather_tx(&mem));
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
            if !self.rx.ready {
                if budget == 0 || self.link.backend.is_none() {
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

/// Whether the driver made chains available that the device has not taken
/// (assumed so if the ring cannot be read).
fn ring_has_more(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    q.avail_idx(mem, Ordering::Acquire)
        .map_or(true, |idx| idx != Wrapping(q.next_avail()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::virtio::Interrupt;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::Duration;

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::Address;

    use crate::virtio::test_queue::DriverQueue;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    const MEM_SIZE: usize = 16 << 20;
    /// Queue size of the mock driver (the device offers 256; the driver may
    /// pick less).
    const QSIZE: u16 = 16;
    /// Guest buffer per descriptor index: room for a maximal frame.
    const SLOT: u64 = 0x1_1000;
    const RX_RING: u64 = 0x0;
    const TX_RING: u64 = 0x1000;
    const RX_BUFS: u64 = 0x10_0000;
    const TX_BUFS: u64 = 0x40_0000;
    const OUTSIDE: u64 = 0x1_0000_0000;
    const R: bool = false;
    const W: bool = true;

    /// An activated device over a socketpair (the test holds passt's end).
    struct Harness {
        mem: GuestMemoryMmap,
        rxq: DriverQueue,
        txq: DriverQueue,
        net: Net,
        peer: UnixStream,
        irq: EventFd,
    }

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    impl Harness {
        fn new() -> Harness {
            let (ours, peer) = UnixStream::pair().unwrap();
            let net = Net::new(MAC, NetBackend::Stream(ours)).unwrap();
            Self::with_net(net, peer)
        }

        fn with_net(mut net: Net, peer: UnixStream) -> Harness {
            let mem = guest_mem();
            let (rxq, rx) = DriverQueue::new(QUEUE_SIZE, QSIZE, SLOT, RX_RING, RX_BUFS);
            let (txq, tx) = DriverQueue::new(QUEUE_SIZE, QSIZE, SLOT, TX_RING, TX_BUFS);
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            net.activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
                queues: vec![rx, tx],
                acked_features: net.avail_features(),
            })
            .unwrap();
            assert_eq!(net.activate_evt().read().unwrap(), 1);
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Harness {
                mem,
                rxq,
                txq,
                net,
                peer,
                irq,
            }
        }

        /// Queues one TX chain holding `hdr` then `frame`, split into
        /// descriptors of at most `split` bytes.
        fn queue_tx(&mut self, hdr: &[u8], frame: &[u8], split: usize) {
            let mut bytes = hdr.to_vec();
            bytes.extend_from_slice(frame);
            let parts: Vec<(u32, bool)> = bytes
                .chunks(split.max(1))
                .map(|c| (c.len() as u32, R))
                .collect();
            let addrs = self.txq.add_chain_or_panic(&self.mem, &parts);
            for (a, c) in addrs.iter().zip(bytes.chunks(split.max(1))) {
                self.mem.write_slice(c, *a).unwrap();
            }
        }

        /// Posts one RX buffer of `len` bytes (one descriptor).
        fn post_rx(&mut self, len: u32) -> GuestAddress {
            self.rxq.add_chain_or_panic(&self.mem, &[(len, W)])[0]
        }

        fn read_guest(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, addr).unwrap();
            v
        }

        /// Reads one length-prefixed frame from passt's end.
        fn peer_frame(&mut self) -> Vec<u8> {
            let mut len = [0u8; 4];
            self.peer.read_exact(&mut len).unwrap();
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            self.peer.read_exact(&mut f).unwrap();
            f
        }

        fn peer_send(&mut self, frame: &[u8]) {
            self.peer
                .write_all(&(frame.len() as u32).to_be_bytes())
                .unwrap();
            self.peer.write_all(frame).unwrap();
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Bytes waiting in socket `fd`'s receive queue, without reading them.
    fn peek_len(fd: RawFd) -> usize {
        let mut buf = vec![0u8; 1 << 17];
        // SAFETY: `buf` is valid for writes of its length for the call; the
        // fd is an open socket.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).unwrap_or(0)
    }

    fn logged(l: &LogOnce) -> bool {
        l.0.load(Ordering::Relaxed)
    }

    #[test]
    fn config_features_and_queues() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut net = Net::new(MAC, NetBackend::Stream(a)).unwrap();
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(net.avail_features(), (1 << 32) | (1 << 5));
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        assert_eq!(net.queue_events().len(), 2);
        let read = |net: &Net, off: u64, len: usize| {
            let mut v = vec![0xaa; len];
            net.read_config(off, &mut v);
            v
        };
        assert_eq!(read(&net, 0, 6), MAC);
        assert_eq!(read(&net, 0, 8), [2, 0x11, 0x22, 0x33, 0x44, 0x55, 0, 0]);
        assert_eq!(read(&net, 3, 1), [0x33]);
        assert_eq!(read(&net, 4, 4), [0x44, 0x55, 0, 0]);
        assert_eq!(read(&net, 6, 4), [0; 4]);
        assert_eq!(read(&net, u64::MAX, 4), [0; 4]);
        net.write_config(0, &[0xff; 6]);
        net.write_config(u64::MAX, &[0xff; 6]);
        assert_eq!(read(&net, 0, 6), MAC);
        assert_eq!(net.mac(), MAC);
    }

    #[test]
    fn activation_needs_two_queues() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut net = Net::new(MAC, NetBackend::Stream(a)).unwrap();
        let mem = guest_mem();
        for n in [0usize, 1, 3] {
            let queues = (0..n)
                .map(|i| DriverQueue::new(QUEUE_SIZE, QSIZE, SLOT, 0x1000 * i as u64, RX_BUFS).1)
                .collect();
            let err = net
                .activate(ActivateContext {
                    mem: mem.clone(),
                    interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                    queues,
                    acked_features: 0,
                })
                .unwrap_err();
            assert!(
                matches!(err, ActivateError::BadQueues { expected: 2, got } if got == n),
                "{err}"
            );
            assert!(!net.is_activated());
        }
        let mut h = Harness::with_net(net, _b);
        assert!(h.net.is_activated());
        h.net.reset();
        assert!(!h.net.is_activated());
        // Inactive: kicks do nothing.
        h.net.process_tx();
        h.net.process_rx();
    }

    #[test]
    fn tx_frame_reaches_passt_with_its_length() {
        let mut h = Harness::new();
        // Whatever the guest puts in the header is not forwarded.
        let f = frame(1514, 1);
        h.queue_tx(&[0xee; 12], &f, 4096);
        // Header and frame split across odd descriptors.
        let g = frame(60, 2);
        h.queue_tx(&[0; 12], &g, 7);
        h.net.process_tx();
        assert_eq!(h.peer_frame(), f);
        assert_eq!(h.peer_frame(), g);
        assert_eq!(h.txq.pop_used(&h.mem).map(|u| u.1), Some(0));
        assert_eq!(h.txq.pop_used(&h.mem).map(|u| u.1), Some(0));
        assert!(h.txq.pop_used(&h.mem).is_none());
        assert_eq!(h.irq.read().unwrap(), 1);
        let c = h.net.counters();
        assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (2, 1574, 0));
        // A maximal frame.
        let big = frame(MAX_FRAME_LEN, 3);
        h.queue_tx(&[0; 12], &big, SLOT as usize);
        h.net.process_tx();
        assert_eq!(h.peer_frame(), big);
        assert_eq!(h.net.counters().tx_frames, 3);
    }

    impl Harness {
        fn backend_fd(&self) -> RawFd {
            self.net.link.backend.as_ref().unwrap().as_raw_fd()
        }

        /// What is waiting in the device's end of the socket.
        fn unread(&self) -> usize {
            peek_len(self.backend_fd())
        }
    }

    /// The zeroed header the device writes before each received frame.
    fn rx_header() -> [u8; 12] {
        let mut h = [0u8; 12];
        h[10] = 1;
        h
    }

    #[test]
    fn rx_frame_split_across_writes_lands_after_the_header() {
        let mut h = Harness::new();
        let buf = h.post_rx(2048);
        h.mem.write_slice(&[0xaa; 2048], buf).unwrap();
        let f = frame(1000, 7);
        let mut wire = (f.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&f);
        // Prefix split, then the frame in pieces.
        for piece in [&wire[..1], &wire[1..3], &wire[3..10], &wire[10..500]] {
            h.peer.write_all(piece).unwrap();
            h.net.process_rx();
            assert!(
                h.rxq.pop_used(&h.mem).is_none(),
                "nothing before the whole frame"
            );
        }
        assert!(h.irq.read().is_err(), "no interrupt yet");
        h.peer.write_all(&wire[500..]).unwrap();
        h.net.process_rx();
        assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(12 + 1000));
        assert_eq!(h.read_guest(buf, 12), rx_header());
        assert_eq!(h.read_guest(buf.unchecked_add(12), 1000), f);
        assert_eq!(
            h.read_guest(buf.unchecked_add(1012), 4),
            [0xaa; 4],
            "nothing beyond"
        );
        assert_eq!(h.irq.read().unwrap(), 1);
        let c = h.net.counters();
        assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (1, 1000, 0));

        // Two frames in one write, into chains of several descriptors (the
        // header split too).
        let (f1, f2) = (frame(60, 1), frame(1514, 2));
        let mut wire = Vec::new();
        for f in [&f1, &f2] {
            wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
            wire.extend_from_slice(f);
        }
        h.peer.write_all(&wire).unwrap();
        let a = h
            .rxq
            .add_chain_or_panic(&h.mem, &[(5, W), (7, W), (100, W)]);
        let b = h
            .rxq
            .add_chain_or_panic(&h.mem, &[(12, W), (1000, W), (526, W)]);
        h.net.process_rx();
        assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(72));
        assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(12 + 1514));
        let mut got = h.read_guest(a[0], 5);
        got.extend(h.read_guest(a[1], 7));
        got.extend(h.read_guest(a[2], 60));
        assert_eq!(got[..12], rx_header());
        assert_eq!(got[12..], f1[..]);
        let mut got = h.read_guest(b[1], 1000);
        got.extend(h.read_guest(b[2], 514));
        assert_eq!(h.read_guest(b[0], 12), rx_header());
        assert_eq!(got, f2);
        assert_eq!(h.net.counters().rx_frames, 3);
        assert_eq!(h.unread(), 0);
    }

    #[test]
    fn rx_without_buffers_leaves_frames_in_the_socket() {
        let mut h = Harness::new();
        let f = frame(200, 9);
        h.peer_send(&f);
        for _ in 0..3 {
            h.net.process_rx();
        }
        assert_eq!(h.unread(), 4 + 200, "the device read nothing");
        assert!(!h.net.interest().contains(EventSet::IN));
        let buf = h.post_rx(1526);
        // Still nothing until the guest kicks (the event handler runs).
        assert_eq!(h.unread(), 204);
        h.net
            .handle_event(h.net.activation.queue_evt(RXQ).as_raw_fd(), EventSet::IN);
        assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(212));
        assert_eq!(h.read_guest(buf.unchecked_add(12), 200), f);
        assert_eq!(h.unread(), 0);
        // The guest has no buffer left: the next frame stays in the socket.
        h.peer_send(&f);
        h.net.handle_event(h.backend_fd(), EventSet::IN);
        assert_eq!(h.unread(), 204);
        assert!(h.net.interest().is_empty());
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_counted() {
        let mut h = Harness::new();
        let f = frame(100, 1);
        // A device-writable descriptor.
        h.txq.add_chain_or_panic(&h.mem, &[(12, R), (100, W)]);
        // Shorter than the header.
        h.txq.add_chain_or_panic(&h.mem, &[(8, R)]);
        // A frame shorter than an Ethernet header.
        h.txq.add_chain_or_panic(&h.mem, &[(12 + 13, R)]);
        // Over the maximum, split so no descriptor is large.
        h.txq
            .add_chain_or_panic(&h.mem, &[(12 + 40000, R), (25551, R)]);
        // Outside guest memory, and wrapping the address space.
        h.txq
            .add_chain_at(&h.mem, &[(None, 12, R), (Some(OUTSIDE), 100, R)]);
        h.txq.add_chain_at(&h.mem, &[(Some(u64::MAX - 5), 112, R)]);
        // A chain of u32::MAX descriptors' worth is cut by the queue.
        h.txq
            .add_chain_or_panic(&h.mem, &[(u32::MAX, R), (u32::MAX, R)]);
        h.net.process_tx();
        for _ in 0..7 {
            assert_eq!(h.txq.pop_used(&h.mem).map(|u| u.1), Some(0));
        }
        assert!(h.txq.pop_used(&h.mem).is_none());
        assert_eq!(peek_len(h.peer.as_raw_fd()), 0, "nothing sent");
        let c = h.net.counters();
        assert_eq!((c.tx_frames, c.tx_dropped), (0, 7));
        for e in [
            GuestError::TxWritable,
            GuestError::TxShortHeader,
            GuestError::TxShortFrame,
            GuestError::TxTooLarge,
            GuestError::BadAddress,
        ] {
            assert!(logged(&h.net.guest_errors[e as usize]), "{e:?}");
        }
        // The queue still works; the limit itself is accepted.
        h.queue_tx(&[0; 12], &f, 64);
        h.queue_tx(&[0; 12], &frame(MIN_FRAME_LEN, 2), 64);
        h.net.process_tx();
        assert_eq!(h.peer_frame(), f);
        assert_eq!(h.peer_frame(), frame(MIN_FRAME_LEN, 2));
        assert_eq!(h.net.counters().tx_frames, 2);
    }

    #[test]
    fn bad_rx_chains_are_returned_and_oversized_frames_dropped() {
        let mut h = Harness::new();
        let (small, large) = (frame(50, 1), frame(300, 2));
        h.peer_send(&large);
        h.peer_send(&small);
        // Unusable chains: returned empty, the frame waits.
        h.rxq.add_chain_or_panic(&h.mem, &[(12, W), (500, R)]);
        h.rxq.add_chain_or_panic(&h.mem, &[(20, W)]);
        h.rxq.add_chain_at(&h.mem, &[(Some(OUTSIDE), 500, W)]);
        h.rxq.add_chain_at(
            &h.mem,
            &[(None, 100, W), (Some(MEM_SIZE as u64 - 10), 500, W)],
        );
        // Too small for the large frame (dropped), fine for the small one.
        let buf = h.post_rx(100);
        h.net.process_rx();
        for _ in 0..4 {
            assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(0));
        }
        assert_eq!(h.rxq.pop_used(&h.mem).map(|u| u.1), Some(62));
        assert_eq!(h.read_guest(buf.unchecked_add(12), 50), small);
        let c = h.net.counters();
        assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
        for e in [
            GuestError::RxReadable,
            GuestError::RxTooSmall,
            GuestError::BadAddress,
            GuestError::RxFrameTooLarge,
        ] {
            assert!(logged(&h.net.guest_errors[e as usize]), "{e:?}");
        }
        assert!(h.net.backend_alive());
    }

    #[test]
    fn peer_close_drops_the_backend_and_tx_frames() {
        let mut h = Harness::new();
        let (ours, peer) = UnixStream::pair().unwrap();
        drop(std::mem::replace(&mut h.peer, peer));
        drop(ours);
        h.queue_tx(&[0; 12], &frame(100, 1), 4096);
        h.net.process_tx();
        assert!(!h.net.backend_alive());
        assert!(logged(&h.net.link.closed));
        h.queue_tx(&[0; 12], &frame(100, 2), 4096);
        h.queue_tx(&[0; 12], &frame(100, 3), 4096);
        h.net.process_tx();
        assert_eq!(h.txq.used_count(&h.mem), 3, "chains still returned");
        let c = h.net.counters();
        assert_eq!((c.tx_frames, c.tx_dropped), (0, 3));
        h.post_rx(2048);
        h.net.process_rx();
        assert!(h.rxq.pop_used(&h.mem).is_none());
        assert!(h.net.interest().is_empty());
    }

    #[test]
    fn peer_eof_while_reading_drops_the_backend() {
        let mut h = Harness::new();
        h.post_rx(2048);
        // Half a frame, then the peer goes away.
        h.peer.write_all(&[0, 0, 1, 0, 1, 2, 3]).unwrap();
        h.net.process_rx();
        assert!(h.net.backend_alive());
        let (_x, y) = UnixStream::pair().unwrap();
        drop(std::mem::replace(&mut h.peer, y));
        h.net.process_rx();
        assert!(!h.net.backend_alive());
        assert!(h.rxq.pop_used(&h.mem).is_none());
    }

    #[test]
    fn bad_stream_lengths_drop_the_backend() {
        for len in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let mut h = Harness::new();
            h.post_rx(2048);
            h.peer.write_all(&len.to_be_bytes()).unwrap();
            h.peer.write_all(&[0; 64]).unwrap();
            h.net.process_rx();
            assert!(!h.net.backend_alive(), "length {len}");
            assert!(logged(&h.net.link.protocol));
            assert!(h.rxq.pop_used(&h.mem).is_none());
            // TX goes nowhere now, and is counted.
            h.queue_tx(&[0; 12], &frame(100, 1), 4096);
            h.net.process_tx();
            assert_eq!(h.net.counters().tx_dropped, 1);
        }
        // The limit itself is fine.
        let mut h = Harness::new();
        h.post_rx(SLOT as u32);
        let big = frame(MAX_FRAME_LEN, 4);
        let peer = h.peer.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut peer = peer;
            peer.write_all(&(big.len() as u32).to_be_bytes()).unwrap();
            peer.write_all(&big).unwrap();
            big
        });
        let mut used = None;
        for _ in 0..500 {
            h.net.process_rx();
            used = h.rxq.pop_used(&h.mem);
            if used.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let big = writer.join().unwrap();
        assert_eq!(used.map(|u| u.1), Some((12 + MAX_FRAME_LEN) as u32));
        let buf = h.rxq.buf(h.rxq.free[h.rxq.free.len() - 1]);
        assert_eq!(h.read_guest(buf.unchecked_add(12), MAX_FRAME_LEN), big);
    }

    #[test]
    fn work_per_wakeup_is_bounded() {
        let mut h = Harness::new();
        h.net.batch = 4;
        for i in 0..10 {
            h.queue_tx(&[0; 12], &frame(64, i), 4096);
        }
        let txq_evt = h.net.activation.queue_evt(TXQ).try_clone().unwrap();
        h.net.process_tx();
        assert_eq!(h.txq.used_count(&h.mem), 4);
        assert_eq!(txq_evt.read().unwrap(), 1, "re-armed");
        h.net.process_tx();
        assert_eq!(h.txq.used_count(&h.mem), 8);
        assert_eq!(txq_evt.read().unwrap(), 1, "re-armed");
        h.net.process_tx();
        assert_eq!(h.txq.used_count(&h.mem), 10);
        assert!(txq_evt.read().is_err(), "nothing left: not re-armed");
        for i in 0..10 {
            assert_eq!(h.peer_frame(), frame(64, i));
        }

        for i in 0..10 {
            h.peer_send(&frame(64, i));
            h.post_rx(128);
        }
        h.net.process_rx();
        assert_eq!(h.rxq.used_count(&h.mem), 4);
        assert!(h.net.interest().contains(EventSet::IN), "comes back");
        h.net.process_rx();
        h.net.process_rx();
        assert_eq!(h.rxq.used_count(&h.mem), 10);
        assert_eq!(h.net.counters().rx_frames, 10);
        // Oversized frames count against the budget too.
        for _ in 0..10 {
            h.peer_send(&frame(1000, 0));
        }
        h.post_rx(128);
        h.net.process_rx();
        assert_eq!(h.net.counters().rx_dropped, 4);
    }

    #[test]
    fn tx_backpressure_holds_one_frame_and_resumes_on_writability() {
        let mut h = Harness::new();
        let n = QSIZE as usize;
        for i in 0..n {
            h.queue_tx(&[0; 12], &frame(MAX_FRAME_LEN, i as u8), SLOT as usize);
        }
        h.net.process_tx();
        let done = h.txq.used_count(&h.mem) as usize;
        assert!(done < n, "the socket buffer cannot take 1 MiB");
        assert!(h.net.tx.pending.is_some());
        assert!(h.net.interest().contains(EventSet::OUT));
        // More kicks change nothing while the backend is full.
        h.net
            .handle_event(h.net.activation.queue_evt(TXQ).as_raw_fd(), EventSet::IN);
        assert_eq!(h.txq.used_count(&h.mem) as usize, done);

        let mut peer = h.peer.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            (0..n)
                .map(|_| {
                    let mut len = [0u8; 4];
                    peer.read_exact(&mut len).unwrap();
                    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                    peer.read_exact(&mut f).unwrap();
                    f
                })
                .collect::<Vec<_>>()
        });
        for _ in 0..5000 {
            if h.net.counters().tx_frames == n as u64 {
                break;
            }
            let fd = h.backend_fd();
            h.net.handle_event(fd, EventSet::OUT);
            std::thread::sleep(Duration::from_millis(1));
        }
        let frames = reader.join().unwrap();
        for (i, f) in frames.iter().enumerate() {
            assert!(
                *f == frame(MAX_FRAME_LEN, i as u8),
                "frame {i} intact, in order"
            );
        }
        assert_eq!(h.txq.used_count(&h.mem) as usize, n);
        assert!(h.net.interest().is_empty());
        assert_eq!(h.net.counters().tx_dropped, 0);
    }

    #[test]
    fn event_loop_watches_the_backend_only_when_needed() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let net = Arc::new(Mutex::new(Net::new(MAC, NetBackend::Stream(ours)).unwrap()));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(net.clone());
        let mem = guest_mem();
        let (mut rxq, rx) = DriverQueue::new(QUEUE_SIZE, QSIZE, SLOT, RX_RING, RX_BUFS);
        let (mut txq, tx) = DriverQueue::new(QUEUE_SIZE, QSIZE, SLOT, TX_RING, TX_BUFS);
        net.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                queues: vec![rx, tx],
                acked_features: 0,
            })
            .unwrap();
        em.run_with_timeout(50).unwrap();
        let fd = net
            .lock()
            .unwrap()
            .link
            .backend
            .as_ref()
            .unwrap()
            .as_raw_fd();
        let kick = |q: usize| {
            net.lock()
                .unwrap()
                .activation
                .queue_evt(q)
                .write(1)
                .unwrap()
        };

        // A frame from passt with no RX buffer: not read, no busy loop.
        let f = frame(300, 5);
        peer.write_all(&300u32.to_be_bytes()).unwrap();
        peer.write_all(&f).unwrap();
        for _ in 0..3 {
            assert_eq!(em.run_with_timeout(10).unwrap(), 0);
        }
        assert_eq!(peek_len(fd), 304);
        // The guest posts a buffer and kicks.
        let buf = rxq.add_chain_or_panic(&mem, &[(1526, W)])[0];
        kick(RXQ);
        for _ in 0..5 {
            em.run_with_timeout(10).unwrap();
        }
        assert_eq!(rxq.pop_used(&mem).map(|u| u.1), Some(312));
        let mut got = vec![0u8; 300];
        mem.read_slice(&mut got, buf.unchecked_add(12)).unwrap();
        assert_eq!(got, f);
        // With a buffer posted, frames arriving later wake the loop.
        rxq.add_chain_or_panic(&mem, &[(1526, W)]);
        kick(RXQ);
        em.run_with_timeout(10).unwrap();
        assert_eq!(net.lock().unwrap().link.watched, EventSet::IN);
        peer.write_all(&300u32.to_be_bytes()).unwrap();
        peer.write_all(&f).unwrap();
        for _ in 0..5 {
            em.run_with_timeout(10).unwrap();
        }
        assert_eq!(rxq.pop_used(&mem).map(|u| u.1), Some(312));
        assert!(net.lock().unwrap().link.watched.is_empty());

        // TX through the loop.
        let a = txq.add_chain_or_panic(&mem, &[(12 + 100, R)]);
        mem.write_slice(&frame(100, 8), a[0].unchecked_add(12))
            .unwrap();
        kick(TXQ);
        em.run_with_timeout(50).unwrap();
        let mut len = [0u8; 4];
        peer.read_exact(&mut len).unwrap();
        assert_eq!(u32::from_be_bytes(len), 100);
        let mut got = vec![0u8; 100];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, frame(100, 8));

        // passt sends garbage: the backend is unwatched and closed (passt
        // sees EOF), the loop stays quiet, the VM goes on.
        rxq.add_chain_or_panic(&mem, &[(1526, W)]);
        kick(RXQ);
        em.run_with_timeout(10).unwrap();
        peer.write_all(&[0, 0, 0, 0]).unwrap();
        for _ in 0..3 {
            em.run_with_timeout(10).unwrap();
        }
        assert!(!net.lock().unwrap().backend_alive());
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(em.run_with_timeout(10).unwrap(), 0);
        let a = txq.add_chain_or_panic(&mem, &[(12 + 100, R)]);
        mem.write_slice(&frame(100, 8), a[0].unchecked_add(12))
            .unwrap();
        kick(TXQ);
        em.run_with_timeout(10).unwrap();
        assert_eq!(net.lock().unwrap().counters().tx_dropped, 1);

        // Reset and reactivate: queue eventfds are not registered twice.
        net.lock().unwrap().reset();
        em.run_with_timeout(10).unwrap();
    }

    #[test]
    fn tap_names_are_validated() {
        for bad in [
            "",
            "0123456789abcdef",
            "a/b",
            "a:b",
            "tap%d",
            "a b",
            "a\0b",
            ".",
            "..",
            "a\nb",
        ] {
            assert!(
                matches!(open_tap(bad), Err(NetError::TapName(_))),
                "{bad:?}"
            );
        }
        for good in ["tap0", "ks-vm1", "0123456789abcde"] {
            assert!(valid_tap_name(good), "{good}");
        }
    }

    /// Brings interface `name` up (in the calling thread's namespace).
    fn link_up(name: &str) -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `s` is a fresh fd nobody else owns.
        let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
        let mut ifr = IfReq {
            name: [0; 16],
            flags: (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short,
            _pad: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: SIOCSIFFLAGS reads a `struct ifreq` (name and flags) from
        // `ifr`, which is live and large enough.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr as *mut IfReq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A packet socket bound to interface `ifindex` (all protocols).
    fn packet_socket(ifindex: u32) -> std::os::fd::OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let s = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(s >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `s` is a fresh fd nobody else owns.
        let s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
        // SAFETY: all-zero is a valid `sockaddr_ll`.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a live sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                s.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(r == 0, "{}", io::Error::last_os_error());
        s
    }

    /// A broadcast frame of a local experimental EtherType, tagged.
    fn test_frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend((0..100).map(|i: u8| i ^ tag));
        f
    }

    #[test]
    fn tap_backend_in_a_private_network_namespace() {
        // unshare affects this thread only; the namespace (and the tap in
        // it) goes away with it.
        let t = std::thread::spawn(|| {
            // SAFETY: unshare takes no pointers; it moves this thread
            // (only) into a new network namespace.
            // Never a silent skip: this test needs root (CAP_NET_ADMIN)
            // and /dev/net/tun, as the README says.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "the tap test needs root: unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                );
            }
            let tap = match open_tap("kstest0") {
                Ok(t) => t,
                Err(e) => panic!("the tap test needs root and /dev/net/tun: {e}"),
            };
            // SAFETY: F_GETFD/F_GETFL take no pointers.
            let (fd_flags, fl_flags) = unsafe {
                (
                    libc::fcntl(tap.as_raw_fd(), libc::F_GETFD),
                    libc::fcntl(tap.as_raw_fd(), libc::F_GETFL),
                )
            };
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
            assert_ne!(fl_flags & libc::O_NONBLOCK, 0);
            let mut hdr_len: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int to the live `hdr_len`.
            let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut hdr_len) };
            assert_eq!((r, hdr_len), (0, 12));

            let (_unused, peer) = UnixStream::pair().unwrap();
            let mut h = Harness::with_net(Net::new(MAC, NetBackend::Tap(tap)).unwrap(), peer);
            // The interface is down: the kernel refuses frames (EIO); they
            // are dropped, the tap stays.
            h.queue_tx(&[0; 12], &test_frame(1), 4096);
            h.net.process_tx();
            assert_eq!(h.net.counters().tx_dropped, 1);
            assert!(h.net.backend_alive());

            link_up("kstest0").unwrap();
            let name = std::ffi::CString::new("kstest0").unwrap();
            // SAFETY: `name` is a NUL-terminated string that outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0);
            let pkt = packet_socket(ifindex);

            // Guest to host: the frame comes in on the tap; the guest's
            // header bytes are not passed on.
            h.queue_tx(&[0xff; 12], &test_frame(2), 4096);
            h.net.process_tx();
            assert_eq!(h.net.counters().tx_frames, 1);
            let mut buf = vec![0u8; 2048];
            let mut seen = false;
            for _ in 0..50 {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe {
                    libc::recv(
                        pkt.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                if buf[..n as usize] == test_frame(2)[..] {
                    seen = true;
                    break;
                }
            }
            assert!(seen, "frame seen on the tap interface");

            // Host to guest: a frame sent out of the interface reaches the
            // guest (among whatever else the kernel sends, e.g. IPv6).
            let f = test_frame(3);
            // SAFETY: all-zero is a valid `sockaddr_ll`.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            // SAFETY: `f` and `sll` are live for the call, of the sizes passed.
            let n = unsafe {
                libc::sendto(
                    pkt.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
            let mut found = false;
            for _ in 0..50 {
                let addr = h.post_rx(1526);
                h.net.process_rx();
                match h.rxq.pop_used(&h.mem) {
                    Some((_, len)) => {
                        let got = h.read_guest(addr, len as usize);
                        if got[12..] == f[..] {
                            assert_eq!(got[..12], rx_header());
                            found = true;
                            break;
                        }
                    }
                    None => {
                        // Take the buffer back unused: re-offer it later.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                if h.rxq.free.len() < 2 {
                    break;
                }
            }
            assert!(found, "frame delivered to the guest");
            assert!(h.net.backend_alive());
        });
        t.join().unwrap();
    }
}
