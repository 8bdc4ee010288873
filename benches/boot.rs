//! Boot benchmark of the probe guest on keystone-vmm.
//!
//! For each run: spawn keystone-vmm → first serial byte → boot-timer write
//! (as measured by the VMM from its own start) → process exit after the
//! guest's i8042 reset; plus the VMM's memory overhead (peak RSS minus the
//! guest RAM touched). Prints min / median / max and the targets.
//!
//! `cargo bench -p keystone-vmm --bench boot -- [--runs N]`

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    first_byte: Duration,
    boot_timer: Duration,
    exit: Duration,
    overhead_kib: u64,
}

fn field_after(text: &str, key: &str) -> Option<u64> {
    text.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn one_run(vmm: &str, elf: &str) -> Result<Run, String> {
    let t0 = Instant::now();
    let mut child = Command::new(vmm)
        .args([
            "--kernel",
            elf,
            "--cmdline",
            "probe=timer,reset",
            "--boot-timer",
            "--memory",
            "128",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().ok_or("stdout")?;
    let mut stderr = child.stderr.take().ok_or("stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut first = [0u8; 1];
    let first_byte = match stdout.read(&mut first) {
        Ok(1) => t0.elapsed(),
        _ => return Err("no serial output".into()),
    };
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let status = child.wait().map_err(|e| e.to_string())?;
    let exit = t0.elapsed();
    let log = err_reader.join().map_err(|_| "stderr reader")?;
    if !status.success() {
        return Err(format!("exit {status}: {log}"));
    }
    let boot_us = field_after(&log, "Guest-boot-time =").ok_or("no Guest-boot-time")?;
    let overhead_kib = field_after(&log, "VMM overhead").ok_or("no memory line")?;
    Ok(Run {
        first_byte,
        boot_timer: Duration::from_micros(boot_us),
        exit,
        overhead_kib,
    })
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

fn main() {
    let mut runs = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs);
        }
    }
    let vmm = env!("CARGO_BIN_EXE_keystone-vmm");
    let elf = keystone_probe::elf_path()
        .to_str()
        .expect("utf-8 path")
        .to_string();
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("boot benchmark needs /dev/kvm");
        std::process::exit(1);
    }
    // One warm-up run (page cache, binary loading).
    let _ = one_run(vmm, &elf);
    let mut results = Vec::new();
    for i in 0..runs {
        match one_run(vmm, &elf) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("run {i} failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let rows = [
        (
            "spawn -> first serial byte (ms)",
            stats(results.iter().map(|r| ms(&r.first_byte)).collect()),
            "",
        ),
        (
            "VMM start -> boot-timer write (ms)",
            stats(results.iter().map(|r| ms(&r.boot_timer)).collect()),
            "< 10",
        ),
        (
            "spawn -> VMM exit after reset (ms)",
            stats(results.iter().map(|r| ms(&r.exit)).collect()),
            "< 20",
        ),
        (
            "VMM overhead: peak RSS - guest (MiB)",
            stats(
                results
                    .iter()
                    .map(|r| r.overhead_kib as f64 / 1024.0)
                    .collect(),
            ),
            "< 5",
        ),
    ];
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    println!(
        "\nkeystone-vmm boot benchmark: probe guest, {runs} runs, 1 vCPU, 128 MiB\nhost: {host}{}\n",
        if pvm { " (KVM: PVM)" } else { "" }
    );
    println!(
        "| {:<38} | {:>8} | {:>8} | {:>8} | {:>6} |",
        "phase", "min", "median", "max", "target"
    );
    println!(
        "|{:-<40}|{:->10}|{:->10}|{:->10}|{:->8}|",
        "", "", "", "", ""
    );
    for (name, (min, med, max), target) in rows {
        println!("| {name:<38} | {min:>8.2} | {med:>8.2} | {max:>8.2} | {target:>6} |");
    }
    println!();
}
