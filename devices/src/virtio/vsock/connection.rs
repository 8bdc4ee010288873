//! One stream connection: a guest (CID, port) pair tied to a host
//! `UnixStream`, with the credit accounting of virtio spec 5.10.6.3.
//!
//! Guest → host: OP_RW payloads are written to the stream; what the stream
//! does not take at once waits in a buffer bounded by the `buf_alloc` we
//! advertise ([`CONN_BUF_ALLOC`]). Our `fwd_cnt` counts guest bytes handed to
//! the stream, so the guest can never make us hold more than that buffer; a
//! guest that sends past its credit breaks the protocol and is reset.
//!
//! Host → guest: the stream is read straight into a guest RX buffer, and
//! only while the guest has credit (`peer_buf_alloc - (rx_cnt -
//! peer_fwd_cnt)`) and an RX buffer is at hand; meanwhile the stream is not
//! polled for input, so nothing is buffered on our side and the event loop
//! never spins on a readable socket it cannot drain.
//!
//! Control packets owed to the guest (REQUEST, RESPONSE, CREDIT_UPDATE) are
//! flags, not a queue: each is owed at most once, so they cannot pile up.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use virtio_vsock::packet::VsockPacket;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::{
    Header, HDR_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, VSOCK_HOST_CID,
};

/// Receive buffer we advertise to the guest per connection (`buf_alloc`):
/// the most guest data we ever hold for a host socket that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// We volunteer an OP_CREDIT_UPDATE once `fwd_cnt` moved this much since the
/// guest last heard it.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Largest payload of one packet, either way.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// How long a host-initiated connection waits for the guest's RESPONSE.
/// Longer than Firecracker's 2 s: the guest kernel answers, and a guest on
/// a loaded or nested host stalls past 2 s now and then (seen in the lane:
/// ssh refused mid-test). Only the host's own connection waits, and
/// pending ones count against `MAX_CONNECTIONS`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the guest's RST (or for the host
/// socket to take the data still buffered) before we reset it.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection's identity: our (host-side) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side port (the guest's `dst_port`).
    pub local_port: u32,
    /// Guest-side port (the guest's `src_port`).
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: OP_REQUEST owed or sent, waiting for OP_RESPONSE.
    LocalInit,
    /// Both ways open (possibly half-closed by the guest).
    Established,
    /// The host socket reached EOF: OP_SHUTDOWN sent, waiting for the
    /// guest's OP_RST.
    LocalClosed,
    /// The guest shut down both ways: draining buffered data to the host
    /// socket, then OP_RST.
    PeerClosing,
}

/// A guest protocol violation (each class is logged once by the muxer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// An operation that makes no sense in the connection's state.
    BadOp,
    /// OP_RW past the credit we gave.
    Credit,
}

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Carry on.
    Keep,
    /// Drop it silently (the guest reset it).
    Close,
    /// Send OP_RST to the guest and drop it (normal end, timeout, or a host
    /// socket error).
    Reset,
    /// Send OP_RST to the guest and drop it: the guest broke the protocol.
    Violation(Violation),
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Ports.
    pub key: ConnKey,
    /// Whether the host opened it (its local port was allocated by us).
    pub host_initiated: bool,
    /// Life-cycle state.
    pub state: ConnState,
    /// Whether the muxer's RX round-robin holds this connection's key.
    pub in_rxq: bool,
    /// When the current wait (for RESPONSE, RST, or a drain) gives up.
    pub deadline: Option<Instant>,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    /// The stream reported readable and was not drained since.
    read_ready: bool,
    /// The guest will receive no more (SHUTDOWN with RCV).
    peer_shut_rcv: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    peer_shut_send: bool,
    /// We shut down the stream's write side.
    wr_shut: bool,
    /// Bytes for the host socket that it did not take yet.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (`OK <port>\n`), not guest
    /// data: they count neither against the credit nor in `fwd_cnt`.
    tx_uncounted: usize,
    /// Guest bytes received in OP_RW (wrapping).
    guest_cnt: u32,
    /// Guest bytes written to the host socket (wrapping).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last saw from us.
    last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    /// The guest's receive buffer for this connection.
    peer_buf_alloc: u32,
    /// Bytes the guest consumed from that buffer.
    peer_fwd_cnt: u32,
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, host_initiated: bool, state: ConnState) -> Self {
        Connection {
            stream,
            key,
            host_initiated,
            state,
            in_rxq: false,
            deadline: None,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            read_ready: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            wr_shut: false,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            guest_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    /// A host process asked (`CONNECT <port>`) for a connection to the
    /// guest: OP_REQUEST is owed, and the guest has [`REQUEST_TIMEOUT`] to
    /// answer.
    pub fn new_local_init(stream: UnixStream, key: ConnKey, now: Instant) -> Self {
        let mut c = Connection::new(stream, key, true, ConnState::LocalInit);
        c.need_request = true;
        c.deadline = Some(now + REQUEST_TIMEOUT);
        c
    }

    /// The guest's OP_REQUEST `hdr` reached a host listener on `stream`:
    /// OP_RESPONSE is owed.
    pub fn new_peer_init(stream: UnixStream, key: ConnKey, hdr: &Header) -> Self {
        let mut c = Connection::new(stream, key, false, ConnState::Established);
        c.need_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c
    }

    /// The host socket's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than we sent gets no
        // credit rather than a huge one.
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read(&self) -> bool {
        self.state == ConnState::Established && !self.peer_shut_rcv
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self) -> bool {
        self.need_request
            || self.need_response
            || self.need_credit_update
            || (self.read_ready && self.can_read() && self.peer_credit() > 0)
    }

    /// The epoll events to watch on the host socket (empty: do not watch).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_read() && !self.read_ready && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the current wait timed out.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// The host socket reported `set`.
    pub fn on_host_event(&mut self, set: EventSet) -> Verdict {
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.contains(EventSet::OUT) || (trouble && !self.tx_buf.is_empty()) {
            let v = self.flush();
            if v != Verdict::Keep {
                return v;
            }
            if trouble && !self.tx_buf.is_empty() {
                // The peer is gone and will never take the rest.
                return Verdict::Reset;
            }
        }
        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) || trouble {
            // Read (and so see data, EOF or the error) when the guest can
            // take a packet.
            self.read_ready = true;
        }
        Verdict::Keep
    }

    /// A packet from the guest for this connection. `data` is the payload
    /// of an OP_RW (exactly `hdr.len` bytes).
    pub fn recv_guest_pkt(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, ()>>,
        now: Instant,
    ) -> Verdict {
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RST => Verdict::Close,
            OP_RESPONSE if self.state == ConnState::LocalInit => {
                self.state = ConnState::Established;
                self.deadline = None;
                let ack = format!("OK {}\n", self.key.local_port);
                self.tx_uncounted += ack.len();
                self.tx_buf.extend(ack.as_bytes());
                self.flush()
            }
            OP_RW if self.accepts_data() => match data {
                Some(data) => self.write_guest_data(data),
                None => Verdict::Keep,
            },
            OP_CREDIT_UPDATE if self.state != ConnState::LocalInit => Verdict::Keep,
            OP_CREDIT_REQUEST if self.state != ConnState::LocalInit => {
                self.need_credit_update = true;
                Verdict::Keep
            }
            OP_SHUTDOWN if self.state != ConnState::LocalInit => {
                self.guest_shutdown(hdr.flags, now)
            }
            _ => Verdict::Violation(Violation::BadOp),
        }
    }

    fn accepts_data(&self) -> bool {
        matches!(self.state, ConnState::Established | ConnState::LocalClosed)
            && !self.peer_shut_send
    }

    fn guest_shutdown(&mut self, flags: u32, now: Instant) -> Verdict {
        self.peer_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        if self.state == ConnState::LocalClosed && self.peer_shut_send && self.tx_buf.is_empty() {
            // Both sides are done.
            return Verdict::Reset;
        }
        if self.peer_shut_rcv && self.peer_shut_send {
            if self.tx_buf.is_empty() {
                return Verdict::Reset;
            }
            self.state = ConnState::PeerClosing;
            self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            return Verdict::Keep;
        }
        if self.peer_shut_send && self.tx_buf.is_empty() {
            self.shut_write();
        }
        Verdict::Keep
    }

    fn shut_write(&mut self) {
        if !self.wr_shut {
            self.wr_shut = true;
            // Failing here only means the peer is gone already.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    fn write_guest_data(&mut self, data: &VolatileSlice<'_, ()>) -> Verdict {
        let len = data.len();
        // The guest may have in flight what fits in the buffer we
        // advertised, counting from the last fwd_cnt we told it (it cannot
        // know a later one). This also bounds `tx_buf`.
        let in_flight = u64::from(self.guest_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        if in_flight + len as u64 > u64::from(CONN_BUF_ALLOC) {
            return Verdict::Violation(Violation::Credit);
        }
        self.guest_cnt = self.guest_cnt.wrapping_add(len as u32);
        let mut done = 0;
        if self.tx_buf.is_empty() {
            loop {
                match self.stream.write_volatile(data) {
                    Ok(n) => {
                        done = n;
                        break;
                    }
                    Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if would_block(&e) => break,
                    Err(_) => return Verdict::Reset,
                }
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
        }
        if done < len {
            let mut rest = vec![0u8; len - done];
            let copied = data
                .offset(done)
                .map(|tail| tail.copy_to(&mut rest[..]))
                .unwrap_or(0);
            rest.truncate(copied);
            self.tx_buf.extend(rest);
        }
        self.note_progress();
        Verdict::Keep
    }

    /// Push buffered bytes to the host socket.
    pub fn flush(&mut self) -> Verdict {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                    self.tx_buf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if self.tx_buf.is_empty() {
            if self.tx_buf.capacity() > MAX_PKT_DATA as usize {
                self.tx_buf.shrink_to(MAX_PKT_DATA as usize);
            }
            if self.state == ConnState::PeerClosing {
                return Verdict::Reset;
            }
            if self.peer_shut_send {
                if self.state == ConnState::LocalClosed {
                    return Verdict::Reset;
                }
                self.shut_write();
            }
        }
        self.note_progress();
        Verdict::Keep
    }

    fn note_progress(&mut self) {
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
            && matches!(self.state, ConnState::Established | ConnState::LocalClosed)
        {
            self.need_credit_update = true;
        }
    }

    fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        // Every packet tells the guest our credit.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Fill the RX packet `pkt` with the next packet owed to the guest, if
    /// any. Returns the bytes written (header and data) and what to do with
    /// the connection.
    pub fn fill_rx(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        guest_cid: u64,
        now: Instant,
    ) -> (Option<u32>, Verdict) {
        let hdr = if self.need_request {
            self.need_request = false;
            Some(self.header(guest_cid, OP_REQUEST))
        } else if self.need_response {
            self.need_response = false;
            Some(self.header(guest_cid, OP_RESPONSE))
        } else {
            None
        };
        if let Some(h) = hdr {
            return (write_header(pkt, &h), Verdict::Keep);
        }

        if self.read_ready && self.can_read() {
            let credit = self.peer_credit().min(MAX_PKT_DATA) as usize;
            let dst = pkt
                .data_slice()
                .copied()
                .and_then(|s| s.subslice(0, s.len().min(credit)).ok())
                .filter(|s| !s.is_empty());
            if let Some(mut dst) = dst {
                let res = loop {
                    match self.stream.read_volatile(&mut dst) {
                        Err(VolatileMemoryError::IOError(e))
                            if e.kind() == ErrorKind::Interrupted => {}
                        other => break other,
                    }
                };
                match res {
                    Ok(0) => {
                        // The host closed its side: tell the guest, and give
                        // it a while to answer with OP_RST.
                        self.read_ready = false;
                        self.state = ConnState::LocalClosed;
                        self.deadline = Some(now + SHUTDOWN_TIMEOUT);
                        let mut h = self.header(guest_cid, OP_SHUTDOWN);
                        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        return (write_header(pkt, &h), Verdict::Keep);
                    }
                    Ok(n) => {
                        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                        let mut h = self.header(guest_cid, OP_RW);
                        h.len = n as u32;
                        return (write_header(pkt, &h).map(|l| l + n as u32), Verdict::Keep);
                    }
                    Err(e) if would_block(&e) => self.read_ready = false,
                    Err(_) => return (None, Verdict::Reset),
                }
            }
        }

        if self.need_credit_update {
            let h = self.header(guest_cid, OP_CREDIT_UPDATE);
            return (write_header(pkt, &h), Verdict::Keep);
        }
        (None, Verdict::Keep)
    }
}

/// Write `hdr` into the RX packet; the header's length on success.
pub fn write_header(pkt: &mut VsockPacket<'_, ()>, hdr: &Header) -> Option<u32> {
    pkt.set_header_from_raw(&hdr.to_bytes()).ok()?;
    Some(HDR_LEN as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1234,
        };
        let hdr = Header {
            buf_alloc: 1000,
            fwd_cnt: 0,
            ..Header::default()
        };
        (Connection::new_peer_init(a, key, &hdr), b)
    }

    #[test]
    fn credit_is_buf_alloc_minus_in_flight_and_never_negative() {
        let (mut c, _peer) = pair();
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.peer_fwd_cnt = 500;
        assert_eq!(c.peer_credit(), 900);
        // A lying fwd_cnt (ahead of what we sent) gives nothing.
        c.peer_fwd_cnt = 700;
        assert_eq!(c.peer_credit(), 0);
        // Wrapping counters still work.
        c.rx_cnt = 10;
        c.peer_fwd_cnt = u32::MAX - 9;
        assert_eq!(c.peer_credit(), 980);
    }

    #[test]
    fn interest_follows_read_readiness_credit_and_buffer() {
        let (mut c, _peer) = pair();
        assert_eq!(c.interest(), EventSet::IN);
        c.read_ready = true;
        assert_eq!(c.interest(), EventSet::empty());
        c.read_ready = false;
        c.peer_buf_alloc = 0;
        assert_eq!(c.interest(), EventSet::empty());
        c.tx_buf.push_back(1);
        assert_eq!(c.interest(), EventSet::OUT);
    }

    #[test]
    fn guest_rst_closes_and_unknown_op_is_a_violation() {
        let (mut c, _peer) = pair();
        let now = Instant::now();
        let hdr = Header {
            op: 42,
            ..Header::default()
        };
        assert_eq!(
            c.recv_guest_pkt(&hdr, None, now),
            Verdict::Violation(Violation::BadOp)
        );
        let hdr = Header {
            op: OP_RST,
            ..Header::default()
        };
        assert_eq!(c.recv_guest_pkt(&hdr, None, now), Verdict::Close);
    }

    #[test]
    fn expiry_follows_the_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let key = ConnKey {
            local_port: 5,
            peer_port: 6,
        };
        let c = Connection::new_local_init(a, key, now);
        assert!(!c.expired(now));
        assert!(c.expired(now + REQUEST_TIMEOUT));
    }
}
