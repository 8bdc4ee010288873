//! virtio-blk and vsock with the real Linux guest on keystone-vmm, each
//! beside the same work done without the VM:
//!
//! - blk: `dd` sequential write then read (1 MiB blocks, O_DIRECT, fsync) of
//!   a file on the sandbox disk's ext4 in the guest, vs the same `dd` on an
//!   ext4 loop device on the host, both backed by files on the same
//!   filesystem (the lane's tmpfs);
//! - vsock: one Python program, run in the guest over AF_VSOCK (through
//!   keystone-vmm's hybrid socket to a host Unix listener), and run on the
//!   host over a plain Unix socket to the same listener: bulk throughput
//!   and 1-byte ping-pong round trip.
//!
//! Needs hardware KVM and root (the loop mount): on this project's PVM
//! machines it runs in the nested real-KVM lane (`benches/lane/run`), where
//! the CPU is software-emulated; only same-run ratios mean anything.
//!
//!   cargo bench -p keystone-cli --bench lane_io [-- --mib N --pings N]

#[path = "../tests/common/agent.rs"]
mod agent;
#[path = "../tests/common/guest.rs"]
mod guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use agent::{bench_arg as arg, code, start_args, stdout, Project, World};

/// The guest (and host) program: `bulk MIB` sends MIB MiB then waits for
/// the listener's byte; `ping N` does N 1-byte round trips and prints the
/// mean in microseconds. Connects to AF_VSOCK (2, port) or a Unix path.
const CLIENT: &str = r#"
import socket, sys, time
mode, n, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if where.startswith("vsock:"):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((2, int(where[6:])))
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(where)
if mode == "bulk":
    buf = b"\0" * (256 * 1024)
    for _ in range(n * 4):
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
else:
    t = time.perf_counter()
    for _ in range(n):
        s.sendall(b"x")
        if s.recv(1) != b"x":
            sys.exit("bad echo")
    print("%.1f" % ((time.perf_counter() - t) / n * 1e6))
"#;

/// Serve one connection on `l`: bulk (count bytes to EOF, reply one byte;
/// returns MiB/s) or echo (returns 0).
fn serve(l: UnixListener, bulk: bool) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        if bulk {
            let mut total = 0usize;
            let mut t0 = None;
            loop {
                // A client that died mid-stream ends the count too.
                let n = s.read(&mut buf).unwrap_or(0);
                t0.get_or_insert_with(Instant::now);
                if n == 0 {
                    break;
                }
                total += n;
            }
            let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
            let _ = s.write_all(b"k");
            total as f64 / (1 << 20) as f64 / secs
        } else {
            while let Ok(n) = s.read(&mut buf[..1]) {
                if n == 0 || s.write_all(&buf[..1]).is_err() {
                    break;
                }
            }
            0.0
        }
    })
}

/// MiB/s from dd's summary line ("N bytes (...) copied, S s, ...").
fn dd_rate(text: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.contains(" copied, "))
        .unwrap_or_else(|| panic!("no dd summary in: {text}"));
    let bytes: f64 = line.split_whitespace().next().unwrap().parse().unwrap();
    let secs: f64 = line
        .split(" copied, ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    bytes / (1 << 20) as f64 / secs
}

fn dd_script(file: &str, mib: u32) -> String {
    format!(
        "dd if=/dev/zero of={file} bs=1M count={mib} oflag=direct conv=fsync 2>&1 && \
         dd if={file} of=/dev/null bs=1M iflag=direct 2>&1 && rm -f {file}"
    )
}

fn dd_rates(text: &str) -> (f64, f64) {
    let parts: Vec<&str> = text.lines().filter(|l| l.contains(" copied, ")).collect();
    assert_eq!(parts.len(), 2, "two dd runs: {text}");
    (dd_rate(parts[0]), dd_rate(parts[1]))
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host side of the blk comparison: ext4 on a loop device over a file
/// next to the sandbox disk.
fn host_blk(dir: &Path, mib: u32) -> (f64, f64) {
    let img = dir.join("host-blk.ext4");
    let mnt = dir.join("host-blk");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!(
        "truncate -s 2G {i} && mkfs.ext4 -q -F {i} && mount -o loop {i} {m}",
        i = img.display(),
        m = mnt.display()
    ));
    let text = sh(&dd_script(&mnt.join("f").display().to_string(), mib));
    sh(&format!(
        "umount {m} && rm -f {i}",
        m = mnt.display(),
        i = img.display()
    ));
    dd_rates(&text)
}

fn guest_client(p: &Project, args: &str) -> Result<String, String> {
    let mut full = vec!["agent", "exec", "--", "python3", "-c", CLIENT];
    full.extend(args.split(' '));
    let out = p.run(&full);
    if code(&out) == 0 {
        return Ok(stdout(&out));
    }
    // `run` echoed its output; the sandbox's log tails say the rest.
    p.keep_logs();
    Err(format!("guest client {args}: exit {}", code(&out)))
}

fn host_client(args: &str) -> Result<String, String> {
    let mut c = Command::new("python3");
    c.args(["-c", CLIENT]).args(args.split(' '));
    let out = c.output().expect("python3");
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(format!("host client {args}: {out:?}"))
}

/// One client run against a fresh listener on `listen`; a failed run is
/// printed with its diagnostics and tried once more (a benchmark reports a
/// one-off failure instead of losing the whole table; a second failure
/// fails the bench). Returns the client's output and the server's result.
fn attempt(
    listen: &Path,
    bulk: bool,
    client: &impl Fn(&str) -> Result<String, String>,
    args: &str,
) -> (String, f64) {
    for round in 1..=2 {
        let _ = std::fs::remove_file(listen);
        let server = serve(UnixListener::bind(listen).unwrap(), bulk);
        let result = client(args);
        if result.is_err() {
            // The server may still wait for a connection that never came.
            let _ = std::os::unix::net::UnixStream::connect(listen);
        }
        let served = server.join().unwrap();
        let _ = std::fs::remove_file(listen);
        match result {
            Ok(out) => return (out, served),
            Err(e) if round == 1 => eprintln!("bench io: run failed, trying once more:\n{e}"),
            Err(e) => panic!("{e}"),
        }
    }
    unreachable!("two rounds either return or panic")
}

/// Bulk MiB/s and ping µs over one path: `connect` is what the client
/// is given, `listen` the Unix socket the listener binds.
fn socket_pair_run(
    listen: &Path,
    client: impl Fn(&str) -> Result<String, String>,
    connect: &str,
    mib: u32,
    pings: u32,
) -> (f64, f64) {
    let (_, rate) = attempt(listen, true, &client, &format!("bulk {mib} {connect}"));
    let (out, _) = attempt(listen, false, &client, &format!("ping {pings} {connect}"));
    let rtt: f64 = out.trim().parse().expect("ping result");
    (rate, rtt)
}

fn main() {
    let mib = arg("--mib", 256);
    let pings = arg("--pings", 2000);
    let world = World::new("io-bench");
    let p = world.project("io");
    let vcpus = guest::test_vcpus();
    let out = p.run(&start_args(&vcpus, "none"));
    assert_eq!(code(&out), 0, "start");
    let st = p.status();
    let disk = PathBuf::from(st["disk"].as_str().expect("disk"));
    let uds = PathBuf::from(st["vsock_uds"].as_str().expect("vsock_uds"));

    // blk: the guest's sandbox disk is /dev/vdb, ext4 at /mnt/keystone/data.
    let out = p.exec(&format!(
        "sudo sh -c '{}'",
        dd_script("/mnt/keystone/data/blk.bin", mib)
    ));
    assert_eq!(code(&out), 0, "guest dd");
    let (gw, gr) = dd_rates(&stdout(&out));
    let (hw, hr) = host_blk(disk.parent().unwrap(), mib);

    // vsock: the guest connects to host port 5201 = <uds>_5201.
    let port = 5201;
    let vsock_listen = PathBuf::from(format!("{}_{port}", uds.display()));
    let (vr, vt) = socket_pair_run(
        &vsock_listen,
        |a| guest_client(&p, a),
        &format!("vsock:{port}"),
        mib,
        pings,
    );
    let unix_listen = world.root.join("pair.sock");
    let (ur, ut) = socket_pair_run(
        &unix_listen,
        host_client,
        &unix_listen.display().to_string(),
        mib,
        pings,
    );
    assert_eq!(code(&p.run(&["agent", "stop"])), 0);

    println!("\nvirtio-blk: dd {mib} MiB, 1 MiB blocks, O_DIRECT + fsync, ext4");
    println!("| | write MiB/s | read MiB/s |");
    println!("|---|---:|---:|");
    println!("| guest, sandbox disk on keystone-vmm virtio-blk | {gw:.0} | {gr:.0} |");
    println!("| host, loop device on the same filesystem | {hw:.0} | {hr:.0} |");
    println!("| guest / host | {:.2} | {:.2} |", gw / hw, gr / hr);
    println!("\nvsock: one Python client, {mib} MiB bulk and {pings} 1-byte round trips");
    println!("| | bulk MiB/s | round trip µs |");
    println!("|---|---:|---:|");
    println!("| guest AF_VSOCK → keystone-vmm → host Unix listener | {vr:.0} | {vt:.1} |");
    println!("| host Unix socket → the same listener | {ur:.0} | {ut:.1} |");
    println!("| vsock / Unix | {:.2} | {:.2} |", vr / ur, vt / ut);
}
