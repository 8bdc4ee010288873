//! HTTP from the real Linux guest on keystone-vmm, two ways out, same run:
//! `--network user` (virtio-net to passt, the guest resolving through
//! passt) and `--network policy` (no NIC: the guest's proxy variables, the
//! vsock bridge, the host's egress proxy deciding by policy), beside the
//! same client on the host. One Python client: N small GETs (a new
//! connection each: the per-request cost) and one bulk GET (throughput),
//! from `bench.keystone.test`, a host server on the lane's "outside"
//! address (`$KEYSTONE_TEST_EGRESS_ADDR`, tests/lane/network).
//!
//! Needs hardware KVM: on this project's PVM machines it runs in the
//! nested real-KVM lane (`benches/lane/run`), where the CPU is
//! software-emulated; only same-run ratios mean anything.
//!
//!   cargo bench -p keystone-cli --bench lane_net [-- --requests N --mib N]

#[path = "../tests/common/agent.rs"]
mod agent;
#[path = "../tests/common/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::process::Command;

use agent::{bench_arg as arg, code, start_args, stdout, Project, World};

/// The client: `URL N MIB` does N GETs of URL/small, then one of
/// URL/bulk; prints the mean request time (ms) and the bulk MiB/s. urllib
/// takes the proxy from the environment (the policy sandbox's sessions
/// have it; the others have none).
const CLIENT: &str = r#"
import sys, time, urllib.request
url, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
for _ in range(n):
    urllib.request.urlopen(url + "/small", timeout=60).read()
ms = (time.perf_counter() - t) / n * 1000
t = time.perf_counter()
got = len(urllib.request.urlopen(url + "/bulk", timeout=600).read())
assert got == mib << 20, got
print("%.2f %.1f" % (ms, got / (1 << 20) / (time.perf_counter() - t)))
"#;

/// The host server: `/small` is 2 bytes, `/bulk` is `mib` MiB.
fn server(addr: &str, mib: u32) -> u16 {
    let l = std::net::TcpListener::bind((addr, 0)).expect("bind the outside address");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let bulk = got.starts_with(b"GET /bulk");
                let len = if bulk { (mib as usize) << 20 } else { 2 };
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                if bulk {
                    let chunk = vec![b'x'; 256 << 10];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if c.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                } else {
                    let _ = c.write_all(b"ok");
                }
            });
        }
    });
    port
}

fn parse(out: &str) -> (f64, f64) {
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN))
}

/// Starts `p` on `network`, runs the client in it, stops it. A failed
/// round (the lane's emulated SVM can take a guest down: README) is
/// printed with the sandbox's logs and tried once more on a fresh start.
fn measure(
    p: &Project,
    network: &str,
    allow: &str,
    url: &str,
    requests: u32,
    mib: u32,
) -> (f64, f64) {
    let vcpus = guest::test_vcpus();
    for round in 1..=2 {
        assert_eq!(
            code(&p.run(&start_args(&vcpus, network))),
            0,
            "start {network}"
        );
        if network == "policy" {
            assert_eq!(code(&p.run(&["agent", "net", &p.name, "allow", allow])), 0);
        }
        let out = p.run(&[
            "agent",
            "exec",
            &p.name,
            "--",
            "python3",
            "-c",
            CLIENT,
            url,
            &requests.to_string(),
            &mib.to_string(),
        ]);
        let ok = code(&out) == 0;
        if !ok {
            p.keep_logs();
        }
        let _ = p.run(&["agent", "stop", &p.name]);
        if ok {
            return parse(&stdout(&out));
        }
        assert!(
            round == 1,
            "bench net: the client failed twice in {}",
            p.name
        );
        eprintln!(
            "bench net: client failed in {}, once more on a fresh start",
            p.name
        );
    }
    unreachable!("two rounds either return or panic")
}

fn main() {
    let requests = arg("--requests", 50);
    let mib = arg("--mib", 64);
    let addr = std::env::var("KEYSTONE_TEST_EGRESS_ADDR")
        .expect("KEYSTONE_TEST_EGRESS_ADDR: the lane's outside address (benches/lane/run sets it)");
    let port = server(&addr, mib);
    let url = format!("http://bench.keystone.test:{port}");
    let world = World::new("net-bench");
    let user = world.project("netu");
    let policy = world.project("netp");
    let allow = format!("bench.keystone.test:{port}");
    // One sandbox at a time (less load on the lane's emulated CPU).
    let (pu_ms, pu_mibs) = measure(&user, "user", &allow, &url, requests, mib);
    let (po_ms, po_mibs) = measure(&policy, "policy", &allow, &url, requests, mib);
    let host = Command::new("python3")
        .args(["-c", CLIENT, &url, &requests.to_string(), &mib.to_string()])
        .output()
        .expect("python3");
    assert!(host.status.success(), "host client: {host:?}");
    let (h_ms, h_mibs) = parse(&String::from_utf8_lossy(&host.stdout));
    let log = stdout(&policy.run(&["agent", "net", "netp", "log", "--json"]));
    let logged = log.lines().filter(|l| l.contains("\"allow\"")).count() as u32;
    assert!(
        logged > requests,
        "every request in the audit log: {logged} lines"
    );

    println!(
        "\nHTTP to a host server ({requests} GETs of 2 bytes, one new connection each; one GET of {mib} MiB)"
    );
    println!("| path | request ms | bulk MiB/s |");
    println!("|---|---:|---:|");
    println!("| guest, --network user (virtio-net, passt) | {pu_ms:.2} | {pu_mibs:.1} |");
    println!(
        "| guest, --network policy (vsock, egress proxy, policy check, audit line) | {po_ms:.2} | {po_mibs:.1} |"
    );
    println!("| host, no VM | {h_ms:.2} | {h_mibs:.1} |");
    println!(
        "| policy / user | {:.2} | {:.2} |",
        po_ms / pu_ms,
        po_mibs / pu_mibs
    );
}
