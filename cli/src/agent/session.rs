//! The guest session of a sandbox: how to reach it over SSH on vsock
//! (target and key), what the verbs and the supervisor ask of it (attach,
//! poweroff, sync runs, unsynced commits) and the automatic sync modes.
//!
//! Built on [`super::ssh`] and [`super::sync`]; below the verbs.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::ssh::{self, SshError, Target, UserKey};
use super::state::{Sandbox, Status, SyncMode};
use super::supervisor::guest_log;
use super::sync::{self, Outcome};
use super::AgentError;

/// The agent root a sandbox lives under (`<root>/sandboxes/<name>`).
fn agent_root(s: &Sandbox) -> PathBuf {
    s.dir
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| s.dir.clone())
}

/// How to reach `s` over SSH.
pub fn target(s: &Sandbox) -> Target {
    Target {
        name: s.name.clone(),
        uds: s.vsock_uds.clone(),
        state_dir: s.state_dir.clone(),
        forwards: s.ports.clone(),
    }
}

/// The host user's key for sandboxes under `root` (see [`ssh::user_key`]).
pub fn key_for_root(root: &Path) -> Result<UserKey, SshError> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.to_path_buf());
    ssh::user_key(&home, &root.join("keys"))
}

/// The host user's key for `s`.
pub fn key_for(s: &Sandbox) -> Result<UserKey, SshError> {
    key_for_root(&agent_root(s))
}

fn ssh_err(e: SshError) -> AgentError {
    AgentError::Internal(e.to_string())
}

/// What `sync` prints and its exit code.
pub struct SyncReport {
    /// Text for stdout.
    pub text: String,
    /// Exit code ([`sync::exit`]).
    pub code: u8,
}

/// What a `sync` run may do.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncOptions {
    /// Report only: fetch nothing, change nothing.
    pub dry_run: bool,
    /// Copy build outputs too (`--artifacts`).
    pub artifacts: bool,
    /// Fast-forward even over changes to files the host runs
    /// (`--allow-executable-changes`; never in the automatic modes).
    pub allow_executable: bool,
}

/// The body of `sync` for a running sandbox (also used by `stop --sync`
/// and the supervisor's automatic modes, with the default options).
pub fn run_sync(s: &Sandbox, o: SyncOptions) -> Result<SyncReport, AgentError> {
    let SyncOptions {
        dry_run,
        artifacts,
        allow_executable,
    } = o;
    let key = key_for(s).map_err(ssh_err)?;
    let t = target(s);
    let serr = |e: sync::SyncError| AgentError::Internal(e.to_string());
    let pending = sync::pending(&t, &key, &s.project_path).map_err(serr)?;
    let mut text = sync::report(&pending);
    let waiting = sync::fetched_not_merged(&s.project_path, &s.name);
    if let Some((branch, n)) = &waiting {
        text.push_str(&format!(
            "Fetched earlier, not yet in '{branch}': {n} commit{} from {}{branch}.\n",
            if *n == 1 { "" } else { "s" },
            sync::ref_prefix(&s.name)
        ));
    }
    let mut code = sync::exit::OK;
    if pending.commit_count() == 0 && waiting.is_none() {
        code = sync::exit::NOTHING;
    } else if dry_run {
        text.push_str("Dry run: nothing fetched, nothing changed.\n");
    } else {
        match sync::fetch_and_fast_forward(
            &t,
            &key,
            &s.project_path,
            &pending.refs,
            allow_executable,
        )
        .map_err(serr)?
        {
            Outcome::Synced { to: Some(to) } => {
                text.push_str(&format!(
                    "Fetched into {}*; fast-forwarded the current branch to {to}.\n",
                    sync::ref_prefix(&s.name)
                ));
            }
            Outcome::Synced { to: None } | Outcome::Nothing | Outcome::WouldSync => {
                text.push_str(&format!(
                    "Fetched into {}*; the current branch needed no fast-forward.\n",
                    sync::ref_prefix(&s.name)
                ));
            }
            Outcome::Held { paths, theirs } => {
                text.push_str(&format!(
                    "Fetched into {}*, but NOT fast-forwarded: the sandbox changed files the host runs or obeys:\n",
                    sync::ref_prefix(&s.name)
                ));
                for p in &paths {
                    text.push_str(&format!("  {p}\n"));
                }
                text.push_str(&format!(
                    "Review: git diff HEAD {theirs}\nThen: keystone agent sync {} --allow-executable-changes   # or: git merge --ff-only {theirs}\n",
                    s.name
                ));
                code = sync::exit::NO_FAST_FORWARD;
            }
            Outcome::NoFastForward { reason, hint } => {
                text.push_str(&format!(
                    "Fetched into {}*, but cannot fast-forward: {reason}.\nRun: {hint}\n",
                    sync::ref_prefix(&s.name)
                ));
                code = sync::exit::NO_FAST_FORWARD;
            }
        }
    }
    if artifacts && !dry_run {
        let (n, refused) = sync::copy_artifacts(&t, &key, &s.project_path).map_err(serr)?;
        text.push_str(&format!("Artifacts: {n} files copied.\n"));
        for r in refused {
            text.push_str(&format!("Artifacts: refused {r}\n"));
        }
        if n > 0 && code == sync::exit::NOTHING {
            code = sync::exit::OK;
        }
    } else if artifacts {
        text.push_str("Dry run: artifacts not copied.\n");
    }
    Ok(SyncReport { text, code })
}

/// The host user's public key line for `s`, which SSH images get on
/// their command line ([`super::vmm_process::guest_cmdline`]).
pub fn authorized_key(s: &Sandbox) -> Result<String, SshError> {
    Ok(key_for(s)?.public)
}

/// Asks the guest to power off cleanly (`sudo systemctl poweroff` over
/// SSH). Returns whether the request was delivered; the caller then waits
/// for the VMM to exit before it signals it.
pub fn request_poweroff(s: &Sandbox) -> bool {
    match key_for(s) {
        Ok(key) => ssh::request_poweroff(&target(s), &key),
        Err(_) => false,
    }
}

/// How many commits the running guest holds that the host has not synced,
/// if that can be told (`None`: unknown, e.g. the sandbox is stopped).
pub fn unsynced_commits(s: &Sandbox) -> Option<usize> {
    if s.observed().status != Status::Running {
        return None;
    }
    let key = key_for(s).ok()?;
    sync::pending(&target(s), &key, &s.project_path)
        .ok()
        .map(|p| p.commit_count())
}

/// Seconds without workspace changes before `auto-idle` syncs:
/// `$KEYSTONE_IDLE_SECS`, else 60.
pub fn idle_secs() -> u64 {
    std::env::var("KEYSTONE_IDLE_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(60)
}

/// The `auto-idle` decision, separated from the clock and the guest.
#[derive(Debug)]
pub struct IdleTimer {
    idle: Duration,
    last_change: Instant,
    synced_since_change: bool,
}

impl IdleTimer {
    /// A timer that fires `idle` after the last change.
    pub fn new(idle: Duration, now: Instant) -> IdleTimer {
        IdleTimer {
            idle,
            last_change: now,
            synced_since_change: false,
        }
    }

    /// Record one observation (`changed`: the workspace changed since the
    /// previous one). True when it is time to sync: quiet for `idle` since
    /// the last change, once per quiet period.
    pub fn observe(&mut self, changed: bool, now: Instant) -> bool {
        if changed {
            self.last_change = now;
            self.synced_since_change = false;
            return false;
        }
        if !self.synced_since_change && now.duration_since(self.last_change) >= self.idle {
            self.synced_since_change = true;
            return true;
        }
        false
    }
}

/// Did anything under /workspace (outside .git) change since the last call?
/// The guest keeps a stamp file in /tmp; the first call reports a change.
fn workspace_changed(t: &Target, key: &UserKey) -> Option<bool> {
    let script = "stamp=/tmp/.keystone-idle-stamp; \
                  if [ ! -e $stamp ]; then touch $stamp; echo changed; exit 0; fi; \
                  c=$(find /workspace -path /workspace/.git -prune -o -newer $stamp -print -quit 2>/dev/null); \
                  g=$(find /workspace/.git -maxdepth 1 -newer $stamp -print -quit 2>/dev/null); \
                  touch $stamp; [ -n \"$c$g\" ] && echo changed || echo quiet";
    let (st, out) = ssh::capture(t, key, script).ok()?;
    if !st.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out).trim() == "changed")
}

/// The `auto-idle` loop, run by the supervisor for as long as the VM runs:
/// poll the workspace, and once it has been quiet for [`idle_secs`], sync.
pub fn idle_watch(s: Sandbox, stop: &std::sync::atomic::AtomicBool) {
    let idle = Duration::from_secs(idle_secs());
    let poll = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
    let mut timer = IdleTimer::new(idle, Instant::now());
    let Ok(key) = key_for(&s) else { return };
    let t = target(&s);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(poll);
        let Some(changed) = workspace_changed(&t, &key) else {
            continue;
        };
        if timer.observe(changed, Instant::now()) {
            auto_sync(&s, "auto-idle", true);
        }
    }
}

/// Opens `s`'s SSH master (see [`ssh::master`]) once the guest is ready, so
/// the first `exec` or `attach` already rides it. True when it is up.
pub fn open_master(s: &Sandbox) -> bool {
    key_for(s).is_ok_and(|key| ssh::master(&target(s), &key).is_some())
}

/// What a restored guest is told besides the clock and the RNG seed.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Its new hostname (a fork).
    pub hostname: Option<String>,
    /// Its NIC's new MAC (a fork with a network).
    pub mac: Option<String>,
    /// A branch to create and check out in /workspace (a fork).
    pub branch: Option<String>,
}

/// The guest side of a restore (`after_restore.py`, as root): the host's
/// clock, 64 bytes from the host's RNG credited and the guest's CRNG
/// reseeded (no two restores of one snapshot share random state), then
/// what `r` asks; the branch is made as the sandbox user.
pub fn after_restore(s: &Sandbox, r: &Restored) -> Result<(), AgentError> {
    use std::io::Read as _;
    let fail = |e: String| AgentError::Snapshot(format!("after the restore of {}: {e}", s.name));
    let key = key_for(s).map_err(|e| fail(e.to_string()))?;
    let mut seed = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| fail(format!("/dev/urandom: {e}")))?;
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut remote = format!(
        "sudo -n python3 -c {} {clock:.6}",
        ssh::shell_quote(include_str!("after_restore.py"))
    );
    for (k, v) in [("hostname", &r.hostname), ("mac", &r.mac)] {
        if let Some(v) = v {
            remote.push_str(&format!(" {}", ssh::shell_quote(&format!("{k}={v}"))));
        }
    }
    if let Some(b) = &r.branch {
        remote.push_str(&format!(
            " && git -C /workspace switch -q -c {}",
            ssh::shell_quote(b)
        ));
    }
    let remote = format!("{{ {remote}; }} 2>&1");
    let (st, out) = ssh::capture_with_input(&target(s), &key, &remote, &seed)
        .map_err(|e| fail(e.to_string()))?;
    if !st.success() {
        return Err(fail(format!(
            "the guest step exited {st}: {}",
            ssh::sanitize(String::from_utf8_lossy(&out[..out.len().min(300)]).trim())
                .replace('\n', "; ")
        )));
    }
    Ok(())
}

/// Attaches the user's terminal to the running `s` (an interactive SSH
/// session over vsock in /workspace) and returns when the session ends.
pub fn attach(s: &Sandbox) -> Result<ExitStatus, SshError> {
    let key = key_for(s)?;
    ssh::attach(&target(s), &key)
}

/// Syncs the guest's commits into the host project before `stop --sync`.
/// "Nothing to sync" is success; an error is for a warning (the commits
/// stay on the sandbox's disk).
pub fn sync_before_stop(s: &Sandbox) -> Result<(), AgentError> {
    let r = run_sync(s, SyncOptions::default())?;
    print!("{}", r.text);
    match r.code {
        sync::exit::OK | sync::exit::NOTHING => Ok(()),
        _ => Err(AgentError::Internal(
            "the host branch could not be fast-forwarded (the commits are in refs/keystone/)"
                .into(),
        )),
    }
}

/// The guest reported a commit (a connection to host vsock port
/// [`crate::image::NOTIFY_PORT`]). Called in the supervisor (its stderr is
/// `state/supervisor.log`) for sync modes `auto-commit` and `auto-idle`,
/// one call at a time, from the notify listener's thread: `auto-commit`
/// pulls now; `auto-idle` leaves it to the idle timer.
pub fn on_guest_commit(s: &Sandbox) {
    guest_log(format_args!(
        "guest commit in sandbox {} (sync mode {})",
        s.name,
        s.sync_mode.as_str()
    ));
    if s.sync_mode != SyncMode::AutoCommit {
        return;
    }
    if !s.image.as_ref().is_some_and(|i| i.ssh) {
        guest_log("the image has no SSH: nothing to sync");
        return;
    }
    // A guest may ping in a loop: at most one sync every few seconds, and
    // pings that arrive meanwhile are covered by the next one.
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    const MIN_GAP: Duration = Duration::from_secs(3);
    if let Ok(mut last) = LAST.lock() {
        if let Some(t) = *last {
            if t.elapsed() < MIN_GAP {
                std::thread::sleep(MIN_GAP - t.elapsed());
            }
        }
        *last = Some(Instant::now());
    }
    auto_sync(s, "auto-commit", false);
}

/// One automatic sync (never over host-executable changes), reported in
/// the supervisor's log as a guest-triggered line; "nothing to sync" is
/// silent when `quiet`.
fn auto_sync(s: &Sandbox, mode: &str, quiet: bool) {
    match run_sync(s, SyncOptions::default()) {
        Ok(r) if quiet && r.code == sync::exit::NOTHING => {}
        Ok(r) => guest_log(format_args!(
            "{mode} sync of {} (exit {}):\n{}",
            s.name,
            r.code,
            r.text.trim_end()
        )),
        Err(e) => guest_log(format_args!("{mode} sync of {} failed: {e}", s.name)),
    }
}

/// What the supervisor (below this layer) is handed to call back into it.
pub fn supervisor_hooks() -> super::supervisor::GuestHooks {
    super::supervisor::GuestHooks {
        on_commit: on_guest_commit,
        idle_watch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timer_fires_once_per_quiet_period() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut t = IdleTimer::new(Duration::from_secs(10), t0);
        assert!(!t.observe(true, s(1)));
        assert!(!t.observe(false, s(5)));
        assert!(!t.observe(false, s(10)), "only 9 s quiet");
        assert!(t.observe(false, s(11)));
        assert!(!t.observe(false, s(30)), "once per quiet period");
        assert!(!t.observe(true, s(31)));
        assert!(!t.observe(false, s(35)));
        assert!(t.observe(false, s(41)));
    }
}
