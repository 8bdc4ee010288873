//! Builds the probe guest (`guest/main.rs`) into a freestanding ELF at
//! `$OUT_DIR/keystone-probe.elf`.
//!
//! There is no bare-metal target or `rust-src` on the build machines, so the
//! guest is compiled for the host's own `x86_64-unknown-linux-gnu` target as
//! a `#![no_std] #![no_main]` binary and linked with `-nostdlib -static`
//! against `guest/link.ld`. `rustc` is invoked directly (not through cargo),
//! so the host's RUSTFLAGS never reach the guest.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Codegen flags for the guest. Each one matters on the PVM host, whose
/// emulator runs guest kernel code and only knows plain instructions:
/// - `target-cpu=x86-64`: baseline ISA only (no popcnt, bmi, avx, ...).
/// - `no-vectorize-*`: no SIMD arithmetic (only SSE *moves* are emulated).
/// - `no-redzone`: interrupt frames are pushed on the current stack.
/// - `relocation-model=static`: absolute addresses, no GOT/PLT, no PIE.
const CODEGEN: &[&str] = &[
    "panic=abort",
    "opt-level=2",
    "codegen-units=1",
    "debuginfo=0",
    "strip=debuginfo",
    "relocation-model=static",
    "target-cpu=x86-64",
    "no-vectorize-loops",
    "no-vectorize-slp",
    "no-redzone=yes",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let main_rs = guest_dir.join("main.rs");
    let link_ld = guest_dir.join("link.ld");
    let elf = out_dir.join("keystone-probe.elf");

    rerun_if_changed(&guest_dir);

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=keystone_probe_guest")
        .arg("--target=x86_64-unknown-linux-gnu");
    for flag in CODEGEN {
        cmd.arg("-C").arg(flag);
    }
    for link_arg in [
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        format!("-Wl,-T,{}", link_ld.display()),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,max-page-size=0x1000".to_string(),
        "-Wl,-z,noexecstack".to_string(),
    ] {
        cmd.arg("-C").arg(format!("link-arg={link_arg}"));
    }
    // Panic locations name `guest/<file>.rs`, not this checkout's path.
    let mut remap = std::ffi::OsString::from("--remap-path-prefix=");
    remap.push(&guest_dir);
    remap.push("=guest");
    cmd.arg(remap);
    cmd.arg("-o").arg(&elf).arg(&main_rs);
    // Cargo's jobserver and incremental settings are for the host crate.
    cmd.env_remove("CARGO_MAKEFLAGS")
        .env_remove("RUSTC_WRAPPER");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the probe guest failed ({}):\n{cmd:?}\n{stderr}",
            output.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=probe guest: {line}");
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
