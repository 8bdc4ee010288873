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

    // The host's loopback is out of the guest's reach. Through the gateway
    // (passt --no-map-gw): a service on the host's 127.0.0.1 is not there.
    // And directly: beta (root in the guest) routes 127.0.0.2 out of its
    // NIC, as a hostile guest can; the VMM drops such frames (passt would
    // deliver them from the host's own sockets).
    let lo1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo2 = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let (p1, p2) = (
        lo1.local_addr().unwrap().port(),
        lo2.local_addr().unwrap().port(),
    );
    for l in [&lo1, &lo2] {
        l.set_nonblocking(true).unwrap();
    }
    for p in [&alpha, &beta] {
        let out = p.exec(&format!(
            "gw=$(ip -4 route show default | awk '{{print $3; exit}}'); \
             timeout 5 bash -c \"exec 3<>/dev/tcp/$gw/{p1}\""
        ));
        assert_ne!(
            code(&out),
            0,
            "{}: reached the host's 127.0.0.1:{p1} through its gateway",
            p.name
        );
    }
    let out = beta.exec(&format!(
        "set -e; gw=$(ip -4 route show default | awk '{{print $3; exit}}'); \
         dev=$(ip -4 route show default | awk '{{print $5; exit}}'); \
         sudo -n sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.$dev.route_localnet=1; \
         sudo -n ip route del local 127.0.0.0/8 dev lo table local; \
         sudo -n ip route replace local 127.0.0.1/32 dev lo table local; \
         sudo -n ip route replace 127.0.0.2/32 via $gw dev $dev; \
         ip route get 127.0.0.2 | grep -q \" dev $dev\"; \
         ! timeout 5 bash -c \"exec 3<>/dev/tcp/127.0.0.2/{p2}\""
    ));
    assert_eq!(
        code(&out),
        0,
        "beta routed 127.0.0.2 out of its NIC and reached the host's 127.0.0.2:{p2}, \
         or could not set the route up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in [&lo1, &lo2] {
        assert!(
            matches!(l.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a host loopback listener took a connection from a guest"
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

/// Runs `ip ARGS` on the host (the lane's L1, as root).
fn host_ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host links this test makes, gone when it ends (deleting one end of
/// the veth pair takes the other and the macvtap on it).
struct HostLinks;

impl Drop for HostLinks {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", "ksvm0"]).status();
    }
}

/// `--network macvtap --tap NAME`: a macvtap link (bridge mode) on one end
/// of a veth pair whose other end holds 10.77.0.1. The sandbox's NIC gets
/// the link's MAC, and the guest reaches the peer through it; a missing
/// link is one line and exit 2, before any boot.
#[test]
#[ignore = "lane: boots Linux on keystone-vmm, needs hardware KVM (tests/lane/suites)"]
fn macvtap_sandbox_has_the_links_mac_and_reaches_its_peer() {
    let world = World::new("agent-macvtap");
    let gamma = world.project("gamma");

    let mut args = start_args("1", "macvtap");
    args.extend_from_slice(&["--tap", "ksmvt9"]);
    let out = gamma.run(&args);
    assert_eq!(code(&out), 2, "no such link: usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no interface ksmvt9") && err.lines().count() == 1,
        "{err}"
    );

    let _links = HostLinks;
    host_ip(&[
        "link", "add", "ksvm0", "type", "veth", "peer", "name", "ksvm1",
    ]);
    host_ip(&[
        "link", "add", "link", "ksvm0", "name", "ksmvt0", "type", "macvtap", "mode", "bridge",
    ]);
    host_ip(&["addr", "add", "10.77.0.1/24", "dev", "ksvm1"]);
    for dev in ["ksvm1", "ksvm0", "ksmvt0"] {
        host_ip(&["link", "set", dev, "up"]);
    }
    let mac = std::fs::read_to_string("/sys/class/net/ksmvt0/address")
        .unwrap()
        .trim()
        .to_string();

    let mut args = start_args("1", "macvtap");
    args.extend_from_slice(&["--tap", "ksmvt0"]);
    let out = gamma.run(&args);
    assert_eq!(code(&out), 0, "start on the macvtap");
    assert_eq!(gamma.status()["network"]["mode"], "macvtap");

    // The guest's NIC has the link's MAC; with an address on the peer's
    // subnet it connects to a listener on the peer's address.
    let out = gamma.exec(&format!(
        "ip -o link | grep -F 'link/ether {mac}' | cut -d: -f2 | tr -d ' '"
    ));
    let ifname = stdout(&out).trim().to_string();
    assert!(!ifname.is_empty(), "no guest NIC with MAC {mac}");
    let listener = std::net::TcpListener::bind("10.77.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap_or(0);
        (peer.ip().to_string(), buf[..n].to_vec())
    });
    let out = gamma.exec(&format!(
        "sudo -n ip addr add 10.77.0.15/24 dev {ifname} && \
         python3 -c \"import socket; s=socket.create_connection(('10.77.0.1', {port}), 30); s.sendall(b'via-macvtap')\""
    ));
    assert_eq!(code(&out), 0, "guest connect through the macvtap");
    let (peer, bytes) = accept.join().unwrap();
    assert_eq!(
        (peer.as_str(), bytes.as_slice()),
        ("10.77.0.15", &b"via-macvtap"[..])
    );
    assert_eq!(code(&gamma.run(&["agent", "stop"])), 0);
}

/// A small HTTP server on `addr` answering every request with `body`.
fn http_server(addr: &str, body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind((addr, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// `--network policy`: no NIC in the guest; HTTP(S) leaves only through the
/// host's egress proxy over vsock, to what the policy allows. The lane's
/// resolver answers `allowed.` and `denied.keystone.test` with
/// `$KEYSTONE_TEST_EGRESS_ADDR` (192.0.2.8, on the lane's loopback, where a
/// test server listens), `rebind.` with 127.0.0.1 and `private.` with
/// 10.0.2.15.
#[test]
#[ignore = "lane: boots Linux on keystone-vmm, needs hardware KVM (tests/lane/suites)"]
fn policy_sandbox_reaches_exactly_what_its_policy_allows() {
    let addr = std::env::var("KEYSTONE_TEST_EGRESS_ADDR").unwrap_or_else(|_| "192.0.2.8".into());
    let world = World::new("agent-policy");
    let delta = world.project("delta");
    let port = http_server(&addr, "allowed-ok");
    let out = delta.run(&start_args("1", "policy"));
    assert_eq!(code(&out), 0, "start with --network policy");
    assert_eq!(delta.status()["network"]["mode"], "policy");
    // The default policy (registries, git hosts, model APIs), then ours.
    let out = delta.run(&["agent", "net", "delta", "show"]);
    assert!(
        stdout(&out).contains("allow github.com"),
        "{}",
        stdout(&out)
    );
    let allowed = format!("allowed.keystone.test:{port}");
    let rebind = format!("rebind.keystone.test:{port}");
    let private = format!("private.keystone.test:{port}");
    let out = delta.run(&[
        "agent", "net", "delta", "allow", &allowed, &rebind, &private,
    ]);
    assert_eq!(code(&out), 0);
    assert_eq!(
        code(&delta.run(&["agent", "net", "delta", "allow", "1.2.3.4"])),
        2
    );

    // curl in the guest: the HTTP status it got (000: no connection).
    let curl = |args: &str| -> String {
        let out = delta.exec(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -m 30 {args}; true"
        ));
        stdout(&out).trim().to_string()
    };
    let url = |host: &str| format!("http://{host}.keystone.test:{port}/path");
    // Allowed: plain HTTP through the proxy (URL logged), and CONNECT.
    let out = delta.exec(&format!("curl -s -m 30 {}", url("allowed")));
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "allowed-ok"));
    let out = delta.exec(&format!("curl -s -m 30 --proxytunnel {}", url("allowed")));
    assert_eq!(
        (code(&out), stdout(&out).as_str()),
        (0, "allowed-ok"),
        "CONNECT"
    );
    // Refused: a name not allowed, an address, names resolving to the
    // host's loopback or a private network.
    assert_eq!(curl(&url("denied")), "403");
    assert_eq!(curl(&format!("http://{addr}:{port}/")), "403");
    assert_eq!(curl(&url("rebind")), "403");
    assert_eq!(curl(&url("private")), "403");
    // Around the proxy: no DNS, no route; curl fails closed.
    let out = delta.exec("getent hosts allowed.keystone.test");
    assert_ne!(code(&out), 0, "the guest resolves nothing itself");
    assert_eq!(curl(&format!("--noproxy '*' http://{addr}:{port}/")), "000");
    let out = delta.exec("ip -o link | grep -cv ' lo:'; true");
    assert_eq!(stdout(&out).trim(), "0", "no network device");
    // A change applies to the running sandbox at once, both ways.
    let out = delta.run(&["agent", "net", "delta", "deny", &allowed]);
    assert_eq!(code(&out), 0);
    assert_eq!(curl(&url("allowed")), "403");
    assert_eq!(
        code(&delta.run(&["agent", "net", "delta", "allow", &allowed])),
        0
    );
    assert_eq!(curl(&url("allowed")), "200");

    // The audit log: every attempt, with its decision.
    let out = delta.run(&["agent", "net", "delta", "log", "--json"]);
    assert_eq!(code(&out), 0);
    let log: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |host: &str, decision: &str| {
        log.iter()
            .filter(|e| {
                e["host"].as_str().is_some_and(|h| h.starts_with(host)) && e["decision"] == decision
            })
            .count()
    };
    assert_eq!(find("allowed", "allow"), 3, "{log:?}");
    assert_eq!(find("allowed", "deny"), 1, "{log:?}");
    assert_eq!(find("denied", "deny"), 1);
    assert_eq!(find(&addr, "deny"), 1);
    assert_eq!(find("rebind", "deny") + find("private", "deny"), 2);
    let get = log
        .iter()
        .find(|e| e["method"] == "GET" && e["decision"] == "allow")
        .expect("a plain HTTP GET");
    assert_eq!(get["url"], url("allowed").as_str());
    assert!(get["bytes_down"].as_u64().unwrap() > 0, "{get}");
    assert_eq!(log.len(), 8, "nothing else went out: {log:?}");
    let human = stdout(&delta.run(&["agent", "net", "delta", "log"]));
    assert!(
        human.contains("DENY") && human.contains("allow GET"),
        "{human}"
    );
    assert_eq!(code(&delta.run(&["agent", "stop"])), 0);
}
