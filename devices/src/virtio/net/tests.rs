//! virtio-net tests: frames both ways through driver-side queues, hostile
//! chains, backpressure, and a real tap in a private network namespace.

use super::backend::{valid_tap_name, IfReq};
use super::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
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
fn tx_frames_to_the_hosts_loopback_are_dropped() {
    // A guest with a raw socket addressing 127.0.0.1 or ::1: passt would
    // deliver it from the host's own sockets.
    let mut h = Harness::new();
    let ip_frame = |ethertype: [u8; 2], dst: &[u8], dst_at: usize| {
        let mut f = frame(90, 4);
        f[12..14].copy_from_slice(&ethertype);
        f[14] = if ethertype == [0x08, 0x00] {
            0x45
        } else {
            0x60
        };
        f[14 + dst_at..14 + dst_at + dst.len()].copy_from_slice(dst);
        f
    };
    let lo4 = ip_frame([0x08, 0x00], &[127, 0, 0, 1], 16);
    let lo6 = ip_frame([0x86, 0xdd], &std::net::Ipv6Addr::LOCALHOST.octets(), 24);
    let out4 = ip_frame([0x08, 0x00], &[10, 0, 0, 1], 16);
    h.queue_tx(&[0; 12], &lo4, 4096);
    h.queue_tx(&[0; 12], &lo6, 4096);
    h.queue_tx(&[0; 12], &out4, 4096);
    h.net.process_tx();
    assert_eq!(h.peer_frame(), out4, "only the frame to 10.0.0.1 goes out");
    assert_eq!(peek_len(h.peer.as_raw_fd()), 0);
    for _ in 0..3 {
        assert_eq!(h.txq.pop_used(&h.mem).map(|u| u.1), Some(0));
    }
    let c = h.net.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 2));
    assert!(logged(
        &h.net.guest_errors[GuestError::TxToHostItself as usize]
    ));
}

#[test]
fn tx_frames_to_a_dns_only_gateway_go_out_for_port_53_alone() {
    // passt maps its gateway to the host's loopback (the host's resolver is
    // there): the VMM lets DNS through and nothing else.
    let mut h = Harness::new();
    let gw = [192, 0, 2, 1];
    h.net.egress = Egress::dns_only(vec![std::net::IpAddr::from(gw)]);
    let to_gw = |proto: u8, port: u16| {
        let mut f = frame(90, 4);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 6..14 + 8].fill(0);
        f[14 + 9] = proto;
        f[14 + 16..14 + 20].copy_from_slice(&gw);
        f[34 + 2..34 + 4].copy_from_slice(&port.to_be_bytes());
        f
    };
    let ssh = to_gw(6, 22);
    let dns = to_gw(17, 53);
    h.queue_tx(&[0; 12], &ssh, 4096);
    h.queue_tx(&[0; 12], &dns, 4096);
    h.net.process_tx();
    assert_eq!(h.peer_frame(), dns, "only the DNS query goes out");
    assert_eq!(peek_len(h.peer.as_raw_fd()), 0);
    let c = h.net.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (1, 1));
    assert!(logged(&h.net.guest_errors[GuestError::TxNotDns as usize]));
    assert!(!logged(
        &h.net.guest_errors[GuestError::TxToHostItself as usize]
    ));
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
fn bad_rx_chains_count_against_the_budget_while_a_frame_waits() {
    let mut h = Harness::new();
    h.net.batch = 4;
    let f = frame(50, 3);
    h.peer_send(&f);
    // Too small for any frame: each is returned empty and the frame waits.
    for _ in 0..10 {
        h.rxq.add_chain_or_panic(&h.mem, &[(20, W)]);
    }
    let rxq_evt = h.net.activation.queue_evt(RXQ).try_clone().unwrap();
    h.net.process_rx();
    assert_eq!(h.rxq.used_count(&h.mem), 4, "one wake-up, its budget");
    assert_eq!(rxq_evt.read().unwrap(), 1, "re-armed to come back");
    h.net.process_rx();
    assert_eq!(h.rxq.used_count(&h.mem), 8);
    assert_eq!(rxq_evt.read().unwrap(), 1, "re-armed again");
    h.net.process_rx();
    assert_eq!(h.rxq.used_count(&h.mem), 10);
    assert!(rxq_evt.read().is_err(), "nothing left: not re-armed");
    // The frame was kept for a usable buffer.
    let buf = h.post_rx(100);
    h.net.process_rx();
    assert_eq!(h.net.counters().rx_frames, 1);
    assert_eq!(h.read_guest(buf.unchecked_add(12), 50), f);
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
