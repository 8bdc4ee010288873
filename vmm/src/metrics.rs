//! The VMM's own memory cost: peak RSS of the process minus the guest RAM
//! the guest actually touched (what Firecracker calls VMM overhead).

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Memory figures, KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Peak resident set of the VMM process (VmHWM).
    pub peak_rss_kib: u64,
    /// Resident guest RAM now.
    pub guest_rss_kib: u64,
}

impl MemoryUsage {
    /// Peak RSS not explained by guest RAM.
    pub fn overhead_kib(&self) -> u64 {
        self.peak_rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Sum the `Rss:` of the mappings in `smaps` that start at one of `starts`.
fn guest_rss_from_smaps(smaps: &str, starts: &[u64]) -> u64 {
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, _hi)) = first.split_once('-') {
            if let Ok(start) = u64::from_str_radix(lo, 16) {
                in_guest = starts.contains(&start);
                continue;
            }
        }
        if in_guest {
            if let Some(kib) = kib_field(line, "Rss:") {
                total += kib;
            }
        }
    }
    total
}

/// /proc/self/status and /proc/self/smaps, opened before the seccomp filter
/// (which has no `openat`) and re-read from the start when measuring.
pub struct ProcFiles {
    status: std::fs::File,
    smaps: std::fs::File,
}

impl ProcFiles {
    /// Open both files (`None` if /proc is not mounted).
    pub fn open() -> Option<Self> {
        Some(ProcFiles {
            status: std::fs::File::open("/proc/self/status").ok()?,
            smaps: std::fs::File::open("/proc/self/smaps").ok()?,
        })
    }
}

fn reread(f: &mut std::fs::File) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(0)).ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok()?;
    Some(s)
}

/// Measure now. `None` if /proc cannot be read.
pub fn memory_usage(proc_files: &mut ProcFiles, mem: &GuestMemoryMmap) -> Option<MemoryUsage> {
    let status = reread(&mut proc_files.status)?;
    let peak_rss_kib = kib_field(&status, "VmHWM:")?;
    let smaps = reread(&mut proc_files.smaps)?;
    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
        .map(|p| p as u64)
        .collect();
    Some(MemoryUsage {
        peak_rss_kib,
        guest_rss_kib: guest_rss_from_smaps(&smaps, &starts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn parses_smaps_for_guest_regions_only() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 200 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                  50 kB
";
        assert_eq!(guest_rss_from_smaps(smaps, &[0x7f00_0000_0000]), 200);
        assert_eq!(guest_rss_from_smaps(smaps, &[]), 0);
    }

    #[test]
    fn touched_guest_pages_count_as_guest() {
        let mem = crate::memory::create_guest_memory(256 << 20).unwrap();
        let mut files = ProcFiles::open().unwrap();
        let before = memory_usage(&mut files, &mem).unwrap();
        for page in 0..256u64 {
            mem.write_obj(1u8, GuestAddress(page * 4096)).unwrap();
        }
        let after = memory_usage(&mut files, &mem).unwrap();
        assert!(
            after.guest_rss_kib >= before.guest_rss_kib + 1000,
            "{before:?} {after:?}"
        );
        assert!(after.peak_rss_kib >= after.guest_rss_kib);
    }
}
