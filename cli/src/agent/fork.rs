//! `keystone agent fork NAME N [--prefix P] [--snapshot TAG]`: N new
//! sandboxes restored from one snapshot of `NAME` (a new one when it runs
//! and no `--snapshot` is given, else its newest).
//!
//! Each child `<P>-<k>` (P defaults to `<NAME>-fork`, k counting on from
//! the highest existing) gets its own copy of the snapshot's disk
//! (`cp --reflink=auto`, sparse), vsock CID and sockets, MAC, and
//! keystone-vmm, which maps the snapshot's memory copy-on-write: the
//! children share every page none of them wrote. Once a child's VMM runs,
//! the guest gets the host's clock and fresh randomness (its CRNG is
//! reseeded, so no two children share random state), its hostname and
//! MAC, and `/workspace` a new branch `keystone/<child>` checked out; the
//! child's commits then sync into `refs/keystone/<child>/*` like any
//! sandbox's. The children inherit the parent's pinned SSH host keys
//! (they are the same guest) and settings, not its port forwards. They
//! share the parent's project, but a verb without a name still means the
//! parent there: a child is always named.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::lifecycle::{self, Starting};
use super::session::{self, Restored};
use super::snapshot::{self, SnapshotInfo};
use super::state::{
    free_cid, validate_name, AgentPaths, ForkOrigin, Launch, Network, ProcessId, Sandbox, Status,
};
use super::{vmm_process, AgentError};
use crate::doctor::HostReport;
use crate::image::Image;

/// Most children one fork makes.
pub const MAX_CHILDREN: u32 = 32;

/// Options of `fork`.
#[derive(Clone, Debug, Default)]
pub struct ForkOptions {
    /// The sandbox to fork.
    pub name: String,
    /// How many children.
    pub count: u32,
    /// Children are `<prefix>-<k>` (default `<name>-fork`).
    pub prefix: Option<String>,
    /// Restore this snapshot (default: a new one, or the newest).
    pub snapshot: Option<String>,
}

/// One child, running.
#[derive(Clone, Debug)]
pub struct Child {
    /// The sandbox.
    pub sandbox: Sandbox,
    /// Its branch in /workspace.
    pub branch: String,
    /// From spawning its supervisor to its guest set up.
    pub ready: Duration,
}

/// What `fork` did.
#[derive(Debug)]
pub struct Forked {
    /// The snapshot the children restored.
    pub snapshot: SnapshotInfo,
    /// Whether `fork` took it now.
    pub new_snapshot: bool,
    /// The children that run.
    pub children: Vec<Child>,
    /// Children that failed, with why.
    pub failed: Vec<(String, AgentError)>,
    /// The whole fork, snapshot included.
    pub elapsed: Duration,
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC keystone-vmm gives `s`'s NIC (`--net ...,name=`), if it has one
/// whose MAC follows its name.
fn mac_of(s: &Sandbox) -> Option<String> {
    match s.network {
        Network::User | Network::Tap { .. } | Network::Bridge { .. } => {
            Some(mac_text(keystone_vmm::net::mac_from_name(&s.name)))
        }
        Network::Macvtap { .. } | Network::None | Network::Policy => None,
    }
}

/// The next free index of `<prefix>-<k>` names in `list`.
fn next_index(list: &[Sandbox], prefix: &str) -> u32 {
    list.iter()
        .filter_map(|s| s.name.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok())
        .max()
        .map_or(1, |k: u32| k + 1)
}

/// The snapshot to fork from (see the module docs).
fn pick_snapshot(
    paths: &AgentPaths,
    parent: &Sandbox,
    tag: Option<&str>,
) -> Result<(SnapshotInfo, bool), AgentError> {
    let list = snapshot::list_of(parent);
    if let Some(tag) = tag {
        return list
            .into_iter()
            .find(|i| i.tag == tag)
            .map(|i| (i, false))
            .ok_or_else(|| {
                AgentError::Usage(format!("sandbox {} has no snapshot {tag}", parent.name))
            });
    }
    if parent.status == Status::Running {
        let tag = format!(
            "fork-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        return snapshot::take(paths, &parent.name, Some(&tag), true).map(|i| (i, true));
    }
    list.into_iter()
        .next_back()
        .map(|i| (i, false))
        .ok_or_else(|| {
            AgentError::NotRunning(format!(
                "{} (and it has no snapshot to fork: start it, or give --snapshot)",
                parent.name
            ))
        })
}

/// Under the registry lock: `count` new sandboxes like `parent`, marked
/// `starting` by us.
fn reserve(
    paths: &AgentPaths,
    parent: &Sandbox,
    prefix: &str,
    count: u32,
    origin: &ForkOrigin,
    me: Option<ProcessId>,
) -> Result<Vec<Sandbox>, AgentError> {
    paths.registry().update(|list| {
        let first = next_index(list, prefix);
        let mut made = Vec::new();
        for k in first..first + count {
            let name = format!("{prefix}-{k}");
            validate_name(&name)?;
            let dir = paths.sandbox_dir(&name);
            if dir.exists() {
                return Err(AgentError::Usage(format!(
                    "{} exists (left by another sandbox {name}): choose another --prefix",
                    dir.display()
                )));
            }
            let mut child = Sandbox::new(&name, &parent.project_path, dir, free_cid(list))?;
            child.memory_mib = parent.memory_mib;
            child.vcpus = parent.vcpus;
            child.nested = parent.nested;
            child.network = parent.network.clone();
            child.sync_mode = parent.sync_mode;
            child.status = Status::Starting;
            child.starter = me;
            child.image = parent.image.clone();
            child.forked_from = Some(origin.clone());
            list.push(child.clone());
            made.push(child);
        }
        Ok(made)
    })
}

/// A child's files (state directory, disk copy, pinned host keys) and its
/// recorded launch.
fn prepare(
    st: &Starting,
    parent: &Sandbox,
    child: &mut Sandbox,
    image: &Image,
    snap_dir: &Path,
    vmm: &Path,
) -> Result<(), AgentError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e: std::io::Error| st.internal(format!("{p}: {e}"))
    };
    std::fs::create_dir_all(&child.state_dir).map_err(io(&child.state_dir))?;
    std::fs::set_permissions(&child.state_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(&child.state_dir))?;
    let staging = snapshot::staging_dir(child);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    snapshot::copy_disk(&snap_dir.join("disk.ext4"), &child.disk).map_err(|e| st.failed(e))?;
    if parent.host_keys().exists() {
        std::fs::copy(parent.host_keys(), child.host_keys()).map_err(io(&child.host_keys()))?;
    }
    let args =
        vmm_process::launch_args(child, image, None, Some(snap_dir)).map_err(|e| st.failed(e))?;
    let launch = Launch {
        vmm: vmm.to_path_buf(),
        args,
        resume: Some(snap_dir.to_path_buf()),
    };
    child.launch = Some(launch.clone());
    st.reg
        .modify(st.name, |s| s.launch = Some(launch))
        .map_err(|e| st.internal(e.to_string()))?;
    Ok(())
}

/// `fork`: see the module docs. `progress` gets one-line notes.
pub fn fork(
    paths: &AgentPaths,
    opts: &ForkOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Forked, AgentError> {
    let t0 = Instant::now();
    validate_name(&opts.name)?;
    if !(1..=MAX_CHILDREN).contains(&opts.count) {
        return Err(AgentError::Usage(format!(
            "fork {} {}: from 1 to {MAX_CHILDREN} children",
            opts.name, opts.count
        )));
    }
    let prefix = opts
        .prefix
        .clone()
        .unwrap_or_else(|| format!("{}-fork", opts.name));
    validate_name(&format!("{prefix}-{MAX_CHILDREN}"))?;
    let reg = paths.registry();
    let parent = reg
        .get(&opts.name)?
        .ok_or_else(|| AgentError::NotFound(opts.name.clone()))?
        .observed();
    let image_ref = parent.image.clone().ok_or_else(|| {
        AgentError::NotRunning(format!("{} (it never ran: nothing to fork)", opts.name))
    })?;
    let host = HostReport::inspect();
    lifecycle::check_kvm(&host)?;
    let image = Image::load(&image_ref.dir)
        .map_err(|e| AgentError::Image(format!("the image sandbox {} ran: {e}", opts.name)))?;
    lifecycle::check_flavor(&host, &image)?;
    let vmm = vmm_process::resolve_vmm()?;
    let timeout = lifecycle::ready_timeout()?;

    let (info, new_snapshot) = pick_snapshot(paths, &parent, opts.snapshot.as_deref())?;
    if info.image_hash.as_deref() != Some(image.manifest.content_hash.as_str()) {
        return Err(AgentError::Snapshot(format!(
            "snapshot {} was taken on another guest image than {}",
            info.tag,
            image.dir.display()
        )));
    }
    let snap_dir = snapshot::dir_of(&parent, &info.tag);
    let origin = ForkOrigin {
        sandbox: parent.name.clone(),
        snapshot: info.tag.clone(),
    };
    let me = ProcessId::current();
    let children = reserve(paths, &parent, &prefix, opts.count, &origin, me)?;
    progress(&format!(
        "forking {} from snapshot {} into {}",
        parent.name,
        info.tag,
        children
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    // Files and supervisors of all first, so the restores overlap.
    let mut failed = Vec::new();
    let mut spawned = Vec::new();
    for mut child in children {
        let name = child.name.clone();
        let st = Starting {
            reg: &reg,
            name: &name,
            me,
        };
        let started = prepare(&st, &parent, &mut child, &image, &snap_dir, &vmm).and_then(|()| {
            vmm_process::spawn_supervisor(paths, &child)
                .map_err(|reason| st.internal(format!("sandbox {name}: {reason}")))
        });
        match started {
            Ok(proc) => spawned.push((child, proc, Instant::now())),
            Err(e) => failed.push((name, e)),
        }
    }
    let mut ready = Vec::new();
    for (child, mut proc, at) in spawned {
        let name = child.name.clone();
        let st = Starting {
            reg: &reg,
            name: &name,
            me,
        };
        let branch = format!("keystone/{name}");
        let done = lifecycle::wait_ready(&st, &mut proc, &child, at, timeout).and_then(|s| {
            if image.manifest.ssh {
                session::open_master(&s);
                let r = Restored {
                    hostname: Some(name.clone()),
                    mac: mac_of(&s),
                    branch: Some(branch.clone()),
                };
                if let Err(e) = session::after_restore(&s, &r) {
                    lifecycle::stop_sandbox(&reg, &s);
                    return Err(st.failed(e));
                }
            }
            Ok(s)
        });
        match done {
            Ok(sandbox) => ready.push(Child {
                sandbox,
                branch,
                ready: at.elapsed(),
            }),
            Err(e) => failed.push((name, e)),
        }
    }
    Ok(Forked {
        snapshot: info,
        new_snapshot,
        children: ready,
        failed,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_count_on_from_the_highest() {
        let named = |n: &str| Sandbox::new(n, Path::new("/p"), "/d".into(), 3).unwrap();
        assert_eq!(next_index(&[], "p-fork"), 1);
        let list = [
            named("p"),
            named("p-fork-2"),
            named("p-fork-x"),
            named("p-fork2-9"),
            named("p-fork-10"),
        ];
        assert_eq!(next_index(&list, "p-fork"), 11);
    }

    #[test]
    fn macs_follow_the_child_name() {
        let m = mac_text([0x02, 0xab, 0, 1, 0x10, 0xff]);
        assert_eq!(m, "02:ab:00:01:10:ff");
        assert_ne!(
            keystone_vmm::net::mac_from_name("p-fork-1"),
            keystone_vmm::net::mac_from_name("p-fork-2")
        );
    }
}
