//! The supervisor: one process per running sandbox (`keystone agent
//! __supervise <name>`, started detached by `start`), living as long as
//! its VMM.
//!
//! It binds the guest's vsock ports on the host side before the VMM exists
//! (the VMM forwards guest connections to host port P to `<uds>_P`):
//! [`READY_PORT`] for the readiness message and [`NOTIFY_PORT`] for commit
//! notifications. Then it spawns `keystone-vmm` (stdout, the serial console,
//! to `state/console.log`; stderr through a pipe into `state/vmm.log`, which
//! rotates like the supervisor's own log, see [`super::logs`]; SIGKILLed by the kernel
//! if the supervisor dies), records both pids, and waits. A valid readiness
//! message marks the sandbox `running`; SIGTERM/SIGINT/SIGHUP stop the VMM
//! (SIGTERM, then SIGKILL after 10 s); when the VMM exits the sandbox is
//! marked `stopped` (or `failed` if it never got ready) and the sockets are
//! removed. Its own stdout and stderr are `state/supervisor.log`; lines the
//! guest can trigger go through [`guest_log`]'s budget.
//!
//! # Readiness protocol (guest → host port 1024)
//!
//! One connection, lines ending in `\n`, then the guest closes:
//!
//! ```text
//! keystone-ready 1
//! hostkey <type> <base64>     (zero or more)
//! end
//! ```
//!
//! At most [`MAX_HOST_KEYS`] keys, lines of at most [`MAX_LINE`] bytes, the
//! whole message within [`READY_READ_TIMEOUT`]. The keys are saved as
//! `state/host_keys` (`<type> <base64>` per line). If that file already
//! holds other keys (the guest's key changed since the disk was made), the
//! sandbox fails instead: a changed host key is never accepted silently
//! (`start --fresh` makes a new disk and forgets the old keys).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use super::logs::{GuestLines, RotatingLog, LOG_CAP};

use super::state::{
    format_time, now, write_atomic, AgentPaths, Network, ProcessId, Sandbox, Status, SyncMode,
};
use super::AgentError;
use crate::image::{NOTIFY_PORT, READY_PORT};

/// First line of the readiness message.
pub const READY_HEADER: &str = "keystone-ready 1";
/// Longest readiness line, in bytes.
pub const MAX_LINE: usize = 16 * 1024;
/// Most host keys in one readiness message.
pub const MAX_HOST_KEYS: usize = 16;
/// How long the guest has to send the whole readiness message.
pub const READY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the VMM has to exit after SIGTERM before it gets SIGKILL.
pub const VMM_STOP_GRACE: Duration = Duration::from_secs(10);

/// What the supervisor calls back into the guest session above it (see
/// `session::supervisor_hooks`): it knows when, not how.
#[derive(Clone, Copy)]
pub struct GuestHooks {
    /// A guest commit notification arrived (sync modes `auto-commit` and
    /// `auto-idle`), one call at a time.
    pub on_commit: fn(&Sandbox),
    /// The `auto-idle` loop, started once the guest is ready; returns once
    /// the flag is set.
    pub idle_watch: fn(Sandbox, &AtomicBool),
}

/// Set by the signal handler: stop the VMM and exit.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The supervisor's log (`state/supervisor.log`, also its stdout and
/// stderr), once `supervise` opened it; until then lines go to stderr.
static LOG: Mutex<Option<RotatingLog>> = Mutex::new(None);
/// The budget of lines a guest can trigger.
static GUEST_LINES: Mutex<Option<GuestLines>> = Mutex::new(None);

/// Writes one line (or a few) to the supervisor's log.
pub fn log(msg: impl std::fmt::Display) {
    let line = format!(
        "{} supervisor[{}]: {msg}\n",
        format_time(now()),
        std::process::id()
    );
    let mut guard = LOG.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_mut() {
        Some(log) => {
            if log.write(line.as_bytes()).is_err() {
                eprint!("{line}");
            }
        }
        None => eprint!("{line}"),
    }
}

/// [`log`] for a line the guest triggered: a burst, then one per
/// [`super::logs::GUEST_LINES_EVERY`], saying how many were dropped.
pub fn guest_log(msg: impl std::fmt::Display) {
    let allowed = {
        let mut guard = GUEST_LINES.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .get_or_insert_with(|| GuestLines::new(Instant::now()))
            .allow(Instant::now())
    };
    match allowed {
        Some(0) => log(msg),
        Some(n) => log(format_args!(
            "{msg} ({n} earlier guest-triggered line{} dropped)",
            if n == 1 { "" } else { "s" }
        )),
        None => {}
    }
}

/// One SSH host key from a readiness message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostKey {
    /// Key type, e.g. `ssh-ed25519`.
    pub kind: String,
    /// The base64 key blob.
    pub base64: String,
}

/// Why a readiness message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadyError {
    /// Reading failed or timed out.
    #[error("reading the readiness message: {0}")]
    Read(String),
    /// The first line is not `keystone-ready 1`.
    #[error("not a readiness message (first line {0:?})")]
    Header(String),
    /// A line is neither `hostkey` nor `end`.
    #[error("unexpected line {0:?}")]
    Line(String),
    /// A line is too long or there are too many keys.
    #[error("readiness message too large")]
    TooLarge,
    /// The connection closed before `end`.
    #[error("readiness message ended before 'end'")]
    Truncated,
    /// No host key from an image that runs sshd: accepting it would leave
    /// nothing pinned, and a later message's key would be taken unchecked.
    #[error("readiness message without host keys from an image with SSH")]
    NoKeys,
}

/// At most 60 characters of untrusted text, escaped, for messages.
fn excerpt(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(60)])
        .escape_debug()
        .to_string()
}

fn valid_key_type(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._-".contains(&b))
}

fn valid_base64(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LINE
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// Parses a readiness message from `r` (see the module docs).
pub fn read_ready(r: impl Read) -> Result<Vec<HostKey>, ReadyError> {
    let mut r = BufReader::new(r.take((MAX_LINE * (MAX_HOST_KEYS + 2)) as u64));
    let mut line = Vec::new();
    let mut next = |line: &mut Vec<u8>| -> Result<bool, ReadyError> {
        line.clear();
        let n = r
            .by_ref()
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', line)
            .map_err(|e| ReadyError::Read(e.to_string()))?;
        if n == 0 {
            return Ok(false);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() > MAX_LINE {
                ReadyError::TooLarge
            } else {
                ReadyError::Truncated
            });
        }
        line.pop();
        Ok(true)
    };
    if !next(&mut line)? {
        return Err(ReadyError::Truncated);
    }
    if line != READY_HEADER.as_bytes() {
        return Err(ReadyError::Header(excerpt(&line)));
    }
    let mut keys = Vec::new();
    loop {
        if !next(&mut line)? {
            return Err(ReadyError::Truncated);
        }
        if line == b"end" {
            return Ok(keys);
        }
        let text = std::str::from_utf8(&line).map_err(|_| ReadyError::Line(excerpt(&line)))?;
        let mut parts = text.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("hostkey"), Some(kind), Some(b64), None)
                if valid_key_type(kind) && valid_base64(b64) =>
            {
                if keys.len() == MAX_HOST_KEYS {
                    return Err(ReadyError::TooLarge);
                }
                keys.push(HostKey {
                    kind: kind.to_string(),
                    base64: b64.to_string(),
                });
            }
            _ => return Err(ReadyError::Line(excerpt(&line))),
        }
    }
}

/// Parses a readiness message and, when the image runs sshd (`need_keys`),
/// insists on at least one host key.
pub fn read_ready_for(r: impl Read, need_keys: bool) -> Result<Vec<HostKey>, ReadyError> {
    let keys = read_ready(r)?;
    if need_keys && keys.is_empty() {
        return Err(ReadyError::NoKeys);
    }
    Ok(keys)
}

/// `state/host_keys` contents for `keys`.
pub fn host_keys_text(keys: &[HostKey]) -> String {
    keys.iter()
        .map(|k| format!("{} {}\n", k.kind, k.base64))
        .collect()
}

/// Saves the guest's host keys unless other keys are pinned already.
fn pin_host_keys(path: &Path, keys: &[HostKey]) -> Result<(), String> {
    let normalize = |text: &str| {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let new = host_keys_text(keys);
    if let Ok(old) = std::fs::read_to_string(path) {
        let old = normalize(&old);
        if !old.is_empty() && old != normalize(&new) {
            return Err(format!(
                "the guest's SSH host key changed (pinned in {}); refusing it: \
                 `keystone agent start --fresh` makes a new disk and forgets the old key",
                path.display()
            ));
        }
    }
    write_atomic(path, new.as_bytes()).map_err(|e| e.to_string())
}

/// What the listener threads tell the main loop.
enum Event {
    /// A valid readiness message came and the keys are saved.
    Ready,
    /// The sandbox must stop and be marked failed.
    Fatal(String),
}

/// Why the main loop ended.
enum Outcome {
    Exited(ExitStatus),
    Stop,
    Fatal(String),
}

fn ready_listener(
    listener: UnixListener,
    host_keys: std::path::PathBuf,
    need_keys: bool,
    tx: mpsc::Sender<Event>,
) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log(format_args!("ready port: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(READY_READ_TIMEOUT));
        let deadline = Instant::now() + READY_READ_TIMEOUT;
        let result = read_ready_for(
            DeadlineReader {
                stream: &stream,
                deadline,
            },
            need_keys,
        );
        drop(stream);
        let event = match result {
            Ok(keys) => match pin_host_keys(&host_keys, &keys) {
                Ok(()) => {
                    guest_log(format_args!(
                        "guest is ready ({} host key{})",
                        keys.len(),
                        if keys.len() == 1 { "" } else { "s" }
                    ));
                    Event::Ready
                }
                Err(e) => Event::Fatal(e),
            },
            Err(e) => {
                guest_log(format_args!("ready port: {e}"));
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Sends [`Event::Ready`] once the restored VMM's control API at `sock`
/// reports it running (polled; ends when the main loop is gone).
fn resume_watch(sock: &Path, tx: &mpsc::Sender<Event>) {
    loop {
        let answer = keystone_vmm::api::request(sock, r#"{"op":"state"}"#, Duration::from_secs(5));
        if matches!(&answer, Ok(v) if v["ok"] == true && v["state"] == "running") {
            log("the restored VM runs");
            let _ = tx.send(Event::Ready);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
        if STOP.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// A reader that fails once `deadline` passed, so a guest trickling bytes
/// cannot hold the listener beyond it.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

fn notify_listener(listener: UnixListener, sandbox: Sandbox, hooks: GuestHooks) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log(format_args!("notify port: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // The contents do not matter: drain a little, bounded in time.
        let mut sink = [0u8; 4096];
        let _ = (DeadlineReader {
            stream: &stream,
            deadline: Instant::now() + Duration::from_secs(5),
        })
        .read(&mut sink);
        drop(stream);
        match sandbox.sync_mode {
            SyncMode::AutoCommit | SyncMode::AutoIdle => (hooks.on_commit)(&sandbox),
            SyncMode::Manual => guest_log("guest commit notification (sync mode manual: ignored)"),
        }
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
        // handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// SIGTERM to the VMM, SIGKILL after [`VMM_STOP_GRACE`]; reaps it.
fn stop_vmm(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not reaped yet (try_wait said
        // it still runs), so the pid is still its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + VMM_STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    log("keystone-vmm did not exit after SIGTERM: SIGKILL");
    let _ = child.kill();
    child.wait().ok()
}

/// Runs the supervisor of sandbox `name` (registered under `paths`) until
/// its VMM exits. See the module docs.
pub fn supervise(paths: &AgentPaths, name: &str, hooks: GuestHooks) -> Result<(), AgentError> {
    install_signal_handlers();
    let me = ProcessId::current().ok_or_else(|| AgentError::Internal("no /proc/self".into()))?;
    let reg = paths.registry();
    let sandbox = reg
        .get(name)?
        .ok_or_else(|| AgentError::NotFound(name.to_string()))?;
    let launch = sandbox
        .launch
        .clone()
        .ok_or_else(|| AgentError::Internal(format!("sandbox {name} has no launch settings")))?;
    match RotatingLog::open(&sandbox.supervisor_log(), LOG_CAP).and_then(RotatingLog::onto_stdio) {
        Ok(l) => *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(l),
        Err(e) => log(format_args!("{}: {e}", sandbox.supervisor_log().display())),
    }
    log(format_args!("starting sandbox {name}"));

    let fail = |reason: String| -> AgentError {
        log(format_args!("{reason}"));
        let _ = reg.modify(name, |s| {
            if s.supervisor.is_none() || s.supervisor == Some(me) {
                s.status = Status::Failed;
                s.last_error = Some(reason.clone());
                s.supervisor = None;
                s.vmm = None;
            }
        });
        sandbox.remove_sockets();
        AgentError::Internal(reason)
    };

    sandbox.remove_sockets();
    // A master of a previous boot cannot outlive it, but its socket can.
    super::ssh::close_masters(&super::session::target(&sandbox));
    let bind = |port: u32| {
        let path = sandbox.port_socket(port);
        UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))
    };
    let ready = bind(READY_PORT).map_err(fail)?;
    let notify = bind(NOTIFY_PORT).map_err(fail)?;

    // The previous run's console and VMM logs become `.1`.
    for path in [sandbox.console_log(), sandbox.vmm_log()] {
        if path.exists() {
            let _ = std::fs::rename(&path, RotatingLog::old_path(&path));
        }
    }
    let console = sandbox.console_log();
    let console_file =
        std::fs::File::create(&console).map_err(|e| fail(format!("{}: {e}", console.display())))?;
    let mut vmm_log = RotatingLog::open(&sandbox.vmm_log(), LOG_CAP)
        .map_err(|e| fail(format!("{}: {e}", sandbox.vmm_log().display())))?;

    let (tx, rx) = mpsc::channel();
    let host_keys = sandbox.host_keys();
    let ready_tx = tx.clone();
    let need_keys = sandbox.image.as_ref().is_some_and(|i| i.ssh);
    std::thread::spawn(move || ready_listener(ready, host_keys, need_keys, ready_tx));
    let notify_sandbox = sandbox.clone();
    std::thread::spawn(move || notify_listener(notify, notify_sandbox, hooks));
    if let Some(dir) = &launch.resume {
        // A restored guest was ready when it was saved: it is again once
        // its VMM answers, running.
        log(format_args!("resuming snapshot {}", dir.display()));
        let (sock, resume_tx) = (sandbox.api_socket(), tx.clone());
        std::thread::spawn(move || resume_watch(&sock, &resume_tx));
    }
    drop(tx);
    if sandbox.network == Network::Policy {
        // The guest's only way out: the egress proxy on its vsock port.
        super::policy::load_or_create(&sandbox.policy_file(), &paths.default_policy())
            .map_err(|e| fail(e.to_string()))?;
        let listener = bind(super::egress::EGRESS_PORT).map_err(fail)?;
        let egress = super::egress::Egress::new(sandbox.policy_file(), &sandbox.net_log())
            .map_err(|e| fail(format!("{}: {e}", sandbox.net_log().display())))?;
        std::thread::spawn(move || {
            if let Err(e) = super::egress::serve(listener, egress) {
                log(format_args!("egress proxy stopped: {e}"));
            }
        });
    }

    let mut cmd = Command::new(&launch.vmm);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(console_file)
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", launch.vmm.display())))?;
    let vmm = ProcessId::of(child.id());
    // The VMM's stderr through a pipe into the rotating `vmm.log`: what
    // the guest makes it log is bounded here, whatever the VMM does.
    let (log_done_tx, log_done) = mpsc::channel::<()>();
    if let Some(mut stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            if let Err(e) = vmm_log.copy_from(&mut stderr) {
                // Keep draining: a VMM blocked on a full pipe stops its guest.
                log(format_args!("vmm.log: {e}; dropping the VMM's log"));
                let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            }
            let _ = log_done_tx.send(());
        });
    }
    log(format_args!(
        "keystone-vmm pid {} (cid {}, socket {})",
        child.id(),
        sandbox.cid,
        sandbox.vsock_uds.display()
    ));
    reg.modify(name, |s| {
        s.supervisor = Some(me);
        s.vmm = vmm;
        s.status = Status::Starting;
        s.started_at = Some(now());
        s.ready_at = None;
        s.stopped_at = None;
        s.last_error = None;
    })?;

    let mut ready_seen = false;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Outcome::Exited(st),
            Ok(None) => {}
            Err(e) => log(format_args!("waiting for keystone-vmm: {e}")),
        }
        if STOP.load(Ordering::Relaxed) {
            break Outcome::Stop;
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Ready) if !ready_seen => {
                ready_seen = true;
                if sandbox.sync_mode == SyncMode::AutoIdle {
                    let watched = sandbox.clone();
                    std::thread::spawn(move || (hooks.idle_watch)(watched, &STOP));
                }
                let marked = reg.modify(name, |s| {
                    if s.supervisor == Some(me) {
                        s.status = Status::Running;
                        s.ready_at = Some(now());
                    }
                });
                if let Err(e) = marked {
                    log(format_args!("recording readiness: {e}"));
                }
            }
            Ok(Event::Ready) => guest_log("guest sent another readiness message"),
            Ok(Event::Fatal(reason)) => break Outcome::Fatal(reason),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };

    let (status, error) = match outcome {
        Outcome::Exited(st) => {
            log(format_args!("keystone-vmm exited: {st}"));
            if !ready_seen {
                (
                    Status::Failed,
                    Some(format!(
                        "keystone-vmm exited ({st}) before the guest was ready"
                    )),
                )
            } else if st.success() {
                (Status::Stopped, None)
            } else {
                (Status::Stopped, Some(format!("keystone-vmm exited: {st}")))
            }
        }
        Outcome::Stop => {
            log("stop requested");
            let st = stop_vmm(&mut child);
            log(format_args!(
                "keystone-vmm stopped: {}",
                st.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
            ));
            (Status::Stopped, None)
        }
        Outcome::Fatal(reason) => {
            log(format_args!("{reason}"));
            stop_vmm(&mut child);
            (Status::Failed, Some(reason))
        }
    };
    // The VMM's last lines reach vmm.log before the stop is recorded (start
    // reads them on a failure); a pipe held open elsewhere does not hold us.
    let _ = log_done.recv_timeout(Duration::from_secs(2));
    sandbox.remove_sockets();
    super::ssh::close_masters(&super::session::target(&sandbox));
    let recorded = reg.modify(name, |s| {
        if s.supervisor == Some(me) {
            s.status = status;
            s.last_error = error;
            s.supervisor = None;
            s.vmm = None;
            s.stopped_at = Some(now());
        }
    });
    if let Err(e) = recorded {
        log(format_args!("recording the stop: {e}"));
    }
    log("exiting");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<HostKey>, ReadyError> {
        read_ready(s.as_bytes())
    }

    #[test]
    fn an_image_with_ssh_must_send_a_host_key() {
        let empty = "keystone-ready 1\nend\n";
        assert_eq!(read_ready_for(empty.as_bytes(), false), Ok(vec![]));
        assert_eq!(
            read_ready_for(empty.as_bytes(), true),
            Err(ReadyError::NoKeys)
        );
        let one = "keystone-ready 1\nhostkey ssh-ed25519 AAAA\nend\n";
        assert_eq!(read_ready_for(one.as_bytes(), true).unwrap().len(), 1);
    }

    #[test]
    fn readiness_messages_parse() {
        assert_eq!(parse("keystone-ready 1\nend\n"), Ok(vec![]));
        let keys = parse("keystone-ready 1\nhostkey ssh-ed25519 AAAAC3Nz+/=\nend\n").unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(host_keys_text(&keys), "ssh-ed25519 AAAAC3Nz+/=\n");
    }

    #[test]
    fn bad_readiness_messages_are_refused() {
        assert!(matches!(parse(""), Err(ReadyError::Truncated)));
        assert!(matches!(
            parse("keystone-ready 2\nend\n"),
            Err(ReadyError::Header(_))
        ));
        assert!(matches!(
            parse("keystone-ready 1\n"),
            Err(ReadyError::Truncated)
        ));
        assert!(matches!(
            parse("keystone-ready 1\nend"),
            Err(ReadyError::Truncated)
        ));
        for bad in [
            "hostkey ssh-ed25519 $(rm -rf /)",
            "hostkey a b c",
            "hostkey ssh\ted25519 AAAA",
            "hostkey  AAAA",
            "rm -rf /",
        ] {
            let msg = format!("keystone-ready 1\n{bad}\nend\n");
            assert!(matches!(parse(&msg), Err(ReadyError::Line(_))), "{bad}");
        }
        let long = format!(
            "keystone-ready 1\nhostkey t {}\nend\n",
            "A".repeat(MAX_LINE + 10)
        );
        assert_eq!(parse(&long), Err(ReadyError::TooLarge));
        let many: String = (0..=MAX_HOST_KEYS).map(|_| "hostkey t AAAA\n").collect();
        let msg = format!("keystone-ready 1\n{many}end\n");
        assert_eq!(parse(&msg), Err(ReadyError::TooLarge));
    }

    #[test]
    fn host_keys_are_pinned() {
        let dir = std::env::temp_dir().join(format!("keystone-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host_keys");
        let _ = std::fs::remove_file(&path);
        let a = vec![HostKey {
            kind: "ssh-ed25519".into(),
            base64: "AAAA".into(),
        }];
        let b = vec![HostKey {
            kind: "ssh-ed25519".into(),
            base64: "BBBB".into(),
        }];
        pin_host_keys(&path, &a).unwrap();
        pin_host_keys(&path, &a).unwrap();
        assert!(pin_host_keys(&path, &b).unwrap_err().contains("changed"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "ssh-ed25519 AAAA\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
