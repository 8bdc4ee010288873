//! `keystone agent sync`: bring the sandbox's committed git history back to
//! the host. Host-initiated, over SSH over vsock:
//!
//! 1. ask the guest which commits the host does not have yet (per branch)
//!    and what is uncommitted (never synced);
//! 2. `git fetch` them into `refs/keystone/<name>/*` (objects checked with
//!    `transfer.fsckObjects`, no hooks);
//! 3. fast-forward the host's *current* branch when its tree is clean and
//!    the sandbox's branch of the same name descends from it. The host
//!    branch is never switched and nothing is ever pushed into the guest.
//!
//! The gate: a fast-forward puts guest-written files in the live work
//! tree, and some files the host's tools run or obey without being asked
//! (git hooks and hook managers, direnv, task runners, editor tasks, CI
//! workflows, git attributes and LFS settings: [`host_executable`]). When
//! the sandbox changed any of them, the commits stay in
//! `refs/keystone/<name>/*`, the paths are listed, and only an explicit
//! `sync --allow-executable-changes` fast-forwards (the automatic modes
//! never do). No filter driver runs during a fast-forward: the global and
//! system git config are not read for it, and a repository with filter
//! drivers in its own config is held the same way.
//!
//! `--artifacts` copies build outputs (dist/ build/ target/ .next/ out/)
//! from the guest as a tar stream, accepting only regular files and
//! directories whose paths stay inside the project.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use super::ssh::{self, sanitize, SshError, Target, UserKey, WORKSPACE};

/// Exit codes of `sync`.
pub mod exit {
    /// Synced (or, with --dry-run, something would sync).
    pub const OK: u8 = 0;
    /// Sandbox not found or not running.
    pub const NOT_RUNNING: u8 = 1;
    /// Nothing to sync.
    pub const NOTHING: u8 = 2;
    /// The host branch cannot be fast-forwarded.
    pub const NO_FAST_FORWARD: u8 = 3;
}

/// Longest a fetch from the guest may take.
pub const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);
/// Most bytes a fetch reads from the guest (the SSH stream carrying the
/// ref listing and the pack): the proxy cuts the connection past it.
pub const FETCH_MAX_BYTES: u64 = 2 << 30;
/// Most guest branches one sync fetches (each becomes a host ref).
pub const MAX_REFS: usize = 10_000;
/// Most bytes `--artifacts` reads from the guest, and the largest file.
pub const ARTIFACTS_MAX_BYTES: u64 = 8 << 30;
/// Most entries `--artifacts` accepts.
pub const ARTIFACTS_MAX_ENTRIES: usize = 200_000;

/// Build output directories `--artifacts` copies.
pub const ARTIFACT_DIRS: &[&str] = &["dist", "build", "target", ".next", "out"];

/// Errors syncing.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reaching the guest.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// More guest branches than one sync takes.
    #[error("the sandbox has {0} branches; sync fetches at most {MAX_REFS} (delete some in the sandbox)")]
    TooManyRefs(usize),
    /// The guest sent more than [`FETCH_MAX_BYTES`] during the fetch.
    #[error("the fetch was cut: the sandbox sent more than {} MiB (nothing was kept)", FETCH_MAX_BYTES >> 20)]
    TooLarge,
    /// A host git command failed.
    #[error("git {args}: {msg}")]
    Git {
        /// What was run.
        args: String,
        /// Its stderr.
        msg: String,
    },
    /// The guest answered something unexpected.
    #[error("sandbox: {0}")]
    Guest(String),
    /// Writing artifacts.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One commit the guest has and the host does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCommit {
    /// Abbreviated hash.
    pub short: String,
    /// Subject (sanitised).
    pub subject: String,
}

/// What the guest holds that the host does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// New commits, per guest branch.
    pub branches: BTreeMap<String, Vec<NewCommit>>,
    /// `git status --porcelain` lines of the guest workspace (sanitised).
    pub uncommitted: Vec<String>,
    /// Every guest branch (names as git has them, each checked with
    /// [`valid_branch`]): exactly these are fetched, nothing the guest
    /// advertises besides.
    pub refs: Vec<String>,
    /// Guest branch names that are not valid git branch names (skipped).
    pub bad_refs: usize,
}

impl Pending {
    /// Number of new commits over all branches (a commit on two branches
    /// counts twice).
    pub fn commit_count(&self) -> usize {
        self.branches.values().map(Vec::len).sum()
    }
}

/// What `sync` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing new in the sandbox.
    Nothing,
    /// Dry run: this would be fetched.
    WouldSync,
    /// Fetched; the host branch was fast-forwarded to `to` (or was already
    /// there / has no counterpart in the sandbox when `None`).
    Synced {
        /// New host branch tip, when it moved.
        to: Option<String>,
    },
    /// Fetched, but held: the sandbox changed files the host runs
    /// ([`host_executable`]), or the repository configures filter drivers.
    Held {
        /// The paths (or the filter drivers) that held it.
        paths: Vec<String>,
        /// The fetched branch (`refs/keystone/<name>/<branch>`).
        theirs: String,
    },
    /// Fetched, but the host branch cannot fast-forward; `hint` is the
    /// exact command to run.
    NoFastForward {
        /// Why.
        reason: String,
        /// The command to run.
        hint: String,
    },
}

/// How a host git command is configured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostGit {
    /// Never running hooks (`core.hooksPath=/dev/null`): a fast-forward
    /// checks out files the guest wrote, and repositories can keep their
    /// hooks in the tree (e.g. husky's `core.hooksPath`).
    NoHooks,
    /// No hooks, and neither the global nor the system config read: no
    /// filter driver from there (git-lfs installs its smudge there) runs on
    /// the sandbox's files.
    Isolated,
    /// The repository's configuration as it is, to read a setting.
    AsConfigured,
}

/// Host git with hooks off ([`HostGit::NoHooks`]).
fn git(project: &Path, args: &[&str]) -> Result<String, SyncError> {
    git_in(project, HostGit::NoHooks, args)
}

/// Host git with hooks off and `input` on its stdin.
fn git_with_input(project: &Path, args: &[&str], input: &[u8]) -> Result<(), SyncError> {
    let fail = |msg: String| SyncError::Git {
        args: args.join(" "),
        msg,
    };
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(project)
        .args(["-c", "core.hooksPath=/dev/null"])
        .args(args);
    let run = ssh::run_bounded_with_input(cmd, input, std::time::Duration::from_secs(120), 0)
        .map_err(|e| fail(e.to_string()))?;
    match run.status {
        Some(st) if st.success() => Ok(()),
        _ => Err(fail(run.stderr_line())),
    }
}

/// Host git in `project`, configured as `how`; returns trimmed stdout.
fn git_in(project: &Path, how: HostGit, args: &[&str]) -> Result<String, SyncError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(project);
    if how != HostGit::AsConfigured {
        cmd.args(["-c", "core.hooksPath=/dev/null"]);
    }
    if how == HostGit::Isolated {
        cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1");
    }
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SyncError::Git {
            args: args.join(" "),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SyncError::Git {
            args: args.join(" "),
            msg: sanitize(String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
}

/// The refs namespace sync fetches into.
pub fn ref_prefix(name: &str) -> String {
    format!("refs/keystone/{name}/")
}

/// Ask the guest what it holds beyond what the host has (the tips of the
/// host's branches and of its `refs/keystone/<name>/*`).
pub fn pending(t: &Target, key: &UserKey, project: &Path) -> Result<Pending, SyncError> {
    let known = git(
        project,
        &[
            "for-each-ref",
            "--format=%(objectname)",
            "refs/heads",
            &ref_prefix(&t.name),
        ],
    )?;
    let shas = known_tips(&known);
    let (status, out) = ssh::capture_with_input(t, key, &pending_script(WORKSPACE), &shas)?;
    if !status.success() {
        return Err(SyncError::Guest(format!(
            "listing commits in {WORKSPACE} failed ({status})"
        )));
    }
    Ok(parse_pending(&String::from_utf8_lossy(&out)))
}

/// The host's ref tips (hex object names only), one per line, for the
/// guest's stdin.
fn known_tips(for_each_ref: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for s in for_each_ref
        .lines()
        .filter(|s| s.len() >= 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        v.extend_from_slice(s.as_bytes());
        v.push(b'\n');
    }
    v
}

/// The listing the guest runs in `workspace`: the host's ref tips arrive on
/// stdin (any number: nothing about them is on the command line), those the
/// guest has are excluded from each branch's log.
fn pending_script(workspace: &str) -> String {
    format!(
        "cd {workspace} || exit 90\n\
         not=$(mktemp) || exit 92\n\
         git cat-file --batch-check='%(objectname) %(objecttype)' | awk '$2 == \"commit\" {{ print \"^\" $1 }}' > \"$not\"\n\
         git for-each-ref --format='R%00%(refname)' refs/heads\n\
         git for-each-ref --format='%(refname:short)' refs/heads | while IFS= read -r b; do\n\
           git log --format=\"B%x00$b%x00%h%x00%s\" \"refs/heads/$b\" --stdin -- < \"$not\" || exit 91\n\
         done\n\
         rm -f \"$not\"\n\
         git status --porcelain | sed 's/^/U\\x00/'\n"
    )
}

/// Parse the guest's listing (`B\0branch\0hash\0subject` and `U\0status`
/// lines). Unknown lines are ignored.
pub fn parse_pending(out: &str) -> Pending {
    let mut p = Pending::default();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\0').collect();
        match f.as_slice() {
            ["B", branch, short, subject @ ..] => p
                .branches
                .entry(sanitize(branch))
                .or_default()
                .push(NewCommit {
                    short: sanitize(short),
                    subject: sanitize(&subject.join(" ")),
                }),
            ["U", status] => p.uncommitted.push(sanitize(status)),
            ["R", full] => match full.strip_prefix("refs/heads/").filter(|b| valid_branch(b)) {
                Some(b) => p.refs.push(b.to_string()),
                None => p.bad_refs += 1,
            },
            _ => {}
        }
    }
    p
}

/// Whether `b` is a branch name git accepts (`git check-ref-format
/// --branch`'s rules, stricter where cheap): it is then safe inside a
/// refspec line (no `:`, `*`, `^`, whitespace or control character).
pub fn valid_branch(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 1024
        && !b.starts_with(['-', '/', '.'])
        && !b.ends_with(['/', '.'])
        && !b.ends_with(".lock")
        && !b.contains("..")
        && !b.contains("//")
        && !b.contains("@{")
        && !b.contains("/.")
        && b != "@"
        && !b
            .bytes()
            .any(|c| c <= b' ' || c == 0x7f || b"~^:?*[\\".contains(&c))
}

/// Print the report every sync starts with.
pub fn report(p: &Pending) -> String {
    let mut s = String::new();
    if p.commit_count() == 0 {
        s.push_str("No new commits in sandbox.\n");
    } else {
        s.push_str("New commits in sandbox:\n");
        for (branch, commits) in &p.branches {
            if commits.is_empty() {
                continue;
            }
            s.push_str(&format!("  {branch}:\n"));
            for c in commits {
                s.push_str(&format!("    {} {}\n", c.short, c.subject));
            }
        }
    }
    if p.bad_refs > 0 {
        s.push_str(&format!(
            "Skipped {} sandbox branch name{} git would refuse.\n",
            p.bad_refs,
            if p.bad_refs == 1 { "" } else { "s" }
        ));
    }
    if !p.uncommitted.is_empty() {
        s.push_str("Uncommitted changes (will NOT sync):\n");
        for u in &p.uncommitted {
            s.push_str(&format!("  {u}\n"));
        }
    }
    s
}

/// Commits fetched earlier into `refs/keystone/<name>/<branch>` that the
/// host's current branch does not have yet (e.g. a fast-forward refused
/// because the host tree was dirty): `(branch, count)`.
pub fn fetched_not_merged(project: &Path, name: &str) -> Option<(String, usize)> {
    let branch = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok()?;
    let theirs = format!("{}{branch}", ref_prefix(name));
    git(project, &["rev-parse", "--verify", "--quiet", &theirs]).ok()?;
    let n: usize = git(
        project,
        &["rev-list", "--count", &format!("HEAD..{theirs}")],
    )
    .ok()?
    .parse()
    .ok()?;
    (n > 0).then_some((branch, n))
}

/// Fetch the sandbox's branches (`refs`, from [`pending`]) into
/// `refs/keystone/<name>/*` and fast-forward the host's current branch when
/// safe.
pub fn fetch_and_fast_forward(
    t: &Target,
    key: &UserKey,
    project: &Path,
    refs: &[String],
    allow_executable: bool,
) -> Result<Outcome, SyncError> {
    // ssh under `keystone agent __capped`: the pack is cut at the cap even
    // when ssh rides the master (whose connection no proxy cap covers).
    let opts = ssh::ssh_options_for_fetch(t, key, FETCH_MAX_BYTES)?;
    let capped = [
        ssh::self_exe().to_string_lossy().into_owned(),
        "agent".into(),
        "__capped".into(),
        "--max-bytes".into(),
        FETCH_MAX_BYTES.to_string(),
        "--".into(),
        "ssh".into(),
    ];
    let ssh_cmd = capped
        .iter()
        .chain(opts.iter())
        .map(|o| ssh::shell_quote(o))
        .collect::<Vec<_>>()
        .join(" ");
    let remote = Remote {
        url: format!("ssh://{}@{}{WORKSPACE}", ssh::GUEST_USER, t.alias()),
        protocol: "ssh",
        // OpenSSH behind the wrapper (git cannot tell from its name).
        env: vec![
            ("GIT_SSH_COMMAND", ssh_cmd),
            ("GIT_SSH_VARIANT", "ssh".into()),
        ],
    };
    fetch_refs(project, &t.name, refs, &remote, FETCH_TIMEOUT)?;
    fast_forward(project, &t.name, allow_executable)
}

/// Where a fetch reads from.
struct Remote {
    url: String,
    /// The one transport allowed (`protocol.<p>.allow=always`).
    protocol: &'static str,
    env: Vec<(&'static str, String)>,
}

/// Step 2: fetch exactly the branches `refs` from `remote` into
/// `refs/keystone/<name>/*` and delete the refs there whose branch the
/// guest no longer has. At most [`MAX_REFS`]; the refspecs go over stdin.
/// Every object lands in one pack (`fetch.unpackLimit=1`), so a fetch that
/// fails or is cut leaves nothing: its `tmp_pack_*` files are removed.
fn fetch_refs(
    project: &Path,
    name: &str,
    refs: &[String],
    remote: &Remote,
    limit: std::time::Duration,
) -> Result<(), SyncError> {
    if refs.len() > MAX_REFS {
        return Err(SyncError::TooManyRefs(refs.len()));
    }
    let prefix = ref_prefix(name);
    if !refs.is_empty() {
        let refspecs: String = refs
            .iter()
            .map(|b| format!("+refs/heads/{b}:{prefix}{b}\n"))
            .collect();
        let allow = format!("protocol.{}.allow=always", remote.protocol);
        let mut fetch = Command::new("git");
        fetch.arg("-C").arg(project).args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "transfer.fsckObjects=true",
            "-c",
            "fetch.fsckObjects=true",
            "-c",
            "fetch.unpackLimit=1",
            "-c",
            "protocol.version=2",
            "-c",
            "protocol.allow=never",
            "-c",
            &allow,
            "fetch",
            "--no-tags",
            "--no-recurse-submodules",
            "--no-write-fetch-head",
            "--quiet",
            "--stdin",
            &remote.url,
        ]);
        fetch.envs(remote.env.iter().map(|(k, v)| (k, v)));
        fetch.env("GIT_TERMINAL_PROMPT", "0");
        let leftovers = PackLeftovers::before(project);
        let run = ssh::run_bounded_with_input(fetch, refspecs.as_bytes(), limit, 64 * 1024)?;
        if run.status.is_none_or(|st| !st.success()) {
            leftovers.remove_new();
            if String::from_utf8_lossy(&run.stderr).contains(ssh::GUEST_OVER_CAP) {
                return Err(SyncError::TooLarge);
            }
            return Err(SyncError::Git {
                args: "fetch".into(),
                msg: match run.status {
                    Some(st) => format!("failed ({st}): {}", run.stderr_line()),
                    None => format!("no progress within {} s", limit.as_secs()),
                },
            });
        }
    }
    // Prune: refs under the prefix whose branch is gone from the guest.
    let have = git(project, &["for-each-ref", "--format=%(refname)", &prefix])?;
    let keep: std::collections::BTreeSet<String> =
        refs.iter().map(|b| format!("{prefix}{b}")).collect();
    let deletes: String = have
        .lines()
        .filter(|r| !r.is_empty() && !keep.contains(*r))
        .map(|r| format!("delete {r}\n"))
        .collect();
    if !deletes.is_empty() {
        git_with_input(project, &["update-ref", "--stdin"], deletes.as_bytes())?;
    }
    Ok(())
}

/// The `tmp_*` files in the repository's pack directory before a fetch, to
/// remove what a failed one left (index-pack's `tmp_pack_*`, `tmp_idx_*`,
/// `tmp_rev_*`); those that were there before are not ours.
struct PackLeftovers {
    dir: Option<PathBuf>,
    before: std::collections::BTreeSet<std::ffi::OsString>,
}

impl PackLeftovers {
    fn before(project: &Path) -> PackLeftovers {
        let dir = git(project, &["rev-parse", "--git-common-dir"])
            .ok()
            .map(|d| project.join(d).join("objects").join("pack"));
        let before = dir.as_deref().map(Self::tmp_files).unwrap_or_default();
        PackLeftovers { dir, before }
    }

    fn tmp_files(dir: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("tmp_"))
            .collect()
    }

    fn remove_new(&self) {
        let Some(dir) = &self.dir else { return };
        for name in Self::tmp_files(dir) {
            if !self.before.contains(&name) {
                let _ = std::fs::remove_file(dir.join(&name));
            }
        }
    }
}

/// Step 3 (after the fetch): fast-forward the host's current branch to the
/// sandbox `name`'s branch of the same name, through the gate (see the
/// module docs) unless `allow_executable`.
pub fn fast_forward(
    project: &Path,
    name: &str,
    allow_executable: bool,
) -> Result<Outcome, SyncError> {
    let Ok(branch) = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]) else {
        return Ok(Outcome::Synced { to: None });
    };
    let theirs = format!("{}{branch}", ref_prefix(name));
    if git(project, &["rev-parse", "--verify", "--quiet", &theirs]).is_err() {
        return Ok(Outcome::Synced { to: None });
    }
    if git(project, &["merge-base", "--is-ancestor", &theirs, "HEAD"]).is_ok() {
        return Ok(Outcome::Synced { to: None });
    }
    if git(project, &["merge-base", "--is-ancestor", "HEAD", &theirs]).is_err() {
        return Ok(Outcome::NoFastForward {
            reason: format!("'{branch}' and the sandbox's '{branch}' have diverged"),
            hint: format!("git merge {theirs}   # or: git rebase {theirs}"),
        });
    }
    let dirty = git(project, &["status", "--porcelain", "--untracked-files=no"])?;
    if !dirty.is_empty() {
        return Ok(Outcome::NoFastForward {
            reason: format!("the host's '{branch}' has uncommitted changes"),
            hint: format!("git stash && git merge --ff-only {theirs} && git stash pop"),
        });
    }
    if !allow_executable {
        let held = held_by(project, &theirs)?;
        if !held.is_empty() {
            return Ok(Outcome::Held {
                paths: held,
                theirs,
            });
        }
    }
    let merged = git_in(
        project,
        HostGit::Isolated,
        &["merge", "--ff-only", "--quiet", &theirs],
    );
    if let Err(e) = merged {
        return Ok(Outcome::NoFastForward {
            reason: format!("git refused the fast-forward ({e})"),
            hint: format!("git merge --ff-only {theirs}   # after moving the files it names"),
        });
    }
    let to = git(project, &["rev-parse", "--short", "HEAD"])?;
    Ok(Outcome::Synced { to: Some(to) })
}

/// Top-level directories whose files host tools run or obey: git hooks
/// (husky and plain hook directories), CI workflows, editor and container
/// settings (tasks, terminal profiles), cargo's config (build runners).
const EXECUTABLE_DIRS: &[&str] = &[
    ".husky/",
    ".githooks/",
    ".git-hooks/",
    ".github/workflows/",
    ".vscode/",
    ".idea/",
    ".devcontainer/",
    ".cargo/",
];

/// File names, at any depth, that host tools run or obey: hook managers,
/// direnv, task runners and package scripts, git attributes (filters),
/// submodules and LFS settings, package-manager settings.
const EXECUTABLE_NAMES: &[&str] = &[
    ".pre-commit-config.yaml",
    "lefthook.yml",
    "lefthook.yaml",
    ".lefthook.yml",
    ".lefthook.yaml",
    "lefthook-local.yml",
    ".envrc",
    "package.json",
    "Makefile",
    "makefile",
    "GNUmakefile",
    "justfile",
    "Justfile",
    "Taskfile.yml",
    "Taskfile.yaml",
    ".gitattributes",
    ".gitmodules",
    ".lfsconfig",
    ".npmrc",
    ".yarnrc",
    ".yarnrc.yml",
    "mise.toml",
    ".mise.toml",
];

/// Whether `path` (relative to the work tree, `/`-separated) is a file the
/// host's tools run or obey without being asked; `hooks_path` is the host's
/// `core.hooksPath` when it points inside the work tree.
pub fn host_executable(path: &str, hooks_path: Option<&str>) -> bool {
    if EXECUTABLE_DIRS.iter().any(|d| path.starts_with(d)) {
        return true;
    }
    if let Some(h) = hooks_path
        .map(|h| h.trim_matches('/'))
        .filter(|h| !h.is_empty())
    {
        if path
            .strip_prefix(h)
            .is_some_and(|rest| rest.starts_with('/'))
        {
            return true;
        }
    }
    let name = path.rsplit('/').next().unwrap_or(path);
    EXECUTABLE_NAMES.contains(&name)
}

/// What holds a fast-forward of the current branch to `theirs`: the
/// host-executable paths it changes, and the filter drivers the
/// repository's own config defines (they would run on the sandbox's files).
fn held_by(project: &Path, theirs: &str) -> Result<Vec<String>, SyncError> {
    // The host's own setting (`git` overrides it with /dev/null).
    let hooks_path = git_in(
        project,
        HostGit::AsConfigured,
        &["config", "--get", "core.hooksPath"],
    )
    .ok()
    .map(|h| h.trim().to_string())
    .map(|h| h.strip_prefix("./").map(str::to_string).unwrap_or(h))
    .filter(|h| !h.is_empty() && !h.starts_with('/') && !h.starts_with('~'));
    let changed = git(
        project,
        &[
            "diff",
            "--name-only",
            "--no-renames",
            "--no-ext-diff",
            "-z",
            "HEAD",
            theirs,
        ],
    )?;
    let mut held: Vec<String> = changed
        .split('\0')
        .filter(|p| !p.is_empty() && host_executable(p, hooks_path.as_deref()))
        .map(sanitize)
        .collect();
    if let Ok(filters) = git(
        project,
        &[
            "config",
            "--local",
            "--name-only",
            "--get-regexp",
            r"^filter\.",
        ],
    ) {
        let mut drivers: Vec<String> = filters
            .lines()
            .filter_map(|k| k.strip_prefix("filter.")?.rsplit_once('.').map(|(d, _)| d))
            .map(|d| format!("filter driver '{}' (in .git/config)", sanitize(d)))
            .collect();
        drivers.dedup();
        held.extend(drivers);
    }
    Ok(held)
}

/// Whether `path` (relative) is a plain path that stays inside its root.
pub fn is_contained(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Copy the guest's build output directories into `project`. Returns the
/// number of files written and the entries refused (symlinks, links,
/// devices, paths leaving the project, host paths through a symlink).
pub fn copy_artifacts(
    t: &Target,
    key: &UserKey,
    project: &Path,
) -> Result<(usize, Vec<String>), SyncError> {
    let list = ARTIFACT_DIRS.join(" ");
    let remote = format!(
        "cd {WORKSPACE} || exit 90; set --; for d in {list}; do [ -e \"$d\" ] && set -- \"$@\" \"$d\"; done; \
         [ $# -eq 0 ] && exit 0; exec tar -cf - --no-acls --no-xattrs -- \"$@\""
    );
    let tracked: std::collections::HashSet<PathBuf> = git(project, &["ls-files", "-z"])?
        .split('\0')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect();
    let mut child = ssh::ssh_command(t, key, false, &remote)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SshError::Spawn)?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| SyncError::Guest("no tar stream".into()))?;
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(e) = stderr {
            let mut e = e.take(16 * 1024);
            let _ = e.read_to_end(&mut text);
            let _ = std::io::copy(&mut e.into_inner(), &mut std::io::sink());
        }
        sanitize(String::from_utf8_lossy(&text).trim())
    });
    let result = unpack_artifacts(stdout.take(ARTIFACTS_MAX_BYTES), project, &tracked);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(SshError::Spawn)?;
    let guest_errors = errors.join().unwrap_or_default();
    let r = result?;
    if !status.success() {
        return Err(SyncError::Guest(format!(
            "tar in the sandbox failed ({status}): {guest_errors}"
        )));
    }
    Ok(r)
}

/// Unpack a tar stream into `root`, accepting only regular files and
/// directories under one of [`ARTIFACT_DIRS`], never following a host
/// symlink, never replacing a file git tracks (`tracked`, relative paths).
/// Refused entries are reported, not fatal.
pub fn unpack_artifacts(
    r: impl Read,
    root: &Path,
    tracked: &std::collections::HashSet<PathBuf>,
) -> Result<(usize, Vec<String>), SyncError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut ar = tar::Archive::new(r);
    let mut written = 0;
    let mut refused = Vec::new();
    let entries = ar
        .entries()
        .map_err(|e| SyncError::Guest(format!("bad tar stream: {e}")))?;
    for (n, entry) in entries.enumerate() {
        if n >= ARTIFACTS_MAX_ENTRIES {
            refused.push(format!("everything after {ARTIFACTS_MAX_ENTRIES} entries"));
            break;
        }
        let mut entry = entry.map_err(|e| SyncError::Guest(format!("bad tar stream: {e}")))?;
        let Ok(path) = entry.path().map(|p| p.into_owned()) else {
            refused.push("<unreadable path>".into());
            continue;
        };
        let shown = sanitize(&path.to_string_lossy());
        let top_ok = path
            .components()
            .find(|c| !matches!(c, Component::CurDir))
            .is_some_and(|c| ARTIFACT_DIRS.iter().any(|d| c.as_os_str() == *d));
        if !is_contained(&path) || !top_ok {
            refused.push(format!("{shown} (outside the artifact directories)"));
            continue;
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            refused.push(format!("{shown} (not a regular file or directory)"));
            continue;
        }
        // No existing component of the destination may be a symlink.
        let mut cur = root.to_path_buf();
        let mut via_link = false;
        for c in path.components() {
            cur.push(c);
            if std::fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
                via_link = true;
                break;
            }
        }
        if via_link {
            refused.push(format!("{shown} (the host path is a symlink)"));
            continue;
        }
        let normal: PathBuf = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if kind.is_file() && tracked.contains(&normal) {
            refused.push(format!("{shown} (tracked by git: sync commits instead)"));
            continue;
        }
        let dest = root.join(&path);
        let werr = |source| SyncError::Write {
            path: dest.clone(),
            source,
        };
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).map_err(werr)?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(werr)?;
        }
        if dest.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            refused.push(format!("{shown} (a directory on the host)"));
            continue;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
        let tmp = dest.with_file_name(format!(
            ".{}.keystone-{}-{n}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
            .map_err(werr)?;
        let copied = std::io::copy(&mut entry, &mut f);
        drop(f);
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        if let Err(e) = std::fs::rename(&tmp, &dest) {
            let _ = std::fs::remove_file(&tmp);
            refused.push(format!("{shown} ({e})"));
            continue;
        }
        written += 1;
    }
    Ok((written, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host repository on `main` with one commit, removed on drop.
    struct Repo(PathBuf);

    impl Repo {
        fn new(tag: &str) -> Repo {
            let dir = std::env::temp_dir().join(format!("ks-sync-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let r = Repo(dir);
            r.git(&["init", "-q", "-b", "main"]);
            r.write("README", "one\n");
            r.commit("first");
            r
        }

        fn git(&self, args: &[&str]) -> String {
            let out = Command::new("git")
                .arg("-C")
                .arg(&self.0)
                .args(["-c", "user.name=T", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }

        fn write(&self, path: &str, text: &str) {
            let p = self.0.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        fn commit(&self, msg: &str) {
            self.git(&["add", "-A"]);
            self.git(&["commit", "-q", "-m", msg]);
        }

        /// A sandbox commit writing `files`, fetched as
        /// `refs/keystone/sb/main` the way sync leaves it; HEAD stays.
        fn sandbox_commit(&self, files: &[(&str, &str)]) {
            self.git(&["checkout", "-q", "-b", "guest"]);
            for (p, t) in files {
                self.write(p, t);
            }
            self.commit("from the sandbox");
            self.git(&["update-ref", "refs/keystone/sb/main", "guest"]);
            self.git(&["checkout", "-q", "main"]);
            self.git(&["branch", "-q", "-D", "guest"]);
        }

        fn head(&self) -> String {
            self.git(&["rev-parse", "HEAD"])
        }
    }

    impl Drop for Repo {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn thousands_of_host_refs_go_over_stdin_not_the_command_line() {
        let g = Repo::new("many");
        // 3500 refs, each to its own commit (git fast-import: real
        // git): their tips are more than one argument can hold (128 KiB).
        let base = g.head();
        let mut stream = String::new();
        for i in 0..3500 {
            let msg = format!("b{i}");
            stream.push_str(&format!(
                "commit refs/keep/b{i}\ncommitter T <t@t> 0 +0000\ndata {}\n{msg}\nfrom {base}\n\n",
                msg.len()
            ));
        }
        let mut fi = Command::new("git")
            .arg("-C")
            .arg(&g.0)
            .args(["fast-import", "--quiet"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(fi.stdin.as_mut().unwrap(), stream.as_bytes()).unwrap();
        drop(fi.stdin.take());
        assert!(fi.wait().unwrap().success());
        // The host knows all of that; the sandbox then commits on main.
        let known = g.git(&["for-each-ref", "--format=%(objectname)"]);
        g.write("new.txt", "n\n");
        g.commit("new work");
        let input = known_tips(&known);
        let script = pending_script(g.0.to_str().unwrap());
        assert!(
            input.len() > 128 * 1024,
            "more than one argument could hold"
        );
        assert!(
            script.len() < 1024,
            "the script does not grow with the refs"
        );
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(&script);
        let run =
            ssh::run_bounded_with_input(sh, &input, std::time::Duration::from_secs(120), 8 << 20)
                .unwrap();
        assert!(run.status.unwrap().success());
        let p = parse_pending(&String::from_utf8_lossy(&run.stdout));
        assert_eq!(p.refs, vec!["main"], "branches are listed, other refs not");
        assert_eq!(
            p.commit_count(),
            1,
            "{:?}",
            p.branches.keys().take(3).collect::<Vec<_>>()
        );
        assert_eq!(p.branches["main"][0].subject, "new work");
    }

    #[test]
    fn host_executable_paths_are_recognised() {
        for p in [
            ".husky/pre-commit",
            ".github/workflows/ci.yml",
            ".vscode/tasks.json",
            "package.json",
            "web/package.json",
            "Makefile",
            ".envrc",
            ".pre-commit-config.yaml",
            "lefthook.yml",
            ".gitattributes",
            ".lfsconfig",
            ".cargo/config.toml",
        ] {
            assert!(host_executable(p, None), "{p}");
        }
        for p in [
            "src/main.rs",
            "README.md",
            "docs/Makefile.md",
            "github/workflows/x",
        ] {
            assert!(!host_executable(p, None), "{p}");
        }
        assert!(host_executable("tools/hooks/pre-push", Some("tools/hooks")));
        assert!(host_executable(
            "tools/hooks/pre-push",
            Some("tools/hooks/")
        ));
        assert!(!host_executable("tools/hooksmith", Some("tools/hooks")));
    }

    #[test]
    fn changes_to_host_hooks_are_held_unless_allowed() {
        let r = Repo::new("hooks");
        r.git(&["config", "core.hooksPath", "hooks-dir"]);
        let before = r.head();
        r.sandbox_commit(&[
            ("hooks-dir/pre-commit", "#!/bin/sh\ntouch pwned\n"),
            ("src.txt", "x\n"),
        ]);
        match fast_forward(&r.0, "sb", false).unwrap() {
            Outcome::Held { paths, theirs } => {
                assert_eq!(paths, vec!["hooks-dir/pre-commit".to_string()]);
                assert_eq!(theirs, "refs/keystone/sb/main");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.head(), before, "not fast-forwarded");
        assert!(!r.0.join("hooks-dir/pre-commit").exists());
        // Explicitly allowed: fast-forwarded.
        match fast_forward(&r.0, "sb", true).unwrap() {
            Outcome::Synced { to: Some(_) } => {}
            other => panic!("{other:?}"),
        }
        assert!(r.0.join("hooks-dir/pre-commit").exists());
    }

    #[test]
    fn plain_source_changes_fast_forward_and_husky_is_held() {
        let r = Repo::new("plain");
        r.sandbox_commit(&[("src.txt", "x\n")]);
        assert!(matches!(
            fast_forward(&r.0, "sb", false).unwrap(),
            Outcome::Synced { to: Some(_) }
        ));
        assert!(r.0.join("src.txt").exists());
        r.sandbox_commit(&[
            (".husky/pre-commit", "npm test\n"),
            ("package.json", "{}\n"),
        ]);
        match fast_forward(&r.0, "sb", false).unwrap() {
            Outcome::Held { paths, .. } => {
                assert_eq!(paths, vec![".husky/pre-commit", "package.json"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn repository_filter_drivers_hold_the_fast_forward() {
        let r = Repo::new("filter");
        let marker = r.0.join("smudged");
        r.write(".gitattributes", "*.dat filter=x\n");
        r.commit("attributes");
        r.git(&[
            "config",
            "filter.x.smudge",
            &format!("touch {}; cat", marker.display()),
        ]);
        r.git(&["config", "filter.x.clean", "cat"]);
        r.sandbox_commit(&[("a.dat", "data\n")]);
        let _ = std::fs::remove_file(&marker);
        match fast_forward(&r.0, "sb", false).unwrap() {
            Outcome::Held { paths, .. } => {
                assert_eq!(paths, vec!["filter driver 'x' (in .git/config)"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(!marker.exists(), "the smudge filter ran");
    }

    /// A fake `ssh` for fetches from `guest`: runs the remote command git
    /// asks for (`git-upload-pack '/workspace'`) in `guest`, its output cut
    /// after `cut` bytes when given (what the capped proxy does).
    fn fake_ssh(dir: &Path, guest: &Path, cut: Option<u64>) -> Remote {
        let script = dir.join(format!("fake-ssh-{}", cut.unwrap_or(0)));
        // dd, not head: GNU head waits to fill its buffer.
        let tail = cut
            .map(|n| format!(" | dd iflag=count_bytes count={n} bs=65536 status=none"))
            .unwrap_or_default();
        std::fs::write(
            &script,
            format!(
                "for a; do cmd=$a; done\ncd '{}' || exit 1\n\
                 eval \"$(printf %s \"$cmd\" | sed \"s|'/workspace'|.|\")\"{tail}\n",
                guest.display()
            ),
        )
        .unwrap();
        Remote {
            url: "ssh://guest@keystone-sb/workspace".into(),
            protocol: "ssh",
            env: vec![
                ("GIT_SSH_COMMAND", format!("sh {}", script.display())),
                ("GIT_SSH_VARIANT", "ssh".into()),
            ],
        }
    }

    fn keystone_refs(r: &Repo) -> Vec<String> {
        let out = r.git(&["for-each-ref", "--format=%(refname)", "refs/keystone/"]);
        out.lines().map(str::to_string).collect()
    }

    #[test]
    fn fetch_takes_exactly_the_listed_branches_and_prunes_the_rest() {
        let host = Repo::new("fetch-host");
        let guest = Repo::new("fetch-guest");
        guest.git(&["branch", "feature"]);
        guest.git(&["branch", "unlisted"]);
        host.git(&["update-ref", "refs/keystone/sb/gone", "HEAD"]);
        let remote = fake_ssh(&host.0, &guest.0, None);
        let refs = vec!["main".to_string(), "feature".to_string()];
        let minute = std::time::Duration::from_secs(60);
        fetch_refs(&host.0, "sb", &refs, &remote, minute).unwrap();
        assert_eq!(
            keystone_refs(&host),
            vec!["refs/keystone/sb/feature", "refs/keystone/sb/main"],
            "listed branches fetched, an unlisted one not, a stale one pruned"
        );
        assert_eq!(
            host.git(&["rev-parse", "refs/keystone/sb/main"]),
            guest.head()
        );
        let many: Vec<String> = (0..=MAX_REFS).map(|i| format!("b{i}")).collect();
        assert!(matches!(
            fetch_refs(&host.0, "sb", &many, &remote, minute),
            Err(SyncError::TooManyRefs(n)) if n == MAX_REFS + 1
        ));
    }

    #[test]
    fn a_fetch_cut_mid_pack_leaves_nothing_in_the_repository() {
        let host = Repo::new("cut-host");
        let guest = Repo::new("cut-guest");
        // Incompressible content: the pack is ~2 MiB.
        let mut noise = Vec::with_capacity(2 << 20);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while noise.len() < 2 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(guest.0.join("big.bin"), &noise).unwrap();
        guest.commit("big");
        let pack_dir = host.0.join(".git/objects/pack");
        std::fs::create_dir_all(&pack_dir).unwrap();
        std::fs::write(pack_dir.join("tmp_pack_users_own"), b"x").unwrap();
        let objects_before = host.git(&["count-objects", "-v"]);
        let remote = fake_ssh(&host.0, &guest.0, Some(1 << 20));
        let refs = vec!["main".to_string()];
        let err = fetch_refs(
            &host.0,
            "sb",
            &refs,
            &remote,
            std::time::Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(matches!(err, SyncError::Git { .. }), "{err}");
        let left: Vec<String> = std::fs::read_dir(&pack_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            vec!["tmp_pack_users_own"],
            "only what was there before"
        );
        assert_eq!(host.git(&["count-objects", "-v"]), objects_before);
        assert!(keystone_refs(&host).is_empty());
    }

    #[test]
    fn branch_names_are_checked_before_they_become_refspecs() {
        for ok in ["main", "feature/x", "ünï", "a.b", "v1@2"] {
            assert!(valid_branch(ok), "{ok}");
        }
        for bad in [
            "", "-x", "/a", "a/", "a.", ".a", "a..b", "a//b", "a/.b", "a.lock", "@", "a@{1}",
            "a b", "a:b", "a*", "a?", "a[", "a\\b", "a~1", "a^", "a\tb", "a\u{7f}",
        ] {
            assert!(!valid_branch(bad), "{bad:?}");
        }
        let p = parse_pending("R\0refs/heads/main\nR\0refs/heads/a:b\nR\0refs/tags/x\n");
        assert_eq!(p.refs, vec!["main"]);
        assert_eq!(p.bad_refs, 2);
        assert!(report(&p).contains("Skipped 2 sandbox branch names"));
    }

    #[test]
    fn listing_parses_and_is_sanitised() {
        let p = parse_pending(
            "B\0main\0abc123\0add \x1b[31mred\nB\0feature\0def456\0x\0y\nU\0 M src/a.rs\njunk\n",
        );
        assert_eq!(p.commit_count(), 2);
        assert_eq!(p.branches["main"][0].subject, "add ?[31mred");
        assert_eq!(p.branches["feature"][0].subject, "x y");
        assert_eq!(p.uncommitted, vec![" M src/a.rs"]);
        let r = report(&p);
        assert!(r.contains("New commits in sandbox:"));
        assert!(r.contains("Uncommitted changes (will NOT sync):"));
        assert!(report(&Pending::default()).contains("No new commits"));
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            // Raw name bytes so hostile paths are really in the stream.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn artifacts_refuse_links_and_escapes() {
        let root = std::env::temp_dir().join(format!("ks-art-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("out")).unwrap();
        let outside = std::env::temp_dir().join(format!("ks-art-outside-{}", std::process::id()));
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out/escape")).unwrap();
        let t = tar_with(&[
            ("dist/", tar::EntryType::Directory, b"", None),
            ("dist/app.js", tar::EntryType::Regular, b"ok", None),
            (
                "dist/link",
                tar::EntryType::Symlink,
                b"",
                Some("/etc/passwd"),
            ),
            ("dist/../../evil", tar::EntryType::Regular, b"x", None),
            ("/etc/evil", tar::EntryType::Regular, b"x", None),
            ("src/main.rs", tar::EntryType::Regular, b"x", None),
            ("out/escape/f", tar::EntryType::Regular, b"x", None),
            ("build/dev", tar::EntryType::Char, b"", None),
            ("build/release.sh", tar::EntryType::Regular, b"evil", None),
            ("dist/js", tar::EntryType::Regular, b"x", None),
        ]);
        std::fs::create_dir_all(root.join("dist/js")).unwrap();
        std::fs::create_dir_all(root.join("build")).unwrap();
        std::fs::write(root.join("build/release.sh"), "tracked\n").unwrap();
        let tracked = [PathBuf::from("build/release.sh")].into_iter().collect();
        let (n, refused) = unpack_artifacts(&t[..], &root, &tracked).unwrap();
        assert_eq!(n, 1, "{refused:?}");
        assert_eq!(std::fs::read(root.join("dist/app.js")).unwrap(), b"ok");
        assert_eq!(refused.len(), 8, "{refused:?}");
        assert_eq!(
            std::fs::read(root.join("build/release.sh")).unwrap(),
            b"tracked\n"
        );
        assert!(!root.join("dist/link").exists());
        assert!(!root.join("src").exists());
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
