//! Build-script helper of the probe guest (`build.rs` here): compile one
//! freestanding `#![no_std] #![no_main]` Rust program with `rustc` directly
//! for the host's `x86_64-unknown-linux-gnu` target (no bare-metal target
//! or `rust-src` on the build machines), so the host's RUSTFLAGS never reach
//! it, and ask cargo to rerun on any source change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One program to build.
pub struct Program<'a> {
    /// Name used in messages (`probe guest`).
    pub what: &'a str,
    /// rustc `--crate-name`.
    pub crate_name: &'a str,
    /// Directory of its sources (`main.rs` is the root); remapped to
    /// `guest/` in panic locations.
    pub guest_dir: &'a Path,
    /// Output ELF.
    pub elf: &'a Path,
    /// `-C` codegen flags.
    pub codegen: &'a [&'a str],
    /// Linker arguments (each passed as `-C link-arg=`).
    pub link_args: &'a [String],
}

/// Compile `p`; panics (failing the build) with rustc's output on error and
/// forwards rustc's warnings as cargo warnings.
pub fn compile(p: &Program) {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg(format!("--crate-name={}", p.crate_name))
        .arg("--target=x86_64-unknown-linux-gnu");
    for flag in p.codegen {
        cmd.arg("-C").arg(flag);
    }
    for link_arg in p.link_args {
        cmd.arg("-C").arg(format!("link-arg={link_arg}"));
    }
    // Panic locations name `guest/<file>.rs`, not this checkout's path.
    let mut remap = std::ffi::OsString::from("--remap-path-prefix=");
    remap.push(p.guest_dir);
    remap.push("=guest");
    cmd.arg(remap);
    cmd.arg("-o").arg(p.elf).arg(p.guest_dir.join("main.rs"));
    // Cargo's jobserver and incremental settings are for the host crate.
    cmd.env_remove("CARGO_MAKEFLAGS")
        .env_remove("RUSTC_WRAPPER");

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the {} failed ({}):\n{cmd:?}\n{stderr}",
            p.what, output.status
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={}: {line}", p.what);
    }
}

/// Asks cargo to rebuild when any source under `dir` (or the set of them)
/// changes.
pub fn rerun_if_changed(dir: &Path) {
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
