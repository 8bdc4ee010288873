//! Locating the programs keystone runs (keystone-vmm, and for benchmarks
//! and image builds their peers): next to this executable, else on PATH.

use std::path::PathBuf;

/// Find `name` next to this executable, else on PATH.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
    {
        return Some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}
