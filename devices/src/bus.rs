//! Address buses: port I/O and MMIO exits are routed to the device that owns
//! the address range.
//!
//! Ranges are fixed when the VM is built and never overlap. A guest access to
//! an address nobody owns is not an error for the VMM: reads return all ones
//! (what a floating ISA bus returns) and writes are dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device attached to a [`Bus`].
///
/// `offset` is relative to the start of the range the device was inserted at;
/// `data` is the access, 1 to 8 bytes as the guest made it. Implementations
/// must treat every offset and length as guest-controlled.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero was given.
    #[error("bus range at {base:#x} has length zero")]
    EmptyRange {
        /// Start of the range.
        base: u64,
    },
    /// The range wraps around the end of the address space.
    #[error("bus range at {base:#x} with length {len:#x} overflows")]
    Overflow {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by the first address of each range.
    entries: BTreeMap<u64, BusEntry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        // The closest range starting at or below `last` is the only one that
        // can overlap, since ranges on the bus never overlap each other.
        if let Some((&other_base, other)) = self.entries.range(..=last).next_back() {
            if other_base + (other.len - 1) >= base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.entries.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, access_len: usize) -> Option<(u64, &BusEntry)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        let end = offset.checked_add(access_len as u64)?;
        (end <= entry.len).then_some((offset, entry))
    }

    /// Route a guest read. Returns false when no device owns the address; the
    /// buffer is then filled with all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Route a guest write. Returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, recovering from a poisoned lock: a panic in one vCPU thread
/// must not take every later access down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x3f0, 9),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x3ff, 1),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        bus.insert(dev.clone(), 0x400, 1).unwrap();
        bus.insert(dev.clone(), 0x3f7, 1).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 5, 0),
            Err(BusError::EmptyRange { base: 5 })
        );

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![7])]);
    }

    #[test]
    fn unowned_and_straddling_accesses_are_not_routed() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        let mut b = [0u8; 4];
        // Straddles the end of the range.
        assert!(!bus.read(0x100e, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x100e, &[1, 2, 3, 4]));
        // Below and above.
        assert!(!bus.read(0xfff, &mut b[..1]));
        assert!(!bus.write(0x1010, &[1]));
        // Near the top of the address space.
        assert!(!bus.read(u64::MAX, &mut b));
        assert!(dev.lock().unwrap().writes.is_empty());
    }
}
