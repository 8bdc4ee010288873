//! The *PVM test init*: a static, no-libc Linux x86_64 userspace program
//! that runs as `/init` of the PVM test kernel (`guest-image/kernel/
//! build-kernel.sh --variant pvm-test`) and exercises, from inside a real
//! Linux guest, what keystone-vmm offers: the boot timer, Linux's own
//! virtio-mmio, virtio-blk, virtio-net and virtio-vsock drivers, and the
//! i8042 reset. TEST ONLY: on a PVM host (kvm_pvm) an unmodified kernel and
//! userland do not run; see docs/pvm-notes.md.
//!
//! `build.rs` compiles `guest/*.rs` (`#![no_std]`, raw `syscall`
//! instructions, linked `-nostartfiles -nostdlib -static`) into [`ELF`];
//! [`Initramfs`] packs it as `/init` into a newc cpio for `--initrd`.
//!
//! # What it does
//!
//! It prints [`MARKER`] first, mounts devtmpfs on /dev, proc and sysfs, and
//! runs the steps named by `pvminit.steps=a,b,...` on the kernel command
//! line (default `timer,reboot`), in order. Every result is one console line
//! starting `pvm-init: `; a failed step prints `pvm-init: FAIL <step>: <what>
//! errno=<n>` and the run goes on.
//!
//! | step | does | prints |
//! |---|---|---|
//! | `timer` | byte 123 to the boot timer (MMIO 0xc000_0000) through an mmap of /dev/mem | `boot-timer written` |
//! | `virtio` | lists /sys/bus/virtio/devices | `virtio<N> device=0x000<id> driver=<name>` per device, then `virtio devices=<n>` |
//! | `net` | lists /sys/class/net | `netdev <if> address=<mac>` |
//! | `disk` | reads the first `pvminit.sectors=` (default 8, at most 64) sectors of /dev/vda | `disk vda size=<sectors> read=<bytes> fnv1a64=0x<16 hex>` ([`fnv1a64`]) |
//! | `write` | writes [`write_pattern`]`(S)` to sector `S` = `pvminit.write_sector=` (default 1) of /dev/vda, fsync | `disk wrote sector=S fsync ok` |
//! | `vsock` | connects to CID 2 port `pvminit.vsock_port=` (default 5000), sends [`VSOCK_GREETING`], reads a line | `vsock connected cid=2 port=P`, `vsock reply: <line>` |
//! | `listen` | listens on vsock port `pvminit.listen_port=` (default 6000), accepts one connection, reads a line and writes it back | `vsock listening port=P`, `vsock served: <line>` |
//! | `fork` | fork; the child prints and exits 7; wait4 | `fork child running`, `fork ok child=<pid> exit=7` |
//! | `exec` | fork, then execve `pvminit.exec=PATH[,ARG]...` in the child; wait4 | `exec PATH,ARG...`, `exec exited status=<n> signal=<n>` |
//! | `serve` | listens on vsock port `pvminit.serve_port=` (default 22); `pvminit.serve_count=` times (default 1): accepts, runs `pvminit.serve=PATH[,ARG]...` with the connection as stdin and stdout (inetd style: `dropbear -i`), waits | `serve listening port=P`, `serve connection: ...`, `serve exited status=<n> signal=<n>` |
//! | `reboot` | sync, reboot(2) RESTART (with `reboot=k`: the i8042 reset, keystone-vmm exits 0) | `rebooting` |
//!
//! Lines that carry a time end with ` (t=S.mmm s)`: CLOCK_BOOTTIME, the
//! guest's uptime.

use std::collections::BTreeSet;
use std::path::Path;

#[allow(dead_code)]
#[path = "../guest/shared.rs"]
mod shared;

pub use shared::{fnv1a64, write_pattern, SECTOR_SIZE, VSOCK_GREETING};

/// The init's first console line (before any step runs).
pub const MARKER: &str = "pvm-init: started";

/// The init, a static ELF executable.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keystone-pvm-init.elf"));

/// Where `build.rs` left the init ELF.
pub fn elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/keystone-pvm-init.elf"))
}

/// An initramfs under construction: a newc ("070701") cpio archive, the
/// format the kernel unpacks into its rootfs before running `/init`.
/// [`Initramfs::new`] starts it with `/init` = [`ELF`], the directories the
/// init mounts on, and `/dev/console` (the kernel opens it for init's fds
/// 0-2 before /dev is mounted).
pub struct Initramfs {
    archive: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Initramfs {
    /// `/init` = the PVM test init, plus /dev, /dev/console, /proc, /sys,
    /// /tmp and /root.
    pub fn new() -> Self {
        let mut fs = Self::empty();
        for dir in ["dev", "proc", "sys", "tmp", "root"] {
            fs.dir(dir);
        }
        fs.char_dev("dev/console", 0o600, 5, 1);
        fs.file("init", 0o755, ELF);
        fs
    }

    /// An archive with nothing in it yet.
    pub fn empty() -> Self {
        Initramfs {
            archive: Vec::new(),
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory, `path` relative to the root (e.g. `"etc"`). Every
    /// entry's missing parent directories are added before it; adding a
    /// directory twice adds it once.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        let path = path.trim_matches('/');
        if self.dirs.contains(path) {
            return self;
        }
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self.dirs.insert(path.to_string());
        self
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data)
    }

    /// A symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[])
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> &mut Self {
        let path = path.trim_matches('/');
        assert!(!path.is_empty(), "empty initramfs path");
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        self.header(ino, mode, nlink, data.len(), rdev, path);
        self.archive.extend_from_slice(data);
        self.pad();
        self
    }

    /// One newc header ("070701", then 13 fields of 8 hex digits: ino,
    /// mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    /// rdevmajor, rdevminor, namesize, check) and the NUL-terminated name,
    /// padded to 4 bytes. Owner root, mtime 0.
    fn header(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        filesize: usize,
        (rdev_major, rdev_minor): (u32, u32),
        name: &str,
    ) {
        let filesize = u32::try_from(filesize).expect("initramfs file over 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("initramfs name too long");
        let fields = [
            ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev_major, rdev_minor, namesize, 0,
        ];
        self.archive.extend_from_slice(b"070701");
        for f in fields {
            self.archive
                .extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.archive.extend_from_slice(name.as_bytes());
        self.archive.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.archive.len().is_multiple_of(4) {
            self.archive.push(0);
        }
    }

    /// The finished archive (with its `TRAILER!!!` entry).
    pub fn finish(&self) -> Vec<u8> {
        let mut done = Initramfs {
            archive: self.archive.clone(),
            next_ino: self.next_ino,
            dirs: BTreeSet::new(),
        };
        done.header(0, 0, 1, 0, (0, 0), "TRAILER!!!");
        done.archive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_is_a_static_x86_64_executable() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        assert_eq!(ELF[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([ELF[16], ELF[17]]), 2, "ET_EXEC");
        assert_eq!(u16::from_le_bytes([ELF[18], ELF[19]]), 62, "EM_X86_64");
        // No PT_INTERP (3) or PT_DYNAMIC (2): nothing for a loader to do.
        let phoff = u64::from_le_bytes(ELF[32..40].try_into().unwrap()) as usize;
        let phentsize = usize::from(u16::from_le_bytes([ELF[54], ELF[55]]));
        let phnum = usize::from(u16::from_le_bytes([ELF[56], ELF[57]]));
        for i in 0..phnum {
            let off = phoff + i * phentsize;
            let p_type = u32::from_le_bytes(ELF[off..off + 4].try_into().unwrap());
            assert!(
                p_type != 2 && p_type != 3,
                "program header {i} type {p_type}"
            );
        }
    }

    #[test]
    fn initramfs_is_newc_with_init_and_trailer() {
        let cpio = Initramfs::new().finish();
        assert_eq!(&cpio[..6], b"070701");
        assert!(cpio.len().is_multiple_of(4));
        let find = |needle: &[u8]| cpio.windows(needle.len()).position(|w| w == needle);
        let init = find(b"init\0").expect("init entry");
        let elf = find(b"\x7fELF").expect("init data");
        assert!(elf > init && elf.is_multiple_of(4));
        assert!(find(b"dev/console\0").is_some());
        // Walk the headers: every entry, then the trailer, then nothing.
        let mut off = 0;
        let mut names = Vec::new();
        loop {
            let hdr = &cpio[off..off + 110];
            assert_eq!(&hdr[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap() as usize
            };
            let (filesize, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&cpio[off + 110..off + 110 + namesize - 1]).unwrap();
            names.push(name.to_string());
            off = (off + 110 + namesize).next_multiple_of(4);
            off = (off + filesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        assert_eq!(off, cpio.len());
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "tmp",
                "root",
                "dev/console",
                "init",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn parent_directories_come_first_and_once() {
        let mut fs = Initramfs::empty();
        fs.file("usr/lib/x/a", 0o644, b"a")
            .file("usr/lib/x/b", 0o644, b"b")
            .symlink("usr/bin/sh", "busybox")
            .dir("usr");
        let cpio = fs.finish();
        let text = String::from_utf8_lossy(&cpio);
        let pos = |name: &str| text.find(&format!("{name}\0")).unwrap();
        assert!(pos("usr") < pos("usr/lib") && pos("usr/lib") < pos("usr/lib/x"));
        assert!(pos("usr/lib/x") < pos("usr/lib/x/a"));
        assert_eq!(text.matches("usr/lib/x\0").count(), 1);
        assert_eq!(text.matches("usr\0").count(), 1);
    }

    #[test]
    fn write_pattern_and_checksum_are_stable() {
        let p = write_pattern(5);
        assert!(p.starts_with(b"KEYSTONE-PVM-INIT"));
        assert_ne!(write_pattern(5), write_pattern(6));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
