//! Embeds the guest-image sources (kernel config and build script, the
//! Debian builder, the files installed into the guest, the Nix flake) into
//! the `keystone` binary, so `keystone image build` works from an installed
//! binary and the image's content hash covers exactly what it builds from.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const ROOTS: &[&str] = &[
    "kernel/build-kernel.sh",
    "kernel/keystone.config",
    "kernel/sandbox.config",
    "debian",
    "rootfs",
    "rootfs-src",
    "flake.nix",
];

fn walk(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    let full = base.join(rel);
    println!("cargo:rerun-if-changed={}", full.display());
    if full.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&full)
            .unwrap_or_else(|e| panic!("{}: {e}", full.display()))
            .map(|e| e.expect("directory entry").file_name())
            .collect();
        entries.sort();
        for name in entries {
            walk(base, &rel.join(name), out);
        }
    } else {
        out.push(rel.to_path_buf());
    }
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let base = manifest_dir.join("../guest-image");
    let mut files = Vec::new();
    for root in ROOTS {
        walk(&base, Path::new(root), &mut files);
    }
    let mut code =
        String::from("/// Guest-image sources: (path under guest-image/, executable, bytes).\n");
    code.push_str("pub static SOURCES: &[(&str, bool, &[u8])] = &[\n");
    for rel in &files {
        let full = base.join(rel).canonicalize().expect("source path");
        let exec = std::fs::metadata(&full)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        writeln!(
            code,
            "    ({:?}, {exec}, include_bytes!({:?})),",
            rel.to_string_lossy(),
            full.to_string_lossy()
        )
        .expect("write to string");
    }
    code.push_str("];\n");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("guest_sources.rs");
    std::fs::write(&out, code).expect("write guest_sources.rs");
}
