//! virtio-vsock (virtio spec 5.10) with Firecracker's hybrid backend: the
//! host side of every guest stream socket is a Unix domain socket.
//!
//! - Host to guest: connect to `uds_path`, write `CONNECT <port>\n`, read
//!   `OK <local_port>\n` once the guest accepted, then the stream is a
//!   byte pipe to guest port `<port>`. If nothing listens in the guest, or
//!   it does not answer within 2 s, the socket is closed with no `OK`.
//! - Guest to host: a guest connecting to (CID 2, port `P`) reaches the Unix
//!   listener at `<uds_path>_P`; no listener means the guest gets a reset.
//!
//! Tools written for Firecracker's vsock work unchanged.
//!
//! Layout: [`packet`] (header values and constants), `connection` (one
//! stream and its credit accounting), `muxer` (the connection table, RX
//! scheduling, epoll interest), and here the device: queues, the
//! [`VirtioDevice`] contract and the event-loop subscriber. Only stream
//! sockets are offered (features: `VIRTIO_F_VERSION_1` alone); the event
//! queue is set up but never used (it only matters for live migration).
//!
//! Limits: [`MAX_CONNECTIONS`] connections, each holding at most
//! [`CONN_BUF_ALLOC`] bytes of guest data for a host socket that is not
//! reading; host data is read from a socket only when the guest has both
//! credit and an RX buffer for it, so nothing else is buffered.

mod connection;
mod muxer;
pub mod packet;

#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub use connection::{CONN_BUF_ALLOC, MAX_PKT_DATA, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};
pub use muxer::{CONNECT_LINE_MAX, LOCAL_PORT_BASE, MAX_CONNECTIONS};

use super::activation::Activation;
use super::ring_has_more;
use super::{
    ActivateContext, ActivateError, LogOnce, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use muxer::Muxer;
use packet::Header;

/// Queue indices.
pub const RXQ: usize = 0;
/// Guest-to-device queue.
pub const TXQ: usize = 1;
/// Event queue (transport resets; unused here).
pub const EVQ: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Lowest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Most descriptor chains taken from one queue per event. A guest refilling
/// a ring from another vCPU as fast as we empty it must not keep the event
/// loop (other devices, signals) waiting: past this, the device kicks its
/// own queue eventfd and comes back on the next round.
pub const MAX_CHAINS_PER_EVENT: usize = QUEUE_SIZE as usize;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved.
    #[error("guest CID {0} is reserved; vsock guest CIDs start at 3")]
    InvalidCid(u64),
    /// Something already exists at the socket path.
    #[error(
        "vsock socket path {} already exists (a stale socket from an earlier run? remove it first)",
        .0.display()
    )]
    UdsExists(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on vsock socket {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An eventfd or timerfd could not be created.
    #[error("cannot create an event fd: {0}")]
    EventFd(io::Error),
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    muxer: Muxer,
    activation: Activation<NUM_QUEUES>,
    timer: TimerFd,
    timer_armed: bool,
    /// TX processing paused until RX drains the reset queue.
    tx_stalled: bool,
    /// Chains taken per queue per event ([`MAX_CHAINS_PER_EVENT`]; tests
    /// lower it).
    batch: usize,
    bad_rx_chain: LogOnce,
    bad_queue: LogOnce,
    timer_error: LogOnce,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening for host
    /// connections on `uds_path` (which must not exist yet).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if guest_cid < MIN_GUEST_CID || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if uds_path.symlink_metadata().is_ok() {
            return Err(VsockError::UdsExists(uds_path.to_path_buf()));
        }
        let listener = UnixListener::bind(uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Bind {
                path: uds_path.to_path_buf(),
                source,
            })?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            muxer: Muxer::new(guest_cid, uds_path, listener),
            activation: Activation::new(QUEUE_SIZE).map_err(VsockError::EventFd)?,
            timer: TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?,
            timer_armed: false,
            tx_stalled: false,
            batch: MAX_CHAINS_PER_EVENT,
            bad_rx_chain: LogOnce::new(),
            bad_queue: LogOnce::new(),
            timer_error: LogOnce::new(),
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Tell the driver every connection is gone (a restore: the host
    /// sockets stayed with the old process): one
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue. Linux then
    /// resets its sockets and reads the CID again. Without an event buffer
    /// from the driver it is logged and skipped (its connections then time
    /// out instead).
    pub fn send_transport_reset(&mut self) {
        let Some(a) = self.activation.active_mut() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queues[EVQ];
        let Some(mut chain) = q.pop_descriptor_chain(mem) else {
            self.bad_queue.warn(format_args!(
                "vsock: no event buffer for the transport reset"
            ));
            return;
        };
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id }, id 0 = TRANSPORT_RESET.
        let written = match chain.find(|d| d.is_write_only() && d.len() >= 4) {
            Some(d) => {
                use vm_memory::Bytes;
                mem.write_obj(0u32.to_le(), d.addr()).is_ok()
            }
            None => false,
        };
        if !written {
            self.bad_queue
                .warn(format_args!("vsock: the event buffer cannot hold an event"));
        }
        let len = if written { 4 } else { 0 };
        if q.add_used(mem, head, len).is_ok() {
            a.interrupt.signal_used_queue();
        }
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.conn_count()
    }

    /// Process the guest's TX queue: hand every packet to the muxer and
    /// return every chain. Stops early (and remembers it) while the reset
    /// queue is full; takes at most `batch` chains, and if more are waiting
    /// kicks the TX eventfd to come back after the other events.
    fn process_tx(&mut self, now: Instant) {
        let Some((a, queue_evts)) = self.activation.active_with_events() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queues[TXQ];
        let mut used = false;
        let mut taken = 0;
        self.tx_stalled = false;
        loop {
            if !self.muxer.can_take_tx() {
                self.tx_stalled = true;
                break;
            }
            if taken >= self.batch {
                if ring_has_more(q, mem) {
                    yield_queue(&queue_evts[TXQ], &self.bad_queue);
                }
                break;
            }
            let Some(mut chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let probe = chain.clone();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::of(&pkt);
                    self.muxer.send_guest_pkt(&hdr, pkt.data_slice(), now);
                }
                Err(e) => {
                    let hdr = packet::peek_tx_header(mem, probe);
                    self.muxer.reject_malformed(hdr, &e);
                }
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                self.bad_queue
                    .warn(format_args!("vsock: cannot return a TX buffer: {e}"));
                break;
            }
            used = true;
        }
        // Without EVENT_IDX this is always true; a memory error means the
        // driver broke its rings, and an extra interrupt does no harm.
        if used && q.needs_notification(mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }

    /// Fill RX buffers with what the muxer has for the guest: at most
    /// `batch` of them, kicking the RX eventfd to come back if there is
    /// more to deliver (host data can keep coming as fast as the guest
    /// hands out buffers).
    fn process_rx(&mut self, now: Instant) {
        let Some((a, queue_evts)) = self.activation.active_with_events() else {
            return;
        };
        let mem = &a.mem;
        let q = &mut a.queues[RXQ];
        let mut used = false;
        let mut taken = 0;
        while self.muxer.has_rx_work() {
            if taken >= self.batch {
                if ring_has_more(q, mem) {
                    yield_queue(&queue_evts[RXQ], &self.bad_queue);
                }
                break;
            }
            let Some(mut chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(&mut pkt, now) {
                    Some(len) => len,
                    None => {
                        // Nothing after all: keep the buffer for later.
                        q.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    self.bad_rx_chain
                        .warn(format_args!("vsock: unusable RX buffer: {e}"));
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                self.bad_queue
                    .warn(format_args!("vsock: cannot return an RX buffer: {e}"));
                break;
            }
            used = true;
        }
        if used && q.needs_notification(mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }

    /// Move packets both ways until nothing more can move: RX first (it
    /// frees room for the resets TX may cause), then TX if it had stalled.
    fn run_queues(&mut self, now: Instant) {
        self.process_rx(now);
        if self.tx_stalled {
            self.process_tx(now);
            self.process_rx(now);
        }
    }

    /// Reset the connections whose wait timed out (as if at `now`).
    fn sweep(&mut self, now: Instant) {
        self.muxer.sweep(now);
        self.run_queues(now);
    }

    fn arm_timer(&mut self, now: Instant) {
        if self.timer_armed {
            return;
        }
        if let Some(deadline) = self.muxer.next_deadline() {
            // A zero duration would disarm the timer: fire soon instead.
            let dur = deadline
                .saturating_duration_since(now)
                .max(std::time::Duration::from_millis(1));
            match self.timer.reset(dur, None) {
                Ok(()) => self.timer_armed = true,
                Err(e) => self
                    .timer_error
                    .warn(format_args!("vsock: cannot arm the timeout timer: {e}")),
            }
        }
    }

    /// Handle one event on `fd` (the body of `process`, `ops` abstracted).
    fn handle_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        if let Some(q) = self.activation.queue_of(fd) {
            // RX and the event queue are served by `run_queues` below.
            let _ = self.activation.queue_evt(q).read();
            if q == TXQ {
                self.process_tx(now);
            }
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.timer_armed = false;
            self.sweep(now);
        } else {
            self.muxer.handle_fd_event(fd, set, now);
        }
        self.run_queues(now);
    }
}

/// Come back to a queue on the next event-loop round (its eventfd is
/// level-triggered in epoll).
fn yield_queue(evt: &EventFd, log: &LogOnce) {
    if let Err(e) = evt.write(1) {
        log.warn(format_args!("vsock: cannot re-arm a queue eventfd: {e}"));
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.activation.queue_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.activation.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.tx_stalled = false;
        self.activation.activate(ctx)
    }

    fn reset(&mut self) {
        self.activation.reset();
        self.tx_stalled = false;
        self.muxer.reset();
        // Wake the event loop so it stops watching (and closes) the sockets.
        let _ = self.activation.activate_evt().write(1);
    }

    fn is_activated(&self) -> bool {
        self.activation.is_activated()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.activation.queue_states()
    }

    fn restored(&mut self) {
        self.send_transport_reset();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops, "vsock");
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!("vsock: cannot register with the event loop: {e}");
        }
        // The listener (and any socket accepted before) is watched through
        // the muxer.
        self.muxer.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        let fd = events.fd();
        if self.activation.on_activate_event(fd, ops, "vsock") {
            if self.activation.is_activated() {
                // The driver may have queued buffers before we watched.
                self.process_tx(now);
                self.run_queues(now);
            }
        } else {
            self.handle_event(fd, events.event_set(), now);
        }
        self.muxer.sync(ops);
        self.arm_timer(now);
    }
}
