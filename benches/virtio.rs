//! virtio benchmarks on keystone-vmm with the probe guest:
//! - virtio-blk sequential write and read MiB/s, against `dd` on the same
//!   file with the same request size (the ratio is the figure);
//! - virtio-vsock guest→host throughput MiB/s and host↔guest round trip of
//!   a 1-byte message (µs), through the hybrid Unix socket.
//!
//! Guest phases are timed on the host from the arrival of the probe's
//! serial lines. On a PVM host every guest instruction in kernel mode is
//! emulated, so these numbers measure the VMM's device paths plus a slow
//! guest; on a real KVM host the guest side is close to free.
//!
//! `cargo bench -p keystone-vmm --bench virtio -- [--blk-mib N] [--vsock-kib N] [--rtt N]`

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

struct Vm {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl Vm {
    fn start(args: &[&str]) -> Vm {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keystone-vmm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keystone-vmm");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Vm { child, lines: rx }
    }

    /// Wait for a line starting with `prefix`; returns its arrival time and text.
    fn wait(&self, prefix: &str, timeout: Duration) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) if l.starts_with(prefix) => return (t, l),
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for {prefix:?}"),
            }
        }
    }

    fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert!(st.success(), "keystone-vmm exited {st}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        panic!("keystone-vmm did not exit");
    }
}

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("keystone-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("scratch dir");
    p
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn dd(args: &[&str]) -> Duration {
    let t = Instant::now();
    let st = Command::new("dd")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("dd");
    assert!(st.success(), "dd {args:?}");
    t.elapsed()
}

fn blk(elf: &str, mib: u64, req_kib: u64) -> [(String, f64, f64); 2] {
    let dir = scratch("blk");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len((mib + 1) << 20))
        .expect("image");
    let cmdline =
        format!("probe=blkbench,reset probe.blkbench_mib={mib} probe.blkbench_kib={req_kib}");
    let vm = Vm::start(&[
        "--kernel",
        elf,
        "--disk",
        img.to_str().expect("utf-8"),
        "--cmdline",
        &cmdline,
        "--serial",
        "stdio",
    ]);
    let long = Duration::from_secs(600);
    let (w0, _) = vm.wait("probe: blkbench write start", long);
    let (w1, _) = vm.wait("probe: blkbench write done", long);
    let (r0, _) = vm.wait("probe: blkbench read start", long);
    let (r1, _) = vm.wait("probe: blkbench read done", long);
    vm.finish();
    let bytes = mib << 20;
    let guest_w = mib_s(bytes, w1 - w0);
    let guest_r = mib_s(bytes, r1 - r0);

    let of = format!("of={}", img.display());
    let iff = format!("if={}", img.display());
    let bs = format!("bs={req_kib}K");
    let count = format!("count={}", mib * 1024 / req_kib);
    let dd_w = mib_s(
        bytes,
        dd(&["if=/dev/zero", &of, &bs, &count, "conv=notrunc,fdatasync"]),
    );
    let dd_r = mib_s(bytes, dd(&[&iff, "of=/dev/null", &bs, &count]));
    let _ = std::fs::remove_dir_all(&dir);
    [
        (
            format!("virtio-blk seq write, {req_kib} KiB requests (MiB/s)"),
            guest_w,
            dd_w,
        ),
        (
            format!("virtio-blk seq read, {req_kib} KiB requests (MiB/s)"),
            guest_r,
            dd_r,
        ),
    ]
}

fn vsock_bulk(elf: &str, kib: usize) -> f64 {
    let dir = scratch("vsock-bulk");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7000", uds.display())).expect("bind");
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut first = None;
        let mut total = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    total += n;
                }
            }
        }
        (first, Instant::now(), total)
    });
    let spec = format!("3,{}", uds.display());
    let cmdline = format!("probe=vsock,reset probe.vsock_bulk=7000:{kib}");
    let vm = Vm::start(&["--kernel", elf, "--vsock", &spec, "--cmdline", &cmdline]);
    vm.wait("probe: vsock bulk sent", Duration::from_secs(600));
    vm.finish();
    let (first, last, total) = sink.join().expect("sink");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(total, kib * 1024, "bulk bytes");
    mib_s(total as u64, last - first.expect("data"))
}

/// Round trips of 1 byte, then `echo_kib` KiB echoed through the guest
/// (host→guest→host) on the same connection: (min, median, max) µs and the
/// echo throughput in MiB/s.
fn vsock_rtt(elf: &str, rounds: usize, echo_kib: usize) -> ((f64, f64, f64), f64) {
    let dir = scratch("vsock-rtt");
    let uds = dir.join("v.sock");
    let spec = format!("3,{}", uds.display());
    let vm = Vm::start(&[
        "--kernel",
        elf,
        "--vsock",
        &spec,
        "--cmdline",
        "probe=vsock,reset probe.vsock_listen=6000 probe.vsock_accept=1",
    ]);
    vm.wait("probe: vsock cid=", Duration::from_secs(60));
    let mut s = UnixStream::connect(&uds).expect("connect");
    s.write_all(b"CONNECT 6000\n").expect("connect line");
    let mut ack = [0u8; 64];
    let mut n = 0;
    while n == 0 || ack[n - 1] != b'\n' {
        n += s.read(&mut ack[n..]).expect("ack");
    }
    assert!(ack.starts_with(b"OK "), "no OK");
    let mut samples = Vec::with_capacity(rounds);
    let mut b = [0u8; 1];
    for i in 0..rounds {
        let t = Instant::now();
        s.write_all(&[i as u8]).expect("send");
        s.read_exact(&mut b).expect("echo");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(b[0], i as u8);
    }
    let total = echo_kib * 1024;
    let mut writer = s.try_clone().expect("clone");
    let t = Instant::now();
    let feeder = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        for _ in 0..total / chunk.len() {
            writer.write_all(&chunk).expect("send");
        }
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    while got < total {
        let n = s.read(&mut buf).expect("echo");
        assert!(n > 0, "echo ended early at {got}");
        got += n;
    }
    let echo = mib_s(total as u64, t.elapsed());
    feeder.join().expect("feeder");
    s.shutdown(std::net::Shutdown::Both).expect("shutdown");
    drop(s);
    vm.finish();
    let _ = std::fs::remove_dir_all(&dir);
    samples.sort_by(|a, b| a.total_cmp(b));
    (
        (
            samples[0],
            samples[samples.len() / 2],
            samples[samples.len() - 1],
        ),
        echo,
    )
}

fn main() {
    let mut blk_mib = 32u64;
    let mut vsock_kib = 1024usize;
    let mut rtt = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut next = || args.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--blk-mib" => blk_mib = next().unwrap_or(blk_mib),
            "--vsock-kib" => vsock_kib = next().map_or(vsock_kib, |v| v as usize),
            "--rtt" => rtt = next().map_or(rtt, |v| v as usize),
            _ => {}
        }
    }
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("virtio benchmark needs /dev/kvm");
        std::process::exit(1);
    }
    let elf = keystone_probe::elf_path()
        .to_str()
        .expect("utf-8")
        .to_string();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();

    let blk_rows = blk(&elf, blk_mib, 128);
    let bulk = vsock_bulk(&elf, vsock_kib);
    let ((rtt_min, rtt_med, rtt_max), echo) = vsock_rtt(&elf, rtt, vsock_kib);

    println!(
        "\nkeystone-vmm virtio benchmark: probe guest{}\n",
        if pvm {
            ", PVM host (guest kernel code emulated)"
        } else {
            ""
        }
    );
    println!(
        "| {:<52} | {:>10} | {:>10} | {:>7} |",
        "measure", "guest", "host dd", "ratio"
    );
    println!("|{:-<54}|{:->12}|{:->12}|{:->9}|", "", "", "", "");
    for (name, guest, host) in &blk_rows {
        println!(
            "| {name:<52} | {guest:>10.1} | {host:>10.1} | {:>7.2} |",
            guest / host
        );
    }
    println!(
        "| {:<52} | {bulk:>10.2} | {:>10} | {:>7} |",
        format!("virtio-vsock guest->host, {vsock_kib} KiB (MiB/s)"),
        "",
        ""
    );
    println!(
        "| {:<52} | {echo:>10.2} | {:>10} | {:>7} |",
        format!("virtio-vsock host->guest->host echo, {vsock_kib} KiB (MiB/s)"),
        "",
        ""
    );
    println!(
        "| {:<52} | {rtt_med:>10.1} | {:>10} | {:>7} |",
        format!("virtio-vsock 1-byte round trip, median of {rtt} (us)"),
        format!("min {rtt_min:.0}"),
        format!("max {rtt_max:.0}")
    );
    println!();
}
