//! Guest image build: warm (cache hit) time, and cold time with `--cold`
//! (a fresh cache directory: the kernel and the Debian root filesystem are
//! built from scratch — 10+ minutes on 2 cores), plus the image's sizes.
//!
//!   cargo bench -p keystone-cli --bench image_build [-- --cold] [--runs N]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn keystone() -> PathBuf {
    let st = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "keystone-cli", "--bin", "keystone"])
        .status()
        .expect("cargo build");
    assert!(st.success());
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/keystone")
}

fn build(keystone: &Path, cache: Option<&Path>) -> (f64, PathBuf) {
    let mut c = Command::new(keystone);
    c.args(["image", "build", "--builder", "debian"])
        .stderr(Stdio::inherit());
    if let Some(dir) = cache {
        c.env("XDG_CACHE_HOME", dir);
    }
    let t = Instant::now();
    let out = c.output().expect("run keystone image build");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "keystone image build failed");
    (
        secs,
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
    )
}

fn sizes(path: &Path) -> (f64, f64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        m.len() as f64 / 1048576.0,
        (m.blocks() * 512) as f64 / 1048576.0,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cold = args.iter().any(|a| a == "--cold");
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ks = keystone();
    let mut rows = Vec::new();
    if cold {
        let fresh = std::env::temp_dir().join(format!("ks-cold-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&fresh);
        let (secs, _) = build(&ks, Some(&fresh));
        rows.push(("cold (empty cache)".to_string(), secs));
        let _ = std::fs::remove_dir_all(&fresh);
    }
    let (first, dir) = build(&ks, None);
    rows.push(("first call (may build)".to_string(), first));
    let mut warm: Vec<f64> = (0..runs).map(|_| build(&ks, None).0).collect();
    warm.sort_by(f64::total_cmp);
    rows.push((
        format!("warm, cache hit (median of {runs})"),
        warm[warm.len() / 2],
    ));

    println!("\nkeystone image build (Debian builder)");
    println!("{:<34} {:>10}", "case", "seconds");
    for (name, s) in &rows {
        println!("{name:<34} {s:>10.2}");
    }
    println!("\nimage {}", dir.display());
    println!("{:<16} {:>12} {:>12}", "file", "size MiB", "on disk MiB");
    for f in ["vmlinux", "rootfs.ext4", "kernel.config", "manifest.json"] {
        let (len, used) = sizes(&dir.join(f));
        println!("{f:<16} {len:>12.1} {used:>12.1}");
    }
}
