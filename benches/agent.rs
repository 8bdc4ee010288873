//! `keystone agent` timings with the real Linux guest on keystone-vmm:
//! first and warm `start --no-attach` to ready, `exec -- true` round trip,
//! `sync` of 10 new commits and `stop`, beside the seed's targets. Needs
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
    let t = Instant::now();
    let out = p.cmd(args).output().expect("run keystone");
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
    let exec: Vec<f64> = (0..execs)
        .map(|_| timed(&p, &["agent", "exec", "--", "true"]))
        .collect();
    timed(
        &p,
        &[
            "agent",
            "exec",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i >> n.txt; git add n.txt; \
             git -c user.name=B -c user.email=b@b commit -q -m \"bench $i\"; done",
        ],
    );
    let sync = timed(&p, &["agent", "sync"]);
    assert_eq!(
        p.git(&["rev-list", "--count", "HEAD"]),
        "11",
        "10 commits synced"
    );
    let stop = timed(&p, &["agent", "stop"]);

    println!(
        "\nkeystone agent on keystone-vmm ({}), {vcpus} vCPU(s), 2048 MiB",
        guest::vmm_binary().display()
    );
    println!("| step | seconds | seed target |");
    println!("|---|---:|---:|");
    println!("| first start --no-attach (new disk) | {first:.2} | |");
    println!("| warm start --no-attach to ready | {warm:.2} | < 30 |");
    println!(
        "| exec -- true (median of {execs}) | {:.3} | < 0.5 |",
        median(exec)
    );
    println!("| sync of 10 new commits | {sync:.2} | < 5 |");
    println!("| stop (guest poweroff) | {stop:.2} | |");
}
