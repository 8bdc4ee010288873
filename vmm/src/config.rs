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
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory in MiB (at least 128, at most the host's RAM).
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    pub memory: u64,
    /// Number of vCPUs (1 to 64).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u64,
    /// Where the guest's serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "stdio|file:PATH|none", default_value = "stdio")]
    pub serial: String,
    /// Add the boot timer device (MMIO 0xc0000000): a guest write of 123
    /// logs `Guest-boot-time` (as Firecracker's --boot-timer).
    #[arg(long)]
    pub boot_timer: bool,
    /// Hide VMX/SVM from the guest's CPUID (no nested virtualization).
    #[arg(long)]
    pub no_nested: bool,
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

/// A validated VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
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
    /// Unknown log level.
    #[error("--log-level {0}: use error, warn, info, debug or trace")]
    LogLevel(String),
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
    if cmdline.bytes().any(|b| b == 0 || b == b'\n' || b == b'\r') {
        return Err(ConfigError::Cmdline(
            "contains a NUL or line break".to_string(),
        ));
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
        if cli.memory < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(cli.memory));
        }
        if let Some(host) = host_mem_mib {
            if cli.memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: cli.memory,
                    host,
                });
            }
        }
        let vcpus = match u8::try_from(cli.vcpus) {
            Ok(n) if (1..=MAX_CPUS).contains(&n) => n,
            _ => return Err(ConfigError::Vcpus(cli.vcpus)),
        };
        check_cmdline(&cli.cmdline)?;
        let serial = parse_serial(&cli.serial)?;
        check_log_level(&cli.log_level)?;
        let kernel_format =
            detect_kernel_format(&cli.kernel).map_err(|source| ConfigError::Kernel {
                path: cli.kernel.clone(),
                source,
            })?;
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
            kernel_format,
            initrd: cli.initrd.clone(),
            cmdline: cli.cmdline.clone(),
            memory_mib: cli.memory,
            vcpus,
            serial,
            no_nested: cli.no_nested,
            boot_timer: cli.boot_timer,
        })
    }
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
        assert_eq!((c.memory, c.vcpus), (512, 1));
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
        assert!(check_log_level("debug").is_ok());
        assert!(check_log_level("loud").is_err());
    }
}
