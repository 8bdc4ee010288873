//! A client of OpenSSH's connection-multiplexing protocol (`PROTOCOL.mux`,
//! version 4), so that a non-interactive `exec` rides the sandbox's SSH
//! master without starting an `ssh` process of its own.
//!
//! The session request carries the remote command line; our stdin, stdout
//! and stderr follow as three descriptors (`SCM_RIGHTS`, one byte each, as
//! `mm_send_fd` sends them). The master then does the session's I/O on
//! those descriptors itself, and this side only waits on the control
//! socket for the exit message, exactly like `ssh -O`-style mux clients.
//! No TTY is ever requested here: interactive sessions (attach, an `exec`
//! whose stdin is a terminal) keep using `ssh`, which handles raw mode and
//! window changes.
//!
//! What the master sends is trusted no more than it must be: packets are
//! bounded, and a reply that is not what the protocol allows is an error,
//! never a panic.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MUX_MSG_HELLO: u32 = 0x0000_0001;
const MUX_C_NEW_SESSION: u32 = 0x1000_0002;
const MUX_S_PERMISSION_DENIED: u32 = 0x8000_0002;
const MUX_S_FAILURE: u32 = 0x8000_0003;
const MUX_S_EXIT_MESSAGE: u32 = 0x8000_0004;
const MUX_S_SESSION_OPENED: u32 = 0x8000_0006;
const MUX_S_TTY_ALLOC_FAIL: u32 = 0x8000_0008;
/// The protocol version both sides must speak.
const MUX_VERSION: u32 = 4;
/// Largest packet read from the master (OpenSSH's own cap is 256 KiB).
const MAX_PACKET: usize = 256 * 1024;
/// `escape_char` for "no escape character".
const NO_ESCAPE: u32 = 0xffff_ffff;
/// How long the hello exchange may take (the master answers at once).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session could not be had through the master.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// Connecting to the control socket failed (no master listens).
    #[error("SSH master socket {path}: {source}")]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The hello exchange failed or named another protocol version.
    #[error("SSH master hello: {0}")]
    Hello(String),
    /// Passing a descriptor failed (one of ours is closed): the master
    /// starts no session without all three.
    #[error("passing stdin/stdout/stderr to the SSH master: {0}")]
    SendFds(std::io::Error),
    /// The master answered the session request with a refusal.
    #[error("the SSH master refused the session: {0}")]
    Refused(String),
    /// Reading or writing the control socket failed after the session
    /// request went out.
    #[error("SSH master control socket: {0}")]
    Io(std::io::Error),
    /// The master sent something the protocol does not allow here.
    #[error("SSH master: {0}")]
    Protocol(String),
}

impl MuxError {
    /// Whether nothing can have run: the session was never requested, or
    /// the master said no. Only then may the caller try another way.
    pub fn nothing_ran(&self) -> bool {
        matches!(
            self,
            MuxError::Connect { .. }
                | MuxError::Hello(_)
                | MuxError::SendFds(_)
                | MuxError::Refused(_)
        )
    }
}

/// How a session that opened ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The remote command's exit status.
    Exit(u32),
    /// The control socket closed without one: the command was killed by a
    /// signal (OpenSSH passes no exit signal to mux clients), or the
    /// master lost its connection.
    NoStatus,
}

impl Ended {
    /// As a process exit code: the status modulo 256 (as `ssh` exits with
    /// it), 255 with no status (as `ssh` does).
    pub fn code(&self) -> u8 {
        match self {
            Ended::Exit(v) => v.to_le_bytes()[0],
            Ended::NoStatus => 255,
        }
    }
}

/// Runs `command` (a remote shell command line) in a new session of the
/// master listening on `sock`, on the descriptors `stdio` (stdin, stdout,
/// stderr), without a TTY; returns once the master closed the session.
pub fn run_session(
    sock: &Path,
    command: &str,
    stdio: [BorrowedFd<'_>; 3],
) -> Result<Ended, MuxError> {
    let mut s = UnixStream::connect(sock).map_err(|source| MuxError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    hello(&mut s)?;

    let mut m = Vec::new();
    put_u32(&mut m, MUX_C_NEW_SESSION);
    put_u32(&mut m, 0); // request id
    put_str(&mut m, b""); // reserved
    put_u32(&mut m, 0); // want TTY
    put_u32(&mut m, 0); // X11 forwarding
    put_u32(&mut m, 0); // agent forwarding
    put_u32(&mut m, 0); // subsystem
    put_u32(&mut m, NO_ESCAPE);
    put_str(&mut m, b""); // TERM: no TTY
    put_str(&mut m, command.as_bytes());
    // No environment: the same as `ssh -F /dev/null` sends.
    write_packet(&mut s, &m).map_err(|e| MuxError::Hello(e.to_string()))?;
    for fd in stdio {
        send_fd(&s, fd.as_raw_fd()).map_err(MuxError::SendFds)?;
    }
    // From here the master may run the command: no error says otherwise.
    s.set_read_timeout(None).map_err(MuxError::Io)?;

    let reply = read_packet(&mut s).map_err(MuxError::Io)?;
    let mut r = Reader(&reply);
    let kind = r.u32()?;
    let _request = r.u32()?;
    let session = match kind {
        MUX_S_SESSION_OPENED => r.u32()?,
        MUX_S_PERMISSION_DENIED | MUX_S_FAILURE => {
            return Err(MuxError::Refused(r.text()?));
        }
        other => {
            return Err(MuxError::Protocol(format!(
                "reply 0x{other:08x} to a session request"
            )))
        }
    };

    let mut status = None;
    // Until the master closes the socket: the session is over.
    while let Ok(p) = read_packet(&mut s) {
        let mut r = Reader(&p);
        let kind = r.u32()?;
        let sid = r.u32()?;
        if sid != session {
            return Err(MuxError::Protocol(format!(
                "message 0x{kind:08x} for session {sid}, not {session}"
            )));
        }
        match kind {
            MUX_S_TTY_ALLOC_FAIL => {}
            MUX_S_EXIT_MESSAGE if status.is_none() => status = Some(r.u32()?),
            other => {
                return Err(MuxError::Protocol(format!(
                    "message 0x{other:08x} during a session"
                )))
            }
        }
    }
    Ok(status.map_or(Ended::NoStatus, Ended::Exit))
}

/// Both sides send `MUX_MSG_HELLO` with the version (extensions may
/// follow the master's; none are used).
fn hello(s: &mut UnixStream) -> Result<(), MuxError> {
    let fail = |e: std::io::Error| MuxError::Hello(e.to_string());
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(fail)?;
    let mut m = Vec::new();
    put_u32(&mut m, MUX_MSG_HELLO);
    put_u32(&mut m, MUX_VERSION);
    write_packet(s, &m).map_err(fail)?;
    let p = read_packet(s).map_err(fail)?;
    let mut r = Reader(&p);
    let bad = |e: MuxError| MuxError::Hello(e.to_string());
    let kind = r.u32().map_err(bad)?;
    let version = r.u32().map_err(bad)?;
    if kind != MUX_MSG_HELLO {
        return Err(MuxError::Hello(format!("got message 0x{kind:08x}")));
    }
    if version != MUX_VERSION {
        return Err(MuxError::Hello(format!(
            "protocol version {version}, not {MUX_VERSION}"
        )));
    }
    Ok(())
}

/// One descriptor with one byte of data, as OpenSSH's `mm_send_fd`.
fn send_fd(s: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    match s.send_with_fd(&[0u8][..], fd) {
        Ok(1) => Ok(()),
        Ok(_) => Err(std::io::Error::other("short write of a descriptor")),
        Err(e) => Err(std::io::Error::from_raw_os_error(e.errno())),
    }
}

fn put_u32(m: &mut Vec<u8>, v: u32) {
    m.extend_from_slice(&v.to_be_bytes());
}

fn put_str(m: &mut Vec<u8>, s: &[u8]) {
    // A command line longer than 4 GiB cannot reach here (argv limits).
    put_u32(m, u32::try_from(s.len()).unwrap_or(u32::MAX));
    m.extend_from_slice(s);
}

fn write_packet(s: &mut UnixStream, body: &[u8]) -> std::io::Result<()> {
    let len =
        u32::try_from(body.len()).map_err(|_| std::io::Error::other("mux packet too large"))?;
    let mut p = Vec::with_capacity(body.len() + 4);
    put_u32(&mut p, len);
    p.extend_from_slice(body);
    s.write_all(&p)
}

/// One packet's body (length-prefixed, at most [`MAX_PACKET`]).
fn read_packet(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_PACKET {
        return Err(std::io::Error::other(format!(
            "mux packet of {len} bytes (most {MAX_PACKET})"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// Reads SSH wire types off a packet body.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Result<u32, MuxError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or_else(|| MuxError::Protocol("short packet".into()))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*head))
    }

    /// A string, as text (lossy, for messages).
    fn text(&mut self) -> Result<String, MuxError> {
        let len = self.u32()? as usize;
        if len > self.0.len() {
            return Err(MuxError::Protocol("short string".into()));
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn packets_are_length_prefixed_big_endian() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_packet(&mut a, &[1, 2, 3]).unwrap();
        let mut raw = [0u8; 7];
        b.read_exact(&mut raw).unwrap();
        assert_eq!(raw, [0, 0, 0, 3, 1, 2, 3]);
    }

    #[test]
    fn oversized_and_short_packets_are_errors_not_panics() {
        let mut big: &[u8] = &[0x7f, 0xff, 0xff, 0xff];
        assert!(read_packet(&mut big).is_err());
        let mut cut: &[u8] = &[0, 0, 0, 9, 1];
        assert!(read_packet(&mut cut).is_err());
        let mut r = Reader(&[0, 0, 1]);
        assert!(matches!(r.u32(), Err(MuxError::Protocol(_))));
        let mut r = Reader(&[0, 0, 0, 200, b'x']);
        assert!(matches!(r.text(), Err(MuxError::Protocol(_))));
    }

    #[test]
    fn exit_codes_as_ssh_reports_them() {
        assert_eq!(Ended::Exit(0).code(), 0);
        assert_eq!(Ended::Exit(7).code(), 7);
        assert_eq!(Ended::Exit(256 + 3).code(), 3);
        assert_eq!(Ended::NoStatus.code(), 255);
    }

    #[test]
    fn only_errors_before_the_request_allow_another_try() {
        let dir = tempdir();
        let err = run_session(
            &dir.join("none"),
            "true",
            [
                std::io::stdin().as_fd(),
                std::io::stdout().as_fd(),
                std::io::stderr().as_fd(),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, MuxError::Connect { .. }) && err.nothing_ran());
        assert!(MuxError::Refused("no".into()).nothing_ran());
        assert!(MuxError::SendFds(std::io::Error::other("EBADF")).nothing_ran());
        assert!(!MuxError::Io(std::io::Error::other("x")).nothing_ran());
        assert!(!MuxError::Protocol("x".into()).nothing_ran());
    }

    /// A master that says hello with another version is refused before
    /// any request is sent.
    #[test]
    fn another_protocol_version_is_refused() {
        let dir = tempdir();
        let path = dir.join("sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut m = Vec::new();
            put_u32(&mut m, MUX_MSG_HELLO);
            put_u32(&mut m, 3);
            write_packet(&mut c, &m).unwrap();
            // The client's hello, then nothing more.
            let hello = read_packet(&mut c).unwrap();
            assert_eq!(hello, [0, 0, 0, 1, 0, 0, 0, 4]);
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            rest
        });
        let err = run_session(
            &path,
            "true",
            [
                std::io::stdin().as_fd(),
                std::io::stdout().as_fd(),
                std::io::stderr().as_fd(),
            ],
        )
        .unwrap_err();
        assert!(
            matches!(err, MuxError::Hello(ref m) if m.contains("version 3")),
            "{err}"
        );
        assert!(t.join().unwrap().is_empty(), "no request after a bad hello");
    }

    /// Sessions through a real OpenSSH master ([`real_master`]).
    #[test]
    fn sessions_through_a_real_openssh_master() {
        let dir = tempdir();
        let sock = real_master(&dir);

        let file = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap();
            std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
        };
        let (input, out, err) = (file("in", "from stdin\n"), file("out", ""), file("err", ""));
        let end = run_session(
            &sock,
            "cat; echo to-stderr >&2; exit 7",
            [input.as_fd(), out.as_fd(), err.as_fd()],
        )
        .unwrap();
        assert_eq!(end, Ended::Exit(7));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(read("out"), "from stdin\n");
        assert_eq!(read("err"), "to-stderr\n");

        // Killed by a signal: no exit status reaches a mux client.
        let end = run_session(
            &sock,
            "kill -9 $$",
            [input.as_fd(), out.as_fd(), err.as_fd()],
        );
        assert_eq!(end.unwrap(), Ended::NoStatus);

        let _ = std::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-o"])
            .arg(format!("ControlPath={}", sock.display()))
            .args(["-O", "exit", "test-master"])
            .output();
    }

    /// A real OpenSSH master (`ssh -M`, host alias `test-master`) whose
    /// server is `sshd -i` run as its ProxyCommand (no network, no
    /// daemon), its files in `dir`; returns its control socket.
    pub(crate) fn real_master(dir: &Path) -> PathBuf {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "this test needs OpenSSH's server at {} (apt-get install openssh-server)",
            sshd.display()
        );
        let keygen = |name: &str| {
            let st = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .unwrap();
            assert!(st.success(), "ssh-keygen");
        };
        keygen("host");
        keygen("user");
        std::fs::copy(dir.join("user.pub"), dir.join("authorized")).unwrap();
        // sshd wants its privilege separation directory (run as root).
        let _ = std::fs::create_dir_all("/run/sshd");
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "HostKey {d}/host\nAuthorizedKeysFile {d}/authorized\nStrictModes no\n\
                 UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let sock = dir.join("mux");
        let st = std::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-o"])
            .arg(format!(
                "ProxyCommand={} -i -f {d}/sshd_config -E {d}/sshd.log",
                sshd.display(),
                d = dir.display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            // As the sandbox's master has them.
            .args([
                "-o",
                "ClearAllForwardings=yes",
                "-o",
                "ForwardAgent=no",
                "-o",
                "ForwardX11=no",
            ])
            .arg("-i")
            .arg(dir.join("user"))
            .args(["-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-o"])
            .arg(format!("ControlPath={}", sock.display()))
            .args(["-N", "-f", "test-master"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("ssh.log")).unwrap())
            .status()
            .unwrap();
        let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            st.success(),
            "the master did not start: {}{}",
            log("ssh.log"),
            log("sshd.log")
        );
        sock
    }

    pub(crate) fn tempdir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("ks-mux-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
