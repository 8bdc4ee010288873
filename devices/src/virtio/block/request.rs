//! virtio-blk requests: the descriptor chain walked (header, data, status
//! byte), checked and carried out on the image file ([`Disk`]), each class
//! of guest error logged once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

// The limits and sizes of the request format, and `LogOnce`.
use super::*;

/// Classes of guest errors, each logged once.
#[derive(Debug, Clone, Copy)]
pub(super) enum GuestError {
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

    pub(super) fn index(self) -> usize {
        self as usize
    }

    pub(super) fn describe(self) -> &'static str {
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
pub(super) enum ReqError {
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
pub(super) struct Desc {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) writable: bool,
}

/// The access the device needs to a descriptor's buffer.
pub(super) fn perm(d: &Desc) -> Permissions {
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
pub(super) fn bounce_copy(
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
pub(super) fn for_each_piece<F>(
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
pub(super) fn check_segment_sizes(descs: &[Desc]) -> Result<(), ReqError> {
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
pub(super) struct Range {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) unmap: bool,
}

/// The disk and the request engine (everything but the queue).
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) capacity: u64,
    pub(super) read_only: bool,
    pub(super) serial: [u8; ID_LEN],
    pub(super) bounce: Vec<u8>,
    pub(super) descs: Vec<Desc>,
    pub(super) guest_errors: [LogOnce; GuestError::COUNT],
    pub(super) host_error: LogOnce,
    /// Bytes of disk the request being handled discarded or zeroed: the
    /// host's work for a DISCARD / WRITE_ZEROES is its ranges, not its
    /// few descriptor bytes, so the wake-up budget counts them.
    pub(super) ranged: u64,
}

impl Disk {
    pub(super) fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }

    pub(super) fn log_guest(&self, e: GuestError) {
        self.guest_errors[e.index()]
            .warn(format_args!("virtio-blk: guest error: {}", e.describe()));
    }

    /// Handles one chain. Returns the used length to report (bytes written
    /// into guest memory) and the work done in bytes for the wake-up budget:
    /// the sum of the lengths of the descriptors read (an upper bound on the
    /// data the request moved) plus the disk ranges it discarded or zeroed.
    pub(super) fn handle_chain<I>(&mut self, mem: &GuestMemoryMmap, chain: I) -> (u32, u64)
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
        self.ranged = 0;
        let used = self.handle_descs(mem, &descs);
        let bytes = descs
            .iter()
            .map(|d| u64::from(d.len))
            .sum::<u64>()
            .saturating_add(self.ranged);
        self.descs = descs;
        (used, bytes)
    }

    pub(super) fn handle_descs(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
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
    pub(super) fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        descs: &[Desc],
    ) -> Result<(u8, u32), ReqError> {
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
                    // Counted before the call: a failing range was work too.
                    self.ranged = self.ranged.saturating_add(r.len);
                    if discard {
                        self.discard(r)?;
                    } else if !self.write_zeroes(r)? {
                        return Ok((VIRTIO_BLK_S_UNSUPP as u8, 0));
                    }
                }
                Ok((VIRTIO_BLK_S_OK as u8, 0))
            }
            _ => Ok((VIRTIO_BLK_S_UNSUPP as u8, 0)),
        }
    }

    /// Checks a read or write of `len` bytes at `sector` and returns its
    /// byte offset in the file.
    pub(super) fn check_io(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(GuestError::UnalignedLength.into());
        }
        self.check_range(sector, len)
    }

    /// Checks that `len` bytes at `sector` lie on the disk; returns the byte
    /// offset.
    pub(super) fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
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

    pub(super) fn read_into_guest(
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

    pub(super) fn write_from_guest(
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
    pub(super) fn parse_segments(
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
    pub(super) fn discard(&self, r: &Range) -> Result<(), ReqError> {
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
    /// allocated blocks, else (a filesystem without `FALLOC_FL_ZERO_RANGE`,
    /// tmpfs for one) a hole, which the device may make
    /// (`write_zeroes_may_unmap`). Returns `false` when the filesystem can do
    /// neither: the request is then unsupported and Linux zeroes with plain
    /// writes, which the wake-up budget bounds. Writing the zeros here
    /// instead would let one request of 32 overlapping 2 GiB segments keep
    /// the VMM thread writing 64 GiB.
    pub(super) fn write_zeroes(&mut self, r: &Range) -> Result<bool, ReqError> {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !r.unmap {
            match fallocate(
                &self.file,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                r,
            ) {
                Ok(()) => return Ok(true),
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(ReqError::Host(e)),
            }
        }
        match fallocate(&self.file, punch, r) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(ReqError::Host(e)),
        }
    }
}

pub(super) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// `fallocate(2)` on `r`'s range of `file`.
pub(super) fn fallocate(file: &File, mode: libc::c_int, r: &Range) -> io::Result<()> {
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
