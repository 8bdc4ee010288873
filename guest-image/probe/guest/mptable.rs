//! Reader for the Intel MultiProcessor Specification 1.4 tables the VMM
//! writes (floating pointer structure + configuration table).

/// Where the floating pointer is searched, on 16-byte boundaries: the first
/// KiB of the EBDA (the VMM puts it at 0x9fc00), then the BIOS ROM area.
const SEARCH_RANGES: [(u64, u64); 2] = [(0x9_fc00, 0xa_0000), (0xf_0000, 0x10_0000)];

/// Floating pointer signature "_MP_".
const FLOATING_SIGNATURE: [u8; 4] = *b"_MP_";
/// Configuration table signature "PCMP".
const CONFIG_SIGNATURE: [u8; 4] = *b"PCMP";
/// Size of the configuration table header; entries follow it.
const CONFIG_HEADER_LEN: u64 = 44;

/// Entry type 0: processor (20 bytes).
const ENTRY_PROCESSOR: u8 = 0;
/// Entry type 1: bus (8 bytes).
const ENTRY_BUS: u8 = 1;
/// Entry type 2: I/O APIC (8 bytes).
const ENTRY_IOAPIC: u8 = 2;
/// Entry type 3: I/O interrupt assignment (8 bytes).
const ENTRY_IO_INTERRUPT: u8 = 3;
/// Entry type 4: local interrupt assignment (8 bytes).
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Size of a processor entry.
const PROCESSOR_ENTRY_LEN: u64 = 20;
/// Size of every other base-table entry.
const OTHER_ENTRY_LEN: u64 = 8;

/// Processor entry `cpu_flags` bit 0: the processor is usable.
const CPU_ENABLED: u8 = 0x01;
/// Processor entry `cpu_flags` bit 1: this is the bootstrap processor.
const CPU_BOOTPROCESSOR: u8 = 0x02;
/// I/O APIC entry `flags` bit 0: the I/O APIC is usable.
const IOAPIC_ENABLED: u8 = 0x01;

/// Why the MP table could not be used. [`MpError::as_str`] is what the probe
/// prints after `probe: mptable error: `.
pub enum MpError {
    NotFound,
    FloatingChecksum,
    NoConfigTable,
    ConfigSignature,
    ConfigChecksum,
    ExtendedChecksum,
    BadEntry,
}

impl MpError {
    pub fn as_str(&self) -> &'static str {
        match self {
            MpError::NotFound => "floating pointer not found",
            MpError::FloatingChecksum => "bad floating pointer checksum",
            MpError::NoConfigTable => "no configuration table",
            MpError::ConfigSignature => "bad configuration table signature",
            MpError::ConfigChecksum => "bad configuration table checksum",
            MpError::ExtendedChecksum => "bad extended table checksum",
            MpError::BadEntry => "bad configuration table entry",
        }
    }
}

/// A validated MP configuration table (entries are read on demand, so no
/// buffers are needed: see `main.rs` on why the probe avoids zeroing arrays).
pub struct MpTable {
    /// Address of the first entry.
    entries: u64,
    /// Number of base-table entries.
    count: u16,
}

/// One enabled processor entry.
pub struct Processor {
    /// Its local APIC id.
    pub apic_id: u8,
    /// Flagged as the bootstrap processor.
    pub is_bsp: bool,
}

fn read8(addr: u64) -> u8 {
    // SAFETY: the MP table areas (EBDA, BIOS ROM area, and the configuration
    // table the VMM points at) are in the identity-mapped low 4 GiB; reading
    // them has no side effects.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read16(addr: u64) -> u16 {
    u16::from(read8(addr)) | u16::from(read8(addr + 1)) << 8
}

fn read32(addr: u64) -> u32 {
    u32::from(read16(addr)) | u32::from(read16(addr + 2)) << 16
}

/// Sum of `len` bytes at `addr`, modulo 256.
fn checksum(addr: u64, len: u64) -> u8 {
    let mut sum = 0u8;
    for i in 0..len {
        sum = sum.wrapping_add(read8(addr + i));
    }
    sum
}

fn signature_at(addr: u64, signature: &[u8; 4]) -> bool {
    (0..4).all(|i| read8(addr + i as u64) == signature[i])
}

/// Finds the floating pointer structure; returns its address.
fn find_floating_pointer() -> Option<u64> {
    for &(start, end) in SEARCH_RANGES.iter() {
        let mut addr = start;
        while addr + 16 <= end {
            if signature_at(addr, &FLOATING_SIGNATURE) {
                return Some(addr);
            }
            addr += 16;
        }
    }
    None
}

/// Locates and validates the MP table (checksums, signatures, and that
/// every base-table entry has a known type and fits in the table).
pub fn find() -> Result<MpTable, MpError> {
    let fp = find_floating_pointer().ok_or(MpError::NotFound)?;
    // Floating pointer: 0 signature, 4 config table address (u32),
    // 8 length in 16-byte units, 9 spec revision, 10 checksum, 11.. features.
    let fp_len = u64::from(read8(fp + 8)) * 16;
    if fp_len == 0 || checksum(fp, fp_len) != 0 {
        return Err(MpError::FloatingChecksum);
    }
    let table = u64::from(read32(fp + 4));
    if table == 0 {
        // A zero address with feature byte 1 != 0 would mean "default
        // configuration", which the VMM never uses.
        return Err(MpError::NoConfigTable);
    }
    // Configuration table header: 0 signature, 4 base table length (u16),
    // 6 spec revision, 7 checksum, 8 OEM id, 16 product id, 28 OEM table,
    // 32 OEM table size, 34 entry count (u16), 36 local APIC address,
    // 40 extended table length (u16), 42 extended table checksum.
    if !signature_at(table, &CONFIG_SIGNATURE) {
        return Err(MpError::ConfigSignature);
    }
    let base_len = u64::from(read16(table + 4));
    if base_len < CONFIG_HEADER_LEN || checksum(table, base_len) != 0 {
        return Err(MpError::ConfigChecksum);
    }
    let ext_len = u64::from(read16(table + 40));
    let ext_sum = checksum(table + base_len, ext_len).wrapping_add(read8(table + 42));
    if ext_len != 0 && ext_sum != 0 {
        return Err(MpError::ExtendedChecksum);
    }
    let mp = MpTable {
        entries: table + CONFIG_HEADER_LEN,
        count: read16(table + 34),
    };
    let mut end = mp.entries;
    for entry in mp.entries() {
        let entry = entry.ok_or(MpError::BadEntry)?;
        end = entry + entry_len(read8(entry));
    }
    if end > table + base_len {
        return Err(MpError::BadEntry);
    }
    Ok(mp)
}

/// Length of a base-table entry of type `kind` (0 for an unknown type).
fn entry_len(kind: u8) -> u64 {
    match kind {
        ENTRY_PROCESSOR => PROCESSOR_ENTRY_LEN,
        ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => OTHER_ENTRY_LEN,
        _ => 0,
    }
}

impl MpTable {
    /// Addresses of the base-table entries; `None` (once, last) for an entry
    /// of unknown type, after which the rest cannot be located.
    fn entries(&self) -> impl Iterator<Item = Option<u64>> {
        let mut addr = self.entries;
        let mut left = self.count;
        core::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let len = entry_len(read8(addr));
            if len == 0 {
                left = 0;
                return Some(None);
            }
            left -= 1;
            let entry = addr;
            addr += len;
            Some(Some(entry))
        })
    }

    /// The enabled processors, in table order.
    pub fn processors(&self) -> impl Iterator<Item = Processor> {
        // Processor entry: 0 type, 1 local APIC id, 2 local APIC version,
        // 3 cpu flags.
        self.entries()
            .map_while(|entry| entry)
            .filter(|&entry| read8(entry) == ENTRY_PROCESSOR && read8(entry + 3) & CPU_ENABLED != 0)
            .map(|entry| Processor {
                apic_id: read8(entry + 1),
                is_bsp: read8(entry + 3) & CPU_BOOTPROCESSOR != 0,
            })
    }

    /// Address of the first enabled I/O APIC, or 0 if there is none.
    pub fn ioapic(&self) -> u64 {
        // I/O APIC entry: 0 type, 1 id, 2 version, 3 flags, 4 address (u32).
        self.entries()
            .map_while(|entry| entry)
            .find(|&entry| read8(entry) == ENTRY_IOAPIC && read8(entry + 3) & IOAPIC_ENABLED != 0)
            .map_or(0, |entry| u64::from(read32(entry + 4)))
    }
}
