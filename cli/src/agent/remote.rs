//! The verbs that reach into a running sandbox — `attach`/`ssh`, `exec`,
//! `sync`, `proxy`, `ssh-config` — and the life cycle's SSH seams
//! ([`super::hooks`]) built on [`super::ssh`] and [`super::sync`].

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use super::ssh::{self, SshError, Target, UserKey};
use super::state::{AgentPaths, Sandbox, Status};
use super::sync::{self, Outcome};
use super::{lifecycle, AgentError};

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

/// The sandbox `name` (or the current project's), which must be running.
pub fn running(paths: &AgentPaths, name: Option<&str>) -> Result<Sandbox, AgentError> {
    let s = lifecycle::observed(&lifecycle::find(&paths.registry(), name)?);
    if s.status != Status::Running {
        return Err(AgentError::NotRunning(s.name));
    }
    Ok(s)
}

/// An exit status as a process exit code (signals as 128 + n).
pub fn exit_code(st: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        _ => 1,
    }
}

/// `attach` / `ssh`: an interactive shell in /workspace; returns its exit code.
pub fn attach(paths: &AgentPaths, name: Option<&str>) -> Result<u8, AgentError> {
    let s = running(paths, name)?;
    let key = key_for(&s).map_err(ssh_err)?;
    Ok(exit_code(ssh::attach(&target(&s), &key).map_err(ssh_err)?))
}

/// `exec`: run `cmd` in /workspace; returns the command's exit code.
pub fn exec(paths: &AgentPaths, name: Option<&str>, cmd: &[String]) -> Result<u8, AgentError> {
    let s = running(paths, name)?;
    let key = key_for(&s).map_err(ssh_err)?;
    Ok(exit_code(
        ssh::exec(&target(&s), &key, cmd).map_err(ssh_err)?,
    ))
}

/// `proxy`: bridge stdin/stdout to guest vsock `port` of the sandbox `name`,
/// or of the VMM socket `socket`.
pub fn proxy(
    paths: &AgentPaths,
    name: Option<&str>,
    socket: Option<&Path>,
    port: u32,
) -> Result<(), AgentError> {
    let uds = match socket {
        Some(p) => p.to_path_buf(),
        None => running(paths, name)?.vsock_uds,
    };
    ssh::proxy(&uds, port).map_err(ssh_err)
}

/// `ssh-config`: a `Host keystone-<name>` stanza per sandbox (or for one).
pub fn ssh_config(paths: &AgentPaths, name: Option<&str>) -> Result<String, AgentError> {
    let list = match name {
        Some(_) => vec![lifecycle::find(&paths.registry(), name)?],
        None => lifecycle::list(paths)?,
    };
    let key = key_for_root(&paths.root).map_err(ssh_err)?;
    let mut out = String::new();
    for s in &list {
        let t = target(s);
        // Pin what the sandbox reported, if it ever did.
        let _ = ssh::pin_host_keys(&t);
        out.push_str(&ssh::config_stanza(&t, &key));
        out.push('\n');
    }
    Ok(out)
}

/// What `sync` prints and its exit code.
pub struct SyncReport {
    /// Text for stdout.
    pub text: String,
    /// Exit code ([`sync::exit`]).
    pub code: u8,
}

/// `sync [--dry-run] [--artifacts]`.
pub fn sync(
    paths: &AgentPaths,
    name: Option<&str>,
    dry_run: bool,
    artifacts: bool,
) -> Result<SyncReport, AgentError> {
    let s = running(paths, name)?;
    run_sync(&s, dry_run, artifacts)
}

/// The body of `sync` for a running sandbox (also used by `stop --sync`
/// and the supervisor's automatic modes).
pub fn run_sync(s: &Sandbox, dry_run: bool, artifacts: bool) -> Result<SyncReport, AgentError> {
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
        match sync::fetch_and_fast_forward(&t, &key, &s.project_path).map_err(serr)? {
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

/// Seam: kernel parameters that hand the user's public key and the
/// sandbox name to the guest.
pub fn boot_params(s: &Sandbox) -> Result<Vec<String>, SshError> {
    let key = key_for(s)?;
    Ok(vec![
        ssh::authorized_key_param(&key),
        format!("{}={}", crate::image::NAME_PARAM, s.name),
    ])
}

/// Seam: ask the guest to power off.
pub fn request_poweroff(s: &Sandbox) -> bool {
    match key_for(s) {
        Ok(key) => ssh::request_poweroff(&target(s), &key),
        Err(_) => false,
    }
}

/// Seam: how many commits the running guest holds that the host lacks.
pub fn unsynced_commits(s: &Sandbox) -> Option<usize> {
    if lifecycle::observed(s).status != Status::Running {
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
    idle: std::time::Duration,
    last_change: std::time::Instant,
    synced_since_change: bool,
}

impl IdleTimer {
    /// A timer that fires `idle` after the last change.
    pub fn new(idle: std::time::Duration, now: std::time::Instant) -> IdleTimer {
        IdleTimer {
            idle,
            last_change: now,
            synced_since_change: false,
        }
    }

    /// Record one observation (`changed`: the workspace changed since the
    /// previous one). True when it is time to sync: quiet for `idle` since
    /// the last change, once per quiet period.
    pub fn observe(&mut self, changed: bool, now: std::time::Instant) -> bool {
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
    use std::time::{Duration, Instant};
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
            let when = super::state::format_time(super::state::now());
            match run_sync(&s, false, false) {
                Ok(r) if r.code == sync::exit::NOTHING => {}
                Ok(r) => eprintln!(
                    "{when} supervisor: auto-idle sync of {} (exit {}):\n{}",
                    s.name, r.code, r.text
                ),
                Err(e) => eprintln!(
                    "{when} supervisor: auto-idle sync of {} failed: {e}",
                    s.name
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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

    #[test]
    fn exit_codes_pass_through() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
    }
}
