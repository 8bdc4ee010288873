//! keystone-vmm boots the probe guest on this host's KVM: serial output and
//! input (through the UART interrupt), the boot timer, vCPU setup, i8042
//! reset, SIGTERM, guest faults and argument errors.
//!
//! These tests need /dev/kvm and fail with a clear message without it.

mod common;

use std::time::{Duration, Instant};

use common::{probe_elf, require_kvm, TempDir, VmmProcess};

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn banner_carries_the_exact_command_line_and_reset_exits_zero() {
    let cmdline = "console=ttyS0 probe=reset keystone.test=banner quoted-ish=a,b:c/d";
    let started = Instant::now();
    let mut vm = VmmProcess::probe(cmdline, &[]);
    let st = vm.wait_exit(BOOT);
    let elapsed = started.elapsed();
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    let want = format!("keystone-probe: hello cmdline=\"{cmdline}\"\n");
    assert!(vm.stdout().contains(&want), "serial: {}", vm.stdout());
    assert!(vm.stdout().contains("probe: reset"));
    assert!(vm
        .stderr()
        .contains("guest requested a reset through the i8042"));
    assert!(elapsed < Duration::from_secs(10), "reset took {elapsed:?}");
}

#[test]
fn boot_timer_reports_a_plausible_boot_time() {
    let mut vm = VmmProcess::probe("probe=timer,reset", &["--boot-timer"]);
    let st = vm.wait_exit(BOOT);
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    assert!(vm.stdout().contains("probe: boot-timer written"));
    let log = vm.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("Guest-boot-time = "))
        .unwrap_or_else(|| panic!("no Guest-boot-time line in:\n{log}"));
    let us: u64 = line
        .split("Guest-boot-time = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"));
    assert!(us > 0 && us < 10_000_000, "implausible boot time {us} us");
    assert!(line.contains(" CPU us "), "{line}");
}

#[test]
fn without_boot_timer_flag_the_device_is_absent() {
    let mut vm = VmmProcess::probe("probe=timer,reset", &[]);
    assert!(vm.wait_exit(BOOT).success());
    assert!(vm.stdout().contains("probe: boot-timer written"));
    assert!(!vm.stderr().contains("Guest-boot-time"), "{}", vm.stderr());
}

#[test]
fn serial_input_is_echoed_through_the_uart_interrupt() {
    let mut vm = VmmProcess::probe("probe=echo,reset", &[]);
    vm.wait_stdout("probe: echo ready", BOOT);
    vm.send(b"hello keystone\n");
    vm.wait_stdout("probe: echo-line: hello keystone", BOOT);
    vm.wait_stdout("probe: echo irqs=", BOOT);
    let st = vm.wait_exit(BOOT);
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    let out = vm.stdout();
    let irqs: u64 = out
        .split("probe: echo irqs=")
        .nth(1)
        .and_then(|r| r.lines().next())
        .and_then(|n| n.trim().parse().ok())
        .expect("irq count");
    assert!(irqs >= 1, "input arrived without an interrupt: {out}");
}

fn smp(vcpus: u8) -> (String, String) {
    let n = vcpus.to_string();
    let mut vm = VmmProcess::probe("probe=smp,reset", &["--vcpus", &n]);
    let st = vm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    let out = vm.stdout();
    assert!(
        out.contains(&format!("probe: mptable cpus={vcpus} ")),
        "MP table should list {vcpus} CPUs: {out}"
    );
    assert!(
        vm.stderr().contains(&format!("{vcpus} vCPU(s) configured")),
        "{}",
        vm.stderr()
    );
    (out, vm.stderr())
}

#[test]
fn one_vcpu_is_set_up() {
    let (out, _) = smp(1);
    assert!(out.contains("probe: cpuid apic-id=0 logical=1"), "{out}");
    assert!(out.contains("probe: smp online=1/1"), "{out}");
}

#[test]
fn four_vcpus_are_set_up_and_started() {
    let (out, _) = smp(4);
    assert!(out.contains("probe: cpuid apic-id=0 logical=4"), "{out}");
    // Every AP was started by INIT-SIPI-SIPI and reported its APIC id.
    for id in 1..4 {
        assert!(
            out.contains(&format!("probe: cpu {id} online")),
            "cpu {id}: {out}"
        );
    }
    assert!(out.contains("probe: smp online=4/4"), "{out}");
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    let mut vm = VmmProcess::probe("probe=spin", &[]);
    vm.wait_stdout("probe: spinning", BOOT);
    let t = Instant::now();
    vm.signal(libc::SIGTERM);
    let st = vm.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(vm.stderr().contains("Signal(15)"), "{}", vm.stderr());
}

#[test]
fn sigint_stops_a_running_guest_cleanly() {
    let mut vm = VmmProcess::probe("probe=spin", &["--vcpus", "2"]);
    vm.wait_stdout("probe: spinning", BOOT);
    vm.signal(libc::SIGINT);
    let st = vm.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "exit {st}\n{}", vm.stderr());
}

#[test]
fn a_guest_fault_ends_the_vmm_with_an_error() {
    let mut vm = VmmProcess::probe("probe=fault", &[]);
    let st = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(1), "{}", vm.stderr());
    let err = vm.stderr();
    let line = err
        .lines()
        .find(|l| l.starts_with("keystone-vmm: error: vCPU 0:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains("triple-faulted") || line.contains("internal error"),
        "{line}"
    );
}

#[test]
fn serial_can_go_to_a_file_or_nowhere() {
    let dir = TempDir::new("serial");
    let log = dir.0.join("console.log");
    let spec = format!("file:{}", log.display());
    let mut vm = VmmProcess::probe("probe=reset", &["--serial", &spec]);
    assert!(vm.wait_exit(BOOT).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("keystone-probe: hello"), "{text}");
    assert!(!vm.stdout().contains("keystone-probe"));

    let mut vm = VmmProcess::probe("probe=reset", &["--serial", "none"]);
    assert!(vm.wait_exit(BOOT).success());
    assert_eq!(vm.stdout(), "");
}

#[test]
fn bad_arguments_get_one_line_errors() {
    require_kvm();
    let dir = TempDir::new("args");
    let not_kernel = dir.0.join("notes.txt");
    std::fs::write(&not_kernel, "just text, not a kernel\n").unwrap();
    let elf = probe_elf();
    let elf = elf.to_str().unwrap();
    let nk = not_kernel.to_str().unwrap();
    let dirs = dir.0.to_str().unwrap();
    let long = "x".repeat(4096);
    let disk_fast = format!("{nk},fast");
    let vsock_exists = format!("3,{nk}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", elf, "--memory", "64"], "below the minimum"),
        (
            vec!["--kernel", elf, "--memory", "100000000"],
            "more than this host's",
        ),
        (
            vec!["--kernel", elf, "--vcpus", "0"],
            "--vcpus 0 is out of range",
        ),
        (
            vec!["--kernel", elf, "--vcpus", "65"],
            "--vcpus 65 is out of range",
        ),
        (vec!["--kernel", "/nonexistent/vmlinux"], "cannot read"),
        (vec!["--kernel", nk], "neither an ELF vmlinux nor a bzImage"),
        (vec!["--kernel", dirs], "not a regular file"),
        (
            vec!["--kernel", elf, "--initrd", "/nonexistent/initrd"],
            "--initrd",
        ),
        (
            vec!["--kernel", elf, "--serial", "tcp:1"],
            "use stdio, file:PATH or none",
        ),
        (vec!["--kernel", elf, "--cmdline", &long], "longer than"),
        (vec!["--kernel", elf, "--memory", "lots"], "invalid value"),
        (
            vec!["--kernel", elf, "--disk", "/nonexistent/disk.img"],
            "--disk",
        ),
        (
            vec!["--kernel", elf, "--disk", &disk_fast],
            "unknown option",
        ),
        (vec!["--kernel", elf, "--disk", dirs], "not a regular file"),
        (
            vec!["--kernel", elf, "--vsock", "2,/tmp/ks.sock"],
            "CID must be",
        ),
        (
            vec!["--kernel", elf, "--vsock", "abc"],
            "expected CID,UDS_PATH",
        ),
        (
            vec!["--kernel", elf, "--vsock", &vsock_exists],
            "already exists",
        ),
        (vec![], "--kernel"),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(common::vmm_bin())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.starts_with("keystone-vmm: error: "), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
}
