//! Test support: the guest driver's side of one split virtqueue, kept in real
//! guest memory, for the device tests (`net`, `vsock`) that drive a device
//! end to end.
//!
//! [`DriverQueue`] lays out a descriptor table, an available ring and a used
//! ring at a base address, hands the device the matching [`Queue`], makes
//! descriptor chains available (buffers in fixed-size per-descriptor slots,
//! or at addresses the test picks) and reads back what the device used.
//!
//! The layout is computed here rather than taken from
//! `virtio_queue::mock::MockSplitQueue`, which misplaces the used ring
//! (inside the available ring) for 256-entry queues.

use std::collections::HashMap;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The driver's view of one split queue.
pub(crate) struct DriverQueue {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    /// Free descriptor indices; the next one handed out is the last.
    pub(crate) free: Vec<u16>,
    /// The descriptor indices of each outstanding chain, by head.
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
    /// Entries in the queue (the size the driver picked).
    size: u16,
    /// Guest memory of the buffers, one slot of `slot` bytes per descriptor
    /// index from `buf_base`.
    buf_base: u64,
    slot: u64,
}

impl DriverQueue {
    /// A queue of `size` entries (the device offering `max_size`) at `base`:
    /// the descriptor table, then the available ring, then the used ring.
    /// Descriptor `i`'s buffer is at `buf_base + i * slot`.
    pub(crate) fn new(
        max_size: u16,
        size: u16,
        slot: u64,
        base: u64,
        buf_base: u64,
    ) -> (Self, Queue) {
        let qsize = u64::from(size);
        let desc = base;
        let avail = desc + 16 * qsize;
        let used = (avail + 6 + 2 * qsize + 3) & !3;
        let mut q = Queue::new(max_size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        let d = DriverQueue {
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            used_seen: 0,
            size,
            buf_base,
            slot,
        };
        (d, q)
    }

    /// The buffer slot of descriptor `idx`.
    pub(crate) fn buf(&self, idx: u16) -> GuestAddress {
        GuestAddress(self.buf_base + u64::from(idx) * self.slot)
    }

    /// Write a descriptor table entry by hand.
    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, self.desc.unchecked_add(16 * u64::from(idx)))
            .unwrap();
    }

    /// Makes a chain of `(addr, len, device-writable)` buffers available
    /// (each in its own slot, or at `addr` when given); returns the
    /// buffers' addresses. Panics when out of descriptors.
    pub(crate) fn add_chain_at(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(Option<u64>, u32, bool)],
    ) -> Vec<GuestAddress> {
        assert!(self.free.len() >= parts.len(), "driver out of descriptors");
        let idxs: Vec<u16> = (0..parts.len()).map(|_| self.free.pop().unwrap()).collect();
        let mut addrs = Vec::new();
        for (k, (&(addr, len, write), &idx)) in parts.iter().zip(&idxs).enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let mut next = 0;
            if k + 1 < idxs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = idxs[k + 1];
            }
            let addr = addr.unwrap_or(self.buf(idx).0);
            self.write_desc(mem, idx, addr, len, flags, next);
            addrs.push(GuestAddress(addr));
        }
        self.publish(mem, idxs[0]);
        self.chains.insert(idxs[0], idxs);
        addrs
    }

    /// Makes a chain of `(len, device-writable)` buffers available, each in
    /// its own slot; returns the buffers' addresses, or `None` when out of
    /// descriptors.
    pub(crate) fn add_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(u32, bool)],
    ) -> Option<Vec<GuestAddress>> {
        if self.free.len() < parts.len() {
            return None;
        }
        let parts: Vec<_> = parts.iter().map(|&(l, w)| (None, l, w)).collect();
        Some(self.add_chain_at(mem, &parts))
    }

    /// [`Self::add_chain`], panicking when out of descriptors.
    pub(crate) fn add_chain_or_panic(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(u32, bool)],
    ) -> Vec<GuestAddress> {
        self.add_chain(mem, parts)
            .expect("driver out of descriptors")
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// The next used entry: (descriptor indices of the chain, used length);
    /// the chain's descriptors go back to the free list.
    pub(crate) fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(Vec<u16>, u32)> {
        let used_idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        if used_idx == self.used_seen {
            return None;
        }
        let elem = self
            .used
            .unchecked_add(4 + 8 * u64::from(self.used_seen % self.size));
        let id: u32 = mem.read_obj(elem).unwrap();
        let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        let idxs = self.chains.remove(&(id as u16)).unwrap_or_else(|| {
            panic!(
                "the device used chain {id} (len {len}), not given; given: {:?}",
                self.chains.keys().collect::<Vec<_>>()
            )
        });
        self.free.extend(&idxs);
        Some((idxs, len))
    }

    /// Used entries the device published that the driver has not popped.
    pub(crate) fn used_count(&self, mem: &GuestMemoryMmap) -> u16 {
        let used_idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        used_idx.wrapping_sub(self.used_seen)
    }

    /// Chains made available and not yet used.
    pub(crate) fn outstanding(&self) -> usize {
        self.chains.len()
    }
}
