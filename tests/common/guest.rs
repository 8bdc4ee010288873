//! Helpers for the tests that boot the unmodified Linux guest image on
//! `keystone-vmm`: the hardware-KVM check, the VMM binary, sandbox data
//! disks, and the readiness listener. On this project's PVM machines these
//! tests run in the nested real-KVM lane (`tests/lane/suites`); on a host
//! with vmx/svm, `cargo test -- --ignored` runs them directly.

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

/// Fail (never skip) unless `/dev/kvm` is usable and is hardware KVM
/// (vmx/svm, not PVM): an unmodified Linux kernel does not boot on PVM.
pub fn require_hardware_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots Linux on keystone-vmm and needs /dev/kvm (read-write): {e}");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    assert!(
        hw && !Path::new("/sys/module/kvm_pvm").exists(),
        "this test boots the unmodified Linux image on keystone-vmm and needs hardware KVM \
         (vmx/svm), but this host's KVM is {}: run it in the nested real-KVM lane, \
         `tests/lane/suites` (or `tests/lane/run -- <test binary> --ignored`)",
        if hw { "PVM" } else { "without vmx/svm" }
    );
}

/// The keystone-vmm binary under test: `$KEYSTONE_VMM`, else the workspace's
/// release build, else its debug build. Never built from here: inside the
/// lane the workspace is read-only.
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYSTONE_VMM").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    ["release", "debug"]
        .iter()
        .map(|p| repo_root().join("target").join(p).join("keystone-vmm"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("keystone-vmm is not built: `cargo build --release -p keystone-vmm` (tests/lane/suites does) or set KEYSTONE_VMM")
        })
}

/// vCPUs for the Linux guests these tests boot: `$KEYSTONE_TEST_VCPUS`,
/// else 2. The lane sets 1: there, 2-vCPU guests under load triple-faulted
/// and once took the nested kernel down (QEMU's emulated SVM; see
/// `tests/lane/suites`).
pub fn test_vcpus() -> String {
    std::env::var("KEYSTONE_TEST_VCPUS")
        .ok()
        .filter(|v| v.parse::<u8>().is_ok_and(|n| n > 0))
        .unwrap_or_else(|| "2".into())
}

/// The environment for `keystone agent` commands against a real Linux guest:
/// keystone-vmm, the image, and a private HOME, config and runtime directory
/// under `root`. Checks for hardware KVM first.
pub fn agent_env(root: &Path, image: &Path) -> Vec<(&'static str, String)> {
    require_hardware_kvm();
    vec![
        ("KEYSTONE_VMM", vmm_binary().display().to_string()),
        ("KEYSTONE_GUEST_IMAGE", image.display().to_string()),
        ("HOME", root.join("home").display().to_string()),
        ("XDG_CONFIG_HOME", root.join("config").display().to_string()),
        ("XDG_RUNTIME_DIR", root.join("run").display().to_string()),
        ("KEYSTONE_READY_TIMEOUT", "400".into()),
    ]
}

/// Build (or take from the machine's cache) the Debian guest image with
/// `keystone image build`; returns its directory.
pub fn debian_image(keystone: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYSTONE_GUEST_IMAGE") {
        return PathBuf::from(dir);
    }
    assert!(
        std::env::var_os("KEYSTONE_LANE").is_none(),
        "inside the lane the image cache is read-only: set KEYSTONE_GUEST_IMAGE (tests/lane/suites does)"
    );
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
