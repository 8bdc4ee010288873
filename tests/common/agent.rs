//! `keystone agent` against the real Linux guest image: a private agent
//! root (HOME, config, runtime directory) shared by any number of projects,
//! each a real git repository with its own sandbox. Used by the lane suites
//! (`agent_ssh`, `agent_resilience`); needs `common/guest.rs` as `guest`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::guest;

fn keystone() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keystone"))
}

/// One agent root: every project made from it shares the sandbox registry.
pub struct World {
    pub root: PathBuf,
    pub env: Vec<(&'static str, String)>,
}

impl World {
    /// A fresh root under the temp directory (checks for hardware KVM and
    /// finds the image first).
    pub fn new(tag: &str) -> World {
        let root = std::env::temp_dir().join(format!("ks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("home")).unwrap();
        let image = guest::debian_image(keystone());
        let env = guest::agent_env(&root, &image);
        World { root, env }
    }

    /// A git project `root/<name>` (one commit on `main`); its sandbox is
    /// destroyed when the handle drops.
    pub fn project(&self, name: &str) -> Project {
        let dir = self.root.join(name);
        guest::git_repo(&dir);
        Project {
            dir,
            name: name.to_string(),
            env: self.env.clone(),
        }
    }

    /// A `keystone` command with this root's environment, run in `dir`.
    pub fn cmd(&self, dir: &Path, args: &[&str]) -> Command {
        command(&self.env, dir, args)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn command(env: &[(&'static str, String)], dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(keystone());
    c.args(args).current_dir(dir).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// A project and its sandbox (named after the directory).
pub struct Project {
    pub dir: PathBuf,
    pub name: String,
    pub env: Vec<(&'static str, String)>,
}

impl Project {
    /// `keystone ARGS` in the project directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        command(&self.env, &self.dir, args)
    }

    /// Run `keystone ARGS`, echoing the command, exit code and output.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        eprintln!(
            "$ keystone {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `keystone agent exec <name> -- sh -c SCRIPT`.
    pub fn exec(&self, script: &str) -> Output {
        self.run(&["agent", "exec", &self.name, "--", "sh", "-c", script])
    }

    /// Commit a line to `log.txt` in the guest's workspace.
    pub fn guest_commit(&self, msg: &str) {
        let out = self.exec(&format!(
            "echo '{msg}' >> log.txt && git add log.txt && git -c user.name=Agent -c user.email=agent@sandbox commit -q -m '{msg}'"
        ));
        assert_eq!(code(&out), 0, "guest commit failed");
    }

    /// Host-side git in the project; returns trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args(["-c", "user.name=Host", "-c", "user.email=host@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The host's HEAD commit subject.
    pub fn head_subject(&self) -> String {
        self.git(&["log", "-1", "--format=%s"])
    }

    /// After a failure, copy the logs (console, VMM, supervisor, mux) of
    /// this sandbox and of any other in the world (a fork's children) to
    /// `$KEYSTONE_TEST_LOGS/<name>/` (the lane suites set it: the lane's
    /// tmpfs is gone once it ends), else print where they are. The end of
    /// each host-side log goes to stderr, where a CI run's tail shows it:
    /// this sandbox's in full, the others' VMM log.
    pub fn keep_logs(&self) {
        let Some(config) = self.env.iter().find(|(k, _)| *k == "XDG_CONFIG_HOME") else {
            return;
        };
        let sandboxes = Path::new(&config.1).join("keystone/agent/sandboxes");
        let mut others: Vec<String> = std::fs::read_dir(&sandboxes)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| *n != self.name)
            .collect();
        others.sort();
        let logs = ["console.log", "vmm.log", "supervisor.log", "mux.log"];
        for name in std::iter::once(&self.name).chain(&others) {
            let state = sandboxes.join(name).join("state");
            let shown: &[&str] = if *name == self.name {
                &logs[1..]
            } else {
                &logs[1..2]
            };
            for f in shown {
                let text = std::fs::read_to_string(state.join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- sandbox {name} {f} (last 15 lines)");
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("{l}");
                }
            }
            let Some(dest) = std::env::var_os("KEYSTONE_TEST_LOGS") else {
                eprintln!("sandbox {name} logs: {}", state.display());
                continue;
            };
            let dest = Path::new(&dest).join(name);
            let _ = std::fs::create_dir_all(&dest);
            for f in logs {
                let _ = std::fs::copy(state.join(f), dest.join(f));
            }
            eprintln!("sandbox {name} logs kept in {}", dest.display());
        }
    }

    /// `keystone agent status --json <name>`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.run(&["agent", "status", "--json", &self.name]);
        assert_eq!(code(&out), 0, "status");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep_logs();
        }
        let _ = self
            .cmd(&["agent", "destroy", &self.name, "--force"])
            .output();
    }
}

/// `keystone agent start --no-attach` for a test sandbox: 2 GiB of memory
/// (the least `start` takes), `vcpus` vCPUs, `--network network`.
pub fn start_args<'a>(vcpus: &'a str, network: &'a str) -> Vec<&'a str> {
    vec![
        "agent",
        "start",
        "--no-attach",
        "--memory",
        "2048",
        "--vcpus",
        vcpus,
        "--network",
        network,
    ]
}

/// A bench's `NAME VALUE` argument as a number, or `default`.
pub fn bench_arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The exit code (-1 for a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `f` every half second until it holds; fail after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
