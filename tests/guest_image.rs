//! The Debian guest image: built with `keystone image build` (cached by
//! content hash on this machine), checked without booting, then booted for
//! real on keystone-vmm — which needs hardware KVM: on this project's PVM
//! machines the boot test runs in the nested real-KVM lane
//! (`tests/lane/suites`).

#[path = "common/guest.rs"]
mod guest;

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keystone_cli::agent::ssh::{self, Target, UserKey};
use keystone_cli::agent::supervisor;
use keystone_cli::image::{Image, KernelVariant};

fn keystone() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_keystone"))
}

fn image() -> &'static Image {
    static IMG: OnceLock<Image> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = guest::debian_image(keystone());
        Image::load(&dir).unwrap_or_else(|e| panic!("image manifest: {e}"))
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ks-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Read-only loop mount of the base image, unmounted on drop.
struct Mounted {
    dir: PathBuf,
    run_tmpfs: bool,
}

impl Mounted {
    fn new(img: &Path, dir: PathBuf) -> Mounted {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "inspecting the image mounts it (loop, read-only) and chroots: run the tests as root"
        );
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, out) = run(Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(img)
            .arg(&dir));
        assert!(ok, "mount -o loop,ro {}: {out}", img.display());
        Mounted {
            dir,
            run_tmpfs: false,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.run_tmpfs {
            let _ = Command::new("umount").arg(self.dir.join("run")).status();
        }
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

#[test]
fn debian_image_builds_once_and_is_sound_without_booting() {
    let img = image();
    let m = &img.manifest;
    assert_eq!(m.builder, "debian");
    assert_eq!(m.content_hash.len(), 64);
    assert!(
        img.dir.ends_with(&m.content_hash),
        "cache dir named by hash"
    );
    assert!(m.ssh && !m.pvm_capable);
    assert!(
        m.cmdline.contains("init=/usr/lib/keystone/init"),
        "{}",
        m.cmdline
    );
    for k in [
        "kernel",
        "debian",
        "systemd",
        "openssh-server",
        "git",
        "python3",
    ] {
        assert!(
            m.versions.contains_key(k),
            "manifest lacks version of {k}: {:?}",
            m.versions
        );
    }

    // A second build is a cache hit: same directory, no rebuild.
    let t = Instant::now();
    let again = guest::debian_image(keystone());
    assert_eq!(again, img.dir);
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "cache hit took {:?}",
        t.elapsed()
    );

    let rootfs = img.rootfs().expect("debian image has a rootfs");
    let (ok, out) = run(Command::new("e2fsck").arg("-fn").arg(&rootfs));
    assert!(ok, "e2fsck -fn {}: {out}", rootfs.display());

    let config = std::fs::read_to_string(img.dir.join("kernel.config")).unwrap();
    let has = |opt: &str, v: &str| config.contains(&format!("\nCONFIG_{opt}={v}\n"));
    if m.kernel_variant == Some(KernelVariant::Stock) {
        // Debian's own kernel: no command-line virtio devices (the reason
        // for the VMM's ACPI tables), modules from the initramfs.
        assert!(has("ACPI", "y") && has("SERIAL_8250_CONSOLE", "y"));
        assert!(!has("VIRTIO_MMIO_CMDLINE_DEVICES", "y"));
        for opt in [
            "VIRTIO_MMIO",
            "VIRTIO_BLK",
            "VIRTIO_NET",
            "VIRTIO_VSOCKETS",
            "OVERLAY_FS",
        ] {
            assert!(has(opt, "m") || has(opt, "y"), "CONFIG_{opt} missing");
        }
        let initrd = img.initrd().expect("the stock image has an initrd");
        let size = std::fs::metadata(&initrd).unwrap().len();
        assert!(size > 1 << 20, "initrd of {size} bytes");
        assert!(m.versions.contains_key("linux-image"), "{:?}", m.versions);
        assert!(!m.cmdline.contains("acpi=off"), "{}", m.cmdline);
    }
    for opt in [
        "VIRTIO_MMIO",
        "VIRTIO_MMIO_CMDLINE_DEVICES",
        "VIRTIO_BLK",
        "VIRTIO_NET",
        "VIRTIO_VSOCKETS",
        "VSOCKETS",
        "EXT4_FS",
        "OVERLAY_FS",
        "SERIAL_8250_CONSOLE",
        "PVH",
        "KVM_GUEST",
        "CGROUPS",
        "DEVMEM",
    ]
    .into_iter()
    .filter(|_| m.kernel_variant == Some(KernelVariant::Minimal))
    {
        assert!(has(opt, "y"), "CONFIG_{opt}=y missing");
    }
    if m.kernel_variant == Some(KernelVariant::Minimal) {
        assert!(!has("MODULES", "y"), "no modules: everything built in");
    }

    let mut mnt = Mounted::new(&rootfs, temp_dir("img-mnt"));
    let root = mnt.dir.clone();
    // Per-sandbox identity is never baked into the shared base.
    let ssh_dir: Vec<_> = std::fs::read_dir(root.join("etc/ssh"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !ssh_dir.iter().any(|n| n.starts_with("ssh_host_")),
        "host keys in base: {ssh_dir:?}"
    );
    assert_eq!(std::fs::read(root.join("etc/machine-id")).unwrap(), b"");

    // Units enabled.
    for link in [
        "sockets.target.wants/keystone-sshd.socket",
        "multi-user.target.wants/keystone-ready.service",
        "sysinit.target.wants/keystone-setup.service",
    ] {
        let p = root.join("etc/systemd/system").join(link);
        assert!(p.symlink_metadata().is_ok(), "{link} not enabled");
    }
    let socket =
        std::fs::read_to_string(root.join("etc/systemd/system/keystone-sshd.socket")).unwrap();
    assert!(socket.contains("ListenStream=vsock::22") && socket.contains("Accept=yes"));
    let getty = root.join("etc/systemd/system/serial-getty@.service.d/keystone.conf");
    assert!(
        std::fs::read_to_string(getty)
            .unwrap()
            .contains("ConditionKernelCommandLine=keystone.debug"),
        "serial console login must be off unless keystone.debug"
    );

    // Inside a chroot: sshd accepts the config, git and python run, the
    // sandbox user exists with its sudo rule.
    let (ok, out) = run(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(root.join("run")));
    assert!(ok, "{out}");
    mnt.run_tmpfs = true;
    std::fs::create_dir_all(root.join("run/sshd")).unwrap();
    let (ok, out) = run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(root.join("run/hostkey")));
    assert!(ok, "{out}");
    let chroot = |args: &[&str]| {
        run(Command::new("chroot")
            .arg(&root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    };
    let (ok, out) = chroot(&["/usr/sbin/sshd", "-t", "-h", "/run/hostkey"]);
    assert!(ok, "sshd -t: {out}");
    let (ok, out) = chroot(&[
        "/usr/sbin/sshd",
        "-T",
        "-h",
        "/run/hostkey",
        "-C",
        "user=sandbox,host=h,addr=1.2.3.4",
    ]);
    assert!(ok, "sshd -T: {out}");
    for want in [
        "passwordauthentication no",
        "permitrootlogin no",
        "authorizedkeysfile /run/keystone/authorized_keys",
        "allowusers sandbox",
    ] {
        assert!(out.contains(want), "sshd effective config lacks '{want}'");
    }
    let (ok, out) = chroot(&["git", "--version"]);
    assert!(ok && out.starts_with("git version"), "{out}");
    let (ok, out) = chroot(&["python3", "-c", "print(6*7)"]);
    assert!(ok && out.trim() == "42", "{out}");
    let (ok, out) = chroot(&["id", "sandbox"]);
    assert!(ok && out.contains("uid=1000(sandbox)"), "{out}");
    let (ok, out) = chroot(&["visudo", "-c"]);
    assert!(ok, "visudo -c: {out}");
    let rule = std::fs::read_to_string(root.join("etc/sudoers.d/keystone")).unwrap();
    assert!(rule.contains("sandbox ALL=(ALL) NOPASSWD: ALL"), "{rule}");
    for tool in ["vim", "curl", "wget", "htop", "sudo"] {
        let (ok, out) = chroot(&["sh", "-c", &format!("command -v {tool}")]);
        assert!(ok, "{tool} missing: {out}");
    }
    drop(mnt);
}

/// One boot of the image on keystone-vmm, with readiness listener.
struct Boot {
    child: Child,
    console: PathBuf,
    log: PathBuf,
    host_keys: Vec<String>,
}

impl Boot {
    fn start(
        img: &Image,
        dir: &Path,
        disk: &Path,
        key: &UserKey,
        tag: &str,
        extra: &[&Path],
    ) -> Boot {
        let uds = dir.join("v.sock");
        let _ = std::fs::remove_file(&uds);
        let ready_path = PathBuf::from(format!("{}_1024", uds.display()));
        let _ = std::fs::remove_file(&ready_path);
        let listener = UnixListener::bind(&ready_path).unwrap();
        let console = dir.join(format!("console-{tag}.log"));
        let log = dir.join(format!("vmm-{tag}.log"));
        let cmdline = format!(
            "{} keystone.name=imgtest {}",
            img.manifest.cmdline,
            ssh::authorized_key_param(key)
        );
        let mut child = Command::new(guest::vmm_binary())
            .process_group(0)
            .arg("--boot-timer")
            .arg("--kernel")
            .arg(img.kernel())
            .args(
                img.initrd()
                    .map(|i| vec!["--initrd".into(), i.into_os_string()])
                    .unwrap_or_default(),
            )
            .arg("--cmdline")
            .arg(cmdline)
            .args(["--memory", "1024", "--vcpus", &guest::test_vcpus()])
            .arg("--disk")
            .arg(format!("{},ro", img.rootfs().unwrap().display()))
            .arg("--disk")
            .arg(disk)
            .arg("--vsock")
            .arg(format!("3,{}", uds.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let msg = guest::accept_ready(&listener, Duration::from_secs(300), || {
            matches!(child.try_wait(), Ok(None))
        });
        eprintln!("boot {tag}: ready after {:.1} s", t.elapsed().as_secs_f64());
        let host_keys: Vec<String> = supervisor::read_ready(msg.as_bytes())
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(&console).unwrap_or_default();
                panic!("readiness message '{msg}': {e}\nconsole:\n{log}")
            })
            .iter()
            .map(|k| format!("{} {}", k.kind, k.base64))
            .collect();
        assert!(!host_keys.is_empty(), "the guest reported no host key");
        Boot {
            child,
            console,
            log,
            host_keys,
        }
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > within {
                let _ = self.child.kill();
                let log = std::fs::read_to_string(&self.console).unwrap_or_default();
                panic!(
                    "the VM did not end within {within:?}; console tail:\n{}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        // The whole process group (keystone-vmm and its passt, if any).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our child's process group; no memory involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn ssh_ok(t: &Target, key: &UserKey, cmd: &str) -> String {
    let (st, out) = ssh::capture(t, key, cmd).unwrap();
    assert!(
        st.success(),
        "ssh '{cmd}' failed ({st}): {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
#[ignore = "lane: boots Linux on keystone-vmm, needs hardware KVM (tests/lane/suites)"]
fn debian_image_boots_logs_in_over_vsock_and_persists() {
    guest::require_hardware_kvm();
    let img = image();
    let dir = temp_dir("img-boot");
    let key = ssh::user_key(&dir.join("home"), &dir.join("keys")).unwrap();
    let ws = dir.join("ws");
    guest::git_repo(&ws);
    let disk = dir.join("disk.ext4");
    guest::data_disk(&disk, &ws);
    std::env::set_var("KEYSTONE_CLI", keystone());

    let mut boot = Boot::start(img, &dir, &disk, &key, "first", &[]);
    // The image's init wrote Firecracker's boot timer on our device.
    let log = std::fs::read_to_string(&boot.log).unwrap();
    assert!(
        log.contains("Guest-boot-time = "),
        "no boot-timer write: {log}"
    );
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("host_keys"), boot.host_keys.join("\n") + "\n").unwrap();
    let t = Target {
        name: "imgtest".into(),
        uds: dir.join("v.sock"),
        state_dir: state.clone(),
        forwards: Vec::new(),
    };

    // Key login as the sandbox user, host key pinned to what the image reported.
    assert_eq!(ssh_ok(&t, &key, "id -un").trim(), "sandbox");
    assert_eq!(ssh_ok(&t, &key, "hostname").trim(), "imgtest");
    assert!(ssh_ok(&t, &key, "git --version").starts_with("git version"));
    assert_eq!(ssh_ok(&t, &key, "python3 -c 'print(6*7)'").trim(), "42");
    ssh_ok(&t, &key, "sudo -n true");
    let failed = ssh_ok(
        &t,
        &key,
        "systemctl is-system-running --wait >/dev/null; systemctl --failed --no-legend --plain; systemctl is-system-running || true",
    );
    assert!(
        failed.trim() == "running",
        "failed units or a degraded system: {failed}"
    );
    assert_eq!(
        ssh_ok(&t, &key, "cd /workspace && git log --format=%s").trim(),
        "first"
    );
    assert_eq!(
        ssh_ok(&t, &key, "stat -c %U /workspace/README.md").trim(),
        "sandbox"
    );
    ssh_ok(
        &t,
        &key,
        "echo kept > /workspace/new.txt && echo home > ~/note && sudo touch /etc/keystone-test",
    );

    // A different host key is an error, never accepted.
    let good = std::fs::read_to_string(state.join("host_keys")).unwrap();
    std::fs::write(
        state.join("host_keys"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBxR0KcIaQ7v0X0o8LPr5w8KqkmwM7v0X0o8LPr5w8Kq\n",
    )
    .unwrap();
    let (st, _) = ssh::capture(&t, &key, "true").unwrap();
    assert!(
        !st.success(),
        "ssh accepted a host key other than the pinned one"
    );
    std::fs::write(state.join("host_keys"), &good).unwrap();

    // systemctl poweroff ends the VM.
    let _ = ssh::capture(&t, &key, "sudo -n systemctl poweroff");
    let st = boot.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "the VM exited with {st} after poweroff");
    let log = std::fs::read_to_string(&boot.log).unwrap();
    // The stock kernel powers off through ACPI (S5), the minimal one
    // (no ACPI) through the i8042 reset.
    let how = match img.manifest.kernel_variant {
        Some(KernelVariant::Minimal) => "VM stopped: GuestReset",
        _ => "VM stopped: GuestPowerOff",
    };
    assert!(log.contains(how), "poweroff did not end with {how}: {log}");
    drop(boot);

    // Second boot on the same disk: state survived, same host key.
    // With the control API: the snapshot below.
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let boot2 = Boot::start(
        img,
        &dir,
        &disk,
        &key,
        "second",
        &[
            Path::new("--api-sock"),
            &api,
            Path::new("--snapshot-dir"),
            &snap,
        ],
    );
    assert_eq!(
        boot2.host_keys.join("\n") + "\n",
        good,
        "host key changed across boots"
    );
    assert_eq!(
        ssh_ok(&t, &key, "cat /workspace/new.txt ~/note").trim(),
        "kept\nhome"
    );
    ssh_ok(&t, &key, "test -e /etc/keystone-test");

    // Snapshot with a process running, then restore it in a new VMM: the
    // process goes on counting, ssh works with the pinned key, files are
    // there. Paused through the snapshot and killed paused, so the disk
    // holds exactly what the snapshot's memory expects.
    ssh_ok(
        &t,
        &key,
        "echo snap > /workspace/snap.txt && sync && (setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' </dev/null >/dev/null 2>&1 &)",
    );
    std::thread::sleep(Duration::from_secs(2));
    let before: u64 = ssh_ok(&t, &key, "cat /tmp/counter").trim().parse().unwrap();
    assert!(before > 0);
    let r = api_call(&api, r#"{"op":"pause"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let r = api_call(&api, r#"{"op":"snapshot"}"#);
    assert!(r["ok"] == true && r["state"] == "paused", "{r}");
    eprintln!("snapshot: {r}");
    drop(boot2);

    let console = dir.join("console-restored.log");
    let log = dir.join("vmm-restored.log");
    let t0 = Instant::now();
    let child = Command::new(guest::vmm_binary())
        .process_group(0)
        .arg("--restore")
        .arg(&snap)
        .arg("--disk")
        .arg(format!("{},ro", img.rootfs().unwrap().display()))
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("3,{}", dir.join("v.sock").display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let restored = Boot {
        child,
        console,
        log: log.clone(),
        host_keys: Vec::new(),
    };
    // ssh over the restored vsock device (the guest got a transport reset).
    let first = loop {
        match ssh::capture(&t, &key, "cat /tmp/counter") {
            Ok((st, out)) if st.success() => break String::from_utf8_lossy(&out).into_owned(),
            _ if t0.elapsed() < Duration::from_secs(120) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!(
                "no ssh into the restored VM: {other:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    eprintln!(
        "restore: ssh answered {:.2} s after the VMM started",
        t0.elapsed().as_secs_f64()
    );
    let first: u64 = first.trim().parse().unwrap();
    assert!(first >= before, "counter went back: {before} -> {first}");
    std::thread::sleep(Duration::from_secs(2));
    let later: u64 = ssh_ok(&t, &key, "cat /tmp/counter").trim().parse().unwrap();
    assert!(
        later > first,
        "the counting process did not survive: {first} -> {later}"
    );
    assert_eq!(
        ssh_ok(&t, &key, "cat /workspace/snap.txt /workspace/new.txt").trim(),
        "snap\nkept"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("VM restored from"),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One control-API request, its reply.
fn api_call(sock: &Path, req: &str) -> serde_json::Value {
    keystone_vmm::api::request(sock, req, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("api {}: {e}", sock.display()))
}
