//! The boot recipe, in order: host check, VM, memory, kernel, boot
//! structures, devices, vCPUs. [`build`] returns a VM ready to run.

use std::sync::mpsc::Sender;

use keystone_devices::boot_timer::{BootTime, Timestamp};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::acpi::{setup_acpi, AcpiError};
use crate::arch::x86_64::bootparams::{
    build_boot_params, write_boot_params, BootInfo, BootParamsError,
};
use crate::arch::x86_64::cpuid::CpuidOptions;
use crate::arch::x86_64::layout::CMDLINE_ADDR;
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::arch::x86_64::regs::{setup_page_tables, RegsError};
use crate::config::VmConfig;
use crate::device_manager::{DeviceError, DeviceManager};
use crate::host::KvmFlavor;
use crate::loader::{load_initrd, load_kernel, write_cmdline, LoaderError};
use crate::memory::{create_guest_memory, MemoryError};
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{Vm, VmError};

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM setup.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Zero page.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Page tables, GDT.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// vCPUs.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The snapshot to restore.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// A VM ready to run. Field order is drop order: vCPUs and the VM go before
/// the guest memory they map.
pub struct BuiltVm {
    /// vCPUs, configured, not running.
    pub vcpus: Vec<Vcpu>,
    /// Devices and buses.
    pub devices: DeviceManager,
    /// The KVM VM.
    pub vm: Vm,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// What kind of KVM this host has.
    pub flavor: KvmFlavor,
}

/// The warning printed on PVM hosts.
pub const PVM_WARNING: &str =
    "this host's KVM is PVM (kvm_pvm): an unmodified Linux kernel will not boot here; \
     the probe guest and the PVM test kernel do";

/// Log (at debug level) how long after VMM start a boot phase ended.
fn phase(start: Timestamp, name: &str) {
    let now = Timestamp::now();
    tracing::debug!(
        "boot phase {name}: {} us",
        now.wall_us.saturating_sub(start.wall_us)
    );
}

/// Build the VM described by `config`.
pub fn build(
    config: &VmConfig,
    start: Timestamp,
    boot_time_tx: Option<Sender<BootTime>>,
) -> Result<BuiltVm, BuildError> {
    let flavor = KvmFlavor::detect();
    if flavor == KvmFlavor::Pvm {
        tracing::warn!("{PVM_WARNING}");
    }

    if let Some(dir) = &config.restore {
        return restore(config, dir, flavor, start, boot_time_tx);
    }
    let Some(kernel_path) = &config.kernel else {
        return Err(LoaderError::NoKernel.into());
    };
    let mem_size = config.memory_mib << 20;
    let mem = create_guest_memory(mem_size)?;
    let vm = Vm::new(&mem)?;
    phase(start, "kvm vm created, guest memory registered");

    let devices = DeviceManager::new(&vm, &mem, config, start, boot_time_tx)?;

    let kernel = load_kernel(&mem, kernel_path, config.kernel_format)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&mem, path, kernel.end)?),
        None => None,
    };
    let mut cmdline = config.cmdline.clone();
    for entry in &devices.cmdline_entries {
        cmdline.push(' ');
        cmdline.push_str(entry);
    }
    let cmdline_size = write_cmdline(&mem, &cmdline)?;
    let mut params = build_boot_params(
        mem_size,
        &BootInfo {
            setup_header: kernel.setup_header,
            cmdline_addr: CMDLINE_ADDR,
            cmdline_size,
            initrd,
        },
    )?;
    setup_mptable(&mem, config.vcpus)?;
    params.acpi_rsdp_addr = setup_acpi(&mem, config.vcpus, &devices.mmio_devices)?;
    write_boot_params(&mem, &params)?;
    setup_page_tables(&mem)?;
    phase(start, "kernel and boot structures loaded");

    let opts = CpuidOptions {
        no_nested: config.no_nested,
    };
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let mut vcpu = Vcpu::new(&vm, id, devices.pio.clone(), devices.mmio.clone())?;
        vcpu.configure(&vm, &mem, kernel.entry, config.vcpus, opts)?;
        vcpus.push(vcpu);
    }
    phase(start, "vcpus configured");
    tracing::info!(
        "VM ready: {} MiB, {} vCPU(s) configured, entry {:#x}",
        config.memory_mib,
        config.vcpus,
        kernel.entry
    );

    Ok(BuiltVm {
        vcpus,
        devices,
        vm,
        mem,
        flavor,
    })
}

/// The restore recipe: guest memory mapped copy-on-write from the
/// snapshot, the VM and its in-kernel devices put back, the same devices
/// created as for a boot, the vCPUs given their saved state, then our
/// devices' state (last: a re-activated virtio device raises its interrupt,
/// which needs the restored IOAPIC and LAPICs). No kernel is loaded.
fn restore(
    config: &VmConfig,
    dir: &std::path::Path,
    flavor: KvmFlavor,
    start: Timestamp,
    boot_time_tx: Option<Sender<BootTime>>,
) -> Result<BuiltVm, BuildError> {
    let snap = crate::snapshot::load(dir)?;
    let mem = crate::snapshot::map_memory(&snap)?;
    let vm = Vm::new(&mem)?;
    phase(start, "kvm vm created, snapshot memory mapped");
    let devices = DeviceManager::new(&vm, &mem, config, start, boot_time_tx)?;
    vm.restore_state(&snap.state.vm)?;
    let mut vcpus = Vec::with_capacity(snap.state.vcpus.len());
    for (id, state) in snap.state.vcpus.iter().enumerate() {
        let id = u8::try_from(id).map_err(|_| {
            crate::snapshot::SnapshotError::Device("too many vCPUs in the snapshot".into())
        })?;
        let mut vcpu = Vcpu::new(&vm, id, devices.pio.clone(), devices.mmio.clone())?;
        vcpu.restore_state(state)?;
        vcpus.push(vcpu);
    }
    devices.restore_state(&snap.state.devices)?;
    phase(start, "snapshot restored");
    tracing::info!(
        "VM restored from {}: {} MiB, {} vCPU(s)",
        dir.display(),
        snap.state.memory_mib,
        vcpus.len()
    );
    Ok(BuiltVm {
        vcpus,
        devices,
        vm,
        mem,
        flavor,
    })
}
