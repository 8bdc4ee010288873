//! keystone-vmm's virtio-net, driven by the probe guest's own driver:
//! user-mode networking through a real passt (DHCP from passt), a tap
//! device inside a network namespace made by the test (ARP with the host
//! kernel, addresses only in that namespace), and a backend that dies.
//!
//! These tests need /dev/kvm, passt and root (tap, netns); they fail with a
//! clear message without them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::VmmProcess;

const BOOT: Duration = Duration::from_secs(60);

fn line_value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

#[test]
fn user_networking_gets_a_dhcp_offer_from_passt() {
    let mut vm = VmmProcess::probe("probe=net,reset", &["--net", "user,mac=02:aa:bb:cc:dd:01"]);
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert!(out.contains("probe: net mac=02:aa:bb:cc:dd:01"), "{out}");
    let offer = line_value(&out, "probe: net dhcp offer ip=");
    assert!(!offer.starts_with("0.0.0.0"), "{offer}");
    assert!(out.contains("probe: net done"), "{out}");
}

#[test]
fn missing_passt_is_a_one_line_error() {
    common::require_kvm();
    let elf = common::probe_elf();
    let out = Command::new(common::vmm_bin())
        .args(["--kernel", elf.to_str().unwrap(), "--net", "user"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("keystone-vmm: error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("apt-get install passt"), "{line}");
}

/// A network namespace that is deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> Self {
        let name = format!("ks-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(st.success(), "ip netns add failed: these tests need root");
        NetNs(name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn rx_packets(ns: &NetNs, dev: &str) -> u64 {
    let out = ns.ip(&["-s", "link", "show", dev]);
    // "RX: bytes packets ..." then the numbers on the next line.
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("RX:") {
            let nums = lines.next().unwrap_or("");
            return nums
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    panic!("no RX counters in {out}");
}

#[test]
fn tap_in_a_namespace_carries_arp_both_ways() {
    common::require_kvm();
    let ns = NetNs::new("tap");
    ns.ip(&["tuntap", "add", "dev", "kstap0", "mode", "tap", "vnet_hdr"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "kstap0"]);
    ns.ip(&["link", "set", "kstap0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    let host_mac = link_mac(&ns, "kstap0");
    let out = arp_probe_in(&ns, "tap=kstap0,mac=02:00:0a:4d:00:0f");
    let reply = line_value(&out, "probe: net arp reply ip=10.77.0.1 mac=");
    assert_eq!(reply.trim(), host_mac, "{out}");
    // The host kernel saw the probe's frames (ARP request at least).
    assert!(rx_packets(&ns, "kstap0") >= 1);
}

/// The probe guest, its NIC on `net` inside `ns`, ARPing for 10.77.0.1 as
/// 10.77.0.15 (no DHCP); its console output once it exited successfully.
fn arp_probe_in(ns: &NetNs, net: &str) -> String {
    let elf = common::probe_elf();
    let mut vm = VmmProcess::spawn_with(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(common::vmm_bin())
            .args([
                "--kernel",
                elf.to_str().unwrap(),
                "--net",
                net,
                "--cmdline",
                "probe=net,reset probe.net_dhcp=0 probe.net_arp=10.77.0.1 probe.net_ip=10.77.0.15",
            ]),
    );
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    out
}

fn link_mac(ns: &NetNs, dev: &str) -> String {
    let out = ns.ip(&["link", "show", dev]);
    out.split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC for {dev}: {out}"))
        .to_string()
}

/// `--net macvtap=NAME`: a macvtap link (bridge mode) on one end of a veth
/// pair, the other end holding 10.77.0.1. The guest's NIC gets the link's
/// MAC (a macvtap passes only frames for it), and ARP goes both ways.
#[test]
fn macvtap_on_a_veth_carries_arp_both_ways_with_the_links_mac() {
    common::require_kvm();
    let ns = NetNs::new("mvt");
    ns.ip(&[
        "link", "add", "ksv0", "type", "veth", "peer", "name", "ksv1",
    ]);
    ns.ip(&[
        "link", "add", "link", "ksv0", "name", "ksmvt0", "type", "macvtap", "mode", "bridge",
    ]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "ksv1"]);
    for dev in ["lo", "ksv1", "ksv0", "ksmvt0"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    let (mvt_mac, peer_mac) = (link_mac(&ns, "ksmvt0"), link_mac(&ns, "ksv1"));

    let out = arp_probe_in(&ns, "macvtap=ksmvt0");
    assert_eq!(line_value(&out, "probe: net mac=").trim(), mvt_mac, "{out}");
    let reply = line_value(&out, "probe: net arp reply ip=10.77.0.1 mac=");
    assert_eq!(reply.trim(), peer_mac, "{out}");
    assert!(rx_packets(&ns, "ksv1") >= 1);
}

/// What a user gets wrong with macvtap is one clear line and exit 1.
#[test]
fn macvtap_errors_name_the_missing_link_and_the_wrong_kind() {
    common::require_kvm();
    let ns = NetNs::new("mvterr");
    ns.ip(&[
        "link", "add", "ksveth0", "type", "veth", "peer", "name", "ksveth1",
    ]);
    let elf = common::probe_elf();
    let vmm = common::vmm_bin();
    for (net, want) in [
        ("macvtap=ksnone0", "no network interface ksnone0"),
        ("macvtap=ksveth0", "ksveth0 is not a macvtap link"),
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(vmm)
            .args([
                "--kernel",
                elf.to_str().unwrap(),
                "--net",
                net,
                "--cmdline",
                "probe=reset",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{net}: {err}");
        assert!(err.contains(want), "{net}: {err}");
    }
}

#[test]
fn a_dead_passt_is_reported_and_the_vm_keeps_running() {
    let mut vm = VmmProcess::probe("probe=net,spin probe.net_dhcp=0", &["--net", "user"]);
    vm.wait_stdout("probe: spinning", BOOT);
    // Kill the VMM's passt child.
    let children =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", vm.pid(), vm.pid()))
            .unwrap_or_default();
    let passt: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("passt child");
    // SAFETY: kill(2) on a pid read from /proc as our VMM's child.
    assert_eq!(unsafe { libc::kill(passt, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(Duration::from_secs(10));
    let log = vm.stderr();
    assert!(st.success(), "exit {st}\n{log}");
    assert_eq!(
        log.matches("backend closed").count(),
        1,
        "reported once: {log}"
    );
}
