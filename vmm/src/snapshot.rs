//! Snapshots: a paused VM written as two files in one directory, and read
//! back by `keystone-vmm --restore DIR`.
//!
//! | file | what |
//! |---|---|
//! | `state.json` | [`VmState`]: format version, memory size, every vCPU's KVM state, the in-kernel irqchip, PIT and clock, the UART and each virtio-mmio transport with its queues |
//! | `memory` | guest RAM, region after region, sparse (all-zero pages are holes) |
//!
//! Both are written under temporary names and renamed into place, state
//! last, so a directory holds a whole snapshot or the previous one. On
//! restore the memory file is mapped `MAP_PRIVATE`: pages load on first
//! touch and stay shared with every other VM restored from the same file
//! until one writes them. A state file of another format version, one that
//! does not parse, or a memory file of the wrong size is refused before
//! any guest code runs.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use keystone_devices::serial::SerialSnapshot;
use keystone_devices::virtio::mmio::TransportState;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_ranges;

/// The state file's format version; any other is refused.
pub const SNAPSHOT_VERSION: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file read (a few vCPUs' XSAVE areas as JSON are ~100 KiB).
const STATE_FILE_MAX: u64 = 16 << 20;
const PAGE: usize = 4096;

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state file does not parse (truncated, or not a snapshot).
    #[error("snapshot {path}: not a valid state file: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message.
        reason: String,
    },
    /// The state file is of another format version.
    #[error("snapshot {path}: format version {found}, this keystone-vmm reads version {SNAPSHOT_VERSION} (written by keystone-vmm {writer})")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The keystone-vmm version that wrote it.
        writer: String,
    },
    /// The memory file's size is not the state's memory size.
    #[error("snapshot {path}: {found} bytes, the state says {expected} (truncated, or from another snapshot)")]
    MemorySize {
        /// The file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// What the state says.
        expected: u64,
    },
    /// The VM given on the command line does not match the snapshot's.
    #[error("--restore {dir}: {reason}")]
    Mismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Guest memory could not be read or mapped.
    #[error("snapshot memory: {0}")]
    Memory(String),
    /// A KVM call saving or restoring state failed.
    #[error("snapshot: KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A device's state could not be put back.
    #[error("snapshot: {0}")]
    Device(String),
}

/// One vCPU's KVM state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE, AVX... (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            cpuid: self.cpuid.clone(),
            msrs: self.msrs.clone(),
            regs: self.regs,
            sregs: self.sregs,
            // The legacy 4 KiB area: its flexible tail is empty.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            mp_state: self.mp_state,
            events: self.events,
        }
    }
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Our devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The UART.
    pub serial: SerialSnapshot,
    /// Whether the boot timer was present.
    pub boot_timer: bool,
    /// Each virtio-mmio transport, in window order.
    pub virtio: Vec<TransportState>,
}

/// Everything `state.json` holds.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The keystone-vmm that wrote it.
    pub vmm_version: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// One per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT, clock.
    pub vm: KvmVmState,
    /// Our devices.
    pub devices: DeviceStates,
}

/// A snapshot read back: its state, and its memory file open.
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// The state.
    pub state: VmState,
    /// The memory file, checked to be the state's size.
    pub memory: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read and check the snapshot in `dir`.
pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let mut text = String::new();
    File::open(&state_path)
        .map_err(io(&state_path))?
        .take(STATE_FILE_MAX)
        .read_to_string(&mut text)
        .map_err(io(&state_path))?;
    // The version first, so another version's layout is named as such
    // rather than as a parse error.
    #[derive(Deserialize)]
    struct Header {
        version: u32,
        #[serde(default)]
        vmm_version: String,
    }
    let parse = |e: serde_json::Error| SnapshotError::Parse {
        path: state_path.clone(),
        reason: e.to_string(),
    };
    let header: Header = serde_json::from_str(&text).map_err(parse)?;
    if header.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version {
            path: state_path,
            found: header.version,
            writer: header.vmm_version,
        });
    }
    let state: VmState = serde_json::from_str(&text).map_err(parse)?;
    if state.vcpus.is_empty() {
        return Err(SnapshotError::Parse {
            path: state_path,
            reason: "no vCPUs".into(),
        });
    }
    let mem_path = dir.join(MEMORY_FILE);
    let memory = File::open(&mem_path).map_err(io(&mem_path))?;
    let found = memory.metadata().map_err(io(&mem_path))?.len();
    let expected = state.memory_mib << 20;
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            found,
            expected,
        });
    }
    Ok(Snapshot {
        dir: dir.to_path_buf(),
        state,
        memory,
    })
}

/// Guest RAM mapped from a snapshot's memory file, copy-on-write.
pub fn map_memory(snap: &Snapshot) -> Result<GuestMemoryMmap, SnapshotError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(snap.state.memory_mib << 20) {
        let file = snap
            .memory
            .try_clone()
            .map_err(|e| SnapshotError::Memory(e.to_string()))?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Memory(format!("mmap: {e}")))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| SnapshotError::Memory("region layout".into()))?,
        );
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Memory(e.to_string()))
}

/// Where snapshots are written: a directory opened at start (before the
/// jail and the filters), written through its descriptor, so a jailed VMM
/// writes there too and the VMM thread needs no path lookups outside it.
pub struct SnapshotDir {
    path: PathBuf,
    fd: OwnedFd,
}

impl SnapshotDir {
    /// Open `path`, which must be a directory.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let dir = File::open(path)?;
        if !dir.metadata()?.is_dir() {
            return Err(std::io::Error::other("not a directory"));
        }
        Ok(SnapshotDir {
            path: path.to_path_buf(),
            fd: OwnedFd::from(dir),
        })
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its descriptor (the VMM thread's filter allows `openat`/`renameat`
    /// on it only).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn create(&self, name: &str) -> Result<File, SnapshotError> {
        let c = std::ffi::CString::new(name).map_err(|e| SnapshotError::Memory(e.to_string()))?;
        // SAFETY: openat(2) on our open directory descriptor with a
        // NUL-terminated name; the returned descriptor (checked) is owned by
        // the File from here on.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io(&self.path.join(name))(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by openat and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), SnapshotError> {
        let (f, t) = (
            std::ffi::CString::new(from).map_err(|e| SnapshotError::Memory(e.to_string()))?,
            std::ffi::CString::new(to).map_err(|e| SnapshotError::Memory(e.to_string()))?,
        );
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat(2) within our open directory, NUL-terminated names.
        if unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) } != 0 {
            return Err(io(&self.path.join(to))(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Write `state` and `mem` into the directory (temporary names, then
    /// renamed: memory first, state last). Returns the bytes of guest
    /// memory actually stored (all-zero pages are holes).
    pub fn write(&self, state: &VmState, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
        let mem_tmp = ".memory.tmp";
        let state_tmp = ".state.json.tmp";
        let file = self.create(mem_tmp)?;
        let stored = write_memory(&file, mem).map_err(io(&self.path.join(mem_tmp)))?;
        file.sync_data().map_err(io(&self.path.join(mem_tmp)))?;
        drop(file);
        let json = serde_json::to_vec(state).map_err(|e| SnapshotError::Device(e.to_string()))?;
        let file = self.create(state_tmp)?;
        file.write_all_at(&json, 0)
            .and_then(|()| file.sync_data())
            .map_err(io(&self.path.join(state_tmp)))?;
        drop(file);
        self.rename(mem_tmp, MEMORY_FILE)?;
        self.rename(state_tmp, STATE_FILE)?;
        Ok(stored)
    }
}

/// Guest RAM into `file`, region after region; all-zero pages are left as
/// holes. Returns the bytes written.
fn write_memory(file: &File, mem: &GuestMemoryMmap) -> std::io::Result<u64> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    let mut stored = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // Runs of non-zero pages, each one write.
            let mut i = 0;
            while i < n {
                let end = (i + PAGE).min(n);
                if chunk[i..end].iter().all(|&b| b == 0) {
                    i = end;
                    continue;
                }
                let mut j = end;
                while j < n {
                    let e = (j + PAGE).min(n);
                    if chunk[j..e].iter().all(|&b| b == 0) {
                        break;
                    }
                    j = e;
                }
                file.write_all_at(&chunk[i..j], file_off + done + i as u64)?;
                stored += (j - i) as u64;
                i = j;
            }
            done += n as u64;
        }
        file_off += len;
    }
    file.set_len(file_off)?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn dummy_state(memory_mib: u64) -> VmState {
        VmState {
            version: SNAPSHOT_VERSION,
            vmm_version: "test".into(),
            memory_mib,
            vcpus: vec![VcpuState {
                cpuid: vec![],
                msrs: vec![kvm_msr_entry {
                    index: 0x10,
                    data: 77,
                    ..Default::default()
                }],
                regs: kvm_regs {
                    rip: 0x1234,
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                mp_state: Default::default(),
                events: Default::default(),
            }],
            vm: KvmVmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: DeviceStates {
                serial: Default::default(),
                boot_timer: false,
                virtio: vec![],
            },
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ks-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_written_snapshot_reads_back_and_maps_its_memory_copy_on_write() {
        let dir = tmpdir("rw");
        let mem = create_guest_memory(128 << 20).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((128 << 20) - 1)).unwrap();
        let out = SnapshotDir::open(&dir).unwrap();
        let stored = out.write(&dummy_state(128), &mem).unwrap();
        assert_eq!(stored, 2 * PAGE as u64, "only the two touched pages");
        let snap = load(&dir).unwrap();
        assert_eq!(snap.state.vcpus[0].regs.rip, 0x1234);
        assert_eq!(snap.state.vcpus[0].msrs[0].data, 77);
        let restored = map_memory(&snap).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((128 << 20) - 1))
                .unwrap(),
            7
        );
        // Private: a write to the restored VM does not reach the file.
        restored.write_obj(1u32, GuestAddress(0x10_0000)).unwrap();
        let again = map_memory(&load(&dir).unwrap()).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0xdead_beef
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_snapshots_are_refused_with_what_is_wrong() {
        let dir = tmpdir("bad");
        let mem = create_guest_memory(128 << 20).unwrap();
        SnapshotDir::open(&dir)
            .unwrap()
            .write(&dummy_state(128), &mem)
            .unwrap();
        let state_path = dir.join(STATE_FILE);
        let good = std::fs::read(&state_path).unwrap();

        // Truncated state.
        std::fs::write(&state_path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(load(&dir), Err(SnapshotError::Parse { .. })));
        // Another version.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["version"] = 99.into();
        std::fs::write(&state_path, serde_json::to_vec(&v).unwrap()).unwrap();
        let e = load(&dir).err().unwrap();
        assert!(matches!(e, SnapshotError::Version { found: 99, .. }), "{e}");
        assert!(e.to_string().contains("version 99"), "{e}");
        // A memory size the file does not have.
        v["version"] = SNAPSHOT_VERSION.into();
        v["memory_mib"] = 256.into();
        std::fs::write(&state_path, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(load(&dir), Err(SnapshotError::MemorySize { .. })));
        // Truncated memory.
        std::fs::write(&state_path, &good).unwrap();
        let m = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        m.set_len(64 << 20).unwrap();
        let e = load(&dir).err().unwrap();
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
