//! `keystone-vmm --jail` (run as root): the VMM runs as PID 1 of its own
//! PID namespace, in new mount/IPC/UTS/network namespaces, pivoted into an
//! empty read-only root holding only the vsock socket's directory, with no
//! capabilities, as uid/gid 65534, with no_new_privs and seccomp — and the
//! guest's disk and vsock still work.
//!
//! Needs /dev/kvm and root; fails with a clear message without them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::{TempDir, VmmProcess};

const BOOT: Duration = Duration::from_secs(60);

fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the jail tests must run as root");
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn jailed_child(supervisor: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the supervisor has the jailed VMM as its child")
}

/// A host listener for guest vsock port 5000 of the VMM socket `uds`,
/// open to any user (the jailed VMM is not root): it echoes one line and
/// returns it.
fn echo_line_server(uds: &std::path::Path) -> std::thread::JoinHandle<String> {
    let listen_path = format!("{}_5000", uds.display());
    let listener = UnixListener::bind(&listen_path).unwrap();
    std::fs::set_permissions(&listen_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(line.as_bytes()).unwrap();
        line
    })
}

#[test]
fn the_jailed_vmm_is_confined() {
    require_root();
    let dir = TempDir::new("jail");
    let img = dir.0.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let uds = dir.0.join("v.sock");
    let vsock = format!("3,{}", uds.display());
    let mut vm = VmmProcess::probe(
        "probe=spin",
        &["--jail", "--disk", img.to_str().unwrap(), "--vsock", &vsock],
    );
    vm.wait_stdout("probe: spinning", BOOT);
    let pid = jailed_child(vm.pid());
    // The supervisor outside is filtered too.
    assert_eq!(status_field(vm.pid(), "Seccomp:"), "2", "supervisor");

    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["65534"; 4]
    );
    assert_eq!(
        status_field(pid, "Gid:").split_whitespace().next(),
        Some("65534")
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2", "seccomp filter mode");
    // PID 1 of its own namespace.
    assert_eq!(
        status_field(pid, "NSpid:").split_whitespace().last(),
        Some("1")
    );
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
    // Its root holds only the path to the socket's directory.
    let top: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let first = uds
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    assert_eq!(top, vec![first], "jail root");
    // No core dumps (they would hold guest memory).
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");

    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    assert!(!uds.exists(), "the supervisor removes the socket");
}

#[test]
fn disk_and_vsock_work_from_inside_the_jail() {
    require_root();
    let dir = TempDir::new("jail-io");
    let img = dir.0.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let uds = dir.0.join("v.sock");
    // The jailed VMM runs as nobody: its guest may only reach host
    // listeners that nobody may connect to.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = echo_line_server(&uds);
    let vsock = format!("3,{}", uds.display());
    let mut vm = VmmProcess::probe(
        "probe=blk,vsock,reset probe.vsock_connect=5000",
        &["--jail", "--disk", img.to_str().unwrap(), "--vsock", &vsock],
    );
    let st = vm.wait_exit(BOOT);
    let out = vm.stdout();
    assert!(st.success(), "exit {st}\n{out}\n{}", vm.stderr());
    assert!(out.contains("probe: blk pattern ok"), "{out}");
    assert!(out.contains("probe: vsock echo: hello from guest"), "{out}");
    assert_eq!(server.join().unwrap(), "hello from guest\n");
    let sector0 = &std::fs::read(&img).unwrap()[..512];
    assert_eq!(sector0, &keystone_probe::blk_pattern(0)[..]);
}

#[test]
fn jail_options_need_jail() {
    common::require_kvm();
    let elf = common::probe_elf();
    let out = std::process::Command::new(common::vmm_bin())
        .args(["--kernel", elf.to_str().unwrap(), "--jail-uid", "1000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--jail"), "{err}");
}

/// The gid of `group` in /etc/group.
fn group_gid(group: &str) -> u32 {
    std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&group)).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no group {group} in /etc/group"))
}

#[test]
fn an_unprivileged_user_gets_the_jail_through_a_user_namespace() {
    // The test (root) runs keystone-vmm as uid/gid 65534 with the kvm group,
    // as an ordinary user who may open /dev/kvm.
    require_root();
    const NOBODY: u32 = 65534;
    let dir = TempDir::new("jail-user");
    let own =
        |p: &std::path::Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    own(&dir.0);
    let elf = dir.0.join("probe.elf");
    std::fs::copy(common::probe_elf(), &elf).unwrap();
    let img = dir.0.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    own(&img);
    let uds = dir.0.join("v.sock");
    let server = echo_line_server(&uds);
    let kvm = group_gid("kvm");
    let jail_dir = dir.0.join("jail");
    let mut cmd = std::process::Command::new(common::vmm_bin());
    cmd.args([
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "probe=blk,vsock,spin probe.vsock_connect=5000",
        "--jail",
        "--jail-dir",
        jail_dir.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
        "--vsock",
        &format!("3,{}", uds.display()),
    ]);
    // SAFETY: the closure runs in the forked child and only calls
    // setgroups/setresgid/setresuid, which are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            let groups = [kvm];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vm = VmmProcess::spawn_with(&mut cmd);
    vm.wait_stdout("probe: spinning", BOOT);
    let out = vm.stdout();
    assert!(
        out.contains("probe: blk pattern ok"),
        "{out}\n{}",
        vm.stderr()
    );
    assert!(out.contains("probe: vsock echo: hello from guest"), "{out}");
    assert_eq!(server.join().unwrap(), "hello from guest\n");

    let pid = jailed_child(vm.pid());
    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["65534"; 4],
        "its own uid, nothing more"
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
    // The socket directory, read-only, and nothing else.
    let inside = std::path::PathBuf::from(format!("/proc/{pid}/root"))
        .join(dir.0.strip_prefix("/").unwrap());
    let mut names: Vec<String> = std::fs::read_dir(&inside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"v.sock".to_string()), "{names:?}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let sock_dir_mount = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == dir.0.to_str())
        .unwrap_or_else(|| panic!("no mount of the socket directory:\n{mounts}"));
    let opts = sock_dir_mount.split_whitespace().nth(3).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "{sock_dir_mount}");
    assert_eq!(
        mounts.lines().count(),
        2,
        "the root and the socket directory:\n{mounts}"
    );

    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    let sector0 = &std::fs::read(&img).unwrap()[..512];
    assert_eq!(sector0, &keystone_probe::blk_pattern(0)[..]);
}
