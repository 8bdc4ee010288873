//! keystone-vmm's control API and snapshots on the probe guest under this
//! host's KVM: pause stops the guest and resume starts it again, a snapshot
//! taken mid-count restores into a new VMM that goes on counting from where
//! it was, and bad snapshots are refused (exit 2) before any guest runs.
//!
//! These tests need /dev/kvm and fail with a clear message without it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{probe_elf, require_kvm, vmm_bin, TempDir, VmmProcess};

const BOOT: Duration = Duration::from_secs(30);

/// One request on a fresh connection (retried until the socket is
/// there), its reply parsed.
fn api(sock: &Path, req: &str) -> serde_json::Value {
    let deadline = Instant::now() + BOOT;
    loop {
        match keystone_vmm::api::request(sock, req, Duration::from_secs(20)) {
            Ok(v) => return v,
            Err(_) if Instant::now() < deadline && !sock.exists() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("api {}: {e}", sock.display()),
        }
    }
}

/// The last complete `probe: count N` line on the console.
fn last_count(out: &str) -> u64 {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .rev()
        .filter_map(|l| l.strip_prefix("probe: count "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_count_past(vm: &mut VmmProcess, n: u64) -> u64 {
    let deadline = Instant::now() + BOOT;
    loop {
        let c = last_count(&vm.stdout());
        if c > n {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the count stayed at {c}\n{}",
            vm.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_stops_the_guest_and_a_snapshot_restores_where_it_was() {
    require_kvm();
    let dir = TempDir::new("snapshot");
    let sock = dir.0.join("api.sock");
    let snap = dir.0.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let (sock_s, snap_s) = (sock.to_str().unwrap(), snap.to_str().unwrap());
    let mut vm = VmmProcess::probe(
        "probe=count",
        &[
            "--memory",
            "128",
            "--api-sock",
            sock_s,
            "--snapshot-dir",
            snap_s,
        ],
    );
    wait_count_past(&mut vm, 3);

    let st = api(&sock, r#"{"op":"state"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["state"], "running");
    assert_eq!(st["memory_mib"], 128);

    // Paused: the count does not move.
    let r = api(&sock, r#"{"op":"pause"}"#);
    assert_eq!(
        (r["ok"].clone(), r["state"].clone()),
        (true.into(), "paused".into()),
        "{r}"
    );
    let at_pause = last_count(&vm.stdout());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        last_count(&vm.stdout()),
        at_pause,
        "the guest ran while paused"
    );
    assert_eq!(api(&sock, r#"{"op":"state"}"#)["state"], "paused");

    // Snapshot while paused: stays paused, files in place.
    let r = api(&sock, r#"{"op":"snapshot"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["state"], "paused");
    assert!(r["memory_bytes"].as_u64().unwrap() > 0, "{r}");
    let mem_len = std::fs::metadata(snap.join("memory")).unwrap().len();
    assert_eq!(mem_len, 128 << 20);
    assert!(snap.join("state.json").is_file());
    assert_eq!(last_count(&vm.stdout()), at_pause);

    // Resume: it counts on.
    assert_eq!(api(&sock, r#"{"op":"resume"}"#)["state"], "running");
    wait_count_past(&mut vm, at_pause + 2);
    let bad = api(&sock, r#"{"op":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"].as_str().unwrap().contains("bad request"),
        "{bad}"
    );
    vm.signal(libc::SIGTERM);
    assert!(vm.wait_exit(BOOT).success(), "{}", vm.stderr());

    // Restore: a new VMM, no kernel, goes on from the snapshot's count.
    // The first VMM's socket is left behind (no VMM thread may unlink):
    // a stale one is replaced.
    assert!(sock.exists());
    let sock2 = sock.clone();
    let mut restored =
        VmmProcess::spawn(&["--restore", snap_s, "--api-sock", sock2.to_str().unwrap()]);
    let first_after = wait_count_past(&mut restored, 0);
    let out = restored.stdout();
    assert!(
        !out.contains("keystone-probe: hello"),
        "the restored guest booted again:\n{out}"
    );
    let first_line = out
        .lines()
        .find_map(|l| l.strip_prefix("probe: count "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap();
    assert!(
        first_line >= at_pause && first_line <= at_pause + 2,
        "restored at {first_line}, paused at {at_pause}\n{out}"
    );
    assert!(first_after >= first_line);
    wait_count_past(&mut restored, first_line + 3);
    let st = api(&sock2, r#"{"op":"state"}"#);
    assert_eq!(
        (st["state"].clone(), st["memory_mib"].clone()),
        ("running".into(), 128.into())
    );
    assert!(
        restored.stderr().contains("VM restored from"),
        "{}",
        restored.stderr()
    );
    restored.signal(libc::SIGTERM);
    assert!(restored.wait_exit(BOOT).success(), "{}", restored.stderr());

    // Two restores of one snapshot run side by side.
    let mut a = VmmProcess::spawn(&["--restore", snap_s]);
    let mut b = VmmProcess::spawn(&["--restore", snap_s]);
    wait_count_past(&mut a, at_pause + 3);
    wait_count_past(&mut b, at_pause + 3);
    a.signal(libc::SIGTERM);
    b.signal(libc::SIGTERM);
    assert!(a.wait_exit(BOOT).success());
    assert!(b.wait_exit(BOOT).success());
}

/// keystone-vmm's exit status and stderr for `args`.
fn refused(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(vmm_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_snapshots_and_mismatched_arguments_exit_2_before_the_guest_runs() {
    require_kvm();
    let dir = TempDir::new("snapshot-bad");
    let sock = dir.0.join("api.sock");
    let snap = dir.0.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let snap_s = snap.to_str().unwrap();
    let mut vm = VmmProcess::probe(
        "probe=count",
        &[
            "--memory",
            "128",
            "--api-sock",
            sock.to_str().unwrap(),
            "--snapshot-dir",
            snap_s,
        ],
    );
    wait_count_past(&mut vm, 1);
    assert_eq!(api(&sock, r#"{"op":"snapshot"}"#)["ok"], true);
    vm.signal(libc::SIGTERM);
    assert!(vm.wait_exit(BOOT).success());

    let (code, err) = refused(&["--restore", snap_s, "--memory", "256"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--memory 256 MiB, the snapshot has 128 MiB"),
        "{err}"
    );
    let (code, err) = refused(&[
        "--restore",
        snap_s,
        "--kernel",
        probe_elf().to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");

    let state = snap.join("state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, &good[..good.len() - 10]).unwrap();
    let (code, err) = refused(&["--restore", snap_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a valid state file"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
    v["version"] = 2.into();
    std::fs::write(&state, serde_json::to_vec(&v).unwrap()).unwrap();
    let (code, err) = refused(&["--restore", snap_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("format version 2"), "{err}");

    std::fs::write(&state, &good).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .unwrap();
    mem.set_len(100 << 20).unwrap();
    let (code, err) = refused(&["--restore", snap_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("truncated"), "{err}");
}
