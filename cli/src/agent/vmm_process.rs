//! The VMM process of a sandbox: the `keystone-vmm` arguments (and the one
//! place the guest's kernel command line is built), spawning the detached
//! supervisor that runs it, stopping it, and the logs it leaves.
//!
//! Below the guest session: nothing here speaks SSH or git.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::state::{now, AgentPaths, Network, ProcessId, Registry, Sandbox, Status};
use super::AgentError;
use crate::image::{Image, AUTHORIZED_KEY_PARAM, NAME_PARAM};

/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of the console log shown when a start fails.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// The VMM binary: `$KEYSTONE_VMM`, else `keystone-vmm` next to this
/// program or on PATH.
pub fn resolve_vmm() -> Result<PathBuf, AgentError> {
    std::env::var_os("KEYSTONE_VMM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| crate::binaries::find_binary("keystone-vmm"))
        .ok_or_else(|| {
            AgentError::Image(
                "keystone-vmm not found next to keystone or on PATH (or set KEYSTONE_VMM)".into(),
            )
        })
}

/// Kernel command-line key turning on the image's egress bridge (its
/// value: the host vsock port of the proxy).
pub const EGRESS_PARAM: &str = "keystone.egress";

/// The guest's kernel command line: the image's, then the sandbox name
/// ([`NAME_PARAM`]), then for SSH images the host user's public key
/// ([`AUTHORIZED_KEY_PARAM`], base64, so it is one token).
pub fn guest_cmdline(image_cmdline: &str, name: &str, authorized_key: Option<&str>) -> String {
    let mut cmdline = image_cmdline.trim().to_string();
    let tokens = std::iter::once(format!("{NAME_PARAM}={name}"))
        .chain(authorized_key.map(authorized_key_param));
    for token in tokens {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&token);
    }
    cmdline
}

/// The [`AUTHORIZED_KEY_PARAM`] token for `public_key`.
pub fn authorized_key_param(public_key: &str) -> String {
    use base64::Engine as _;
    format!(
        "{AUTHORIZED_KEY_PARAM}={}",
        base64::engine::general_purpose::STANDARD.encode(public_key.as_bytes())
    )
}

/// The keystone-vmm arguments for `s` booting `image` or, with `resume`,
/// restoring that snapshot directory (same devices, in the same order, for
/// this sandbox's disk, CID, sockets and MAC); `authorized_key` is the host
/// user's public key (`<type> <base64> <comment>`) for images that run
/// sshd.
pub fn launch_args(
    s: &Sandbox,
    image: &Image,
    authorized_key: Option<&str>,
    resume: Option<&Path>,
) -> Result<Vec<String>, AgentError> {
    let path = |p: &Path, what: &str| -> Result<String, AgentError> {
        let text = p.to_str().ok_or_else(|| {
            AgentError::Image(format!("{what} path {} is not UTF-8", p.display()))
        })?;
        if text.contains(',') {
            return Err(AgentError::Image(format!(
                "{what} path {text} contains ',', which keystone-vmm's --disk cannot take"
            )));
        }
        Ok(text.to_string())
    };
    let mut args = Vec::new();
    if let Some(dir) = resume {
        // The kernel, its command line and the CPUID come from the snapshot.
        args.extend(["--restore".to_string(), path(dir, "snapshot")?]);
    } else {
        let mut cmdline = guest_cmdline(&image.manifest.cmdline, &s.name, authorized_key);
        if s.network == Network::Policy {
            // The image's egress bridge: 127.0.0.1:3128 in the guest to host
            // vsock port EGRESS_PORT, and the proxy variables naming it.
            cmdline.push_str(&format!(" {EGRESS_PARAM}={}", super::egress::EGRESS_PORT));
        }
        args.extend(["--kernel".to_string(), path(&image.kernel(), "kernel")?]);
        if let Some(initrd) = image.initrd() {
            args.push("--initrd".into());
            args.push(path(&initrd, "initrd")?);
        }
        args.extend(["--cmdline".into(), cmdline]);
        if !s.nested {
            args.push("--no-nested".into());
        }
    }
    args.extend([
        "--memory".into(),
        s.memory_mib.to_string(),
        "--vcpus".into(),
        s.vcpus.to_string(),
    ]);
    if let Some(rootfs) = image.rootfs() {
        args.push("--disk".into());
        args.push(format!("{},ro", path(&rootfs, "rootfs")?));
    }
    args.push("--disk".into());
    args.push(path(&s.disk, "disk")?);
    args.push("--vsock".into());
    args.push(format!("{},{}", s.cid, s.vsock_uds.display()));
    if let Some(net) = s.network.vmm_arg(&s.name) {
        args.push("--net".into());
        args.push(net);
    }
    args.push("--boot-timer".into());
    // The control API, for `keystone agent snapshot` (the staging
    // directory is made before the VMM starts).
    args.extend([
        "--api-sock".into(),
        path(&s.api_socket(), "control socket")?,
        "--snapshot-dir".into(),
        path(&super::snapshot::staging_dir(s), "snapshot")?,
    ]);
    if jail_available().is_ok() {
        // The caller's own ids: as root uid 0 without any capability (the
        // sandbox's sockets are root's), otherwise what the user namespace
        // maps.
        // SAFETY: geteuid/getegid have no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        args.extend([
            "--jail".into(),
            "--jail-dir".into(),
            path(&s.jail_dir(), "jail")?,
            "--jail-uid".into(),
            uid.to_string(),
            "--jail-gid".into(),
            gid.to_string(),
        ]);
    }
    Ok(args)
}

/// Whether keystone-vmm's `--jail` can work for this user: always as root;
/// otherwise when the host lets an unprivileged process create a user
/// namespace (tried in a child: `unshare(CLONE_NEWUSER)`, then `true`).
/// The error says why not.
pub fn jail_available() -> Result<(), String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let mut cmd = Command::new("true");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child and only calls
    // unshare(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    match cmd.status() {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!("a test child exited {st}")),
        Err(e) => Err(format!("unprivileged user namespaces: {e}")),
    }
}

/// Spawns the supervisor of `name`, detached (new session, stdio to
/// `state/supervisor.log`, working directory `/`).
pub fn spawn_supervisor(paths: &AgentPaths, s: &Sandbox) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating keystone: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.supervisor_log())
        .map_err(|e| format!("{}: {e}", s.supervisor_log().display()))?;
    let log2 = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", s.supervisor_log().display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("agent")
        .arg("__supervise")
        .arg("--root")
        .arg(&paths.root)
        .arg(&s.name)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir("/");
    // SAFETY: setsid(2) is async-signal-safe; it only fails if we already
    // lead a process group, which a fresh child does not.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("starting the supervisor: {e}"))
}

/// SIGTERM to our supervisor child (it stops the VMM), SIGKILL if it
/// lingers; reaps it.
pub fn stop_supervisor_child(child: &mut std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops `s`'s processes: SIGTERM to the supervisor (which stops the VMM)
/// or to the VMM itself, SIGKILL after [`STOP_GRACE`]; then records it
/// stopped (unless another run took over) and removes its sockets. (The
/// guest's own poweroff, for SSH images, is the session layer's, asked
/// first by the verbs.)
pub fn stop_processes(reg: &Registry, s: &Sandbox) {
    let procs: Vec<ProcessId> = [s.vmm, s.supervisor, s.starter]
        .into_iter()
        .flatten()
        .collect();
    if let Some(sup) = s.supervisor.filter(|p| p.is_alive()) {
        sup.signal(libc::SIGTERM);
    } else if let Some(vmm) = s.vmm.filter(|p| p.is_alive()) {
        vmm.signal(libc::SIGTERM);
    }
    if let Some(starter) = s.starter.filter(|p| p.is_alive()) {
        if Some(starter) != ProcessId::current() {
            starter.signal(libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    let me = ProcessId::current();
    let others = || {
        procs
            .iter()
            .filter(|p| Some(**p) != me && p.is_alive())
            .count()
    };
    while others() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter().filter(|p| Some(**p) != me) {
        if p.is_alive() {
            p.signal(libc::SIGKILL);
            p.wait_gone(Duration::from_secs(2));
        }
    }
    let mut clean = false;
    let _ = reg.modify(&s.name, |r| {
        let taken_over = r
            .supervisor
            .is_some_and(|p| p.is_alive() && Some(p) != s.supervisor);
        if !taken_over {
            if r.status != Status::Failed {
                r.status = Status::Stopped;
            }
            r.vmm = None;
            r.supervisor = None;
            if r.starter != me {
                r.starter = None;
            }
            r.stopped_at = Some(now());
            clean = true;
        }
    });
    if clean {
        s.remove_sockets();
    }
}

/// Strips what a terminal would interpret from guest output (escape
/// sequences, other control characters), keeping tabs.
pub fn sanitize_for_terminal(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\t' || !c.is_control() { c } else { '?' })
        .collect()
}

/// The last `lines` lines of `path` (at most its last 64 KiB), sanitized.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| sanitize_for_terminal(l))
        .collect()
}

/// The console and VMM log tails shown when a start fails.
pub fn boot_logs(s: &Sandbox) -> String {
    let mut out = String::new();
    for (what, path, n) in [
        ("console", s.console_log(), CONSOLE_TAIL_LINES),
        ("keystone-vmm log", s.vmm_log(), 10),
    ] {
        let lines = tail(&path, n);
        out.push_str(&format!(
            "--- {what} ({}), last lines ---\n",
            path.display()
        ));
        if lines.is_empty() {
            out.push_str("(empty)\n");
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_output_is_sanitized() {
        assert_eq!(
            sanitize_for_terminal("ok\x1b[31mred\x07\tx"),
            "ok?[31mred?\tx"
        );
    }

    #[test]
    fn the_guest_command_line_names_the_sandbox_once_and_carries_the_key() {
        let plain = guest_cmdline(" console=ttyS0 quiet ", "alpha", None);
        assert_eq!(plain, "console=ttyS0 quiet keystone.name=alpha");
        let key = "ssh-ed25519 AAAAC3Nza user@host";
        let with_key = guest_cmdline("console=ttyS0", "alpha", Some(key));
        assert_eq!(with_key.matches("keystone.name=").count(), 1, "{with_key}");
        let token = with_key
            .split(' ')
            .find_map(|t| t.strip_prefix("keystone.authorized_key="))
            .expect("a key token");
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token)
            .unwrap();
        assert_eq!(decoded, key.as_bytes());
        assert_eq!(guest_cmdline("", "b", None), "keystone.name=b");
    }
}
