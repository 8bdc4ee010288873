//! The connection multiplexer of the hybrid (Unix socket) backend.
//!
//! Host side, after Firecracker's design: the device listens on `uds_path`;
//! a host process connects there and writes `CONNECT <port>\n` to reach
//! guest port `<port>` (answered `OK <local_port>\n` once the guest
//! accepts); a guest connecting to host port `P` reaches the listener at
//! `<uds_path>_P`.
//!
//! The muxer owns every connection, keyed by (local port, guest port), and
//! decides which of them gets the next RX buffer: reset packets not tied to
//! a live connection first (a bounded queue), then the connections with
//! something to send, round-robin (each at most once in the queue).
//!
//! It never talks to epoll itself: it records which host sockets need which
//! events, and [`Muxer::sync`] applies the difference through a
//! [`FdWatcher`] (the event manager's `EventOps` in the device). Sockets of
//! dropped connections stay open until then if epoll watches them, so
//! that an fd number is never reused while still registered; those it never
//! watched are closed at once. Closed-but-not-yet-unwatched sockets count
//! against [`MAX_CONNECTIONS`], so the fds held stay bounded.
//!
//! Nothing here blocks: guest connections to host listeners use a
//! non-blocking `connect` (a full listen backlog means a reset, not a hung
//! event loop).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events};
use virtio_vsock::packet::VsockPacket;
use vm_memory::VolatileSlice;

use super::connection::{write_header, ConnKey, Connection, Verdict, Violation, REQUEST_TIMEOUT};
use super::packet::{Header, OP_CREDIT_REQUEST, OP_REQUEST, OP_RST, TYPE_STREAM, VSOCK_HOST_CID};
use crate::virtio::LogOnce;

/// Most connections (established, waiting for their `CONNECT` line, or
/// closed but not yet unwatched) at once; past this, new host connections
/// are closed and guest requests reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>\n` line we read.
pub const CONNECT_LINE_MAX: usize = 32;
/// First local port handed to host-initiated connections.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Reset packets waiting for an RX buffer. TX processing pauses while this
/// is full, so a guest that floods bad packets without reading cannot make
/// it grow.
pub const RST_QUEUE_CAP: usize = 2 * MAX_CONNECTIONS;
/// Host connections accepted per listener event.
const ACCEPT_BATCH: usize = 64;

/// Applies epoll interest changes (the event manager's `EventOps`, or a
/// stand-in in tests).
pub trait FdWatcher {
    /// Start watching `fd` for `set`.
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), String>;
    /// Watch `fd` for `set` instead.
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), String>;
    /// Stop watching `fd`.
    fn remove(&mut self, fd: RawFd) -> Result<(), String>;
}

impl FdWatcher for EventOps<'_> {
    fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
        EventOps::add(self, Events::new_raw(fd, set)).map_err(|e| e.to_string())
    }
    fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
        EventOps::modify(self, Events::new_raw(fd, set)).map_err(|e| e.to_string())
    }
    fn remove(&mut self, fd: RawFd) -> Result<(), String> {
        EventOps::remove(self, Events::new_raw(fd, EventSet::empty())).map_err(|e| e.to_string())
    }
}

/// Who owns a watched fd.
#[derive(Clone, Copy, Debug)]
enum FdOwner {
    /// The listening socket.
    Listener,
    /// A host connection still sending its `CONNECT` line.
    Pending,
    /// A connection's host socket.
    Conn(ConnKey),
}

/// A freshly accepted host connection, before its `CONNECT` line.
#[derive(Debug)]
struct PendingStream {
    stream: UnixStream,
    line: Vec<u8>,
    /// When we give up waiting for the line.
    deadline: Instant,
}

/// Once-only warnings, one per class of guest or host misbehaviour.
#[derive(Debug, Default)]
struct Logs {
    bad_src_cid: LogOnce,
    bad_dst_cid: LogOnce,
    bad_type: LogOnce,
    bad_op: LogOnce,
    unknown_conn: LogOnce,
    violation: LogOnce,
    credit: LogOnce,
    malformed: LogOnce,
    bad_connect: LogOnce,
    too_many: LogOnce,
    rst_overflow: LogOnce,
    epoll: LogOnce,
    accept: LogOnce,
    refused: LogOnce,
    timeout: LogOnce,
    connect_timeout: LogOnce,
}

/// The multiplexer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    fds: HashMap<RawFd, FdOwner>,
    pending: HashMap<RawFd, PendingStream>,
    /// Connections with something for the guest (each at most once).
    rxq: VecDeque<ConnKey>,
    /// Resets not tied to a live connection.
    rst_queue: VecDeque<Header>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// What epoll watches now, per fd.
    watched: HashMap<RawFd, EventSet>,
    /// Fds whose interest may have changed since the last sync.
    dirty: HashSet<RawFd>,
    /// Sockets of dropped connections that epoll still watches, closed at
    /// the next sync.
    graveyard: Vec<UnixStream>,
    /// Some connection (or pending host connection) may have a deadline.
    deadlines: bool,
    /// The listener is not watched: accepting failed (out of fds?), and
    /// watching a listener we cannot drain would spin the event loop. Any
    /// closed connection resumes it.
    listener_paused: bool,
    logs: Logs,
}

impl Muxer {
    /// A muxer for guest `guest_cid`, accepting host connections on
    /// `listener` (bound at `uds_path`, non-blocking).
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> Self {
        let listener_fd = listener.as_raw_fd();
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            fds: HashMap::new(),
            pending: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            local_ports: HashSet::new(),
            next_local_port: LOCAL_PORT_BASE,
            watched: HashMap::new(),
            dirty: HashSet::new(),
            graveyard: Vec::new(),
            deadlines: false,
            listener_paused: false,
            logs: Logs::default(),
        };
        m.fds.insert(listener_fd, FdOwner::Listener);
        m.dirty.insert(listener_fd);
        m
    }

    fn resume_listener(&mut self) {
        if self.listener_paused {
            self.listener_paused = false;
            self.dirty.insert(self.listener.as_raw_fd());
        }
    }

    /// Live connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Host connections still waiting for their `CONNECT` line.
    #[cfg(test)]
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Sockets held: connections, pending host connections, and closed
    /// ones still waiting to be unwatched.
    fn slots_used(&self) -> usize {
        self.conns.len() + self.pending.len() + self.graveyard.len()
    }

    /// Close the socket of a dropped connection: at once if epoll never
    /// watched it, else at the next sync (after unwatching it).
    fn bury(&mut self, stream: UnixStream) {
        let fd = stream.as_raw_fd();
        self.dirty.remove(&fd);
        if self.watched.contains_key(&fd) {
            self.graveyard.push(stream);
        }
        // Otherwise dropped (closed) here.
    }

    /// Whether some packet waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    /// Whether a TX packet may be taken now (there is room for the reset it
    /// may cause).
    pub fn can_take_tx(&self) -> bool {
        self.rst_queue.len() < RST_QUEUE_CAP
    }

    fn push_rst(&mut self, h: Header) {
        if self.rst_queue.len() < RST_QUEUE_CAP {
            self.rst_queue.push_back(h);
        } else {
            self.logs.rst_overflow.warn(format_args!(
                "vsock: guest does not read its RX queue; dropping resets"
            ));
        }
    }

    /// Answer the guest packet `hdr` with OP_RST (never a reset with a reset).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != OP_RST {
            self.push_rst(hdr.rst_reply());
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.in_rxq && conn.has_rx_work() {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
        if conn.deadline.is_some() {
            self.deadlines = true;
        }
        self.dirty.insert(conn.fd());
    }

    /// Drop a connection, resetting the guest side if `rst`.
    fn remove_conn(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.fds.remove(&conn.fd());
        if conn.host_initiated {
            self.local_ports.remove(&key.local_port);
        }
        if conn.in_rxq {
            self.rxq.retain(|k| *k != key);
        }
        if rst {
            self.push_rst(Header {
                src_cid: VSOCK_HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.local_port,
                dst_port: key.peer_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
        }
        self.bury(conn.stream);
        self.resume_listener();
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Close => self.remove_conn(key, false),
            Verdict::Reset => self.remove_conn(key, true),
            Verdict::Violation(v) => {
                match v {
                    Violation::Credit => self.logs.credit.warn(format_args!(
                        "vsock: guest sent past its credit on port {}; resetting",
                        key.local_port
                    )),
                    Violation::BadOp => self.logs.violation.warn(format_args!(
                        "vsock: guest operation out of sequence on port {}; resetting",
                        key.local_port
                    )),
                }
                self.remove_conn(key, true);
            }
        }
    }

    /// Accept host connections waiting on the listener.
    pub fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.logs.accept.warn(format_args!(
                        "vsock: accept failed: {e}; not accepting until a connection closes"
                    ));
                    self.listener_paused = true;
                    self.dirty.insert(self.listener.as_raw_fd());
                    return;
                }
            };
            if self.slots_used() >= MAX_CONNECTIONS {
                self.logs.too_many.warn(format_args!(
                    "vsock: {MAX_CONNECTIONS} connections open; refusing more"
                ));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.pending.insert(
                fd,
                PendingStream {
                    stream,
                    line: Vec::with_capacity(CONNECT_LINE_MAX),
                    deadline: now + REQUEST_TIMEOUT,
                },
            );
            self.fds.insert(fd, FdOwner::Pending);
            self.dirty.insert(fd);
            self.deadlines = true;
            // The line is often there already.
            self.read_connect_line(fd, now);
        }
    }

    fn drop_pending(&mut self, fd: RawFd) {
        if let Some(p) = self.pending.remove(&fd) {
            self.fds.remove(&fd);
            self.bury(p.stream);
            self.resume_listener();
        }
    }

    /// Read (a byte at a time, so as not to swallow the data that may
    /// follow it) the `CONNECT <port>\n` line of a pending host connection.
    fn read_connect_line(&mut self, fd: RawFd, now: Instant) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        loop {
            if p.line.len() >= CONNECT_LINE_MAX {
                self.logs.bad_connect.warn(format_args!(
                    "vsock: host connection sent no CONNECT line in {CONNECT_LINE_MAX} bytes"
                ));
                self.drop_pending(fd);
                return;
            }
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => {
                    self.drop_pending(fd);
                    return;
                }
                Ok(_) => {
                    p.line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_pending(fd);
                    return;
                }
            }
        }
        let Some(port) = parse_connect(&p.line) else {
            self.logs.bad_connect.warn(format_args!(
                "vsock: malformed CONNECT line {:?}",
                String::from_utf8_lossy(&p.line)
            ));
            self.drop_pending(fd);
            return;
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let Some(local_port) = self.allocate_local_port(port) else {
            self.fds.remove(&fd);
            self.bury(p.stream);
            self.resume_listener();
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        self.local_ports.insert(local_port);
        self.fds.insert(fd, FdOwner::Conn(key));
        self.conns
            .insert(key, Connection::new_local_init(p.stream, key, now));
        self.schedule(key);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) => p,
                None => LOCAL_PORT_BASE,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// A host socket (`fd`) reported `set`.
    pub fn handle_fd_event(&mut self, fd: RawFd, set: EventSet, now: Instant) {
        match self.fds.get(&fd).copied() {
            Some(FdOwner::Listener) => self.accept(now),
            Some(FdOwner::Pending) => self.read_connect_line(fd, now),
            Some(FdOwner::Conn(key)) => {
                let verdict = match self.conns.get_mut(&key) {
                    Some(conn) => conn.on_host_event(set),
                    None => return,
                };
                self.apply(key, verdict);
            }
            None => {}
        }
    }

    /// A TX packet from the guest. `data` is the payload (`hdr.len` bytes).
    pub fn send_guest_pkt(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, ()>>,
        now: Instant,
    ) {
        if hdr.src_cid != self.guest_cid {
            // Not an address we could answer.
            self.logs.bad_src_cid.warn(format_args!(
                "vsock: dropping a packet from CID {} (guest is {})",
                hdr.src_cid, self.guest_cid
            ));
            return;
        }
        if hdr.dst_cid != VSOCK_HOST_CID {
            self.logs.bad_dst_cid.warn(format_args!(
                "vsock: guest sent a packet to CID {}; only the host (2) is reachable",
                hdr.dst_cid
            ));
            self.reply_rst(hdr);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.logs.bad_type.warn(format_args!(
                "vsock: guest used socket type {}; only streams are supported",
                hdr.type_
            ));
            self.reply_rst(hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
            self.logs.bad_op.warn(format_args!(
                "vsock: guest sent unknown operation {}",
                hdr.op
            ));
            if self.conns.contains_key(&key) {
                self.remove_conn(key, true);
            } else {
                self.reply_rst(hdr);
            }
            return;
        }
        let verdict = match self.conns.get_mut(&key) {
            Some(conn) => conn.recv_guest_pkt(hdr, data, now),
            None if hdr.op == OP_REQUEST => {
                self.guest_connect(hdr, key);
                return;
            }
            None => {
                if hdr.op != OP_RST {
                    self.logs.unknown_conn.warn(format_args!(
                        "vsock: guest packet (op {}) for unknown connection {}:{}",
                        hdr.op, hdr.src_port, hdr.dst_port
                    ));
                }
                self.reply_rst(hdr);
                return;
            }
        };
        self.apply(key, verdict);
    }

    /// A TX chain the packet parser refused (`hdr`: its header if readable).
    pub fn reject_malformed(&mut self, hdr: Option<Header>, why: &dyn std::fmt::Display) {
        self.logs
            .malformed
            .warn(format_args!("vsock: malformed TX packet: {why}"));
        let Some(hdr) = hdr else {
            return;
        };
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.remove_conn(key, true);
        } else {
            self.reply_rst(&hdr);
        }
    }

    /// The guest asks for host port `hdr.dst_port`: connect to
    /// `<uds_path>_<port>`.
    ///
    /// The connect does not block: a listener whose backlog is full refuses
    /// (the guest gets a reset) instead of stalling the event loop.
    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.slots_used() >= MAX_CONNECTIONS {
            self.logs.too_many.warn(format_args!(
                "vsock: {MAX_CONNECTIONS} connections open; refusing more"
            ));
            self.reply_rst(hdr);
            return;
        }
        let path = self.port_path(key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                self.fds.insert(fd, FdOwner::Conn(key));
                self.conns
                    .insert(key, Connection::new_peer_init(stream, key, hdr));
                self.schedule(key);
            }
            Err(e) => {
                self.logs.refused.warn(format_args!(
                    "vsock: guest connection to {} refused: {e}",
                    path.display()
                ));
                self.reply_rst(hdr);
            }
        }
    }

    /// `<uds_path>_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut s = OsString::from(self.uds_path.as_os_str());
        s.push(format!("_{port}"));
        PathBuf::from(s)
    }

    /// Fill `pkt` with the next packet for the guest; its length, or `None`
    /// when nothing is owed (the buffer is then untouched).
    pub fn fill_rx(&mut self, pkt: &mut VsockPacket<'_, ()>, now: Instant) -> Option<u32> {
        // Each connection gets one try per call, so a connection that has
        // work but cannot use this buffer does not make this loop spin.
        let mut budget = self.rxq.len();
        loop {
            if let Some(h) = self.rst_queue.pop_front() {
                return write_header(pkt, &h);
            }
            if budget == 0 {
                return None;
            }
            budget -= 1;
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let (len, verdict) = conn.fill_rx(pkt, self.guest_cid, now);
            self.apply(key, verdict);
            if len.is_some() {
                return len;
            }
        }
    }

    /// Reset the connections whose wait timed out, and close the host
    /// connections that sent no `CONNECT` line in time.
    pub fn sweep(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.expired(now))
            .map(|c| c.key)
            .collect();
        for key in expired {
            self.logs.timeout.warn(format_args!(
                "vsock: connection {}:{} timed out",
                key.local_port, key.peer_port
            ));
            self.remove_conn(key, true);
        }
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            self.logs.connect_timeout.warn(format_args!(
                "vsock: host connection sent no CONNECT line in {REQUEST_TIMEOUT:?}; closing"
            ));
            self.drop_pending(fd);
        }
    }

    /// The earliest deadline (of a connection or a pending host
    /// connection), if any.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        if !self.deadlines {
            return None;
        }
        let conns = self.conns.values().filter_map(|c| c.deadline);
        let pending = self.pending.values().map(|p| p.deadline);
        let next = conns.chain(pending).min();
        self.deadlines = next.is_some();
        next
    }

    /// Close every connection (device reset).
    pub fn reset(&mut self) {
        let conns: Vec<UnixStream> = self.conns.drain().map(|(_, c)| c.stream).collect();
        let pending: Vec<UnixStream> = self.pending.drain().map(|(_, p)| p.stream).collect();
        for stream in conns.into_iter().chain(pending) {
            self.bury(stream);
        }
        self.fds
            .retain(|_, owner| matches!(owner, FdOwner::Listener));
        self.resume_listener();
        self.rxq.clear();
        self.rst_queue.clear();
        self.local_ports.clear();
        self.deadlines = false;
    }

    /// Bring epoll up to date: stop watching (and close) the sockets of
    /// dropped connections, and apply interest changes.
    pub fn sync(&mut self, w: &mut dyn FdWatcher) {
        for stream in std::mem::take(&mut self.graveyard) {
            let fd = stream.as_raw_fd();
            if self.watched.remove(&fd).is_some() {
                if let Err(e) = w.remove(fd) {
                    self.logs
                        .epoll
                        .warn(format_args!("vsock: cannot unwatch a socket: {e}"));
                }
            }
            self.dirty.remove(&fd);
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        for fd in dirty.drain() {
            let want = match self.fds.get(&fd) {
                Some(FdOwner::Listener) if self.listener_paused => EventSet::empty(),
                Some(FdOwner::Listener) | Some(FdOwner::Pending) => EventSet::IN,
                Some(FdOwner::Conn(key)) => self
                    .conns
                    .get(key)
                    .map_or(EventSet::empty(), Connection::interest),
                None => EventSet::empty(),
            };
            let res = match self.watched.get(&fd).copied() {
                None if want.is_empty() => Ok(()),
                None => w.add(fd, want).map(|()| {
                    self.watched.insert(fd, want);
                }),
                Some(_) if want.is_empty() => {
                    self.watched.remove(&fd);
                    w.remove(fd)
                }
                Some(have) if have != want => w.modify(fd, want).map(|()| {
                    self.watched.insert(fd, want);
                }),
                Some(_) => Ok(()),
            };
            if let Err(e) = res {
                self.logs
                    .epoll
                    .warn(format_args!("vsock: cannot watch a socket: {e}"));
            }
        }
        self.dirty = dirty;
    }
}

/// Connect a new non-blocking, close-on-exec Unix stream socket to `path`
/// without ever waiting: a listener with a full backlog gives `EAGAIN`, a
/// missing one `ENOENT` or `ECONNREFUSED`, all returned as errors.
///
/// (`UnixStream::connect` blocks until the listener's backlog has room,
/// which a guest could make last forever.)
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is plain integers and a byte array; all zeroes
    // is a valid value (and leaves the path NUL-terminated below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the path and its terminating NUL; no NUL inside (it would
    // silently name another socket).
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "unusable Unix socket path (empty, too long, or with a NUL byte)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `socket` takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by `socket`, is open, and nothing else
    // owns it; the `OwnedFd` closes it on every path below.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // One try, whatever the error (even EINTR): the guest gets a reset and
    // may try again.
    // SAFETY: `addr` is a fully initialised `sockaddr_un` that outlives the
    // call, and `len` is its size; `connect` only reads it. `fd` is an open
    // socket that we own.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc == 0 {
        Ok(UnixStream::from(fd))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Parse `CONNECT <port>\n` (the command case-insensitive, as Firecracker).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    let port = words.next()?.parse::<u32>().ok()?;
    words.next().is_none().then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

    fn tmp() -> TempDir {
        TempDir::new_with_prefix("/tmp/ks-vsock-mux-").unwrap()
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener() {
        let dir = tmp();
        let path = dir.as_path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut s = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        // Non-blocking: nothing to read is WouldBlock, not a wait.
        let err = s.read(&mut b).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);
    }

    #[test]
    fn nonblocking_connect_to_nothing_fails() {
        let dir = tmp();
        let err = connect_nonblocking(&dir.as_path().join("missing")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // A socket file nobody listens on any more.
        let path = dir.as_path().join("dead.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = connect_nonblocking(&path).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
        // Paths that do not fit sun_path (with its NUL), or hold a NUL.
        let long = dir.as_path().join("x".repeat(200));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let err = connect_nonblocking(Path::new("/tmp/a\0b")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let err = connect_nonblocking(Path::new("")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn nonblocking_connect_to_a_full_backlog_fails_at_once() {
        let dir = tmp();
        let path = dir.as_path().join("full.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: `listener` owns an open, listening socket; calling
        // `listen` again only shrinks its backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        // In a thread, so that a connect that blocks fails the test instead
        // of hanging it.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let res = loop {
                match connect_nonblocking(&p) {
                    Ok(s) if held.len() < 64 => held.push(s),
                    Ok(_) => break Ok(held.len()),
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send((res, held.len()));
        });
        let (res, accepted) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("connect blocked on a full backlog");
        let err = res.expect_err("the backlog never filled");
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "{err}");
        assert!(accepted >= 1, "the first connection fits");
        drop(listener);
    }

    /// Records epoll changes.
    #[derive(Default)]
    struct Watcher {
        watched: HashMap<RawFd, EventSet>,
        removed: Vec<RawFd>,
    }

    impl FdWatcher for Watcher {
        fn add(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
            self.watched.insert(fd, set);
            Ok(())
        }
        fn modify(&mut self, fd: RawFd, set: EventSet) -> Result<(), String> {
            self.watched.insert(fd, set);
            Ok(())
        }
        fn remove(&mut self, fd: RawFd) -> Result<(), String> {
            self.watched.remove(&fd);
            self.removed.push(fd);
            Ok(())
        }
    }

    fn muxer(dir: &TempDir) -> (Muxer, PathBuf) {
        let path = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        (Muxer::new(3, &path, listener), path)
    }

    /// Whether `s` reads EOF now (not WouldBlock).
    fn closed(s: &mut UnixStream) -> bool {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unwatched_sockets_close_at_once_watched_ones_count_until_sync() {
        let dir = tmp();
        let (mut m, path) = muxer(&dir);
        let mut w = Watcher::default();
        m.sync(&mut w);
        let now = Instant::now();

        // Dropped before epoll ever saw it: closed immediately.
        let mut a = UnixStream::connect(&path).unwrap();
        a.write_all(b"HELLO 1\n").unwrap();
        m.accept(now);
        assert_eq!(m.pending_count(), 0);
        assert!(m.graveyard.is_empty());
        assert_eq!(m.slots_used(), 0);
        assert!(closed(&mut a));

        // Watched, then dropped: held (and counted) until the next sync.
        let mut b = UnixStream::connect(&path).unwrap();
        m.accept(now);
        assert_eq!(m.pending_count(), 1);
        m.sync(&mut w);
        let fd = *m.pending.keys().next().unwrap();
        assert_eq!(w.watched.get(&fd), Some(&EventSet::IN));
        b.write_all(b"HELLO 2\n").unwrap();
        m.handle_fd_event(fd, EventSet::IN, now);
        assert_eq!(m.pending_count(), 0);
        assert_eq!(m.slots_used(), 1, "the graveyard counts");
        assert!(!closed(&mut b));
        m.sync(&mut w);
        assert_eq!(w.removed, vec![fd]);
        assert_eq!(m.slots_used(), 0);
        assert!(closed(&mut b));
    }

    #[test]
    fn silent_host_connections_time_out() {
        let dir = tmp();
        let (mut m, path) = muxer(&dir);
        let mut w = Watcher::default();
        let now = Instant::now();
        assert_eq!(m.next_deadline(), None);
        let mut s = UnixStream::connect(&path).unwrap();
        m.accept(now);
        m.sync(&mut w);
        assert_eq!(m.pending_count(), 1);
        assert_eq!(m.next_deadline(), Some(now + REQUEST_TIMEOUT));
        m.sweep(now + REQUEST_TIMEOUT - Duration::from_millis(1));
        assert_eq!(m.pending_count(), 1);
        m.sweep(now + REQUEST_TIMEOUT);
        assert_eq!(m.pending_count(), 0);
        m.sync(&mut w);
        assert!(closed(&mut s));
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"connect 1024\r\n"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"HELLO 52\n"), None);
        assert_eq!(parse_connect(b"CONNECT 52 53\n"), None);
        assert_eq!(parse_connect(b"\xff\xfe\n"), None);
    }
}
