//! Helpers for tests that boot the real Linux guest image: the VM runner
//! (the TCG test harness here, keystone-vmm with `KEYSTONE_REAL_KVM=1` on a
//! host with vmx/svm), sandbox data disks, and the readiness listener.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crate in workspace")
        .to_path_buf()
}

/// Whether the suite runs against keystone-vmm on real KVM.
pub fn real_kvm() -> bool {
    std::env::var("KEYSTONE_REAL_KVM").as_deref() == Ok("1")
}

/// The VM binary and the env that selects it for `keystone`: the TCG
/// harness (test-only; the product never starts QEMU), or keystone-vmm
/// with `KEYSTONE_REAL_KVM=1`, which then needs vmx/svm (fails otherwise).
pub fn vm_runner() -> (PathBuf, Vec<(&'static str, String)>) {
    if real_kvm() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        assert!(
            cpuinfo.contains(" vmx") || cpuinfo.contains(" svm"),
            "KEYSTONE_REAL_KVM=1 needs a host with vmx/svm (hardware KVM); this one has neither"
        );
        let vmm = repo_root().join("target/debug/keystone-vmm");
        if !vmm.exists() {
            let st = Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "keystone-vmm"])
                .current_dir(repo_root())
                .status()
                .expect("cargo build keystone-vmm");
            assert!(st.success(), "building keystone-vmm failed");
        }
        (
            vmm.clone(),
            vec![("KEYSTONE_VMM", vmm.display().to_string())],
        )
    } else {
        for tool in ["qemu-system-x86_64", "vhost-device-vsock"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            assert!(
                found,
                "the TCG test harness needs {tool} on PATH (apt-get install qemu-system-x86; \
                 cargo install vhost-device-vsock): .ci/run installs both"
            );
        }
        let h = repo_root().join("tests/harness/keystone-vmm-tcg");
        (
            h.clone(),
            vec![
                ("KEYSTONE_VMM", h.display().to_string()),
                ("KEYSTONE_HARNESS", "tcg".to_string()),
            ],
        )
    }
}

/// The environment for `keystone agent` commands against a real Linux guest:
/// the VM runner's variables, the image, and a private HOME, config and
/// runtime directory under `root`.
pub fn agent_env(root: &Path, image: &Path) -> Vec<(&'static str, String)> {
    let (_, mut env) = vm_runner();
    env.push(("KEYSTONE_GUEST_IMAGE", image.display().to_string()));
    env.push(("HOME", root.join("home").display().to_string()));
    env.push(("XDG_CONFIG_HOME", root.join("config").display().to_string()));
    env.push(("XDG_RUNTIME_DIR", root.join("run").display().to_string()));
    env.push(("KEYSTONE_READY_TIMEOUT", "400".into()));
    env
}

/// Build (or take from the machine's cache) the Debian guest image with
/// `keystone image build`; returns its directory.
pub fn debian_image(keystone: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYSTONE_GUEST_IMAGE") {
        return PathBuf::from(dir);
    }
    let out = Command::new(keystone)
        .args(["image", "build", "--builder", "debian"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run keystone image build");
    assert!(
        out.status.success(),
        "keystone image build failed ({})",
        out.status
    );
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!dir.is_empty(), "keystone image build printed no directory");
    PathBuf::from(dir)
}

/// A sandbox data disk like `keystone agent start` makes: ext4 whose
/// `upper/workspace` holds `workspace` (copied), plus `work/`.
pub fn data_disk(path: &Path, workspace: &Path) {
    let staging = path.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("upper")).unwrap();
    std::fs::create_dir_all(staging.join("work")).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(workspace)
        .arg(staging.join("upper/workspace"))
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "keystone-data", "-d"])
        .arg(&staging)
        .arg(path)
        .arg("2G")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(st.success(), "mkfs.ext4 failed");
    std::fs::remove_dir_all(&staging).unwrap();
}

/// Wait for one readiness connection on `listener`; returns the message.
pub fn accept_ready(
    listener: &UnixListener,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> String {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut msg = String::new();
                s.read_to_string(&mut msg).unwrap();
                return msg;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(alive(), "the VM ended before the guest reported ready");
                assert!(
                    Instant::now() < deadline,
                    "no readiness message within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("accept on the readiness socket: {e}"),
        }
    }
}

/// Make a git repository at `dir` with one commit on `main`.
pub fn git_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let git = |args: &[&str]| {
        let st = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "git {args:?}");
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README.md"), "hello\n").unwrap();
    git(&["add", "README.md"]);
    git(&["commit", "-q", "-m", "first"]);
}
