//! Command-line interface of `keystone-vmm` and the validated VM
//! configuration built from it.

use std::path::PathBuf;

use clap::Parser;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::mptable::MAX_CPUS;
use crate::loader::{detect_kernel_format, KernelFormat, LoaderError};

/// Kernel command line used when `--cmdline` is not given: a serial console,
/// reboot through the i8042, no PCI, no ACPI, no module loading, and the
/// i8042 options that keep Linux from probing for a keyboard and mouse.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off nomodule \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Least guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 128;

/// keystone-vmm: boot a Linux kernel (or the probe guest) in a KVM microVM.
#[derive(Debug, Parser)]
#[command(name = "keystone-vmm", version, about, long_about = None)]
pub struct Cli {
    /// Kernel to boot: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory in MiB (at least 128, at most the host's RAM; default
    /// 512, or the snapshot's with --restore).
    #[arg(long, value_name = "MiB")]
    pub memory: Option<u64>,
    /// Number of vCPUs (1 to 64; default 1, or the snapshot's).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u64>,
    /// Resume the VM saved in DIR (`state.json` + `memory`, written by the
    /// API's snapshot) instead of booting a kernel: give the same devices
    /// (--disk, --net, --vsock; the vsock CID may differ).
    #[arg(long, value_name = "DIR", conflicts_with = "kernel")]
    pub restore: Option<PathBuf>,
    /// Serve the control API (pause, resume, snapshot, state: one JSON
    /// object per line; see README) on a Unix socket created here.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Where the API's snapshot writes `state.json` and `memory` (an
    /// existing directory, opened at start).
    #[arg(long, value_name = "DIR", requires = "api_sock")]
    pub snapshot_dir: Option<PathBuf>,
    /// Where the guest's serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    pub serial: String,
    /// Add the boot timer device (MMIO 0xc0000000): a guest write of 123
    /// logs `Guest-boot-time` (as Firecracker's --boot-timer).
    #[arg(long)]
    pub boot_timer: bool,
    /// A virtio-blk disk: a raw image, `,ro` for read-only. Repeatable; the
    /// first is /dev/vda.
    #[arg(long, value_name = "PATH[,ro]")]
    pub disk: Vec<String>,
    /// A virtio-vsock device with Firecracker's hybrid Unix-socket backend:
    /// guest CID (3 or more) and the host socket path to create.
    #[arg(long, value_name = "CID,UDS_PATH")]
    pub vsock: Option<String>,
    /// A virtio-net NIC: `user` (user-mode networking through passt, no
    /// root needed) or `tap=NAME` (needs CAP_NET_ADMIN), with `,mac=MAC` or
    /// `,name=NAME` (MAC derived from the name; default: from the VMM's pid);
    /// or `macvtap=NAME`, an existing macvtap link opened through
    /// /dev/tap<ifindex> (root), whose own MAC the guest gets.
    #[arg(long, value_name = "user|tap=NAME[,mac=MAC|,name=NAME]|macvtap=NAME")]
    pub net: Option<String>,
    /// Hide VMX/SVM from the guest's CPUID (no nested virtualization).
    #[arg(long)]
    pub no_nested: bool,
    /// Run jailed: PID/mount/IPC/UTS/network namespaces (and a user
    /// namespace when not root), an empty read-only root, no capabilities.
    #[arg(long)]
    pub jail: bool,
    /// Where the jail's root is mounted (default /run/keystone-vmm/<pid> as
    /// root, else $XDG_RUNTIME_DIR/keystone-vmm/<pid> or
    /// /tmp/keystone-vmm-<uid>/<pid>).
    #[arg(long, value_name = "DIR", requires = "jail")]
    pub jail_dir: Option<PathBuf>,
    /// uid the jailed VMM runs as (root: default 65534, nobody; otherwise
    /// your own, the only one a user namespace can map).
    #[arg(long, value_name = "UID", requires = "jail")]
    pub jail_uid: Option<u32>,
    /// gid the jailed VMM runs as (root: default 65534; otherwise your own).
    #[arg(long, value_name = "GID", requires = "jail")]
    pub jail_gid: Option<u32>,
    /// Run without seccomp filters (debugging only: the VMM then has the
    /// whole syscall surface of the host kernel).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Debugging: a syscall outside the seccomp allowlists is logged (its
    /// number, on stderr) before the process ends, instead of a bare SIGSYS.
    #[arg(long, conflicts_with = "no_seccomp")]
    pub seccomp_log: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The VMM's stdout; stdin feeds the guest.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image.
    pub path: PathBuf,
    /// Guest writes are refused.
    pub read_only: bool,
}

/// A virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context id.
    pub cid: u32,
    /// Host Unix socket path (host-initiated connections; guest-initiated
    /// ones go to `<path>_<port>`).
    pub uds_path: PathBuf,
}

/// Most virtio devices: one GSI each, 5 to 23 on the IOAPIC.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A validated VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image path (none when restoring).
    pub kernel: Option<PathBuf>,
    /// A snapshot directory to restore instead of booting.
    pub restore: Option<PathBuf>,
    /// The control API's socket path.
    pub api_sock: Option<PathBuf>,
    /// Where the API's snapshots go.
    pub snapshot_dir: Option<PathBuf>,
    /// Its format, detected from its header.
    pub kernel_format: KernelFormat,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Serial console.
    pub serial: SerialConfig,
    /// Hide VMX/SVM.
    pub no_nested: bool,
    /// Boot timer device present.
    pub boot_timer: bool,
    /// Install the per-thread seccomp filters (default).
    pub seccomp: bool,
    /// Log seccomp violations before ending the process.
    pub seccomp_log: bool,
    /// virtio-blk disks, in order (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-net device.
    pub net: Option<crate::net::NetConfig>,
    /// Jail settings, with `--jail`.
    pub jail: Option<crate::jail::JailConfig>,
}

/// A bad argument. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Memory below the minimum.
    #[error("--memory {0} MiB is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    /// Memory above the host's RAM.
    #[error("--memory {requested} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host MiB.
        host: u64,
    },
    /// vCPU count out of range.
    #[error("--vcpus {0} is out of range: use 1 to {MAX_CPUS}")]
    Vcpus(u64),
    /// The kernel cannot be used.
    #[error("--kernel {path}: {source}")]
    Kernel {
        /// The path given.
        path: PathBuf,
        /// Why it is unusable.
        source: LoaderError,
    },
    /// The initrd cannot be read.
    #[error("--initrd {path}: {source}")]
    Initrd {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Command line too long or containing a NUL or newline.
    #[error("--cmdline: {0}")]
    Cmdline(String),
    /// Unknown --serial value.
    #[error("--serial {0}: use stdio, file:PATH or none")]
    Serial(String),
    /// `--jail-uid`/`--jail-gid` other than one's own, without root.
    #[error("--jail-uid/--jail-gid: without root the jail keeps your own uid {uid} and gid {gid} (a user namespace maps only those)")]
    JailIds {
        /// The caller's uid.
        uid: u32,
        /// The caller's gid.
        gid: u32,
    },
    /// A --disk value is wrong.
    #[error("--disk {spec}: {reason}")]
    Disk {
        /// The value given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A --vsock value is wrong.
    #[error("--vsock {spec}: {reason}")]
    Vsock {
        /// The value given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A --net value is wrong.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// Too many virtio devices.
    #[error("too many virtio devices: at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices,
    /// Unknown log level.
    #[error("--log-level {0}: use error, warn, info, debug or trace")]
    LogLevel(String),
    /// The snapshot to restore is unusable or does not match.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// --api-sock or --snapshot-dir is unusable.
    #[error("{flag} {path}: {reason}")]
    Api {
        /// Which option.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdio" => Ok(SerialConfig::Stdio),
        "none" => Ok(SerialConfig::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::Serial(s.to_string())),
        },
    }
}

fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let err = |reason: &str| ConfigError::Disk {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => return Err(err(&format!("unknown option {opt:?} (use ro)"))),
        None => (spec, false),
    };
    if path.is_empty() {
        return Err(err("empty path"));
    }
    let meta = std::fs::metadata(path).map_err(|e| err(&e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file (use a raw disk image)"));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(!read_only);
    opts.open(path).map_err(|e| err(&e.to_string()))?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

fn parse_vsock(spec: &str) -> Result<VsockConfig, ConfigError> {
    let err = |reason: &str| ConfigError::Vsock {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (cid, path) = spec
        .split_once(',')
        .ok_or_else(|| err("expected CID,UDS_PATH"))?;
    let cid: u32 = cid
        .trim()
        .parse()
        .map_err(|_| err("the CID is not a number"))?;
    // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
    if cid < 3 || cid == u32::MAX {
        return Err(err("the CID must be between 3 and 4294967294"));
    }
    let uds_path = PathBuf::from(path);
    if path.is_empty() {
        return Err(err("empty socket path"));
    }
    if uds_path.symlink_metadata().is_ok() && !remove_stale_socket(&uds_path) {
        return Err(err(
            "the socket path already exists (and is not a stale socket: another VMM listening, or another file)",
        ));
    }
    // sun_path holds 108 bytes with the NUL; `<path>_<port>` adds up to 11.
    if path.len() + 11 >= 108 {
        return Err(err("the socket path is too long for a Unix socket"));
    }
    let parent = uds_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(err("its directory does not exist"));
    }
    Ok(VsockConfig { cid, uds_path })
}

/// A value a snapshot fixes (memory, vCPUs): the snapshot's, and a given
/// one must equal it (else `mismatch(given, saved)` names the difference);
/// without a snapshot the given one, or `default`.
fn fixed_by_snapshot(
    saved: Option<(&PathBuf, u64)>,
    given: Option<u64>,
    default: u64,
    mismatch: impl Fn(u64, u64) -> String,
) -> Result<u64, ConfigError> {
    match (saved, given) {
        (Some((dir, v)), Some(g)) if g != v => Err(crate::snapshot::SnapshotError::Mismatch {
            dir: dir.clone(),
            reason: mismatch(g, v),
        }
        .into()),
        (Some((_, v)), _) => Ok(v),
        (None, g) => Ok(g.unwrap_or(default)),
    }
}

/// Removes `path` if it is a socket nobody listens on (what a VMM that
/// exited leaves: no VMM thread may unlink, see seccomp). Whether it is
/// gone.
fn remove_stale_socket(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let stale = path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_socket())
        && matches!(
            std::os::unix::net::UnixStream::connect(path),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        );
    stale && std::fs::remove_file(path).is_ok()
}

/// Check a kernel command line: printable, no NUL or newline, and short
/// enough (with its NUL) for Linux's x86 `COMMAND_LINE_SIZE`.
pub fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(ConfigError::Cmdline(format!(
            "{} bytes is longer than the {} the kernel accepts",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    // What the kernel (and linux-loader) accept: printable ASCII.
    if let Some(b) = cmdline.bytes().find(|b| !(b' '..=b'~').contains(b)) {
        return Err(ConfigError::Cmdline(format!(
            "contains byte {b:#04x}: only printable ASCII is allowed"
        )));
    }
    Ok(())
}

/// Check a log level name.
pub fn check_log_level(level: &str) -> Result<tracing::Level, ConfigError> {
    level
        .parse::<tracing::Level>()
        .map_err(|_| ConfigError::LogLevel(level.to_string()))
}

impl VmConfig {
    /// Validate the command line against this host.
    pub fn from_cli(cli: &Cli, host_mem_mib: Option<u64>) -> Result<Self, ConfigError> {
        // A snapshot fixes memory and vCPUs: given ones must match.
        let saved = match &cli.restore {
            Some(dir) => {
                let s = crate::snapshot::load(dir)?;
                Some((dir, s.state.memory_mib, s.state.vcpus.len() as u64))
            }
            None => None,
        };
        let memory = fixed_by_snapshot(
            saved.map(|(d, m, _)| (d, m)),
            cli.memory,
            512,
            |given, m| format!("--memory {given} MiB, the snapshot has {m} MiB"),
        )?;
        let vcpus = fixed_by_snapshot(saved.map(|(d, _, n)| (d, n)), cli.vcpus, 1, |given, n| {
            format!("--vcpus {given}, the snapshot has {n}")
        })?;
        if memory < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(memory));
        }
        if let Some(host) = host_mem_mib {
            if memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: memory,
                    host,
                });
            }
        }
        let vcpus = match u8::try_from(vcpus) {
            Ok(n) if (1..=MAX_CPUS).contains(&n) => n,
            _ => return Err(ConfigError::Vcpus(vcpus)),
        };
        if let Some(p) = &cli.api_sock {
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
            if parent.is_some_and(|d| !d.is_dir()) {
                return Err(ConfigError::Api {
                    flag: "--api-sock",
                    path: p.clone(),
                    reason: "its directory does not exist".into(),
                });
            }
            if p.symlink_metadata().is_ok() && !remove_stale_socket(p) {
                return Err(ConfigError::Api {
                    flag: "--api-sock",
                    path: p.clone(),
                    reason: "already exists (and is not a stale socket)".into(),
                });
            }
        }
        if let Some(d) = &cli.snapshot_dir {
            if !d.is_dir() {
                return Err(ConfigError::Api {
                    flag: "--snapshot-dir",
                    path: d.clone(),
                    reason: "not a directory".into(),
                });
            }
        }
        check_cmdline(&cli.cmdline)?;
        let serial = parse_serial(&cli.serial)?;
        let disks = cli
            .disk
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock = cli.vsock.as_deref().map(parse_vsock).transpose()?;
        let default_name = format!("keystone-vmm-{}", std::process::id());
        let net = cli
            .net
            .as_deref()
            .map(|spec| crate::net::parse_net(spec, &default_name))
            .transpose()?;
        if disks.len() + usize::from(vsock.is_some()) + usize::from(net.is_some())
            > MAX_VIRTIO_DEVICES
        {
            return Err(ConfigError::TooManyDevices);
        }
        check_log_level(&cli.log_level)?;
        let kernel_format = match &cli.kernel {
            Some(k) => detect_kernel_format(k).map_err(|source| ConfigError::Kernel {
                path: k.clone(),
                source,
            })?,
            None => KernelFormat::Elf,
        };
        if let Some(initrd) = &cli.initrd {
            std::fs::File::open(initrd)
                .and_then(|f| f.metadata())
                .and_then(|m| {
                    if m.is_file() {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
                .map_err(|source| ConfigError::Initrd {
                    path: initrd.clone(),
                    source,
                })?;
        }
        Ok(VmConfig {
            kernel: cli.kernel.clone(),
            restore: cli.restore.clone(),
            api_sock: cli.api_sock.clone(),
            snapshot_dir: cli.snapshot_dir.clone(),
            kernel_format,
            initrd: cli.initrd.clone(),
            cmdline: cli.cmdline.clone(),
            memory_mib: memory,
            vcpus,
            serial,
            no_nested: cli.no_nested,
            boot_timer: cli.boot_timer,
            seccomp: !cli.no_seccomp,
            seccomp_log: cli.seccomp_log,
            disks,
            vsock,
            net,
            jail: match cli.jail {
                true => Some(jail_config(cli)?),
                false => None,
            },
        })
    }
}

/// The jail settings: as root any uid/gid (default 65534); otherwise the
/// caller's own, which its user namespace maps to itself.
fn jail_config(cli: &Cli) -> Result<crate::jail::JailConfig, ConfigError> {
    // SAFETY: geteuid/getegid have no arguments and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root_user = euid == 0;
    let (uid, gid) = if root_user {
        (cli.jail_uid.unwrap_or(65534), cli.jail_gid.unwrap_or(65534))
    } else {
        let uid = cli.jail_uid.unwrap_or(euid);
        let gid = cli.jail_gid.unwrap_or(egid);
        if (uid, gid) != (euid, egid) {
            return Err(ConfigError::JailIds {
                uid: euid,
                gid: egid,
            });
        }
        (uid, gid)
    };
    let root = match &cli.jail_dir {
        Some(d) => d.clone(),
        None if root_user => PathBuf::from(format!("/run/keystone-vmm/{}", std::process::id())),
        None => std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.is_dir())
            .map(|p| p.join("keystone-vmm"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/keystone-vmm-{euid}")))
            .join(std::process::id().to_string()),
    };
    Ok(crate::jail::JailConfig {
        root,
        uid,
        gid,
        user_namespace: !root_user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["keystone-vmm", "--kernel", "/nonexistent"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = cli(&[]);
        // Applied by from_cli: 512 MiB and 1 vCPU, or the snapshot's.
        assert_eq!((c.memory, c.vcpus), (None, None));
        assert_eq!(c.serial, "stdio");
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_sizes_are_rejected_before_the_kernel_is_read() {
        let e = VmConfig::from_cli(&cli(&["--memory", "64"]), Some(1024)).unwrap_err();
        assert!(matches!(e, ConfigError::MemoryTooSmall(64)));
        let e = VmConfig::from_cli(&cli(&["--memory", "4096"]), Some(1024)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--memory 4096 MiB is more than this host's 1024 MiB of RAM"
        );
        for n in ["0", "65", "300"] {
            let e = VmConfig::from_cli(&cli(&["--vcpus", n]), None).unwrap_err();
            assert!(matches!(e, ConfigError::Vcpus(_)), "{n}");
        }
        let e = VmConfig::from_cli(&cli(&[]), None).unwrap_err();
        assert!(matches!(e, ConfigError::Kernel { .. }));
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn serial_and_cmdline_are_checked() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialConfig::Stdio);
        assert_eq!(parse_serial("none").unwrap(), SerialConfig::None);
        assert_eq!(
            parse_serial("file:/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
        assert!(check_cmdline(&"a".repeat(CMDLINE_MAX_SIZE - 1)).is_ok());
        assert!(check_cmdline(&"a".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(check_cmdline("a\nb").is_err());
        assert!(check_cmdline("a\0b").is_err());
        // Found by the kernel_loader fuzz target: accepted here, refused by
        // the loader later.
        assert!(check_cmdline("a\tb").is_err());
        assert!(check_cmdline("caf\u{e9}").is_err());
        assert!(check_cmdline("console=otefok\x17pg= paolNe=").is_err());
        assert!(check_log_level("debug").is_ok());
        let dir = std::env::temp_dir().join(format!("ks-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let img_s = img.to_str().unwrap();
        assert_eq!(
            parse_disk(&format!("{img_s},ro")).unwrap(),
            DiskConfig {
                path: img.clone(),
                read_only: true
            }
        );
        assert!(!parse_disk(img_s).unwrap().read_only);
        assert!(parse_disk(&format!("{img_s},fast")).is_err());
        assert!(parse_disk("/nonexistent.img").is_err());
        assert!(parse_disk(dir.to_str().unwrap()).is_err());
        let sock = dir.join("v.sock");
        let ok = parse_vsock(&format!("3,{}", sock.display())).unwrap();
        assert_eq!(ok.cid, 3);
        for bad in [
            "2,/tmp/x.sock",
            "x,/tmp/x.sock",
            "4294967295,/tmp/x",
            "3",
            "3,",
        ] {
            assert!(parse_vsock(bad).is_err(), "{bad}");
        }
        assert!(parse_vsock(&format!("3,{img_s}")).is_err(), "exists");
        // A socket someone listens on is refused; one left by a VMM that
        // exited (no listener) is replaced.
        let live = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(
            parse_vsock(&format!("3,{}", sock.display())).is_err(),
            "live"
        );
        drop(live);
        assert!(sock.exists(), "closing a listener leaves its file");
        assert!(
            parse_vsock(&format!("3,{}", sock.display())).is_ok(),
            "stale"
        );
        assert!(!sock.exists());
        assert!(parse_vsock("3,/nonexistent/dir/v.sock").is_err());
        assert!(parse_vsock(&format!("3,/tmp/{}", "x".repeat(100))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(check_log_level("loud").is_err());
    }
}
