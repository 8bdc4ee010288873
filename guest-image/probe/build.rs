//! Builds the probe guest (`guest/main.rs`) into a freestanding ELF at
//! `$OUT_DIR/keystone-probe.elf`.
//!
//! There is no bare-metal target or `rust-src` on the build machines, so the
//! guest is compiled for the host's own `x86_64-unknown-linux-gnu` target as
//! a `#![no_std] #![no_main]` binary and linked with `-nostdlib -static`
//! against `guest/link.ld`. `rustc` is invoked directly (not through cargo),
//! so the host's RUSTFLAGS never reach the guest (`freestanding.rs`).

#[path = "freestanding.rs"]
mod freestanding;

use std::env;
use std::path::PathBuf;

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
    let link_ld = guest_dir.join("link.ld");
    let elf = out_dir.join("keystone-probe.elf");

    freestanding::rerun_if_changed(&guest_dir);
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("freestanding.rs").display()
    );
    freestanding::compile(&freestanding::Program {
        what: "probe guest",
        crate_name: "keystone_probe_guest",
        guest_dir: &guest_dir,
        elf: &elf,
        codegen: CODEGEN,
        link_args: &[
            "-nostdlib".to_string(),
            "-static".to_string(),
            "-no-pie".to_string(),
            format!("-Wl,-T,{}", link_ld.display()),
            "-Wl,--build-id=none".to_string(),
            "-Wl,-z,max-page-size=0x1000".to_string(),
            "-Wl,-z,noexecstack".to_string(),
        ],
    });
}
