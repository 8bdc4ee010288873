//! `keystone agent` timings with the real Linux guest on keystone-vmm:
//! first and warm `start --no-attach` to ready, `exec -- true` round trip
//! and `sync` of 10 new commits, each through the sandbox's SSH master and
//! on a fresh connection (`KEYSTONE_SSH_MASTER=off`) in the same run, and
//! `stop`, beside the seed's targets; then snapshot and restore: the
//! snapshot's write time and size, a `start` resuming it to the first
//! `exec` answered against the warm boot above (goal: at most 0.05×), and
//! `fork` N = 1, 2, 4 (time per child, and the memory of the children's
//! VMM processes against N × guest memory). Needs
//! hardware KVM: on this project's PVM machines it runs in the nested
//! real-KVM lane (`benches/lane/run`), where the CPU is software-emulated and
//! absolute times are inflated.
//!
//!   cargo bench -p keystone-cli --bench agent [-- --execs N]

#[path = "../tests/common/agent.rs"]
mod agent;
#[path = "../tests/common/guest.rs"]
mod guest;

use std::time::Instant;

use agent::{code, start_args, Project, World};

fn timed(p: &Project, args: &[&str]) -> f64 {
    timed_with(p, args, false)
}

/// `timed`, on a fresh SSH connection when `fresh` (no master).
fn timed_with(p: &Project, args: &[&str], fresh: bool) -> f64 {
    let mut c = p.cmd(args);
    if fresh {
        c.env("KEYSTONE_SSH_MASTER", "off");
    }
    let t = Instant::now();
    let out = c.output().expect("run keystone");
    let s = t.elapsed().as_secs_f64();
    assert_eq!(
        code(&out),
        0,
        "keystone {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

/// Kilobytes of RSS and PSS of process `pid` and its descendants
/// (`/proc/PID/smaps_rollup`).
fn tree_memory(pid: u64) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (mut rss, mut pss) = (field("Rss:"), field("Pss:"));
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        let (r, p) = tree_memory(c);
        rss += r;
        pss += p;
    }
    (rss, pss)
}

/// One `fork` of `n` children: seconds per child, and the children's VMM
/// memory (RSS, PSS, MiB) while they all run; then they are destroyed.
fn fork_of(p: &Project, n: usize) -> (f64, f64, f64) {
    let prefix = format!("f{n}");
    let n_s = n.to_string();
    let total = timed(
        p,
        &[
            "agent",
            "fork",
            "bench",
            &n_s,
            "--prefix",
            &prefix,
            "--snapshot",
            "s1",
        ],
    );
    let (mut rss, mut pss) = (0, 0);
    for k in 1..=n {
        let name = format!("{prefix}-{k}");
        let out = p.run(&["agent", "status", "--json", &name]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        let (r, s) = tree_memory(st["pid"].as_u64().expect("a running child's pid"));
        rss += r;
        pss += s;
    }
    for k in 1..=n {
        timed(
            p,
            &["agent", "destroy", "--force", &format!("{prefix}-{k}")],
        );
    }
    (total / n as f64, rss as f64 / 1024.0, pss as f64 / 1024.0)
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
    let world = World::new("agent-bench");
    let p = world.project("bench");
    let vcpus = guest::test_vcpus();
    let start = start_args(&vcpus, "none");
    let first = timed(&p, &start);
    timed(&p, &["agent", "stop"]);
    let warm = timed(&p, &start);
    let exec_with = |fresh: bool| -> Vec<f64> {
        (0..execs)
            .map(|_| timed_with(&p, &["agent", "exec", "--", "true"], fresh))
            .collect()
    };
    // Alternated, so drift in the lane's speed hits both alike.
    let (mut exec, mut exec_fresh) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        exec.extend(exec_with(false));
        exec_fresh.extend(exec_with(true));
    }
    let ten_commits = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i >> n.txt; git add n.txt; \
         git -c user.name=B -c user.email=b@b commit -q -m \"bench $i\"; done";
    let sync_of_ten = |fresh: bool, total: &str| {
        timed(&p, &["agent", "exec", "--", "sh", "-c", ten_commits]);
        let s = timed_with(&p, &["agent", "sync"], fresh);
        assert_eq!(
            p.git(&["rev-list", "--count", "HEAD"]),
            total,
            "10 commits synced"
        );
        s
    };
    let sync_fresh = sync_of_ten(true, "11");
    let sync = sync_of_ten(false, "21");

    // Snapshot, then a start that resumes it (to the first exec answered).
    let snap = timed(&p, &["agent", "snapshot", "bench", "--tag", "s1"]);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            world
                .root
                .join("config/keystone/agent/sandboxes/bench/snapshots/s1/meta.json"),
        )
        .expect("snapshot meta.json"),
    )
    .expect("meta.json");
    let stored_mib = meta["memory_stored"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    let paused = meta["paused_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    timed(&p, &["agent", "stop"]);
    let resume_start = timed(&p, &start);
    let resume_exec = timed(&p, &["agent", "exec", "--", "true"]);
    let resume = resume_start + resume_exec;
    let forks: Vec<(usize, (f64, f64, f64))> =
        [1, 2, 4].iter().map(|&n| (n, fork_of(&p, n))).collect();

    let stop = timed(&p, &["agent", "stop"]);
    let (exec, exec_fresh) = (median(exec), median(exec_fresh));

    println!(
        "\nkeystone agent on keystone-vmm ({}), {vcpus} vCPU(s), 2048 MiB",
        guest::vmm_binary().display()
    );
    println!("| step | seconds | seed target |");
    println!("|---|---:|---:|");
    println!("| first start --no-attach (new disk) | {first:.2} | |");
    println!("| warm start --no-attach to ready | {warm:.2} | < 30 |");
    println!(
        "| exec -- true, SSH master (median of {}) | {exec:.3} | < 0.5 |",
        2 * execs
    );
    println!(
        "| exec -- true, fresh connection (median of {}) | {exec_fresh:.3} | |",
        2 * execs
    );
    println!(
        "| exec ratio master / fresh | {:.3} | <= 0.1 |",
        exec / exec_fresh
    );
    println!("| sync of 10 new commits, SSH master | {sync:.2} | < 5 |");
    println!("| sync of 10 new commits, fresh connections | {sync_fresh:.2} | |");
    println!("| stop (guest poweroff) | {stop:.2} | |");
    println!("| snapshot (2048 MiB guest): whole command | {snap:.2} | |");
    println!("| snapshot: VM paused (memory + disk copy) | {paused:.2} | |");
    println!("| snapshot: guest memory stored, MiB | {stored_mib:.0} | |");
    println!("| start resuming the snapshot, to the first exec answered | {resume:.2} | |");
    println!(
        "| resume / warm start ratio | {:.3} | <= 0.05 |",
        resume / warm
    );
    for (n, (per_child, rss, pss)) in &forks {
        println!("| fork {n}: seconds per child | {per_child:.2} | |");
        println!(
            "| fork {n}: children's VMM RSS / PSS, MiB (N x guest: {}) | {rss:.0} / {pss:.0} | |",
            n * 2048
        );
    }
}
