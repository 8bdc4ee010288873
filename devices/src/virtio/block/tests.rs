//! virtio-blk tests: requests through a driver-side queue, the event
//! loop, and hostile chains.

use super::*;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::virtio::Interrupt;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;

const IMAGE_SIZE: u64 = 1 << 20;
const SECTORS: u64 = IMAGE_SIZE / SECTOR_SIZE;
const MEM_SIZE: usize = 8 << 20;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_8000;
const DATA: u64 = 0x2_0000;
const DATA2: u64 = 0x40_0000;
const OUTSIDE: u64 = 0x1_0000_0000;

const R: bool = false;
const W: bool = true;

static NEXT_IMAGE: AtomicUsize = AtomicUsize::new(0);

/// A sparse image file, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(size: u64) -> Image {
        Image::new_in(&std::env::temp_dir(), size)
    }

    fn new_in(dir: &Path, size: u64) -> Image {
        let n = NEXT_IMAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("keystone-blk-{}-{n}.img", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        Image(path)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn activate(blk: &mut Block, mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) {
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    blk.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq)),
        queues: vec![vq.create_queue::<Queue>().unwrap()],
        acked_features: blk.avail_features(),
    })
    .unwrap();
    assert!(blk.is_activated());
}

/// A device on `img`, activated over a fresh mock queue.
struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    blk: Block,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap, img: &Image, read_only: bool) -> Harness<'a> {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut blk = Block::new(&img.0, read_only).unwrap();
        activate(&mut blk, mem, &vq);
        Harness { mem, vq, blk }
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Offers one chain of `(addr, len, device-writable)` descriptors,
    /// processes the queue and returns the used length reported.
    fn run_chain(&mut self, descs: &[(u64, u32, bool)]) -> u32 {
        let before = self.used_idx();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        self.vq.add_desc_chains(&raw, 0).unwrap();
        assert!(self.blk.process_queue());
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "used ring advanced"
        );
        let elem = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(before % QUEUE_SIZE))
            .unwrap()
            .load();
        assert_eq!(elem.id(), 0);
        elem.len()
    }

    /// A request with a 16-byte header at `HDR`, `data` descriptors and
    /// a 1-byte status at `STATUS`. Returns (status, used length).
    fn request(&mut self, req_type: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.write_header(req_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![(HDR, HEADER_LEN as u32, R)];
        descs.extend_from_slice(data);
        descs.push((STATUS, 1, W));
        let len = self.run_chain(&descs);
        (self.status(), len)
    }

    fn write_header(&self, req_type: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn read_cfg(blk: &Block, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0xaa; len];
    blk.read_config(offset, &mut v);
    v
}

#[test]
fn config_space_describes_the_disk() {
    // A trailing partial sector is not addressable.
    let img = Image::new(IMAGE_SIZE + 100);
    let mut blk = Block::new(&img.0, false).unwrap();
    assert_eq!(blk.device_type(), TYPE_BLOCK);
    assert_eq!(blk.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(blk.queue_events().len(), 1);
    assert_eq!(blk.capacity(), SECTORS);
    assert_eq!(read_cfg(&blk, 0, 8), SECTORS.to_le_bytes());
    assert_eq!(read_cfg(&blk, 8, 4), (1u32 << 20).to_le_bytes(), "size_max");
    assert_eq!(read_cfg(&blk, 12, 4), 254u32.to_le_bytes(), "seg_max");
    assert_eq!(read_cfg(&blk, 20, 4), 512u32.to_le_bytes(), "blk_size");
    assert_eq!(read_cfg(&blk, 36, 4), MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(read_cfg(&blk, 40, 4), MAX_DISCARD_SEG.to_le_bytes());
    assert_eq!(
        read_cfg(&blk, 44, 4),
        DISCARD_SECTOR_ALIGNMENT.to_le_bytes()
    );
    assert_eq!(
        read_cfg(&blk, 48, 4),
        MAX_WRITE_ZEROES_SECTORS.to_le_bytes()
    );
    assert_eq!(read_cfg(&blk, 52, 4), MAX_WRITE_ZEROES_SEG.to_le_bytes());
    assert_eq!(read_cfg(&blk, 56, 1), [1]);
    // Byte-wise access and reads straddling or past the end.
    assert_eq!(read_cfg(&blk, 1, 1), [SECTORS.to_le_bytes()[1]]);
    assert_eq!(read_cfg(&blk, 58, 4), [0; 4]);
    assert_eq!(read_cfg(&blk, 0x100, 4), [0; 4]);
    assert_eq!(read_cfg(&blk, u64::MAX, 8), [0; 8]);
    // Writes are ignored.
    blk.write_config(0, &[0xff; 8]);
    blk.write_config(u64::MAX, &[0xff; 8]);
    assert_eq!(read_cfg(&blk, 0, 8), SECTORS.to_le_bytes());

    let ro = Block::new(&img.0, true).unwrap();
    assert_eq!(
        read_cfg(&ro, 36, 24),
        [0; 24],
        "no discard on a read-only disk"
    );
}

#[test]
fn features_with_and_without_read_only() {
    let img = Image::new(IMAGE_SIZE);
    let base = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE);
    let rw = Block::new(&img.0, false).unwrap();
    assert!(!rw.is_read_only());
    assert_eq!(
        rw.avail_features(),
        base | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    );
    let ro = Block::new(&img.0, true).unwrap();
    assert!(ro.is_read_only());
    assert_eq!(ro.avail_features(), base | (1 << VIRTIO_BLK_F_RO));
}

#[test]
fn open_errors_are_reported() {
    let err = Block::new(Path::new("/nonexistent/keystone.img"), true)
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
}

#[test]
fn write_then_read_round_trips_at_first_middle_and_last_sectors() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let mut expected = vec![0u8; IMAGE_SIZE as usize];
    for (i, (sector, sectors)) in [(0u64, 1u32), (1000, 8), (SECTORS - 3, 3)]
        .into_iter()
        .enumerate()
    {
        let len = sectors * 512;
        let data = pattern(len as usize, i as u8);
        h.put(DATA, &data);
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, len, R)]),
            (OK, 1)
        );
        let off = (sector * 512) as usize;
        expected[off..off + len as usize].copy_from_slice(&data);
        assert_eq!(img.contents(), expected, "file holds exactly the writes");

        h.put(DATA2, &vec![0u8; len as usize]);
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, sector, &[(DATA2, len, W)]),
            (OK, len + 1)
        );
        assert_eq!(h.get(DATA2, len as usize), data);
    }
}

#[test]
fn transfers_span_descriptors_and_bounce_chunks() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // 200 KiB in three descriptors of odd (sector-multiple) sizes.
    let data = pattern(200 * 1024, 7);
    let (a, b) = (512u32 * 3, 512u32 * 250);
    let c = data.len() as u32 - a - b;
    h.put(DATA, &data);
    let descs = [
        (DATA, a, R),
        (DATA + u64::from(a), b, R),
        (DATA + u64::from(a + b), c, R),
    ];
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 16, &descs), (OK, 1));
    let file = img.contents();
    assert_eq!(&file[16 * 512..16 * 512 + data.len()], &data[..]);
    assert!(file[..16 * 512].iter().all(|&b| b == 0));
    assert!(file[16 * 512 + data.len()..].iter().all(|&b| b == 0));

    // Read back into two descriptors.
    let half = data.len() as u32 / 2;
    let descs = [(DATA2, half, W), (DATA2 + 0x10_0000, half, W)];
    assert_eq!(
        h.request(VIRTIO_BLK_T_IN, 16, &descs),
        (OK, data.len() as u32 + 1)
    );
    let mut got = h.get(DATA2, half as usize);
    got.extend(h.get(DATA2 + 0x10_0000, half as usize));
    assert_eq!(got, data);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // Spec 2.6.4: no framing assumptions. Header + data in one readable
    // descriptor, data + status in one writable descriptor.
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let data = pattern(1024, 3);
    let mut buf = Vec::new();
    buf.extend_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&5u64.to_le_bytes());
    buf.extend_from_slice(&data);
    h.put(DATA, &buf);
    h.put(STATUS, &[0xff]);
    assert_eq!(
        h.run_chain(&[(DATA, buf.len() as u32, R), (STATUS, 1, W)]),
        1
    );
    assert_eq!(h.status(), OK);
    assert_eq!(&img.contents()[5 * 512..5 * 512 + 1024], &data[..]);

    h.write_header(VIRTIO_BLK_T_IN, 5);
    h.put(DATA2 + 1024, &[0xff]);
    assert_eq!(h.run_chain(&[(HDR, 16, R), (DATA2, 1025, W)]), 1025);
    assert_eq!(h.get(DATA2, 1024), data);
    assert_eq!(h.get(DATA2 + 1024, 1), [OK]);
}

#[test]
fn several_requests_in_one_pass() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.write_header(VIRTIO_BLK_T_FLUSH, 0);
    let chain = |status: u64, first: u16| {
        [
            RawDescriptor::from(SplitDescriptor::new(
                HDR,
                16,
                VRING_DESC_F_NEXT as u16,
                first + 1,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                status,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ]
    };
    for i in 0..3u16 {
        h.vq.add_desc_chains(&chain(STATUS + u64::from(i), 2 * i), 2 * i)
            .unwrap();
    }
    h.put(STATUS, &[0xff; 3]);
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 3);
    assert_eq!(h.get(STATUS, 3), [OK; 3]);
    assert!(!h.blk.process_queue(), "nothing left");
}

/// Publishes `count` avail entries, all naming the chain at descriptor 0
/// (the device does not care that they are the same chain).
fn publish_heads(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    size: u16,
    count: u16,
) {
    let avail = vq.avail_addr();
    let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
    for i in 0..count {
        let slot = idx.wrapping_add(i) % size;
        mem.write_obj(0u16, avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
    }
    mem.write_obj(idx.wrapping_add(count), avail.unchecked_add(2))
        .unwrap();
}

#[test]
fn wakeups_are_bounded_and_yield_through_the_queue_eventfd() {
    // A guest refilling the ring while the device works, simulated with
    // a queue larger than the cap (the transport would allow 256 at
    // most): every request is served, a cap's worth per wake-up.
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, 1024);
    let mut blk = Block::new(&img.0, false).unwrap();
    activate(&mut blk, &mem, &vq);
    let mut h = Harness { mem: &mem, vq, blk };
    h.write_header(VIRTIO_BLK_T_FLUSH, 0);
    h.vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ],
        0,
    )
    .unwrap();
    let total = 2 * MAX_CHAINS_PER_EVENT as u16 + 44;
    publish_heads(&mem, &h.vq, 1024, total - 1);
    let evt = &h.blk.activation.queue_evt(0);
    assert!(evt.read().is_err(), "not armed yet");

    for round in 1..=2u16 {
        h.put(STATUS, &[0xff]);
        assert!(h.blk.process_queue());
        assert_eq!(h.used_idx(), round * MAX_CHAINS_PER_EVENT as u16);
        assert_eq!(h.status(), OK);
        assert_eq!(h.blk.activation.queue_evt(0).read().unwrap(), 1, "re-armed");
    }
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), total);
    assert!(
        h.blk.activation.queue_evt(0).read().is_err(),
        "done: not re-armed"
    );
    assert!(!h.blk.process_queue());
    assert!(!h.blk.needs_reset());
    // Notifications are back on: the queue works as before.
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn wakeups_yield_after_a_byte_budget() {
    // 1 MiB reads: the wake-up stops once 64 MiB of buffers are done.
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.write_header(VIRTIO_BLK_T_IN, 0);
    let mb = IMAGE_SIZE as u32;
    h.vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                DATA2,
                mb,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                2,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ],
        0,
    )
    .unwrap();
    publish_heads(&mem, &h.vq, QUEUE_SIZE, 99);
    let per_wakeup = (MAX_BYTES_PER_EVENT).div_ceil(u64::from(mb) + 17) as u16;
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), per_wakeup);
    assert_eq!(h.blk.activation.queue_evt(0).read().unwrap(), 1, "re-armed");
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 100);
    assert!(h.blk.activation.queue_evt(0).read().is_err());
    assert_eq!(h.status(), OK);
}

#[test]
fn requests_over_size_max_or_seg_max_fail_untouched() {
    // A disk larger than any request, so only the size limits apply.
    let img = Image::new(256 << 20);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let mb = SIZE_MAX;
    let out = VIRTIO_BLK_T_OUT;
    let inn = VIRTIO_BLK_T_IN;
    h.put(DATA, &vec![0x5a; mb as usize + 512]);
    h.put(DATA2, &vec![0x11; mb as usize + 512]);

    // One segment over size_max, either way.
    assert_eq!(h.request(out, 0, &[(DATA, mb + 512, R)]), (IOERR, 1));
    assert_eq!(h.request(inn, 0, &[(DATA2, mb + 512, W)]), (IOERR, 1));
    assert_eq!(
        h.get(DATA2, mb as usize + 512),
        vec![0x11; mb as usize + 512]
    );
    // A full segment is fine, and so is the status byte sharing one.
    assert_eq!(h.request(inn, 8, &[(DATA2, mb, W)]), (OK, mb + 1));
    h.write_header(inn, 8);
    assert_eq!(h.run_chain(&[(HDR, 16, R), (DATA2, mb + 1, W)]), mb + 1);
    assert_eq!(h.get(DATA2 + u64::from(mb), 1), [OK]);
    h.write_header(inn, 8);
    assert_eq!(h.run_chain(&[(HDR, 16, R), (DATA2, mb + 2, W)]), 1);
    assert_eq!(h.get(DATA2 + u64::from(mb) + 1, 1), [IOERR]);

    // In all over seg_max * size_max (255 MiB in 256 descriptors, the
    // status sharing the last one), or exactly at it.
    let mut big = vec![(DATA2, mb, W); SEG_MAX as usize];
    big.push((DATA2, mb + 1, W));
    h.write_header(inn, 0);
    let mut chain = vec![(HDR, 16, R)];
    chain.extend_from_slice(&big);
    h.put(DATA2, &[0x11; 16]);
    h.put(DATA2 + u64::from(mb), &[0xff]);
    assert_eq!(h.run_chain(&chain), 1);
    assert_eq!(h.get(DATA2 + u64::from(mb), 1), [IOERR]);
    assert_eq!(h.get(DATA2, 16), [0x11; 16], "nothing read");
    let ok = vec![(DATA2, mb, W); SEG_MAX as usize];
    assert_eq!(
        h.request(inn, 0, &ok),
        (OK, SEG_MAX * mb + 1),
        "seg_max * size_max is allowed"
    );
    // The same for a write, with the header sharing the first segment.
    let mut buf = Vec::new();
    buf.extend_from_slice(&out.to_le_bytes());
    buf.extend_from_slice(&[0; 12]);
    h.put(DATA - 16, &buf);
    let mut chain = vec![(DATA - 16, mb + 16, R)];
    chain.extend(vec![(DATA, mb, R); SEG_MAX as usize]);
    chain.push((STATUS, 1, W));
    h.put(STATUS, &[0xff]);
    assert_eq!(h.run_chain(&chain), 1);
    assert_eq!(h.status(), IOERR);
    assert!(img.contents().iter().all(|&b| b == 0), "file untouched");

    // The header may share a full segment too.
    assert_eq!(h.run_chain(&[(DATA - 16, mb + 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(h.status(), OK);
    let file = img.contents();
    assert!(file[..mb as usize].iter().all(|&b| b == 0x5a));
    assert!(file[mb as usize..].iter().all(|&b| b == 0));
}

#[test]
fn flush_succeeds_and_rejects_data() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    // The sector is ignored.
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, u64::MAX, &[]), (OK, 1));
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, R)]),
        (IOERR, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, W)]),
        (IOERR, 1)
    );
    // Read-only disks flush too.
    let mut ro = Harness::new(&mem, &img, true);
    assert_eq!(ro.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn get_id_returns_a_stable_serial() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.put(DATA, &[0xee; 32]);
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]),
        (OK, 21)
    );
    let id = h.get(DATA, 20);
    assert_eq!(&id[..], &h.blk.serial()[..]);
    assert!(id.starts_with(b"ks"));
    let meta = std::fs::metadata(&img.0).unwrap();
    let text = format!("ks{:x}{:x}", meta.dev(), meta.ino());
    let n = text.len().min(20);
    assert_eq!(&id[..n], &text.as_bytes()[..n]);
    assert!(id[n..].iter().all(|&b| b == 0), "NUL-padded");
    assert_eq!(h.get(DATA + 20, 12), [0xee; 12], "nothing past 20 bytes");

    // Same file, same serial; another file, another serial.
    let again = Block::new(&img.0, true).unwrap();
    assert_eq!(again.serial(), h.blk.serial());
    let other = Image::new(IMAGE_SIZE);
    assert_ne!(Block::new(&other.0, true).unwrap().serial(), h.blk.serial());

    // A smaller buffer gets a prefix; none at all, or a readable one, is
    // an error.
    h.put(DATA, &[0xee; 32]);
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, W)]), (OK, 5));
    assert_eq!(h.get(DATA, 5), [b'k', b's', id[2], id[3], 0xee]);
    assert_eq!(h.request(VIRTIO_BLK_T_GET_ID, 0, &[]), (IOERR, 1));
    assert_eq!(
        h.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, R)]),
        (IOERR, 1)
    );
}

#[test]
fn serial_is_truncated_and_padded() {
    assert_eq!(
        &make_serial(0x1, 0x2),
        b"ks12\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    assert_eq!(&make_serial(u64::MAX, u64::MAX), b"ksffffffffffffffffff");
}

#[test]
fn read_only_disk_refuses_writes() {
    let img = Image::new(IMAGE_SIZE);
    std::fs::write(&img.0, pattern(IMAGE_SIZE as usize, 9)).unwrap();
    let before = img.contents();
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, true);
    h.put(DATA, &[0x55; 512]);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
        (IOERR, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]),
        (UNSUPP, 1)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
        (UNSUPP, 1)
    );
    assert_eq!(img.contents(), before);
    // Reads still work.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 1, &[(DATA2, 512, W)]), (OK, 513));
    assert_eq!(h.get(DATA2, 512), &before[512..1024]);
}

#[test]
fn out_of_range_and_overflowing_sectors_fail() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.put(DATA, &[0x77; 1024]);
    for (sector, len) in [
        (SECTORS, 512),
        (SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX / 512, 1024),
        (u64::MAX / 512 + 1, 512),
    ] {
        assert_eq!(
            h.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, len, R)]),
            (IOERR, 1),
            "write at {sector}"
        );
        assert_eq!(
            h.request(VIRTIO_BLK_T_IN, sector, &[(DATA2, len, W)]),
            (IOERR, 1),
            "read at {sector}"
        );
    }
    // Zero-length transfers at the very end are in range.
    assert_eq!(h.request(VIRTIO_BLK_T_IN, SECTORS, &[]), (OK, 1));
    assert_eq!(img.contents(), vec![0; IMAGE_SIZE as usize]);
    assert_eq!(img.contents().len() as u64, IMAGE_SIZE, "file not grown");
}

#[test]
fn unsupported_type_is_reported() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    for t in [99, 2, u32::MAX] {
        assert_eq!(h.request(t, 0, &[(DATA, 512, R)]), (UNSUPP, 1));
    }
    assert_eq!(img.contents(), vec![0; IMAGE_SIZE as usize]);
}

#[test]
fn malformed_chains_get_ioerr_and_leave_the_file_alone() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.put(DATA, &[0x99; 4096]);
    h.put(DATA2, &[0x11; 4096]);
    let out = VIRTIO_BLK_T_OUT;
    let inn = VIRTIO_BLK_T_IN;

    // Short header.
    h.write_header(out, 0);
    h.put(STATUS, &[0xff]);
    assert_eq!(h.run_chain(&[(HDR, 8, R), (STATUS, 1, W)]), 1);
    assert_eq!(h.status(), IOERR);
    // Device-writable header.
    h.put(STATUS, &[0xff]);
    assert_eq!(h.run_chain(&[(HDR, 16, W), (STATUS, 1, W)]), 1);
    assert_eq!(h.status(), IOERR);
    // Data in the wrong direction, both ways.
    assert_eq!(h.request(out, 0, &[(DATA, 512, W)]), (IOERR, 1));
    assert_eq!(h.request(inn, 0, &[(DATA2, 512, R)]), (IOERR, 1));
    assert_eq!(h.get(DATA2, 512), [0x11; 512], "nothing read into guest");
    assert_eq!(
        h.request(out, 0, &[(DATA, 512, R), (DATA2, 512, W)]),
        (IOERR, 1)
    );
    // A readable descriptor after a writable one.
    assert_eq!(
        h.request(inn, 0, &[(DATA2, 512, W), (DATA, 512, R)]),
        (IOERR, 1)
    );
    // Lengths that are not whole sectors.
    assert_eq!(h.request(out, 0, &[(DATA, 100, R)]), (IOERR, 1));
    assert_eq!(h.request(inn, 0, &[(DATA2, 513, W)]), (IOERR, 1));
    // Buffers outside guest memory, or wrapping around the address space.
    assert_eq!(h.request(out, 0, &[(OUTSIDE, 512, R)]), (IOERR, 1));
    assert_eq!(h.request(inn, 0, &[(OUTSIDE, 512, W)]), (IOERR, 1));
    assert_eq!(
        h.request(out, 0, &[(MEM_SIZE as u64 - 256, 512, R)]),
        (IOERR, 1)
    );
    assert_eq!(h.request(out, 0, &[(u64::MAX - 10, 512, R)]), (IOERR, 1));
    assert_eq!(h.request(out, 0, &[(DATA, u32::MAX - 1024, R)]), (IOERR, 1));
    // A chain over 4 GiB in all is cut short by the queue (spec 2.7.5.2
    // forbids it): its status byte is never seen, so it is returned
    // empty.
    assert_eq!(
        h.request(out, 0, &[(DATA, u32::MAX, R), (DATA, u32::MAX, R)]),
        (0xff, 0)
    );
    h.put(STATUS, &[0xff]);
    assert_eq!(h.run_chain(&[(OUTSIDE, 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(h.status(), IOERR);
    assert_eq!(img.contents(), vec![0; IMAGE_SIZE as usize]);
}

#[test]
fn chains_without_a_status_byte_are_returned_empty() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    h.put(DATA, &[0x99; 512]);
    h.write_header(VIRTIO_BLK_T_OUT, 0);
    h.put(STATUS, &[0xff]);
    // No status descriptor at all.
    assert_eq!(h.run_chain(&[(HDR, 16, R), (DATA, 512, R)]), 0);
    // Header only.
    assert_eq!(h.run_chain(&[(HDR, 16, R)]), 0);
    // Status descriptor not writable.
    assert_eq!(
        h.run_chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]),
        0
    );
    // Zero-length status descriptor.
    assert_eq!(
        h.run_chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]),
        0
    );
    // Status outside guest memory.
    assert_eq!(
        h.run_chain(&[(HDR, 16, R), (DATA, 512, R), (OUTSIDE, 1, W)]),
        0
    );
    assert_eq!(h.status(), 0xff, "status byte untouched");
    assert_eq!(img.contents(), vec![0; IMAGE_SIZE as usize]);
    // The queue still works.
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn looping_and_out_of_range_descriptors_do_not_hang() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    // A descriptor that points at itself: the chain ends after a queue's
    // worth of descriptors, all readable, so there is no status.
    let looped = RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0));
    h.vq.add_desc_chains(&[looped], 0).unwrap();
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 1);
    // A next index past the table ends the chain early.
    let bad_next = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 999)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    h.write_header(VIRTIO_BLK_T_FLUSH, 0);
    h.vq.add_desc_chains(&bad_next, 0).unwrap();
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 2);
    // An avail entry naming a descriptor beyond the table is dropped.
    let avail = h.vq.avail_addr();
    mem.write_obj(300u16, avail.unchecked_add(4 + 2 * 2))
        .unwrap();
    mem.write_obj(3u16, avail.unchecked_add(2)).unwrap();
    assert!(!h.blk.process_queue());
    assert_eq!(h.used_idx(), 2);
    assert!(!h.blk.needs_reset());
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(img.contents(), vec![0; IMAGE_SIZE as usize]);
}

#[test]
fn corrupt_avail_index_needs_a_reset() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    mem.write_obj(1000u16, h.vq.avail_addr().unchecked_add(2))
        .unwrap();
    assert!(!h.blk.process_queue());
    assert!(h.blk.needs_reset());
    let status = h.blk.activation.active().unwrap().interrupt.status();
    assert_eq!(
        status,
        super::super::VIRTIO_MMIO_INT_VRING | super::super::VIRTIO_MMIO_INT_CONFIG
    );
    assert!(!h.blk.process_queue(), "stays stopped");
    h.blk.reset();
    assert!(!h.blk.needs_reset());
    assert!(!h.blk.is_activated());
}

#[test]
fn completions_interrupt_the_guest() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut blk = Block::new(&img.0, false).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    blk.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: interrupt.clone(),
        queues: vec![vq.create_queue::<Queue>().unwrap()],
        acked_features: 0,
    })
    .unwrap();
    assert_eq!(blk.activate_evt().read().unwrap(), 1);
    assert!(!blk.process_queue());
    assert!(irq.read().is_err(), "no interrupt without completions");
    let mut h = Harness { mem: &mem, vq, blk };
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(interrupt.status() & super::super::VIRTIO_MMIO_INT_VRING, 1);
}

#[test]
fn activation_needs_exactly_one_queue() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut blk = Block::new(&img.0, false).unwrap();
    for n in [0, 2] {
        let err = blk
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                queues: (0..n)
                    .map(|_| vq.create_queue::<Queue>().unwrap())
                    .collect(),
                acked_features: 0,
            })
            .unwrap_err();
        assert!(
            matches!(err, ActivateError::BadQueues { expected: 1, got } if got == n),
            "{err}"
        );
        assert!(!blk.is_activated());
    }
    // Inactive: kicks are drained, nothing is processed.
    assert!(!blk.process_queue());
    activate(&mut blk, &mem, &vq);
    blk.reset();
    assert!(!blk.is_activated());
    activate(&mut blk, &mem, &vq);
}

#[test]
fn write_zeroes_and_discard() {
    let img = Image::new(IMAGE_SIZE);
    let fill = pattern(IMAGE_SIZE as usize, 1);
    std::fs::write(&img.0, &fill).unwrap();
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    let wz = VIRTIO_BLK_T_WRITE_ZEROES;
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

    // Two segments, one with unmap (hole) and one without.
    let mut segs = seg(8, 8, 0);
    segs.extend(seg(100, 16, unmap));
    h.put(DATA, &segs);
    assert_eq!(h.request(wz, 0, &[(DATA, 32, R)]), (OK, 1));
    let mut expected = fill.clone();
    expected[8 * 512..16 * 512].fill(0);
    expected[100 * 512..116 * 512].fill(0);
    assert_eq!(img.contents(), expected);

    // Discard: the range is deallocated (reads as zeros where the
    // filesystem punches holes) and nothing else changes.
    h.put(DATA, &seg(200, 8, 0));
    assert_eq!(
        h.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
        (OK, 1)
    );
    let got = img.contents();
    let range = 200 * 512..208 * 512;
    assert!(
        got[range.clone()] == expected[range.clone()] || got[range.clone()].iter().all(|&b| b == 0)
    );
    expected[range.clone()].copy_from_slice(&got[range]);
    assert_eq!(got, expected);

    // Unsupported flags.
    h.put(DATA, &seg(0, 1, unmap));
    assert_eq!(
        h.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
        (UNSUPP, 1)
    );
    h.put(DATA, &seg(0, 1, 0x80));
    assert_eq!(h.request(wz, 0, &[(DATA, 16, R)]), (UNSUPP, 1));
    // Bad payloads: empty, partial segment, too many segments, out of
    // range, overflowing, too long, writable.
    h.put(DATA, &seg(SECTORS - 1, 2, 0));
    assert_eq!(h.request(wz, 0, &[]), (IOERR, 1));
    assert_eq!(h.request(wz, 0, &[(DATA, 10, R)]), (IOERR, 1));
    assert_eq!(h.request(wz, 0, &[(DATA, 16 * 33, R)]), (IOERR, 1));
    assert_eq!(h.request(wz, 0, &[(DATA, 16, R)]), (IOERR, 1));
    h.put(DATA, &seg(u64::MAX, 1, 0));
    assert_eq!(h.request(wz, 0, &[(DATA, 16, R)]), (IOERR, 1));
    h.put(DATA, &seg(0, MAX_WRITE_ZEROES_SECTORS + 1, 0));
    assert_eq!(h.request(wz, 0, &[(DATA, 16, R)]), (IOERR, 1));
    assert_eq!(h.request(wz, 0, &[(DATA, 16, W)]), (IOERR, 1));
    // A valid segment after an invalid one: nothing is done.
    let mut segs = seg(0, 1, 0);
    segs.extend(seg(SECTORS, 1, 0));
    h.put(DATA, &segs);
    assert_eq!(h.request(wz, 0, &[(DATA, 32, R)]), (IOERR, 1));
    assert_eq!(img.contents(), expected);
}

#[test]
fn event_loop_activates_and_serves_the_queue() {
    let img = Image::new(IMAGE_SIZE);
    let mem = guest_mem();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let blk = Arc::new(Mutex::new(Block::new(&img.0, false).unwrap()));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(blk.clone());

    // A kick before activation is drained without effect.
    blk.lock()
        .unwrap()
        .activation
        .queue_evt(0)
        .write(1)
        .unwrap();

    let queue = vq.create_queue::<Queue>().unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    blk.lock()
        .unwrap()
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: vec![queue],
            acked_features: 0,
        })
        .unwrap();
    em.run_with_timeout(100).unwrap();

    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ],
        0,
    )
    .unwrap();
    blk.lock()
        .unwrap()
        .activation
        .queue_evt(0)
        .write(1)
        .unwrap();
    for _ in 0..10 {
        if vq.used().idx().load() == 1 {
            break;
        }
        em.run_with_timeout(100).unwrap();
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);

    // Reset and reactivate: the queue eventfd is not registered twice.
    blk.lock().unwrap().reset();
    activate(&mut blk.lock().unwrap(), &mem, &vq);
    em.run_with_timeout(100).unwrap();
}

#[test]
fn write_zeroes_on_tmpfs_is_a_hole_and_counts_its_ranges_against_the_budget() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE. One request of 32 overlapping
    // 2 GiB segments must neither make the device write 64 GiB of zeros nor
    // be counted as the 529 bytes of its descriptors.
    let dir = Path::new("/dev/shm");
    // SAFETY: statfs only writes into the zeroed struct passed to it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: `c` is NUL-terminated and `st` is a valid statfs.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(
        st.f_type,
        libc::TMPFS_MAGIC as _,
        "this test needs tmpfs at /dev/shm"
    );
    let size = u64::from(MAX_WRITE_ZEROES_SECTORS) * SECTOR_SIZE;
    let img = Image::new_in(dir, size);
    let mem = guest_mem();
    let mut h = Harness::new(&mem, &img, false);
    let mut segs = Vec::new();
    for _ in 0..MAX_WRITE_ZEROES_SEG {
        segs.extend_from_slice(&0u64.to_le_bytes());
        segs.extend_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        segs.extend_from_slice(&0u32.to_le_bytes());
    }
    h.put(DATA, &segs);
    h.write_header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    h.vq.add_desc_chains(
        &[
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                DATA,
                segs.len() as u32,
                VRING_DESC_F_NEXT as u16,
                2,
            )),
            RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ],
        0,
    )
    .unwrap();
    // The same request twice.
    publish_heads(&mem, &h.vq, QUEUE_SIZE, 1);
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 1, "one 64 GiB request ends the wake-up");
    assert_eq!(h.status(), OK);
    assert_eq!(h.blk.activation.queue_evt(0).read().unwrap(), 1, "re-armed");
    let blocks = std::fs::metadata(&img.0).unwrap().blocks();
    assert_eq!(blocks, 0, "zeros were written instead of a hole");
    assert!(h.blk.process_queue());
    assert_eq!(h.used_idx(), 2);
}
