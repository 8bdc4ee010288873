//! virtio-blk request processing over a real guest memory.
//!
//! The input lays out one request queue (size, descriptor chains, avail
//! ring, including bad heads and corrupt avail indices) and the data area;
//! requests are either typed (a 16-byte header of a chosen type and sector,
//! data descriptors, a status byte), DISCARD / WRITE_ZEROES segment lists,
//! or raw chains. A `Block` on a 64 KiB temp image (created once per
//! process, read-write or read-only) is activated with the queue and driven
//! through its `MutEventSubscriber` in an `EventManager`, round by round,
//! with optional device resets in between.
//!
//! Invariants: no panic; the image length never changes; the used index
//! never runs ahead of what the driver made available.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use event_manager::{EventManager, SubscriberOps};
use keystone_devices::virtio::block::Block;
use keystone_devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
use keystone_fuzz::{guest_memory, run_until_idle, temp_dir, DescSpec, DriverQueue, Scratch};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE_LEN: u64 = 64 << 10;

/// A sector: near the disk (0..255, the disk has 128) or anywhere.
#[derive(Arbitrary, Debug)]
enum Sector {
    Near(u8),
    Any(u64),
}

impl Sector {
    fn get(&self) -> u64 {
        match *self {
            Sector::Near(s) => u64::from(s),
            Sector::Any(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Request {
    /// Header (type `kind` mapped onto IN, OUT, FLUSH, GET_ID, DISCARD,
    /// WRITE_ZEROES, or taken as is), data descriptors, status byte.
    Typed {
        kind: u32,
        sector: Sector,
        data: Vec<DescSpec>,
    },
    /// DISCARD or WRITE_ZEROES with (sector, num_sectors, flags) segments.
    Segments {
        write_zeroes: bool,
        segs: Vec<(Sector, u32, u32)>,
    },
    /// Any chain (the header comes from the data area, if anywhere).
    Raw(Vec<DescSpec>),
    /// An avail ring entry with any head index.
    Head(u16),
}

#[derive(Arbitrary, Debug)]
struct Round {
    requests: Vec<Request>,
    /// Overwrite the avail index before kicking.
    avail_idx: Option<u16>,
    /// Reset the device (and the driver's rings) and activate again after.
    reset: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    queue_size_log2: u8,
    rounds: Vec<Round>,
    data: Vec<u8>,
}

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = temp_dir("blk").join("disk.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(IMAGE_LEN)
            .unwrap();
        p
    })
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn activate(blk: &Mutex<Block>, q: &DriverQueue, mem: &vm_memory::GuestMemoryMmap) {
    let mut b = blk.lock().unwrap();
    let acked_features = b.avail_features();
    b.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        queues: vec![q.device_queue()],
        acked_features,
    })
    .unwrap();
}

fuzz_target!(|input: Input| {
    use kinds::*;
    let mem = guest_memory(&input.data);
    let mut q = DriverQueue::new(0, input.queue_size_log2);
    let blk = Arc::new(Mutex::new(Block::new(image(), input.read_only).unwrap()));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(blk.clone());
    activate(&blk, &q, &mem);
    run_until_idle(&mut em, 8);

    let mut scratch = Scratch::default();
    let mut offered: u16 = 0;
    // Once the driver wrote its own avail index, all bets are off.
    let mut idx_forged = false;
    for round in input.rounds.iter().take(16) {
        for req in round.requests.iter().take(2 * usize::from(q.size())) {
            match req {
                Request::Typed { kind, sector, data } => {
                    let kind = KINDS.get(*kind as usize).copied().unwrap_or(*kind);
                    let (hdr, _) = scratch.put(&mem, &header(kind, sector.get()));
                    let status = scratch.alloc(1);
                    let mut chain = vec![DescSpec::at(hdr.0, 16, false)];
                    chain.extend(data.iter().take(8).cloned());
                    chain.push(DescSpec::at(status.0, 1, true));
                    q.add_chain(&mem, &chain);
                }
                Request::Segments { write_zeroes, segs } => {
                    let kind = if *write_zeroes { WRITE_ZEROES } else { DISCARD };
                    let (hdr, _) = scratch.put(&mem, &header(kind, 0));
                    let mut payload = Vec::new();
                    for (sector, num, flags) in segs.iter().take(40) {
                        payload.extend_from_slice(&sector.get().to_le_bytes());
                        payload.extend_from_slice(&num.to_le_bytes());
                        payload.extend_from_slice(&flags.to_le_bytes());
                    }
                    let (segs_at, len) = scratch.put(&mem, &payload);
                    let status = scratch.alloc(1);
                    q.add_chain(
                        &mem,
                        &[
                            DescSpec::at(hdr.0, 16, false),
                            DescSpec::at(segs_at.0, len, false),
                            DescSpec::at(status.0, 1, true),
                        ],
                    );
                }
                Request::Raw(chain) => q.add_chain(&mem, &chain[..chain.len().min(12)]),
                Request::Head(head) => q.push_avail(&mem, *head),
            }
            offered = offered.wrapping_add(1);
        }
        if let Some(idx) = round.avail_idx {
            q.publish(&mem, idx);
            idx_forged = true;
        }
        blk.lock().unwrap().queue_events()[0].write(1).unwrap();
        run_until_idle(&mut em, 8);
        if !idx_forged {
            // Returned requests never outnumber the offered ones.
            let used = q.used_idx(&mem);
            assert!(used <= offered, "used {used} > offered {offered}");
        }
        if round.reset {
            blk.lock().unwrap().reset();
            q.reset(&mem);
            offered = 0;
            idx_forged = false;
            activate(&blk, &q, &mem);
            run_until_idle(&mut em, 8);
        }
    }
    drop(em);
    drop(blk);
    let len = std::fs::metadata(image()).unwrap().len();
    assert_eq!(len, IMAGE_LEN, "the image length changed");
});

/// virtio-blk request types (virtio spec 5.2.6).
mod kinds {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    /// Small `kind` values pick a known type; others are used as is.
    pub const KINDS: [u32; 6] = [IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES];
}
