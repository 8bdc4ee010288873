//! The sandbox's persistent disk, and the host-side git it needs.
//!
//! Contract with the guest image: an ext4 file system labelled
//! `keystone-data` (a 16 GiB sparse file) holding `upper/workspace/` (the
//! project cloned with git: every branch a local branch, the host's current
//! branch checked out, no remotes, no hooks) and an empty `work/`; the guest
//! mounts it as the upper layer of an overlay over its read-only root, so
//! `/workspace` is the clone.
//!
//! The clone is made with real git from the host repository (a fetch into
//! a fresh repository, so objects are copied, never hard-linked), in a
//! staging directory under the sandbox directory that is removed afterwards;
//! `mkfs.ext4 -d` copies it into the new file system. Git never runs hooks
//! here: the fresh repository has no templates and `core.hooksPath` is
//! `/dev/null` for every command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// File-system label of the persistent disk.
pub const DISK_LABEL: &str = "keystone-data";
/// The persistent disk's size (a sparse file).
pub const DISK_SIZE: &str = "16G";

/// Errors preparing the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `path` is not inside a git work tree.
    #[error("{0} is not a git repository")]
    NotGitRepo(PathBuf),
    /// A tool is missing.
    #[error("{tool} not found: {hint}")]
    Missing {
        /// The program.
        tool: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Command {
        /// What was run.
        what: String,
        /// Its exit status and last error line.
        detail: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A `git` command that ignores the caller's repository environment
/// (`GIT_DIR` and friends) and never runs hooks.
fn git() -> Command {
    let mut c = Command::new("git");
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_CEILING_DIRECTORIES",
    ] {
        c.env_remove(var);
    }
    c.env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "core.hooksPath=/dev/null"])
        .stdin(Stdio::null());
    c
}

/// Runs `cmd`, returning its stdout; `what` names it in errors.
fn run(cmd: &mut Command, what: &str) -> Result<String, DiskError> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DiskError::Missing {
                tool: if what.starts_with("mkfs") {
                    "mkfs.ext4"
                } else {
                    "git"
                },
                hint: "install it (git; e2fsprogs 1.43 or newer for mkfs.ext4 -d)",
            }
        } else {
            DiskError::Command {
                what: what.to_string(),
                detail: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(DiskError::Command {
            what: what.to_string(),
            detail: format!("{}: {last}", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The top level of the git work tree containing `path`, canonical.
pub fn git_toplevel(path: &Path) -> Result<PathBuf, DiskError> {
    let not_repo = || DiskError::NotGitRepo(path.to_path_buf());
    if !path.is_dir() {
        return Err(not_repo());
    }
    let out = git()
        .arg("-C")
        .arg(path)
        .args(["rev-parse", "--show-toplevel"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DiskError::Missing {
                tool: "git",
                hint: "install git",
            },
            _ => not_repo(),
        })?;
    let top = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    if !out.status.success() || top.is_empty() {
        return Err(not_repo());
    }
    std::fs::canonicalize(&top).map_err(io_err(Path::new(&top)))
}

/// What a new disk holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskReport {
    /// The branch checked out (None: detached HEAD or an empty repository).
    pub branch: Option<String>,
    /// Local branches in the clone.
    pub branches: usize,
}

/// Removes a directory tree when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Finds `mkfs.ext4` on PATH or in the sbin directories.
fn mkfs_ext4() -> Result<PathBuf, DiskError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .ok_or(DiskError::Missing {
            tool: "mkfs.ext4",
            hint: "install e2fsprogs (1.43 or newer)",
        })
}

/// Clones `project` (a git work tree's top level) into `dest` (which must
/// not exist): all branches and tags, the host's current branch checked
/// out (or its detached commit), no remote.
pub fn clone_project(
    project: &Path,
    dest: &Path,
    templates: &Path,
) -> Result<DiskReport, DiskError> {
    let head = git()
        .arg("-C")
        .arg(project)
        .args(["symbolic-ref", "-q", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|r| r.starts_with("refs/heads/"));
    let branch = head
        .as_deref()
        .map(|r| r["refs/heads/".len()..].to_string());
    let mut template = OsString::from("--template=");
    template.push(templates);
    let mut init = git();
    init.args(["init", "--quiet"]).arg(template);
    if let Some(b) = &branch {
        init.arg(format!("--initial-branch={b}"));
    }
    init.arg(dest);
    run(&mut init, "git init")?;
    run(
        git()
            .arg("-C")
            .arg(dest)
            .args(["fetch", "--quiet", "--update-head-ok", "--no-auto-gc"])
            .arg(project)
            .args(["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]),
        "git fetch from the project",
    )?;
    let host_has_head = git()
        .arg("-C")
        .arg(project)
        .args(["rev-parse", "-q", "--verify", "HEAD"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if host_has_head {
        if branch.is_none() {
            // Detached on the host: detached on the same commit here.
            let fetch_head = "refs/keystone-clone/host-head";
            run(
                git()
                    .arg("-C")
                    .arg(dest)
                    .args(["fetch", "--quiet", "--no-auto-gc"])
                    .arg(project)
                    .arg(format!("+HEAD:{fetch_head}")),
                "git fetch of the project's HEAD",
            )?;
            run(
                git()
                    .arg("-C")
                    .arg(dest)
                    .args(["update-ref", "--no-deref", "HEAD", fetch_head]),
                "git update-ref",
            )?;
            run(
                git()
                    .arg("-C")
                    .arg(dest)
                    .args(["update-ref", "-d", fetch_head]),
                "git update-ref -d",
            )?;
        }
        run(
            git()
                .arg("-C")
                .arg(dest)
                .args(["reset", "--hard", "--quiet"]),
            "git checkout",
        )?;
    }
    let branches = run(
        git()
            .arg("-C")
            .arg(dest)
            .args(["for-each-ref", "--format=%(refname)", "refs/heads/"]),
        "git for-each-ref",
    )?
    .lines()
    .count();
    Ok(DiskReport { branch, branches })
}

/// Makes the persistent disk `disk` (replacing any) for `project`: clones
/// it into a staging directory under `work_dir`, builds the file system
/// into `disk.tmp` and renames it over `disk`, so a failure never leaves a
/// half-made disk. The staging directory is removed in every case.
pub fn create_disk(project: &Path, work_dir: &Path, disk: &Path) -> Result<DiskReport, DiskError> {
    let mkfs = mkfs_ext4()?;
    let staging = Staging(work_dir.join(format!(".staging-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&staging.0);
    let templates = staging.0.join("templates");
    let root = staging.0.join("root");
    for d in [&templates, &root.join("upper"), &root.join("work")] {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let report = clone_project(project, &root.join("upper").join("workspace"), &templates)?;
    let mut tmp = disk.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let made = run(
        Command::new(&mkfs)
            .args(["-q", "-F", "-L", DISK_LABEL, "-d"])
            .arg(&root)
            .arg(&tmp)
            .arg(DISK_SIZE)
            .stdin(Stdio::null()),
        "mkfs.ext4",
    );
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, disk).map_err(io_err(disk))?;
    Ok(report)
}
