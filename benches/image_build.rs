//! Guest image build, for both kernels of the Debian builder (`stock`:
//! Debian's kernel from the mirror, nothing compiled; `minimal`: compiled
//! from linux-source): warm (cache hit) time, and cold time with `--cold`
//! (a fresh cache directory: the root filesystem, and the minimal kernel,
//! built from scratch — minutes each on 2 cores), plus the images' sizes.
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

fn build(keystone: &Path, kernel: &str, cache: Option<&Path>) -> (f64, PathBuf) {
    let mut c = Command::new(keystone);
    c.args(["image", "build", "--builder", "debian", "--kernel", kernel])
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
    let mut dirs = Vec::new();
    for kernel in ["stock", "minimal"] {
        if cold {
            let fresh =
                std::env::temp_dir().join(format!("ks-cold-cache-{kernel}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&fresh);
            let (secs, _) = build(&ks, kernel, Some(&fresh));
            rows.push((kernel, "cold (empty cache)".to_string(), secs));
            let _ = std::fs::remove_dir_all(&fresh);
        }
        let (first, dir) = build(&ks, kernel, None);
        rows.push((kernel, "first call (may build)".to_string(), first));
        let mut warm: Vec<f64> = (0..runs).map(|_| build(&ks, kernel, None).0).collect();
        warm.sort_by(f64::total_cmp);
        rows.push((
            kernel,
            format!("warm, cache hit (median of {runs})"),
            warm[warm.len() / 2],
        ));
        dirs.push((kernel, dir));
    }

    println!("\nkeystone image build (Debian builder)");
    println!("| kernel | case | seconds |\n|---|---|---:|");
    for (kernel, name, s) in &rows {
        println!("| {kernel} | {name} | {s:.2} |");
    }
    for (kernel, dir) in dirs {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json")).expect("manifest.json"),
        )
        .expect("manifest JSON");
        println!("\n{kernel} kernel: image {}", dir.display());
        println!("| file | size MiB | on disk MiB |\n|---|---:|---:|");
        let mut files: Vec<String> = ["kernel", "initrd", "rootfs"]
            .iter()
            .filter_map(|k| manifest[k].as_str().map(String::from))
            .collect();
        files.extend(["kernel.config".into(), "manifest.json".into()]);
        for f in files {
            let (len, used) = sizes(&dir.join(&f));
            println!("| {f} | {len:.1} | {used:.1} |");
        }
    }
}
