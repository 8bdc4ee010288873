//! Facts about the host that change what the VMM can promise.

use std::path::Path;

/// What kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX or SVM): Linux guests run at full speed.
    Hardware,
    /// PVM (`kvm_pvm`): pagetable-based nested virtualization. Guest kernel
    /// mode is emulated instruction by instruction; an unmodified Linux
    /// kernel does not boot.
    Pvm,
    /// /dev/kvm exists but the CPU shows neither VMX nor SVM, and it is not
    /// PVM either.
    Unknown,
}

impl KvmFlavor {
    /// Detect the flavor from sysfs and /proc/cpuinfo.
    pub fn detect() -> Self {
        Self::detect_from(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    /// Detect with explicit paths (for tests).
    pub fn detect_from(sys_module: &Path, cpuinfo: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            return KvmFlavor::Pvm;
        }
        let info = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let has_hw = info
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if has_hw {
            KvmFlavor::Hardware
        } else {
            KvmFlavor::Unknown
        }
    }
}

/// Total host RAM in MiB, from /proc/meminfo (`None` if unreadable).
pub fn host_mem_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_mib(&info)
}

fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let s = "MemTotal:       24567812 kB\nMemFree:         1 kB\n";
        assert_eq!(parse_mem_total_mib(s), Some(23992));
        assert_eq!(parse_mem_total_mib("garbage"), None);
    }

    #[test]
    fn detects_pvm_before_cpu_flags() {
        let dir = std::env::temp_dir().join(format!("ks-host-{}", std::process::id()));
        let sys = dir.join("sys");
        std::fs::create_dir_all(&sys).unwrap();
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, "processor: 0\nflags\t\t: fpu vme sse2\n").unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpuinfo), KvmFlavor::Unknown);
        std::fs::write(&cpuinfo, "flags\t\t: fpu vmx sse2\n").unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpuinfo), KvmFlavor::Hardware);
        std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavor::detect_from(&sys, &cpuinfo), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
