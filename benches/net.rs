//! virtio-net benchmark: guest→host frames/s and MiB/s over the tap path,
//! with the probe guest sending full-size (1514-byte) frames as fast as its
//! TX queue allows into a tap device inside a network namespace made for
//! the run. The host counts what the tap received.
//!
//! Needs root (netns, tap) and /dev/kvm.
//! `cargo bench -p keystone-vmm --bench net -- [--frames N]`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
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

fn rx_counters(ns: &str, dev: &str) -> (u64, u64) {
    let out = ip(ns, &["-s", "link", "show", dev]);
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("RX:") {
            let nums: Vec<u64> = lines
                .next()
                .unwrap_or("")
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            return (
                nums.first().copied().unwrap_or(0),
                nums.get(1).copied().unwrap_or(0),
            );
        }
    }
    (0, 0)
}

fn main() {
    let mut frames = 20_000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--frames" {
            frames = args.next().and_then(|v| v.parse().ok()).unwrap_or(frames);
        }
    }
    let ns = format!("ks-bench-{}", std::process::id());
    let st = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip");
    assert!(
        st.success(),
        "ip netns add failed: the net benchmark needs root"
    );
    ip(
        &ns,
        &["tuntap", "add", "dev", "ksb0", "mode", "tap", "vnet_hdr"],
    );
    ip(&ns, &["link", "set", "ksb0", "up"]);
    let (bytes0, packets0) = rx_counters(&ns, "ksb0");

    let elf = keystone_probe::elf_path()
        .to_str()
        .expect("utf-8")
        .to_string();
    let cmdline = format!("probe=netbench,reset probe.netbench_frames={frames}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_keystone-vmm")])
        .args(["--kernel", &elf, "--net", "tap=ksb0", "--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("keystone-vmm");
    let out = child.stdout.take().expect("stdout");
    let mut start = None;
    let mut end = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("probe: netbench start") {
            start = Some(Instant::now());
        } else if line.starts_with("probe: netbench done") {
            end = Some(Instant::now());
        }
    }
    let status = child.wait().expect("wait");
    let (bytes1, packets1) = rx_counters(&ns, "ksb0");
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(status.success(), "keystone-vmm exited {status}");
    let elapsed: Duration = match (start, end) {
        (Some(s), Some(e)) => e - s,
        _ => panic!("the probe did not report netbench start/done"),
    };
    let got = packets1 - packets0;
    let bytes = bytes1 - bytes0;
    let secs = elapsed.as_secs_f64();
    println!(
        "\nkeystone-vmm virtio-net benchmark: probe guest → tap, {frames} frames of 1514 bytes\n"
    );
    println!("| {:<34} | {:>12} |", "measure", "value");
    println!("|{:-<36}|{:->14}|", "", "");
    println!("| {:<34} | {:>12} |", "frames received by the tap", got);
    println!("| {:<34} | {:>12.0} |", "frames/s", got as f64 / secs);
    println!(
        "| {:<34} | {:>12.2} |",
        "MiB/s",
        bytes as f64 / (1024.0 * 1024.0) / secs
    );
    println!();
    assert!(
        got >= frames * 9 / 10,
        "the tap saw {got} of {frames} frames"
    );
}
