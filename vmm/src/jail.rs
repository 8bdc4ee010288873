//! The jail (`keystone-vmm --jail`): the VMM runs as PID 1 of a new PID
//! namespace and, once the VM is built and before any guest instruction
//! runs, confines itself:
//!
//! - without root, first a user namespace that maps only the caller's own
//!   uid and gid (so nothing needs privilege and every file the caller
//!   could open stays the caller's, nothing more);
//! - new mount, IPC, UTS and network namespaces (the VMM needs no network:
//!   a tap fd and the passt socket were opened before, and keep working;
//!   abstract Unix sockets are per network namespace, so none of the
//!   host's is reachable);
//! - `pivot_root` into an empty tmpfs that holds only the directory of the
//!   vsock socket (for guest-initiated connections to `UDS_PATH_<port>`),
//!   bind-mounted alone (not its submounts) and read-only (connecting to a
//!   socket needs no writable mount), the root remounted read-only; the
//!   kernel, disks, `/dev/kvm` and tap are already open and are not in the
//!   jail at all;
//! - rlimits (no core dumps, which would contain guest memory; a bounded
//!   number of open files);
//! - every capability dropped (bounding, effective, permitted,
//!   inheritable), no supplementary groups (as root; a user namespace
//!   cannot drop them), the jail's uid/gid (root: default 65534), and
//!   no_new_privs; the seccomp filters follow.
//!
//! The process that started it stays outside as a small supervisor: it
//! forwards SIGTERM/SIGINT and exits with the VMM's exit status.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Errors entering or setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The host allows no user namespace to an unprivileged user.
    #[error("--jail without root needs user namespaces, which this host refuses ({0}); run as root or without --jail")]
    NoUserNamespace(std::io::Error),
    /// A system call failed.
    #[error("jail: {what} failed: {source}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// The errno.
        source: std::io::Error,
    },
    /// A path cannot be used.
    #[error("jail: bad path {0}")]
    Path(PathBuf),
}

/// Jail settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// Where the jail's root is mounted (a fresh tmpfs).
    pub root: PathBuf,
    /// Unprivileged uid the VMM runs as.
    pub uid: u32,
    /// Unprivileged gid the VMM runs as.
    pub gid: u32,
    /// Enter a user namespace first (not root: `uid`/`gid` are then the
    /// caller's own).
    pub user_namespace: bool,
}

/// Most open files the jailed VMM may hold.
pub const JAIL_NOFILE: u64 = 4096;

fn sys(what: &'static str, rc: libc::c_long) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        Err(JailError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Path(p.to_path_buf()))
}

/// The jailed VMM's pid, for the supervisor's signal handler.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our child.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Where the caller continues after [`enter_pid_namespace`].
pub enum Side {
    /// The jailed VMM (PID 1 of the new namespace): build and run the VM.
    Vmm,
    /// The supervisor outside: exit with this code.
    Supervisor(i32),
}

/// Enters a user namespace mapping only the caller's uid and gid to
/// themselves (`setgroups` denied, as the kernel requires for an
/// unprivileged gid map). The process then holds every capability inside
/// it and none outside.
fn enter_user_namespace(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: unshare with a flag constant, on the only thread.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } < 0 {
        return Err(JailError::NoUserNamespace(std::io::Error::last_os_error()));
    }
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(file, text).map_err(|source| JailError::Sys {
            what: "writing the user namespace's id maps",
            source,
        })?;
    }
    Ok(())
}

/// Create a PID namespace (inside a user namespace first when
/// `jail.user_namespace`) and fork into it. Must be called while the
/// process is single-threaded (first thing in `main`). The parent becomes a
/// supervisor that forwards SIGTERM/SIGINT and returns the child's exit
/// status; the child returns [`Side::Vmm`].
pub fn enter_pid_namespace(jail: &JailConfig) -> Result<Side, JailError> {
    if jail.user_namespace {
        enter_user_namespace(jail.uid, jail.gid)?;
    }
    // SAFETY: unshare with a flag constant; affects only future children.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    sys("unshare(CLONE_NEWPID)", rc as libc::c_long)?;
    // SAFETY: the process is single-threaded here (documented contract), so
    // the child may run arbitrary code after fork.
    let pid = sys("fork", unsafe { libc::fork() } as libc::c_long)? as libc::pid_t;
    if pid == 0 {
        // Die with the supervisor.
        // SAFETY: prctl with integer arguments.
        sys("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
        } as libc::c_long)?;
        return Ok(Side::Vmm);
    }
    CHILD_PID.store(pid, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, forward_signal).map_err(|e| {
            JailError::Sys {
                what: "sigaction",
                source: e.into(),
            }
        })?;
    }
    // The supervisor only waits, forwards signals and cleans up: filter it
    // too.
    let prog = crate::seccomp::program(
        crate::seccomp::ThreadKind::Supervisor,
        crate::seccomp::Violation::Kill,
    )
    .map_err(|e| JailError::Sys {
        what: "seccomp filter",
        source: std::io::Error::other(e.to_string()),
    })?;
    crate::seccomp::install(&prog).map_err(|e| JailError::Sys {
        what: "seccomp filter",
        source: std::io::Error::other(e.to_string()),
    })?;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Ok(Side::Supervisor(code));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(JailError::Sys {
                what: "waitpid",
                source: err,
            });
        }
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype
        .map(|f| CString::new(f).map_err(|_| JailError::Path(f.into())))
        .transpose()?;
    let data = data
        .map(|d| CString::new(d).map_err(|_| JailError::Path(d.into())))
        .transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a valid NUL-terminated string
    // that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    sys("mount", rc as libc::c_long).map(|_| ())
}

/// Confine the (built, not yet running) VMM: namespaces, a read-only tmpfs
/// root holding only `keep_dir` (bind-mounted at the same path, for vsock),
/// rlimits, no capabilities, `uid`/`gid`, no_new_privs.
pub fn confine(jail: &JailConfig, keep_dir: Option<&Path>) -> Result<(), JailError> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    // SAFETY: unshare with flag constants, on the calling (only) thread.
    let rc = unsafe { libc::unshare(flags) };
    sys("unshare(mount, ipc, uts, net)", rc as libc::c_long)?;
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    let root = &jail.root;
    std::fs::create_dir_all(root).map_err(|source| JailError::Sys {
        what: "mkdir jail root",
        source,
    })?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )?;
    if let Some(dir) = keep_dir {
        let rel = dir
            .strip_prefix("/")
            .map_err(|_| JailError::Path(dir.to_path_buf()))?;
        let inside = root.join(rel);
        std::fs::create_dir_all(&inside).map_err(|source| JailError::Sys {
            what: "mkdir socket dir in jail",
            source,
        })?;
        // The directory alone, not what is mounted below it; read-only,
        // keeping the flags the kernel locks on a mount from the parent
        // namespace (a user namespace may add flags, never drop them).
        mount(Some(dir), &inside, None, libc::MS_BIND, None)?;
        mount(
            None,
            &inside,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | locked_flags(dir)?,
            None,
        )?;
    }
    let old = root.join(".old");
    std::fs::create_dir_all(&old).map_err(|source| JailError::Sys {
        what: "mkdir .old",
        source,
    })?;
    let (root_c, old_c) = (cstr(root)?, cstr(&old)?);
    // SAFETY: pivot_root(2) through syscall(2) with two valid C strings.
    sys("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr())
    })?;
    std::env::set_current_dir("/").map_err(|source| JailError::Sys {
        what: "chdir /",
        source,
    })?;
    let old_in = CString::new("/.old").map_err(|_| JailError::Path("/.old".into()))?;
    // SAFETY: umount2 with a valid C string and a flag constant.
    let rc = unsafe { libc::umount2(old_in.as_ptr(), libc::MNT_DETACH) };
    sys("umount2(/.old)", rc as libc::c_long)?;
    std::fs::remove_dir("/.old").map_err(|source| JailError::Sys {
        what: "rmdir /.old",
        source,
    })?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )?;
    let host = b"keystone-vmm";
    // SAFETY: a valid buffer and its length.
    let rc = unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) };
    sys("sethostname", rc as libc::c_long)?;

    for (res, limit) in [(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, JAIL_NOFILE)] {
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: a valid rlimit struct.
        sys("setrlimit", unsafe { libc::setrlimit(res, &rl) }
            as libc::c_long)?;
    }

    // Drop every capability from the bounding set, then the ids: with no
    // keep-caps, setresuid to a non-zero uid clears the effective and
    // permitted sets too.
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments; EINVAL past the last
        // capability the kernel knows is expected and ends the loop.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            break;
        }
    }
    if !jail.user_namespace {
        // SAFETY: setgroups with an empty list.
        sys("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) }
            as libc::c_long)?;
    }
    // SAFETY: setresgid/setresuid with integer ids.
    let rc = unsafe { libc::setresgid(jail.gid, jail.gid, jail.gid) };
    sys("setresgid", rc as libc::c_long)?;
    // SAFETY: as above.
    let rc = unsafe { libc::setresuid(jail.uid, jail.uid, jail.uid) };
    sys("setresuid", rc as libc::c_long)?;
    // A uid that did not change (uid 0 kept by root, or the caller's own in
    // a user namespace) keeps its capabilities: clear every set.
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset(2) with a valid header and the two data structs
    // version 3 takes; no libc wrapper exists.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    sys("capset", rc)?;
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    sys("prctl(PR_SET_NO_NEW_PRIVS)", rc as libc::c_long)?;
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3` (two 32-bit data structs).
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The mount flags of `dir`'s mount that a bind remount must keep.
fn locked_flags(dir: &Path) -> Result<libc::c_ulong, JailError> {
    let c = cstr(dir)?;
    // SAFETY: statvfs only writes into the zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid statvfs pointer.
    sys("statvfs", unsafe { libc::statvfs(c.as_ptr(), &mut st) }
        as libc::c_long)?;
    let pairs = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}
