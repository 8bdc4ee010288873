//! The `vsock` step: drives the first virtio-vsock device (stream sockets
//! only; see `src/lib.rs` for the command-line tokens and the lines).
//!
//! Queues: rx (16 buffers, each a 44-byte header descriptor chained to a
//! 4 KiB data descriptor), tx (8 slots of header + data descriptor), event
//! (4 small buffers). Everything runs from one polling loop ([`Vsock::poll`])
//! between bounded sleeps: used tx slots are reclaimed, received packets
//! handled and their buffers posted again, except data that cannot be echoed
//! yet (no tx slot or no peer credit), whose rx buffer is held until it is.
//!
//! Credit: the probe advertises `buf_alloc` 64 KiB and its `fwd_cnt` (bytes
//! consumed) in every header, sends CREDIT_UPDATE when it consumed half a
//! window without sending anything, answers CREDIT_REQUEST, and never sends
//! more than the peer's `buf_alloc - (tx_cnt - peer_fwd_cnt)`.
//!
//! State lives in statics of atomics (relaxed loads and stores are plain
//! `mov`s): zero-initializing structs on the stack makes rustc emit `xorps`,
//! which this host's emulator rejects.

use crate::bootparams;
use crate::serial;
use crate::virtio::{self, pages, Virtq, Waiter, DESC_F_NEXT, DESC_F_WRITE};
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// `struct virtio_vsock_hdr` (packed, little-endian): field offsets.
const HDR_LEN: u32 = 44;
const H_SRC_CID: u64 = 0;
const H_DST_CID: u64 = 8;
const H_SRC_PORT: u64 = 16;
const H_DST_PORT: u64 = 20;
const H_LEN: u64 = 24;
const H_TYPE: u64 = 28;
const H_OP: u64 = 30;
const H_FLAGS: u64 = 32;
const H_BUF_ALLOC: u64 = 36;
const H_FWD_CNT: u64 = 40;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will not receive / not send any more.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;
/// virtio_vsock_event id: the device reset its transport (all connections
/// are gone).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// The host's CID.
const HOST_CID: u64 = 2;
/// Receive window advertised to every peer.
const BUF_ALLOC: u32 = 64 * 1024;
/// Size of each rx and tx data buffer, and the largest packet sent.
const DATA_BUF: u32 = 4096;

const RX_QUEUE_SIZE: u16 = 32;
const TX_QUEUE_SIZE: u16 = 16;
const EVENT_QUEUE_SIZE: u16 = 4;
const MAX_RX_BUFS: usize = 16;
const MAX_TX_SLOTS: usize = 8;
/// Connections open at once (the host test opens 64).
const MAX_CONNS: usize = 80;
/// Local ports of guest-initiated connections: 49152, 49153, ...
const FIRST_LOCAL_PORT: u32 = 49152;
/// Longest echo line kept in connect mode.
const LINE_MAX: usize = 128;
/// What connect mode sends.
const GREETING: &[u8] = b"hello from guest\n";

/// Layout of the headers page: rx headers, tx headers (64-byte strides),
/// event buffers (8 bytes each).
const RX_HDRS: u64 = 0;
const TX_HDRS: u64 = 0x400;
const EVENTS: u64 = 0x800;
const HDR_STRIDE: u64 = 64;
const EVENT_STRIDE: u64 = 8;

/// Bounded waits, in sleeps that only the timer ended (~10 ms each).
const SECOND: u32 = virtio::TICKS_PER_SECOND;
const CONNECT_TICKS: u32 = 5 * SECOND;
const LINE_TICKS: u32 = 10 * SECOND;
const CLOSE_TICKS: u32 = 2 * SECOND;
const STALL_TICKS: u32 = 10 * SECOND;
const TX_SLOT_TICKS: u32 = 2 * SECOND;
/// A CREDIT_REQUEST is repeated this often while the peer's credit stays 0.
const CREDIT_RETRY_TICKS: u32 = SECOND / 10;
/// Upper bound on loop iterations of any bounded wait, whatever wakes it.
const MAX_ITERATIONS: u32 = 1_000_000;

/// A relaxed atomic used as a plain cell (all state is BSP-only).
struct V32(AtomicU32);

impl V32 {
    const fn new() -> Self {
        V32(AtomicU32::new(0))
    }
    fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, value: u32) {
        self.0.store(value, Ordering::Relaxed);
    }
    fn add(&self, n: u32) {
        self.set(self.get().wrapping_add(n));
    }
}

/// Connection states.
const FREE: u32 = 0;
/// We sent REQUEST and wait for RESPONSE.
const CONNECTING: u32 = 1;
const OPEN: u32 = 2;
/// We sent SHUTDOWN (both directions) and wait for the peer's RST.
const CLOSING: u32 = 3;

/// Connection kinds.
const OUTGOING: u32 = 0;
const ACCEPTED: u32 = 1;

struct Conn {
    state: V32,
    kind: V32,
    /// Accept order (accepted) or 0.
    number: V32,
    local_port: V32,
    peer_port: V32,
    peer_cid: AtomicU64,
    /// Bytes received, consumed (echoed or read), sent.
    rx_cnt: V32,
    fwd_cnt: V32,
    tx_cnt: V32,
    /// The peer's credit information, from its latest header.
    peer_buf_alloc: V32,
    peer_fwd_cnt: V32,
    /// `fwd_cnt` as last told to the peer.
    fwd_sent: V32,
    /// SHUTDOWN flags the peer sent.
    peer_shutdown: V32,
    /// Rx buffers held for this connection (echo not done yet).
    held: V32,
    /// Quiet ticks spent in CLOSING.
    closing_ticks: V32,
    /// Whether a CREDIT_REQUEST is outstanding.
    credit_requested: V32,
}

/// The connection table, in `.noinit`: zeroed by [`reset_conns`] when the
/// step starts rather than at boot (all-zero is every field's initial value).
#[link_section = ".noinit"]
static CONNS: [Conn; MAX_CONNS] = [const {
    Conn {
        state: V32::new(),
        kind: V32::new(),
        number: V32::new(),
        local_port: V32::new(),
        peer_port: V32::new(),
        peer_cid: AtomicU64::new(0),
        rx_cnt: V32::new(),
        fwd_cnt: V32::new(),
        tx_cnt: V32::new(),
        peer_buf_alloc: V32::new(),
        peer_fwd_cnt: V32::new(),
        fwd_sent: V32::new(),
        peer_shutdown: V32::new(),
        held: V32::new(),
        closing_ticks: V32::new(),
        credit_requested: V32::new(),
    }
}; MAX_CONNS];

/// Step-wide state.
struct Globals {
    /// Bit k: tx slot k is with the device.
    tx_busy: V32,
    /// Listen mode: the port (0: not listening), how many connections to
    /// accept, how many were accepted.
    listen_port: V32,
    accept_limit: V32,
    accepted: V32,
    /// Connections not FREE.
    live: V32,
    next_local_port: V32,
    /// Held rx buffers, oldest first, in `HELD[..held_count]`.
    held_count: V32,
    /// Connect mode: bytes of the echo line in `LINE`, and whether its
    /// `\n` came.
    line_len: V32,
    line_done: V32,
    /// Packets dropped (not for us, malformed).
    dropped: V32,
    /// Quiet ticks so far (see `Vsock::tick`).
    quiet_ticks: V32,
}

static G: Globals = Globals {
    tx_busy: V32::new(),
    listen_port: V32::new(),
    accept_limit: V32::new(),
    accepted: V32::new(),
    live: V32::new(),
    next_local_port: V32::new(),
    held_count: V32::new(),
    line_len: V32::new(),
    line_done: V32::new(),
    dropped: V32::new(),
    quiet_ticks: V32::new(),
};

/// Held rx buffer indices, oldest first.
static HELD: [AtomicU8; MAX_RX_BUFS] = [const { AtomicU8::new(0) }; MAX_RX_BUFS];
/// Per rx buffer while held: its connection, the offset of the first byte
/// not echoed yet, and the data length.
static BUF_CONN: [V32; MAX_RX_BUFS] = [const { V32::new() }; MAX_RX_BUFS];
static BUF_OFF: [V32; MAX_RX_BUFS] = [const { V32::new() }; MAX_RX_BUFS];
static BUF_LEN: [V32; MAX_RX_BUFS] = [const { V32::new() }; MAX_RX_BUFS];
/// The echo line of connect mode.
static LINE: [AtomicU8; LINE_MAX] = [const { AtomicU8::new(0) }; LINE_MAX];

/// A parsed header of a received packet.
struct Packet {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

/// The peer a packet goes to: a connection, or just the address of a
/// packet being answered.
#[derive(Clone, Copy)]
enum To {
    Conn(usize),
    Reply { cid: u64, local: u32, peer: u32 },
}

struct Vsock {
    dev: usize,
    rx: Virtq,
    tx: Virtq,
    ev: Virtq,
    cid: u64,
    rx_bufs: usize,
    tx_slots: usize,
    events: usize,
    hdrs: u64,
    waiter: Waiter,
    /// Rx buffers were posted since the last notify.
    rx_dirty: bool,
}

fn conn(c: usize) -> &'static Conn {
    &CONNS[c]
}

/// Bytes the peer of `c` can take now.
fn peer_credit(c: usize) -> u32 {
    let k = conn(c);
    let in_flight = k.tx_cnt.get().wrapping_sub(k.peer_fwd_cnt.get());
    k.peer_buf_alloc.get().saturating_sub(in_flight)
}

impl Vsock {
    fn rx_hdr(&self, k: usize) -> u64 {
        self.hdrs + RX_HDRS + HDR_STRIDE * k as u64
    }

    fn rx_data(&self, k: usize) -> u64 {
        virtio::dma_page(pages::VSOCK_RX_DATA + k as u64)
    }

    fn tx_hdr(&self, slot: usize) -> u64 {
        self.hdrs + TX_HDRS + HDR_STRIDE * slot as u64
    }

    fn tx_data(&self, slot: usize) -> u64 {
        virtio::dma_page(pages::VSOCK_TX_DATA + slot as u64)
    }

    /// Makes rx buffer `k` available again (no notify).
    fn post_rx(&mut self, k: usize) {
        let d = 2 * k as u16;
        self.rx.set_desc(
            d,
            self.rx_hdr(k),
            HDR_LEN,
            DESC_F_WRITE | DESC_F_NEXT,
            d + 1,
        );
        self.rx
            .set_desc(d + 1, self.rx_data(k), DATA_BUF, DESC_F_WRITE, 0);
        self.rx.publish(d);
        self.rx_dirty = true;
    }

    fn post_event(&mut self, k: usize) {
        let addr = self.hdrs + EVENTS + EVENT_STRIDE * k as u64;
        self.ev
            .set_desc(k as u16, addr, EVENT_STRIDE as u32, DESC_F_WRITE, 0);
        self.ev.publish(k as u16);
    }

    /// Collects used tx slots; returns whether there were any.
    fn reclaim_tx(&mut self) -> bool {
        let mut any = false;
        while let Some((id, _)) = self.tx.pop_used() {
            any = true;
            let slot = id as usize / 2;
            if id % 2 == 0 && slot < self.tx_slots {
                G.tx_busy.set(G.tx_busy.get() & !(1 << slot));
            }
        }
        any
    }

    fn free_tx_slot(&self) -> Option<usize> {
        let busy = G.tx_busy.get();
        (0..self.tx_slots).find(|&s| busy & (1 << s) == 0)
    }

    /// Sends one packet from tx slot `slot`: a header (`op`, `flags`) and,
    /// if `len` > 0, `len` bytes at `data`. For a connection, its counters
    /// go in the header and `tx_cnt` grows by `len`.
    fn send_in(&mut self, slot: usize, to: To, op: u16, flags: u32, data: u64, len: u32) {
        let h = self.tx_hdr(slot);
        let (cid, local, peer, fwd) = match to {
            To::Conn(c) => {
                let k = conn(c);
                k.tx_cnt.add(len);
                k.fwd_sent.set(k.fwd_cnt.get());
                (
                    k.peer_cid.load(Ordering::Relaxed),
                    k.local_port.get(),
                    k.peer_port.get(),
                    k.fwd_cnt.get(),
                )
            }
            To::Reply { cid, local, peer } => (cid, local, peer, 0),
        };
        virtio::wr64(h + H_SRC_CID, self.cid);
        virtio::wr64(h + H_DST_CID, cid);
        virtio::wr32(h + H_SRC_PORT, local);
        virtio::wr32(h + H_DST_PORT, peer);
        virtio::wr32(h + H_LEN, len);
        virtio::wr16(h + H_TYPE, TYPE_STREAM);
        virtio::wr16(h + H_OP, op);
        virtio::wr32(h + H_FLAGS, flags);
        virtio::wr32(h + H_BUF_ALLOC, BUF_ALLOC);
        virtio::wr32(h + H_FWD_CNT, fwd);
        let d = 2 * slot as u16;
        if len > 0 {
            self.tx.set_desc(d, h, HDR_LEN, DESC_F_NEXT, d + 1);
            self.tx.set_desc(d + 1, data, len, 0, 0);
        } else {
            self.tx.set_desc(d, h, HDR_LEN, 0, 0);
        }
        G.tx_busy.set(G.tx_busy.get() | 1 << slot);
        self.tx.publish(d);
        self.tx.notify();
    }

    /// Sends a packet without data, waiting (bounded) for a tx slot.
    fn send_control(&mut self, to: To, op: u16, flags: u32) -> bool {
        let Some(slot) = self.wait_tx_slot() else {
            return false;
        };
        self.send_in(slot, to, op, flags, 0, 0);
        true
    }

    /// A free tx slot, waiting (bounded) for the device to return one.
    fn wait_tx_slot(&mut self) -> Option<usize> {
        let mut quiet = 0;
        for _ in 0..MAX_ITERATIONS {
            if self.reclaim_tx() {
                self.waiter.found();
            }
            if let Some(slot) = self.free_tx_slot() {
                return Some(slot);
            }
            if quiet == TX_SLOT_TICKS {
                break;
            }
            if !self.waiter.sleep() {
                quiet += 1;
            }
        }
        serial::lock().str("probe: vsock tx queue stuck\n");
        None
    }

    /// Opens a connection table entry; `None` if the table is full.
    fn open(&self, kind: u32, cid: u64, local: u32, peer: u32) -> Option<usize> {
        let c = (0..MAX_CONNS).find(|&c| conn(c).state.get() == FREE)?;
        let k = conn(c);
        k.state
            .set(if kind == ACCEPTED { OPEN } else { CONNECTING });
        k.kind.set(kind);
        k.number.set(0);
        k.local_port.set(local);
        k.peer_port.set(peer);
        k.peer_cid.store(cid, Ordering::Relaxed);
        k.rx_cnt.set(0);
        k.fwd_cnt.set(0);
        k.tx_cnt.set(0);
        k.peer_buf_alloc.set(0);
        k.peer_fwd_cnt.set(0);
        k.fwd_sent.set(0);
        k.peer_shutdown.set(0);
        k.held.set(0);
        k.closing_ticks.set(0);
        k.credit_requested.set(0);
        G.live.add(1);
        Some(c)
    }

    /// Frees connection `c`; an accepted one prints its `served` line.
    fn close(&mut self, c: usize) {
        let k = conn(c);
        if k.state.get() == FREE {
            return;
        }
        // Held buffers of a closed connection are dropped (and reposted).
        let mut i = 0;
        while i < G.held_count.get() as usize {
            let b = HELD[i].load(Ordering::Relaxed) as usize;
            if BUF_CONN[b].get() as usize == c {
                self.unhold(i);
                self.post_rx(b);
            } else {
                i += 1;
            }
        }
        k.state.set(FREE);
        G.live.set(G.live.get() - 1);
        if k.kind.get() == ACCEPTED {
            serial::lock()
                .str("probe: vsock served ")
                .dec(u64::from(k.rx_cnt.get()))
                .str(" bytes on conn ")
                .dec(u64::from(k.number.get()))
                .str("\n");
        }
    }

    /// Removes entry `i` of the held list.
    fn unhold(&self, i: usize) {
        let n = G.held_count.get() as usize;
        let b = HELD[i].load(Ordering::Relaxed) as usize;
        let c = BUF_CONN[b].get() as usize;
        conn(c).held.set(conn(c).held.get() - 1);
        for j in i..n - 1 {
            HELD[j].store(HELD[j + 1].load(Ordering::Relaxed), Ordering::Relaxed);
        }
        G.held_count.set(n as u32 - 1);
    }

    fn find_conn(&self, p: &Packet) -> Option<usize> {
        (0..MAX_CONNS).find(|&c| {
            let k = conn(c);
            k.state.get() != FREE
                && k.local_port.get() == p.dst_port
                && k.peer_port.get() == p.src_port
                && k.peer_cid.load(Ordering::Relaxed) == p.src_cid
        })
    }

    /// One round of work: tx reclaim, events, received packets, held echo
    /// data, connection housekeeping. Returns whether the device had
    /// returned any buffer.
    fn poll(&mut self) -> bool {
        let mut found = self.reclaim_tx();
        while let Some((id, _)) = self.ev.pop_used() {
            found = true;
            self.on_event(id as usize);
        }
        // Keep a tx slot for each packet handled: a packet that needs an
        // answer is only taken off the used ring when it can be answered.
        while self.free_tx_slot().is_some() {
            let Some((id, _)) = self.rx.pop_used() else {
                break;
            };
            found = true;
            let k = id as usize / 2;
            if id % 2 != 0 || k >= self.rx_bufs {
                serial::lock()
                    .str("probe: vsock bogus rx id=")
                    .dec(u64::from(id))
                    .str("\n");
                continue;
            }
            if !self.on_packet(k) {
                self.post_rx(k);
            }
            self.reclaim_tx();
        }
        self.echo_held();
        self.housekeeping();
        if self.rx_dirty {
            self.rx_dirty = false;
            self.rx.notify();
        }
        found
    }

    fn on_event(&mut self, k: usize) {
        if k >= self.events {
            return;
        }
        let id = virtio::rd32(self.hdrs + EVENTS + EVENT_STRIDE * k as u64);
        serial::lock()
            .str("probe: vsock event id=")
            .dec(u64::from(id))
            .str("\n");
        if id == EVENT_TRANSPORT_RESET {
            for c in 0..MAX_CONNS {
                self.close(c);
            }
            self.cid = virtio::config64(self.dev, 0);
        }
        self.post_event(k);
        self.ev.notify();
    }

    /// Handles the packet in rx buffer `k`. Returns true if the buffer is
    /// held (echo data not sent yet), false if it can be posted again.
    fn on_packet(&mut self, k: usize) -> bool {
        let h = self.rx_hdr(k);
        let p = Packet {
            src_cid: virtio::rd64(h + H_SRC_CID),
            dst_cid: virtio::rd64(h + H_DST_CID),
            src_port: virtio::rd32(h + H_SRC_PORT),
            dst_port: virtio::rd32(h + H_DST_PORT),
            len: virtio::rd32(h + H_LEN),
            kind: virtio::rd16(h + H_TYPE),
            op: virtio::rd16(h + H_OP),
            flags: virtio::rd32(h + H_FLAGS),
            buf_alloc: virtio::rd32(h + H_BUF_ALLOC),
            fwd_cnt: virtio::rd32(h + H_FWD_CNT),
        };
        if p.dst_cid != self.cid || p.kind != TYPE_STREAM || p.len > DATA_BUF {
            G.dropped.add(1);
            return false;
        }
        let reply = To::Reply {
            cid: p.src_cid,
            local: p.dst_port,
            peer: p.src_port,
        };
        let found = self.find_conn(&p);
        if let Some(c) = found {
            conn(c).peer_buf_alloc.set(p.buf_alloc);
            conn(c).peer_fwd_cnt.set(p.fwd_cnt);
            if peer_credit(c) > 0 {
                conn(c).credit_requested.set(0);
            }
        }
        match (p.op, found) {
            (OP_RST, Some(c)) => self.close(c),
            (OP_RST, None) => {}
            (OP_REQUEST, None) => self.on_request(&p, reply),
            (OP_RESPONSE, Some(c)) if conn(c).state.get() == CONNECTING => {
                conn(c).state.set(OPEN);
            }
            (OP_RW, Some(c)) if conn(c).state.get() == OPEN => return self.on_data(c, k, p.len),
            (OP_SHUTDOWN, Some(c)) => {
                conn(c)
                    .peer_shutdown
                    .set(conn(c).peer_shutdown.get() | (p.flags & SHUTDOWN_BOTH));
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_CREDIT_REQUEST, Some(c)) => {
                self.send_control(To::Conn(c), OP_CREDIT_UPDATE, 0);
            }
            // Anything else (a duplicate REQUEST, data or a RESPONSE for no
            // or the wrong connection) is refused.
            (_, Some(c)) => {
                self.send_control(To::Conn(c), OP_RST, 0);
                self.close(c);
            }
            (_, None) => {
                self.send_control(reply, OP_RST, 0);
            }
        }
        false
    }

    /// A connection request: accepted in listen mode on the listen port
    /// (up to the accept count), refused with RST otherwise.
    fn on_request(&mut self, p: &Packet, reply: To) {
        let listening = G.listen_port.get() != 0
            && p.dst_port == G.listen_port.get()
            && G.accepted.get() < G.accept_limit.get();
        let c = if listening {
            self.open(ACCEPTED, p.src_cid, p.dst_port, p.src_port)
        } else {
            None
        };
        let Some(c) = c else {
            self.send_control(reply, OP_RST, 0);
            return;
        };
        conn(c).number.set(G.accepted.get());
        G.accepted.add(1);
        conn(c).peer_buf_alloc.set(p.buf_alloc);
        conn(c).peer_fwd_cnt.set(p.fwd_cnt);
        self.send_control(To::Conn(c), OP_RESPONSE, 0);
    }

    /// Data for open connection `c` in rx buffer `k`. Accepted connections
    /// echo it (holding the buffer if that cannot be done at once),
    /// outgoing ones collect the echo line (connect mode) or drop it.
    fn on_data(&mut self, c: usize, k: usize, len: u32) -> bool {
        let kc = conn(c);
        kc.rx_cnt.add(len);
        if kc.kind.get() == ACCEPTED {
            BUF_CONN[k].set(c as u32);
            BUF_OFF[k].set(0);
            BUF_LEN[k].set(len);
            if kc.held.get() == 0 && self.echo(k) {
                return false;
            }
            let n = G.held_count.get();
            HELD[n as usize].store(k as u8, Ordering::Relaxed);
            G.held_count.set(n + 1);
            kc.held.add(1);
            return true;
        }
        let data = self.rx_data(k);
        for i in 0..u64::from(len) {
            let n = G.line_len.get() as usize;
            if G.line_done.get() != 0 {
                break;
            }
            let byte = virtio::rd8(data + i);
            if byte == b'\n' {
                G.line_done.set(1);
            } else if n < LINE_MAX {
                LINE[n].store(byte, Ordering::Relaxed);
                G.line_len.set(n as u32 + 1);
            }
        }
        kc.fwd_cnt.add(len);
        false
    }

    /// Echoes as much of held rx buffer `k` as tx slots and credit allow.
    /// Returns whether all of it went out.
    fn echo(&mut self, k: usize) -> bool {
        let c = BUF_CONN[k].get() as usize;
        loop {
            let off = BUF_OFF[k].get();
            let left = BUF_LEN[k].get() - off;
            if left == 0 {
                return true;
            }
            let n = left.min(peer_credit(c));
            if n == 0 {
                if conn(c).credit_requested.get() == 0 && self.free_tx_slot().is_some() {
                    conn(c).credit_requested.set(1);
                    self.send_control(To::Conn(c), OP_CREDIT_REQUEST, 0);
                }
                return false;
            }
            self.reclaim_tx();
            let Some(slot) = self.free_tx_slot() else {
                return false;
            };
            let buf = self.tx_data(slot);
            virtio::copy(buf, self.rx_data(k) + u64::from(off), u64::from(n));
            conn(c).fwd_cnt.add(n);
            self.send_in(slot, To::Conn(c), OP_RW, 0, buf, n);
            BUF_OFF[k].set(off + n);
        }
    }

    /// Works through the held buffers, oldest first per connection.
    fn echo_held(&mut self) {
        // Connections whose oldest held buffer is stuck (bit c % 128 is
        // enough: a false "stuck" only delays to the next round).
        let mut stuck: u128 = 0;
        let mut i = 0;
        while i < G.held_count.get() as usize {
            let k = HELD[i].load(Ordering::Relaxed) as usize;
            let c = BUF_CONN[k].get() as usize;
            if stuck & 1 << (c % 128) == 0 && self.echo(k) {
                self.unhold(i);
                self.post_rx(k);
            } else {
                stuck |= 1 << (c % 128);
                i += 1;
            }
        }
    }

    /// Connection housekeeping after a round: closes connections the peer
    /// shut down (once their echo data is out), times out CLOSING ones, and
    /// sends CREDIT_UPDATE where half a window was consumed silently.
    fn housekeeping(&mut self) {
        for c in 0..MAX_CONNS {
            let k = conn(c);
            let state = k.state.get();
            if state == FREE {
                continue;
            }
            let shut = k.peer_shutdown.get();
            if state == OPEN && k.held.get() == 0 {
                if shut == SHUTDOWN_BOTH {
                    // The peer is gone entirely: reset, as Linux does.
                    self.send_control(To::Conn(c), OP_RST, 0);
                    self.close(c);
                    continue;
                }
                if shut & SHUTDOWN_SEND != 0 && k.kind.get() == ACCEPTED {
                    // Nothing more will come: echo done, close our side.
                    self.send_control(To::Conn(c), OP_SHUTDOWN, SHUTDOWN_BOTH);
                    k.state.set(CLOSING);
                    continue;
                }
            }
            if state == OPEN && k.fwd_cnt.get().wrapping_sub(k.fwd_sent.get()) >= BUF_ALLOC / 2 {
                self.send_control(To::Conn(c), OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// A quiet tick (one that only the timer ended): counts it for every
    /// CLOSING connection and resets the ones whose peer did not answer in
    /// time; every `CREDIT_RETRY_TICKS` allows another CREDIT_REQUEST where
    /// the peer's credit is still 0.
    fn tick(&mut self) {
        G.quiet_ticks.add(1);
        let retry_credit = G.quiet_ticks.get() % CREDIT_RETRY_TICKS == 0;
        for c in 0..MAX_CONNS {
            let k = conn(c);
            if retry_credit {
                k.credit_requested.set(0);
            }
            if k.state.get() == CLOSING {
                k.closing_ticks.add(1);
                if k.closing_ticks.get() >= CLOSE_TICKS {
                    self.send_control(To::Conn(c), OP_RST, 0);
                    self.close(c);
                }
            }
        }
    }

    /// Polls and sleeps until `done()` or `ticks` quiet ticks passed (0:
    /// no limit). Returns whether `done()` became true.
    fn wait_until(&mut self, ticks: u32, mut done: impl FnMut(&Self) -> bool) -> bool {
        let mut quiet = 0;
        let mut iterations = 0u32;
        loop {
            if self.poll() {
                self.waiter.found();
            }
            if done(self) {
                return true;
            }
            if ticks != 0 && (quiet >= ticks || iterations >= MAX_ITERATIONS) {
                return false;
            }
            iterations += 1;
            if !self.waiter.sleep() {
                quiet += 1;
                self.tick();
            }
        }
    }

    /// Connects to the host's `port`. Returns the connection, or `None`
    /// (with `probe: vsock connect refused` or `... timeout` printed).
    fn connect(&mut self, port: u32) -> Option<usize> {
        let local = G.next_local_port.get();
        G.next_local_port.add(1);
        let Some(c) = self.open(OUTGOING, HOST_CID, local, port) else {
            serial::lock().str("probe: vsock connection table full\n");
            return None;
        };
        if !self.send_control(To::Conn(c), OP_REQUEST, 0) {
            self.close(c);
            return None;
        }
        let answered = self.wait_until(CONNECT_TICKS, |_| conn(c).state.get() != CONNECTING);
        if conn(c).state.get() == OPEN {
            return Some(c);
        }
        if answered {
            serial::lock().str("probe: vsock connect refused\n");
        } else {
            serial::lock().str("probe: vsock connect timeout\n");
            self.send_control(To::Conn(c), OP_RST, 0);
            self.close(c);
        }
        None
    }

    /// Sends SHUTDOWN (both directions) and waits (bounded) for the RST;
    /// resets the connection itself if none comes.
    fn shutdown(&mut self, c: usize) {
        if conn(c).state.get() == FREE {
            return;
        }
        if conn(c).peer_shutdown.get() == SHUTDOWN_BOTH {
            self.send_control(To::Conn(c), OP_RST, 0);
            self.close(c);
            return;
        }
        self.send_control(To::Conn(c), OP_SHUTDOWN, SHUTDOWN_BOTH);
        conn(c).state.set(CLOSING);
        // `tick` resets it after CLOSE_TICKS.
        self.wait_until(2 * CLOSE_TICKS, |_| conn(c).state.get() == FREE);
        self.close(c);
    }

    /// `probe.vsock_connect=<port>`: send the greeting, read one line back.
    fn run_connect(&mut self, port: u32) {
        let Some(c) = self.connect(port) else {
            return;
        };
        G.line_len.set(0);
        G.line_done.set(0);
        let len = GREETING.len() as u32;
        let credit = self.wait_until(LINE_TICKS, |_| {
            conn(c).state.get() != OPEN || peer_credit(c) >= len
        });
        if credit && conn(c).state.get() == OPEN {
            if let Some(slot) = self.wait_tx_slot() {
                let buf = self.tx_data(slot);
                for (i, &b) in GREETING.iter().enumerate() {
                    virtio::wr8(buf + i as u64, b);
                }
                self.send_in(slot, To::Conn(c), OP_RW, 0, buf, len);
            }
            self.wait_until(LINE_TICKS, |_| {
                G.line_done.get() != 0 || conn(c).state.get() != OPEN
            });
        }
        let mut w = serial::lock();
        w.str("probe: vsock echo: ");
        for byte in &LINE[..G.line_len.get() as usize] {
            w.byte(byte.load(Ordering::Relaxed));
        }
        if G.line_done.get() == 0 {
            w.str(" (incomplete)");
        }
        w.str("\n");
        drop(w);
        self.shutdown(c);
    }

    /// `probe.vsock_bulk=<port>:<kib>`: send `kib` KiB of the pattern
    /// (byte i = i & 0xff) within the peer's credit.
    fn run_bulk(&mut self, port: u32, kib: u32) {
        // The pattern: two pages of byte j = j & 0xff, so any 4 KiB chunk
        // starting at stream offset s is at pattern + (s & 0xff).
        let pattern = virtio::dma_page(pages::VSOCK_PATTERN);
        for j in 0..256 {
            virtio::wr8(pattern + j, j as u8);
        }
        let mut have = 256;
        while have < 2 * virtio::PAGE {
            virtio::copy(pattern + have, pattern, have);
            have *= 2;
        }
        let Some(c) = self.connect(port) else {
            return;
        };
        let total = u64::from(kib) * 1024;
        let mut sent: u64 = 0;
        let mut quiet = 0;
        while sent < total && conn(c).state.get() == OPEN {
            let mut progress = false;
            loop {
                self.reclaim_tx();
                let credit = peer_credit(c);
                let left = total - sent;
                let n = left.min(u64::from(credit)).min(u64::from(DATA_BUF)) as u32;
                if n == 0 {
                    if credit == 0 && conn(c).credit_requested.get() == 0 {
                        conn(c).credit_requested.set(1);
                        self.send_control(To::Conn(c), OP_CREDIT_REQUEST, 0);
                    }
                    break;
                }
                let Some(slot) = self.free_tx_slot() else {
                    break;
                };
                self.send_in(slot, To::Conn(c), OP_RW, 0, pattern + (sent & 0xff), n);
                sent += u64::from(n);
                progress = true;
            }
            if self.poll() {
                self.waiter.found();
                progress = true;
            }
            if progress {
                quiet = 0;
                continue;
            }
            if !self.waiter.sleep() {
                quiet += 1;
                self.tick();
                if quiet >= STALL_TICKS {
                    break;
                }
            }
        }
        // Wait for the device to take everything.
        self.wait_until(STALL_TICKS, |_| G.tx_busy.get() == 0);
        if sent == total {
            serial::lock()
                .str("probe: vsock bulk sent ")
                .dec(sent)
                .str("\n");
        } else {
            serial::lock()
                .str("probe: vsock bulk stalled sent=")
                .dec(sent)
                .str(" credit=")
                .dec(u64::from(peer_credit(c)))
                .str("\n");
        }
        self.shutdown(c);
    }

    /// `probe.vsock_listen=<port>`: accept and echo `limit` connections.
    /// Waits for them without a time limit.
    fn run_listen(&mut self, port: u32, limit: u32) {
        G.listen_port.set(port);
        G.accept_limit.set(limit);
        G.accepted.set(0);
        serial::lock()
            .str("probe: vsock listening port=")
            .dec(u64::from(port))
            .str(" accept=")
            .dec(u64::from(limit))
            .str("\n");
        self.wait_until(0, |_| {
            G.accepted.get() >= G.accept_limit.get() && G.live.get() == 0
        });
        G.listen_port.set(0);
    }
}

/// Host port of the readiness connection (`keystone agent`'s READY_PORT).
const READY_PORT: u32 = 1024;
/// What the `ready` step sends: the readiness line of protocol version 1,
/// no host keys, the end line.
const READY_MESSAGE: &[u8] = b"keystone-ready 1\nend\n";
/// Connection attempts of the `ready` step, one second apart.
const READY_ATTEMPTS: u32 = 5;

impl Vsock {
    /// Connects to the host's [`READY_PORT`], sends [`READY_MESSAGE`] and
    /// closes. Returns whether the whole message went out.
    fn send_ready(&mut self) -> bool {
        let Some(c) = self.connect(READY_PORT) else {
            return false;
        };
        let len = READY_MESSAGE.len() as u32;
        let credit = self.wait_until(LINE_TICKS, |_| {
            conn(c).state.get() != OPEN || peer_credit(c) >= len
        });
        let mut sent = false;
        if credit && conn(c).state.get() == OPEN {
            if let Some(slot) = self.wait_tx_slot() {
                let buf = self.tx_data(slot);
                for (i, &b) in READY_MESSAGE.iter().enumerate() {
                    virtio::wr8(buf + i as u64, b);
                }
                self.send_in(slot, To::Conn(c), OP_RW, 0, buf, len);
                // Wait for the device to take it before shutting down.
                self.wait_until(LINE_TICKS, |_| G.tx_busy.get() == 0);
                sent = true;
            }
        }
        self.shutdown(c);
        sent
    }

    /// Serves the device forever: answers whatever arrives (requests to
    /// ports nobody listens on get RST, transport resets are handled).
    /// With no connection open it sleeps until the device interrupts (no
    /// timer: an idle guest costs the host nothing); otherwise it polls
    /// between timer ticks so closing connections still time out.
    fn idle_forever(&mut self) -> ! {
        loop {
            if self.poll() {
                self.waiter.found();
                continue;
            }
            if G.live.get() == 0 {
                crate::cpu::wait_for_interrupt();
            } else if !self.waiter.sleep() {
                self.tick();
            }
        }
    }
}

/// Runs the `ready` step: tells the host the guest is up (see `src/lib.rs`),
/// then serves vsock until the VMM is stopped. Returns only if there is no
/// usable vsock device.
pub fn ready(cmdline: &[u8]) {
    let Some(mut v) = open_device(cmdline) else {
        return;
    };
    let mut attempt = 1;
    loop {
        if v.send_ready() {
            serial::lock().str("probe: ready sent\n");
            break;
        }
        if attempt == READY_ATTEMPTS {
            serial::lock().str("probe: ready failed\n");
            break;
        }
        attempt += 1;
        v.wait_until(SECOND, |_| false);
    }
    serial::lock().str("probe: ready idle\n");
    v.idle_forever()
}

/// A number-valued command-line token, or `None` (with a line) if it is
/// there but not a number.
fn token_u32(cmdline: &[u8], key: &str) -> Option<u32> {
    let value = bootparams::value(cmdline, key.as_bytes())?;
    let n = bootparams::parse_u64(value).and_then(|n| u32::try_from(n).ok());
    if n.is_none() {
        serial::lock()
            .str("probe: vsock bad ")
            .str(key)
            .bytes(value)
            .str("\n");
    }
    n
}

/// Zeroes the connection table (see [`CONNS`]).
fn reset_conns() {
    let addr = CONNS.as_ptr() as u64;
    let qwords = (core::mem::size_of_val(&CONNS) / 8) as u64;
    // SAFETY: writes exactly the bytes of CONNS (its size is a multiple of
    // 8: every field is a 4- or 8-byte atomic), before the step touches any
    // connection and with no other CPU running probe code that uses it;
    // zero is a valid value for every field. DF is clear (ABI).
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") qwords => _,
            inout("rdi") addr => _,
            in("rax") 0u64,
            options(nostack, preserves_flags),
        )
    }
}

/// Finds, initializes and starts the first virtio-vsock device: queues
/// set up, rx and event buffers posted, `probe: vsock cid=<cid>` printed.
/// `None` (with the failure line printed) if that did not work.
fn open_device(cmdline: &[u8]) -> Option<Vsock> {
    reset_conns();
    virtio::discover(cmdline);
    let Some(dev) = virtio::find(virtio::ID_VSOCK) else {
        serial::lock().str("probe: vsock no device\n");
        return None;
    };
    virtio::init(dev, "vsock", 0)?;
    let rx = Virtq::setup(dev, "vsock", 0, pages::VSOCK_RX_QUEUE, RX_QUEUE_SIZE)?;
    let tx = Virtq::setup(dev, "vsock", 1, pages::VSOCK_TX_QUEUE, TX_QUEUE_SIZE)?;
    let ev = Virtq::setup(dev, "vsock", 2, pages::VSOCK_EVENT_QUEUE, EVENT_QUEUE_SIZE)?;
    if !virtio::driver_ok(dev, "vsock") {
        return None;
    }
    let mut v = Vsock {
        dev,
        cid: virtio::config64(dev, 0),
        rx_bufs: usize::from(rx.size / 2).min(MAX_RX_BUFS),
        tx_slots: usize::from(tx.size / 2).min(MAX_TX_SLOTS),
        events: usize::from(ev.size),
        rx,
        tx,
        ev,
        hdrs: virtio::dma_page(pages::VSOCK_HEADERS),
        waiter: Waiter::new(dev),
        rx_dirty: false,
    };
    reset_state();
    for k in 0..v.rx_bufs {
        v.post_rx(k);
    }
    v.rx_dirty = false;
    v.rx.notify();
    for k in 0..v.events {
        v.post_event(k);
    }
    v.ev.notify();
    serial::lock().str("probe: vsock cid=").dec(v.cid).str("\n");
    Some(v)
}

/// Runs the `vsock` step.
pub fn run(cmdline: &[u8]) {
    let Some(mut v) = open_device(cmdline) else {
        return;
    };
    let dev = v.dev;

    if let Some(port) = token_u32(cmdline, "probe.vsock_connect=") {
        v.run_connect(port);
    }
    if let Some(spec) = bootparams::value(cmdline, b"probe.vsock_bulk=") {
        let colon = spec.iter().position(|&b| b == b':').unwrap_or(spec.len());
        let port = bootparams::parse_u64(&spec[..colon]).and_then(|n| u32::try_from(n).ok());
        let kib = match spec.get(colon + 1..) {
            Some(kib) => bootparams::parse_u64(kib).and_then(|n| u32::try_from(n).ok()),
            None => Some(1024),
        };
        match (port, kib) {
            (Some(port), Some(kib)) if kib <= 4 * 1024 * 1024 => v.run_bulk(port, kib),
            _ => {
                serial::lock()
                    .str("probe: vsock bad probe.vsock_bulk=")
                    .bytes(spec)
                    .str("\n");
            }
        }
    }
    if let Some(port) = token_u32(cmdline, "probe.vsock_listen=") {
        let limit = token_u32(cmdline, "probe.vsock_accept=").unwrap_or(1);
        v.run_listen(port, limit);
    }

    serial::lock()
        .str("probe: vsock irqs=")
        .dec(u64::from(virtio::irqs(dev)))
        .str("\n");
    if G.dropped.get() != 0 {
        serial::lock()
            .str("probe: vsock dropped ")
            .dec(u64::from(G.dropped.get()))
            .str(" packets\n");
    }
    serial::lock().str("probe: vsock done\n");
    virtio::mask_interrupt(dev);
}

/// Clears the step-wide state (the step may run more than once).
fn reset_state() {
    for k in CONNS.iter() {
        k.state.set(FREE);
    }
    G.tx_busy.set(0);
    G.listen_port.set(0);
    G.accept_limit.set(0);
    G.accepted.set(0);
    G.live.set(0);
    G.held_count.set(0);
    G.line_len.set(0);
    G.line_done.set(0);
    G.dropped.set(0);
    G.next_local_port.set(FIRST_LOCAL_PORT);
}
