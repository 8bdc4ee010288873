//! End-to-end tests: a mock guest driver (split queues in real guest
//! memory) on one side, real Unix sockets on the other, and the device
//! driven by a real `EventManager` (epoll), as in the VMM.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::packet::*;
use super::*;
use crate::virtio::test_queue::DriverQueue;
use crate::virtio::{ActivateContext, Interrupt, VirtioDevice};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
/// Guest buffer per descriptor index: room for a 64 KiB payload.
const SLOT: u64 = 0x1_1000;
const RX_DATA: u32 = 4096;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
const WAIT: Duration = Duration::from_secs(5);

/// A guest header from guest port `src` to host port `dst`.
fn ghdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

struct Harness {
    dir: TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: EventFd,
    /// RX chains the driver keeps posted.
    rx_target: usize,
    received: VecDeque<(Header, Vec<u8>)>,
    last_credit: Option<u32>,
}

impl Harness {
    fn new() -> Self {
        Self::with_rx_target(32)
    }

    fn with_rx_target(rx_target: usize) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/ks-vsock-").unwrap();
        let uds = dir.as_path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = DriverQueue::new(QUEUE_SIZE, QUEUE_SIZE, SLOT, 0x1000, 0x10_0000);
        let (tx, txq) = DriverQueue::new(QUEUE_SIZE, QUEUE_SIZE, SLOT, 0x1_0000, 0x130_0000);
        let (_ev, evq) = DriverQueue::new(QUEUE_SIZE, QUEUE_SIZE, SLOT, 0x2_0000, 0x250_0000);
        let vsock = Vsock::new(GUEST_CID, &uds).unwrap();
        let rx_kick = vsock.queue_events()[RXQ].try_clone().unwrap();
        let tx_kick = vsock.queue_events()[TXQ].try_clone().unwrap();
        let dev = Arc::new(Mutex::new(vsock));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
                queues: vec![rxq, txq, evq],
                acked_features: 1 << VIRTIO_F_VERSION_1,
            })
            .unwrap();
        let mut h = Harness {
            dir,
            uds,
            mem,
            dev,
            em,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq,
            rx_target,
            received: VecDeque::new(),
            last_credit: None,
        };
        h.refill_rx();
        h.pump();
        h
    }

    /// Run the event loop until it is idle.
    fn pump(&mut self) {
        for _ in 0..1000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                break;
            }
        }
        self.collect_rx();
        self.reclaim_tx();
    }

    /// Run the event loop for about `d`.
    fn pump_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.em.run_with_timeout(5).unwrap();
            self.collect_rx();
            self.reclaim_tx();
        }
    }

    fn refill_rx(&mut self) {
        let mut added = false;
        while self.rx.outstanding() < self.rx_target {
            if self
                .rx
                .add_chain(&self.mem, &[(HDR_LEN as u32, true), (RX_DATA, true)])
                .is_none()
            {
                break;
            }
            added = true;
        }
        if added {
            self.rx_kick.write(1).unwrap();
        }
    }

    fn collect_rx(&mut self) {
        while let Some((idxs, len)) = self.rx.pop_used(&self.mem) {
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, self.rx.buf(idxs[0])).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert!(len as usize >= HDR_LEN, "RX used length {len} < header");
            assert_eq!(
                len as usize,
                HDR_LEN + hdr.len as usize,
                "used len vs header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            if !data.is_empty() {
                self.mem
                    .read_slice(&mut data, self.rx.buf(idxs[1]))
                    .unwrap();
            }
            self.received.push_back((hdr, data));
        }
        self.refill_rx();
    }

    fn reclaim_tx(&mut self) {
        while self.tx.pop_used(&self.mem).is_some() {}
    }

    /// Guest sends a packet with its payload.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        hdr.len = data.len() as u32;
        self.send_raw(hdr, data);
    }

    /// Guest sends a packet whose header `len` is taken as is.
    fn send_raw(&mut self, hdr: Header, data: &[u8]) {
        if self.tx.free.len() < 2 {
            self.pump();
        }
        let parts: Vec<(u32, bool)> = if data.is_empty() {
            vec![(HDR_LEN as u32, false)]
        } else {
            vec![(HDR_LEN as u32, false), (data.len() as u32, false)]
        };
        let addrs = self
            .tx
            .add_chain(&self.mem, &parts)
            .expect("TX descriptors");
        self.mem.write_slice(&hdr.to_bytes(), addrs[0]).unwrap();
        if !data.is_empty() {
            self.mem.write_slice(data, addrs[1]).unwrap();
        }
        self.tx_kick.write(1).unwrap();
        self.pump();
    }

    /// Wait for the next packet the device gives the guest, credit updates
    /// aside (their `fwd_cnt` is kept in `last_credit`).
    fn recv(&mut self) -> (Header, Vec<u8>) {
        loop {
            let (h, d) = self.recv_any();
            if h.op != OP_CREDIT_UPDATE {
                return (h, d);
            }
            self.last_credit = Some(h.fwd_cnt);
        }
    }

    /// Wait for the next packet the device gives the guest.
    fn recv_any(&mut self) -> (Header, Vec<u8>) {
        let end = Instant::now() + WAIT;
        loop {
            self.pump();
            if let Some(p) = self.received.pop_front() {
                return p;
            }
            assert!(Instant::now() < end, "no packet for the guest");
            self.em.run_with_timeout(5).unwrap();
        }
    }

    /// Assert the guest gets nothing (but credit updates) for a while.
    fn expect_silence(&mut self) {
        self.pump_for(Duration::from_millis(50));
        while let Some(i) = self
            .received
            .iter()
            .position(|(h, _)| h.op == OP_CREDIT_UPDATE)
        {
            if let Some((h, _)) = self.received.remove(i) {
                self.last_credit = Some(h.fwd_cnt);
            }
        }
        let summary: Vec<(u16, u32, u32, usize)> = self
            .received
            .iter()
            .map(|(h, d)| (h.op, h.src_port, h.dst_port, d.len()))
            .collect();
        assert!(
            summary.is_empty(),
            "unexpected packets (op, src, dst, len): {summary:?}"
        );
    }

    /// Assert the event loop has nothing to do (no fd it watches is ready:
    /// it does not spin on a socket it cannot drain).
    fn assert_idle(&mut self) {
        self.pump();
        let n = self.em.run_with_timeout(20).unwrap();
        assert_eq!(n, 0, "the event loop is not idle");
    }

    /// Read exactly `n` bytes from a host socket, running the loop.
    fn host_read(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let end = Instant::now() + WAIT;
        while out.len() < n {
            self.pump();
            match s.read(&mut buf[..(n - out.len()).min(64 * 1024)]) {
                Ok(0) => panic!("EOF after {} of {n} bytes", out.len()),
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < end,
                        "host read timed out at {}/{n}",
                        out.len()
                    );
                    self.em.run_with_timeout(5).unwrap();
                }
                Err(e) => panic!("host read: {e}"),
            }
        }
        out
    }

    /// Whether a host socket reaches EOF (after reading what is left).
    fn host_sees_eof(&mut self, s: &mut UnixStream) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let end = Instant::now() + WAIT;
        loop {
            self.pump();
            match s.read(&mut buf) {
                Ok(0) => return out,
                Ok(k) => out.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < end, "no EOF on the host socket");
                    self.em.run_with_timeout(5).unwrap();
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("host read: {e}"),
            }
        }
    }

    /// Host connects to guest `port` and the guest accepts: the host
    /// stream (past `OK`) and the local port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port, req.type_),
            (VSOCK_HOST_CID, GUEST_CID, port, TYPE_STREAM)
        );
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let local = req.src_port;
        self.send(ghdr(OP_RESPONSE, port, local), &[]);
        let ok = format!("OK {local}\n");
        let got = self.host_read(&mut s, ok.len());
        assert_eq!(got, ok.as_bytes());
        (s, local)
    }

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

// ---------------------------------------------------------------------------

#[test]
fn new_checks_the_cid_and_refuses_an_existing_path() {
    let dir = TempDir::new_with_prefix("/tmp/ks-vsock-").unwrap();
    let p = dir.as_path().join("v.sock");
    assert!(matches!(Vsock::new(2, &p), Err(VsockError::InvalidCid(2))));
    assert!(matches!(Vsock::new(0, &p), Err(VsockError::InvalidCid(0))));
    let v = Vsock::new(3, &p).unwrap();
    let err = Vsock::new(4, &p).err().unwrap();
    assert!(matches!(err, VsockError::UdsExists(_)));
    assert!(err.to_string().contains("already exists"), "{err}");
    drop(v);
    // The device leaves its socket when dropped (the VMM thread may not
    // unlink: seccomp); keystone-vmm's --vsock check replaces a stale one.
    assert!(p.exists());
    std::fs::remove_file(&p).unwrap();
    Vsock::new(4, &p).unwrap();
}

#[test]
fn device_identity_and_config_space() {
    let dir = TempDir::new_with_prefix("/tmp/ks-vsock-").unwrap();
    assert!(matches!(
        Vsock::new(1 << 32, &dir.as_path().join("v.sock")),
        Err(VsockError::InvalidCid(_))
    ));
    let mut v = Vsock::new(0x8765_4321, &dir.as_path().join("v.sock")).unwrap();
    assert_eq!(v.device_type(), TYPE_VSOCK);
    assert_eq!(v.avail_features(), 1 << VIRTIO_F_VERSION_1);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.queue_events().len(), 3);
    let mut b = [0u8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x8765_4321);
    let mut b = [0xffu8; 4];
    v.read_config(2, &mut b);
    assert_eq!(b, [0x65, 0x87, 0, 0]);
    let mut b = [0xffu8; 4];
    v.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    v.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    v.write_config(0, &[9; 8]);
    let mut b = [0u8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x8765_4321);
    assert!(!v.is_activated());
}

#[test]
fn activate_needs_three_queues() {
    let dir = TempDir::new_with_prefix("/tmp/ks-vsock-").unwrap();
    let mut v = Vsock::new(3, &dir.as_path().join("v.sock")).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let err = v
        .activate(ActivateContext {
            mem,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            queues: vec![Queue::new(256).unwrap()],
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        crate::virtio::ActivateError::BadQueues {
            expected: 3,
            got: 1
        }
    ));
    assert!(!v.is_activated());
}

#[test]
fn host_connect_request_response_ok_and_data_both_ways() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(52);
    assert!(local >= LOCAL_PORT_BASE);
    assert!(h.irq.read().unwrap() >= 1, "the guest was interrupted");

    // Host to guest.
    s.write_all(b"hello guest").unwrap();
    let (p, data) = h.recv();
    assert_eq!(p.op, OP_RW);
    assert_eq!((p.src_port, p.dst_port), (local, 52));
    assert_eq!(data, b"hello guest");

    // Guest to host, byte-exact, across several packets.
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for chunk in payload.chunks(30_000) {
        h.send(ghdr(OP_RW, 52, local), chunk);
    }
    let got = h.host_read(&mut s, payload.len());
    assert_eq!(got, payload);

    // A big host write arrives whole and in order.
    let big: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&big).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (p, data) = h.recv();
        assert_eq!(p.op, OP_RW);
        assert!(data.len() <= RX_DATA as usize);
        got.extend(data);
    }
    assert_eq!(got, big);
    assert_eq!(h.conns(), 1);
}

#[test]
fn connect_line_followed_by_data_in_one_write_keeps_the_data() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"connect 7\nearly bytes").unwrap();
    let (req, _) = h.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 7));
    h.send(ghdr(OP_RESPONSE, 7, req.src_port), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(h.host_read(&mut s, ok.len()), ok.as_bytes());
    let (p, data) = h.recv();
    assert_eq!(p.op, OP_RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn guest_rst_to_a_request_closes_the_host_socket_without_ok() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    h.send(ghdr(OP_RST, 1234, req.src_port), &[]);
    let rest = h.host_sees_eof(&mut s);
    assert!(rest.is_empty(), "host got {rest:?}");
    assert_eq!(h.conns(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    h.pump_for(Duration::from_millis(50));
    assert_eq!(h.conns(), 1);
    // Pretend time passed (the real timer fires after 2 s).
    h.dev
        .lock()
        .unwrap()
        .sweep(Instant::now() + REQUEST_TIMEOUT);
    h.pump();
    assert!(h.host_sees_eof(&mut s).is_empty());
    let (rst, _) = h.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, req.src_port, 99)
    );
    assert_eq!(h.conns(), 0);
}

#[test]
fn unanswered_request_times_out_on_the_real_timer() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 98\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    let end = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(2);
    while h.conns() > 0 {
        assert!(Instant::now() < end, "the request never timed out");
        h.pump_for(Duration::from_millis(50));
    }
    assert!(h.host_sees_eof(&mut s).is_empty());
}

#[test]
fn malformed_connect_lines_close_the_socket() {
    let mut h = Harness::new();
    for line in [
        &b"HELLO 5\n"[..],
        b"CONNECT nope\n",
        b"CONNECT 5 6\n",
        b"CONNECT 123456789012345678901234567890\n",
    ] {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(line).unwrap();
        assert!(h.host_sees_eof(&mut s).is_empty());
    }
    // EOF before a line.
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(h.host_sees_eof(&mut s).is_empty());
    h.expect_silence();
    assert_eq!(h.conns(), 0);
}

#[test]
fn connect_line_may_arrive_in_pieces() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    h.expect_silence();
    s.write_all(b"ECT 77").unwrap();
    h.expect_silence();
    s.write_all(b"\n").unwrap();
    let (req, _) = h.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 77));
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    h.send(ghdr(OP_REQUEST, 1025, 5000), &[]);
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_RESPONSE);
    assert_eq!(
        (p.src_cid, p.dst_cid, p.src_port, p.dst_port),
        (VSOCK_HOST_CID, GUEST_CID, 5000, 1025)
    );
    let (mut s, _) = listener.accept().unwrap();
    h.send(ghdr(OP_RW, 1025, 5000), b"from the guest");
    assert_eq!(h.host_read(&mut s, 14), b"from the guest");
    s.write_all(b"from the host").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, p.dst_port), (OP_RW, 1025));
    assert_eq!(data, b"from the host");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut h = Harness::new();
    h.send(ghdr(OP_REQUEST, 1025, 6000), &[]);
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_RST);
    assert_eq!((p.src_port, p.dst_port, p.dst_cid), (6000, 1025, GUEST_CID));
    assert_eq!(h.conns(), 0);
}

#[test]
fn host_to_guest_stops_at_the_guest_credit_and_resumes_on_credit_update() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5001", h.uds.display())).unwrap();
    let mut req = ghdr(OP_REQUEST, 2000, 5001);
    req.buf_alloc = 10_000;
    h.send(req, &[]);
    assert_eq!(h.recv().0.op, OP_RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i % 241) as u8).collect();
    s.write_all(&payload).unwrap();

    let mut got = Vec::new();
    while got.len() < 10_000 {
        let (p, data) = h.recv();
        assert_eq!(p.op, OP_RW);
        got.extend(data);
    }
    assert_eq!(got.len(), 10_000, "the device sent past the guest's credit");
    h.expect_silence();
    h.assert_idle();

    // The guest consumed everything and says so.
    let mut upd = ghdr(OP_CREDIT_UPDATE, 2000, 5001);
    upd.buf_alloc = 10_000;
    upd.fwd_cnt = 10_000;
    h.send(upd, &[]);
    while got.len() < 20_000 {
        got.extend(h.recv().1);
    }
    assert_eq!(got.len(), 20_000);
    h.expect_silence();
    // A bigger buffer works as credit too.
    upd.buf_alloc = 20_000;
    h.send(upd, &[]);
    while got.len() < 30_000 {
        got.extend(h.recv().1);
    }
    assert_eq!(got, payload);
}

#[test]
fn credit_request_is_answered_and_updates_flow_as_data_is_forwarded() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(60);
    h.send(ghdr(OP_CREDIT_REQUEST, 60, local), &[]);
    let (p, _) = h.recv_any();
    assert_eq!(p.op, OP_CREDIT_UPDATE);
    assert_eq!((p.buf_alloc, p.fwd_cnt), (CONN_BUF_ALLOC, 0));

    // Send a full buffer's worth, honouring the credit, reading on the
    // host side: updates arrive and keep the guest going.
    let mut sent: u32 = 0;
    let mut peer_fwd: u32 = 0;
    let total = 3 * CONN_BUF_ALLOC;
    let mut read = 0usize;
    let chunk = vec![0x5au8; 32 * 1024];
    while sent < total {
        let credit = CONN_BUF_ALLOC - (sent - peer_fwd);
        if credit as usize >= chunk.len() {
            h.send(ghdr(OP_RW, 60, local), &chunk);
            sent += chunk.len() as u32;
        } else {
            // Drain the host side so fwd_cnt moves, then wait for news.
            let avail = sent as usize - read;
            read += h.host_read(&mut s, avail).len();
            let (p, _) = h.recv_any();
            assert_eq!(p.op, OP_CREDIT_UPDATE);
            assert!(p.fwd_cnt > peer_fwd);
            peer_fwd = p.fwd_cnt;
        }
    }
    assert_eq!(
        h.host_read(&mut s, sent as usize - read).len() + read,
        total as usize
    );
}

#[test]
fn guest_sending_past_its_credit_is_reset() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(61);
    // The host never reads; the guest ignores the credit it was given
    // (buf_alloc past the last fwd_cnt it heard of).
    let chunk = vec![1u8; 64 * 1024];
    let mut sent: u32 = 0;
    loop {
        let told = h.last_credit.unwrap_or(0);
        let over = sent + chunk.len() as u32 - told > CONN_BUF_ALLOC;
        h.send(ghdr(OP_RW, 61, local), &chunk);
        h.pump();
        if over {
            break;
        }
        sent += chunk.len() as u32;
        h.expect_silence();
        assert_eq!(h.conns(), 1, "reset within the credit");
        assert!(sent < 64 * CONN_BUF_ALLOC, "never reset");
    }
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, local, 61));
    assert_eq!(h.conns(), 0);
    let got = h.host_sees_eof(&mut s);
    assert!(got.len() <= sent as usize);
    assert!(got.iter().all(|&b| b == 1));
}

#[test]
fn malformed_packets_are_reset_or_dropped() {
    let mut h = Harness::new();
    let (_s, local) = h.host_connect(62);

    // Wrong source CID: dropped silently.
    let mut p = ghdr(OP_RW, 62, local);
    p.src_cid = 7;
    h.send(p, b"x");
    h.expect_silence();

    // Wrong destination CID: reset from that address.
    let mut p = ghdr(OP_REQUEST, 100, 200);
    p.dst_cid = 9;
    h.send(p, &[]);
    let (r, _) = h.recv();
    assert_eq!(
        (r.op, r.src_cid, r.src_port, r.dst_port),
        (OP_RST, 9, 200, 100)
    );

    // Datagram type.
    let mut p = ghdr(OP_REQUEST, 101, 200);
    p.type_ = 2;
    h.send(p, &[]);
    assert_eq!(h.recv().0.op, OP_RST);

    // Unknown op on no connection.
    h.send(ghdr(99, 102, 200), &[]);
    assert_eq!(h.recv().0.op, OP_RST);

    // Data for an unknown connection.
    h.send(ghdr(OP_RW, 103, 200), b"zz");
    let (r, _) = h.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 200, 103));

    // A reset for an unknown connection is not answered.
    h.send(ghdr(OP_RST, 104, 200), &[]);
    h.expect_silence();

    // len larger than the data descriptor.
    let mut p = ghdr(OP_RW, 105, 200);
    p.len = 1000;
    h.send_raw(p, b"short");
    assert_eq!(h.recv().0.op, OP_RST);

    // len over 64 KiB.
    let mut p = ghdr(OP_RW, 106, 200);
    p.len = 65 * 1024;
    h.send_raw(p, &vec![0u8; 65 * 1024]);
    assert_eq!(h.recv().0.op, OP_RST);

    // A header-only chain too short for a header: returned, nothing else.
    let addrs = h.tx.add_chain(&h.mem, &[(10, false)]).unwrap();
    h.mem.write_slice(&[0u8; 10], addrs[0]).unwrap();
    h.tx_kick.write(1).unwrap();
    h.pump();
    assert_eq!(h.tx.outstanding(), 0, "every TX chain comes back");
    h.expect_silence();

    // The live connection survived all that.
    assert_eq!(h.conns(), 1);

    // An unknown op on the live connection resets it.
    h.send(ghdr(42, 62, local), &[]);
    let (r, _) = h.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, local, 62));
    assert_eq!(h.conns(), 0);
}

#[test]
fn out_of_sequence_ops_reset_the_connection() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 63\n").unwrap();
    let (req, _) = h.recv();
    // Data before the RESPONSE.
    h.send(ghdr(OP_RW, 63, req.src_port), b"too early");
    assert_eq!(h.recv().0.op, OP_RST);
    assert!(h.host_sees_eof(&mut s).is_empty());

    // A second REQUEST on a live connection.
    let (_s2, local) = h.host_connect(64);
    h.send(ghdr(OP_REQUEST, 64, local), &[]);
    assert_eq!(h.recv().0.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn rx_buffers_that_run_out_are_waited_for() {
    let mut h = Harness::with_rx_target(0);
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 65\n").unwrap();
    h.expect_silence();
    h.rx_target = 1;
    h.refill_rx();
    h.rx_target = 0;
    let (req, _) = h.recv();
    assert_eq!(req.op, OP_REQUEST);
    h.send(ghdr(OP_RESPONSE, 65, req.src_port), &[]);
    let ok = format!("OK {}\n", req.src_port);
    assert_eq!(h.host_read(&mut s, ok.len()), ok.as_bytes());
    s.write_all(&[7u8; 10_000]).unwrap();
    // No buffers: nothing moves, and the loop does not spin, even once the
    // host hangs up.
    h.expect_silence();
    h.assert_idle();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    h.assert_idle();
    h.rx_target = 4;
    h.refill_rx();
    let mut got = 0;
    while got < 10_000 {
        got += h.recv().1.len();
    }
    assert_eq!(got, 10_000);
    assert_eq!(h.recv().0.op, OP_SHUTDOWN);
}

#[test]
fn many_connections_each_echo_their_own_data() {
    const N: usize = 256;
    let mut h = Harness::with_rx_target(64);
    let mut socks = Vec::new();
    for i in 0..N {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(format!("CONNECT {}\n", 10_000 + i).as_bytes())
            .unwrap();
        socks.push(s);
        if i % 32 == 31 {
            h.pump();
        }
    }
    // The guest accepts every request.
    let mut local_of = HashMap::new();
    while local_of.len() < N {
        let (req, _) = h.recv();
        assert_eq!(req.op, OP_REQUEST);
        assert!(local_of.insert(req.dst_port, req.src_port).is_none());
        h.send(ghdr(OP_RESPONSE, req.dst_port, req.src_port), &[]);
    }
    assert_eq!(h.conns(), N);
    let locals: Vec<u32> = (0..N).map(|i| local_of[&(10_000 + i as u32)]).collect();
    let mut uniq = locals.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), N, "local ports are unique");
    for (i, s) in socks.iter_mut().enumerate() {
        let ok = format!("OK {}\n", locals[i]);
        assert_eq!(h.host_read(s, ok.len()), ok.as_bytes());
        s.write_all(format!("message number {i} from the host").as_bytes())
            .unwrap();
    }
    // The guest echoes every message back, upper-cased.
    let mut echoed = 0;
    while echoed < N {
        let (p, data) = h.recv();
        assert_eq!(p.op, OP_RW);
        let i = (p.dst_port - 10_000) as usize;
        assert_eq!(data, format!("message number {i} from the host").as_bytes());
        h.send(
            ghdr(OP_RW, p.dst_port, p.src_port),
            &data.to_ascii_uppercase(),
        );
        echoed += 1;
    }
    for (i, s) in socks.iter_mut().enumerate() {
        let want = format!("MESSAGE NUMBER {i} FROM THE HOST");
        assert_eq!(h.host_read(s, want.len()), want.as_bytes());
    }
}

#[test]
fn host_close_sends_shutdown_and_guest_rst_ends_it() {
    let mut h = Harness::new();
    let (s, local) = h.host_connect(70);
    drop(s);
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_SHUTDOWN);
    assert_eq!(p.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!((p.src_port, p.dst_port), (local, 70));
    assert_eq!(h.conns(), 1);
    h.send(ghdr(OP_RST, 70, local), &[]);
    h.expect_silence();
    assert_eq!(h.conns(), 0);

    // Without the guest's RST, the connection goes after a while.
    let (s, local) = h.host_connect(71);
    drop(s);
    assert_eq!(h.recv().0.op, OP_SHUTDOWN);
    h.dev
        .lock()
        .unwrap()
        .sweep(Instant::now() + SHUTDOWN_TIMEOUT);
    h.pump();
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port), (OP_RST, local));
    assert_eq!(h.conns(), 0);
}

#[test]
fn host_half_close_still_delivers_pending_data_first() {
    let mut h = Harness::new();
    let (mut s, _local) = h.host_connect(72);
    s.write_all(b"last words").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"last words"[..]));
    assert_eq!(h.recv().0.op, OP_SHUTDOWN);
}

#[test]
fn guest_shutdown_send_half_closes_the_host_socket() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(73);
    h.send(ghdr(OP_RW, 73, local), b"bye");
    let mut sd = ghdr(OP_SHUTDOWN, 73, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    assert_eq!(h.host_sees_eof(&mut s), b"bye");
    // The other way still works.
    s.write_all(b"still here").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (OP_RW, &b"still here"[..]));
    // More data after SHUTDOWN(SEND) breaks the protocol.
    h.send(ghdr(OP_RW, 73, local), b"oops");
    assert_eq!(h.recv().0.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_full_shutdown_drains_then_resets() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(74);
    h.send(ghdr(OP_RW, 74, local), b"final");
    let mut sd = ghdr(OP_SHUTDOWN, 74, local);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(sd, &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, local, 74));
    assert_eq!(h.host_sees_eof(&mut s), b"final");
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_full_shutdown_with_a_stuck_host_waits_for_the_drain() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(75);
    // Fill the host socket so that data stays buffered in the device.
    let chunk = vec![3u8; 64 * 1024];
    for _ in 0..4 {
        h.send(ghdr(OP_RW, 75, local), &chunk);
    }
    let mut sd = ghdr(OP_SHUTDOWN, 75, local);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(sd, &[]);
    h.expect_silence();
    assert_eq!(h.conns(), 1, "the connection waits for the host to drain");
    // The RST comes once the host took everything.
    let got = h.host_sees_eof(&mut s);
    assert_eq!(got.len(), 4 * chunk.len());
    let (p, _) = h.recv();
    assert_eq!(p.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn reset_closes_every_connection() {
    let mut h = Harness::new();
    let (mut s1, _) = h.host_connect(80);
    let (mut s2, _) = h.host_connect(81);
    let mut pending = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    h.dev.lock().unwrap().reset();
    assert!(!h.dev.lock().unwrap().is_activated());
    assert!(h.host_sees_eof(&mut s1).is_empty());
    assert!(h.host_sees_eof(&mut s2).is_empty());
    assert!(h.host_sees_eof(&mut pending).is_empty());
    assert_eq!(h.conns(), 0);
    // New host connections are still accepted (and wait for a driver).
    let _s3 = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    let _ = &h.dir;
}

#[test]
fn activate_that_cannot_signal_leaves_the_device_inactive() {
    let dir = TempDir::new_with_prefix("/tmp/ks-vsock-").unwrap();
    let mut v = Vsock::new(3, &dir.as_path().join("v.sock")).unwrap();
    // An eventfd counter at its maximum refuses any further write.
    v.activation.activate_evt().write(u64::MAX - 1).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let queues = (0..NUM_QUEUES).map(|_| Queue::new(256).unwrap()).collect();
    let err = v
        .activate(ActivateContext {
            mem,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            queues,
            acked_features: 1 << VIRTIO_F_VERSION_1,
        })
        .unwrap_err();
    assert!(matches!(err, crate::virtio::ActivateError::EventFd(_)));
    assert!(!v.is_activated());
}

/// Make `n` TX chains available (resets for unknown connections: no
/// answer owed) without kicking or running the loop.
fn queue_silent_tx(h: &mut Harness, n: u16) {
    for i in 0..n {
        let addrs =
            h.tx.add_chain(&h.mem, &[(HDR_LEN as u32, false)])
                .expect("TX descriptors");
        let hdr = ghdr(OP_RST, 3000 + u32::from(i), 4000);
        h.mem.write_slice(&hdr.to_bytes(), addrs[0]).unwrap();
    }
}

fn used_count(q: &mut DriverQueue, mem: &GuestMemoryMmap) -> usize {
    let mut n = 0;
    while q.pop_used(mem).is_some() {
        n += 1;
    }
    n
}

#[test]
fn tx_work_per_event_is_capped_and_resumed_on_later_rounds() {
    let mut h = Harness::new();
    h.dev.lock().unwrap().batch = 8;
    queue_silent_tx(&mut h, 20);
    h.tx_kick.write(1).unwrap();
    // Each round of the event loop takes one batch and re-arms the TX
    // eventfd while chains are left.
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(used_count(&mut h.tx, &h.mem), 8);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1, "TX eventfd re-armed");
    assert_eq!(used_count(&mut h.tx, &h.mem), 8);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1, "TX eventfd re-armed");
    assert_eq!(used_count(&mut h.tx, &h.mem), 4);
    // Nothing left: no spurious wake-up.
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0);
    assert_eq!(h.tx.outstanding(), 0);

    // Exactly a batch: processed in one round, no re-arm.
    queue_silent_tx(&mut h, 8);
    h.tx_kick.write(1).unwrap();
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(used_count(&mut h.tx, &h.mem), 8);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn tx_cap_with_answers_delivers_everything() {
    let mut h = Harness::new();
    h.dev.lock().unwrap().batch = 4;
    // Requests to ports nobody listens on: one reset each.
    for i in 0..10u32 {
        let addrs =
            h.tx.add_chain(&h.mem, &[(HDR_LEN as u32, false)])
                .expect("TX descriptors");
        let hdr = ghdr(OP_REQUEST, 5000 + i, 6000 + i);
        h.mem.write_slice(&hdr.to_bytes(), addrs[0]).unwrap();
    }
    h.tx_kick.write(1).unwrap();
    h.pump();
    assert_eq!(h.tx.outstanding(), 0);
    let mut ports: Vec<u32> = (0..10)
        .map(|_| h.recv().0)
        .map(|p| {
            assert_eq!(p.op, OP_RST);
            p.dst_port
        })
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (5000..5010).collect::<Vec<_>>());
    h.expect_silence();
}

#[test]
fn rx_work_per_event_is_capped_and_resumed_on_later_rounds() {
    let mut h = Harness::with_rx_target(0);
    // Ten resets owed, no RX buffer to put them in.
    for i in 0..10u32 {
        h.send(ghdr(OP_RW, 7000 + i, 8000), b"x");
    }
    assert!(h.received.is_empty());
    h.dev.lock().unwrap().batch = 4;
    h.rx_target = 16;
    h.refill_rx();
    h.rx_target = 0;
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(used_count(&mut h.rx, &h.mem), 4);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1, "RX eventfd re-armed");
    assert_eq!(used_count(&mut h.rx, &h.mem), 4);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1, "RX eventfd re-armed");
    assert_eq!(used_count(&mut h.rx, &h.mem), 2);
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn host_connection_without_connect_line_times_out() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    h.pump();
    // Still waiting for its line.
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
    h.dev
        .lock()
        .unwrap()
        .sweep(Instant::now() + REQUEST_TIMEOUT);
    // The socket was watched: it is closed once the loop next runs.
    h.rx_kick.write(1).unwrap();
    assert!(h.host_sees_eof(&mut s).is_empty());
    h.expect_silence();
    assert_eq!(h.conns(), 0);
}

#[test]
fn host_connection_without_connect_line_times_out_on_the_real_timer() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.set_nonblocking(true).unwrap();
    let end = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(2);
    let mut b = [0u8; 1];
    loop {
        h.pump_for(Duration::from_millis(50));
        match s.read(&mut b) {
            Ok(0) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            Instant::now() < end,
            "the silent connection was never closed"
        );
    }
}

#[test]
fn guest_connect_to_a_full_backlog_is_reset_without_blocking() {
    let mut h = Harness::new();
    let path = format!("{}_5100", h.uds.display());
    let listener = UnixListener::bind(&path).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&listener);
    // SAFETY: `fd` is `listener`'s open, listening socket; listening again
    // only shrinks its backlog.
    let rc = unsafe { libc::listen(fd, 0) };
    assert_eq!(rc, 0);
    // Fill the backlog (never accepted).
    let mut held = Vec::new();
    while let Ok(s) = muxer::connect_nonblocking(std::path::Path::new(&path)) {
        held.push(s);
        assert!(held.len() < 64, "the backlog never filled");
    }
    let start = Instant::now();
    h.send(ghdr(OP_REQUEST, 1026, 5100), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 5100, 1026));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(h.conns(), 0);
}
