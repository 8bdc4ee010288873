//! keystone-vmm's virtio-mmio devices, driven by the probe guest's own
//! virtio drivers on this host's KVM: virtio-blk (pattern round trip,
//! malformed requests) and virtio-vsock with Firecracker's hybrid
//! Unix-socket protocol (guest- and host-initiated connections, many at
//! once, bulk data through the credit window).
//!
//! These tests need /dev/kvm and fail with a clear message without it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use common::{TempDir, VmmProcess};

const BOOT: Duration = Duration::from_secs(60);

fn sparse_image(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
}

fn sector(path: &Path, n: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 512];
    f.read_exact_at(&mut buf, n * 512).unwrap();
    buf
}

fn line_value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

#[test]
fn blk_round_trips_a_pattern_and_survives_malformed_requests() {
    let dir = TempDir::new("blk");
    let img = dir.0.join("disk.img");
    const SECTORS: u64 = 16384; // 8 MiB
    sparse_image(&img, SECTORS * 512);
    let disk = img.to_str().unwrap();
    let mut vm = VmmProcess::probe("probe=blk,reset", &["--disk", disk]);
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert!(out.contains("virtio_mmio.device=4K@0xc0001000:5"), "{out}");
    assert_eq!(
        line_value(&out, "probe: blk capacity="),
        SECTORS.to_string()
    );
    assert!(out.contains("probe: blk pattern ok"), "{out}");
    assert!(
        line_value(&out, "probe: blk id=").starts_with("ks"),
        "{out}"
    );
    // Malformed requests get an error status (1 = IOERR, 2 = UNSUPP) or are
    // returned untouched (255), and the queue keeps working.
    for (name, allowed) in [
        ("read-past-end", &["1"][..]),
        ("overflow-sector", &["1"]),
        ("write-only-header", &["1", "255"]),
        ("readonly-status", &["255", "1"]),
        ("unsupported-type", &["2"]),
        ("bad-len", &["1"]),
    ] {
        let got = line_value(&out, &format!("probe: blk bad {name} status="));
        assert!(allowed.contains(&got), "{name}: status {got}\n{out}");
    }
    assert!(out.contains("probe: blk still ok"), "{out}");
    let irqs: u64 = line_value(&out, "probe: blk irqs=").parse().unwrap();
    assert!(irqs >= 1, "completions must come by interrupt: {out}");

    // The host file holds exactly what the guest wrote, nothing else.
    for s in [0, SECTORS / 2] {
        let data = sector(&img, s);
        let want: Vec<u8> = (0..512u64).map(|i| ((s * 31 + i) & 0xff) as u8).collect();
        assert_eq!(data, want, "sector {s}");
    }
    for s in [1, 2, SECTORS / 2 - 1, SECTORS / 2 + 1, SECTORS - 2] {
        assert!(
            sector(&img, s).iter().all(|&b| b == 0),
            "sector {s} touched"
        );
    }
    assert_eq!(
        sector(&img, SECTORS - 1),
        keystone_probe::blk_marker(SECTORS).to_vec(),
        "last sector holds the probe's marker"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), SECTORS * 512);
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    let dir = TempDir::new("blk-ro");
    let img = dir.0.join("ro.img");
    sparse_image(&img, 1 << 20);
    let spec = format!("{},ro", img.display());
    let mut vm = VmmProcess::probe("probe=blk,reset", &["--disk", &spec]);
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert!(!out.contains("probe: blk pattern ok"), "{out}");
    let data = std::fs::read(&img).unwrap();
    assert!(data.iter().all(|&b| b == 0), "read-only image was modified");
}

fn echo_server(listener: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        line
    })
}

#[test]
fn vsock_guest_connects_to_a_host_listener() {
    let dir = TempDir::new("vsock-g");
    let uds = dir.0.join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = echo_server(listener);
    let spec = format!("3,{}", uds.display());
    let mut vm = VmmProcess::probe(
        "probe=vsock,reset probe.vsock_connect=5000",
        &["--vsock", &spec],
    );
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert_eq!(server.join().unwrap(), "hello from guest\n");
    assert!(out.contains("probe: vsock cid=3"), "{out}");
    assert!(out.contains("probe: vsock echo: hello from guest"), "{out}");
}

#[test]
fn vsock_guest_connect_without_host_listener_is_refused() {
    let dir = TempDir::new("vsock-r");
    let uds = dir.0.join("v.sock");
    let spec = format!("3,{}", uds.display());
    let mut vm = VmmProcess::probe(
        "probe=vsock,reset probe.vsock_connect=5001",
        &["--vsock", &spec],
    );
    let st = vm.wait_exit(BOOT);
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    assert!(
        vm.stdout().contains("probe: vsock connect refused"),
        "{}",
        vm.stdout()
    );
}

fn connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut ack = Vec::new();
    let mut b = [0u8; 1];
    while !ack.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => ack.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&ack).into_owned())
}

#[test]
fn vsock_host_connects_to_guest_listeners_many_at_once() {
    let dir = TempDir::new("vsock-h");
    let uds = dir.0.join("v.sock");
    let spec = format!("3,{}", uds.display());
    const CONNS: usize = 64;
    let cmdline = format!("probe=vsock,reset probe.vsock_listen=6000 probe.vsock_accept={CONNS}");
    let mut vm = VmmProcess::probe(&cmdline, &["--vsock", &spec]);
    vm.wait_stdout("probe: vsock cid=3", BOOT);
    // A port nobody listens on: the host socket is closed, no OK.
    let (mut s, ack) = connect(&uds, 6001);
    assert_eq!(ack, "", "unexpected ack from a port with no listener");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);

    let mut conns = Vec::new();
    for i in 0..CONNS {
        let (s, ack) = connect(&uds, 6000);
        assert!(ack.starts_with("OK "), "conn {i}: ack {ack:?}");
        let port: u32 = ack[3..].trim().parse().expect("host port");
        assert!(port > 0);
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("conn {i} says hi\n").as_bytes())
            .unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let want = format!("conn {i} says hi\n");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    drop(conns);
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert_eq!(out.matches("probe: vsock served").count(), CONNS, "{out}");
}

#[test]
fn vsock_bulk_transfer_cycles_the_credit_window() {
    let dir = TempDir::new("vsock-b");
    let uds = dir.0.join("v.sock");
    let listener = UnixListener::bind(format!("{}_7000", uds.display())).unwrap();
    const KIB: usize = 1024;
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut total = 0usize;
        let mut ok = true;
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    ok &= buf[..n]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == ((total + i) & 0xff) as u8);
                    total += n;
                }
            }
        }
        (total, ok)
    });
    let spec = format!("3,{}", uds.display());
    let cmdline = format!("probe=vsock,reset probe.vsock_bulk=7000:{KIB}");
    let mut vm = VmmProcess::probe(&cmdline, &["--vsock", &spec]);
    let st = vm.wait_exit(Duration::from_secs(180));
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    let (total, ok) = sink.join().unwrap();
    assert_eq!(total, KIB * 1024, "{out}");
    assert!(ok, "data corrupted in transit");
    assert!(
        out.contains(&format!("probe: vsock bulk sent {}", KIB * 1024)),
        "{out}"
    );
}
