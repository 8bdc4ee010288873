//! vCPUs: configured from the VMM thread, then each runs `KVM_RUN` on its
//! own thread, routing port I/O and MMIO exits to the buses, until the guest
//! resets, fails, or the VMM asks it to stop.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Barrier, Condvar, Mutex};

use seccompiler::BpfProgram;

use keystone_devices::Bus;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::cpuid::{filter_cpuid, CpuidOptions};
use crate::arch::x86_64::{msr, regs};
use crate::snapshot::VcpuState;
use crate::vm::Vm;

/// Errors configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: KVM {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures failed.
    #[error("vCPU {id}: {source}")]
    Regs {
        /// vCPU index.
        id: u8,
        /// What failed.
        source: regs::RegsError,
    },
    /// The guest triple-faulted.
    #[error("vCPU {0}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)")]
    TripleFault(u8),
    /// KVM could not emulate an instruction or similar.
    #[error("vCPU {id}: KVM internal error (KVM_EXIT_INTERNAL_ERROR) at rip {rip:#x}; on a PVM host this is usually an instruction KVM cannot emulate in guest kernel mode")]
    InternalError {
        /// vCPU index.
        id: u8,
        /// Guest instruction pointer, if it could be read.
        rip: u64,
    },
    /// VM entry failed.
    #[error("vCPU {id}: VM entry failed (hardware reason {reason:#x})")]
    FailEntry {
        /// vCPU index.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The vCPU's seccomp filter could not be installed.
    #[error("vCPU {id}: {source}")]
    Seccomp {
        /// vCPU index.
        id: u8,
        /// What failed.
        source: crate::seccomp::SeccompError,
    },
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    #[error("vCPU {0}: the guest reported a crash")]
    GuestCrash(u8),
    /// An exit this VMM does not handle.
    #[error("vCPU {id}: unexpected KVM exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// Exit name.
        exit: String,
    },
}

/// Why a vCPU thread ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to stop.
    Requested,
    /// The guest asked for a reset or power-off through KVM (system event).
    GuestReset,
    /// The vCPU halted with no in-kernel LAPIC to wake it.
    Halted,
}

/// What a vCPU thread reports when it ends.
pub type VcpuResult = (u8, Result<VcpuStop, VcpuError>);

/// Pausing the vCPU threads (the API's pause and snapshot): the VMM thread
/// raises `pause` and kicks them; each leaves KVM_RUN, completes the exit it
/// was in the middle of (one `immediate_exit` run), saves its state, and
/// waits here until resumed or stopped.
#[derive(Default)]
pub struct VcpuControl {
    pause: AtomicBool,
    inner: Mutex<Paused>,
    cond: Condvar,
}

#[derive(Default)]
struct Paused {
    /// Each paused vCPU's saved state (or why it could not be read).
    saved: Vec<(u8, Result<VcpuState, String>)>,
    /// Raised with `pause`; lowered to release them.
    held: bool,
}

impl VcpuControl {
    /// Ask the vCPUs to pause (they still have to be kicked).
    pub fn request_pause(&self) {
        let mut p = lock_paused(&self.inner);
        p.saved.clear();
        p.held = true;
        self.pause.store(true, Ordering::Release);
    }

    /// How many vCPUs have paused so far.
    pub fn paused_count(&self) -> usize {
        lock_paused(&self.inner).saved.len()
    }

    /// The saved states, by vCPU id (while paused).
    pub fn saved(&self) -> Result<Vec<VcpuState>, String> {
        let p = lock_paused(&self.inner);
        let mut v: Vec<&(u8, Result<VcpuState, String>)> = p.saved.iter().collect();
        v.sort_by_key(|(id, _)| *id);
        v.into_iter()
            .map(|(id, r)| r.clone().map_err(|e| format!("vCPU {id}: {e}")))
            .collect()
    }

    /// Let paused vCPUs run again (also what a stop does).
    pub fn release(&self) {
        let mut p = lock_paused(&self.inner);
        self.pause.store(false, Ordering::Release);
        p.held = false;
        p.saved.clear();
        self.cond.notify_all();
    }

    fn wants_pause(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// On a vCPU thread: report `state`, then wait to be released.
    fn park(&self, id: u8, state: Result<VcpuState, String>, stop: &AtomicBool) {
        let mut p = lock_paused(&self.inner);
        p.saved.push((id, state));
        self.cond.notify_all();
        while p.held && !stop.load(Ordering::Acquire) {
            p = match self.cond.wait(p) {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

fn lock_paused(m: &Mutex<Paused>) -> std::sync::MutexGuard<'_, Paused> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One vCPU before and while it runs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    logged_unhandled: HashSet<(bool, u64)>,
}

impl Vcpu {
    /// Create vCPU `id` on `vm`.
    pub fn new(vm: &Vm, id: u8, pio: Bus, mmio: Bus) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                id,
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            logged_unhandled: HashSet::new(),
        })
    }

    /// `entries` as the list KVM_GET_MSRS/KVM_SET_MSRS take.
    fn msrs(&self, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuError> {
        Msrs::from_entries(entries).map_err(|_| VcpuError::UnexpectedExit {
            id: self.id,
            exit: "MSR list".into(),
        })
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// Set CPUID, MSRs, registers, FPU and LAPIC for a 64-bit entry at
    /// `entry`. Application processors get the same state; with the
    /// in-kernel irqchip they wait for INIT/SIPI, which replaces it.
    pub fn configure(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        entry: u64,
        count: u8,
        opts: CpuidOptions,
    ) -> Result<(), VcpuError> {
        let entries: Vec<kvm_cpuid_entry2> =
            filter_cpuid(vm.supported_cpuid.as_slice(), self.id, count, opts);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::UnexpectedExit {
            id: self.id,
            exit: "too many CPUID entries".into(),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;

        let (wanted, dropped) = msr::supported_only(msr::boot_msrs(), &vm.msr_list);
        if !dropped.is_empty() && self.id == 0 {
            tracing::debug!("host KVM does not list boot MSRs {dropped:#x?}; not setting them");
        }
        // Set them one at a time so a refusal names the MSR and the rest
        // still get set.
        for m in wanted {
            let msrs = self.msrs(&[m])?;
            match self.fd.set_msrs(&msrs) {
                Ok(1) => {}
                Ok(_) | Err(_) => {
                    if self.id == 0 {
                        tracing::warn!(
                            "host KVM refused MSR {:#x} (listed by KVM_GET_MSR_INDEX_LIST); leaving it at its reset value",
                            m.index
                        );
                    }
                }
            }
        }

        let sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        let sregs = regs::long_mode_sregs(mem, sregs).map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.ioctl("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl("KVM_SET_LAPIC"))?;
        tracing::debug!(
            "vCPU {} configured (APIC id {}, entry {entry:#x})",
            self.id,
            self.id
        );
        Ok(())
    }

    fn log_unhandled(&mut self, is_mmio: bool, addr: u64) {
        // Once per address, and only a bounded number of addresses.
        if self.logged_unhandled.len() < 64 && self.logged_unhandled.insert((is_mmio, addr)) {
            let kind = if is_mmio { "MMIO" } else { "port" };
            tracing::debug!("vCPU {}: guest accessed unowned {kind} {addr:#x}", self.id);
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// One line of the vCPU's state for a fatal exit (triple fault).
    fn state_line(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => state_line(&r, &s),
            (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
        }
    }

    /// The vCPU's whole KVM state, for a snapshot (`msr_list`: the MSRs
    /// KVM lists; those it will not read are left out).
    pub fn save_state(&self, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
        let mut msrs = Vec::new();
        for chunk in msr_list.chunks(64) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = self.msrs(&entries)?;
            let n = self
                .fd
                .get_msrs(&mut m)
                .map_err(self.ioctl("KVM_GET_MSRS"))?;
            if n == entries.len() {
                msrs.extend_from_slice(m.as_slice());
                continue;
            }
            // KVM stops at the first MSR it will not read: one at a time.
            for e in entries {
                let mut one = self.msrs(&[e])?;
                if let Ok(1) = self.fd.get_msrs(&mut one) {
                    msrs.extend_from_slice(one.as_slice());
                }
            }
        }
        Ok(VcpuState {
            cpuid: self
                .fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(self.ioctl("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            msrs,
            regs: self.fd.get_regs().map_err(self.ioctl("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(self.ioctl("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(self.ioctl("KVM_GET_XCRS"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.ioctl("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.ioctl("KVM_GET_MP_STATE"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.ioctl("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Put back a saved state (before the vCPU first runs), in the order
    /// KVM needs: CPUID first, the LAPIC before MSRs, events last; the TSC
    /// deadline after the TSC.
    pub fn restore_state(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::UnexpectedExit {
            id: self.id,
            exit: "too many CPUID entries".into(),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        // SAFETY: the XSAVE area was read from KVM by `save_state` with the
        // same (legacy, 4 KiB) layout KVM_SET_XSAVE takes.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(self.ioctl("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&s.xcrs)
            .map_err(self.ioctl("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(self.ioctl("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&s.lapic)
            .map_err(self.ioctl("KVM_SET_LAPIC"))?;
        const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
        let mut entries = s.msrs.clone();
        entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
        for chunk in entries.chunks(64) {
            let m = self.msrs(chunk)?;
            let n = self.fd.set_msrs(&m).map_err(self.ioctl("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                for e in chunk {
                    let one = self.msrs(&[*e])?;
                    if !matches!(self.fd.set_msrs(&one), Ok(1)) {
                        tracing::debug!("vCPU {}: KVM refused saved MSR {:#x}", self.id, e.index);
                    }
                }
            }
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(self.ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Pause here: finish the exit in progress (KVM completes a port or
    /// MMIO read into the registers on the next entry, which
    /// `immediate_exit` makes return at once), save the state, wait.
    fn pause(&mut self, control: &VcpuControl, msr_list: &[u32], stop: &AtomicBool) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let state = self.save_state(msr_list).map_err(|e| e.to_string());
        control.park(self.id, state, stop);
    }

    /// Run until the guest stops, fails, or `stop` is set (and the thread is
    /// kicked with the vCPU kick signal).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<VcpuStop, VcpuError> {
        self.run_controlled(stop, None)
    }

    /// [`Vcpu::run`], pausing when `control` asks (with the MSR list a
    /// saved state reads).
    pub fn run_controlled(
        &mut self,
        stop: &AtomicBool,
        control: Option<(&VcpuControl, &[u32])>,
    ) -> Result<VcpuStop, VcpuError> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(VcpuStop::Requested);
            }
            if let Some((c, msrs)) = control {
                if c.wants_pause() {
                    self.pause(c, msrs, stop);
                    continue;
                }
            }
            let id = self.id;
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            self.log_unhandled(false, u64::from(port));
                        }
                    }
                    VcpuExit::IoOut(port, data) => {
                        if !self.pio.write(u64::from(port), data) {
                            self.log_unhandled(false, u64::from(port));
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            self.log_unhandled(true, addr);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !self.mmio.write(addr, data) {
                            self.log_unhandled(true, addr);
                        }
                    }
                    VcpuExit::Hlt => return Ok(VcpuStop::Halted),
                    VcpuExit::Shutdown => {
                        tracing::error!("vCPU {id}: triple fault: {}", self.state_line());
                        return Err(VcpuError::TripleFault(id));
                    }
                    VcpuExit::FailEntry(reason, _cpu) => {
                        return Err(VcpuError::FailEntry { id, reason })
                    }
                    VcpuExit::InternalError => {
                        let rip = self.rip();
                        return Err(VcpuError::InternalError { id, rip });
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        return match kind {
                            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                                Ok(VcpuStop::GuestReset)
                            }
                            KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::GuestCrash(id)),
                            other => Err(VcpuError::UnexpectedExit {
                                id,
                                exit: format!("system event {other}"),
                            }),
                        };
                    }
                    other => {
                        return Err(VcpuError::UnexpectedExit {
                            id,
                            exit: format!("{other:?}"),
                        })
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or a spurious wakeup): re-check `stop`.
                }
                Err(source) => {
                    return Err(VcpuError::Ioctl {
                        id,
                        what: "KVM_RUN",
                        source,
                    })
                }
            }
        }
    }

    /// Spawn the vCPU thread. It installs `filter` (if any), waits at
    /// `start` for the VMM thread to install its own, then runs. When it
    /// ends it sends its result on `done` and writes `exit_evt` so the event
    /// loop wakes up.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        mut self,
        filter: Option<Arc<BpfProgram>>,
        start: Arc<Barrier>,
        stop: Arc<AtomicBool>,
        control: Arc<VcpuControl>,
        msr_list: Arc<Vec<u32>>,
        done: Sender<VcpuResult>,
        exit_evt: EventFd,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("ks_vcpu{}", self.id))
            .spawn(move || {
                let filtered = match &filter {
                    Some(prog) => crate::seccomp::install(prog),
                    None => Ok(()),
                };
                start.wait();
                let res = match filtered {
                    Ok(()) => self.run_controlled(&stop, Some((&control, &msr_list))),
                    Err(e) => Err(VcpuError::Seccomp {
                        id: self.id,
                        source: e,
                    }),
                };
                let _ = done.send((self.id, res));
                if let Err(e) = exit_evt.write(1) {
                    tracing::error!("vCPU {}: cannot notify the VMM: {e}", self.id);
                }
            })
    }
}

/// Where the guest was and in which mode, to tell a guest bug from a host
/// one. On AMD, KVM puts the vCPU through INIT before it reports a shutdown
/// (the VMCB is undefined after one), so what reads back is the reset state:
/// say so rather than print it as the guest's.
fn state_line(r: &kvm_regs, s: &kvm_sregs) -> String {
    if r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cr0 & 1 == 0 {
        return "registers read back as the reset state (KVM on AMD resets the vCPU before it reports a shutdown)".into();
    }
    format!(
        "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_state_line_tells_the_reset_state_from_the_guests() {
        let mut r = kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let mut s = kvm_sregs::default();
        s.cs.selector = 0xf000;
        s.cr0 = 0x10;
        assert!(state_line(&r, &s).contains("reset state"));
        r.rip = 0xffff_ffff_8100_0000;
        s.cs.selector = 0x10;
        s.cr0 = 0x8005_0033;
        let line = state_line(&r, &s);
        assert!(line.starts_with("rip 0xffffffff81000000 "), "{line}");
        assert!(line.contains("cr0 0x80050033"), "{line}");
    }
}
