//! virtio-blk over a raw image file (virtio 1.x spec, section 5.2).
//!
//! One request queue of up to [`QUEUE_SIZE`] entries. Each request is a
//! descriptor chain: a 16-byte header the device reads (`type`, `reserved`,
//! `sector`), the data, and a final status byte the device writes. The
//! device makes no assumption about how the driver splits that layout into
//! descriptors (spec 2.6.4): the device-readable bytes form one stream that
//! starts with the header, the device-writable bytes another that ends with
//! the status byte, which must be the last byte of the chain.
//!
//! Data moves between guest memory and the file through a fixed 64 KiB
//! bounce buffer with `pread`/`pwrite`; there is no cache, so a write the
//! guest sees completed is in the host page cache, and a FLUSH completes
//! only once `fdatasync` returned. DISCARD punches holes in the file and
//! WRITE_ZEROES zeroes ranges (`fallocate`), both offered on writable disks
//! only.
//!
//! Everything in a chain is guest-controlled: a malformed request gets
//! `VIRTIO_BLK_S_IOERR` when it has a status byte to write and is returned
//! with a used length of 0 when it has not; each class of guest error is
//! logged once.
//!
//! Requests are serviced synchronously on the VMM's event loop, so the work
//! one guest can cause per wake-up is bounded: a request carries at most
//! [`SIZE_MAX`] bytes of data per descriptor and [`SEG_MAX`] × [`SIZE_MAX`]
//! in all (larger ones fail with `VIRTIO_BLK_S_IOERR` before the file is
//! touched), and one wake-up handles at most [`MAX_CHAINS_PER_EVENT`]
//! requests or about [`MAX_BYTES_PER_EVENT`] bytes of buffers, then re-arms
//! the queue eventfd and yields to the rest of the event loop.

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::num::Wrapping;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::activation::Activation;
use super::{
    ActivateContext, ActivateError, LogOnce, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

mod request;
#[cfg(test)]
mod tests;

use request::*;

/// Size of a sector, the unit of `sector` in requests and of `capacity`; a
/// power of two.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (`seg_max`): the queue size
/// less the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most data bytes in one descriptor of a request (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data bytes in one request: `seg_max` × `size_max`.
const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
// Used lengths of accepted requests fit a u32.
const _: () = assert!(MAX_REQUEST_BYTES < u32::MAX as u64);
/// Most requests handled per wake-up of the event handler before it yields
/// to the rest of the event loop (a full queue).
pub const MAX_CHAINS_PER_EVENT: usize = QUEUE_SIZE as usize;
/// Buffer bytes (the sum of the descriptor lengths of the requests handled)
/// after which a wake-up yields; the request crossing it is completed.
pub const MAX_BYTES_PER_EVENT: u64 = 64 << 20;
/// Most sectors one DISCARD segment may cover (`max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most segments in one DISCARD request (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one WRITE_ZEROES segment may cover.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Most segments in one WRITE_ZEROES request.
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
// Segments of either kind are parsed into one array of MAX_DISCARD_SEG.
const _: () = assert!(MAX_WRITE_ZEROES_SEG <= MAX_DISCARD_SEG);
/// Discard granularity offered to the driver, in sectors (4 KiB).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u64 = 16;
/// Size of one DISCARD / WRITE_ZEROES segment
/// (`struct virtio_blk_discard_write_zeroes`); a power of two.
const SEGMENT_LEN: u64 = 16;
/// Size of the bounce buffer data moves through.
const CHUNK: usize = 64 * 1024;
/// Bytes of the configuration space that are backed by fields (up to and
/// including `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// Most descriptors accepted in one chain (an indirect table can be longer
/// than the queue; the driver is not offered indirect descriptors anyway).
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// Rounds in a row that find requests announced but none to pop before the
/// avail ring is declared corrupt.
const MAX_IDLE_ROUNDS: u32 = 64;
/// Serial number length (`VIRTIO_BLK_ID_BYTES`).
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The image's size or identity could not be read.
    #[error("cannot inspect disk image {path}: {source}")]
    Inspect {
        /// The image path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(io::Error),
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    disk: Disk,
    activation: Activation<1>,
    broken: bool,
    queue_error: LogOnce,
}

impl Block {
    /// Opens the raw image at `path` (read-write, or read-only when
    /// `read_only`). The capacity is the file size in whole sectors; a
    /// trailing partial sector is not addressable.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let inspect = |source| BlockError::Inspect {
            path: path.to_path_buf(),
            source,
        };
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0)).map_err(inspect)?;
        let meta = file.metadata().map_err(inspect)?;
        let serial = make_serial(meta.dev(), meta.ino());
        Ok(Block {
            disk: Disk {
                file,
                capacity: size / SECTOR_SIZE,
                read_only,
                serial,
                bounce: vec![0; CHUNK],
                descs: Vec::with_capacity(MAX_CHAIN_DESCS + 1),
                guest_errors: std::array::from_fn(|_| LogOnce::new()),
                host_error: LogOnce::new(),
                ranged: 0,
            },
            activation: Activation::new(QUEUE_SIZE).map_err(BlockError::EventFd)?,
            broken: false,
            queue_error: LogOnce::new(),
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Whether the disk is read-only.
    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The 20-byte serial GET_ID returns (stable for a given file).
    pub fn serial(&self) -> &[u8; ID_LEN] {
        &self.disk.serial
    }

    /// The eventfd the device writes on activation (watched by its event
    /// handler).
    pub fn activate_evt(&self) -> &EventFd {
        self.activation.activate_evt()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put32 = |off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put32(8, SIZE_MAX);
        put32(12, SEG_MAX);
        put32(20, SECTOR_SIZE as u32);
        if !self.disk.read_only {
            put32(36, MAX_DISCARD_SECTORS);
            put32(40, MAX_DISCARD_SEG);
            put32(44, DISCARD_SECTOR_ALIGNMENT);
            put32(48, MAX_WRITE_ZEROES_SECTORS);
            put32(52, MAX_WRITE_ZEROES_SEG);
            c[56] = 1; // write_zeroes_may_unmap
        }
        c[0..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        c
    }

    /// Processes the available requests, up to [`MAX_CHAINS_PER_EVENT`] of
    /// them or until [`MAX_BYTES_PER_EVENT`] is crossed: a guest refilling
    /// the ring from another vCPU must not keep the event loop here. When
    /// the budget runs out the queue eventfd is written, so the event loop
    /// comes back after serving everything else; notifications stay
    /// disabled meanwhile (the device will look at the ring anyway).
    /// Returns whether used entries were added. Interrupts the guest when
    /// the queue asks for it.
    fn process_queue(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let Some((active, queue_evts)) = self.activation.active_with_events() else {
            return false;
        };
        let mut used_any = false;
        let mut failed = false;
        let mut idle_rounds = 0u32;
        let mut chains_left = MAX_CHAINS_PER_EVENT;
        let mut bytes_left = MAX_BYTES_PER_EVENT;
        loop {
            if let Err(e) = active.queues[0].disable_notification(&active.mem) {
                self.queue_error
                    .warn(format_args!("virtio-blk: queue unusable: {e}"));
                failed = true;
                break;
            }
            let mut popped = false;
            while chains_left > 0 && bytes_left > 0 {
                let Some(chain) = active.queues[0].pop_descriptor_chain(&active.mem) else {
                    break;
                };
                popped = true;
                chains_left -= 1;
                let head = chain.head_index();
                if head >= active.queues[0].size() {
                    // Nothing in the chain can be read and the head cannot go
                    // back in the used ring: drop it.
                    self.disk.log_guest(GuestError::BadHead);
                    continue;
                }
                let (len, bytes) = self.disk.handle_chain(&active.mem, chain);
                bytes_left = bytes_left.saturating_sub(bytes);
                if let Err(e) = active.queues[0].add_used(&active.mem, head, len) {
                    self.queue_error
                        .warn(format_args!("virtio-blk: cannot return a request: {e}"));
                    failed = true;
                    break;
                }
                used_any = true;
            }
            if failed {
                break;
            }
            if chains_left == 0 || bytes_left == 0 {
                // Yield. The write fails only when the counter is about to
                // overflow, that is when the eventfd is readable anyway.
                if let Err(e) = queue_evts[0].write(1) {
                    self.queue_error
                        .warn(format_args!("virtio-blk: cannot re-arm the queue: {e}"));
                }
                break;
            }
            match active.queues[0].enable_notification(&active.mem) {
                Ok(true) if popped => idle_rounds = 0,
                // More is available yet nothing was popped: either the driver
                // added requests in between (go round again), or the avail
                // ring is corrupt (an index further ahead than the queue is
                // long), which only a reset cures.
                Ok(true) => {
                    let ahead = active.queues[0]
                        .avail_idx(&active.mem, Ordering::Acquire)
                        .map(|idx| (idx - Wrapping(active.queues[0].next_avail())).0);
                    idle_rounds += 1;
                    if !matches!(ahead, Ok(n) if n <= active.queues[0].size())
                        || idle_rounds > MAX_IDLE_ROUNDS
                    {
                        self.queue_error
                            .warn(format_args!("virtio-blk: invalid available ring"));
                        failed = true;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    self.queue_error
                        .warn(format_args!("virtio-blk: queue unusable: {e}"));
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.broken = true;
        }
        let notify = used_any
            && active.queues[0]
                .needs_notification(&active.mem)
                .unwrap_or(true);
        if notify || failed {
            active.interrupt.signal_used_queue();
        }
        if failed {
            // Spec 2.1.2: DEVICE_NEEDS_RESET comes with a configuration
            // change notification.
            active.interrupt.signal_config_change();
        }
        used_any
    }
}

/// The GET_ID serial for a file: `ks<dev><ino>` in hex, NUL-padded or
/// truncated to 20 bytes.
fn make_serial(dev: u64, ino: u64) -> [u8; ID_LEN] {
    let s = format!("ks{dev:x}{ino:x}");
    let mut id = [0u8; ID_LEN];
    let n = s.len().min(ID_LEN);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.activation.queue_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.activation.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only (no CONFIG_WCE).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.broken = false;
        self.activation.activate(ctx)
    }

    fn reset(&mut self) {
        self.activation.reset();
        self.broken = false;
    }

    fn is_activated(&self) -> bool {
        self.activation.is_activated()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.activation.queue_states()
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops, "virtio-blk");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.activation.on_activate_event(fd, ops, "virtio-blk") {
            // The driver may have kicked before the eventfd was watched.
            self.process_queue();
        } else if self.activation.queue_of(fd) == Some(0) {
            let _ = self.activation.queue_evt(0).read();
            self.process_queue();
        } else {
            tracing::warn!("virtio-blk: event on unexpected fd {fd}");
        }
    }
}
