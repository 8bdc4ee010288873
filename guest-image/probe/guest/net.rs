//! The `net` and `netbench` steps: a minimal virtio-net driver for the first
//! virtio-net device (see `src/lib.rs` for the tokens and the lines).
//!
//! Features: VIRTIO_NET_F_MAC only (plus VERSION_1), so every buffer starts
//! with the 12-byte `virtio_net_hdr_v1` (zeroed on tx: no checksum offload,
//! no GSO) and received frames are at most 1514 bytes (no FCS). Queues: rx
//! (0) with 16 buffers of 12 + 1526 bytes, one descriptor each; tx (1), one
//! descriptor per frame (header and frame in one buffer: VERSION_1 implies
//! any layout).
//!
//! `net` sends a DHCP DISCOVER and an ARP request from tx buffers of 1 KiB
//! (4 descriptors), parsing whatever comes back in [`Net::poll`].
//! `netbench` points every tx descriptor at one prepared 1514-byte frame and
//! keeps the ring full: no copying per frame, one QueueNotify per batch.
//!
//! State lives in statics of atomics (relaxed loads and stores are plain
//! `mov`s): zero-initializing structs on the stack makes rustc emit `xorps`,
//! which this host's emulator rejects.

use crate::bootparams;
use crate::serial;
use crate::virtio::{self, pages, Virtq, Waiter, DESC_F_WRITE};
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// VIRTIO_NET_F_MAC: the device has a MAC address (config offset 0).
const F_MAC: u32 = 1 << 5;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): 12 bytes.
const HDR_LEN: u64 = 12;
/// Largest Ethernet frame without FCS (and without VLAN tag) ...
const FRAME_MAX: u64 = 1514;
/// ... and the rx buffer size asked for: header + 1526 bytes.
const RX_BUF_LEN: u32 = 12 + 1526;
/// Distance between rx buffers in the rx pages.
const RX_STRIDE: u64 = 2048;
/// Size of each tx buffer of the `net` step.
const TX_STRIDE: u64 = 1024;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const QUEUE_SIZE: u16 = 16;
/// Tx descriptors (and 1 KiB buffers) the `net` step uses.
const CONTROL_SLOTS: u16 = 4;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
/// IEEE 802 local experimental ethertype, for `netbench` frames.
const ETHERTYPE_BENCH: u16 = 0x88b5;

const DHCP_MAGIC: u32 = 0x6382_5363;
const DHCP_DISCOVER: u8 = 1;
const DHCP_OFFER: u8 = 2;
/// Length of the BOOTP message sent (the classic 300-byte minimum).
const BOOTP_LEN: u64 = 300;

/// Bounded waits, in sleeps that only the timer ended (~10 ms each).
const SECOND: u32 = virtio::TICKS_PER_SECOND;
const EXCHANGE_TICKS: u32 = 3 * SECOND;
const STALL_TICKS: u32 = 2 * SECOND;
/// Upper bound on iterations of a bounded wait, whatever wakes it.
const MAX_ITERATIONS: u32 = 100_000;

/// Our MAC address (6 bytes, first byte in bits 47:40).
static MAC: AtomicU64 = AtomicU64::new(0);
/// Frames made available on tx / received on rx (this step).
static TX_FRAMES: AtomicU64 = AtomicU64::new(0);
static RX_FRAMES: AtomicU64 = AtomicU64::new(0);
/// Tx descriptors that are not with the device: a stack.
static TX_FREE: [AtomicU16; QUEUE_SIZE as usize] =
    [const { AtomicU16::new(0) }; QUEUE_SIZE as usize];
static TX_FREE_N: AtomicU32 = AtomicU32::new(0);
/// Bit d set: tx descriptor d is with the device.
static TX_BUSY: AtomicU32 = AtomicU32::new(0);
/// Frames the device has taken back from tx (this step).
static TX_DONE: AtomicU64 = AtomicU64::new(0);
/// Rx descriptors posted (0..RX_POSTED).
static RX_POSTED: AtomicU32 = AtomicU32::new(0);

/// DHCP: our transaction id; the offer once one came.
static XID: AtomicU32 = AtomicU32::new(0);
static OFFER: AtomicBool = AtomicBool::new(false);
static OFFER_IP: AtomicU32 = AtomicU32::new(0);
static OFFER_SERVER: AtomicU32 = AtomicU32::new(0);
static OFFER_ROUTER: AtomicU32 = AtomicU32::new(0);
/// ARP: target and sender IP of the request; the reply's MAC once it came.
static ARP_TARGET: AtomicU32 = AtomicU32::new(0);
static ARP_SENDER: AtomicU32 = AtomicU32::new(0);
static ARP_REPLY: AtomicBool = AtomicBool::new(false);
static ARP_MAC: AtomicU64 = AtomicU64::new(0);

fn get32(a: &AtomicU32) -> u32 {
    a.load(Ordering::Relaxed)
}
fn set32(a: &AtomicU32, v: u32) {
    a.store(v, Ordering::Relaxed);
}
fn get64(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}
fn set64(a: &AtomicU64, v: u64) {
    a.store(v, Ordering::Relaxed);
}
fn inc64(a: &AtomicU64) {
    set64(a, get64(a) + 1);
}
fn flag(a: &AtomicBool) -> bool {
    a.load(Ordering::Relaxed)
}
fn set_flag(a: &AtomicBool, v: bool) {
    a.store(v, Ordering::Relaxed);
}

/// Big-endian accessors of the `.dma` area.
fn be16(addr: u64) -> u16 {
    u16::from(virtio::rd8(addr)) << 8 | u16::from(virtio::rd8(addr + 1))
}
fn be32(addr: u64) -> u32 {
    u32::from(be16(addr)) << 16 | u32::from(be16(addr + 2))
}
fn put16(addr: u64, v: u16) {
    virtio::wr8(addr, (v >> 8) as u8);
    virtio::wr8(addr + 1, v as u8);
}
fn put32(addr: u64, v: u32) {
    put16(addr, (v >> 16) as u16);
    put16(addr + 2, v as u16);
}
/// Writes the 6-byte MAC `mac` (first byte in bits 47:40).
fn put_mac(addr: u64, mac: u64) {
    put16(addr, (mac >> 32) as u16);
    put32(addr + 2, mac as u32);
}
/// Reads a 6-byte MAC.
fn get_mac(addr: u64) -> u64 {
    u64::from(be16(addr)) << 32 | u64::from(be32(addr + 2))
}
fn put_bytes(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        virtio::wr8(addr + i as u64, b);
    }
}

/// Parses a dotted quad `a.b.c.d` (a in bits 31:24).
fn parse_ip(s: &[u8]) -> Option<u32> {
    let mut ip = 0u32;
    let mut parts = 0;
    for part in s.split(|&b| b == b'.') {
        if part.is_empty() || part.len() > 3 {
            return None;
        }
        let n = bootparams::parse_u64(part)?;
        if n > 255 || part[0] == b'0' && part.len() > 1 {
            return None;
        }
        ip = ip << 8 | n as u32;
        parts += 1;
    }
    (parts == 4).then_some(ip)
}

fn write_ip(w: &mut serial::Writer, ip: u32) {
    for i in 0..4 {
        if i > 0 {
            w.byte(b'.');
        }
        w.dec(u64::from((ip >> (24 - 8 * i)) as u8));
    }
}

fn write_mac(w: &mut serial::Writer, mac: u64) {
    for i in 0..6 {
        if i > 0 {
            w.byte(b':');
        }
        let b = (mac >> (40 - 8 * i)) as u8;
        for nibble in [b >> 4, b & 0xf] {
            w.byte(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            });
        }
    }
}

/// The Internet checksum of `len` (even) bytes at `addr`.
fn ip_checksum(addr: u64, len: u64) -> u16 {
    let mut sum = 0u32;
    for i in (0..len).step_by(2) {
        sum += u32::from(be16(addr + i));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

struct Net {
    dev: usize,
    rx: Virtq,
    tx: Virtq,
    waiter: Waiter,
}

/// Finds the first virtio-net device and brings it up with `rx` buffers
/// posted; prints `probe: net mac=...` (or why it cannot).
fn open(cmdline: &[u8]) -> Option<Net> {
    virtio::discover(cmdline);
    let Some(dev) = virtio::find(virtio::ID_NET) else {
        serial::lock().str("probe: net no device\n");
        return None;
    };
    let offered = virtio::init(dev, "net", F_MAC)?;
    let rx = Virtq::setup(dev, "net", RX_QUEUE, pages::NET_RX_QUEUE, QUEUE_SIZE)?;
    let tx = Virtq::setup(dev, "net", TX_QUEUE, pages::NET_TX_QUEUE, QUEUE_SIZE)?;
    let mac = if offered & u64::from(F_MAC) != 0 {
        (0..6).fold(0u64, |m, i| m << 8 | u64::from(virtio::config8(dev, i)))
    } else {
        // Locally administered, unicast.
        0x0200_0000_0001
    };
    set64(&MAC, mac);
    set64(&TX_FRAMES, 0);
    set64(&RX_FRAMES, 0);
    set64(&TX_DONE, 0);
    set32(&TX_FREE_N, 0);
    set32(&TX_BUSY, 0);
    if !virtio::driver_ok(dev, "net") {
        return None;
    }
    let mut net = Net {
        dev,
        rx,
        tx,
        waiter: Waiter::new(dev),
    };
    let mut w = serial::lock();
    w.str("probe: net mac=");
    write_mac(&mut w, mac);
    if offered & u64::from(F_MAC) == 0 {
        w.str(" (no MAC feature)");
    }
    w.str("\n");
    drop(w);
    net.post_rx();
    Some(net)
}

impl Net {
    /// Address of rx buffer `i`.
    fn rx_buf(i: u32) -> u64 {
        virtio::dma_page(pages::NET_RX_DATA) + u64::from(i) * RX_STRIDE
    }

    /// Posts one buffer per rx descriptor (at most 16).
    fn post_rx(&mut self) {
        let n = u32::from(self.rx.size.min(QUEUE_SIZE));
        for i in 0..n {
            self.rx
                .set_desc(i as u16, Self::rx_buf(i), RX_BUF_LEN, DESC_F_WRITE, 0);
            self.rx.publish(i as u16);
        }
        set32(&RX_POSTED, n);
        self.rx.notify();
    }

    /// Puts tx descriptor `d` on the free stack.
    fn free_tx(d: u16) {
        set32(&TX_BUSY, get32(&TX_BUSY) & !(1 << d));
        let n = get32(&TX_FREE_N);
        TX_FREE[n as usize].store(d, Ordering::Relaxed);
        set32(&TX_FREE_N, n + 1);
    }

    /// Takes a free tx descriptor, if any.
    fn take_tx() -> Option<u16> {
        let n = get32(&TX_FREE_N).checked_sub(1)?;
        set32(&TX_FREE_N, n);
        let d = TX_FREE[n as usize].load(Ordering::Relaxed);
        set32(&TX_BUSY, get32(&TX_BUSY) | 1 << d);
        Some(d)
    }

    /// Reclaims used tx descriptors and handles received frames (their
    /// buffers are posted again). Returns whether the device used anything.
    fn poll(&mut self) -> bool {
        let mut any = false;
        while let Some((id, _)) = self.tx.pop_used() {
            any = true;
            if id < u32::from(QUEUE_SIZE) && get32(&TX_BUSY) & 1 << id != 0 {
                Self::free_tx(id as u16);
                inc64(&TX_DONE);
            }
        }
        let mut reposted = false;
        while let Some((id, len)) = self.rx.pop_used() {
            any = true;
            if id >= get32(&RX_POSTED) {
                continue;
            }
            inc64(&RX_FRAMES);
            let len = u64::from(len);
            if len >= HDR_LEN + 14 {
                on_frame(Self::rx_buf(id) + HDR_LEN, (len - HDR_LEN).min(FRAME_MAX));
            }
            self.rx.publish(id as u16);
            reposted = true;
        }
        if reposted {
            self.rx.notify();
        }
        any
    }

    /// Polls and sleeps until `done()`, calling `send` at once and again
    /// every second, for at most `EXCHANGE_TICKS`. Returns whether `done()`.
    fn exchange(&mut self, send: fn(&mut Net) -> bool, done: fn() -> bool) -> bool {
        if !send(self) {
            return false;
        }
        let (mut quiet, mut iterations) = (0, 0);
        loop {
            if self.poll() {
                self.waiter.found();
            }
            if done() {
                return true;
            }
            if quiet >= EXCHANGE_TICKS || iterations >= MAX_ITERATIONS {
                return false;
            }
            iterations += 1;
            if !self.waiter.sleep() {
                quiet += 1;
                if quiet % SECOND == 0 && quiet < EXCHANGE_TICKS && !send(self) {
                    return false;
                }
            }
        }
    }

    /// Sends one frame of the `net` step: zeroes a free 1 KiB tx buffer,
    /// lets `build` write the frame after the header and return its length.
    /// False (with `probe: net tx queue stuck` printed) if no tx descriptor
    /// came back within `STALL_TICKS`.
    fn send(&mut self, build: impl FnOnce(u64) -> u64) -> bool {
        let mut quiet = 0;
        let d = loop {
            if self.poll() {
                self.waiter.found();
            }
            if let Some(d) = Self::take_tx() {
                break d;
            }
            if quiet >= STALL_TICKS {
                serial::lock().str("probe: net tx queue stuck\n");
                return false;
            }
            if !self.waiter.sleep() {
                quiet += 1;
            }
        };
        let buf = virtio::dma_page(pages::NET_TX_BUFS) + u64::from(d) * TX_STRIDE;
        virtio::fill(buf, 0, TX_STRIDE);
        let len = build(buf + HDR_LEN).max(60);
        self.tx.set_desc(d, buf, (HDR_LEN + len) as u32, 0, 0);
        self.tx.publish(d);
        self.tx.notify();
        inc64(&TX_FRAMES);
        true
    }

    /// Waits (bounded) until the device gave every tx descriptor back.
    fn drain_tx(&mut self, slots: u32) {
        let mut quiet = 0;
        while get32(&TX_FREE_N) < slots && quiet < STALL_TICKS {
            if self.poll() {
                self.waiter.found();
                continue;
            }
            if !self.waiter.sleep() {
                quiet += 1;
            }
        }
    }
}

/// Handles a received Ethernet frame of `len` bytes at `f`.
fn on_frame(f: u64, len: u64) {
    match be16(f + 12) {
        ETHERTYPE_ARP if len >= 42 => on_arp(f + 14),
        ETHERTYPE_IPV4 if len >= 34 => on_ipv4(f + 14, len - 14),
        _ => {}
    }
}

/// An ARP packet: records the reply from the target we asked for.
fn on_arp(a: u64) {
    if be16(a) == 1
        && be16(a + 2) == ETHERTYPE_IPV4
        && virtio::rd8(a + 4) == 6
        && virtio::rd8(a + 5) == 4
        && be16(a + 6) == 2
        && be32(a + 14) == get32(&ARP_TARGET)
        && !flag(&ARP_REPLY)
    {
        set64(&ARP_MAC, get_mac(a + 8));
        set_flag(&ARP_REPLY, true);
    }
}

/// An IPv4 packet of (at most) `len` bytes: UDP to port 68 goes to DHCP.
fn on_ipv4(ip: u64, len: u64) {
    let version_ihl = virtio::rd8(ip);
    let ihl = u64::from(version_ihl & 0xf) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || virtio::rd8(ip + 9) != 17 {
        return;
    }
    let total = u64::from(be16(ip + 2)).min(len);
    if total < ihl + 8 {
        return;
    }
    let udp = ip + ihl;
    if be16(udp + 2) != 68 {
        return;
    }
    let udp_len = u64::from(be16(udp + 4)).min(total - ihl);
    if udp_len >= 8 {
        on_dhcp(udp + 8, udp_len - 8);
    }
}

/// A BOOTP message of `len` bytes: records the first OFFER for our xid.
fn on_dhcp(b: u64, len: u64) {
    if len < 240
        || virtio::rd8(b) != 2
        || be32(b + 4) != get32(&XID)
        || be32(b + 236) != DHCP_MAGIC
        || flag(&OFFER)
    {
        return;
    }
    let (mut kind, mut server, mut router) = (0u8, be32(b + 20), 0u32);
    let mut i = 240;
    while i < len {
        let code = virtio::rd8(b + i);
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        if i + 2 > len {
            break;
        }
        let olen = u64::from(virtio::rd8(b + i + 1));
        let value = b + i + 2;
        if i + 2 + olen > len {
            break;
        }
        match code {
            53 if olen >= 1 => kind = virtio::rd8(value),
            54 if olen >= 4 => server = be32(value),
            3 if olen >= 4 => router = be32(value),
            _ => {}
        }
        i += 2 + olen;
    }
    if kind == DHCP_OFFER {
        set32(&OFFER_IP, be32(b + 16));
        set32(&OFFER_SERVER, server);
        set32(&OFFER_ROUTER, router);
        set_flag(&OFFER, true);
    }
}

/// Writes a broadcast Ethernet header from our MAC.
fn ethernet_header(f: u64, ethertype: u16) {
    put_mac(f, 0xffff_ffff_ffff);
    put_mac(f + 6, get64(&MAC));
    put16(f + 12, ethertype);
}

/// Builds the DHCP DISCOVER at `f`; returns the frame length.
fn build_discover(f: u64) -> u64 {
    ethernet_header(f, ETHERTYPE_IPV4);
    let ip = f + 14;
    let udp = ip + 20;
    let b = udp + 8;
    // IPv4: 0.0.0.0 -> 255.255.255.255, UDP, TTL 64, DF clear.
    virtio::wr8(ip, 0x45);
    put16(ip + 2, (20 + 8 + BOOTP_LEN) as u16);
    virtio::wr8(ip + 8, 64);
    virtio::wr8(ip + 9, 17);
    put32(ip + 16, 0xffff_ffff);
    put16(ip + 10, ip_checksum(ip, 20));
    // UDP 68 -> 67, checksum 0 (none).
    put16(udp, 68);
    put16(udp + 2, 67);
    put16(udp + 4, (8 + BOOTP_LEN) as u16);
    // BOOTP request from our MAC, broadcast reply wanted.
    put_bytes(b, &[1, 1, 6, 0]);
    put32(b + 4, get32(&XID));
    put16(b + 10, 0x8000);
    put_mac(b + 28, get64(&MAC));
    put32(b + 236, DHCP_MAGIC);
    put_bytes(b + 240, &[53, 1, DHCP_DISCOVER, 55, 3, 1, 3, 6, 255]);
    14 + 20 + 8 + BOOTP_LEN
}

/// Builds the ARP request at `f`; returns the frame length.
fn build_arp_request(f: u64) -> u64 {
    ethernet_header(f, ETHERTYPE_ARP);
    let a = f + 14;
    put16(a, 1);
    put16(a + 2, ETHERTYPE_IPV4);
    put_bytes(a + 4, &[6, 4]);
    put16(a + 6, 1);
    put_mac(a + 8, get64(&MAC));
    put32(a + 14, get32(&ARP_SENDER));
    put32(a + 24, get32(&ARP_TARGET));
    42
}

fn send_discover(net: &mut Net) -> bool {
    net.send(build_discover)
}

fn send_arp_request(net: &mut Net) -> bool {
    net.send(build_arp_request)
}

fn got_offer() -> bool {
    flag(&OFFER)
}

fn got_arp_reply() -> bool {
    flag(&ARP_REPLY)
}

/// `probe.<key>=a.b.c.d`: `Some(Some(ip))` if present and valid,
/// `Some(None)` (with `probe: net bad <token>` printed) if not valid.
fn ip_token(cmdline: &[u8], key: &[u8]) -> Option<Option<u32>> {
    let value = bootparams::value(cmdline, key)?;
    let ip = parse_ip(value);
    if ip.is_none() {
        serial::lock()
            .str("probe: net bad ")
            .bytes(key)
            .bytes(value)
            .str("\n");
    }
    Some(ip)
}

/// The `net` step (see `src/lib.rs`).
pub fn run(cmdline: &[u8]) {
    set_flag(&OFFER, false);
    set_flag(&ARP_REPLY, false);
    let Some(mut net) = open(cmdline) else {
        return;
    };
    for d in 0..CONTROL_SLOTS.min(net.tx.size) {
        Net::free_tx(d);
    }
    let slots = get32(&TX_FREE_N);

    // 1. DHCP.
    let dhcp = bootparams::value(cmdline, b"probe.net_dhcp=") != Some(b"0");
    let mut offered_ip = None;
    let mut router = None;
    if !dhcp {
        serial::lock().str("probe: net dhcp skipped\n");
    } else {
        let mac = get64(&MAC);
        set32(&XID, 0x4b50_0000 ^ (mac as u32 & 0xffff));
        if net.exchange(send_discover, got_offer) {
            let mut w = serial::lock();
            w.str("probe: net dhcp offer ip=");
            write_ip(&mut w, get32(&OFFER_IP));
            w.str(" server=");
            write_ip(&mut w, get32(&OFFER_SERVER));
            w.str(" router=");
            write_ip(&mut w, get32(&OFFER_ROUTER));
            w.str("\n");
            offered_ip = Some(get32(&OFFER_IP)).filter(|&ip| ip != 0);
            router = Some(get32(&OFFER_ROUTER)).filter(|&ip| ip != 0);
        } else {
            serial::lock().str("probe: net dhcp none\n");
        }
    }

    // 2. ARP.
    let target = match ip_token(cmdline, b"probe.net_arp=") {
        Some(ip) => ip,
        None => router,
    };
    let sender = match ip_token(cmdline, b"probe.net_ip=") {
        Some(ip) => ip,
        None => offered_ip,
    };
    match (target, sender) {
        (Some(target), Some(sender)) => {
            set32(&ARP_TARGET, target);
            set32(&ARP_SENDER, sender);
            if net.exchange(send_arp_request, got_arp_reply) {
                let mut w = serial::lock();
                w.str("probe: net arp reply ip=");
                write_ip(&mut w, target);
                w.str(" mac=");
                write_mac(&mut w, get64(&ARP_MAC));
                w.str("\n");
            } else {
                serial::lock().str("probe: net arp none\n");
            }
        }
        _ => {
            serial::lock().str("probe: net arp skipped\n");
        }
    }

    // 3. Counters.
    net.drain_tx(slots);
    serial::lock()
        .str("probe: net tx=")
        .dec(get64(&TX_FRAMES))
        .str(" rx=")
        .dec(get64(&RX_FRAMES))
        .str(" irqs=")
        .dec(u64::from(virtio::irqs(net.dev)))
        .str("\n");
    virtio::mask_interrupt(net.dev);
    serial::lock().str("probe: net done\n");
}

/// The `netbench` step (see `src/lib.rs`).
pub fn bench(cmdline: &[u8]) {
    let Some(mut net) = open(cmdline) else {
        return;
    };
    let frames = bootparams::value(cmdline, b"probe.netbench_frames=")
        .and_then(bootparams::parse_u64)
        .unwrap_or(10_000);
    // The frame: broadcast, from us, local experimental ethertype, then
    // payload byte i = i & 0xff.
    let buf = virtio::dma_page(pages::NET_BENCH_FRAME);
    virtio::fill(buf, 0, HDR_LEN);
    let f = buf + HDR_LEN;
    ethernet_header(f, ETHERTYPE_BENCH);
    for i in 0..FRAME_MAX - 14 {
        virtio::wr8(f + 14 + i, i as u8);
    }
    let size = net.tx.size;
    for d in 0..size {
        net.tx
            .set_desc(d, buf, (HDR_LEN + FRAME_MAX) as u32, 0, 0);
        Net::free_tx(d);
    }
    serial::lock().str("probe: netbench start\n");
    let mut sent = 0u64;
    let mut quiet = 0;
    while get64(&TX_DONE) < frames {
        let progress = net.poll();
        if progress {
            net.waiter.found();
            quiet = 0;
        }
        let mut added = false;
        while sent < frames {
            let Some(d) = Net::take_tx() else { break };
            net.tx.publish(d);
            sent += 1;
            added = true;
        }
        if added {
            set64(&TX_FRAMES, sent);
            net.tx.notify();
            continue;
        }
        if progress {
            continue;
        }
        if quiet >= STALL_TICKS {
            serial::lock()
                .str("probe: netbench stalled sent=")
                .dec(sent)
                .str(" done=")
                .dec(get64(&TX_DONE))
                .str("\n");
            break;
        }
        if !net.waiter.sleep() {
            quiet += 1;
        }
    }
    let done = get64(&TX_DONE);
    serial::lock()
        .str("probe: netbench done frames=")
        .dec(done)
        .str(" bytes=")
        .dec(done * FRAME_MAX)
        .str("\n");
    virtio::mask_interrupt(net.dev);
}
