//! Shared pieces of Keystone's fuzz targets: a small guest memory built from
//! the fuzz input, a driver-side split virtqueue that lays descriptor
//! chains into it, and an event loop to run devices through.
//!
//! Guest memory layout ([`MEM_SIZE`] bytes):
//!
//! | range | content |
//! |---|---|
//! | `q × 0x1000` for queue `q < 3` | descriptor table (+0), avail ring (+0x400), used ring (+0x800) |
//! | [`SCRATCH_BASE`].. | structured buffers a target writes (request headers, packets) |
//! | [`DATA_BASE`].. | the raw bytes at the end of the input, then zeros |

use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use event_manager::{EventManager, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM size.
pub const MEM_SIZE: u64 = 0x1_0000;
/// Structured buffers (a bump allocator that wraps).
pub const SCRATCH_BASE: u64 = 0x3000;
/// Raw data area.
pub const DATA_BASE: u64 = 0x8000;
/// Size of the raw data area.
pub const DATA_LEN: u64 = MEM_SIZE - DATA_BASE;
/// Largest queue the fuzzer sets up (fits the 0x400 bytes of a descriptor
/// table).
pub const MAX_QUEUE_SIZE: u16 = 64;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory at 0, the data area holding `data` (truncated).
pub fn guest_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let n = data.len().min(DATA_LEN as usize);
    mem.write_slice(&data[..n], GuestAddress(DATA_BASE))
        .unwrap();
    mem
}

/// One descriptor as the fuzz input describes it.
#[derive(Arbitrary, Debug, Clone)]
pub enum DescSpec {
    /// A buffer in the data area (`off` wraps inside it; `len` may run past
    /// the end of guest memory). Chained to the next spec of its chain.
    Buf {
        /// Offset in the data area.
        off: u16,
        /// Length.
        len: u16,
        /// Device-writable.
        write: bool,
    },
    /// A descriptor written exactly as given (any address, flags, next).
    Raw {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
        /// `VRING_DESC_F_*` bits.
        flags: u16,
        /// Next descriptor index.
        next: u16,
    },
}

impl DescSpec {
    /// A buffer at absolute guest address `addr` (structured data).
    pub fn at(addr: u64, len: u32, write: bool) -> DescSpec {
        DescSpec::Raw {
            addr,
            len,
            flags: if write { VRING_DESC_F_WRITE } else { 0 },
            next: 0,
        }
    }
}

/// A driver's view of one split virtqueue in guest memory.
pub struct DriverQueue {
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl DriverQueue {
    /// Queue number `index` (0..3) with `1 << (size_log2 % 7)` entries.
    pub fn new(index: u64, size_log2: u8) -> DriverQueue {
        assert!(index < 3);
        DriverQueue {
            base: index * 0x1000,
            size: 1 << (size_log2 % 7),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn desc_addr(&self) -> u64 {
        self.base
    }

    fn avail_addr(&self) -> u64 {
        self.base + 0x400
    }

    fn used_addr(&self) -> u64 {
        self.base + 0x800
    }

    /// The device-side queue, as the transport would hand it over: ready,
    /// sized, rings at this queue's addresses.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(self.size).unwrap();
        q.set_desc_table_address(Some(self.desc_addr() as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail_addr() as u32), Some(0));
        q.set_used_ring_address(Some(self.used_addr() as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// The driver re-initialises its rings (after a device reset).
    pub fn reset(&mut self, mem: &GuestMemoryMmap) {
        mem.write_slice(&[0u8; 0x1000], GuestAddress(self.base))
            .unwrap();
        self.next_desc = 0;
        self.avail_idx = 0;
    }

    /// Writes `descs` as one chain (linked with NEXT, `Raw` ones as given)
    /// into the descriptor table, wrapping, and makes its head available.
    /// An empty chain is a no-op. Chains longer than the queue are cut.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[DescSpec]) {
        let descs = &descs[..descs.len().min(usize::from(self.size))];
        if descs.is_empty() {
            return;
        }
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == descs.len();
            let (addr, len, flags, next) = match *d {
                DescSpec::Buf { off, len, write } => {
                    let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
                    if !last {
                        flags |= VRING_DESC_F_NEXT;
                    }
                    let addr = DATA_BASE + u64::from(off) % DATA_LEN;
                    (addr, u32::from(len), flags, self.next_desc)
                }
                DescSpec::Raw {
                    addr,
                    len,
                    mut flags,
                    mut next,
                } => {
                    // `at()` buffers chain like `Buf`s; a raw NEXT stays raw.
                    if !last && next == 0 && flags & VRING_DESC_F_NEXT == 0 {
                        flags |= VRING_DESC_F_NEXT;
                        next = self.next_desc;
                    }
                    (addr, len, flags, next)
                }
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let at = GuestAddress(self.desc_addr() + 16 * u64::from(idx));
            mem.write_slice(&raw, at).unwrap();
        }
        self.push_avail(mem, head);
    }

    /// Puts `head` (any value, even out of range) in the avail ring.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish(mem, self.avail_idx);
    }

    /// Writes avail `idx` (a hostile driver may write anything).
    pub fn publish(&self, mem: &GuestMemoryMmap, idx: u16) {
        std::sync::atomic::fence(Ordering::Release);
        mem.write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap()
    }

    /// Entries of the queue.
    pub fn size(&self) -> u16 {
        self.size
    }
}

/// A bump allocator over the scratch area, wrapping when full.
pub struct Scratch(u64);

impl Default for Scratch {
    fn default() -> Self {
        Scratch(SCRATCH_BASE)
    }
}

impl Scratch {
    /// Room for `len` bytes (at most the scratch area), 16-byte aligned.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let len = len.min(DATA_BASE - SCRATCH_BASE);
        if self.0 + len > DATA_BASE {
            self.0 = SCRATCH_BASE;
        }
        let at = self.0;
        self.0 = (at + len + 15) & !15;
        GuestAddress(at)
    }

    /// Writes `bytes` (cut to the scratch area) and returns where.
    pub fn put(&mut self, mem: &GuestMemoryMmap, bytes: &[u8]) -> (GuestAddress, u32) {
        let n = bytes.len().min((DATA_BASE - SCRATCH_BASE) as usize);
        let at = self.alloc(n as u64);
        mem.write_slice(&bytes[..n], at).unwrap();
        (at, n as u32)
    }
}

/// Runs the event loop without blocking until nothing is ready (or for
/// `max_rounds` rounds: a device may keep re-arming its own eventfd).
pub fn run_until_idle<T: MutEventSubscriber>(em: &mut EventManager<T>, max_rounds: usize) {
    for _ in 0..max_rounds {
        if em.run_with_timeout(0).unwrap() == 0 {
            break;
        }
    }
}

/// A per-process scratch directory in the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keystone-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
