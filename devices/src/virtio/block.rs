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

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::activation::Activation;
use super::{
    ActivateContext, ActivateError, LogOnce, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

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

/// Classes of guest errors, each logged once.
#[derive(Debug, Clone, Copy)]
enum GuestError {
    /// The chain has no writable status byte at its end.
    NoStatus,
    /// The chain is longer than the device accepts.
    ChainTooLong,
    /// A device-readable descriptor follows a device-writable one.
    DescriptorOrder,
    /// Fewer than 16 device-readable bytes for the header.
    ShortHeader,
    /// A buffer lies (partly) outside guest memory.
    BadAddress,
    /// Data in the wrong direction for the request type.
    WrongDirection,
    /// Data length not a multiple of the sector size.
    UnalignedLength,
    /// The request reaches past the end of the disk.
    OutOfRange,
    /// A write-type request on a read-only disk.
    ReadOnly,
    /// A DISCARD / WRITE_ZEROES payload that is not a list of segments
    /// within the limits.
    BadSegments,
    /// A descriptor with more than `size_max` data bytes, or a request with
    /// more than `seg_max` × `size_max`.
    TooLarge,
    /// An avail ring entry names a descriptor beyond the queue.
    BadHead,
}

impl GuestError {
    /// `BadHead` is the last variant.
    const COUNT: usize = GuestError::BadHead as usize + 1;

    fn index(self) -> usize {
        self as usize
    }

    fn describe(self) -> &'static str {
        match self {
            GuestError::NoStatus => "request without a writable status byte",
            GuestError::ChainTooLong => "descriptor chain too long",
            GuestError::DescriptorOrder => "device-readable descriptor after a writable one",
            GuestError::ShortHeader => "request header shorter than 16 bytes",
            GuestError::BadAddress => "buffer outside guest memory",
            GuestError::WrongDirection => "data buffer in the wrong direction",
            GuestError::UnalignedLength => "data length not a multiple of 512",
            GuestError::OutOfRange => "request beyond the end of the disk",
            GuestError::ReadOnly => "write to a read-only disk",
            GuestError::BadSegments => "malformed discard/write-zeroes segments",
            GuestError::TooLarge => "request larger than size_max/seg_max allow",
            GuestError::BadHead => "avail ring entry beyond the queue (dropped)",
        }
    }
}

/// Why a request failed (its status becomes IOERR).
#[derive(Debug)]
enum ReqError {
    /// The guest sent something invalid.
    Guest(GuestError),
    /// The host file operation failed.
    Host(io::Error),
}

impl From<GuestError> for ReqError {
    fn from(e: GuestError) -> Self {
        ReqError::Guest(e)
    }
}

/// One descriptor of a chain, as the device needs it.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    writable: bool,
}

/// The access the device needs to a descriptor's buffer.
fn perm(d: &Desc) -> Permissions {
    if d.writable {
        Permissions::Write
    } else {
        Permissions::Read
    }
}

/// Calls `f(addr, len)` on each piece of guest memory that makes up bytes
/// Moves one guest piece (`len` bytes at `addr`) to or from the disk at
/// `*file_off` through `bounce`, [`CHUNK`] bytes at a time: `step` gets the
/// chunk buffer, its guest address and its disk offset. Advances
/// `*file_off`.
fn bounce_copy(
    bounce: &mut [u8],
    addr: GuestAddress,
    len: usize,
    file_off: &mut u64,
    mut step: impl FnMut(&mut [u8], GuestAddress, u64) -> Result<(), ReqError>,
) -> Result<(), ReqError> {
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(CHUNK);
        step(
            &mut bounce[..n],
            GuestAddress(addr.0 + done as u64),
            *file_off,
        )?;
        done += n;
        *file_off += n as u64;
    }
    Ok(())
}

/// `[start, start + len)` of the readable (or writable) stream of `descs`.
/// The caller has checked that the stream is long enough and that every
/// descriptor lies in guest memory.
fn for_each_piece<F>(
    descs: &[Desc],
    writable: bool,
    start: u64,
    len: u64,
    mut f: F,
) -> Result<(), ReqError>
where
    F: FnMut(GuestAddress, usize) -> Result<(), ReqError>,
{
    let end = start
        .checked_add(len)
        .ok_or(ReqError::Guest(GuestError::BadAddress))?;
    let mut pos = 0u64;
    for d in descs.iter().filter(|d| d.writable == writable) {
        if pos >= end {
            break;
        }
        let d_end = pos + u64::from(d.len);
        let lo = pos.max(start);
        let hi = d_end.min(end);
        if lo < hi {
            let addr = d
                .addr
                .checked_add(lo - pos)
                .ok_or(ReqError::Guest(GuestError::BadAddress))?;
            // `hi - lo` is at most a descriptor length, a u32.
            f(GuestAddress(addr), (hi - lo) as usize)?;
        }
        pos = d_end;
    }
    if pos < end {
        return Err(ReqError::Guest(GuestError::BadAddress));
    }
    Ok(())
}

/// Checks that no descriptor carries more than [`SIZE_MAX`] data bytes. The
/// header (the first 16 readable bytes) and the status byte (the last byte
/// of the chain) are not data: a descriptor may hold either besides
/// `size_max` bytes of data (spec 2.6.4 allows any framing).
fn check_segment_sizes(descs: &[Desc]) -> Result<(), ReqError> {
    let status_desc = descs.iter().rposition(|d| d.len > 0);
    let mut readable = 0u64;
    for (i, d) in descs.iter().enumerate() {
        let len = u64::from(d.len);
        let data = if d.writable {
            len - u64::from(Some(i) == status_desc)
        } else {
            let end = readable + len;
            let data = end.saturating_sub(readable.max(HEADER_LEN));
            readable = end;
            data
        };
        if data > u64::from(SIZE_MAX) {
            return Err(GuestError::TooLarge.into());
        }
    }
    Ok(())
}

/// A validated DISCARD / WRITE_ZEROES segment: a byte range of the disk.
#[derive(Debug, Clone, Copy, Default)]
struct Range {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// The disk and the request engine (everything but the queue).
struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
    serial: [u8; ID_LEN],
    bounce: Vec<u8>,
    descs: Vec<Desc>,
    guest_errors: [LogOnce; GuestError::COUNT],
    host_error: LogOnce,
}

impl Disk {
    fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }

    fn log_guest(&self, e: GuestError) {
        self.guest_errors[e.index()]
            .warn(format_args!("virtio-blk: guest error: {}", e.describe()));
    }

    /// Handles one chain. Returns the used length to report (bytes written
    /// into guest memory) and the sum of the lengths of the descriptors read
    /// (an upper bound on the data the request moved).
    fn handle_chain<I>(&mut self, mem: &GuestMemoryMmap, chain: I) -> (u32, u64)
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut descs = std::mem::take(&mut self.descs);
        descs.clear();
        descs.extend(chain.take(MAX_CHAIN_DESCS + 1).map(|d| Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        }));
        let used = self.handle_descs(mem, &descs);
        let bytes = descs.iter().map(|d| u64::from(d.len)).sum();
        self.descs = descs;
        (used, bytes)
    }

    fn handle_descs(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
        if descs.len() > MAX_CHAIN_DESCS {
            // Only a prefix was read: where the status byte is is unknown.
            self.log_guest(GuestError::ChainTooLong);
            return 0;
        }
        // The status byte is the last byte of the chain; it must be writable.
        let status_addr = match descs.iter().rev().find(|d| d.len > 0) {
            Some(d) if d.writable => d
                .addr
                .checked_add(u64::from(d.len) - 1)
                .map(GuestAddress)
                .filter(|a| mem.check_range(*a, 1, Permissions::Write)),
            _ => None,
        };
        let Some(status_addr) = status_addr else {
            self.log_guest(GuestError::NoStatus);
            return 0;
        };

        let (status, data_written) = match self.execute(mem, descs) {
            Ok(r) => r,
            Err(ReqError::Guest(e)) => {
                self.log_guest(e);
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
            Err(ReqError::Host(e)) => {
                self.host_error
                    .warn(format_args!("virtio-blk: disk image I/O failed: {e}"));
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            // Checked above; guest memory does not shrink under us.
            self.log_guest(GuestError::BadAddress);
            return data_written;
        }
        data_written.saturating_add(1)
    }

    /// Validates the chain layout and runs the request. Returns the status
    /// and the number of data bytes written into guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<(u8, u32), ReqError> {
        let mut readable = 0u64;
        let mut writable = 0u64;
        for d in descs {
            if d.len > 0 && !mem.check_range(GuestAddress(d.addr), d.len as usize, perm(d)) {
                return Err(GuestError::BadAddress.into());
            }
            // Sums of at most MAX_CHAIN_DESCS u32 values: no overflow.
            if d.writable {
                writable += u64::from(d.len);
            } else {
                if writable > 0 {
                    return Err(GuestError::DescriptorOrder.into());
                }
                readable += u64::from(d.len);
            }
        }
        if readable < HEADER_LEN {
            return Err(GuestError::ShortHeader.into());
        }
        // The status byte is the last writable byte (checked by the caller).
        let data_in = readable - HEADER_LEN;
        let data_out = writable - 1;
        if data_in + data_out > MAX_REQUEST_BYTES {
            return Err(GuestError::TooLarge.into());
        }
        check_segment_sizes(descs)?;

        let mut header = [0u8; HEADER_LEN as usize];
        let mut filled = 0usize;
        for_each_piece(descs, false, 0, HEADER_LEN, |addr, len| {
            mem.read_slice(&mut header[filled..filled + len], addr)
                .map_err(|_| ReqError::Guest(GuestError::BadAddress))?;
            filled += len;
            Ok(())
        })?;
        let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        match req_type {
            VIRTIO_BLK_T_IN => {
                if data_in != 0 {
                    return Err(GuestError::WrongDirection.into());
                }
                let offset = self.check_io(sector, data_out)?;
                self.read_into_guest(mem, descs, offset, data_out)?;
                // Never clamps: data_out <= MAX_REQUEST_BYTES < 4 GiB (checked
                // above).
                Ok((
                    VIRTIO_BLK_S_OK as u8,
                    u32::try_from(data_out).unwrap_or(u32::MAX),
                ))
            }
            VIRTIO_BLK_T_OUT => {
                if data_out != 0 {
                    return Err(GuestError::WrongDirection.into());
                }
                if self.read_only {
                    return Err(GuestError::ReadOnly.into());
                }
                let offset = self.check_io(sector, data_in)?;
                self.write_from_guest(mem, descs, offset, data_in)?;
                Ok((VIRTIO_BLK_S_OK as u8, 0))
            }
            VIRTIO_BLK_T_FLUSH => {
                if data_in != 0 || data_out != 0 {
                    return Err(GuestError::WrongDirection.into());
                }
                self.file.sync_data().map_err(ReqError::Host)?;
                Ok((VIRTIO_BLK_S_OK as u8, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_in != 0 || data_out == 0 {
                    return Err(GuestError::WrongDirection.into());
                }
                let n = data_out.min(ID_LEN as u64);
                let mut done = 0usize;
                let serial = self.serial;
                for_each_piece(descs, true, 0, n, |addr, len| {
                    mem.write_slice(&serial[done..done + len], addr)
                        .map_err(|_| ReqError::Guest(GuestError::BadAddress))?;
                    done += len;
                    Ok(())
                })?;
                Ok((VIRTIO_BLK_S_OK as u8, n as u32))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !self.read_only => {
                if data_out != 0 {
                    return Err(GuestError::WrongDirection.into());
                }
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let mut ranges = [Range::default(); MAX_DISCARD_SEG as usize];
                let count = match self.parse_segments(mem, descs, data_in, discard, &mut ranges)? {
                    Some(count) => count,
                    None => return Ok((VIRTIO_BLK_S_UNSUPP as u8, 0)),
                };
                for r in &ranges[..count] {
                    if discard {
                        self.discard(r)?;
                    } else {
                        self.write_zeroes(r)?;
                    }
                }
                Ok((VIRTIO_BLK_S_OK as u8, 0))
            }
            _ => Ok((VIRTIO_BLK_S_UNSUPP as u8, 0)),
        }
    }

    /// Checks a read or write of `len` bytes at `sector` and returns its
    /// byte offset in the file.
    fn check_io(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(GuestError::UnalignedLength.into());
        }
        self.check_range(sector, len)
    }

    /// Checks that `len` bytes at `sector` lie on the disk; returns the byte
    /// offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ReqError::Guest(GuestError::OutOfRange))?;
        let end = offset
            .checked_add(len)
            .ok_or(ReqError::Guest(GuestError::OutOfRange))?;
        if end > self.capacity_bytes() {
            return Err(GuestError::OutOfRange.into());
        }
        Ok(offset)
    }

    fn read_into_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Desc],
        offset: u64,
        len: u64,
    ) -> Result<(), ReqError> {
        let file = &self.file;
        let mut file_off = offset;
        for_each_piece(descs, true, 0, len, |addr, len| {
            bounce_copy(
                &mut self.bounce,
                addr,
                len,
                &mut file_off,
                |buf, gaddr, off| {
                    file.read_exact_at(buf, off).map_err(ReqError::Host)?;
                    mem.write_slice(buf, gaddr)
                        .map_err(|_| ReqError::Guest(GuestError::BadAddress))
                },
            )
        })
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Desc],
        offset: u64,
        len: u64,
    ) -> Result<(), ReqError> {
        let file = &self.file;
        let mut file_off = offset;
        for_each_piece(descs, false, HEADER_LEN, len, |addr, len| {
            bounce_copy(
                &mut self.bounce,
                addr,
                len,
                &mut file_off,
                |buf, gaddr, off| {
                    mem.read_slice(buf, gaddr)
                        .map_err(|_| ReqError::Guest(GuestError::BadAddress))?;
                    file.write_all_at(buf, off).map_err(ReqError::Host)
                },
            )
        })
    }

    /// Reads and validates the segments of a DISCARD / WRITE_ZEROES request
    /// into `ranges`. Returns the segment count, or `None` when a flag asks
    /// for something unsupported.
    fn parse_segments(
        &self,
        mem: &GuestMemoryMmap,
        descs: &[Desc],
        data_len: u64,
        discard: bool,
        ranges: &mut [Range; MAX_DISCARD_SEG as usize],
    ) -> Result<Option<usize>, ReqError> {
        let (max_seg, max_sectors) = if discard {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        } else {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        };
        if data_len == 0
            || data_len & (SEGMENT_LEN - 1) != 0
            || data_len / SEGMENT_LEN > u64::from(max_seg)
        {
            return Err(GuestError::BadSegments.into());
        }
        let count = (data_len / SEGMENT_LEN) as usize;
        let mut unsupported = false;
        for (i, range) in ranges.iter_mut().take(count).enumerate() {
            let mut raw = [0u8; SEGMENT_LEN as usize];
            let mut filled = 0usize;
            let start = HEADER_LEN + i as u64 * SEGMENT_LEN;
            for_each_piece(descs, false, start, SEGMENT_LEN, |addr, len| {
                mem.read_slice(&mut raw[filled..filled + len], addr)
                    .map_err(|_| ReqError::Guest(GuestError::BadAddress))?;
                filled += len;
                Ok(())
            })?;
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(sector);
            let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            // Spec 5.2.6.2: the unmap flag is meaningless for DISCARD and an
            // unknown flag is unsupported.
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                unsupported = true;
            }
            if num_sectors > max_sectors {
                return Err(GuestError::BadSegments.into());
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = self.check_range(sector, len)?;
            *range = Range {
                offset,
                len,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            };
        }
        Ok(if unsupported { None } else { Some(count) })
    }

    /// Deallocates a range (a hint: where the filesystem cannot punch holes
    /// the data simply stays).
    fn discard(&self, r: &Range) -> Result<(), ReqError> {
        match fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            r,
        ) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => Ok(()),
            Err(e) => Err(ReqError::Host(e)),
        }
    }

    /// Zeroes a range: a hole where unmapping is allowed, else zeroed
    /// allocated blocks, else (filesystem without either) written zeros.
    fn write_zeroes(&mut self, r: &Range) -> Result<(), ReqError> {
        let mode = if r.unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, r) {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(ReqError::Host(e)),
        }
        let n = CHUNK.min(usize::try_from(r.len).unwrap_or(CHUNK));
        self.bounce[..n].fill(0);
        let mut done = 0u64;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64) as usize;
            self.file
                .write_all_at(&self.bounce[..n], r.offset + done)
                .map_err(ReqError::Host)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// `fallocate(2)` on `r`'s range of `file`.
fn fallocate(file: &File, mode: libc::c_int, r: &Range) -> io::Result<()> {
    if r.len == 0 {
        return Ok(());
    }
    // Ranges are checked against the capacity, itself a file size, so they
    // fit an off_t.
    let offset =
        libc::off_t::try_from(r.offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len =
        libc::off_t::try_from(r.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate takes no pointers; `file` keeps the descriptor open
    // for the duration of the call.
    let ret = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
            let n = NEXT_IMAGE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("keystone-blk-{}-{n}.img", std::process::id()));
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
        let looped =
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0));
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
            got[range.clone()] == expected[range.clone()]
                || got[range.clone()].iter().all(|&b| b == 0)
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
}
