//! `keystone doctor`: can this host run Keystone sandboxes?

use std::fmt;
use std::path::Path;

use keystone_vmm::host::KvmFlavor;

/// What the host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    /// /dev/kvm opened read-write.
    pub kvm_usable: Result<(), String>,
    /// Kind of KVM.
    pub flavor: KvmFlavor,
}

/// Exit codes of `keystone doctor`.
pub mod exit {
    /// Linux guests run here.
    pub const OK: u8 = 0;
    /// KVM is unusable, or cannot run an unmodified Linux guest.
    pub const NO_KVM: u8 = 4;
}

impl HostReport {
    /// Inspect this host.
    pub fn inspect() -> Self {
        Self::inspect_at(Path::new("/dev/kvm"), KvmFlavor::detect())
    }

    /// Inspect with an explicit KVM device path and flavor (for tests).
    pub fn inspect_at(dev: &Path, flavor: KvmFlavor) -> Self {
        let kvm_usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", dev.display()));
        HostReport { kvm_usable, flavor }
    }

    /// Whether an ordinary Linux guest image can boot here.
    pub fn runs_linux(&self) -> bool {
        self.kvm_usable.is_ok() && self.flavor == KvmFlavor::Hardware
    }

    /// Exit code for this report.
    pub fn exit_code(&self) -> u8 {
        if self.runs_linux() {
            exit::OK
        } else {
            exit::NO_KVM
        }
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kvm_usable {
            Ok(()) => writeln!(f, "kvm: /dev/kvm is usable")?,
            Err(e) => writeln!(f, "kvm: not usable ({e})")?,
        }
        let flavor = match self.flavor {
            KvmFlavor::Hardware => "hardware virtualization (vmx/svm): Linux guests run at full speed",
            KvmFlavor::Pvm => {
                "PVM (kvm_pvm): only the probe guest and the PVM test kernel boot; an ordinary Linux image does not"
            }
            KvmFlavor::Unknown => "no vmx/svm in /proc/cpuinfo: Linux guests are not expected to boot",
        };
        writeln!(f, "virtualization: {flavor}")?;
        write!(
            f,
            "verdict: {}",
            if self.runs_linux() {
                "ready for Keystone sandboxes"
            } else {
                "cannot run Keystone sandboxes"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_is_exit_four() {
        let r = HostReport::inspect_at(Path::new("/nonexistent/kvm"), KvmFlavor::Hardware);
        assert!(r.kvm_usable.is_err());
        assert_eq!(r.exit_code(), exit::NO_KVM);
        assert!(r.to_string().contains("not usable"));
    }

    #[test]
    fn pvm_cannot_run_linux_images() {
        let r = HostReport {
            kvm_usable: Ok(()),
            flavor: KvmFlavor::Pvm,
        };
        assert!(!r.runs_linux());
        assert_eq!(r.exit_code(), exit::NO_KVM);
        let hw = HostReport {
            kvm_usable: Ok(()),
            flavor: KvmFlavor::Hardware,
        };
        assert_eq!(hw.exit_code(), exit::OK);
        assert!(hw.to_string().ends_with("ready for Keystone sandboxes"));
    }
}
