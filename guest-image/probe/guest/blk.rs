//! The `blk` step: drives the first virtio-blk device (see `src/lib.rs` for
//! the lines it prints and what it leaves on the disk).
//!
//! One request queue of 16 descriptors, used as 5 fixed slots of three
//! (header, data, status) so that a request the device never completes only
//! costs its slot. Requests are sent one at a time and waited for by
//! interrupt (with the timer-bounded fallback of `virtio::Waiter`).

use crate::bootparams;
use crate::serial;
use crate::virtio::{self, pages, Virtq, Waiter, DESC_F_NEXT, DESC_F_WRITE};
use core::sync::atomic::{AtomicU8, Ordering};

const SECTOR_SIZE: u64 = 512;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// A type no device implements (for the `unsupported-type` request).
const T_BOGUS: u32 = 99;

/// Feature bits (low word).
const F_RO: u64 = 1 << 5;
const F_FLUSH: u32 = 1 << 9;

/// Length of the GET_ID answer (a serial, NUL-padded).
const ID_LEN: u32 = 20;
/// Status value the probe pre-fills: what a request that the device
/// returned without writing its status byte shows.
const STATUS_UNTOUCHED: u8 = 0xff;

const QUEUE_SIZE: u16 = 16;
/// Request slots: descriptors 3s, 3s+1, 3s+2.
const SLOTS: usize = 5;
/// How long one request may take (timer ticks).
const REQUEST_TICKS: u32 = 2 * virtio::TICKS_PER_SECOND;

/// Layout of the request page: slot s's 16-byte header at `HEADERS + 32 s`,
/// its status byte at `STATUS + s`; the GET_ID buffer at `ID`.
const HEADERS: u64 = 0;
const STATUS: u64 = 0x100;
const ID: u64 = 0x200;
/// Layout of the data page: the write buffer and the read buffer.
const WRITE_BUF: u64 = 0;
const READ_BUF: u64 = 0x800;

/// The marker written to the last sector at the end of the step: these 16
/// bytes, then the capacity (u64 little-endian), then byte i = 255 - (i & 0xff)
/// for i in 24..512 (`keystone_probe::blk_marker` on the host).
const MARKER_MAGIC: &[u8; 16] = b"KEYSTONE-PROBE\0\0";

const FREE: u8 = 0;
const BUSY: u8 = 1;
const DONE: u8 = 2;
/// Per slot: FREE, BUSY (with the device) or DONE (used, not yet collected).
static STATE: [AtomicU8; SLOTS] = [const { AtomicU8::new(FREE) }; SLOTS];

/// One request as the probe builds it (well- or malformed).
struct Request {
    kind: u32,
    sector: u64,
    /// Data buffer (`.dma` address) and length; no data descriptor if 0.
    data: u64,
    len: u32,
    /// Whether the data descriptor is device-writable.
    device_writes: bool,
    /// Extra flags on the header descriptor (normally none).
    header_flags: u16,
    /// Flags of the status descriptor (normally WRITE).
    status_flags: u16,
}

impl Request {
    /// Not inlined: built in place from constants, the struct would be
    /// zero-filled with `xorps`, which this host's emulator rejects.
    #[inline(never)]
    fn new(kind: u32, sector: u64, data: u64, len: u32, device_writes: bool) -> Self {
        Request {
            kind,
            sector,
            data,
            len,
            device_writes,
            header_flags: 0,
            status_flags: DESC_F_WRITE,
        }
    }
}

/// What came back: the status byte (the used length is not needed).
struct Completion {
    status: u8,
}

struct Blk {
    dev: usize,
    q: Virtq,
    requests: u64,
    data: u64,
}

impl Blk {
    /// Sends `r` in a free slot; `None` if every slot is taken.
    fn submit(&mut self, r: &Request) -> Option<usize> {
        let slot = (0..SLOTS).find(|&s| STATE[s].load(Ordering::Relaxed) == FREE)?;
        let header = self.requests + HEADERS + 32 * slot as u64;
        let status = self.requests + STATUS + slot as u64;
        virtio::wr32(header, r.kind);
        virtio::wr32(header + 4, 0);
        virtio::wr64(header + 8, r.sector);
        virtio::wr8(status, STATUS_UNTOUCHED);
        let d = 3 * slot as u16;
        if r.len > 0 {
            self.q
                .set_desc(d, header, 16, DESC_F_NEXT | r.header_flags, d + 1);
            let data_flags = if r.device_writes { DESC_F_WRITE } else { 0 };
            self.q
                .set_desc(d + 1, r.data, r.len, DESC_F_NEXT | data_flags, d + 2);
        } else {
            self.q
                .set_desc(d, header, 16, DESC_F_NEXT | r.header_flags, d + 2);
        }
        self.q.set_desc(d + 2, status, 1, r.status_flags, 0);
        STATE[slot].store(BUSY, Ordering::Relaxed);
        self.q.publish(d);
        self.q.notify();
        Some(slot)
    }

    /// Collects used elements; returns whether there were any.
    fn drain(&mut self) -> bool {
        let mut any = false;
        while let Some((id, len)) = self.q.pop_used() {
            any = true;
            let slot = id as usize / 3;
            if id % 3 == 0 && slot < SLOTS && STATE[slot].load(Ordering::Relaxed) == BUSY {
                STATE[slot].store(DONE, Ordering::Relaxed);
            } else {
                serial::lock()
                    .str("probe: blk bogus used id=")
                    .dec(u64::from(id))
                    .str(" len=")
                    .dec(u64::from(len))
                    .str("\n");
            }
        }
        any
    }

    /// Sends `r` and waits (bounded) for it. `None`: no free slot, or the
    /// device did not complete it in time (its slot stays taken).
    fn run(&mut self, r: &Request) -> Option<Completion> {
        let slot = self.submit(r)?;
        let mut waiter = Waiter::new(self.dev);
        for _ in 0..REQUEST_TICKS {
            if self.drain() {
                waiter.found();
            }
            if STATE[slot].load(Ordering::Relaxed) == DONE {
                STATE[slot].store(FREE, Ordering::Relaxed);
                return Some(Completion {
                    status: virtio::rd8(self.requests + STATUS + slot as u64),
                });
            }
            waiter.sleep();
        }
        None
    }

    /// Runs a request that should succeed; prints
    /// `probe: blk <what> sector=<n> status=<s>` (or `timeout`) if not.
    fn run_ok(&mut self, what: &str, r: &Request) -> bool {
        let done = self.run(r);
        if let Some(Completion { status: 0, .. }) = done {
            return true;
        }
        let mut w = serial::lock();
        w.str("probe: blk ").str(what).str(" sector=").dec(r.sector);
        match done {
            Some(c) => w.str(" status=").dec(u64::from(c.status)),
            None => w.str(" timeout"),
        };
        w.str("\n");
        false
    }

    fn write_buf(&self) -> u64 {
        self.data + WRITE_BUF
    }

    fn read_buf(&self) -> u64 {
        self.data + READ_BUF
    }

    /// Writes the pattern of `sector` to it.
    fn write_pattern(&mut self, sector: u64) -> bool {
        let buf = self.write_buf();
        for i in 0..SECTOR_SIZE {
            virtio::wr8(buf + i, pattern(sector, i));
        }
        let r = Request::new(T_OUT, sector, buf, SECTOR_SIZE as u32, false);
        self.run_ok("write", &r)
    }

    /// Reads `sector` and compares it with its pattern.
    fn check_pattern(&mut self, what: &str, sector: u64) -> bool {
        let buf = self.read_buf();
        let r = Request::new(T_IN, sector, buf, SECTOR_SIZE as u32, true);
        self.run_ok(what, &r)
            && (0..SECTOR_SIZE).all(|i| virtio::rd8(buf + i) == pattern(sector, i))
    }

    fn flush(&mut self, negotiated: bool) {
        if !negotiated {
            serial::lock().str("probe: blk no flush feature\n");
            return;
        }
        let r = Request::new(T_FLUSH, 0, 0, 0, false);
        self.run_ok("flush", &r);
    }
}

/// Byte `i` of the pattern the probe writes to `sector`.
fn pattern(sector: u64, i: u64) -> u8 {
    (sector.wrapping_mul(31).wrapping_add(i) & 0xff) as u8
}

/// The three sectors the pattern goes to.
fn pattern_sector(k: u64, capacity: u64) -> u64 {
    match k {
        0 => 0,
        1 => capacity / 2,
        _ => capacity - 1,
    }
}

/// Runs the `blk` step.
/// Finds the first block device and brings it up; prints why not if it
/// cannot. Returns the driver, the capacity and whether FLUSH is offered.
fn open(cmdline: &[u8]) -> Option<(Blk, u64, u64)> {
    virtio::discover(cmdline);
    let Some(dev) = virtio::find(virtio::ID_BLOCK) else {
        serial::lock().str("probe: blk no device\n");
        return None;
    };
    for slot in 0..SLOTS {
        STATE[slot].store(FREE, Ordering::Relaxed);
    }
    let offered = virtio::init(dev, "blk", F_FLUSH)?;
    let q = Virtq::setup(dev, "blk", 0, pages::BLK_QUEUE, QUEUE_SIZE)?;
    if !virtio::driver_ok(dev, "blk") {
        return None;
    }
    let blk = Blk {
        dev,
        q,
        requests: virtio::dma_page(pages::BLK_REQUESTS),
        data: virtio::dma_page(pages::BLK_DATA),
    };
    let capacity = virtio::config64(dev, 0);
    Some((blk, capacity, offered))
}

/// The `blk` step (see `src/lib.rs`).
pub fn run(cmdline: &[u8]) {
    let Some((mut blk, capacity, offered)) = open(cmdline) else {
        return;
    };
    serial::lock()
        .str("probe: blk capacity=")
        .dec(capacity)
        .str("\n");
    if offered & F_RO != 0 {
        serial::lock().str("probe: blk read-only\n");
    }
    let can_flush = offered & u64::from(F_FLUSH) != 0;
    if capacity == 0 {
        serial::lock().str("probe: blk empty disk\n");
    } else {
        exercise(&mut blk, capacity, can_flush);
    }
    serial::lock()
        .str("probe: blk irqs=")
        .dec(u64::from(virtio::irqs(blk.dev)))
        .str("\n");
    virtio::mask_interrupt(blk.dev);
}

/// Guest-physical buffer for `blkbench` transfers: plain RAM above the
/// probe's image (which ends near 0x251000); its contents do not matter.
const BENCH_BUF: u64 = 0x40_0000;
/// Largest `blkbench` request, KiB.
const BENCH_MAX_KIB: u64 = 1024;

/// The `blkbench` step: a sequential write of `probe.blkbench_mib` MiB
/// (default 16) in requests of `probe.blkbench_kib` KiB (default 128, at
/// most 1024), a FLUSH, then a sequential read of the same range, one
/// request in flight at a time. The host times the phases from these lines:
/// `probe: blkbench write start`, `probe: blkbench write done bytes=<n>`,
/// `probe: blkbench read start`, `probe: blkbench read done bytes=<n>`.
/// The guest touches no data: the VMM moves it between file and RAM.
pub fn bench(cmdline: &[u8]) {
    let Some((mut blk, capacity, offered)) = open(cmdline) else {
        return;
    };
    let param = |key: &[u8], default: u64| {
        bootparams::value(cmdline, key)
            .and_then(bootparams::parse_u64)
            .unwrap_or(default)
    };
    let mib = param(b"probe.blkbench_mib=", 16);
    let kib = param(b"probe.blkbench_kib=", 128).clamp(1, BENCH_MAX_KIB);
    let sectors_per_req = kib * 2;
    let reqs = mib * 1024 / kib;
    if reqs * sectors_per_req > capacity {
        serial::lock().str("probe: blkbench disk too small\n");
        return;
    }
    let len = (kib * 1024) as u32;
    for (kind, writes, name) in [(T_OUT, false, "write"), (T_IN, true, "read")] {
        serial::lock()
            .str("probe: blkbench ")
            .str(name)
            .str(" start\n");
        let mut done = 0;
        for i in 0..reqs {
            let r = Request::new(kind, i * sectors_per_req, BENCH_BUF, len, writes);
            if !blk.run_ok(name, &r) {
                break;
            }
            done += u64::from(len);
        }
        if kind == T_OUT {
            blk.flush(offered & u64::from(F_FLUSH) != 0);
        }
        serial::lock()
            .str("probe: blkbench ")
            .str(name)
            .str(" done bytes=")
            .dec(done)
            .str("\n");
    }
    virtio::mask_interrupt(blk.dev);
}

/// Everything after initialization, on a disk of `capacity` > 0 sectors.
fn exercise(blk: &mut Blk, capacity: u64, can_flush: bool) {
    for k in 0..3 {
        blk.write_pattern(pattern_sector(k, capacity));
    }
    blk.flush(can_flush);
    let mismatch = (0..3)
        .map(|k| pattern_sector(k, capacity))
        .find(|&sector| !blk.check_pattern("read", sector));
    match mismatch {
        None => serial::lock().str("probe: blk pattern ok\n"),
        Some(sector) => serial::lock()
            .str("probe: blk pattern MISMATCH sector=")
            .dec(sector)
            .str("\n"),
    };

    get_id(blk);
    bad_requests(blk, capacity);

    if blk.check_pattern("re-read", 0) {
        serial::lock().str("probe: blk still ok\n");
    } else {
        serial::lock().str("probe: blk still MISMATCH\n");
    }

    let last = capacity - 1;
    let buf = blk.write_buf();
    for i in 0..SECTOR_SIZE {
        virtio::wr8(buf + i, marker(capacity, i));
    }
    let r = Request::new(T_OUT, last, buf, SECTOR_SIZE as u32, false);
    if blk.run_ok("marker", &r) {
        blk.flush(can_flush);
        serial::lock()
            .str("probe: blk marker written sector=")
            .dec(last)
            .str("\n");
    }
}

/// Byte `i` of the last-sector marker.
fn marker(capacity: u64, i: u64) -> u8 {
    match i {
        0..16 => MARKER_MAGIC[i as usize],
        16..24 => (capacity >> (8 * (i - 16))) as u8,
        _ => 255 - (i & 0xff) as u8,
    }
}

/// GET_ID: prints `probe: blk id=<serial>` (bytes up to the first NUL,
/// anything unprintable as `?`).
fn get_id(blk: &mut Blk) {
    let buf = blk.requests + ID;
    virtio::fill(buf, 0, u64::from(ID_LEN));
    let r = Request::new(T_GET_ID, 0, buf, ID_LEN, true);
    if !blk.run_ok("get-id", &r) {
        return;
    }
    let mut w = serial::lock();
    w.str("probe: blk id=");
    for i in 0..u64::from(ID_LEN) {
        match virtio::rd8(buf + i) {
            0 => break,
            b @ 0x20..=0x7e => w.byte(b),
            _ => w.byte(b'?'),
        };
    }
    w.str("\n");
}

/// The malformed requests; each prints `probe: blk bad <name> status=<n>`
/// (255: the status byte came back untouched) or `... timeout`.
fn bad_requests(blk: &mut Blk, capacity: u64) {
    let buf = blk.read_buf();
    let len = SECTOR_SIZE as u32;
    for case in 0..6 {
        let mut r = Request::new(T_IN, 0, buf, len, true);
        let name = match case {
            0 => {
                r.sector = capacity;
                "read-past-end"
            }
            1 => {
                r.sector = u64::MAX;
                "overflow-sector"
            }
            2 => {
                r.header_flags = DESC_F_WRITE;
                "write-only-header"
            }
            3 => {
                r.status_flags = 0;
                "readonly-status"
            }
            4 => {
                r.kind = T_BOGUS;
                "unsupported-type"
            }
            _ => {
                r.len = 100;
                "bad-len"
            }
        };
        let done = blk.run(&r);
        let mut w = serial::lock();
        w.str("probe: blk bad ").str(name);
        match done {
            Some(c) => w.str(" status=").dec(u64::from(c.status)),
            None => w.str(" timeout"),
        };
        w.str("\n");
    }
}
