//! The sandboxes registry and each sandbox's files.
//!
//! Layout under the agent root ([`AgentPaths`]: `$XDG_CONFIG_HOME/keystone/agent`,
//! else `~/.config/keystone/agent`):
//!
//! ```text
//! sandboxes.json            the registry (Registry), replaced atomically
//! sandboxes.lock            flock(2) target: every read-modify-write holds it
//! sandboxes/<name>/disk.ext4       persistent disk (upper/workspace, work/)
//! sandboxes/<name>/state/          console.log, vmm.log, supervisor.log,
//!                                  host_keys, and the vsock sockets
//! ```
//!
//! The vsock socket is `state/vsock` when `state/vsock_65535` fits in a
//! Unix socket address (107 bytes); otherwise `<runtime>/<name>.vsock` where
//! `<runtime>` is `$XDG_RUNTIME_DIR/keystone` or `/tmp/keystone-<uid>`, a
//! directory of ours with mode 0700.
//!
//! Processes are recorded as [`ProcessId`]s (pid and start time), so a pid
//! reused by another process after a crash never counts as the VMM.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::disk;

/// Format of `sandboxes.json` written by this CLI.
pub const REGISTRY_FORMAT: u32 = 1;
/// Lowest vsock CID given to a sandbox (0-2 are reserved).
pub const FIRST_CID: u32 = 3;
/// Longest Unix socket path, in bytes (`sun_path` is 108 with the NUL).
pub const SUN_PATH_MAX: usize = 107;
/// Longest suffix the VMM appends to the vsock socket path (`_<port>`).
pub const PORT_SUFFIX_MAX: usize = "_65535".len();

/// Errors of the registry and of the sandbox files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Neither XDG_CONFIG_HOME nor HOME is set.
    #[error("cannot find the configuration directory: set HOME or XDG_CONFIG_HOME")]
    NoHome,
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The registry is not valid JSON of a known format.
    #[error("{path}: corrupt sandboxes registry ({reason}); fix or remove it")]
    Corrupt {
        /// The registry file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No Unix socket path short enough, or the runtime directory is unsafe.
    #[error("vsock socket: {0}")]
    Socket(String),
}

/// Errors of looking a sandbox up ([`Registry::find`]).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// An invalid sandbox name.
    #[error(transparent)]
    BadName(#[from] BadName),
    /// No such sandbox.
    #[error("no sandbox named {0}")]
    NotFound(String),
    /// No sandbox belongs to the current project (or there is no project).
    #[error("{0}")]
    NoProjectSandbox(String),
    /// The registry.
    #[error(transparent)]
    State(#[from] StateError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Why a sandbox name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox name '{name}': use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit")]
pub struct BadName {
    /// The name as given (control characters escaped).
    pub name: String,
}

/// Checks a sandbox name: `[a-z0-9][a-z0-9-]{0,62}`. Such a name is a
/// plain file name (no `/`, no `..`, no leading dot or dash) and a
/// hostname label.
pub fn validate_name(name: &str) -> Result<(), BadName> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(BadName {
            name: name.escape_debug().to_string(),
        })
    }
}

/// The default sandbox name for a project directory name: lower-cased,
/// every run of other characters turned into one `-`, leading and trailing
/// `-` dropped, cut to 63 bytes. May still be invalid (e.g. empty): check
/// with [`validate_name`].
pub fn sanitize_name(dir_name: &str) -> String {
    let mut out = String::new();
    for c in dir_name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches('-');
    let mut name: String = trimmed.chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

/// Where the agent keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentPaths {
    /// The agent root (`.../keystone/agent`).
    pub root: PathBuf,
}

impl AgentPaths {
    /// `$XDG_CONFIG_HOME/keystone/agent` (if set and absolute), else
    /// `$HOME/.config/keystone/agent`.
    pub fn from_env() -> Result<AgentPaths, StateError> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute())
                    .map(|h| h.join(".config"))
            })
            .ok_or(StateError::NoHome)?;
        Ok(AgentPaths::at(base.join("keystone").join("agent")))
    }

    /// An explicit root (tests, and the supervisor, which is told its root).
    pub fn at(root: impl Into<PathBuf>) -> AgentPaths {
        AgentPaths { root: root.into() }
    }

    /// The egress policy new sandboxes start with, when the user wrote one
    /// (else [`super::policy::DEFAULT_ALLOW`]).
    pub fn default_policy(&self) -> PathBuf {
        self.root.join("default-policy.json")
    }

    /// `sandboxes.json`.
    pub fn registry_file(&self) -> PathBuf {
        self.root.join("sandboxes.json")
    }

    /// `sandboxes.lock`.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("sandboxes.lock")
    }

    /// `sandboxes/<name>` (the name must be valid).
    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.root.join("sandboxes").join(name)
    }

    /// The registry over these paths.
    pub fn registry(&self) -> Registry {
        Registry {
            paths: self.clone(),
        }
    }
}

/// A process as recorded: its pid and its start time (field 22 of
/// `/proc/<pid>/stat`, clock ticks since boot), which tells a reused pid
/// apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot.
    pub start_time: u64,
}

/// Reads `(state, start time)` from `/proc/<pid>/stat` text: the fields
/// after the command name (which may hold spaces and parentheses), state
/// first, start time the 20th after it (field 22 overall).
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, start_time) = parse_stat(&stat)?;
        Some(ProcessId { pid, start_time })
    }

    /// This process.
    pub fn current() -> Option<ProcessId> {
        ProcessId::of(std::process::id())
    }

    /// Whether this very process still runs: `/proc/<pid>` exists, its
    /// start time is the recorded one, and it is not a zombie (exited,
    /// not yet reaped).
    pub fn is_alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Sends `signal` to this very process; false if it is gone. Race-free
    /// against pid reuse: the signal goes through a pidfd opened before the
    /// start time is checked.
    pub fn signal(&self, signal: i32) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let Ok(fd) = i32::try_from(fd) else {
            return false;
        };
        if fd < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                // No pidfds (Linux < 5.3): check, then signal by pid.
                // SAFETY: kill(2) takes any pid and signal number.
                return self.is_alive() && unsafe { libc::kill(pid, signal) } == 0;
            }
            return false;
        }
        // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if !self.is_alive() {
            return false;
        }
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }

    /// Waits until the process is gone, at most `timeout`; true if it is.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !self.is_alive() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A sandbox's network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Network {
    /// User-mode networking (passt); no privileges needed.
    User,
    /// A tap device the user created (`ip tuntap add ... mode tap`).
    Tap {
        /// The interface name.
        device: String,
    },
    /// A tap device the user created and attached to a bridge.
    Bridge {
        /// The interface name.
        device: String,
    },
    /// A macvtap link the user created on a host interface; the guest gets
    /// its MAC.
    Macvtap {
        /// The link's name.
        device: String,
    },
    /// No network device.
    None,
    /// No network device either: the guest's only way out is the host's
    /// egress proxy over vsock ([`super::egress`]), which lets through what
    /// the sandbox's policy file allows ([`super::policy`]).
    Policy,
}

impl Network {
    /// The `keystone-vmm --net` value, if any (the MAC derives from the
    /// sandbox name, so it is stable across restarts).
    pub fn vmm_arg(&self, sandbox: &str) -> Option<String> {
        match self {
            Network::User => Some(format!("user,name={sandbox}")),
            Network::Tap { device } | Network::Bridge { device } => {
                Some(format!("tap={device},name={sandbox}"))
            }
            Network::Macvtap { device } => Some(format!("macvtap={device}")),
            Network::None | Network::Policy => None,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Network::User => f.write_str("user"),
            Network::Tap { device } => write!(f, "tap ({device})"),
            Network::Bridge { device } => write!(f, "bridge (tap {device})"),
            Network::Macvtap { device } => write!(f, "macvtap ({device})"),
            Network::None => f.write_str("none"),
            Network::Policy => f.write_str("policy (egress proxy)"),
        }
    }
}

/// When the host pulls the guest's commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Only on `keystone agent sync`.
    Manual,
    /// After each guest commit (the guest notifies on vsock port 1025).
    AutoCommit,
    /// After some seconds without workspace changes.
    AutoIdle,
}

impl SyncMode {
    /// The name used on the command line and in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncMode::Manual => "manual",
            SyncMode::AutoCommit => "auto-commit",
            SyncMode::AutoIdle => "auto-idle",
        }
    }
}

/// Life-cycle state of a sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `start` is preparing it or the guest is booting.
    Starting,
    /// The guest said it is ready.
    Running,
    /// Not running.
    Stopped,
    /// The last start failed (see `last_error`).
    Failed,
}

impl Status {
    /// Lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

/// The guest image a sandbox last booted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest's content hash.
    pub content_hash: String,
    /// The guest runs sshd on vsock (manifest `ssh`).
    pub ssh: bool,
}

/// How the supervisor runs the VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The keystone-vmm binary.
    pub vmm: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The snapshot directory the VMM resumes (`--restore`) instead of
    /// booting: the guest sends no readiness message then, it is ready
    /// once the VMM's control API answers.
    #[serde(default)]
    pub resume: Option<PathBuf>,
}

/// Where a forked sandbox came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOrigin {
    /// The sandbox forked.
    pub sandbox: String,
    /// Its snapshot the fork restored.
    pub snapshot: String,
}

/// One sandbox in `sandboxes.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// Its name (valid, see [`validate_name`]).
    pub name: String,
    /// The host project (a git work tree's top level, canonical).
    pub project_path: PathBuf,
    /// `sandboxes/<name>`.
    pub dir: PathBuf,
    /// The persistent disk.
    pub disk: PathBuf,
    /// `sandboxes/<name>/state`.
    pub state_dir: PathBuf,
    /// The VMM's vsock Unix socket; guest connections to host port P
    /// arrive on `<vsock_uds>_P`.
    pub vsock_uds: PathBuf,
    /// The guest's vsock CID (unique among sandboxes, at least 3).
    pub cid: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Nested virtualization offered to the guest (`--nested`).
    pub nested: bool,
    /// Its network.
    pub network: Network,
    /// When commits are synced.
    pub sync_mode: SyncMode,
    /// Recorded state; see [`Sandbox::observed_status`] for the real one.
    pub status: Status,
    /// The `start` command preparing it (disk, image), while it does.
    #[serde(default)]
    pub starter: Option<ProcessId>,
    /// The supervisor (`keystone agent __supervise`).
    #[serde(default)]
    pub supervisor: Option<ProcessId>,
    /// The VMM.
    #[serde(default)]
    pub vmm: Option<ProcessId>,
    /// Created (Unix seconds).
    pub created_at: u64,
    /// Last started (Unix seconds).
    #[serde(default)]
    pub started_at: Option<u64>,
    /// Last ready (Unix seconds).
    #[serde(default)]
    pub ready_at: Option<u64>,
    /// Last stopped (Unix seconds).
    #[serde(default)]
    pub stopped_at: Option<u64>,
    /// The image it last booted.
    #[serde(default)]
    pub image: Option<ImageRef>,
    /// How the VMM is run.
    #[serde(default)]
    pub launch: Option<Launch>,
    /// Why the last start or run failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Ports forwarded over the sandbox's SSH master (`keystone agent
    /// port`), opened again on every start.
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// Made by `keystone agent fork` from this sandbox's snapshot.
    #[serde(default)]
    pub forked_from: Option<ForkOrigin>,
}

/// Which way a [`PortForward`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortDirection {
    /// The host listens on 127.0.0.1:`host_port`; each connection reaches
    /// the guest's 127.0.0.1:`guest_port`.
    Publish,
    /// The guest listens on its 127.0.0.1:`guest_port` (= `host_port`);
    /// each connection reaches the host's 127.0.0.1:`host_port`, and only
    /// that.
    Reach,
}

/// One port forward of a sandbox, carried by its SSH master (SSH over
/// vsock): `-L` for [`PortDirection::Publish`], `-R` for
/// [`PortDirection::Reach`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Which way.
    pub direction: PortDirection,
    /// The port on the guest's loopback.
    pub guest_port: u16,
    /// The port on the host's loopback.
    pub host_port: u16,
}

impl PortForward {
    /// The `ssh` option and its value (`-L`/`-R` with explicit loopback
    /// addresses on both sides).
    pub fn ssh_args(&self) -> [String; 2] {
        match self.direction {
            PortDirection::Publish => [
                "-L".into(),
                format!("127.0.0.1:{}:127.0.0.1:{}", self.host_port, self.guest_port),
            ],
            PortDirection::Reach => [
                "-R".into(),
                format!("127.0.0.1:{}:127.0.0.1:{}", self.guest_port, self.host_port),
            ],
        }
    }
}

impl std::fmt::Display for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.direction {
            PortDirection::Publish => write!(
                f,
                "publish: host 127.0.0.1:{} -> guest port {}",
                self.host_port, self.guest_port
            ),
            PortDirection::Reach => write!(
                f,
                "reach: guest 127.0.0.1:{} -> host 127.0.0.1:{}",
                self.guest_port, self.host_port
            ),
        }
    }
}

impl Sandbox {
    /// A sandbox never started: `name` of `project`, its files under `dir`
    /// (`sandboxes/<name>`), vsock CID `cid`, the default memory and vCPUs,
    /// user networking, manual sync, stopped.
    pub fn new(name: &str, project: &Path, dir: PathBuf, cid: u32) -> Result<Sandbox, StateError> {
        let state_dir = dir.join("state");
        Ok(Sandbox {
            name: name.to_string(),
            project_path: project.to_path_buf(),
            disk: dir.join("disk.ext4"),
            vsock_uds: vsock_socket_path(&state_dir, name)?,
            state_dir,
            dir,
            cid,
            memory_mib: super::lifecycle::DEFAULT_MEMORY_MIB,
            vcpus: super::lifecycle::DEFAULT_VCPUS,
            nested: false,
            network: Network::User,
            sync_mode: SyncMode::Manual,
            status: Status::Stopped,
            starter: None,
            supervisor: None,
            vmm: None,
            created_at: now(),
            started_at: None,
            ready_at: None,
            stopped_at: None,
            image: None,
            launch: None,
            last_error: None,
            ports: Vec::new(),
            forked_from: None,
        })
    }

    /// What is true now, whatever was recorded: `running`/`starting` only
    /// while the recorded VMM (or, before it exists, the recorded starter
    /// or supervisor) is alive; a VMM killed with -9 shows `stopped`.
    pub fn observed_status(&self) -> Status {
        let alive = |p: &Option<ProcessId>| p.as_ref().is_some_and(ProcessId::is_alive);
        if alive(&self.vmm) {
            return match self.status {
                Status::Running => Status::Running,
                _ => Status::Starting,
            };
        }
        if self.status == Status::Starting
            && self.vmm.is_none()
            && (alive(&self.starter) || alive(&self.supervisor))
        {
            return Status::Starting;
        }
        match self.status {
            Status::Failed => Status::Failed,
            _ => Status::Stopped,
        }
    }

    /// The sandbox as it is now: the observed status, and the pids of
    /// processes that are gone cleared.
    pub fn observed(&self) -> Sandbox {
        let mut v = self.clone();
        v.status = self.observed_status();
        let keep = |p: Option<ProcessId>| p.filter(ProcessId::is_alive);
        v.vmm = keep(v.vmm);
        v.supervisor = keep(v.supervisor);
        v.starter = keep(v.starter);
        v
    }

    /// Whether a VMM, supervisor or starter of it is still alive.
    pub fn any_process_alive(&self) -> bool {
        [self.vmm, self.supervisor, self.starter]
            .iter()
            .flatten()
            .any(ProcessId::is_alive)
    }

    /// The VMM's pid, if it runs.
    pub fn running_pid(&self) -> Option<u32> {
        self.vmm.filter(ProcessId::is_alive).map(|p| p.pid)
    }

    /// `state/console.log` (the guest's serial console of the last boot).
    pub fn console_log(&self) -> PathBuf {
        self.state_dir.join("console.log")
    }

    /// `state/vmm.log` (keystone-vmm's own log of the last boot).
    pub fn vmm_log(&self) -> PathBuf {
        self.state_dir.join("vmm.log")
    }

    /// `jail/` beside `state/`: where keystone-vmm mounts its jail's root
    /// (an empty directory on the host).
    pub fn jail_dir(&self) -> PathBuf {
        self.state_dir.with_file_name("jail")
    }

    /// `state/supervisor.log`.
    pub fn supervisor_log(&self) -> PathBuf {
        self.state_dir.join("supervisor.log")
    }

    /// `state/host_keys`: the guest's SSH host keys, `<type> <base64>` per
    /// line, as its readiness message gave them.
    pub fn host_keys(&self) -> PathBuf {
        self.state_dir.join("host_keys")
    }

    /// `<vsock_uds>_<port>`: where guest connections to host `port` arrive.
    /// Its egress policy (`--network policy`).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.join("policy.json")
    }

    /// `<vsock_uds>.api`: its keystone-vmm's control socket (`--api-sock`;
    /// snapshots). Beside the vsock socket, so it fits a `sun_path` too.
    pub fn api_socket(&self) -> PathBuf {
        let mut s = self.vsock_uds.clone().into_os_string();
        s.push(".api");
        PathBuf::from(s)
    }

    /// Its egress proxy's log (`--network policy`).
    pub fn net_log(&self) -> PathBuf {
        self.state_dir.join("net.log")
    }

    pub fn port_socket(&self, port: u32) -> PathBuf {
        let mut s = self.vsock_uds.clone().into_os_string();
        s.push(format!("_{port}"));
        PathBuf::from(s)
    }

    /// Removes its vsock socket and the host-side port sockets (readiness,
    /// commit notifications), if they are sockets.
    pub fn remove_sockets(&self) {
        remove_socket(&self.vsock_uds);
        remove_socket(&self.api_socket());
        remove_socket(&self.port_socket(crate::image::READY_PORT));
        remove_socket(&self.port_socket(crate::image::NOTIFY_PORT));
        remove_socket(&self.port_socket(super::egress::EGRESS_PORT));
    }
}

/// Picks the vsock socket path of sandbox `name` whose state directory is
/// `state_dir` (see the module docs). Creates the runtime directory if it
/// is needed.
pub fn vsock_socket_path(state_dir: &Path, name: &str) -> Result<PathBuf, StateError> {
    let fits = |p: &Path| p.as_os_str().len() + PORT_SUFFIX_MAX <= SUN_PATH_MAX;
    let local = state_dir.join("vsock");
    if fits(&local) {
        return Ok(local);
    }
    runtime_socket(&format!("{name}.vsock"), &fits)
}

/// The nearest of `dir` and its ancestors that holds a `.git` (directory,
/// or file for a worktree), canonical; `None` when git's own environment
/// (`GIT_DIR`, `GIT_WORK_TREE`) could point elsewhere.
fn nearest_git_dir(dir: &Path) -> Option<PathBuf> {
    if std::env::var_os("GIT_DIR").is_some() || std::env::var_os("GIT_WORK_TREE").is_some() {
        return None;
    }
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.ancestors()
        .find(|d| d.join(".git").symlink_metadata().is_ok())
        .map(Path::to_path_buf)
}

/// A socket `file` in the user's private runtime directory, for a path
/// too long in the state directory: `$XDG_RUNTIME_DIR/keystone/` when
/// that fits `fits`, else `/tmp/keystone-<uid>/` (created 0700 and checked
/// to be the user's alone).
pub fn runtime_socket(file: &str, fits: &dyn Fn(&Path) -> bool) -> Result<PathBuf, StateError> {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|p| p.join("keystone"))
        .filter(|p| fits(&p.join(file)))
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/keystone-{uid}")));
    let path = runtime.join(file);
    if !fits(&path) {
        return Err(StateError::Socket(format!(
            "{} is too long for a Unix socket",
            path.display()
        )));
    }
    private_dir(&runtime, uid)?;
    Ok(path)
}

/// Creates `dir` with mode 0700 if missing, and checks that it is a real
/// directory (not a link) owned by `uid` that nobody else can write.
fn private_dir(dir: &Path, uid: u32) -> Result<(), StateError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(StateError::Socket(format!(
            "{} must be a directory owned by uid {uid} with mode 0700",
            dir.display()
        )));
    }
    Ok(())
}

/// Removes the Unix socket at `path` if there is one (only a socket).
pub fn remove_socket(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory. Readers
/// see the old or the new contents, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// A held flock(2) on the registry lock file; released on drop.
pub struct RegistryLock {
    _file: File,
}

/// On-disk form of `sandboxes.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    format: u32,
    sandboxes: Vec<Sandbox>,
}

/// The sandboxes registry. Reads hold a shared lock, updates an exclusive
/// one for the whole read-modify-write, and the file is replaced
/// atomically, so concurrent CLIs never lose or corrupt entries.
#[derive(Clone, Debug)]
pub struct Registry {
    paths: AgentPaths,
}

impl Registry {
    /// Its paths.
    pub fn paths(&self) -> &AgentPaths {
        &self.paths
    }

    fn lock(&self, exclusive: bool) -> Result<RegistryLock, StateError> {
        let root = &self.paths.root;
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        let path = self.paths.lock_file();
        let file = crate::flock::lock(&path, exclusive).map_err(io_err(&path))?;
        Ok(RegistryLock { _file: file })
    }

    fn read_unlocked(&self) -> Result<Vec<Sandbox>, StateError> {
        let path = self.paths.registry_file();
        let mut text = String::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_string(&mut text).map_err(io_err(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        }
        let file: RegistryFile = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.format != REGISTRY_FORMAT {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "format {}, this keystone reads {REGISTRY_FORMAT}",
                    file.format
                ),
            });
        }
        Ok(file.sandboxes)
    }

    /// All sandboxes, in name order.
    pub fn load(&self) -> Result<Vec<Sandbox>, StateError> {
        let _lock = self.lock(false)?;
        self.read_unlocked()
    }

    /// The sandbox `name`, if registered.
    pub fn get(&self, name: &str) -> Result<Option<Sandbox>, StateError> {
        Ok(self.load()?.into_iter().find(|s| s.name == name))
    }

    /// Runs `f` on the list under the exclusive lock and saves the result
    /// atomically (sorted by name) if `f` succeeds. `E` must absorb
    /// registry errors.
    pub fn update<T, E: From<StateError>>(
        &self,
        f: impl FnOnce(&mut Vec<Sandbox>) -> Result<T, E>,
    ) -> Result<T, E> {
        let _lock = self.lock(true)?;
        let mut list = self.read_unlocked()?;
        let before = list.clone();
        let out = f(&mut list)?;
        if list != before {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            let file = RegistryFile {
                format: REGISTRY_FORMAT,
                sandboxes: list,
            };
            let json = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Io {
                path: self.paths.registry_file(),
                source: std::io::Error::other(e),
            })?;
            write_atomic(&self.paths.registry_file(), &json)?;
        }
        Ok(out)
    }

    /// The sandbox `name`, or (no name) the one whose project is the
    /// current directory's git top level.
    pub fn find(&self, name: Option<&str>) -> Result<Sandbox, LookupError> {
        let list = self.load()?;
        if let Some(name) = name {
            validate_name(name)?;
            return list
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| LookupError::NotFound(name.to_string()));
        }
        let here = std::env::current_dir().map_err(|e| StateError::Io {
            path: PathBuf::from("."),
            source: e,
        })?;
        // The nearest directory holding `.git` is the top level git would
        // name; when a sandbox has it, no git process is needed (an `exec`
        // loop pays for every process). Otherwise git decides.
        let project =
            match nearest_git_dir(&here).filter(|p| list.iter().any(|s| s.project_path == *p)) {
                Some(p) => p,
                None => disk::git_toplevel(&here).map_err(|_| {
                    LookupError::NoProjectSandbox(format!(
                        "{} is not inside a git repository: name the sandbox",
                        here.display()
                    ))
                })?,
            };
        let mut mine: Vec<Sandbox> = list
            .into_iter()
            .filter(|s| s.project_path == project)
            .collect();
        match mine.len() {
            0 => Err(LookupError::NoProjectSandbox(format!(
                "no sandbox for {}: name one (`keystone agent list`)",
                project.display()
            ))),
            1 => Ok(mine.remove(0)),
            // Forks of the project's sandbox are named, never implied.
            _ if mine.iter().filter(|s| s.forked_from.is_none()).count() == 1 => mine
                .into_iter()
                .find(|s| s.forked_from.is_none())
                .ok_or_else(|| LookupError::NoProjectSandbox("no sandbox".into())),
            _ => {
                let names: Vec<&str> = mine.iter().map(|s| s.name.as_str()).collect();
                Err(LookupError::NoProjectSandbox(format!(
                    "several sandboxes for {}: {}; name one",
                    project.display(),
                    names.join(", ")
                )))
            }
        }
    }

    /// Every sandbox as it is now ([`Sandbox::observed`]), by name.
    pub fn observed(&self) -> Result<Vec<Sandbox>, StateError> {
        Ok(self.load()?.iter().map(Sandbox::observed).collect())
    }

    /// Changes sandbox `name` with `f` if it is registered; returns whether
    /// it was.
    pub fn modify(&self, name: &str, f: impl FnOnce(&mut Sandbox)) -> Result<bool, StateError> {
        self.update(|list| {
            Ok::<_, StateError>(match list.iter_mut().find(|s| s.name == name) {
                Some(s) => {
                    f(s);
                    true
                }
                None => false,
            })
        })
    }
}

/// The smallest CID of at least [`FIRST_CID`] that no sandbox in `list` has.
pub fn free_cid(list: &[Sandbox]) -> u32 {
    let mut cid = FIRST_CID;
    while list.iter().any(|s| s.cid == cid) {
        cid += 1;
    }
    cid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(tag: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "keystone-state-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// The `.git` walk names the same top level as `git rev-parse
    /// --show-toplevel`, for a repository and for a nested worktree.
    #[test]
    fn the_nearest_git_directory_is_gits_top_level() {
        let root = std::fs::canonicalize(temp_root("gitdir")).unwrap();
        let repo = root.join("repo");
        let deep = repo.join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let st = std::process::Command::new("git")
            .args(["init", "-q"])
            .arg(&repo)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(nearest_git_dir(&deep).unwrap(), repo);
        assert_eq!(disk::git_toplevel(&deep).unwrap(), repo);
        // A `.git` file (worktree, submodule) makes its own top level.
        std::fs::write(repo.join("a/.git"), "gitdir: /nowhere\n").unwrap();
        assert_eq!(nearest_git_dir(&deep).unwrap(), repo.join("a"));
        assert!(nearest_git_dir(Path::new("/")).is_none_or(|p| p.join(".git").exists()));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn sandbox(name: &str, cid: u32) -> Sandbox {
        Sandbox::new(name, Path::new("/p"), "/d".into(), cid).unwrap()
    }

    #[test]
    fn names_are_validated() {
        for good in ["a", "0", "my-project", "a1-b2", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a.b",
            "..",
            "a/b",
            "../x",
            "a b",
            "é",
            "a\n",
            &"x".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let e = validate_name("a\nb").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn default_names_are_sanitized() {
        assert_eq!(sanitize_name("My Project"), "my-project");
        assert_eq!(sanitize_name("foo_bar.rs"), "foo-bar-rs");
        assert_eq!(sanitize_name("--x--"), "x");
        assert_eq!(sanitize_name("..."), "");
        assert_eq!(sanitize_name(&"a".repeat(100)).len(), 63);
        assert_eq!(
            sanitize_name(&format!("{}-b", "a".repeat(62))),
            "a".repeat(62)
        );
        for n in ["My Project", "foo_bar.rs", "Élan", "x"] {
            validate_name(&sanitize_name(n)).unwrap();
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = temp_root("atomic");
        let f = dir.join("f.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
        // A failed write (missing directory) changes nothing.
        assert!(write_atomic(&dir.join("nope").join("f"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stat_parsing_handles_odd_command_names() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn liveness_needs_the_recorded_start_time() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        let reused = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!reused.is_alive(), "same pid, other start time");
        assert!(!reused.signal(0));
        assert!(me.signal(0));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!id.is_alive(), "an exited child");
        // An exited, unreaped child (zombie) is not alive either.
        let zombie = std::process::Command::new("true").spawn().unwrap();
        let zid = ProcessId::of(zombie.id()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!zid.is_alive(), "a zombie");
        drop(zombie);
    }

    #[test]
    fn registry_round_trips_under_concurrent_updates() {
        let root = temp_root("registry");
        let reg = AgentPaths::at(&root).registry();
        assert!(reg.load().unwrap().is_empty());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let reg = reg.clone();
                std::thread::spawn(move || {
                    reg.update(|list| {
                        let cid = free_cid(list);
                        list.push(sandbox(&format!("s{i}"), cid));
                        Ok::<_, StateError>(())
                    })
                    .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let list = reg.load().unwrap();
        assert_eq!(list.len(), 8);
        let mut cids: Vec<u32> = list.iter().map(|s| s.cid).collect();
        cids.sort();
        assert_eq!(cids, (3..11).collect::<Vec<_>>(), "unique CIDs");
        assert!(reg.modify("s3", |s| s.memory_mib = 4096).unwrap());
        assert!(!reg.modify("zz", |s| s.memory_mib = 1).unwrap());
        assert_eq!(reg.get("s3").unwrap().unwrap().memory_mib, 4096);
        std::fs::write(reg.paths().registry_file(), b"{not json").unwrap();
        assert!(matches!(reg.load(), Err(StateError::Corrupt { .. })));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn observed_status_follows_the_processes() {
        let me = ProcessId::current().unwrap();
        let dead = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let mut s = sandbox("a", 3);
        s.status = Status::Running;
        s.vmm = Some(dead);
        assert_eq!(s.observed_status(), Status::Stopped, "VMM gone");
        s.vmm = Some(me);
        assert_eq!(s.observed_status(), Status::Running);
        s.status = Status::Starting;
        s.vmm = None;
        s.starter = Some(me);
        assert_eq!(s.observed_status(), Status::Starting);
        s.starter = Some(dead);
        assert_eq!(s.observed_status(), Status::Stopped, "starter gone");
        s.status = Status::Failed;
        assert_eq!(s.observed_status(), Status::Failed);
    }

    #[test]
    fn socket_paths_fit_sun_path() {
        let short = vsock_socket_path(Path::new("/x/state"), "n").unwrap();
        assert_eq!(short, Path::new("/x/state/vsock"));
        let long = PathBuf::from(format!("/{}/state", "d".repeat(120)));
        let p = vsock_socket_path(&long, "name").unwrap();
        assert!(
            p.as_os_str().len() + PORT_SUFFIX_MAX <= SUN_PATH_MAX,
            "{p:?}"
        );
        assert!(p.ends_with("name.vsock"));
        let meta = std::fs::metadata(p.parent().unwrap()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn times_are_formatted_in_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
