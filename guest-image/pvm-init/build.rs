//! Builds the PVM test init (`guest/main.rs`) into a static Linux x86_64
//! executable at `$OUT_DIR/keystone-pvm-init.elf`.
//!
//! Like the probe guest (`guest-image/probe/build.rs`): there is no
//! `rust-src` on the build machines, so the init is a `#![no_std]
//! #![no_main]` binary for the host's own `x86_64-unknown-linux-gnu` target,
//! linked with `-nostartfiles -nostdlib -static` (no libc: raw `syscall`
//! instructions, its own `_start`). `rustc` is invoked directly, so the
//! host's RUSTFLAGS never reach it.

#[path = "../probe/freestanding.rs"]
mod freestanding;

use std::env;
use std::path::PathBuf;

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
    let elf = out_dir.join("keystone-pvm-init.elf");

    freestanding::rerun_if_changed(&guest_dir);
    for shared in ["../probe/guest/mem.rs", "../probe/freestanding.rs"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(shared).display()
        );
    }
    let link_args: Vec<String> = [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ]
    .map(String::from)
    .to_vec();
    freestanding::compile(&freestanding::Program {
        what: "pvm-init",
        crate_name: "keystone_pvm_init",
        guest_dir: &guest_dir,
        elf: &elf,
        codegen: CODEGEN,
        link_args: &link_args,
    });
}
