//! Seccomp: one allowlist per thread kind, installed by each thread before
//! the guest runs. Anything else kills the whole VMM process (SIGSYS), so a
//! compromised device or vCPU thread cannot reach the rest of the kernel.
//!
//! | thread | syscalls | why |
//! |---|---|---|
//! | vCPU (`ks_vcpuN`) | [`VCPU_SYSCALLS`] | KVM_RUN, and KVM_GET_* of its own state only (read-only: the state logged on a fatal exit, or saved when it pauses), eventfd/console writes, locks, allocation, the kick signal, closing fds (`fcntl` only as F_GETFD), thread exit |
//! | VMM (event loop) | [`VMM_SYSCALLS`] | epoll, eventfds, disk I/O, AF_UNIX sockets for vsock, timers, terminal restore, allocation, vCPU kicks, exit |
//! | VMM with `--snapshot-dir` | [`VMM_SYSCALLS`] + [`SNAPSHOT_SYSCALLS`] | the above, and writing a snapshot: `openat`/`renameat` relative to the snapshot directory's descriptor, `ftruncate`, KVM_GET_IRQCHIP/PIT2/CLOCK |
//!
//! Both stay under Firecracker's sizes (VMM 50, vCPU 27). A few calls are
//! narrowed by argument: `ioctl` to the listed request numbers, `socket` to
//! `AF_UNIX`, `tgkill` to the VMM's own threads with the kick signal,
//! `mmap`/`mprotect` to mappings without `PROT_EXEC`. No thread may
//! `unlink`; paths for `connect` cannot be checked by seccomp (a pointer),
//! which is the jail's job (an empty root holding only the vsock socket
//! directory, read-only; a private network namespace for abstract
//! sockets).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("cannot build the seccomp filter: {0}")]
    Build(seccompiler::BackendError),
    /// The SIGSYS handler of `--seccomp-log` could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// The kinds of thread the VMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread: event loop and devices.
    Vmm,
    /// The VMM thread of a VM that writes snapshots into the directory
    /// open at this descriptor: [`Vmm`](ThreadKind::Vmm) plus
    /// [`SNAPSHOT_SYSCALLS`] (`openat`/`renameat` on that descriptor only)
    /// and the VM-wide KVM reads (irqchip, PIT, clock).
    VmmSnapshots(i32),
    /// A vCPU thread.
    Vcpu,
    /// The jail's supervisor process outside the namespaces: it only waits
    /// for the jailed VMM, forwards signals and cleans up.
    Supervisor,
}

/// What a syscall outside the allowlist does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Kill the process (SIGSYS), the default.
    Kill,
    /// Debugging (`--seccomp-log`): log the syscall number on stderr, then
    /// end the process.
    Log,
}

// KVM ioctl request numbers.
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
// Terminal ioctls (restoring the console's mode at exit).
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TCSETSW: u64 = 0x5403;
const TCSETSF: u64 = 0x5404;
// Non-blocking mode on accepted vsock streams (`set_nonblocking`).
const FIONBIO: u64 = 0x5421;

const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const IOC_R: u64 = 2;
const IOC_RW: u64 = 3;
// What a vCPU thread reads of itself when it pauses (snapshots).
const KVM_GET_MSRS: u64 = kvm_ioc(IOC_RW, 0x88, size_of::<kvm_bindings::kvm_msrs>());
const KVM_GET_LAPIC: u64 = kvm_ioc(IOC_R, 0x8e, size_of::<kvm_bindings::kvm_lapic_state>());
const KVM_GET_CPUID2: u64 = kvm_ioc(IOC_RW, 0x91, size_of::<kvm_bindings::kvm_cpuid2>());
const KVM_GET_MP_STATE: u64 = kvm_ioc(IOC_R, 0x98, size_of::<kvm_bindings::kvm_mp_state>());
const KVM_GET_VCPU_EVENTS: u64 = kvm_ioc(IOC_R, 0x9f, size_of::<kvm_bindings::kvm_vcpu_events>());
const KVM_GET_DEBUGREGS: u64 = kvm_ioc(IOC_R, 0xa1, size_of::<kvm_bindings::kvm_debugregs>());
const KVM_GET_XSAVE: u64 = kvm_ioc(IOC_R, 0xa4, size_of::<kvm_bindings::kvm_xsave>());
const KVM_GET_XCRS: u64 = kvm_ioc(IOC_R, 0xa6, size_of::<kvm_bindings::kvm_xcrs>());
// What the VMM thread reads of the VM for a snapshot.
const KVM_GET_IRQCHIP: u64 = kvm_ioc(IOC_RW, 0x62, size_of::<kvm_bindings::kvm_irqchip>());
const KVM_GET_PIT2: u64 = kvm_ioc(IOC_R, 0x9f, size_of::<kvm_bindings::kvm_pit_state2>());
const KVM_GET_CLOCK: u64 = kvm_ioc(IOC_R, 0x7c, size_of::<kvm_bindings::kvm_clock_data>());

/// What the VMM thread adds when it writes snapshots: files created and
/// renamed in the snapshot directory (`openat`/`renameat` only relative to
/// its descriptor; an absolute path cannot be refused by seccomp, which is
/// the jail's job: inside it there is nothing else to open), sized and
/// synced.
pub const SNAPSHOT_SYSCALLS: &[i64] = &[libc::SYS_openat, libc::SYS_renameat, libc::SYS_ftruncate];

/// Syscalls of a vCPU thread (`ioctl` narrowed to KVM_RUN, the KVM reads
/// of the state it logs on a fatal exit or saves when it pauses).
pub const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_write,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_exit,
];

/// Syscalls of the jail supervisor (`kill` to forward SIGTERM/SIGINT).
pub const SUPERVISOR_SYSCALLS: &[i64] = &[
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_restart_syscall,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Syscalls of the VMM thread (`ioctl` narrowed to terminal modes and FIONBIO,
/// `socket` to AF_UNIX).
pub const VMM_SYSCALLS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_timerfd_settime,
    libc::SYS_ioctl,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_tgkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn arg_eq(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    let c = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
    SeccompRule::new(vec![c])
}

/// `mmap`/`mprotect` without `PROT_EXEC` (argument 2): nothing the VMM
/// maps after confinement is code, so a compromised thread cannot make
/// writable memory executable.
fn no_exec() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let c = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    Ok(vec![SeccompRule::new(vec![c])?])
}

/// The allowlist of `kind` as seccompiler rules, for the process `pid` (as
/// it sees itself: inside the jail's PID namespace, 1).
fn rules(
    kind: ThreadKind,
    pid: u32,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let list = match kind {
        ThreadKind::Vcpu => VCPU_SYSCALLS,
        ThreadKind::Vmm | ThreadKind::VmmSnapshots(_) => VMM_SYSCALLS,
        ThreadKind::Supervisor => SUPERVISOR_SYSCALLS,
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = list.iter().map(|&nr| (nr, vec![])).collect();
    if let ThreadKind::VmmSnapshots(dirfd) = kind {
        let at_dir =
            |i| SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, dirfd as u64);
        map.insert(libc::SYS_openat, vec![SeccompRule::new(vec![at_dir(0)?])?]);
        map.insert(
            libc::SYS_renameat,
            vec![SeccompRule::new(vec![at_dir(0)?, at_dir(2)?])?],
        );
        map.insert(libc::SYS_ftruncate, vec![]);
    }
    if kind != ThreadKind::Supervisor {
        map.insert(libc::SYS_mmap, no_exec()?);
        map.insert(libc::SYS_mprotect, no_exec()?);
    }
    match kind {
        ThreadKind::Vcpu => {
            map.insert(
                libc::SYS_ioctl,
                [
                    KVM_RUN,
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_GET_MSRS,
                    KVM_GET_LAPIC,
                    KVM_GET_CPUID2,
                    KVM_GET_MP_STATE,
                    KVM_GET_VCPU_EVENTS,
                    KVM_GET_DEBUGREGS,
                    KVM_GET_XSAVE,
                    KVM_GET_XCRS,
                ]
                .iter()
                .map(|&req| arg_eq(1, req))
                .collect::<Result<_, _>>()?,
            );
            // Rust's debug builds check an fd is open before closing it.
            map.insert(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)?]);
        }
        ThreadKind::Vmm | ThreadKind::VmmSnapshots(_) => {
            let mut ioctls = vec![TCGETS, TCSETS, TCSETSW, TCSETSF, FIONBIO];
            if matches!(kind, ThreadKind::VmmSnapshots(_)) {
                ioctls.extend([KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK]);
            }
            map.insert(
                libc::SYS_ioctl,
                ioctls
                    .iter()
                    .map(|&req| arg_eq(1, req))
                    .collect::<Result<_, _>>()?,
            );
            map.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
            // Kicking our own vCPU threads out of KVM_RUN, and nothing else:
            // no signal to another process, no other signal.
            let own =
                SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid.into())?;
            let kick = SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                crate::signals::vcpu_kick_signal() as u64,
            )?;
            map.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own, kick])?]);
        }
        ThreadKind::Supervisor => {}
    }
    Ok(map)
}

/// The BPF program for `kind` in this process: allowed calls pass,
/// anything else kills the process.
pub fn program(kind: ThreadKind, violation: Violation) -> Result<BpfProgram, SeccompError> {
    program_for(kind, violation, std::process::id())
}

/// [`program`] for the process `pid`.
pub fn program_for(
    kind: ThreadKind,
    violation: Violation,
    pid: u32,
) -> Result<BpfProgram, SeccompError> {
    let mismatch = match violation {
        Violation::Kill => SeccompAction::KillProcess,
        Violation::Log => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        rules(kind, pid).map_err(SeccompError::Build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Build)
}

/// Install `prog` on the calling thread (and set no_new_privs).
pub fn install(prog: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(prog).map_err(SeccompError::Install)
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: after
/// si_signo, si_errno, si_code and padding (16 bytes), then `_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose
    // `_sigsys._syscall` int lies at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // Format without allocating: this runs in a signal handler.
    const PREFIX: &[u8] = b"keystone-vmm: seccomp: blocked syscall ";
    let mut buf = [0u8; 64];
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 || d == digits.len() {
            break;
        }
    }
    let mut len = PREFIX.len();
    for k in (0..d).rev() {
        buf[len] = digits[k];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2) and exit_group(2) are async-signal-safe; the buffer
    // is valid. Where exit_group is itself filtered (vCPU threads), the
    // nested violation kills the process: it ends either way.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, 159);
    }
}

/// With [`Violation::Log`]: catch SIGSYS to log the blocked syscall.
pub fn install_log_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError::Handler(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_structs() {
        // _IOR(KVMIO, nr, T): read direction, size of T, type 0xAE.
        let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr;
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
    }

    #[test]
    fn lists_stay_within_firecrackers_sizes() {
        assert!(VCPU_SYSCALLS.len() <= 27, "{}", VCPU_SYSCALLS.len());
        assert!(VMM_SYSCALLS.len() <= 50, "{}", VMM_SYSCALLS.len());
        assert!(VMM_SYSCALLS.len() + SNAPSHOT_SYSCALLS.len() <= 50);
        assert!(program(ThreadKind::VmmSnapshots(3), Violation::Kill).is_ok());
        assert!(SUPERVISOR_SYSCALLS.len() <= 20);
        // Only the jail's supervisor outside removes files (the socket).
        assert!(!VMM_SYSCALLS.contains(&libc::SYS_unlink));
        assert!(!VCPU_SYSCALLS.contains(&libc::SYS_unlink));
        assert!(program(ThreadKind::Supervisor, Violation::Kill).is_ok());
        assert!(program(ThreadKind::Vmm, Violation::Log).is_ok());
        for list in [VCPU_SYSCALLS, VMM_SYSCALLS, SUPERVISOR_SYSCALLS] {
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_clone,
                libc::SYS_openat,
                libc::SYS_ptrace,
            ] {
                assert!(!list.contains(&forbidden));
            }
        }
        assert!(program(ThreadKind::Vcpu, Violation::Kill).is_ok());
        assert!(program(ThreadKind::Vmm, Violation::Kill).is_ok());
    }

    /// A pid no process has, standing in for the child's until it knows it.
    const SENTINEL_PID: u32 = 0x3fff_fff7;

    /// Runs `f` in a forked child with `kind`'s filter installed (for the
    /// child's own pid); returns the signal that killed it, or None if it
    /// exited 0.
    fn in_filtered_child(kind: ThreadKind, f: fn()) -> Option<i32> {
        let mut prog = program_for(kind, Violation::Kill, SENTINEL_PID).unwrap();
        // SAFETY: fork(2) in a test process; the child only patches the
        // prebuilt filter in place, installs it (prctl/seccomp syscalls, no
        // allocation), makes raw syscalls and leaves with _exit, all
        // async-signal-safe.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: getpid has no arguments.
            let me = unsafe { libc::getpid() } as u32;
            for insn in prog.iter_mut() {
                if insn.k == SENTINEL_PID {
                    insn.k = me;
                }
            }
            if install(&prog).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(2) };
            }
            f();
            // SAFETY: exit(2) of the only thread ends the child; both
            // allowlists permit it (exit_group is not in the vCPU list).
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        if libc::WIFSIGNALED(status) {
            Some(libc::WTERMSIG(status))
        } else {
            assert_eq!(libc::WEXITSTATUS(status), 0, "child exit status");
            None
        }
    }

    #[test]
    fn a_snapshotting_vmm_thread_opens_only_relative_to_its_snapshot_dir() {
        // Standing in for the snapshot directory's descriptor: AT_FDCWD.
        let kind = ThreadKind::VmmSnapshots(libc::AT_FDCWD);
        let relative = in_filtered_child(kind, || {
            // SAFETY: openat(2) with a static NUL-terminated path.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                )
            };
            if fd < 0 {
                // SAFETY: exit(2) with an integer argument.
                unsafe { libc::syscall(libc::SYS_exit, 3) };
            }
        });
        assert_eq!(relative, None);
        let other_dir = in_filtered_child(kind, || {
            // SAFETY: openat(2) on fd 0 with a static path; the filter
            // kills the process first.
            unsafe { libc::syscall(libc::SYS_openat, 0, c"/dev/null".as_ptr(), libc::O_RDONLY) };
        });
        assert_eq!(other_dir, Some(libc::SIGSYS));
        // Without --snapshot-dir, no openat at all.
        let plain = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: as above.
            unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/dev/null".as_ptr(),
                    libc::O_RDONLY,
                )
            };
        });
        assert_eq!(plain, Some(libc::SIGSYS));
    }

    #[test]
    fn the_vmm_thread_signals_only_its_own_threads_and_maps_no_code() {
        // Its own thread, the kick signal: allowed.
        let kick = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: tgkill of this very thread with the kick signal,
            // which is blocked so the default action (terminate) cannot
            // run; then it stays pending until exit.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, crate::signals::vcpu_kick_signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                let r = libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    crate::signals::vcpu_kick_signal(),
                );
                if r != 0 {
                    libc::syscall(libc::SYS_exit, 3);
                }
            }
        });
        assert_eq!(kick, None);
        // SIGKILL to the parent (the process that started the VMM).
        let parent = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: the filter kills the caller before the signal is sent.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getppid(),
                    libc::getppid(),
                    libc::SIGKILL,
                );
            }
        });
        assert_eq!(parent, Some(libc::SIGSYS));
        // Another signal to itself.
        let other = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: as above.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::syscall(libc::SYS_gettid),
                    libc::SIGUSR1,
                );
            }
        });
        assert_eq!(other, Some(libc::SIGSYS));
        // unlink anywhere.
        let unlink = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: a valid C string; the filter kills before the call.
            unsafe {
                libc::syscall(libc::SYS_unlink, c"/tmp/keystone-never-there".as_ptr());
            }
        });
        assert_eq!(unlink, Some(libc::SIGSYS));
        // Writable memory made executable, from either thread kind.
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            let wx = in_filtered_child(kind, || {
                // SAFETY: an anonymous mapping (allowed: no PROT_EXEC), then
                // mprotect asking for PROT_EXEC, which the filter kills.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        libc::syscall(libc::SYS_exit, 3);
                    }
                    libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC);
                }
            });
            assert_eq!(wx, Some(libc::SIGSYS), "{kind:?}");
            let mapped_x = in_filtered_child(kind, || {
                // SAFETY: mmap asking for PROT_EXEC; the filter kills first.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                }
            });
            assert_eq!(mapped_x, Some(libc::SIGSYS), "{kind:?}");
        }
    }

    #[test]
    fn log_mode_names_the_blocked_syscall() {
        let prog = program(ThreadKind::Vcpu, Violation::Log).unwrap();
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) with a valid 2-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: as in `in_filtered_child`; the child also dup2s the pipe
        // onto stderr (async-signal-safe).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: dup2/close on fds we own; then the filtered syscall.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::close(fds[0]);
            }
            if install_log_handler().is_err() || install(&prog).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: execve with null pointers; the filter traps it first.
            unsafe {
                libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize);
                libc::syscall(libc::SYS_exit, 0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: read into a valid buffer from our pipe.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: waitpid on our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let text = String::from_utf8_lossy(&out);
        assert_eq!(
            text,
            format!(
                "keystone-vmm: seccomp: blocked syscall {}\n",
                libc::SYS_execve
            )
        );
        assert!(
            libc::WIFSIGNALED(status) || libc::WEXITSTATUS(status) == 159,
            "the process ends: {status:#x}"
        );
    }

    #[test]
    fn allowed_calls_pass() {
        let got = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: getpid-like raw syscalls with no pointer arguments.
            unsafe {
                libc::syscall(libc::SYS_gettid);
                libc::syscall(libc::SYS_sched_yield);
            }
        });
        assert_eq!(got, None);
        let got = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: socket(2) with integer arguments only.
            let fd =
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                // SAFETY: exit(2) with an integer argument.
                unsafe { libc::syscall(libc::SYS_exit, 3) };
            }
        });
        assert_eq!(got, None);
    }

    #[test]
    fn forbidden_calls_kill_the_process() {
        let execve = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: execve with null pointers; the filter kills the
            // process before the kernel looks at them.
            unsafe {
                libc::syscall(libc::SYS_execve, 0usize, 0usize, 0usize);
            }
        });
        assert_eq!(execve, Some(libc::SIGSYS));
        let inet = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: socket(2) with integer arguments only.
            unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            }
        });
        assert_eq!(inet, Some(libc::SIGSYS));
        let inet_vmm = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: socket(2) with integer arguments only.
            unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            }
        });
        assert_eq!(inet_vmm, Some(libc::SIGSYS), "only AF_UNIX sockets");
        let ioctl = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: an ioctl the filter rejects before it runs.
            unsafe {
                libc::syscall(libc::SYS_ioctl, 0, 0xae01u64, 0);
            }
        });
        assert_eq!(ioctl, Some(libc::SIGSYS), "KVM_CREATE_VM from a vCPU");
        let open = in_filtered_child(ThreadKind::Vmm, || {
            // SAFETY: a valid C string; the filter kills before the open.
            unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0);
            }
        });
        assert_eq!(open, Some(libc::SIGSYS));
    }
}
