//! Minimal virtio-mmio driver support (virtio 1.x: the "version 2" register
//! layout, split virtqueues), shared by the `blk` and `vsock` steps:
//! discovering devices from the kernel command line, initializing them,
//! virtqueues in the `.dma` area, the devices' interrupts and bounded waits.
//!
//! Everything here runs on the BSP only. Interrupts are taken only inside
//! [`sleep`] (`sti; hlt; cli`), whose handler ([`on_interrupt`]) reads and
//! acknowledges InterruptStatus and counts; drivers find their work by
//! reading the used rings themselves. So a device that never interrupts
//! still makes progress: each sleep is bounded by a one-shot local APIC
//! timer tick, after which the driver polls (and reports the missing
//! interrupt once, see [`Waiter`]).

use crate::{cpu, ioapic, irq, lapic, serial};
use core::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Devices the probe keeps track of (more `virtio_mmio.device=` tokens are
/// reported and ignored); also the number of interrupt vectors reserved.
pub const MAX_DEVICES: usize = 8;
/// The command-line token the VMM adds per device, Linux style:
/// `virtio_mmio.device=<size>@<base>:<gsi>`.
const CMDLINE_KEY: &[u8] = b"virtio_mmio.device=";

/// MagicValue: "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version of the (non-legacy) virtio-mmio register layout.
const MMIO_VERSION: u32 = 2;
/// Device ids (virtio spec 5).
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_VSOCK: u32 = 19;

// Register offsets (all accesses 32-bit).
const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DESC_HIGH: u64 = 0x84;
const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DRIVER_HIGH: u64 = 0x94;
const QUEUE_DEVICE_LOW: u64 = 0xa0;
const QUEUE_DEVICE_HIGH: u64 = 0xa4;
const CONFIG_GENERATION: u64 = 0xfc;
/// Start of the device-specific configuration space.
const CONFIG: u64 = 0x100;
/// Bytes of register window the probe touches (registers + config it reads).
const WINDOW: u64 = 0x200;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 0x80;

/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of the high feature word.
const F_VERSION_1_HIGH: u32 = 1;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Largest queue the probe sets up (its rings must fit one 4 KiB page:
/// descriptors at 0, available ring right after, used ring at 0x800).
pub const MAX_QUEUE_SIZE: u16 = 64;
const USED_RING_OFFSET: u64 = 0x800;

/// One sleep tick: a one-shot local APIC timer of 10 ms (KVM's APIC timer
/// counts at 1 GHz, divide-by-1).
const TICK_COUNT: u32 = 10_000_000;
/// Ticks per second, for the bounded waits.
pub const TICKS_PER_SECOND: u32 = 100;

/// Size of a page of the `.dma` area.
pub const PAGE: u64 = 4096;
/// Pages in the `.dma` area (`DMA_SIZE` in `link.ld`).
pub const DMA_PAGES: u64 = 48;

/// How the drivers use the `.dma` area (page numbers).
pub mod pages {
    /// virtio-blk: the request queue.
    pub const BLK_QUEUE: u64 = 0;
    /// virtio-blk: request headers, status bytes, the GET_ID buffer.
    pub const BLK_REQUESTS: u64 = 1;
    /// virtio-blk: the data buffers (write at 0, read at 0x800).
    pub const BLK_DATA: u64 = 2;
    /// virtio-vsock: rx, tx and event queues.
    pub const VSOCK_RX_QUEUE: u64 = 3;
    pub const VSOCK_TX_QUEUE: u64 = 4;
    pub const VSOCK_EVENT_QUEUE: u64 = 5;
    /// virtio-vsock: packet headers (rx, tx) and event buffers.
    pub const VSOCK_HEADERS: u64 = 6;
    /// virtio-vsock: the bulk pattern (two pages).
    pub const VSOCK_PATTERN: u64 = 7;
    /// virtio-vsock: rx data buffers (one page each).
    pub const VSOCK_RX_DATA: u64 = 9;
    /// virtio-vsock: tx data buffers (one page each).
    pub const VSOCK_TX_DATA: u64 = 25;
    /// virtio-net: rx and tx queues.
    pub const NET_RX_QUEUE: u64 = 33;
    pub const NET_TX_QUEUE: u64 = 34;
    /// virtio-net: tx buffers of the `net` step (4 of 1 KiB).
    pub const NET_TX_BUFS: u64 = 35;
    /// virtio-net: the one frame `netbench` sends over and over.
    pub const NET_BENCH_FRAME: u64 = 36;
    /// virtio-net: rx buffers (two 2 KiB buffers per page, 8 pages).
    pub const NET_RX_DATA: u64 = 37;
    /// One past the last page used.
    pub const END: u64 = 45;
}

extern "C" {
    /// First byte of the `.dma` area (`link.ld`).
    static __dma_start: u8;
}

/// Address of the first byte of the `.dma` area.
fn dma_start() -> u64 {
    core::ptr::addr_of!(__dma_start) as u64
}

/// Physical (= virtual) address of page `n` of the `.dma` area.
pub fn dma_page(n: u64) -> u64 {
    assert!(n < DMA_PAGES && pages::END <= DMA_PAGES);
    dma_start() + n * PAGE
}

/// Checks that `addr..addr + len` is inside the `.dma` area: the accessors
/// below only ever touch that memory, which no Rust reference points into.
fn check_dma(addr: u64, len: u64) {
    let start = dma_start();
    assert!(addr >= start && addr + len <= start + DMA_PAGES * PAGE);
}

macro_rules! dma_accessors {
    ($($read:ident, $write:ident, $t:ty;)*) => {$(
        /// Volatile read of the `.dma` area.
        pub fn $read(addr: u64) -> $t {
            check_dma(addr, core::mem::size_of::<$t>() as u64);
            // SAFETY: inside the .dma area (checked), which is identity-mapped
            // RAM that only the drivers and devices use.
            unsafe { core::ptr::read_volatile(addr as *const $t) }
        }
        /// Volatile write of the `.dma` area.
        pub fn $write(addr: u64, value: $t) {
            check_dma(addr, core::mem::size_of::<$t>() as u64);
            // SAFETY: as for the read.
            unsafe { core::ptr::write_volatile(addr as *mut $t, value) }
        }
    )*};
}

dma_accessors! {
    rd8, wr8, u8;
    rd16, wr16, u16;
    rd32, wr32, u32;
    rd64, wr64, u64;
}

/// Fills `len` bytes of the `.dma` area with `byte` (one `rep stosb`).
pub fn fill(addr: u64, byte: u8, len: u64) {
    check_dma(addr, len);
    // Not `memset`: LLVM turns a call with a small constant length into SSE
    // stores (`xorps`), which this host's emulator rejects.
    // SAFETY: inside the .dma area (checked); DF is clear (ABI).
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rcx") len => _,
            inout("rdi") addr => _,
            in("al") byte,
            options(nostack, preserves_flags),
        )
    }
}

/// Copies `len` bytes inside the `.dma` area (one `rep movsb`); the ranges
/// must not overlap.
pub fn copy(dst: u64, src: u64, len: u64) {
    check_dma(dst, len);
    check_dma(src, len);
    assert!(dst + len <= src || src + len <= dst);
    // SAFETY: both inside the .dma area (checked), not overlapping; DF is
    // clear (ABI). Inline for the reason given in `fill`.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") len => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        )
    }
}

/// A discovered device.
struct Device {
    base: AtomicU64,
    gsi: AtomicU32,
    id: AtomicU32,
}

static DEVICES: [Device; MAX_DEVICES] = [const {
    Device {
        base: AtomicU64::new(0),
        gsi: AtomicU32::new(0),
        id: AtomicU32::new(0),
    }
}; MAX_DEVICES];
/// Number of entries of `DEVICES` in use.
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// Whether [`discover`] ran (it prints its lines once).
static DISCOVERED: AtomicBool = AtomicBool::new(false);
/// Interrupts taken per device.
static IRQS: [AtomicU32; MAX_DEVICES] = [const { AtomicU32::new(0) }; MAX_DEVICES];
/// Whether `probe: virtio <n> no interrupt` was printed for the device.
static NO_IRQ_REPORTED: [AtomicBool; MAX_DEVICES] = [const { AtomicBool::new(false) }; MAX_DEVICES];

/// Parses `<size>@<base>:<gsi>[:<id>]` (size with an optional K/M/G
/// suffix); returns (base, gsi).
fn parse_spec(spec: &[u8]) -> Option<(u64, u32)> {
    let at = spec.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&spec[..at], &spec[at + 1..]);
    let (size, shift) = match size.last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 10),
        b'm' | b'M' => (&size[..size.len() - 1], 20),
        b'g' | b'G' => (&size[..size.len() - 1], 30),
        _ => (size, 0),
    };
    let size = crate::bootparams::parse_u64(size)?.checked_shl(shift)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = crate::bootparams::parse_u64(&rest[..colon])?;
    let irq = &rest[colon + 1..];
    let irq = match irq.iter().position(|&b| b == b':') {
        Some(end) => &irq[..end],
        None => irq,
    };
    let gsi = crate::bootparams::parse_u64(irq)?;
    // The registers must lie in the identity-mapped low 4 GiB.
    if size < WINDOW || base % 4 != 0 || base.checked_add(WINDOW)? > 1 << 32 {
        return None;
    }
    Some((base, u32::try_from(gsi).ok()?))
}

/// Finds the `virtio_mmio.device=` tokens, checks each device's magic and
/// version and reads its id. Prints (the first time only)
/// `probe: virtio devices=<n>` and a line per device. Returns the count.
pub fn discover(cmdline: &[u8]) -> usize {
    if DISCOVERED.swap(true, Ordering::Relaxed) {
        return COUNT.load(Ordering::Relaxed);
    }
    let mut n = 0;
    for token in cmdline.split(|&b| b == b' ') {
        let Some(spec) = token.strip_prefix(CMDLINE_KEY) else {
            continue;
        };
        match parse_spec(spec) {
            Some(_) if n == MAX_DEVICES => {
                serial::lock()
                    .str("probe: virtio ignoring ")
                    .bytes(token)
                    .str(" (too many devices)\n");
            }
            Some((base, gsi)) => {
                DEVICES[n].base.store(base, Ordering::Relaxed);
                DEVICES[n].gsi.store(gsi, Ordering::Relaxed);
                n += 1;
            }
            None => {
                serial::lock()
                    .str("probe: virtio bad token ")
                    .bytes(token)
                    .str("\n");
            }
        }
    }
    COUNT.store(n, Ordering::Relaxed);
    serial::lock()
        .str("probe: virtio devices=")
        .dec(n as u64)
        .str("\n");
    for dev in 0..n {
        let base = DEVICES[dev].base.load(Ordering::Relaxed);
        let (magic, version) = (read(dev, MAGIC), read(dev, VERSION));
        if magic != MAGIC_VALUE || version != MMIO_VERSION {
            serial::lock()
                .str("probe: virtio ")
                .dec(dev as u64)
                .str(" bad magic=")
                .hex(u64::from(magic))
                .str(" version=")
                .dec(u64::from(version))
                .str(" base=")
                .hex(base)
                .str("\n");
            continue;
        }
        let id = read(dev, DEVICE_ID);
        DEVICES[dev].id.store(id, Ordering::Relaxed);
        serial::lock()
            .str("probe: virtio ")
            .dec(dev as u64)
            .str(" id=")
            .dec(u64::from(id))
            .str(" base=")
            .hex(base)
            .str(" irq=")
            .dec(u64::from(DEVICES[dev].gsi.load(Ordering::Relaxed)))
            .str("\n");
    }
    n
}

/// The first discovered device with virtio device id `id`.
pub fn find(id: u32) -> Option<usize> {
    (0..COUNT.load(Ordering::Relaxed)).find(|&dev| DEVICES[dev].id.load(Ordering::Relaxed) == id)
}

/// Reads register (or config word) `offset` of device `dev`.
fn read(dev: usize, offset: u64) -> u32 {
    let base = DEVICES[dev].base.load(Ordering::Relaxed);
    // SAFETY: `base` passed `parse_spec` (identity-mapped, below 4 GiB) and
    // `offset` is inside the register window; reads have device effects only.
    unsafe { cpu::mmio_read32(base + offset) }
}

/// Writes register `offset` of device `dev`.
fn write(dev: usize, offset: u64, value: u32) {
    let base = DEVICES[dev].base.load(Ordering::Relaxed);
    // SAFETY: as for `read`; the write only reaches the device model.
    unsafe { cpu::mmio_write32(base + offset, value) }
}

/// Reads the 32-bit word at `offset` of the device configuration space.
pub fn config32(dev: usize, offset: u64) -> u32 {
    read(dev, CONFIG + offset)
}

/// Reads the byte at `offset` of the device configuration space (one 8-bit
/// access: a device whose config space is shorter than 4 bytes past
/// `offset`, like virtio-net's 6-byte MAC, may reject wider reads).
pub fn config8(dev: usize, offset: u64) -> u8 {
    let base = DEVICES[dev].base.load(Ordering::Relaxed);
    // SAFETY: as for `read`: inside the register window of a device below 4 GiB.
    unsafe { cpu::mmio_read8(base + CONFIG + offset) }
}

/// Reads a 64-bit field of the configuration space as two 32-bit reads,
/// retried while ConfigGeneration changes (bounded).
pub fn config64(dev: usize, offset: u64) -> u64 {
    let mut value = 0;
    for _ in 0..10 {
        let generation = read(dev, CONFIG_GENERATION);
        let low = config32(dev, offset);
        let high = config32(dev, offset + 4);
        value = u64::from(high) << 32 | u64::from(low);
        if read(dev, CONFIG_GENERATION) == generation {
            break;
        }
    }
    value
}

/// Marks the device FAILED and prints `probe: <name> <what> status=<0x..>`.
fn fail(dev: usize, name: &str, what: &str) {
    let status = read(dev, STATUS);
    write(dev, STATUS, status | FAILED);
    serial::lock()
        .str("probe: ")
        .str(name)
        .str(" ")
        .str(what)
        .str(" status=")
        .hex(u64::from(status))
        .str("\n");
}

/// Resets the device and negotiates features: VERSION_1 (required) plus
/// the bits of `wanted_low` (features 0-31) the device offers. Leaves the
/// device in FEATURES_OK (queues next, then [`driver_ok`]). Returns the
/// features the device offered; `None` (with a line printed) on failure.
pub fn init(dev: usize, name: &str, wanted_low: u32) -> Option<u64> {
    write(dev, STATUS, 0);
    if !(0..1000).any(|_| read(dev, STATUS) == 0) {
        fail(dev, name, "reset did not complete:");
        return None;
    }
    write(dev, STATUS, ACKNOWLEDGE);
    write(dev, STATUS, ACKNOWLEDGE | DRIVER);
    write(dev, DEVICE_FEATURES_SEL, 0);
    let low = read(dev, DEVICE_FEATURES);
    write(dev, DEVICE_FEATURES_SEL, 1);
    let high = read(dev, DEVICE_FEATURES);
    let offered = u64::from(high) << 32 | u64::from(low);
    if high & F_VERSION_1_HIGH == 0 {
        serial::lock()
            .str("probe: ")
            .str(name)
            .str(" no VERSION_1 features=")
            .hex(offered)
            .str("\n");
        write(dev, STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        return None;
    }
    write(dev, DRIVER_FEATURES_SEL, 0);
    write(dev, DRIVER_FEATURES, low & wanted_low);
    write(dev, DRIVER_FEATURES_SEL, 1);
    write(dev, DRIVER_FEATURES, F_VERSION_1_HIGH);
    write(dev, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if read(dev, STATUS) & FEATURES_OK == 0 {
        fail(dev, name, "FEATURES_OK not accepted:");
        return None;
    }
    Some(offered)
}

/// Routes the device's interrupt (IOAPIC pin = its GSI, edge, to the BSP)
/// to its vector, then sets DRIVER_OK. Returns false (with a line printed)
/// if the device did not take DRIVER_OK.
pub fn driver_ok(dev: usize, name: &str) -> bool {
    irq::mask_pic();
    lapic::enable();
    lapic::timer_setup(irq::TIMER_VECTOR);
    let gsi = DEVICES[dev].gsi.load(Ordering::Relaxed);
    if gsi < u32::from(ioapic::PINS) {
        ioapic::route(
            gsi as u8,
            irq::VIRTIO_VECTOR_BASE + dev as u8,
            lapic::id() as u8,
            ioapic::FIXED_EDGE_HIGH,
        );
    } else {
        serial::lock()
            .str("probe: virtio ")
            .dec(dev as u64)
            .str(" irq ")
            .dec(u64::from(gsi))
            .str(" is not an IOAPIC pin: polling\n");
    }
    write(dev, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let status = read(dev, STATUS);
    if status & (DRIVER_OK | FAILED) != DRIVER_OK {
        fail(dev, name, "DRIVER_OK not accepted:");
        return false;
    }
    true
}

/// Masks the device's IOAPIC pin again (the device stays live).
pub fn mask_interrupt(dev: usize) {
    let gsi = DEVICES[dev].gsi.load(Ordering::Relaxed);
    if gsi < u32::from(ioapic::PINS) {
        ioapic::route(
            gsi as u8,
            irq::VIRTIO_VECTOR_BASE + dev as u8,
            0,
            ioapic::MASKED,
        );
    }
}

/// Interrupts taken for `dev` so far.
pub fn irqs(dev: usize) -> u32 {
    IRQS[dev].load(Ordering::Relaxed)
}

/// Interrupt handler for device `dev` (from `irq::irq_dispatch`, which
/// sends the EOI): counts, reads InterruptStatus and acknowledges it.
pub fn on_interrupt(dev: usize) {
    if dev >= COUNT.load(Ordering::Relaxed) {
        return;
    }
    IRQS[dev].fetch_add(1, Ordering::Relaxed);
    let status = read(dev, INTERRUPT_STATUS);
    if status != 0 {
        write(dev, INTERRUPT_ACK, status);
    }
}

/// Sleeps until the next interrupt, at most one timer tick. Returns whether
/// `dev` interrupted meanwhile.
pub fn sleep(dev: usize) -> bool {
    let before = irqs(dev);
    lapic::timer_start(TICK_COUNT);
    cpu::wait_for_interrupt();
    lapic::timer_stop();
    irqs(dev) != before
}

/// Tracks whether a device's work shows up without its interrupt: call
/// [`Waiter::sleep`] to wait and [`Waiter::found`] whenever used buffers
/// were found. If they were found after a sleep that only the timer ended
/// and the device has not interrupted since the last find (even when given
/// one more tick for a late interrupt), prints
/// `probe: virtio <dev> no interrupt` (once per device).
pub struct Waiter {
    dev: usize,
    irqs: u32,
    quiet: bool,
}

impl Waiter {
    pub fn new(dev: usize) -> Self {
        Waiter {
            dev,
            irqs: irqs(dev),
            quiet: false,
        }
    }

    /// Sleeps at most one tick. Returns whether the device interrupted
    /// (false: the tick ended it).
    pub fn sleep(&mut self) -> bool {
        let interrupted = sleep(self.dev);
        if !interrupted {
            self.quiet = true;
        }
        interrupted
    }

    /// The driver found used buffers.
    pub fn found(&mut self) {
        if self.quiet
            && irqs(self.dev) == self.irqs
            && !NO_IRQ_REPORTED[self.dev].load(Ordering::Relaxed)
        {
            sleep(self.dev);
            if irqs(self.dev) == self.irqs {
                NO_IRQ_REPORTED[self.dev].store(true, Ordering::Relaxed);
                serial::lock()
                    .str("probe: virtio ")
                    .dec(self.dev as u64)
                    .str(" no interrupt\n");
            }
        }
        self.irqs = irqs(self.dev);
        self.quiet = false;
    }
}

/// Driver side of one split virtqueue whose rings live in one `.dma` page.
pub struct Virtq {
    dev: usize,
    index: u16,
    /// Number of descriptors (a power of two).
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Shadow of avail->idx.
    next_avail: u16,
    /// Next used-ring entry to look at.
    last_used: u16,
}

impl Virtq {
    /// Sets up queue `index` of `dev` with at most `want` entries (rounded
    /// down to a power of two and to QueueNumMax), rings in `.dma` page
    /// `page`, and sets QueueReady. `None` (with a line) on failure.
    pub fn setup(dev: usize, name: &str, index: u16, page: u64, want: u16) -> Option<Virtq> {
        write(dev, QUEUE_SEL, u32::from(index));
        let max = read(dev, QUEUE_NUM_MAX);
        let ready = read(dev, QUEUE_READY);
        if max == 0 || ready != 0 {
            serial::lock()
                .str("probe: ")
                .str(name)
                .str(" queue ")
                .dec(u64::from(index))
                .str(" unusable max=")
                .dec(u64::from(max))
                .str(" ready=")
                .dec(u64::from(ready))
                .str("\n");
            return None;
        }
        let mut size = u32::from(want.min(MAX_QUEUE_SIZE)).min(max);
        while size & (size - 1) != 0 {
            size &= size - 1; // keep the highest set bit
        }
        let size = size as u16;
        let base = dma_page(page);
        let q = Virtq {
            dev,
            index,
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + USED_RING_OFFSET,
            next_avail: 0,
            last_used: 0,
        };
        // Zero exactly the rings (descriptors, avail incl. used_event,
        // used incl. avail_event): flags 0 = interrupts wanted.
        fill(q.desc, 0, 16 * u64::from(size));
        fill(q.avail, 0, 6 + 2 * u64::from(size));
        fill(q.used, 0, 6 + 8 * u64::from(size));
        write(dev, QUEUE_NUM, u32::from(size));
        write(dev, QUEUE_DESC_LOW, q.desc as u32);
        write(dev, QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        write(dev, QUEUE_DRIVER_LOW, q.avail as u32);
        write(dev, QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        write(dev, QUEUE_DEVICE_LOW, q.used as u32);
        write(dev, QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        write(dev, QUEUE_READY, 1);
        Some(q)
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i % self.size);
        wr64(d, addr);
        wr32(d + 8, len);
        wr16(d + 12, flags);
        wr16(d + 14, next);
    }

    /// Makes the chain starting at descriptor `head` available (after the
    /// descriptors and buffers were written).
    pub fn publish(&mut self, head: u16) {
        let slot = self.next_avail % self.size;
        wr16(self.avail + 4 + 2 * u64::from(slot), head);
        self.next_avail = self.next_avail.wrapping_add(1);
        // x86 keeps stores in order; the fence keeps the compiler from
        // moving buffer writes after the index update.
        compiler_fence(Ordering::Release);
        wr16(self.avail + 2, self.next_avail);
    }

    /// Tells the device to look at the queue (QueueNotify).
    pub fn notify(&self) {
        compiler_fence(Ordering::Release);
        write(self.dev, QUEUE_NOTIFY, u32::from(self.index));
    }

    /// The next used element (descriptor id, bytes written), if any.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if rd16(self.used + 2) == self.last_used {
            return None;
        }
        compiler_fence(Ordering::Acquire);
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let (id, len) = (rd32(elem), rd32(elem + 4));
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}
