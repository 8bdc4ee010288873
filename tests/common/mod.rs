//! Shared helpers for the integration tests: run `keystone-vmm` as a
//! process, watch its serial console and log, and time out instead of
//! hanging.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fail (never skip) when this host has no usable KVM.
pub fn require_kvm() {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) => panic!(
            "these tests boot real VMs and need /dev/kvm (read-write): {e}. \
             Run them on a Linux host with KVM enabled; they are never skipped."
        ),
    }
}

/// The probe guest built by the workspace.
pub fn probe_elf() -> PathBuf {
    let p = keystone_probe::elf_path().to_path_buf();
    assert!(p.exists(), "probe guest missing at {}", p.display());
    p
}

/// A running keystone-vmm with its output captured.
pub struct VmmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
}

fn pump(mut src: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    });
}

/// Path of the keystone-vmm binary under test.
pub fn vmm_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keystone-vmm"))
}

impl VmmProcess {
    /// Start keystone-vmm with `args`.
    pub fn spawn(args: &[&str]) -> Self {
        let mut cmd = Command::new(vmm_bin());
        cmd.args(args);
        Self::spawn_with(&mut cmd)
    }

    /// Start a prepared command (e.g. keystone-vmm inside `ip netns exec`).
    pub fn spawn_with(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keystone-vmm");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().unwrap(), stdout.clone());
        pump(child.stderr.take().unwrap(), stderr.clone());
        let stdin = child.stdin.take();
        VmmProcess {
            child,
            stdin,
            stdout,
            stderr,
            status: None,
        }
    }

    /// Boot the probe guest with `cmdline` and extra VMM arguments.
    pub fn probe(cmdline: &str, extra: &[&str]) -> Self {
        require_kvm();
        let elf = probe_elf();
        let mut args = vec!["--kernel", elf.to_str().unwrap(), "--cmdline", cmdline];
        args.extend_from_slice(extra);
        Self::spawn(&args)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest printed so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Everything the VMM logged so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Wait until the serial console shows `needle`.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stdout().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?} on the serial console\n--- serial ---\n{}\n--- log ---\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                // Give the pump threads a moment to drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                if self.stdout().contains(needle) {
                    self.status = Some(st);
                    return;
                }
                panic!(
                    "keystone-vmm exited ({st}) before {needle:?} appeared\n--- serial ---\n{}\n--- log ---\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Type into the guest's console.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Send a signal to the VMM.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on the pid of our own child, which has not been
        // reaped (we still hold its Child).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Wait for the VMM to exit; panics (after killing it) on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                self.status = Some(st);
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "keystone-vmm did not exit within {timeout:?}\n--- serial ---\n{}\n--- log ---\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("keystone-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
