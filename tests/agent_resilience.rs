//! Two sandboxes at once on keystone-vmm with user networking (passt), the
//! unmodified Debian image on hardware KVM (on this project's PVM machines,
//! in the nested real-KVM lane: `tests/lane/suites`):
//!
//! - both start together and run side by side: own VMM, own vsock, own
//!   hostname and workspace;
//! - each guest takes passt's DHCP lease (the host's own address, as passt
//!   hands out) and resolves a DNS name to what the host resolves it to
//!   (`$KEYSTONE_TEST_DNS_NAME`, default `lane.keystone.test`, which the lane
//!   suites serve);
//! - `auto-idle` sync brings a guest commit home once the workspace is quiet;
//! - `kill -9` of one VMM in the middle of disk writes: the other sandbox
//!   keeps running, the disk's ext4 is clean after journal replay
//!   (`e2fsck -fn` on a copy), the sandbox restarts and the data the guest
//!   had fsynced is intact.

#[path = "common/agent.rs"]
mod agent;
#[path = "common/guest.rs"]
mod guest;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agent::{code, start_args, stdout, wait_until, Project, World};

/// First IPv4 address `getent hosts` gives for `name` (on the host).
fn host_resolves(name: &str) -> Option<String> {
    let out = Command::new("getent")
        .args(["ahostsv4", name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().map(str::to_string)
}

/// The host's IPv4 address on its default-route interface: what passt
/// leases to the guest by default.
fn host_uplink_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "show", "default"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&out.stdout);
    let dev = routes
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_else(|| panic!("passt needs a default route on the host; none in {routes:?}"))
        .to_string();
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &dev])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&out.stdout);
    addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 address on {dev}: {addrs:?}"))
        .to_string()
}

fn start(p: &Project, extra: &[&str]) -> Command {
    let mut args = start_args("1", "user");
    args.extend_from_slice(extra);
    let mut c = p.cmd(&args);
    c.env("KEYSTONE_IDLE_SECS", "5");
    c
}

fn assert_success(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `e2fsck` on a sparse copy of `disk`: replay the journal, then a forced
/// read-only check must find nothing.
fn assert_fs_clean(disk: &Path, scratch: &Path) {
    let copy = scratch.join("crashed.ext4");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(disk)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success(), "copy the crashed disk");
    let replay = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&copy)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "journal replay: {replay:?}"
    );
    let check = Command::new("e2fsck")
        .arg("-fn")
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "e2fsck -fn after kill -9 found damage:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::remove_file(&copy).unwrap();
}

#[test]
#[ignore = "lane: boots Linux on keystone-vmm, needs hardware KVM (tests/lane/suites)"]
fn two_sandboxes_user_network_auto_idle_and_kill_9() {
    let world = World::new("agent-resilience");
    let alpha = world.project("alpha");
    let beta = world.project("beta");
    let dns_name =
        std::env::var("KEYSTONE_TEST_DNS_NAME").unwrap_or_else(|_| "lane.keystone.test".into());
    let dns_addr = host_resolves(&dns_name).unwrap_or_else(|| {
        panic!(
            "the host cannot resolve {dns_name}: set KEYSTONE_TEST_DNS_NAME to a name it \
             resolves (tests/lane/suites serves lane.keystone.test)"
        )
    });
    let lease = host_uplink_address();

    // Both start at once.
    let t0 = Instant::now();
    let a = start(&alpha, &["--sync-mode", "auto-idle"])
        .spawn()
        .unwrap();
    let b = start(&beta, &[]).spawn().unwrap();
    assert_success("start alpha", &a.wait_with_output().unwrap());
    assert_success("start beta", &b.wait_with_output().unwrap());
    eprintln!("two starts to ready: {:.1} s", t0.elapsed().as_secs_f64());

    let out = alpha.run(&["agent", "list", "--json"]);
    assert_eq!(code(&out), 0);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let running: Vec<_> = list.iter().filter(|s| s["status"] == "running").collect();
    assert_eq!(running.len(), 2, "both running: {list:?}");
    assert_ne!(running[0]["pid"], running[1]["pid"], "one VMM each");
    assert_ne!(running[0]["vsock_uds"], running[1]["vsock_uds"]);
    assert_ne!(running[0]["cid"], running[1]["cid"]);

    // Own hostname, own workspace.
    for p in [&alpha, &beta] {
        assert_eq!(stdout(&p.exec("cat /etc/hostname")).trim(), p.name);
    }
    assert_eq!(code(&alpha.exec("echo mine > only-alpha.txt")), 0);
    assert_eq!(
        code(&beta.exec("test ! -e only-alpha.txt")),
        0,
        "workspaces shared"
    );

    // User networking: passt's lease, a default route, and DNS through it.
    for p in [&alpha, &beta] {
        let out = p.exec("ip -4 -o addr show scope global; ip -4 route show default");
        assert_eq!(code(&out), 0);
        let text = stdout(&out);
        assert!(
            text.contains(&format!("inet {lease}/")),
            "{}: no passt lease {lease}: {text}",
            p.name
        );
        assert!(text.contains("default via"), "{}: no default route", p.name);
        let out = p.exec(&format!("getent ahostsv4 {dns_name}"));
        assert_eq!(code(&out), 0, "{}: guest cannot resolve {dns_name}", p.name);
        assert_eq!(
            stdout(&out).split_whitespace().next(),
            Some(dns_addr.as_str()),
            "{}: {dns_name} resolves differently in the guest",
            p.name
        );
    }

    // auto-idle: a commit comes home once the workspace has been quiet.
    alpha.guest_commit("idle commit");
    wait_until("auto-idle sync", Duration::from_secs(120), || {
        alpha.head_subject() == "idle commit"
    });
    assert_eq!(beta.head_subject(), "first", "beta's project untouched");

    // kill -9 of beta's VMM while the guest writes.
    let out = beta.exec(
        "head -c 8388608 /dev/urandom > keep.bin && sha256sum keep.bin > keep.sum && sync && \
         setsid -f sh -c 'while :; do dd if=/dev/zero of=churn.bin bs=1M count=32 conv=fsync; done' \
         </dev/null >/dev/null 2>&1",
    );
    assert_eq!(code(&out), 0, "start the writer");
    std::thread::sleep(Duration::from_secs(4));
    let st = beta.status();
    let pid = st["pid"].as_u64().expect("beta's VMM pid") as i32;
    // SAFETY: kill has no memory preconditions; pid is beta's keystone-vmm.
    let killed = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(killed, 0, "kill -9 {pid}");
    wait_until("beta to stop", Duration::from_secs(60), || {
        beta.status()["status"] != "running"
    });
    assert_eq!(code(&alpha.exec("true")), 0, "alpha survives beta's crash");
    let disk = st["disk"].as_str().expect("disk path").to_string();
    assert_fs_clean(Path::new(&disk), &world.root);

    // beta restarts on the same disk with the fsynced data intact.
    assert_success("restart beta", &start(&beta, &[]).output().unwrap());
    let out = beta.exec("sha256sum -c keep.sum && test -e churn.bin");
    assert_eq!(code(&out), 0, "data kept across kill -9");
    for p in [&alpha, &beta] {
        assert_eq!(code(&p.run(&["agent", "stop"])), 0, "stop {}", p.name);
        assert_eq!(p.status()["status"], "stopped");
    }
}
