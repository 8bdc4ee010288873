//! A real Linux guest on keystone-vmm on a PVM host: the PVM test kernel
//! (`guest-image/kernel/build-kernel.sh --variant pvm-test`: Debian's
//! linux-source-6.1, tinyconfig + our fragments + pvm-test.patch; TEST ONLY)
//! with the PVM test init (`guest-image/pvm-init`) as `/init` of an
//! initramfs. Linux's own virtio-mmio, virtio-blk, virtio-vsock and
//! virtio-net drivers drive keystone-vmm's devices; the init writes the boot
//! timer, checksums and writes the disk, talks vsock both ways, forks and
//! reboots through the i8042. A second boot runs a static busybox shell that
//! forks and execs applets and takes a DHCP lease from passt over virtio-net.
//!
//! Slow: guest kernel code is emulated on PVM (~1 M instructions/s), a boot
//! to init takes ~35-50 s. The tests are `#[ignore]`d and run with
//! `cargo test -p keystone-vmm --test linux_pvm -- --ignored` (CI does), one
//! VM at a time. The kernel comes from the build cache
//! (`$KEYSTONE_KERNEL_CACHE`, default /var/cache/keystone/kernel); on a
//! cache miss the test builds it (~8 min on 2 cores) and fails if it cannot.
//! They need /dev/kvm and fail with a clear message without it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{require_kvm, TempDir, VmmProcess};
use keystone_pvm_init::{fnv1a64, write_pattern, Initramfs, MARKER, SECTOR_SIZE, VSOCK_GREETING};

/// keystone-vmm's default command line plus what the PVM test kernel needs
/// on this host: no XSAVE, none of the instructions KVM's emulator lacks in
/// guest kernel mode (popcnt, cmpxchg16b, SMAP's stac/clac), no page-table
/// isolation, no KASLR; and what makes it faster there: plain `mov` loops
/// instead of `rep movs/stos` for memcpy/memset/clear_page (no erms, fsrm,
/// rep_good), and a per-CPU area of 4 KiB pages instead of a 2 MiB block
/// that is zeroed first (`percpu_alloc=page`). See docs/pvm-notes.md.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off acpi=off nomodule \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
     noxsave clearcpuid=popcnt,cx16,smap,smep,erms,fsrm,rep_good nopti nokaslr \
     percpu_alloc=page";

/// Guest RAM, MiB: keystone-vmm's minimum. Boot work scales with it
/// (struct pages, freeing memory to the allocator): 512 MiB took ~20 s
/// longer here.
const MEMORY_MIB: &str = "128";

/// Boot to the init's first line (~35-45 s here; generous for a loaded CI
/// host).
const TO_INIT: Duration = Duration::from_secs(240);
/// From one init step to the next.
const STEP: Duration = Duration::from_secs(60);

/// One guest at a time: two emulated kernels on a 2-core host only make
/// both slower.
static ONE_VM: Mutex<()> = Mutex::new(());

/// The PVM test kernel's `vmlinux` (ELF: no in-guest decompression, which
/// would be emulated too), built once per test process.
/// `KEYSTONE_PVM_KERNEL=PATH` boots that kernel instead (while working on
/// pvm-test.patch in a kernel tree of your own).
fn pvm_kernel() -> PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            if let Some(k) = std::env::var_os("KEYSTONE_PVM_KERNEL") {
                let k = PathBuf::from(k);
                assert!(
                    k.is_file(),
                    "KEYSTONE_PVM_KERNEL={} is not a file",
                    k.display()
                );
                eprintln!("linux_pvm: kernel {} (KEYSTONE_PVM_KERNEL)", k.display());
                return k;
            }
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-image/kernel/build-kernel.sh");
            let cache = std::env::var_os("KEYSTONE_KERNEL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/keystone/kernel"));
            let started = Instant::now();
            // stderr is inherited: a cache miss shows the build's progress.
            let out = std::process::Command::new(&script)
                .args(["--variant", "pvm-test"])
                .arg(&cache)
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "the PVM test kernel could not be built ({}): {} --variant pvm-test {} failed; \
                 it needs linux-source-6.1 flex bison bc libelf-dev libssl-dev (see its header)",
                out.status,
                script.display(),
                cache.display()
            );
            let dir = String::from_utf8_lossy(&out.stdout);
            let dir = PathBuf::from(dir.lines().last().unwrap_or_default().trim());
            let vmlinux = dir.join("vmlinux");
            assert!(
                vmlinux.is_file(),
                "build-kernel.sh printed {} but it holds no vmlinux",
                dir.display()
            );
            eprintln!(
                "linux_pvm: kernel {} (ready in {:.1} s)",
                vmlinux.display(),
                started.elapsed().as_secs_f64()
            );
            vmlinux
        })
        .clone()
}

/// A booted PVM test guest.
struct Guest {
    vm: VmmProcess,
    started: Instant,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Guest {
    /// Boots the PVM test kernel with `initramfs`, the init's `pvminit.*`
    /// parameters and extra keystone-vmm arguments, in `dir`.
    fn boot(dir: &TempDir, initramfs: &Initramfs, params: &str, extra: &[&str]) -> Self {
        require_kvm();
        let lock = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = pvm_kernel();
        let initrd = dir.0.join("initramfs.cpio");
        std::fs::write(&initrd, initramfs.finish()).unwrap();
        let cmdline = format!("{CMDLINE} {params}");
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--boot-timer",
            "--memory",
            MEMORY_MIB,
        ];
        args.extend_from_slice(extra);
        let started = Instant::now();
        let vm = VmmProcess::spawn(&args);
        Guest {
            vm,
            started,
            _lock: lock,
        }
    }

    /// Waits for `needle` on the console, with the guest's output on timeout.
    fn wait(&mut self, needle: &str, timeout: Duration) -> Duration {
        self.vm.wait_stdout(needle, timeout);
        self.started.elapsed()
    }

    /// Waits for the VMM to exit and checks it was the init's clean reboot.
    fn wait_reboot(&mut self) -> (String, String) {
        let st = self.vm.wait_exit(STEP);
        let (out, log) = (self.vm.stdout(), self.vm.stderr());
        // The init's lines and the drivers' boot lines, for the CI log.
        for l in out.lines().filter(|l| {
            l.starts_with("pvm-init: ")
                || l.starts_with("bb: ")
                || l.starts_with("udhcpc: ")
                || (l.contains("virtio") && !l.contains("ommand line"))
                || l.contains("Run /init")
                || l.contains("PF_VSOCK")
        }) {
            eprintln!("  | {}", l.trim_end());
        }
        assert!(
            st.success(),
            "keystone-vmm exit {st}\n--- serial ---\n{out}\n--- log ---\n{log}"
        );
        assert!(out.contains("pvm-init: rebooting"), "{out}");
        assert!(!out.contains("Kernel panic"), "{out}");
        assert!(!out.contains("pvm-init: FAIL"), "{out}");
        assert!(
            log.contains("guest requested a reset through the i8042"),
            "{log}"
        );
        (out, log)
    }
}

/// The `Guest-boot-time = N us` keystone-vmm logged, in microseconds.
fn guest_boot_time_us(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("Guest-boot-time = "))
        .unwrap_or_else(|| panic!("no Guest-boot-time line in:\n{log}"));
    line.split("Guest-boot-time = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"))
}

/// The rest of the console line that starts with `prefix`.
fn line_value<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}

/// Deterministic, non-repeating disk contents for the first `sectors`.
fn disk_image(path: &Path, bytes: u64, sectors: usize) -> Vec<u8> {
    let mut head = vec![0u8; sectors * SECTOR_SIZE];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in head.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    f.write_all_at(&head, 0).unwrap();
    head
}

fn read_sector(path: &Path, n: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; SECTOR_SIZE];
    f.read_exact_at(&mut buf, n * SECTOR_SIZE as u64).unwrap();
    buf
}

const HOST_REPLY: &str = "hello from the host listener\n";
const HOST_LINE: &str = "ping from the host over CONNECT\n";

#[test]
#[ignore = "slow: boots Linux under PVM, ~1 min; run with --ignored (CI does)"]
fn linux_drives_blk_and_vsock_writes_the_boot_timer_and_reboots() {
    let dir = TempDir::new("linux-pvm");
    let img = dir.0.join("disk.img");
    const SECTORS: usize = 8;
    const WRITE_SECTOR: u64 = 100;
    const DISK_BYTES: u64 = 4 << 20;
    let disk_sectors = DISK_BYTES / SECTOR_SIZE as u64;
    let head = disk_image(&img, DISK_BYTES, SECTORS);
    let uds = dir.0.join("v.sock");

    // Guest-initiated vsock: the init connects to CID 2 port 5000, which
    // keystone-vmm bridges to `<uds>_5000`.
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let host_listener = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        s.write_all(HOST_REPLY.as_bytes()).unwrap();
        line
    });

    let params = format!(
        "pvminit.steps=timer,virtio,disk,write,vsock,listen,fork,reboot \
         pvminit.sectors={SECTORS} pvminit.write_sector={WRITE_SECTOR} \
         pvminit.vsock_port=5000 pvminit.listen_port=6000"
    );
    let vsock = format!("3,{}", uds.display());
    let mut g = Guest::boot(
        &dir,
        &Initramfs::new(),
        &params,
        &["--disk", img.to_str().unwrap(), "--vsock", &vsock],
    );

    let to_marker = g.wait(MARKER, TO_INIT);
    // Host-initiated vsock: CONNECT to the init's listener.
    g.wait("pvm-init: vsock listening port=6000", STEP * 3);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ack = String::new();
    r.read_line(&mut ack).unwrap();
    assert!(ack.starts_with("OK "), "CONNECT 6000 answered {ack:?}");
    s.write_all(HOST_LINE.as_bytes()).unwrap();
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, HOST_LINE, "the guest's echo");
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);

    let (out, log) = g.wait_reboot();
    let total = g.started.elapsed();

    // Boot timer and marker.
    let boot_us = guest_boot_time_us(&log);
    assert!(out.contains("pvm-init: boot-timer written"), "{out}");
    assert!(
        boot_us > 1_000_000 && boot_us < total.as_micros() as u64,
        "implausible Guest-boot-time {boot_us} us for a {total:?} run"
    );

    // Linux's own drivers probed keystone-vmm's devices.
    let blk_line = format!("virtio_blk virtio0: [vda] {disk_sectors} 512-byte logical blocks");
    for want in [
        "virtio-mmio: Registering device virtio-mmio.0 at 0xc0001000-0xc0001fff, IRQ 5.",
        "virtio-mmio: Registering device virtio-mmio.1 at 0xc0002000-0xc0002fff, IRQ 6.",
        &blk_line,
        "NET: Registered PF_VSOCK protocol family",
        "pvm-init: virtio0 device=0x0002 driver=virtio_blk",
        "pvm-init: virtio1 device=0x0013 driver=vmw_vsock_virtio_transport",
        "pvm-init: virtio devices=2",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }

    // The disk: Linux read what the host wrote, and wrote where asked.
    let want = format!(
        "size={disk_sectors} read={} fnv1a64={:#018x}",
        head.len(),
        fnv1a64(&head)
    );
    assert_eq!(line_value(&out, "pvm-init: disk vda "), want, "{out}");
    assert!(
        out.contains(&format!(
            "pvm-init: disk wrote sector={WRITE_SECTOR} fsync ok"
        )),
        "{out}"
    );
    assert_eq!(
        read_sector(&img, WRITE_SECTOR),
        write_pattern(WRITE_SECTOR).to_vec(),
        "sector {WRITE_SECTOR} after the guest's write and fsync"
    );
    for s in [WRITE_SECTOR - 1, WRITE_SECTOR + 1] {
        assert!(
            read_sector(&img, s).iter().all(|&b| b == 0),
            "sector {s} touched"
        );
    }

    // vsock, both directions.
    assert_eq!(host_listener.join().unwrap(), VSOCK_GREETING);
    assert_eq!(
        line_value(&out, "pvm-init: vsock reply: "),
        HOST_REPLY.trim_end()
    );
    assert_eq!(
        line_value(&out, "pvm-init: vsock served: "),
        HOST_LINE.trim_end()
    );

    // fork, exit, wait4.
    assert!(out.contains("pvm-init: fork child running"), "{out}");
    assert!(out.contains(" exit=7"), "{out}");

    eprintln!(
        "linux_pvm: marker after {:.1} s, Guest-boot-time {:.1} s, reboot after {:.1} s",
        to_marker.as_secs_f64(),
        boot_us as f64 / 1e6,
        total.as_secs_f64()
    );
}

/// What the busybox shell runs in the `--net user` boot.
const BUSYBOX_SCRIPT: &str = "\
echo \"bb: shell pid $$\"
ls /
echo \"bb: ls exit $?\"
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 5 -T 2 -s /bin/true
echo \"bb: udhcpc exit $?\"
";

#[test]
#[ignore = "slow: boots Linux under PVM, ~1 min; run with --ignored (CI does)"]
fn linux_virtio_net_takes_a_dhcp_lease_from_passt_in_a_busybox_shell() {
    let busybox_path = Path::new("/bin/busybox");
    let busybox = std::fs::read(busybox_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: this test runs a static busybox in the guest \
             (Debian: apt-get install busybox-static)",
            busybox_path.display()
        )
    });
    let dir = TempDir::new("linux-pvm-net");
    let mut fs = Initramfs::new();
    fs.file("bin/busybox", 0o755, &busybox).file(
        "etc/pvm-test.sh",
        0o644,
        BUSYBOX_SCRIPT.as_bytes(),
    );
    for applet in ["sh", "ls", "ip", "udhcpc", "true"] {
        fs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut g = Guest::boot(
        &dir,
        &fs,
        "pvminit.steps=virtio,net,exec,reboot pvminit.exec=/bin/sh,/etc/pvm-test.sh",
        &["--net", "user"],
    );
    let to_marker = g.wait(MARKER, TO_INIT);
    let to_shell = g.wait("bb: shell pid", STEP);
    let (out, _) = g.wait_reboot();
    let total = g.started.elapsed();
    for want in [
        "virtio-mmio: Registering device virtio-mmio.0 at 0xc0001000-0xc0001fff, IRQ 5.",
        "pvm-init: virtio0 device=0x0001 driver=virtio_net",
        "pvm-init: netdev eth0 address=",
        // fork + execve of a static glibc binary, a shell forking `ls`.
        "bb: ls exit 0",
        // DHCP through Linux's virtio-net driver, keystone-vmm and passt.
        "udhcpc: lease of ",
        "bb: udhcpc exit 0",
        "pvm-init: exec exited status=0 signal=0",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    eprintln!(
        "linux_pvm (net, busybox): marker after {:.1} s, shell after {:.1} s, reboot after {:.1} s",
        to_marker.as_secs_f64(),
        to_shell.as_secs_f64(),
        total.as_secs_f64()
    );
}
