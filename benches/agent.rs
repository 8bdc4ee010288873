//! `keystone agent` timings with a real Linux guest: warm `start
//! --no-attach` to ready, `exec -- true` round trip, and `sync` of 10 new
//! commits, beside the seed's targets. The VM is the TCG test harness here
//! (software emulation: expect far slower numbers than on KVM), or
//! keystone-vmm with `KEYSTONE_REAL_KVM=1` on a host with vmx/svm.
//!
//!   cargo bench -p keystone-cli --bench agent [-- --execs N]

#[path = "../tests/common/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn keystone() -> PathBuf {
    let st = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "keystone-cli", "--bin", "keystone"])
        .status()
        .expect("cargo build");
    assert!(st.success());
    guest::repo_root().join("target/debug/keystone")
}

struct Env {
    ks: PathBuf,
    project: PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl Env {
    fn run(&self, args: &[&str]) -> (f64, i32) {
        let mut c = Command::new(&self.ks);
        c.args(args)
            .current_dir(&self.project)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        let t = Instant::now();
        let st = c.status().expect("run keystone");
        (t.elapsed().as_secs_f64(), st.code().unwrap_or(-1))
    }

    fn ok(&self, args: &[&str]) -> f64 {
        let (s, code) = self.run(args);
        assert!(code == 0, "keystone {} exited {code}", args.join(" "));
        s
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let execs: usize = args
        .iter()
        .position(|a| a == "--execs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let ks = keystone();
    let root = std::env::temp_dir().join(format!("ks-agent-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("home")).unwrap();
    let project = root.join("bench");
    guest::git_repo(&project);
    let image = guest::debian_image(&ks);
    let (runner, _) = guest::vm_runner();
    let vars = guest::agent_env(&root, &image);
    let e = Env {
        ks,
        project: project.clone(),
        vars,
    };

    let first = e.ok(&[
        "agent",
        "start",
        "--no-attach",
        "--memory",
        "2048",
        "--vcpus",
        "2",
        "--network",
        "none",
    ]);
    e.ok(&["agent", "stop"]);
    let warm = e.ok(&["agent", "start", "--no-attach"]);
    let exec: Vec<f64> = (0..execs)
        .map(|_| e.ok(&["agent", "exec", "--", "true"]))
        .collect();
    e.ok(&[
        "agent",
        "exec",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i >> n.txt; git add n.txt; \
         git -c user.name=B -c user.email=b@b commit -q -m \"bench $i\"; done",
    ]);
    let sync = e.ok(&["agent", "sync"]);
    let n = Command::new("git")
        .arg("-C")
        .arg(&project)
        .args(["rev-list", "--count", "HEAD"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&n.stdout).trim(),
        "11",
        "10 commits synced"
    );
    let stop = e.ok(&["agent", "stop"]);
    let _ = e.run(&["agent", "destroy", "bench", "--force"]);
    let _ = std::fs::remove_dir_all(&root);

    let vm = if guest::real_kvm() {
        "keystone-vmm (KVM)"
    } else {
        "TCG test harness (software emulation)"
    };
    println!(
        "\nkeystone agent, VM: {vm} ({})",
        Path::new(&runner).display()
    );
    println!("{:<40} {:>10} {:>12}", "step", "seconds", "seed target");
    println!(
        "{:<40} {:>10.2} {:>12}",
        "first start --no-attach (new disk)", first, ""
    );
    println!(
        "{:<40} {:>10.2} {:>12}",
        "warm start --no-attach to ready", warm, "< 30"
    );
    println!(
        "{:<40} {:>10.3} {:>12}",
        format!("exec -- true (median of {execs})"),
        median(exec),
        "< 0.5"
    );
    println!(
        "{:<40} {:>10.2} {:>12}",
        "sync of 10 new commits", sync, "< 5"
    );
    println!("{:<40} {:>10.2} {:>12}", "stop (guest poweroff)", stop, "");
}
