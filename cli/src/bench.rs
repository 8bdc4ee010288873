//! `keystone bench boot`: boot a guest N times on keystone-vmm (and, with
//! `--against`, on a peer VMM in alternating runs) and report each boot
//! phase's distribution: min / median / p90 / max, a table or JSON, and an
//! SVG strip plot.
//!
//! Phases, all in ms after the VMM process was spawned:
//! - `vmm_start`: the VMM's `main` began (from its debug log, same clock);
//! - `vm_ready`: KVM VM built and vCPUs started;
//! - `first_output`: first byte on the guest's serial console;
//! - `boot_timer`: the guest wrote the boot timer (guest init / probe step);
//! - `ready`: the guest's readiness message over vsock (Linux guests);
//! - `exit`: the VMM process exited (after the guest's reset; Linux guests
//!   are stopped with SIGTERM once ready).
//!
//! Plus the VMM's CPU time (user + system) and memory (peak RSS, and the
//! VMM's own overhead: peak RSS minus guest RAM touched).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use keystone_devices::boot_timer::clock_us;
use serde::Serialize;

/// Errors of `keystone bench boot`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A binary is missing.
    #[error("{0}")]
    Missing(String),
    /// A run failed.
    #[error("run {run} ({vmm}) failed: {reason}")]
    Run {
        /// Run index.
        run: usize,
        /// Which VMM.
        vmm: String,
        /// What went wrong.
        reason: String,
    },
    /// File I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// The boot phases, in boot order.
pub const PHASES: [&str; 6] = [
    "vmm_start",
    "vm_ready",
    "first_output",
    "boot_timer",
    "ready",
    "exit",
];

/// What to boot.
#[derive(Clone, Debug)]
pub enum Guest {
    /// The probe guest ELF (timer step, then reset).
    Probe(PathBuf),
    /// A Linux kernel with a root filesystem image that signals readiness
    /// over vsock (host port 1024), as the guest image does.
    Linux {
        /// vmlinux or bzImage.
        kernel: PathBuf,
        /// Initial ramdisk, if the image has one.
        initrd: Option<PathBuf>,
        /// ext4 root filesystem image (/dev/vda).
        rootfs: PathBuf,
        /// Kernel command line.
        cmdline: String,
    },
}

/// A peer VMM to compare with (QEMU: probe or Linux guest; Firecracker:
/// probe guest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `qemu-system-x86_64 -accel kvm -M microvm,acpi=off -cpu host,-arch-capabilities -device i8042 -no-reboot`;
    /// a Linux guest gets its root filesystem on virtio-blk-device and a
    /// vhost-vsock-device (CID 3).
    Qemu(PathBuf),
    /// `firecracker --no-api --config-file`.
    Firecracker(PathBuf),
}

impl Peer {
    fn name(&self) -> &'static str {
        match self {
            Peer::Qemu(_) => "qemu",
            Peer::Firecracker(_) => "firecracker",
        }
    }
}

/// Options of one benchmark.
#[derive(Clone, Debug)]
pub struct BootBench {
    /// Boots per VMM.
    pub runs: usize,
    /// The guest.
    pub guest: Guest,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// The keystone-vmm binary.
    pub vmm: PathBuf,
    /// Peer to alternate with.
    pub against: Option<Peer>,
    /// Print progress on stderr.
    pub progress: bool,
}

/// One boot's measurements (ms after spawn; `None`: not measured).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Per phase, in [`PHASES`] order.
    pub phases: [Option<f64>; 6],
    /// User + system CPU time of the VMM process, ms.
    pub cpu_ms: f64,
    /// Peak RSS of the VMM process, MiB.
    pub peak_rss_mib: f64,
    /// Peak RSS minus guest RAM touched, MiB (keystone-vmm only).
    pub overhead_mib: Option<f64>,
}

/// min / median / p90 / max of a set of values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Statistics of `values` (`None` when empty).
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
        Some(Stats {
            min: v[0],
            median,
            p90: v[rank - 1],
            max: v[n - 1],
        })
    }
}

/// All samples of one VMM, summarized.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// "keystone-vmm", "qemu" or "firecracker".
    pub vmm: String,
    /// Per phase name: statistics and samples.
    pub phases: BTreeMap<String, PhaseSummary>,
}

/// One phase over all runs.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    /// Statistics.
    pub stats: Stats,
    /// Every sample, in run order.
    pub samples: Vec<f64>,
}

/// Summarize `samples` of `vmm`.
pub fn summarize(vmm: &str, samples: &[Sample]) -> Summary {
    let mut phases = BTreeMap::new();
    let mut add = |name: &str, values: Vec<f64>| {
        if let Some(stats) = Stats::of(&values) {
            phases.insert(
                name.to_string(),
                PhaseSummary {
                    stats,
                    samples: values,
                },
            );
        }
    };
    for (i, name) in PHASES.iter().enumerate() {
        add(name, samples.iter().filter_map(|s| s.phases[i]).collect());
    }
    add("cpu_ms", samples.iter().map(|s| s.cpu_ms).collect());
    add(
        "peak_rss_mib",
        samples.iter().map(|s| s.peak_rss_mib).collect(),
    );
    add(
        "overhead_mib",
        samples.iter().filter_map(|s| s.overhead_mib).collect(),
    );
    Summary {
        vmm: vmm.to_string(),
        phases,
    }
}

/// Spawn `cmd`, timing its first stdout byte and its exit; returns the
/// phases it saw, the stdout and stderr text, and the rusage.
struct Observed {
    spawn_mono_us: u64,
    first_output: Option<Duration>,
    ready: Option<Duration>,
    exit: Duration,
    success: bool,
    stderr: String,
    cpu_ms: f64,
    peak_rss_mib: f64,
}

/// Where the guest's readiness message arrives: keystone-vmm's hybrid vsock
/// Unix socket (`<uds>_1024`), or an `AF_VSOCK` socket on the host's port
/// 1024 for QEMU's vhost-vsock device.
enum ReadyListener {
    Unix(UnixListener),
    Vsock(std::os::fd::OwnedFd),
}

impl ReadyListener {
    /// Block until a guest connects and sends its line; when it connected.
    fn accept_line(self) -> Option<Instant> {
        let stream: Box<dyn Read> = match self {
            ReadyListener::Unix(l) => Box::new(l.accept().ok()?.0),
            ReadyListener::Vsock(fd) => {
                use std::os::fd::{AsRawFd, FromRawFd};
                // SAFETY: accept4 on a listening socket we own; no address
                // is asked for.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return None;
                }
                // SAFETY: c is a fresh descriptor that nothing else owns.
                Box::new(std::fs::File::from(unsafe {
                    std::os::fd::OwnedFd::from_raw_fd(c)
                }))
            }
        };
        let at = Instant::now();
        let mut line = String::new();
        let _ = BufReader::new(stream).read_line(&mut line);
        Some(at)
    }
}

/// A listening `AF_VSOCK` stream socket on the host's `port` (any CID).
fn vsock_listen(port: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: addr is a valid sockaddr_vm and the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) on the socket we own.
    if rc < 0 || unsafe { libc::listen(fd.as_raw_fd(), 4) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn observe(
    mut cmd: Command,
    ready_listener: Option<ReadyListener>,
    stop_after_ready: bool,
    timeout: Duration,
) -> Result<Observed, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_mono_us = clock_us(libc::CLOCK_MONOTONIC);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        let mut first = None;
        while let Ok(n) = out.read(&mut b) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
        }
        let _ = tx.send(first);
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let ready = ready_listener.map(|l| {
        let (rtx, rrx) = channel();
        std::thread::spawn(move || {
            if let Some(at) = l.accept_line() {
                let _ = rtx.send(at);
            }
        });
        rrx
    });
    let mut ready_at = None;
    if let Some(rrx) = &ready {
        if let Ok(at) = rrx.recv_timeout(timeout) {
            ready_at = Some(at - t0);
        }
        if stop_after_ready {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers; the Child is
    // not waited on again afterwards.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let exit = t0.elapsed();
    if rc != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let first = rx.recv_timeout(Duration::from_secs(5)).ok().flatten();
    let stderr = err_reader.join().unwrap_or_default();
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(Observed {
        spawn_mono_us,
        first_output: first.map(|f| f - t0),
        ready: ready_at,
        exit,
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stderr,
        cpu_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
        peak_rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

fn log_us(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .find_map(|l| l.split(key).nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn scratch_dir() -> Result<PathBuf, BenchError> {
    let d = std::env::temp_dir().join(format!(
        "keystone-bench-{}-{}",
        std::process::id(),
        clock_us(libc::CLOCK_MONOTONIC)
    ));
    std::fs::create_dir_all(&d).map_err(io("create a scratch directory"))?;
    Ok(d)
}

fn keystone_run(b: &BootBench, run: usize) -> Result<Sample, BenchError> {
    let fail = |reason: String| BenchError::Run {
        run,
        vmm: "keystone-vmm".into(),
        reason,
    };
    let mut cmd = Command::new(&b.vmm);
    cmd.args(["--log-level", "debug", "--boot-timer", "--serial", "stdio"])
        .args(["--memory", &b.memory_mib.to_string()])
        .args(["--vcpus", &b.vcpus.to_string()]);
    let mut scratch = None;
    let mut listener = None;
    match &b.guest {
        Guest::Probe(elf) => {
            cmd.arg("--kernel")
                .arg(elf)
                .args(["--cmdline", "probe=timer,reset"]);
        }
        Guest::Linux {
            kernel,
            initrd,
            rootfs,
            cmdline,
        } => {
            let dir = scratch_dir()?;
            if let Some(initrd) = initrd {
                cmd.arg("--initrd").arg(initrd);
            }
            let uds = dir.join("v.sock");
            listener = Some(ReadyListener::Unix(
                UnixListener::bind(format!("{}_1024", uds.display()))
                    .map_err(io("listen for the guest's readiness"))?,
            ));
            cmd.arg("--kernel")
                .arg(kernel)
                .arg("--disk")
                .arg(format!("{},ro", rootfs.display()))
                .arg("--vsock")
                .arg(format!("3,{}", uds.display()))
                .args(["--cmdline", cmdline]);
            scratch = Some(dir);
        }
    }
    let linux = listener.is_some();
    let o = observe(cmd, listener, linux, Duration::from_secs(120)).map_err(fail)?;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    if !o.success {
        return Err(fail(format!("exit failure: {}", o.stderr.trim())));
    }
    // The VMM's own phases, moved onto the spawn clock.
    let start = log_us(&o.stderr, "VMM start: monotonic ")
        .map(|t| t.saturating_sub(o.spawn_mono_us) as f64 / 1000.0);
    let after_start =
        |key: &str| start.and_then(|s| log_us(&o.stderr, key).map(|us| s + us as f64 / 1000.0));
    Ok(Sample {
        phases: [
            start,
            after_start("boot phase vcpus started: "),
            o.first_output.map(ms),
            after_start("Guest-boot-time = "),
            o.ready.map(ms),
            Some(ms(o.exit)),
        ],
        cpu_ms: o.cpu_ms,
        peak_rss_mib: o.peak_rss_mib,
        overhead_mib: log_us(&o.stderr, "VMM overhead ").map(|k| k as f64 / 1024.0),
    })
}

/// The host's AF_VSOCK listener on port 1024, bound once for all QEMU runs:
/// a closed connection keeps the port bound for a while (vsock's close
/// timeout), so binding per run fails with EADDRINUSE.
type VsockReady = Option<std::os::fd::OwnedFd>;

fn peer_run(
    b: &BootBench,
    peer: &Peer,
    run: usize,
    vsock: &mut VsockReady,
) -> Result<Sample, BenchError> {
    let fail = |reason: String| BenchError::Run {
        run,
        vmm: peer.name().into(),
        reason,
    };
    let mut scratch = None;
    let mut listener = None;
    let cmd = match (peer, &b.guest) {
        (Peer::Qemu(bin), guest) => {
            let mut c = Command::new(bin);
            // ACPI as the guest's command line asks: a stock kernel finds
            // its devices in the tables (QEMU's, ours), a minimal one on
            // the command line.
            let acpi = match guest {
                Guest::Linux { cmdline, .. } if !cmdline.contains("acpi=off") => "on",
                _ => "off",
            };
            c.args(["-accel", "kvm", "-M", &format!("microvm,acpi={acpi}")])
                // IA32_ARCH_CAPABILITIES cannot be set on some hosts (PVM)
                .args(["-cpu", "host,-arch-capabilities"])
                .args(["-m", &b.memory_mib.to_string()])
                .args(["-smp", &b.vcpus.to_string()])
                .args(["-nodefaults", "-no-user-config", "-nographic"])
                .args(["-serial", "stdio", "-device", "i8042", "-no-reboot"]);
            match guest {
                Guest::Probe(elf) => {
                    c.arg("-kernel")
                        .arg(elf)
                        .args(["-append", "probe=timer,reset"]);
                }
                Guest::Linux {
                    kernel,
                    initrd,
                    rootfs,
                    cmdline,
                } => {
                    if let Some(initrd) = initrd {
                        c.arg("-initrd").arg(initrd);
                    }
                    // The same kernel (PVH entry) and root filesystem on
                    // virtio-mmio, and vhost-vsock: the guest reports ready
                    // to the host's AF_VSOCK port 1024.
                    if vsock.is_none() {
                        *vsock = Some(vsock_listen(1024).map_err(|e| {
                            fail(format!(
                                "listen on AF_VSOCK port 1024 for the guest's readiness: {e} \
                                 (QEMU's vsock needs vhost_vsock: modprobe vhost_vsock)"
                            ))
                        })?);
                    }
                    let fd = vsock
                        .as_ref()
                        .map(|fd| fd.try_clone())
                        .transpose()
                        .map_err(io("duplicate the vsock listener"))?;
                    listener = fd.map(ReadyListener::Vsock);
                    c.arg("-kernel")
                        .arg(kernel)
                        .args(["-append", cmdline])
                        .arg("-drive")
                        .arg(format!(
                            "id=root,file={},format=raw,if=none,readonly=on",
                            rootfs.display()
                        ))
                        .args(["-device", "virtio-blk-device,drive=root"])
                        .args(["-device", "vhost-vsock-device,guest-cid=3"]);
                }
            }
            c
        }
        (Peer::Firecracker(_), Guest::Linux { .. }) => {
            return Err(fail(
                "firecracker is compared on the probe guest only".into(),
            ));
        }
        (Peer::Firecracker(bin), Guest::Probe(kernel)) => {
            let dir = scratch_dir()?;
            let cfg = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": kernel,
                    "boot_args": "probe=timer,reset",
                },
                "drives": [],
                "machine-config": {
                    "vcpu_count": b.vcpus,
                    "mem_size_mib": b.memory_mib,
                },
            });
            let path = dir.join("config.json");
            std::fs::write(&path, cfg.to_string()).map_err(io("write the firecracker config"))?;
            let mut c = Command::new(bin);
            c.args(["--no-api", "--boot-timer", "--config-file"])
                .arg(&path);
            scratch = Some(dir);
            c
        }
    };
    let linux = listener.is_some();
    let o = observe(cmd, listener, linux, Duration::from_secs(120)).map_err(fail)?;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    if !o.success {
        return Err(fail(format!("exit failure: {}", o.stderr.trim())));
    }
    Ok(Sample {
        phases: [
            None,
            None,
            o.first_output.map(ms),
            None,
            o.ready.map(ms),
            Some(ms(o.exit)),
        ],
        cpu_ms: o.cpu_ms,
        peak_rss_mib: o.peak_rss_mib,
        overhead_mib: None,
    })
}

/// The results of a benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Host description.
    pub host: String,
    /// Runs per VMM.
    pub runs: usize,
    /// "probe" or the kernel path.
    pub guest: String,
    /// keystone-vmm.
    pub keystone: Summary,
    /// The peer, if any.
    pub peer: Option<Summary>,
    /// keystone median / peer median per phase both measured.
    pub ratio: BTreeMap<String, f64>,
}

/// Run the benchmark: keystone and the peer alternate (A B A B) so a noisy
/// machine affects both alike.
pub fn run(b: &BootBench) -> Result<Report, BenchError> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut vsock: VsockReady = None;
    for i in 0..b.runs {
        let s = keystone_run(b, i)?;
        if b.progress {
            eprint!(
                "\r[{}/{}] keystone-vmm: first output {:.2} ms, exit {:.2} ms   ",
                i + 1,
                b.runs,
                s.phases[2].unwrap_or(f64::NAN),
                s.phases[5].unwrap_or(f64::NAN)
            );
        }
        ours.push(s);
        if let Some(peer) = &b.against {
            let s = peer_run(b, peer, i, &mut vsock)?;
            if b.progress {
                eprint!(
                    "\r[{}/{}] {}: first output {:.2} ms, exit {:.2} ms   ",
                    i + 1,
                    b.runs,
                    peer.name(),
                    s.phases[2].unwrap_or(f64::NAN),
                    s.phases[5].unwrap_or(f64::NAN)
                );
            }
            theirs.push(s);
        }
    }
    if b.progress {
        eprintln!();
    }
    let keystone = summarize("keystone-vmm", &ours);
    let peer = b.against.as_ref().map(|p| summarize(p.name(), &theirs));
    let mut ratio = BTreeMap::new();
    if let Some(p) = &peer {
        for (name, ph) in &keystone.phases {
            if let Some(other) = p.phases.get(name) {
                if other.stats.median > 0.0 {
                    ratio.insert(name.clone(), ph.stats.median / other.stats.median);
                }
            }
        }
    }
    Ok(Report {
        host: host_description(),
        runs: b.runs,
        guest: match &b.guest {
            Guest::Probe(_) => "probe".into(),
            Guest::Linux { kernel, .. } => kernel.display().to_string(),
        },
        keystone,
        peer,
        ratio,
    })
}

/// CPU model, core count and KVM flavor.
pub fn host_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kvm = match keystone_vmm::host::KvmFlavor::detect() {
        keystone_vmm::host::KvmFlavor::Hardware => "KVM (vmx/svm)",
        keystone_vmm::host::KvmFlavor::Pvm => "KVM (PVM)",
        keystone_vmm::host::KvmFlavor::Unknown => "KVM (no vmx/svm)",
    };
    format!("{cpu}, {cores} cores, {kvm}")
}

const ROWS: [(&str, &str); 9] = [
    ("vmm_start", "spawn -> VMM start (ms)"),
    ("vm_ready", "spawn -> KVM VM ready (ms)"),
    ("first_output", "spawn -> first guest output (ms)"),
    ("boot_timer", "spawn -> boot-timer write (ms)"),
    ("ready", "spawn -> ready over vsock (ms)"),
    ("exit", "spawn -> VMM exit (ms)"),
    ("cpu_ms", "VMM CPU time (ms)"),
    ("peak_rss_mib", "peak RSS (MiB)"),
    ("overhead_mib", "VMM overhead (MiB)"),
];

/// The report as a Markdown table.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "keystone bench boot: {} guest, {} runs\nhost: {}\n\n",
        r.guest, r.runs, r.host
    );
    let peer = r.peer.as_ref().map(|p| p.vmm.clone());
    s.push_str("| phase | min | median | p90 | max |");
    if let Some(p) = &peer {
        s.push_str(&format!(" {p} median | ratio |"));
    }
    s.push_str("\n|---|---|---|---|---|");
    if peer.is_some() {
        s.push_str("---|---|");
    }
    s.push('\n');
    for (key, label) in ROWS {
        let Some(ph) = r.keystone.phases.get(key) else {
            continue;
        };
        let st = ph.stats;
        s.push_str(&format!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} |",
            st.min, st.median, st.p90, st.max
        ));
        if let Some(p) = &r.peer {
            match (p.phases.get(key), r.ratio.get(key)) {
                (Some(o), Some(ratio)) => {
                    s.push_str(&format!(" {:.2} | {ratio:.2} |", o.stats.median))
                }
                _ => s.push_str(" | |"),
            }
        }
        s.push('\n');
    }
    s
}

/// A strip plot of every phase's samples (SVG): one row per phase, a dot
/// per run, a bar at the median; the peer's samples below ours in orange.
pub fn svg(r: &Report) -> String {
    let rows: Vec<(&str, &str)> = ROWS[..6]
        .iter()
        .copied()
        .filter(|(k, _)| r.keystone.phases.contains_key(*k))
        .collect();
    let max = rows
        .iter()
        .flat_map(|(k, _)| {
            let mut v: Vec<f64> = r.keystone.phases[*k].samples.clone();
            if let Some(p) = r.peer.as_ref().and_then(|p| p.phases.get(*k)) {
                v.extend(&p.samples);
            }
            v
        })
        .fold(1.0f64, f64::max);
    let (left, width, row_h) = (260.0, 560.0, 44.0);
    let height = 60.0 + row_h * rows.len() as f64 + 30.0;
    let x = |v: f64| left + v / max * width;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        left + width + 40.0
    );
    s.push_str(&format!(
        "<text x=\"10\" y=\"20\" font-size=\"14\">keystone bench boot: {} guest, {} runs — {}</text>\n",
        xml(&r.guest),
        r.runs,
        xml(&r.host)
    ));
    for (i, (key, label)) in rows.iter().enumerate() {
        let y = 50.0 + row_h * i as f64;
        s.push_str(&format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text>\n",
            y + 14.0,
            xml(label)
        ));
        let mut series = vec![(&r.keystone.phases[*key], "#1f77b4", 8.0)];
        if let Some(p) = r.peer.as_ref().and_then(|p| p.phases.get(*key)) {
            series.push((p, "#ff7f0e", 24.0));
        }
        for (ph, color, dy) in series {
            for v in &ph.samples {
                s.push_str(&format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\" fill-opacity=\"0.6\"/>\n",
                    x(*v),
                    y + dy
                ));
            }
            let m = x(ph.stats.median);
            s.push_str(&format!(
                "<line x1=\"{m:.1}\" x2=\"{m:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
                y + dy - 7.0,
                y + dy + 7.0
            ));
        }
    }
    let axis_y = 50.0 + row_h * rows.len() as f64 + 5.0;
    s.push_str(&format!(
        "<line x1=\"{left}\" x2=\"{}\" y1=\"{axis_y}\" y2=\"{axis_y}\" stroke=\"black\"/>\n",
        left + width
    ));
    for t in 0..=4 {
        let v = max * t as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.1} ms</text>\n",
            x(v),
            axis_y + 16.0
        ));
    }
    if let Some(p) = &r.peer {
        s.push_str(&format!(
            "<text x=\"{left}\" y=\"38\" fill=\"#1f77b4\">keystone-vmm</text><text x=\"{}\" y=\"38\" fill=\"#ff7f0e\">{}</text>\n",
            left + 120.0,
            xml(&p.vmm)
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Write `text` to `path` atomically (write then rename).
pub fn write_atomic(path: &Path, text: &str) -> Result<(), BenchError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("write {}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))
}

/// The probe guest, written once to the user's cache directory (by content
/// hash) so any keystone binary can boot it.
pub fn probe_path() -> Result<PathBuf, BenchError> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in keystone_probe::ELF {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("keystone");
    std::fs::create_dir_all(&base).map_err(io(format!("create {}", base.display())))?;
    let path = base.join(format!("probe-{h:016x}.elf"));
    if std::fs::read(&path).ok().as_deref() != Some(keystone_probe::ELF) {
        let tmp = base.join(format!("probe-{h:016x}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, keystone_probe::ELF)
            .map_err(io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_nearest_rank() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.p90, s.max), (1.0, 5.5, 9.0, 10.0));
        let one = Stats::of(&[2.0]).unwrap();
        assert_eq!(
            (one.min, one.median, one.p90, one.max),
            (2.0, 2.0, 2.0, 2.0)
        );
        assert!(Stats::of(&[]).is_none());
    }

    fn report() -> Report {
        let sample = |k: f64| Sample {
            phases: [
                Some(0.5 * k),
                Some(1.0 * k),
                Some(2.0 * k),
                Some(3.0 * k),
                None,
                Some(9.0 * k),
            ],
            cpu_ms: 4.0,
            peak_rss_mib: 3.0,
            overhead_mib: Some(2.5),
        };
        let ours: Vec<Sample> = (1..=4).map(|i| sample(1.0 + i as f64 / 10.0)).collect();
        let theirs: Vec<Sample> = (1..=4)
            .map(|i| Sample {
                phases: [None, None, Some(20.0 + i as f64), None, None, Some(40.0)],
                cpu_ms: 30.0,
                peak_rss_mib: 60.0,
                overhead_mib: None,
            })
            .collect();
        let keystone = summarize("keystone-vmm", &ours);
        let peer = summarize("qemu", &theirs);
        let mut ratio = BTreeMap::new();
        ratio.insert(
            "first_output".to_string(),
            keystone.phases["first_output"].stats.median / peer.phases["first_output"].stats.median,
        );
        Report {
            host: "test <host>".into(),
            runs: 4,
            guest: "probe".into(),
            keystone,
            peer: Some(peer),
            ratio,
        }
    }

    #[test]
    fn summary_skips_unmeasured_phases_and_table_shows_ratios() {
        let r = report();
        assert!(!r.keystone.phases.contains_key("ready"));
        assert_eq!(r.keystone.phases["exit"].samples.len(), 4);
        let t = table(&r);
        assert!(t.contains("| spawn -> first guest output (ms) |"), "{t}");
        assert!(t.contains("qemu median | ratio |"), "{t}");
        assert!(!t.contains("ready over vsock"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["keystone"]["phases"]["boot_timer"]["stats"]["median"].is_number());
        assert!(json["ratio"]["first_output"].as_f64().unwrap() < 1.0);
    }

    #[test]
    fn svg_is_well_formed_and_escaped() {
        let s = svg(&report());
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("test &lt;host&gt;"));
        // 5 phases measured × 4 runs for ours, 2 × 4 for the peer.
        assert_eq!(s.matches("<circle").count(), 5 * 4 + 2 * 4);
    }

    #[test]
    fn probe_is_cached_by_content() {
        let dir = std::env::temp_dir().join(format!("ks-probe-cache-{}", std::process::id()));
        std::env::set_var("XDG_CACHE_HOME", &dir);
        let p = probe_path().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), keystone_probe::ELF);
        assert_eq!(probe_path().unwrap(), p);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
