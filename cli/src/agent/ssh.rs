//! Reaching a sandbox: vsock `CONNECT` through the VMM's hybrid vsock Unix
//! socket, OpenSSH over that (`ssh` with this module as its ProxyCommand),
//! the host user's key, and the guest's pinned host key.
//!
//! Every SSH invocation ignores the user's ssh_config (`-F /dev/null`),
//! offers only the chosen key, and trusts only the host key the guest
//! reported at boot (`state/host_keys`, written from the readiness message):
//! a different key is an error, never a prompt.
//!
//! One authenticated connection per running sandbox carries the rest
//! ([`master`]): an OpenSSH ControlMaster whose control socket lives in the
//! sandbox's private state directory, named after the pinned host keys, so
//! a master made for one key is never used under another.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::state::PortForward;
use crate::image::SSH_PORT;

/// Guest user every session logs in as.
pub const GUEST_USER: &str = "sandbox";
/// Guest directory holding the project.
pub const WORKSPACE: &str = "/workspace";

/// Errors reaching a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// Connecting to the VMM's vsock socket failed.
    #[error("cannot reach the sandbox's vsock socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VMM refused or dropped the `CONNECT`.
    #[error("vsock port {port}: the guest is not listening ({reply})")]
    Refused {
        /// The guest port.
        port: u32,
        /// What came back instead of `OK`.
        reply: String,
    },
    /// The sandbox never reported its SSH host key.
    #[error("{0}: no pinned host key (the sandbox has not reported ready)")]
    NoHostKey(PathBuf),
    /// No usable user key and none could be generated.
    #[error("ssh key: {0}")]
    Key(String),
    /// Running ssh failed.
    #[error("ssh: {0}")]
    Spawn(std::io::Error),
    /// The guest sent more than the connection's cap (`proxy --max-bytes`).
    #[error("{GUEST_OVER_CAP} ({0} bytes); connection cut")]
    OverCap(u64),
    /// A session through the SSH master failed after it was requested.
    #[error("{0}")]
    Mux(super::mux::MuxError),
    /// The master refused to open or close a port forward.
    #[error("{forward}: {reason}")]
    Forward {
        /// The forward.
        forward: PortForward,
        /// What ssh said.
        reason: String,
    },
    /// Writing a file.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How to reach one sandbox over SSH.
#[derive(Clone, Debug)]
pub struct Target {
    /// Sandbox name.
    pub name: String,
    /// The VMM's hybrid vsock Unix socket.
    pub uds: PathBuf,
    /// The sandbox's state directory (`host_keys`, `known_hosts`).
    pub state_dir: PathBuf,
    /// Ports its master carries ([`master`] opens them when it makes one).
    pub forwards: Vec<PortForward>,
}

impl Target {
    /// The alias the host key is pinned under, and the `Host` of `ssh-config`.
    pub fn alias(&self) -> String {
        format!("keystone-{}", self.name)
    }

    fn known_hosts(&self) -> PathBuf {
        self.state_dir.join("known_hosts")
    }
}

/// Open a stream to guest vsock `port` through the hybrid socket: write
/// `CONNECT <port>\n`, expect `OK <host port>\n`.
pub fn vsock_connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, SshError> {
    let serr = |source| SshError::Socket {
        path: uds.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(uds).map_err(serr)?;
    s.set_read_timeout(Some(timeout)).map_err(serr)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(serr)?;
    // Read the reply byte by byte so no tunnelled data is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if line.is_empty() => {
                return Err(SshError::Refused {
                    port,
                    reply: e.to_string(),
                })
            }
            Err(_) => break,
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if !reply.starts_with("OK ") {
        return Err(SshError::Refused {
            port,
            reply: if reply.is_empty() {
                "connection closed".into()
            } else {
                sanitize(&reply)
            },
        });
    }
    s.set_read_timeout(None).map_err(serr)?;
    Ok(s)
}

/// Start of the message a capped proxy dies with (ssh passes it on in its
/// stderr, so sync can tell a cut from another failure).
pub const GUEST_OVER_CAP: &str = "the guest sent more than this connection allows";

/// `keystone agent proxy`: bridge stdin/stdout to guest vsock `port` until
/// both directions end. Returns when the guest closes, or with
/// [`SshError::OverCap`] once more than `max_from_guest` bytes came from it.
pub fn proxy(uds: &Path, port: u32, max_from_guest: Option<u64>) -> Result<(), SshError> {
    let s = vsock_connect(uds, port, Duration::from_secs(10))?;
    let mut to_guest = s.try_clone().map_err(SshError::Spawn)?;
    let up = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let _ = std::io::copy(&mut stdin, &mut to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let mut from_guest = s;
    let result = relay(
        &mut from_guest,
        &mut std::io::stdout().lock(),
        max_from_guest,
    );
    drop(up);
    result.map(|_| ())
}

/// Copies `from` to `to`, flushing each chunk, until end of file or a
/// failed write; more than `max` bytes is [`SshError::OverCap`] (the bytes
/// past the cap are not passed on). Returns the bytes copied.
pub fn relay(from: &mut impl Read, to: &mut impl Write, max: Option<u64>) -> Result<u64, SshError> {
    let mut buf = [0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total = total.saturating_add(n as u64);
                if let Some(max) = max.filter(|&m| total > m) {
                    return Err(SshError::OverCap(max));
                }
                if to.write_all(&buf[..n]).is_err() || to.flush().is_err() {
                    return Ok(total);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(total),
        }
    }
}

/// `keystone agent __capped`: run `cmd` (stdin and stderr ours), passing its
/// stdout to `to` until more than `max` bytes came: then it is killed and
/// this is [`SshError::OverCap`]. Otherwise its exit code (signals as
/// 128 + n). Sync's fetch runs ssh under it, so its pack is capped whether
/// ssh rides the master or makes its own connection.
pub fn capped(max: u64, cmd: &[String], to: &mut impl Write) -> Result<u8, SshError> {
    let (program, args) = cmd
        .split_first()
        .ok_or_else(|| SshError::Spawn(std::io::Error::other("no command")))?;
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(SshError::Spawn)?;
    let result = match child.stdout.take() {
        Some(mut out) => relay(&mut out, to, Some(max)),
        None => Ok(0),
    };
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(SshError::Spawn)?;
    result?;
    Ok(super::remote::exit_code(status))
}

/// The user's SSH key pair: private key path and public key line.
#[derive(Clone, Debug)]
pub struct UserKey {
    /// Private key file.
    pub private: PathBuf,
    /// The `.pub` line (`type base64 [comment]`).
    pub public: String,
}

/// The host user's key: `~/.ssh/id_ed25519`, `id_rsa`, `id_ecdsa` (the
/// first with both halves), else keystone's own key under `keys_dir`,
/// generated (ed25519, no passphrase) on first use. Never a password.
pub fn user_key(home: &Path, keys_dir: &Path) -> Result<UserKey, SshError> {
    for name in ["id_ed25519", "id_rsa", "id_ecdsa"] {
        let private = home.join(".ssh").join(name);
        if let (true, Ok(public)) = (
            private.is_file(),
            std::fs::read_to_string(private.with_extension("pub")),
        ) {
            if !usable_without_prompt(&private) {
                continue;
            }
            if let Some(line) = public.lines().find(|l| !l.trim().is_empty()) {
                return Ok(UserKey {
                    private,
                    public: line.trim().to_string(),
                });
            }
        }
    }
    let private = keys_dir.join("id_ed25519");
    std::fs::create_dir_all(keys_dir).map_err(|source| SshError::Write {
        path: keys_dir.to_path_buf(),
        source,
    })?;
    // Two first starts at once must not both run ssh-keygen: one's private
    // key would end up beside the other's public key.
    let lock_path = keys_dir.join(".lock");
    let _lock = crate::flock::lock(&lock_path, true).map_err(|source| SshError::Write {
        path: lock_path.clone(),
        source,
    })?;
    if !private.is_file() {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "keystone", "-f"])
            .arg(&private)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| SshError::Key(format!("ssh-keygen: {e} (install openssh-client)")))?;
        if !status.success() {
            return Err(SshError::Key(format!("ssh-keygen failed ({status})")));
        }
    }
    let public = std::fs::read_to_string(private.with_extension("pub"))
        .map_err(|e| SshError::Key(format!("{}.pub: {e}", private.display())))?;
    Ok(UserKey {
        private,
        public: public.trim().to_string(),
    })
}

/// Whether ssh can use `private` without asking for a passphrase: it has
/// none, or an ssh-agent is there to hold it.
fn usable_without_prompt(private: &Path) -> bool {
    if std::env::var_os("SSH_AUTH_SOCK").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    Command::new("ssh-keygen")
        .args(["-y", "-P", "", "-f"])
        .arg(private)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The kernel command-line parameter that hands the public key to the guest
/// (built by [`super::vmm_process::guest_cmdline`]).
pub fn authorized_key_param(key: &UserKey) -> String {
    super::vmm_process::authorized_key_param(&key.public)
}

/// Parse `state/host_keys` (`<type> <base64>` lines from the readiness
/// message) into pinned `known_hosts` lines for `alias`. Lines that are not
/// a plausible key are dropped.
pub fn known_hosts_lines(alias: &str, host_keys: &str) -> Vec<String> {
    host_keys
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (ty, key) = (f.next()?, f.next()?);
            let ty_ok = ty.len() < 64
                && ty
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'@' || b == b'.');
            let key_ok = key.len() < 16 * 1024
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
            (ty_ok && key_ok && f.next().is_none()).then(|| format!("{alias} {ty} {key}"))
        })
        .collect()
}

/// Write the pinned `known_hosts` for `t` from its `host_keys` (left as it
/// is when it already says exactly that: no write and fsync per command).
pub fn pin_host_keys(t: &Target) -> Result<PathBuf, SshError> {
    let keys_path = t.state_dir.join("host_keys");
    let keys = std::fs::read_to_string(&keys_path).unwrap_or_default();
    let lines = known_hosts_lines(&t.alias(), &keys);
    if lines.is_empty() {
        return Err(SshError::NoHostKey(keys_path));
    }
    let path = t.known_hosts();
    let want = lines.join("\n") + "\n";
    if std::fs::read(&path).is_ok_and(|have| have == want.as_bytes()) {
        return Ok(path);
    }
    crate::image::write_atomic(&path, want.as_bytes()).map_err(|e| SshError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    Ok(path)
}

/// The `keystone` executable named in ProxyCommand: `KEYSTONE_CLI` when set
/// (tests and wrappers that call this library from another binary), else
/// this process's executable.
pub fn self_exe() -> PathBuf {
    std::env::var_os("KEYSTONE_CLI")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("keystone"))
}

/// Quote `s` for a POSIX shell (single quotes).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A value for an ssh option: `%` doubled (ssh expands `%` tokens in
/// ProxyCommand, IdentityFile and UserKnownHostsFile), double-quoted when it
/// holds whitespace or quotes (ssh splits some values on whitespace).
pub fn ssh_value(v: &str) -> String {
    let v = v.replace('%', "%%");
    if v.chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v
    }
}

/// The ssh options that reach `t` with `key`, pinned: everything but the
/// destination and the remote command. Through the sandbox's master when
/// one is up or can be made ([`master`]), else on a connection of its own.
pub fn ssh_options(t: &Target, key: &UserKey) -> Result<Vec<String>, SshError> {
    client_options(t, key, None)
}

/// The options for sync's fetch: through the master when it is up, else a
/// connection of its own whose proxy cuts it past `max_from_guest`. (The
/// master carries no such cap: run ssh under [`capped`] too.)
pub fn ssh_options_for_fetch(
    t: &Target,
    key: &UserKey,
    max_from_guest: u64,
) -> Result<Vec<String>, SshError> {
    client_options(t, key, Some(max_from_guest))
}

/// A client's options: the master's socket when it is up or can be made,
/// then what a connection of its own needs (proxy capped at
/// `max_from_guest`).
fn client_options(
    t: &Target,
    key: &UserKey,
    max_from_guest: Option<u64>,
) -> Result<Vec<String>, SshError> {
    let mut o = mux_options(master(t, key).as_deref());
    o.extend(connection_options(t, key, max_from_guest)?);
    Ok(o)
}

/// `ControlMaster=no` always (a client never becomes a master by itself:
/// a master started under a caller's pipes would hold them open), and the
/// master's socket or `none`.
fn mux_options(sock: Option<&Path>) -> Vec<String> {
    let path = sock.map_or_else(|| "none".to_string(), |p| ssh_value(&p.to_string_lossy()));
    vec![
        "-o".into(),
        "ControlMaster=no".into(),
        "-o".into(),
        format!("ControlPath={path}"),
    ]
}

/// What a new connection to `t` needs: pinned host key, the user's key
/// alone, the vsock proxy (capped at `max_from_guest`), nothing forwarded.
fn connection_options(
    t: &Target,
    key: &UserKey,
    max_from_guest: Option<u64>,
) -> Result<Vec<String>, SshError> {
    let known_hosts = pin_host_keys(t)?;
    let cap = max_from_guest
        .map(|m| format!(" --max-bytes {m}"))
        .unwrap_or_default();
    let proxy = format!(
        "{} agent proxy --socket {}{cap} 22",
        shell_quote(&self_exe().to_string_lossy()),
        shell_quote(&t.uds.to_string_lossy())
    )
    .replace('%', "%%");
    let mut o: Vec<String> = vec!["-F".into(), "/dev/null".into()];
    for (k, v) in [
        ("ProxyCommand", proxy),
        ("HostKeyAlias", t.alias()),
        (
            "UserKnownHostsFile",
            known_hosts.to_string_lossy().into_owned(),
        ),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("CheckHostIP", "no".into()),
        ("UpdateHostKeys", "no".into()),
        ("IdentitiesOnly", "yes".into()),
        ("IdentityFile", ssh_value(&key.private.to_string_lossy())),
        ("PasswordAuthentication", "no".into()),
        ("KbdInteractiveAuthentication", "no".into()),
        ("BatchMode", "yes".into()),
        ("ConnectTimeout", "20".into()),
        ("ForwardAgent", "no".into()),
        ("ForwardX11", "no".into()),
        ("ClearAllForwardings", "yes".into()),
        ("PermitLocalCommand", "no".into()),
        ("ServerAliveInterval", "15".into()),
        ("LogLevel", "ERROR".into()),
        ("User", GUEST_USER.into()),
    ] {
        o.push("-o".into());
        o.push(format!("{k}={v}"));
    }
    Ok(o)
}

/// Set to `off` to give every command its own SSH connection (no master).
pub const MASTER_ENV: &str = "KEYSTONE_SSH_MASTER";
/// Longest control socket path used: `sun_path` holds 107 bytes, and ssh
/// binds a 17-byte longer temporary name first.
const MAX_CONTROL_PATH: usize = 90;
/// How long making a master may take (connect, host key, authentication).
const MASTER_TIMEOUT: Duration = Duration::from_secs(30);

impl Target {
    /// The master's control socket for the host keys pinned now:
    /// `state/mux-<tag>`, or `<name>.mux-<tag>` in the user's private
    /// runtime directory when that is too long for a socket (as the vsock
    /// socket moves); `None` when no key is pinned or nothing fits.
    pub fn master_socket(&self) -> Option<PathBuf> {
        use sha2::Digest as _;
        let keys = std::fs::read(self.state_dir.join("host_keys")).ok()?;
        if keys.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let digest = sha2::Sha256::digest(&keys);
        let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Some(self.state_dir.join(format!("mux-{tag}")))
            .filter(|p| fits_control_path(p))
            .or_else(|| {
                let file = format!("{}.mux-{tag}", self.name);
                super::state::runtime_socket(&file, &fits_control_path).ok()
            })
    }

    /// Where [`Target::master_socket`] may have put sockets, and the name
    /// prefix they have there.
    fn master_dirs(&self) -> Vec<(PathBuf, String)> {
        let prefix = format!("{}.mux-", self.name);
        let mut v = vec![(self.state_dir.clone(), "mux-".to_string())];
        if let Some(d) =
            super::state::runtime_socket(&format!("{prefix}00000000"), &fits_control_path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            v.push((d, prefix));
        }
        v
    }
}

/// Whether `p` is short enough for a control socket ([`MAX_CONTROL_PATH`]).
fn fits_control_path(p: &Path) -> bool {
    p.as_os_str().len() <= MAX_CONTROL_PATH
}

/// Whether a master answers on `sock`.
fn master_alive(sock: &Path) -> bool {
    UnixStream::connect(sock).is_ok()
}

/// The sandbox's SSH master, made now if it is not up: one connection
/// (OpenSSH ControlMaster, in the background, `-N`) that later commands
/// ride without a handshake of their own. Made with the same pinned host
/// key and user key as any connection, so a changed host key is refused
/// here as anywhere. `None` (each command then connects by itself) when
/// [`MASTER_ENV`] is `off`, no host key is pinned, the socket path is too
/// long, or the master cannot be made (`state/mux.log` says why).
/// Concurrent callers make one master (a lock in the state directory).
pub fn master(t: &Target, key: &UserKey) -> Option<PathBuf> {
    if let Some(sock) = live_master(t) {
        return Some(sock);
    }
    if std::env::var_os(MASTER_ENV).is_some_and(|v| v == "off") {
        return None;
    }
    let sock = t.master_socket()?;
    let lock = std::fs::File::create(t.state_dir.join("mux.lock")).ok()?;
    lock.lock().ok()?;
    if master_alive(&sock) {
        return Some(sock);
    }
    // A socket nobody answers on: its master is gone (the VM stopped).
    let _ = std::fs::remove_file(&sock);
    let log = std::fs::File::create(t.state_dir.join("mux.log")).ok()?;
    let mut c = Command::new("ssh");
    c.args([
        "-o".to_string(),
        "ControlMaster=yes".into(),
        "-o".into(),
        format!("ControlPath={}", ssh_value(&sock.to_string_lossy())),
        "-o".into(),
        "ControlPersist=no".into(),
        // Before the connection's `LogLevel=ERROR` (ssh keeps the first
        // value): mux.log then says why a master's connection ended.
        "-o".into(),
        "LogLevel=INFO".into(),
        // The master lives as long as the VM, whose guest may stall for a
        // while (a loaded host, nested emulation): 15 s keepalives, and
        // only 8 unanswered in a row (2 min) end it.
        "-o".into(),
        "ServerAliveCountMax=8".into(),
    ])
    .args(connection_options(t, key, None).ok()?)
    .args(["-N", "-f"])
    .arg(t.alias())
    // Nothing of the caller's: the master outlives this process.
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    let mut child = c.spawn().ok()?;
    // `-f`: ssh goes to the background once authenticated, and the process
    // we started exits 0.
    let deadline = std::time::Instant::now() + MASTER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    if !status.is_some_and(|s| s.success()) {
        return None;
    }
    // The control socket is bound before ssh backgrounds, but give it a
    // moment on a loaded host.
    for _ in 0..100 {
        if master_alive(&sock) {
            // A new master carries none of the sandbox's ports yet.
            for f in &t.forwards {
                if let Err(e) = master_forward(t, &sock, f, true) {
                    eprintln!("keystone: warning: sandbox {}: {e}", t.name);
                }
            }
            return Some(sock);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Open (`ssh -O forward`) or close (`ssh -O cancel`) the port forward `f`
/// on the master at `sock`. The master then listens (on the host's
/// 127.0.0.1 for a publish, through the guest's sshd on the guest's
/// 127.0.0.1 for a reach) and carries each connection over its SSH
/// connection, so over vsock. For a reach, OpenSSH's client connects a
/// guest-opened channel only to the destination it asked for: the guest
/// cannot name another host address or port.
pub fn master_forward(
    t: &Target,
    sock: &Path,
    f: &PortForward,
    open: bool,
) -> Result<(), SshError> {
    let mut c = Command::new("ssh");
    // No config and no ClearAllForwardings here: the forward travels as
    // this client's command line to the master.
    c.args(["-F", "/dev/null", "-o"])
        .arg(format!(
            "ControlPath={}",
            ssh_value(&sock.to_string_lossy())
        ))
        .args(["-O", if open { "forward" } else { "cancel" }])
        .args(f.ssh_args())
        .arg(t.alias());
    let run = run_bounded(c, MASTER_TIMEOUT, 4096)?;
    if run.status.is_some_and(|s| s.success()) {
        return Ok(());
    }
    let line = run.stderr_line();
    Err(SshError::Forward {
        forward: *f,
        reason: if run.status.is_none() {
            "the SSH master did not answer in time".into()
        } else if line.is_empty() {
            "the SSH master refused it".into()
        } else {
            line
        },
    })
}

/// The master's socket when one is up (and [`MASTER_ENV`] is not `off`);
/// nothing is made.
pub fn live_master(t: &Target) -> Option<PathBuf> {
    if std::env::var_os(MASTER_ENV).is_some_and(|v| v == "off") {
        return None;
    }
    t.master_socket().filter(|s| master_alive(s))
}

/// End every master of `t` (`ssh -O exit`) and remove their sockets: on
/// stop, and before a boot.
pub fn close_masters(t: &Target) {
    for (dir, prefix) in t.master_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let sock = e.path();
            if master_alive(&sock) {
                let mut c = Command::new("ssh");
                c.args(["-F", "/dev/null", "-o"])
                    .arg(format!(
                        "ControlPath={}",
                        ssh_value(&sock.to_string_lossy())
                    ))
                    .args(["-O", "exit"])
                    .arg(t.alias());
                let _ = run_bounded(c, Duration::from_secs(5), 4096);
            }
            let _ = std::fs::remove_file(&sock);
        }
    }
}

/// An `ssh` command to `t` running `remote` (a shell command line), with a
/// TTY when `tty`.
pub fn ssh_command(
    t: &Target,
    key: &UserKey,
    tty: bool,
    remote: &str,
) -> Result<Command, SshError> {
    let mut c = Command::new("ssh");
    c.args(ssh_options(t, key)?);
    c.arg(if tty { "-tt" } else { "-T" });
    c.arg(t.alias());
    c.arg("--");
    c.arg(remote);
    Ok(c)
}

/// The remote command line for `exec`: `cd /workspace && CMD...`, each
/// argument quoted.
pub fn remote_exec_line(cmd: &[String]) -> String {
    let args: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    format!("cd {WORKSPACE} && exec {}", args.join(" "))
}

/// `attach`: an interactive login shell in /workspace.
pub fn attach(t: &Target, key: &UserKey) -> Result<ExitStatus, SshError> {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal();
    ssh_command(t, key, tty, &format!("cd {WORKSPACE} && exec bash -l"))?
        .status()
        .map_err(SshError::Spawn)
}

/// `exec`: run `cmd` in /workspace, streaming stdin/stdout/stderr; a TTY
/// only when our stdin is one. Returns the command's exit code, or 255
/// when there was none (killed by a signal, or the connection failed), as
/// `ssh` reports them.
///
/// Without a TTY the session goes straight to the sandbox's master over
/// its control socket ([`super::mux`]: no `ssh` process is started); with
/// one, or without a master, `ssh` runs it.
///
/// `key` is asked for only when the master must be made or `ssh` runs (a
/// key with a passphrase costs an `ssh-keygen` run to check).
pub fn exec(
    t: &Target,
    key: &dyn Fn() -> Result<UserKey, SshError>,
    cmd: &[String],
) -> Result<u8, SshError> {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let tty = std::io::stdin().is_terminal();
    let line = remote_exec_line(cmd);
    let sock = (!tty)
        .then(|| live_master(t).or_else(|| key().ok().and_then(|k| master(t, &k))))
        .flatten();
    if let Some(sock) = sock {
        let (i, o, e) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
        let stdio = [i.as_fd(), o.as_fd(), e.as_fd()];
        let flags = stdio.map(fd_flags);
        let ran = super::mux::run_session(&sock, &line, stdio);
        // The master made our descriptors non-blocking while it used them;
        // they are shared with whoever started us.
        for (fd, f) in stdio.into_iter().zip(flags) {
            restore_fd_flags(fd, f);
        }
        match ran {
            Ok(end) => {
                if end == super::mux::Ended::NoStatus && !master_alive(&sock) {
                    eprintln!(
                        "keystone: error: the SSH connection to sandbox {} was lost ({})",
                        t.name,
                        t.state_dir.join("mux.log").display()
                    );
                }
                return Ok(end.code());
            }
            Err(e) if !e.nothing_ran() => return Err(SshError::Mux(e)),
            // The master went away before the request: a connection of
            // its own (`ssh` re-makes the master if it can).
            Err(_) => {}
        }
    }
    let st = ssh_command(t, &key()?, tty, &line)?
        .status()
        .map_err(SshError::Spawn)?;
    Ok(super::remote::exit_code(st))
}

/// A descriptor's status flags (`F_GETFL`), if it is open.
fn fd_flags(fd: std::os::fd::BorrowedFd<'_>) -> Option<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL reads the flags of a descriptor we borrow; no memory
    // is passed.
    let f = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    (f >= 0).then_some(f)
}

/// Puts back `O_NONBLOCK` as it was in `flags` (from [`fd_flags`]).
fn restore_fd_flags(fd: std::os::fd::BorrowedFd<'_>, flags: Option<libc::c_int>) {
    use std::os::fd::AsRawFd;
    let (Some(was), Some(now)) = (flags, fd_flags(fd)) else {
        return;
    };
    if (was ^ now) & libc::O_NONBLOCK != 0 {
        let f = (now & !libc::O_NONBLOCK) | (was & libc::O_NONBLOCK);
        // SAFETY: F_SETFL on a descriptor we borrow, with an int argument.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, f) };
    }
}

/// Most stderr kept by [`run_bounded`] (its start), for error messages.
pub const STDERR_KEPT: u64 = 4096;

/// What [`run_bounded`] saw.
#[derive(Debug)]
pub struct BoundedRun {
    /// The exit status; `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
    /// Stdout, up to the byte limit.
    pub stdout: Vec<u8>,
    /// The first [`STDERR_KEPT`] bytes of stderr.
    pub stderr: Vec<u8>,
}

impl BoundedRun {
    /// The last non-empty line of the kept stderr, sanitised (for an error
    /// message); empty when there is none.
    pub fn stderr_line(&self) -> String {
        String::from_utf8_lossy(&self.stderr)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| sanitize(l.trim()))
            .unwrap_or_default()
    }
}

/// Run `cmd` to completion, killing its whole process group (it runs in its
/// own: ssh, the proxy and whatever git started go too) after `limit`;
/// stdout is kept up to `max` bytes, stderr's start is kept and the rest
/// drained. For commands whose output or duration the guest controls.
pub fn run_bounded(cmd: Command, limit: Duration, max: u64) -> Result<BoundedRun, SshError> {
    run_bounded_with_input(cmd, &[], limit, max)
}

/// [`run_bounded`], with `input` written to the command's stdin (closed
/// after it; `/dev/null` when empty).
pub fn run_bounded_with_input(
    mut cmd: Command,
    input: &[u8],
    limit: Duration,
    max: u64,
) -> Result<BoundedRun, SshError> {
    use std::os::unix::process::CommandExt as _;
    let stdin = if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(SshError::Spawn)?;
    let writer = child.stdin.take().map(|mut w| {
        let input = input.to_vec();
        // A child that stops reading gets EPIPE, not a stuck writer.
        std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = w.write_all(&input);
        })
    });
    // Kept up to `max`, then drained so the child never blocks on a full
    // pipe.
    let keep = |pipe: Option<Box<dyn Read + Send>>, max: u64| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(o) = pipe {
                let mut o = o.take(max);
                let _ = o.read_to_end(&mut buf);
                let _ = std::io::copy(&mut o.into_inner(), &mut std::io::sink());
            }
            buf
        })
    };
    let out = keep(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        max,
    );
    let err = keep(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
        STDERR_KEPT,
    );
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() >= deadline => {
                if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: kill(2) takes no pointers; the group is the
                    // child's own (process_group(0) above), and the child
                    // is not reaped yet, so the id is still its.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(SshError::Spawn(e)),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok(BoundedRun {
        status,
        stdout,
        stderr,
    })
}

/// Longest a CLI query in the guest may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Most output kept from a CLI query.
pub const QUERY_MAX_OUTPUT: u64 = 8 << 20;

/// Run `remote` in the guest and capture stdout (stdin closed), within
/// [`QUERY_TIMEOUT`] and [`QUERY_MAX_OUTPUT`]. For the CLI's own queries
/// (sync); the guest's output is untrusted data.
pub fn capture(t: &Target, key: &UserKey, remote: &str) -> Result<(ExitStatus, Vec<u8>), SshError> {
    capture_with_input(t, key, remote, &[])
}

/// [`capture`], with `input` on the remote command's stdin: for data whose
/// size the command line could not take (one argument is at most 128 KiB).
pub fn capture_with_input(
    t: &Target,
    key: &UserKey,
    remote: &str,
    input: &[u8],
) -> Result<(ExitStatus, Vec<u8>), SshError> {
    let run = run_bounded_with_input(
        ssh_command(t, key, false, remote)?,
        input,
        QUERY_TIMEOUT,
        QUERY_MAX_OUTPUT,
    )?;
    match run.status {
        Some(st) => Ok((st, run.stdout)),
        None => Err(SshError::Refused {
            port: SSH_PORT,
            reply: format!("no answer within {} s", QUERY_TIMEOUT.as_secs()),
        }),
    }
}

/// Ask the guest to power off (`sudo systemctl poweroff`), giving up after
/// 15 s. True when the request was delivered (the session then ends with
/// the VM).
pub fn request_poweroff(t: &Target, key: &UserKey) -> bool {
    let Ok(cmd) = ssh_command(t, key, false, "sudo -n systemctl poweroff") else {
        return false;
    };
    match run_bounded(cmd, Duration::from_secs(15), 4096) {
        Ok(BoundedRun {
            status: Some(s), ..
        }) => s.success() || s.code() == Some(255),
        _ => false,
    }
}

/// The `ssh-config` stanza for `t`: `ssh keystone-<name>` (and editors'
/// remote SSH) then works with the same pinning and proxy.
pub fn config_stanza(t: &Target, key: &UserKey) -> String {
    let proxy = format!(
        "{} agent proxy {} 22",
        shell_quote(&self_exe().to_string_lossy()),
        t.name
    )
    .replace('%', "%%");
    let mut s = format!("Host {}\n", t.alias());
    for (k, v) in [
        ("HostName", t.alias()),
        ("User", GUEST_USER.to_string()),
        ("ProxyCommand", proxy),
        ("HostKeyAlias", t.alias()),
        (
            "UserKnownHostsFile",
            ssh_value(&t.known_hosts().to_string_lossy()),
        ),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("UpdateHostKeys", "no".into()),
        ("CheckHostIP", "no".into()),
        ("IdentityFile", ssh_value(&key.private.to_string_lossy())),
        ("IdentitiesOnly", "yes".into()),
        ("PasswordAuthentication", "no".into()),
        ("KbdInteractiveAuthentication", "no".into()),
        ("ForwardAgent", "no".into()),
        ("ForwardX11", "no".into()),
        ("ClearAllForwardings", "yes".into()),
        ("PermitLocalCommand", "no".into()),
        ("ControlMaster", "no".into()),
    ] {
        s.push_str(&format!("  {k} {v}\n"));
    }
    // Ride the sandbox's master while it is up (ssh connects by itself
    // when nothing answers there).
    if let Some(sock) = t.master_socket() {
        s.push_str(&format!(
            "  ControlPath {}\n",
            ssh_value(&sock.to_string_lossy())
        ));
    }
    s
}

/// Replace control characters (terminal escapes) in guest-supplied text,
/// keeping newlines and tabs, and the invisible characters that make text
/// read other than it is: bidirectional overrides and isolates (a branch
/// name that displays reversed, "Trojan Source") and zero-width ones.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            let invisible = matches!(
                c,
                '\u{200b}'..='\u{200f}'
                    | '\u{202a}'..='\u{202e}'
                    | '\u{2060}'..='\u{2064}'
                    | '\u{2066}'..='\u{2069}'
                    | '\u{061c}'
                    | '\u{feff}'
            );
            if c == '\n' || c == '\t' || !(c.is_control() || invisible) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Port forwards opened and closed on a real OpenSSH master (its
    /// server `sshd -i`: the host's own loopback stands for the guest's).
    #[test]
    fn port_forwards_open_and_close_on_a_real_master() {
        use super::super::state::PortDirection;
        use std::net::{TcpListener, TcpStream};
        let dir = super::super::mux::tests::tempdir();
        let sock = super::super::mux::tests::real_master(&dir);
        let t = Target {
            name: "fwd".into(),
            uds: dir.join("vsock"),
            state_dir: dir.clone(),
            forwards: Vec::new(),
        };
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        // The "guest" service, answering each connection with one line.
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let service_port = service.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in service.incoming().flatten() {
                let _ = (&c).write_all(b"hello through the master\n");
            }
        });
        let read_from = |port: u16| -> std::io::Result<String> {
            let mut c = TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut s = String::new();
            c.read_to_string(&mut s)?;
            Ok(s)
        };
        let publish = PortForward {
            direction: PortDirection::Publish,
            guest_port: service_port,
            host_port: free(),
        };
        master_forward(&t, &sock, &publish, true).unwrap();
        assert_eq!(
            read_from(publish.host_port).unwrap(),
            "hello through the master\n"
        );
        // A reach: the far side listens, and reaches only its destination.
        let reach_port = free();
        let reach = PortForward {
            direction: PortDirection::Reach,
            guest_port: reach_port,
            host_port: service_port,
        };
        master_forward(&t, &sock, &reach, true).unwrap();
        assert_eq!(read_from(reach_port).unwrap(), "hello through the master\n");
        // Taken host port: the master refuses, and says so.
        let taken = PortForward {
            guest_port: reach_port,
            ..publish
        };
        let err = master_forward(&t, &sock, &taken, true).unwrap_err();
        assert!(matches!(err, SshError::Forward { .. }), "{err}");
        // Closed: nothing listens any more.
        master_forward(&t, &sock, &publish, false).unwrap();
        master_forward(&t, &sock, &reach, false).unwrap();
        for port in [publish.host_port, reach_port] {
            assert_eq!(
                read_from(port).unwrap_err().kind(),
                std::io::ErrorKind::ConnectionRefused,
                "port {port} still forwarded"
            );
        }
        let _ = Command::new("ssh")
            .args(["-F", "/dev/null", "-o"])
            .arg(format!("ControlPath={}", sock.display()))
            .args(["-O", "exit", "x"])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_relay_cuts_an_endless_stream_at_its_cap() {
        // An endless pack: the relay passes on the cap and no byte more.
        let mut endless = std::io::repeat(b'P');
        let mut out = Vec::new();
        match relay(&mut endless, &mut out, Some(1 << 20)) {
            Err(SshError::OverCap(n)) => assert_eq!(n, 1 << 20),
            other => panic!("{other:?}"),
        }
        assert!(out.len() <= 1 << 20, "{}", out.len());
        assert!(SshError::OverCap(1).to_string().starts_with(GUEST_OVER_CAP));
        // Under the cap, or uncapped: everything, then end of file.
        let mut out = Vec::new();
        assert_eq!(
            relay(&mut &[7u8; 1000][..], &mut out, Some(1000)).unwrap(),
            1000
        );
        assert_eq!(out.len(), 1000);
        assert_eq!(
            relay(&mut &[7u8; 1000][..], &mut Vec::new(), None).unwrap(),
            1000
        );
    }

    #[test]
    fn a_capped_command_is_killed_at_its_cap_and_otherwise_passes_its_exit_code() {
        // sync's fetch through the master: an endless "pack" on stdout.
        let sh = |script: &str| vec!["sh".to_string(), "-c".into(), script.into()];
        let mut out = Vec::new();
        let t0 = std::time::Instant::now();
        match capped(1 << 16, &sh("exec yes"), &mut out) {
            Err(SshError::OverCap(n)) => assert_eq!(n, 1 << 16),
            other => panic!("{other:?}"),
        }
        assert!(out.len() <= 1 << 16, "{}", out.len());
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the command was not killed"
        );
        let mut out = Vec::new();
        assert_eq!(capped(100, &sh("echo hi; exit 3"), &mut out).unwrap(), 3);
        assert_eq!(out, b"hi\n");
        assert_eq!(
            capped(100, &sh("kill -9 $$"), &mut Vec::new()).unwrap(),
            137
        );
        assert!(capped(100, &[], &mut Vec::new()).is_err());
    }

    #[test]
    fn the_master_socket_is_private_to_the_pinned_host_keys() {
        let root = std::env::temp_dir().join(format!("ks-mux-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        struct Dir(PathBuf);
        impl Dir {
            fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(root);
        let t = Target {
            name: "p".into(),
            uds: dir.path().join("vsock.sock"),
            state_dir: dir.path().to_path_buf(),
            forwards: Vec::new(),
        };
        assert_eq!(t.master_socket(), None, "no host key pinned");
        std::fs::write(dir.path().join("host_keys"), "\n").unwrap();
        assert_eq!(t.master_socket(), None, "an empty host_keys pins nothing");
        std::fs::write(dir.path().join("host_keys"), "ssh-ed25519 AAAA1\n").unwrap();
        let a = t.master_socket().unwrap();
        assert_eq!(a.parent(), Some(dir.path()));
        assert_eq!(t.master_socket(), Some(a.clone()), "stable");
        std::fs::write(dir.path().join("host_keys"), "ssh-ed25519 AAAA2\n").unwrap();
        let b = t.master_socket().unwrap();
        assert_ne!(a, b, "another host key, another master");
        // Nobody answers there: a client connects by itself.
        assert!(!master_alive(&b));
        assert_eq!(
            mux_options(None),
            ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        );
        assert_eq!(
            mux_options(Some(Path::new("/s/mux-1%")))[3],
            "ControlPath=/s/mux-1%%"
        );
        // Too long in the state directory: in the private runtime
        // directory instead (as the vsock socket moves).
        let deep = dir.path().join("d".repeat(MAX_CONTROL_PATH));
        std::fs::create_dir(&deep).unwrap();
        std::fs::write(deep.join("host_keys"), "ssh-ed25519 AAAA1\n").unwrap();
        let long = Target {
            state_dir: deep.clone(),
            uds: deep.join("vsock"),
            ..t
        };
        let m = long.master_socket().unwrap();
        assert!(m.as_os_str().len() <= MAX_CONTROL_PATH, "{}", m.display());
        assert!(m
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("p.mux-"));
        assert!(long
            .master_dirs()
            .iter()
            .any(|(d, _)| Some(d.as_path()) == m.parent()));
    }

    #[test]
    fn a_timed_out_command_loses_its_whole_process_group() {
        // What a stalled fetch leaves: git's children (ssh, the proxy),
        // here a background sleep whose pid is written down.
        let pidfile = std::env::temp_dir().join(format!("ks-pgrp-{}", std::process::id()));
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("sleep 600 & echo $! > {}; wait", pidfile.display()));
        let run = run_bounded(sh, Duration::from_millis(500), 1024).unwrap();
        assert!(run.status.is_none(), "killed at the limit");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::remove_file(&pidfile).unwrap();
        // The grandchild was SIGKILLed; it is reaped by init, so poll.
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.is_empty() || stat.split(' ').nth(2) == Some("Z")
        });
        assert!(gone, "sleep {pid} survived the timeout");
        // Stderr's start is kept for messages.
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg("echo one >&2; echo 'fatal: two' >&2; exit 3");
        let run = run_bounded(sh, Duration::from_secs(10), 1024).unwrap();
        assert_eq!(run.status.and_then(|s| s.code()), Some(3));
        assert_eq!(run.stderr_line(), "fatal: two");
    }

    #[test]
    fn concurrent_first_use_makes_one_matching_key_pair() {
        let dir = std::env::temp_dir().join(format!("ks-userkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let home = dir.join("home");
        let keys = dir.join("keys");
        std::fs::create_dir_all(&home).unwrap();
        let got: Vec<UserKey> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| user_key(&home, &keys).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let derived = Command::new("ssh-keygen")
            .args(["-y", "-f"])
            .arg(keys.join("id_ed25519"))
            .output()
            .unwrap();
        let derived = String::from_utf8_lossy(&derived.stdout);
        let derived = derived.split_whitespace().take(2).collect::<Vec<_>>();
        for k in &got {
            assert_eq!(
                k.public.split_whitespace().take(2).collect::<Vec<_>>(),
                derived,
                "public key does not match the private key"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quoting_survives_the_shell() {
        for s in ["plain", "two words", "it's", "$(reboot)", "", "a\"b", "*"] {
            let out = Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(s))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
        assert_eq!(
            remote_exec_line(&["sh".into(), "-c".into(), "exit 3".into()]),
            "cd /workspace && exec sh -c 'exit 3'"
        );
    }

    #[test]
    fn host_keys_are_pinned_strictly() {
        let lines = known_hosts_lines(
            "keystone-a",
            "ssh-ed25519 AAAAC3Nza+/=\nssh-rsa AAA; rm -rf /\nbogus\necdsa-sha2-nistp256 AAAAE2\n",
        );
        assert_eq!(
            lines,
            vec![
                "keystone-a ssh-ed25519 AAAAC3Nza+/=",
                "keystone-a ecdsa-sha2-nistp256 AAAAE2"
            ]
        );
    }

    #[test]
    fn known_hosts_is_rewritten_only_when_the_pinned_keys_change() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ks-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let t = Target {
            name: "p".into(),
            uds: dir.join("vsock.sock"),
            state_dir: dir.clone(),
            forwards: Vec::new(),
        };
        std::fs::write(dir.join("host_keys"), "ssh-ed25519 AAAA1\n").unwrap();
        let path = pin_host_keys(&t).unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(pin_host_keys(&t).unwrap(), path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "unchanged: not rewritten"
        );
        std::fs::write(dir.join("host_keys"), "ssh-ed25519 AAAA2\n").unwrap();
        pin_host_keys(&t).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("AAAA2") && !text.contains("AAAA1"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ssh_option_values_are_not_expanded_or_split() {
        assert_eq!(ssh_value("/home/a/key"), "/home/a/key");
        assert_eq!(ssh_value("/tmp/50%/k"), "/tmp/50%%/k");
        assert_eq!(ssh_value("/home/a b/k"), "\"/home/a b/k\"");
    }

    #[test]
    fn guest_text_loses_terminal_escapes() {
        assert_eq!(sanitize("ok\x1b[2Jx\ty\n"), "ok?[2Jx\ty\n");
        // Bidi overrides/isolates and zero-width characters are shown.
        assert_eq!(sanitize("main\u{202e}txt.exe"), "main?txt.exe");
        assert_eq!(sanitize("a\u{2066}b\u{2069}c\u{200b}d\u{feff}"), "a?b?c?d?");
        assert_eq!(sanitize("ünïcödé ok"), "ünïcödé ok");
    }

    #[test]
    fn user_key_prefers_the_users_own_then_generates_one() {
        let home = std::env::temp_dir().join(format!("ks-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let keys = home.join("keys");
        let k = user_key(&home, &keys).unwrap();
        assert_eq!(k.private, keys.join("id_ed25519"));
        assert!(k.public.starts_with("ssh-ed25519 "), "{}", k.public);
        let again = user_key(&home, &keys).unwrap();
        assert_eq!(again.public, k.public, "generated once, then reused");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let keygen = |path: &Path, pass: &str| {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", pass, "-C", "me@host", "-f"])
                .arg(path)
                .status()
                .unwrap();
            assert!(st.success());
        };
        // A passphrase-protected key without an agent is passed over.
        keygen(&home.join(".ssh/id_ed25519"), "secret");
        if std::env::var_os("SSH_AUTH_SOCK").is_none() {
            assert_eq!(
                user_key(&home, &keys).unwrap().private,
                keys.join("id_ed25519")
            );
        }
        keygen(&home.join(".ssh/id_rsa"), "");
        let own = user_key(&home, &keys).unwrap();
        assert_eq!(own.private, home.join(".ssh/id_rsa"));
        assert!(own.public.ends_with(" me@host"), "{}", own.public);
        use base64::Engine as _;
        let param = authorized_key_param(&own);
        let b64 = param.strip_prefix("keystone.authorized_key=").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), own.public);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
