//! Builds the PVM test init (`guest/main.rs`) into a static Linux x86_64
//! executable at `$OUT_DIR/keystone-pvm-init.elf`.
//!
//! Like the probe guest (`guest-image/probe/build.rs`): there is no
//! `rust-src` on the build machines, so the init is a `#![no_std]
//! #![no_main]` binary for the host's own `x86_64-unknown-linux-gnu` target,
//! linked with `-nostartfiles -nostdlib -static` (no libc: raw `syscall`
//! instructions, its own `_start`). `rustc` is invoked directly, so the
//! host's RUSTFLAGS never reach it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Codegen flags. User mode runs natively on a PVM host, but stay with the
/// baseline ISA anyway (`target-cpu=x86-64`: no popcnt, bmi, avx) so the
/// same binary runs under any x86-64 VMM and emulator.
const CODEGEN: &[&str] = &[
    "panic=abort",
    "opt-level=2",
    "codegen-units=1",
    "debuginfo=0",
    "strip=debuginfo",
    "relocation-model=static",
    "target-cpu=x86-64",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let main_rs = guest_dir.join("main.rs");
    let elf = out_dir.join("keystone-pvm-init.elf");

    rerun_if_changed(&guest_dir);
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("../../probe/guest/mem.rs").display()
    );

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=keystone_pvm_init")
        .arg("--target=x86_64-unknown-linux-gnu");
    for flag in CODEGEN {
        cmd.arg("-C").arg(flag);
    }
    for link_arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ] {
        cmd.arg("-C").arg(format!("link-arg={link_arg}"));
    }
    let mut remap = std::ffi::OsString::from("--remap-path-prefix=");
    remap.push(&guest_dir);
    remap.push("=guest");
    cmd.arg(remap);
    cmd.arg("-o").arg(&elf).arg(&main_rs);
    cmd.env_remove("CARGO_MAKEFLAGS")
        .env_remove("RUSTC_WRAPPER");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the PVM test init failed ({}):\n{cmd:?}\n{stderr}",
            output.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=pvm-init: {line}");
    }
}

/// Asks cargo to rebuild when any guest source (or the set of them) changes.
fn rerun_if_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("guest directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rerun_if_changed(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
