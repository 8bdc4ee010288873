//! `keystone agent` life cycle end to end: the real `keystone` binary, the
//! real `keystone-vmm` under this host's KVM, and the probe guest image
//! (`probe=ready`: it sends the readiness message over vsock and idles).
//!
//! Each test has its own HOME / XDG_CONFIG_HOME, guest image and git
//! projects (made with real git). They need /dev/kvm and fail (never skip)
//! without it. `keystone-vmm` is `$KEYSTONE_VMM`, else the one built next
//! to this test's target directory (`cargo build -p keystone-vmm`), else it
//! is built here into `target/agent-lifecycle-vmm`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fail (never skip) when this host has no usable KVM.
fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "these tests boot real VMs and need /dev/kvm (read-write): {e}. \
             Run them on a Linux host with KVM enabled; they are never skipped."
        );
    }
}

/// `target/debug` (or the profile directory) of this test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/agent_lifecycle-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The keystone-vmm binary to run (see the module docs).
fn vmm_bin() -> PathBuf {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| {
        if let Some(p) = std::env::var_os("KEYSTONE_VMM").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let sibling = profile_dir().join("keystone-vmm");
        if sibling.is_file() {
            return sibling;
        }
        // The workspace target directory is locked by the running cargo:
        // build into a directory of our own.
        let target = profile_dir()
            .parent()
            .expect("target dir")
            .join("agent-lifecycle-vmm");
        eprintln!(
            "keystone-vmm not built: building it into {}",
            target.display()
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "keystone-vmm", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p keystone-vmm");
        assert!(
            st.success(),
            "cargo build -p keystone-vmm failed: build it yourself or set KEYSTONE_VMM"
        );
        target.join("debug").join("keystone-vmm")
    })
    .clone()
}

fn keystone_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keystone"))
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A git project with branches `main` (checked out) and `feature`, one
/// commit each, and a hook that must never run.
fn make_project(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("README"), "main branch\n").unwrap();
    std::fs::write(dir.join("sub").join("file"), "x\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "on main"]);
    git(dir, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(dir.join("feature.txt"), "feature\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "on feature"]);
    git(dir, &["checkout", "-q", "main"]);
    let hooks = dir.join(".git").join("hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    let marker = dir.parent().unwrap().join("hook-ran");
    for hook in ["post-checkout", "reference-transaction", "post-merge"] {
        let path = hooks.join(hook);
        std::fs::write(&path, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// One test's world: a scratch directory with HOME, a probe guest image
/// and projects. Every sandbox still registered is destroyed on drop.
struct World {
    root: PathBuf,
    config: PathBuf,
    image: PathBuf,
    extra_env: Vec<(String, String)>,
}

impl World {
    fn new(tag: &str) -> World {
        require_kvm();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("ks-agent-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("home")).unwrap();
        let image = root.join("image");
        keystone_cli::image::write_probe_image(&image).expect("write the probe image");
        World {
            config: root.join("home").join(".config"),
            root,
            image,
            extra_env: Vec::new(),
        }
    }

    fn project(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        make_project(&dir);
        dir
    }

    fn agent_root(&self) -> PathBuf {
        self.config.join("keystone").join("agent")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(keystone_bin());
        c.arg("agent").args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("KEYSTONE_") || k.starts_with("GIT_") || k.starts_with("XDG_") {
                c.env_remove(k);
            }
        }
        c.env("HOME", self.root.join("home"))
            .env("XDG_CONFIG_HOME", &self.config)
            .env("XDG_CACHE_HOME", self.root.join("cache"))
            .env("KEYSTONE_GUEST_IMAGE", &self.image)
            .env("KEYSTONE_VMM", vmm_bin())
            .env("KEYSTONE_READY_TIMEOUT", "60")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .stdin(Stdio::null())
            .current_dir(&self.root);
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run keystone")
    }

    /// `start --no-attach` with small VMs, whatever comes of it.
    fn try_start(&self, project: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "start",
            project.to_str().unwrap(),
            "--no-attach",
            "--memory",
            "2048",
            "--vcpus",
            "1",
            "--network",
            "none",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `start --no-attach` with small VMs; asserts success.
    fn start(&self, project: &Path, extra: &[&str]) -> Output {
        let out = self.try_start(project, extra);
        assert_eq!(code(&out), 0, "start {extra:?}\n{}", show(&out));
        out
    }

    fn status(&self, name: &str) -> Value {
        let out = self.run(&["status", name, "--json"]);
        assert_eq!(code(&out), 0, "status {name}\n{}", show(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    fn list(&self) -> Vec<Value> {
        let out = self.run(&["list", "--json"]);
        assert_eq!(code(&out), 0, "{}", show(&out));
        match serde_json::from_slice(&out.stdout).expect("list --json is JSON") {
            Value::Array(a) => a,
            other => panic!("list --json: {other}"),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Kill whatever is left (a failed test), then remove the files.
        let text =
            std::fs::read_to_string(self.agent_root().join("sandboxes.json")).unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            for s in v["sandboxes"].as_array().into_iter().flatten() {
                for key in ["supervisor", "vmm"] {
                    if let Some(pid) = s[key]["pid"].as_i64() {
                        if let Some(start) = s[key]["start_time"].as_u64() {
                            if start_time(pid as u32) == Some(start) {
                                // SAFETY: kill(2) of a process this test
                                // started, checked by its start time.
                                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                            }
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn show(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The error output is exactly one `keystone: error: ...` line.
fn assert_one_error_line(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected\n{}", show(out));
    assert!(
        lines[0].starts_with("keystone: error: ") && lines[0].contains(needle),
        "expected an error about {needle:?}\n{}",
        show(out)
    );
}

/// `(state, start time)` of a process, if it exists.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.nth(18)?.parse().ok()?))
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u64) -> bool {
    matches!(proc_stat(pid as u32), Some((s, _)) if s != 'Z' && s != 'X')
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Extracts `/upper/workspace` of an ext4 image with debugfs.
fn dump_workspace(disk: &Path, dest: &Path) -> PathBuf {
    std::fs::create_dir_all(dest).unwrap();
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /upper/workspace {}", dest.display()))
        .arg(disk)
        .output()
        .expect("debugfs (e2fsprogs) is needed");
    assert!(out.status.success(), "debugfs rdump: {}", show(&out));
    dest.join("workspace")
}

fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Start, status, list, the disk, start twice, stop, restart on the same
/// disk, kill -9, --fresh, destroy: one sandbox through its whole life.
#[test]
fn sandbox_life_cycle() {
    let w = World::new("life");
    let project = w.project("Proj_One");

    // Default name from the directory; the project found from a subdir.
    let mut start = w.cmd(&[
        "start",
        "--no-attach",
        "--memory",
        "2048",
        "--vcpus",
        "1",
        "--network",
        "none",
    ]);
    let out = start.current_dir(project.join("sub")).output().unwrap();
    assert_eq!(code(&out), 0, "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sandbox proj-one is running"), "{stdout}");
    assert!(!w.root.join("hook-ran").exists(), "a git hook ran");

    let s = w.status("proj-one");
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(s["running"], true);
    assert_eq!(s["cid"], 3);
    assert_eq!(s["memory_mib"], 2048);
    // Nested virtualization is opt-in: by default the VMM hides vmx/svm.
    let no_nested = |s: &Value| {
        s["launch"]["args"]
            .as_array()
            .expect("launch args")
            .iter()
            .any(|a| a == "--no-nested")
    };
    assert_eq!(s["nested"], false, "{s}");
    assert!(no_nested(&s), "{s}");
    // Jailed by default (this test runs as root: uid 0 kept, no
    // capabilities; tests/vmm_jail.rs covers what the jail holds).
    let args = s["launch"]["args"].as_array().expect("launch args");
    assert!(args.iter().any(|a| a == "--jail"), "{s}");
    let pid = s["pid"].as_u64().expect("pid");
    let jailed = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .expect("the jail's supervisor has the VMM as its child");
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(jailed),
        ns(std::process::id()),
        "the VMM shares our mount namespace"
    );
    assert_eq!(
        s["project_path"],
        project.canonicalize().unwrap().to_str().unwrap()
    );
    let pid = s["pid"].as_u64().expect("pid");
    assert!(running(pid), "VMM {pid} runs");
    let uds = PathBuf::from(s["vsock_uds"].as_str().unwrap());
    assert!(
        uds.starts_with(w.agent_root().join("sandboxes/proj-one/state")),
        "{uds:?}"
    );
    let disk = PathBuf::from(s["disk"].as_str().unwrap());
    assert_eq!(disk, w.agent_root().join("sandboxes/proj-one/disk.ext4"));

    // The project's sandbox without a name, from inside the project.
    let out = w.cmd(&["status"]).current_dir(&project).output().unwrap();
    assert_eq!(code(&out), 0, "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("proj-one") && text.contains("running"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pid:") && l.split_whitespace().nth(1) == Some(&pid.to_string())),
        "{text}"
    );

    let out = w.run(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().next().unwrap_or("");
    assert!(
        header.starts_with("NAME") && header.contains("PID") && header.contains("CID"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("proj-one"))
        .expect("row");
    assert!(
        row.contains("running") && row.contains(&pid.to_string()),
        "{table}"
    );
    let list = w.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["pid"].as_u64(), Some(pid));

    // The disk: sparse 16 GiB ext4 labelled keystone-data with the clone.
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 16 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 30, "sparse");
    assert!(debugfs(&disk, "stats").contains("keystone-data"));
    assert!(debugfs(&disk, "ls -l /").contains("work"));
    let ws = dump_workspace(&disk, &w.root.join("dump1"));
    assert_eq!(
        std::fs::read_to_string(ws.join("README")).unwrap(),
        "main branch\n"
    );
    assert!(!ws.join("feature.txt").exists(), "main is checked out");
    let branches = git(&ws, &["branch", "--format=%(refname:short)"]);
    assert_eq!(branches.lines().collect::<Vec<_>>(), ["feature", "main"]);
    assert_eq!(
        git(&ws, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );
    assert_eq!(git(&ws, &["remote"]).trim(), "", "no remotes");
    assert_eq!(git(&ws, &["status", "--porcelain"]).trim(), "", "clean");
    assert_eq!(
        git(&ws, &["log", "--format=%s", "feature"]).lines().count(),
        2
    );
    let hooks: Vec<_> = std::fs::read_dir(ws.join(".git/hooks"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(hooks.is_empty(), "no hooks copied: {hooks:?}");

    // Starting it again: exit 2.
    let out = w.run(&["start", project.to_str().unwrap(), "--no-attach"]);
    assert_eq!(code(&out), 2, "{}", show(&out));
    assert_one_error_line(&out, "already running");

    // Stop: stopped, the VMM gone, the sockets removed.
    let out = w.run(&["stop", "proj-one"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(!running(pid), "VMM {pid} still runs after stop");
    let s = w.status("proj-one");
    assert_eq!(s["status"], "stopped", "{s}");
    assert!(s["pid"].is_null());
    assert!(!uds.exists() && !Path::new(&format!("{}_1024", uds.display())).exists());
    let out = w.run(&["stop", "proj-one"]);
    assert_eq!(code(&out), 0, "stopping a stopped sandbox\n{}", show(&out));

    // Restart: the same disk (a file written into it survives).
    let w_ = Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!(
            "write {} /marker",
            project.join("README").display()
        ))
        .arg(&disk)
        .output()
        .unwrap();
    assert!(w_.status.success(), "{}", show(&w_));
    let out = w.start(&project, &["--name", "proj-one", "--nested"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("cloning"),
        "{}",
        show(&out)
    );
    assert!(debugfs(&disk, "ls /").contains("marker"), "disk kept");
    let s = w.status("proj-one");
    assert_eq!(s["status"], "running");
    assert_eq!(s["cid"], 3, "same CID");
    assert_eq!(s["nested"], true, "--nested asked for: {s}");
    assert!(!no_nested(&s), "{s}");
    let pid = s["pid"].as_u64().unwrap();

    // kill -9 of the VMM: shown stopped.
    // SAFETY: kill(2) of the VMM this test started (pid from its status).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until(
        "status stopped after kill -9",
        Duration::from_secs(5),
        || w.status("proj-one")["status"] == "stopped",
    );
    let supervisor = s["supervisor"]["pid"].as_u64().unwrap();
    wait_until("the supervisor to exit", Duration::from_secs(5), || {
        !running(supervisor)
    });
    let s = w.status("proj-one");
    assert!(
        s["last_error"].as_str().unwrap_or("").contains("signal"),
        "{s}"
    );

    // --fresh: a new disk (the marker is gone), and it runs again.
    w.start(&project, &["--name", "proj-one", "--fresh"]);
    assert!(!debugfs(&disk, "ls /").contains("marker"), "a fresh disk");
    let old_pid = w.status("proj-one")["pid"].as_u64().unwrap();

    // --fresh while it runs: restarted on a new disk.
    let out = w.start(&project, &["--name", "proj-one", "--fresh"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cloning"),
        "{}",
        show(&out)
    );
    assert!(!running(old_pid), "the old VMM was stopped");
    let s = w.status("proj-one");
    assert_eq!(s["status"], "running");
    let pid = s["pid"].as_u64().unwrap();
    assert_ne!(pid, old_pid);

    // Destroy --force of a running sandbox: stopped, files and entry gone.
    let out = w.run(&["destroy", "proj-one", "--force"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(!running(pid));
    assert!(!w.agent_root().join("sandboxes/proj-one").exists());
    assert!(w.list().is_empty());
    let out = w.run(&["status", "proj-one"]);
    assert_eq!(code(&out), 1);
    assert_one_error_line(&out, "no sandbox named proj-one");
}

/// Several sandboxes at once, started by CLIs running concurrently with
/// other CLIs reading the registry: distinct CIDs and sockets, all ready,
/// the registry intact.
#[test]
fn concurrent_sandboxes() {
    let w = World::new("multi");
    let names = ["alpha", "beta", "gamma"];
    let projects: Vec<PathBuf> = names.iter().map(|n| w.project(n)).collect();
    let starts: Vec<_> = projects
        .iter()
        .map(|p| {
            w.cmd(&[
                "start",
                p.to_str().unwrap(),
                "--no-attach",
                "--memory",
                "2048",
                "--vcpus",
                "1",
                "--network",
                "none",
                "--sync-mode",
                "auto-commit",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|i| {
            w.cmd(if i % 2 == 0 {
                &["list", "--json"]
            } else {
                &["status", "alpha", "--json"]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for s in starts {
        let out = s.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", show(&out));
    }
    for r in readers {
        let out = r.wait_with_output().unwrap();
        // status may find alpha not registered yet (exit 1); never garbage.
        assert!(code(&out) == 0 || code(&out) == 1, "{}", show(&out));
        if code(&out) == 0 {
            serde_json::from_slice::<Value>(&out.stdout).expect("valid JSON");
        }
    }
    let list = w.list();
    assert_eq!(list.len(), 3);
    let mut cids: Vec<u64> = list.iter().map(|s| s["cid"].as_u64().unwrap()).collect();
    cids.sort();
    assert_eq!(cids, [3, 4, 5], "distinct CIDs");
    let mut sockets: Vec<&str> = list
        .iter()
        .map(|s| s["vsock_uds"].as_str().unwrap())
        .collect();
    sockets.sort();
    sockets.dedup();
    assert_eq!(sockets.len(), 3, "distinct sockets");
    for s in &list {
        assert_eq!(s["status"], "running", "{s}");
        assert_eq!(s["sync_mode"], "auto-commit");
        assert!(running(s["pid"].as_u64().unwrap()));
    }
    // Stop them all at once.
    let stops: Vec<_> = names
        .iter()
        .map(|n| w.cmd(&["stop", n]).stdout(Stdio::null()).spawn().unwrap())
        .collect();
    for mut s in stops {
        assert!(s.wait().unwrap().success());
    }
    for s in w.list() {
        assert_eq!(s["status"], "stopped", "{s}");
        assert!(s["pid"].is_null(), "{s}");
    }
}

/// Destroy asks: without a terminal and without --force it refuses.
#[test]
fn destroy_needs_confirmation() {
    let w = World::new("destroy");
    let project = w.project("proj");
    w.start(&project, &[]);
    let pid = w.status("proj")["pid"].as_u64().unwrap();
    let out = w.run(&["destroy", "proj"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert_one_error_line(&out, "--force");
    assert!(running(pid), "still running");
    assert!(w.agent_root().join("sandboxes/proj/disk.ext4").exists());
    assert_eq!(w.list().len(), 1);
    let out = w.run(&["destroy", "proj", "--force"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(!running(pid));
    assert!(w.list().is_empty());
}

/// Usage errors and refusals: one line each, documented exit codes.
#[test]
fn errors_have_exit_codes_and_one_line() {
    let w = World::new("errors");
    let project = w.project("proj");
    let not_repo = w.root.join("plain");
    std::fs::create_dir_all(&not_repo).unwrap();

    let out = w.run(&["start", not_repo.to_str().unwrap(), "--no-attach"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert_one_error_line(&out, "not a git repository");

    for bad in ["Bad_Name", "../etc", "-x", "a/b", ""] {
        let name = format!("--name={bad}");
        let out = w.run(&["start", project.to_str().unwrap(), &name, "--no-attach"]);
        assert_eq!(code(&out), 2, "{bad:?}\n{}", show(&out));
        assert_one_error_line(&out, "invalid sandbox name");
    }
    let out = w.run(&["status", "../x"]);
    assert_eq!(code(&out), 2, "{}", show(&out));

    for net in [&["--network", "macvtap"][..], &["--network", "tap"]] {
        let mut args = vec!["start", project.to_str().unwrap(), "--no-attach"];
        args.extend_from_slice(net);
        let out = w.run(&args);
        assert_eq!(code(&out), 2, "{}", show(&out));
        assert_one_error_line(&out, "--network");
    }

    for verb in [
        &["stop", "nope"][..],
        &["status", "nope"],
        &["destroy", "nope", "--force"],
    ] {
        let out = w.run(verb);
        assert_eq!(code(&out), 1, "{verb:?}\n{}", show(&out));
        assert_one_error_line(&out, "no sandbox named nope");
    }

    // No image: exit 3, the one-line hint.
    let out = w
        .cmd(&["start", project.to_str().unwrap(), "--no-attach"])
        .env("KEYSTONE_GUEST_IMAGE", w.root.join("no-image"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", show(&out));
    assert_one_error_line(&out, "keystone image build");
    assert!(
        w.list().is_empty(),
        "nothing registered before the image is found"
    );

    // An image that does not declare itself PVM-capable: exit 4 on a PVM
    // host (this project's machines); it boots where KVM is hardware.
    let linux_like = w.root.join("linux-like-image");
    let img = keystone_cli::image::write_probe_image(&linux_like).unwrap();
    let mut m = img.manifest.clone();
    m.pvm_capable = false;
    std::fs::write(
        linux_like.join(keystone_cli::image::MANIFEST),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let out = w
        .cmd(&["start", project.to_str().unwrap(), "--no-attach"])
        .env("KEYSTONE_GUEST_IMAGE", &linux_like)
        .output()
        .unwrap();
    if keystone_vmm::host::KvmFlavor::detect() == keystone_vmm::host::KvmFlavor::Pvm {
        assert_eq!(code(&out), 4, "{}", show(&out));
        assert_one_error_line(&out, "PVM");
    } else {
        assert_eq!(code(&out), 0, "hardware KVM runs any image: {}", show(&out));
        let _ = w.run(&["destroy", "proj", "--force"]);
    }
}

/// A guest that dies during boot, and one that never says it is ready:
/// exit 3 with the console tail, the sandbox marked failed, no VMM left.
#[test]
fn boot_failures_show_the_console() {
    let mut w = World::new("bootfail");
    let project = w.project("proj");
    let manifest_path = w.image.join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let with_cmdline = |cmdline: &str| {
        let mut m: Value = serde_json::from_str(&manifest).unwrap();
        m["cmdline"] = Value::String(cmdline.into());
        std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    };

    with_cmdline("probe=fault");
    let out = w.try_start(&project, &[]);
    assert_eq!(code(&out), 3, "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keystone: error: sandbox proj did not start"),
        "{err}"
    );
    assert!(err.contains("before the guest was ready"), "{err}");
    assert!(err.contains("probe: fault"), "console tail shown\n{err}");
    let s = w.status("proj");
    assert_eq!(s["status"], "failed", "{s}");

    with_cmdline("probe=spin");
    w.extra_env
        .push(("KEYSTONE_READY_TIMEOUT".into(), "2".into()));
    let t = Instant::now();
    let out = w.try_start(&project, &[]);
    assert_eq!(code(&out), 3, "{}", show(&out));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready within 2 s"), "{err}");
    assert!(err.contains("probe: spinning"), "{err}");
    let s = w.status("proj");
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["pid"].is_null(), "no VMM left: {s}");
    let console = w.agent_root().join("sandboxes/proj/state/console.log");
    assert!(std::fs::read_to_string(console)
        .unwrap()
        .contains("probe: spinning"));
}

/// A state directory too deep for a Unix socket address: the socket goes
/// to a private runtime directory instead, and the sandbox still works.
#[test]
fn long_state_paths_put_the_socket_in_the_runtime_dir() {
    let mut w = World::new("longpath");
    let project = w.project("proj");
    w.config = w.root.join("c".repeat(60)).join("d".repeat(60));
    let runtime = w.root.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    w.extra_env
        .push(("XDG_RUNTIME_DIR".into(), runtime.to_str().unwrap().into()));
    w.start(&project, &[]);
    let s = w.status("proj");
    let uds = PathBuf::from(s["vsock_uds"].as_str().unwrap());
    assert_eq!(uds, runtime.join("keystone").join("proj.vsock"));
    let mode = std::fs::metadata(runtime.join("keystone"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let out = w.run(&["stop", "proj"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert!(!uds.exists());
}

/// The supervisor's vsock listeners, driven from the host side of the
/// sockets: commit notifications reach the sync seam (auto-commit), host
/// keys from a readiness message are saved, garbage is ignored, and a
/// changed host key stops the sandbox until `--fresh`.
#[test]
fn supervisor_pins_host_keys_and_hears_commits() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    let w = World::new("keys");
    let project = w.project("proj");
    w.start(&project, &["--sync-mode", "auto-commit"]);
    let s = w.status("proj");
    let uds = s["vsock_uds"].as_str().unwrap().to_string();
    let pid = s["pid"].as_u64().unwrap();
    let state = w.agent_root().join("sandboxes/proj/state");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "state dir is private");
    let send = |port: u32, bytes: &[u8]| {
        let mut c = UnixStream::connect(format!("{uds}_{port}")).expect("supervisor listens");
        c.write_all(bytes).unwrap();
    };
    let log = || std::fs::read_to_string(state.join("supervisor.log")).unwrap_or_default();

    send(1025, b"commit\n");
    wait_until("the commit notification", Duration::from_secs(5), || {
        log().contains("guest commit in sandbox proj")
    });

    let key_a = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAA";
    send(
        1024,
        format!("keystone-ready 1\nhostkey {key_a}\nend\n").as_bytes(),
    );
    wait_until("host_keys", Duration::from_secs(5), || {
        std::fs::read_to_string(state.join("host_keys")).unwrap_or_default() == format!("{key_a}\n")
    });
    send(
        1024,
        b"keystone-ready 1\nhostkey x $(touch /tmp/pwned)\nend\n",
    );
    wait_until("the bad message logged", Duration::from_secs(5), || {
        log().contains("unexpected line")
    });
    assert_eq!(w.status("proj")["status"], "running");

    send(
        1024,
        b"keystone-ready 1\nhostkey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBB\nend\n",
    );
    wait_until("the sandbox to fail", Duration::from_secs(15), || {
        w.status("proj")["status"] == "failed"
    });
    assert!(!running(pid), "VMM stopped");
    let s = w.status("proj");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("host key changed"),
        "{s}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("host_keys")).unwrap(),
        format!("{key_a}\n"),
        "the pinned key is kept"
    );

    // The next boot presents other keys (none): refused; --fresh forgets.
    let out = w.try_start(&project, &[]);
    assert_eq!(code(&out), 3, "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("host key changed"),
        "{}",
        show(&out)
    );
    w.start(&project, &["--fresh"]);
    assert_eq!(w.status("proj")["status"], "running");
    let out = w.run(&["stop", "proj"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
}

/// Snapshot, resume and fork with the probe guest: `start` after a
/// snapshot of the last run resumes it (once), `fork` makes children with
/// their own CID, socket and disk, named explicitly; bad forks are refused
/// with their exit codes.
#[test]
fn snapshots_resume_and_fork() {
    let w = World::new("fork");
    let project = w.project("proj");
    let out = w.run(&["fork", "nope", "2"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert_one_error_line(&out, "no sandbox named nope");
    assert_eq!(code(&w.run(&["fork", "proj", "0"])), 2);

    w.start(&project, &[]);
    let out = w.run(&["snapshot", "proj", "--tag", "s1"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    assert_eq!(code(&w.run(&["stop", "proj"])), 0);
    let out = w.start(&project, &[]);
    assert!(show(&out).contains("resumed snapshot s1"), "{}", show(&out));
    let st = w.status("proj");
    assert_eq!(st["status"], "running", "{st}");
    let dir = w.agent_root().join("sandboxes/proj");
    assert!(dir.join("disk.before-resume.ext4").is_file());
    let vmm_log = std::fs::read_to_string(dir.join("state/vmm.log")).unwrap();
    assert!(vmm_log.contains("VM restored from"), "{vmm_log}");

    let out = w.run(&["fork", "proj", "2"]);
    assert_eq!(code(&out), 0, "{}", show(&out));
    let list = w.list();
    assert_eq!(list.len(), 3, "{list:?}");
    let kids: Vec<&Value> = list.iter().filter(|s| s["name"] != "proj").collect();
    let mut names: Vec<&str> = kids.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["proj-fork-1", "proj-fork-2"]);
    for k in &kids {
        assert_eq!(k["status"], "running", "{k}");
        assert_eq!(k["forked_from"]["sandbox"], "proj", "{k}");
        assert!(k["forked_from"]["snapshot"]
            .as_str()
            .unwrap()
            .starts_with("fork-"));
        assert!(running(k["pid"].as_u64().unwrap()));
        assert!(Path::new(k["disk"].as_str().unwrap()).is_file());
    }
    let mut cids: Vec<u64> = list.iter().map(|s| s["cid"].as_u64().unwrap()).collect();
    cids.sort();
    cids.dedup();
    assert_eq!(cids.len(), 3, "distinct CIDs");
    // In the project, an unnamed verb means the parent.
    let out = w
        .cmd(&["status", "--json"])
        .current_dir(&project)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", show(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["name"], "proj");
    let out = w.run(&["fork", "proj", "1", "--snapshot", "nope"]);
    assert_eq!(code(&out), 2, "{}", show(&out));

    // The fork point is not resumed, and s1 was resumed already: boot.
    assert_eq!(code(&w.run(&["stop", "proj"])), 0);
    let out = w.start(&project, &[]);
    assert!(!show(&out).contains("resumed"), "{}", show(&out));
    // A stopped child without snapshots has nothing to fork.
    assert_eq!(code(&w.run(&["stop", "proj-fork-1"])), 0);
    let out = w.run(&["fork", "proj-fork-1", "1"]);
    assert_eq!(code(&out), 1, "{}", show(&out));
    assert_one_error_line(&out, "no snapshot");
    for n in ["proj", "proj-fork-2"] {
        assert_eq!(code(&w.run(&["stop", n])), 0);
    }
}
