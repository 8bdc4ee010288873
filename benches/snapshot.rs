//! Snapshot benchmark on the probe guest (`probe=fill`: it writes 128 MiB
//! of its RAM with a pattern, then reads one word of every page of it
//! forever).
//!
//! 1. Snapshot write: time (the API's own figure) and stored bytes vs
//!    guest memory, for 256 and 1024 MiB guests.
//! 2. Restore: keystone-vmm start → vCPUs running (the first guest
//!    instruction; the VMM's own debug line) and spawn → the guest's first
//!    line after it (a pass over all its pages), min / median / max.
//! 3. N restored children of the 1024 MiB snapshot side by side, each
//!    having touched all its pages: their summed RSS vs summed PSS (pages
//!    of the shared `MAP_PRIVATE` file counted once) vs N × guest memory.
//!
//! `cargo bench -p keystone-vmm --bench snapshot -- [--runs N] [--children 1,2,4]`

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);
/// What the guest writes (first touches are slow under PVM: more would
/// make the run long without changing what the tables show).
const FILL_MIB: u64 = 128;

fn api(sock: &Path, req: &str) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        match keystone_vmm::api::request(sock, req, WAIT) {
            Ok(v) => return v,
            Err(_) if Instant::now() < deadline && !sock.exists() => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("api {}: {e}", sock.display()),
        }
    }
}

/// A VMM with its stdout lines arriving on a channel, stamped.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    stderr: std::thread::JoinHandle<String>,
    spawned: Instant,
}

impl Vm {
    fn spawn(vmm: &str, args: &[&str]) -> Vm {
        let spawned = Instant::now();
        let mut child = Command::new(vmm)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keystone-vmm");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        Vm {
            child,
            lines,
            stderr,
            spawned,
        }
    }

    /// When a line starting with `prefix` arrived.
    fn wait_line(&self, prefix: &str) -> Instant {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.starts_with(prefix) => {
                    assert!(!l.contains("bad=") || l.ends_with("bad=0"), "guest saw {l}");
                    return t;
                }
                Ok(_) => {}
                Err(e) => panic!("no '{prefix}' line: {e}"),
            }
        }
    }

    /// SIGTERM, then its stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        self.stderr.join().unwrap_or_default()
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    (v[0], v[n / 2], v[n - 1])
}

fn rollup_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Boot a `fill` probe of `mib` ([`FILL_MIB`] of it written), snapshot it into
/// `dir`; returns (API ms, stored bytes, bytes on disk).
fn make_snapshot(vmm: &str, elf: &str, dir: &Path, mib: u64) -> (f64, u64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("snap")).unwrap();
    let sock = dir.join("api.sock");
    let cmdline = format!("probe=fill probe.fill_mib={FILL_MIB}");
    let mem = mib.to_string();
    let vm = Vm::spawn(
        vmm,
        &[
            "--kernel",
            elf,
            "--cmdline",
            &cmdline,
            "--memory",
            &mem,
            "--api-sock",
            sock.to_str().unwrap(),
            "--snapshot-dir",
            dir.join("snap").to_str().unwrap(),
        ],
    );
    vm.wait_line("probe: fill pass");
    let r = api(&sock, r#"{"op":"snapshot"}"#);
    assert_eq!(r["ok"], true, "{r}");
    vm.stop();
    let meta = std::fs::metadata(dir.join("snap/memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    (
        r["ms"].as_f64().unwrap_or(0.0),
        r["memory_bytes"].as_u64().unwrap_or(0),
        meta.blocks() * 512,
    )
}

fn main() {
    let mut runs = 10usize;
    let mut children = vec![1usize, 2, 4];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs),
            "--children" => {
                children = args
                    .next()
                    .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or(children)
            }
            _ => {}
        }
    }
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("snapshot benchmark needs /dev/kvm");
        std::process::exit(1);
    }
    let vmm = env!("CARGO_BIN_EXE_keystone-vmm");
    let elf = keystone_probe::elf_path().to_str().unwrap().to_string();
    let base = std::env::temp_dir().join(format!("ks-snapbench-{}", std::process::id()));

    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    println!(
        "\nkeystone-vmm snapshot benchmark: probe guest (fill: {FILL_MIB} MiB written, then read page by page), 1 vCPU{}\n",
        if pvm { ", host KVM: PVM" } else { "" }
    );
    println!("| guest memory | snapshot write (ms) | memory stored (MiB) | file on disk (MiB) |");
    println!("|---|---|---|---|");
    for mib in [256u64, 1024] {
        let (ms, stored, disk) = make_snapshot(vmm, &elf, &base.join(format!("m{mib}")), mib);
        println!(
            "| {mib} MiB | {ms:.1} | {:.1} | {:.1} |",
            stored as f64 / 1048576.0,
            disk as f64 / 1048576.0
        );
    }

    let snap256 = base.join("m256/snap");
    let mut first_insn = Vec::new();
    let mut first_line = Vec::new();
    for _ in 0..runs {
        let vm = Vm::spawn(
            vmm,
            &[
                "--restore",
                snap256.to_str().unwrap(),
                "--log-level",
                "debug",
            ],
        );
        let t = vm.wait_line("probe: fill pass");
        first_line.push((t - vm.spawned).as_secs_f64() * 1000.0);
        let log = vm.stop();
        let us: f64 = log
            .split("boot phase vcpus started: ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("no 'vcpus started' phase in the VMM log");
        first_insn.push(us / 1000.0);
    }
    println!("\nrestore of the 256 MiB snapshot, {runs} runs:\n");
    println!("| phase | min | median | max |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "VMM start -> vCPUs running, first guest instruction (ms)",
            first_insn,
        ),
        (
            "spawn -> guest's first line (a pass over its data) (ms)",
            first_line,
        ),
    ] {
        let (min, med, max) = stats(v);
        println!("| {name} | {min:.2} | {med:.2} | {max:.2} |");
    }

    let snap1g = base.join("m1024/snap");
    println!("\nN restored children of the 1024 MiB snapshot ({FILL_MIB} MiB written by the guest), each after a pass over all its pages:\n");
    println!("| N | summed RSS (MiB) | summed PSS (MiB) | N x guest data (MiB) |");
    println!("|---|---|---|---|");
    for n in children {
        let vms: Vec<Vm> = (0..n)
            .map(|_| Vm::spawn(vmm, &["--restore", snap1g.to_str().unwrap()]))
            .collect();
        for vm in &vms {
            vm.wait_line("probe: fill pass");
        }
        let rss: u64 = vms.iter().map(|v| rollup_kib(v.child.id(), "Rss:")).sum();
        let pss: u64 = vms.iter().map(|v| rollup_kib(v.child.id(), "Pss:")).sum();
        println!(
            "| {n} | {:.0} | {:.0} | {} |",
            rss as f64 / 1024.0,
            pss as f64 / 1024.0,
            n as u64 * FILL_MIB
        );
        for vm in vms {
            vm.stop();
        }
    }
    println!();
    let _ = std::fs::remove_dir_all(&base);
}
