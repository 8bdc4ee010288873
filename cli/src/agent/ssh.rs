//! Reaching a sandbox: vsock `CONNECT` through the VMM's hybrid vsock Unix
//! socket, OpenSSH over that (`ssh` with this module as its ProxyCommand),
//! the host user's key, and the guest's pinned host key.
//!
//! Every SSH invocation ignores the user's ssh_config (`-F /dev/null`),
//! offers only the chosen key, and trusts only the host key the guest
//! reported at boot (`state/host_keys`, written from the readiness message):
//! a different key is an error, never a prompt.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

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

/// `keystone agent proxy`: bridge stdin/stdout to guest vsock `port` until
/// both directions end. Returns when the guest closes.
pub fn proxy(uds: &Path, port: u32) -> Result<(), SshError> {
    let s = vsock_connect(uds, port, Duration::from_secs(10))?;
    let mut to_guest = s.try_clone().map_err(SshError::Spawn)?;
    let up = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let _ = std::io::copy(&mut stdin, &mut to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let mut from_guest = s;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 32 * 1024];
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(up);
    Ok(())
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

/// Write the pinned `known_hosts` for `t` from its `host_keys`.
pub fn pin_host_keys(t: &Target) -> Result<PathBuf, SshError> {
    let keys_path = t.state_dir.join("host_keys");
    let keys = std::fs::read_to_string(&keys_path).unwrap_or_default();
    let lines = known_hosts_lines(&t.alias(), &keys);
    if lines.is_empty() {
        return Err(SshError::NoHostKey(keys_path));
    }
    let path = t.known_hosts();
    crate::image::write_atomic(&path, (lines.join("\n") + "\n").as_bytes()).map_err(|e| {
        SshError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        }
    })?;
    Ok(path)
}

/// The `keystone` executable named in ProxyCommand: `KEYSTONE_CLI` when set
/// (tests and wrappers that call this library from another binary), else
/// this process's executable.
fn self_exe() -> PathBuf {
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
/// destination and the remote command.
pub fn ssh_options(t: &Target, key: &UserKey) -> Result<Vec<String>, SshError> {
    let known_hosts = pin_host_keys(t)?;
    let proxy = format!(
        "{} agent proxy --socket {} 22",
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
        ("ControlMaster", "no".into()),
        ("ServerAliveInterval", "15".into()),
        ("LogLevel", "ERROR".into()),
        ("User", GUEST_USER.into()),
    ] {
        o.push("-o".into());
        o.push(format!("{k}={v}"));
    }
    Ok(o)
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
/// only when our stdin is one. Returns ssh's status (the command's exit
/// code, or 255 when ssh itself failed).
pub fn exec(t: &Target, key: &UserKey, cmd: &[String]) -> Result<ExitStatus, SshError> {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal();
    ssh_command(t, key, tty, &remote_exec_line(cmd))?
        .status()
        .map_err(SshError::Spawn)
}

/// Run `cmd` to completion, killing it after `limit`; stdout is kept up to
/// `max` bytes, stderr is drained and dropped. For commands whose output
/// or duration the guest controls.
pub fn run_bounded(
    cmd: Command,
    limit: Duration,
    max: u64,
) -> Result<(Option<ExitStatus>, Vec<u8>), SshError> {
    run_bounded_with_input(cmd, &[], limit, max)
}

/// [`run_bounded`], with `input` written to the command's stdin (closed
/// after it; `/dev/null` when empty).
pub fn run_bounded_with_input(
    mut cmd: Command,
    input: &[u8],
    limit: Duration,
    max: u64,
) -> Result<(Option<ExitStatus>, Vec<u8>), SshError> {
    let stdin = if input.is_empty() {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let out = child.stdout.take();
    let err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = out {
            let mut o = o.take(max);
            let _ = o.read_to_end(&mut buf);
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut o.into_inner(), &mut std::io::sink());
        }
        buf
    });
    let drain = std::thread::spawn(move || {
        if let Some(mut e) = err {
            let _ = std::io::copy(&mut e, &mut std::io::sink());
        }
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(SshError::Spawn(e)),
        }
    };
    let buf = reader.join().unwrap_or_default();
    let _ = drain.join();
    if let Some(w) = writer {
        let _ = w.join();
    }
    Ok((status, buf))
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
    let (st, out) = run_bounded_with_input(
        ssh_command(t, key, false, remote)?,
        input,
        QUERY_TIMEOUT,
        QUERY_MAX_OUTPUT,
    )?;
    match st {
        Some(st) => Ok((st, out)),
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
        Ok((Some(s), _)) => s.success() || s.code() == Some(255),
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
    s
}

/// Drop control characters (terminal escapes) from guest-supplied text,
/// keeping newlines and tabs.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '\n' || c == '\t' || !c.is_control() {
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
    fn ssh_option_values_are_not_expanded_or_split() {
        assert_eq!(ssh_value("/home/a/key"), "/home/a/key");
        assert_eq!(ssh_value("/tmp/50%/k"), "/tmp/50%%/k");
        assert_eq!(ssh_value("/home/a b/k"), "\"/home/a b/k\"");
    }

    #[test]
    fn guest_text_loses_terminal_escapes() {
        assert_eq!(sanitize("ok\x1b[2Jx\ty\n"), "ok?[2Jx\ty\n");
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
