//! `keystone agent snapshot NAME [--tag T]`: a running sandbox's memory,
//! CPU and device state (keystone-vmm's snapshot, through its control
//! API) and its disk, captured consistently, under
//! `sandboxes/<name>/snapshots/<tag>/`:
//!
//! | file | what |
//! |---|---|
//! | `state.json`, `memory` | keystone-vmm's snapshot (its README section) |
//! | `disk.ext4` | the sandbox disk as it was at that moment (`cp --reflink=auto`, sparse) |
//! | `meta.json` | [`SnapshotInfo`] |
//!
//! The VM is paused from the memory snapshot until the disk copy is done,
//! then resumed, whatever failed. keystone-vmm writes into
//! `snapshots/.staging` (a directory it opened at start); the files are
//! then renamed into `<tag>.tmp`, which is renamed to `<tag>` last, so a
//! tag directory is always a whole snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state::{AgentPaths, Network, Sandbox, Status};
use super::AgentError;

/// What `meta.json` says of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its tag (the directory name).
    pub tag: String,
    /// When it was taken (Unix seconds).
    pub created_at: u64,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Bytes of guest memory stored (zero pages are holes).
    pub memory_stored: u64,
    /// The image's content hash it ran on.
    pub image_hash: Option<String>,
    /// How long the VM was paused (ms).
    pub paused_ms: u64,
    /// vCPUs (0: not recorded).
    #[serde(default)]
    pub vcpus: u8,
    /// The network it had (a restore needs the same devices).
    #[serde(default)]
    pub network: Option<Network>,
    /// When the run it was taken in started (the sandbox's `started_at`
    /// then): `start` resumes it only after that very run.
    #[serde(default)]
    pub run_started_at: Option<u64>,
    /// Taken by `fork` (a fork point, never resumed by `start`).
    #[serde(default)]
    pub for_fork: bool,
}

impl SnapshotInfo {
    /// Why sandbox `s` (its settings as it would start now, on the image
    /// with content hash `image_hash`) cannot restore this snapshot;
    /// `None` when it can.
    pub fn mismatch(&self, s: &Sandbox, image_hash: &str) -> Option<String> {
        if self.image_hash.as_deref() != Some(image_hash) {
            return Some("it was taken on another guest image".into());
        }
        if self.memory_mib != s.memory_mib || self.vcpus != s.vcpus {
            return Some(format!(
                "it has {} MiB and {} vCPU(s), the sandbox now {} MiB and {}",
                self.memory_mib, self.vcpus, s.memory_mib, s.vcpus
            ));
        }
        if self.network.as_ref() != Some(&s.network) {
            return Some("it was taken with another network".into());
        }
        None
    }
}

/// The directory of snapshot `tag` of `s`.
pub fn dir_of(s: &Sandbox, tag: &str) -> PathBuf {
    snapshots_dir(s).join(tag)
}

/// The snapshot `start` resumes for `s` (settings as it starts now) on
/// the image `image_hash`: the newest one taken during its latest run, if
/// that one still fits ([`SnapshotInfo::mismatch`]); else `None`, and
/// why not when there was a candidate.
pub fn resumable(s: &Sandbox, image_hash: &str) -> (Option<SnapshotInfo>, Option<String>) {
    let Some(newest) = list_of(s).pop() else {
        return (None, None);
    };
    if s.started_at.is_none() || newest.run_started_at != s.started_at || newest.for_fork {
        // Taken before a later boot (the disk has moved on since), or a
        // fork point the user did not ask to come back to.
        return (None, None);
    }
    match newest.mismatch(s, image_hash) {
        Some(why) => (
            None,
            Some(format!("not resuming snapshot {}: {why}", newest.tag)),
        ),
        None => (Some(newest), None),
    }
}

/// Puts the disk of snapshot `info` in place as `s`'s disk (a reflink or
/// sparse copy, then a rename); the disk it replaces is kept as
/// `disk.before-resume.ext4` (one, the latest). Returns that path.
pub fn restore_disk(s: &Sandbox, info: &SnapshotInfo) -> Result<PathBuf, AgentError> {
    let from = dir_of(s, &info.tag).join("disk.ext4");
    let tmp = s.dir.join("disk.ext4.resume-tmp");
    let _ = std::fs::remove_file(&tmp);
    copy_disk(&from, &tmp)?;
    let kept = s.dir.join("disk.before-resume.ext4");
    if s.disk.exists() {
        std::fs::rename(&s.disk, &kept).map_err(io(&kept))?;
    }
    std::fs::rename(&tmp, &s.disk).map_err(io(&s.disk))?;
    Ok(kept)
}

/// `snapshots/` of a sandbox.
pub fn snapshots_dir(s: &Sandbox) -> PathBuf {
    s.dir.join("snapshots")
}

/// Where its keystone-vmm writes (`--snapshot-dir`).
pub fn staging_dir(s: &Sandbox) -> PathBuf {
    snapshots_dir(s).join(".staging")
}

/// A tag: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_tag(tag: &str) -> Result<(), AgentError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && !tag.starts_with('.')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Usage(format!(
            "snapshot tag {tag:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// One control-API request to the sandbox's keystone-vmm.
fn api(sock: &Path, req: &str) -> Result<serde_json::Value, AgentError> {
    let v = keystone_vmm::api::request(sock, req, Duration::from_secs(300)).map_err(|e| {
        AgentError::Snapshot(format!("the VMM's control socket {}: {e}", sock.display()))
    })?;
    if v["ok"] != true {
        return Err(AgentError::Snapshot(format!(
            "the VMM refused {req}: {}",
            v["error"].as_str().unwrap_or("no reason given")
        )));
    }
    Ok(v)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::Snapshot(format!("{}: {e}", what.display()))
}

/// Copy `from` to `to` sharing blocks where the filesystem can
/// (`cp --reflink=auto`), else a sparse copy.
pub fn copy_disk(from: &Path, to: &Path) -> Result<(), AgentError> {
    let out = std::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always", "--"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| AgentError::Snapshot(format!("cp: {e}")))?;
    if !out.status.success() {
        return Err(AgentError::Snapshot(format!(
            "copying the disk: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Take a snapshot of the running sandbox `name` (tag: `tag`, else the
/// time; `for_fork`: by `fork`); returns what was written.
pub fn take(
    paths: &AgentPaths,
    name: &str,
    tag: Option<&str>,
    for_fork: bool,
) -> Result<SnapshotInfo, AgentError> {
    let s = paths
        .registry()
        .get(name)?
        .ok_or_else(|| AgentError::NotFound(name.to_string()))?
        .observed();
    let tag = match tag {
        Some(t) => t.to_string(),
        None => format!("{}", now()),
    };
    check_tag(&tag)?;
    if s.status != Status::Running {
        return Err(AgentError::NotRunning(name.to_string()));
    }
    let sock = s.api_socket();
    if !sock.exists() {
        return Err(AgentError::Snapshot(format!(
            "sandbox {name} runs a VMM without a control socket (started by an older keystone): stop and start it"
        )));
    }
    let dir = snapshots_dir(&s);
    let dest = dir.join(&tag);
    if dest.exists() {
        return Err(AgentError::Usage(format!(
            "sandbox {name} already has a snapshot {tag}"
        )));
    }
    let staging = staging_dir(&s);
    let t0 = Instant::now();
    api(&sock, r#"{"op":"pause"}"#)?;
    let captured = (|| {
        let r = api(&sock, r#"{"op":"snapshot"}"#)?;
        copy_disk(&s.disk, &staging.join("disk.ext4"))?;
        Ok::<_, AgentError>(r)
    })();
    // Whatever happened, the sandbox runs on.
    let resumed = api(&sock, r#"{"op":"resume"}"#);
    let paused_ms = t0.elapsed().as_millis() as u64;
    let r = captured?;
    resumed?;

    let tmp = dir.join(format!("{tag}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for f in ["memory", "state.json", "disk.ext4"] {
        std::fs::rename(staging.join(f), tmp.join(f)).map_err(io(&tmp.join(f)))?;
    }
    let info = SnapshotInfo {
        tag: tag.clone(),
        created_at: now(),
        memory_mib: s.memory_mib,
        memory_stored: r["memory_bytes"].as_u64().unwrap_or(0),
        image_hash: s.image.as_ref().map(|i| i.content_hash.clone()),
        paused_ms,
        vcpus: s.vcpus,
        network: Some(s.network.clone()),
        run_started_at: s.started_at,
        for_fork,
    };
    let meta = serde_json::to_vec_pretty(&info).map_err(|e| AgentError::Internal(e.to_string()))?;
    super::state::write_atomic(&tmp.join("meta.json"), &meta)?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(info)
}

/// The snapshots of sandbox `s`, oldest first (directories without a
/// readable `meta.json` are skipped).
pub fn list_of(s: &Sandbox) -> Vec<SnapshotInfo> {
    let mut v: Vec<SnapshotInfo> = std::fs::read_dir(snapshots_dir(s))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !n.starts_with('.') && !n.ends_with(".tmp")
        })
        .filter_map(|e| std::fs::read(e.path().join("meta.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    v.sort_by(|a: &SnapshotInfo, b| (a.created_at, &a.tag).cmp(&(b.created_at, &b.tag)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_plain_names() {
        for good in ["before-refactor", "v1.2", "a", "x_y", &"t".repeat(64)] {
            assert!(check_tag(good).is_ok(), "{good}");
        }
        for bad in ["", ".staging", "a/b", "..", "sp ace", &"t".repeat(65), "é"] {
            let e = check_tag(bad).err().unwrap();
            assert_eq!(e.exit_code(), super::super::exit::USAGE, "{bad}");
        }
    }
}
