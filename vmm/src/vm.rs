//! The KVM VM: `/dev/kvm`, the VM fd, the in-kernel irqchip and PIT (created
//! before any vCPU, as KVM requires), and guest memory registration.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualization, load kvm_intel or kvm_amd)")]
    KvmMissing,
    /// /dev/kvm cannot be opened by this user.
    #[error("cannot open /dev/kvm: permission denied (add this user to the kvm group)")]
    KvmPermission,
    /// Other failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A KVM ioctl on the VM failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// The VM and what KVM told us about the host.
pub struct Vm {
    /// The VM file descriptor.
    pub fd: VmFd,
    /// CPUID the host supports.
    pub supported_cpuid: CpuId,
    /// MSR indices the host lists.
    pub msr_list: Vec<u32>,
    // Keep /dev/kvm open as long as the VM.
    _kvm: Kvm,
}

impl Vm {
    /// Open /dev/kvm, create the VM, register `mem`, then create the
    /// irqchip and PIT.
    ///
    /// Memory goes in before the irqchip and PIT on purpose: measured on a
    /// PVM host, KVM_SET_USER_MEMORY_REGION takes 5-11 ms once they exist
    /// (its SRCU grace period waits on them) and about 0.2 ms before.
    ///
    /// The caller keeps `mem` alive for as long as the VM runs: the VMM
    /// holds both and drops the VM (and its vCPUs) first.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => VmError::KvmMissing,
            libc::EACCES | libc::EPERM => VmError::KvmPermission,
            _ => VmError::KvmOpen(e),
        })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        register_memory(&fd, mem)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Vm {
            fd,
            supported_cpuid,
            msr_list,
            _kvm: kvm,
        })
    }
}

impl Vm {
    /// The in-kernel irqchip (both PICs, the IOAPIC), PIT and clock, for a
    /// snapshot (the vCPUs are paused).
    pub fn save_state(&self) -> Result<crate::snapshot::KvmVmState, VmError> {
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map(|()| c)
                .map_err(ioctl("KVM_GET_IRQCHIP"))
        };
        let mut clock = self.fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME-style ones;
        // the read-only "TSC stable" bit must not go back in.
        clock.flags = 0;
        Ok(crate::snapshot::KvmVmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Put back what [`Vm::save_state`] read (before any vCPU runs).
    pub fn restore_state(&self, s: &crate::snapshot::KvmVmState) -> Result<(), VmError> {
        self.fd.set_pit2(&s.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        self.fd
            .set_clock(&s.clock)
            .map_err(ioctl("KVM_SET_CLOCK"))?;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// Register every region of `mem` as a KVM memory slot of `fd`.
fn register_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Ioctl {
                what: "KVM_SET_USER_MEMORY_REGION (no host address)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mmap of `memory_size` bytes owned by
        // `mem`, which outlives the VM (see `Vm::new`), and slots do not
        // overlap because the regions of a GuestMemoryMmap do not.
        unsafe { fd.set_user_memory_region(r) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
