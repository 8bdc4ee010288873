//! Seams between the sandbox life cycle (this crate's `agent` module) and
//! the SSH/git side over vsock (`agent::ssh`, `agent::sync`).
//!
//! The life cycle calls these functions at fixed points; each delegates to
//! [`super::remote`], which builds on [`super::ssh`] and [`super::sync`]. Their signatures are the
//! contract: the life cycle relies on nothing else.
//!
//! | seam | called by | when |
//! |------|-----------|------|
//! | [`boot_params`] | `start` | before boot, for images with `ssh` |
//! | [`attach`] | `start` | after ready, unless `--no-attach`, for images with `ssh` |
//! | [`request_poweroff`] | `stop` | first, for images with `ssh` |
//! | [`sync_before_stop`] | `stop --sync` | before stopping |
//! | [`unsynced_commits`] | `destroy` | without `--force` |
//! | [`on_guest_commit`] | the supervisor | per guest notification, sync mode `auto-commit`/`auto-idle` |

use super::state::Sandbox;

/// Errors of the SSH/git side as the life cycle sees them.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The SSH/git side is not wired into this build yet.
    #[error("{0}: ssh not wired yet")]
    NotWired(&'static str),
    /// It ran and failed.
    #[error("{0}")]
    Failed(String),
}

/// Extra kernel command-line tokens for booting `sandbox`: the host user's
/// public key (`keystone.authorized_key=<base64>`, see
/// [`crate::image::AUTHORIZED_KEY_PARAM`]) and the sandbox name. Called by
/// `start` only for images whose manifest has `ssh`; an error fails the
/// start (exit 3).
pub fn boot_params(sandbox: &Sandbox) -> Result<Vec<String>, HookError> {
    super::remote::boot_params(sandbox).map_err(|e| HookError::Failed(e.to_string()))
}

/// Attaches the user's terminal to the running `sandbox` (an interactive
/// SSH session over vsock in /workspace) and returns when the session ends.
/// Called by `start` after the guest is ready, unless `--no-attach`.
pub fn attach(sandbox: &Sandbox) -> Result<(), HookError> {
    let key = super::remote::key_for(sandbox).map_err(|e| HookError::Failed(e.to_string()))?;
    super::ssh::attach(&super::remote::target(sandbox), &key)
        .map(|_| ())
        .map_err(|e| HookError::Failed(e.to_string()))
}

/// Asks the guest to power off cleanly (`sudo systemctl poweroff` over
/// SSH). Returns whether the request was delivered; `stop` then waits (up
/// to 10 s) for the VMM to exit before it signals it.
pub fn request_poweroff(sandbox: &Sandbox) -> bool {
    super::remote::request_poweroff(sandbox)
}

/// Syncs the guest's commits into the host project before `stop --sync`
/// stops `sandbox`. An error is reported as a warning and the stop goes on
/// (the commits stay on the sandbox's disk). "Nothing to sync" is success.
pub fn sync_before_stop(sandbox: &Sandbox) -> Result<(), HookError> {
    let r = super::remote::run_sync(sandbox, false, false)
        .map_err(|e| HookError::Failed(e.to_string()))?;
    print!("{}", r.text);
    match r.code {
        super::sync::exit::OK | super::sync::exit::NOTHING => Ok(()),
        _ => Err(HookError::Failed(
            "the host branch could not be fast-forwarded (the commits are in refs/keystone/)"
                .into(),
        )),
    }
}

/// How many commits the guest holds that the host has not synced, if that
/// can be told (`None`: unknown, e.g. the sandbox is stopped). `destroy`
/// without `--force` refuses when this is `Some(n)` with n > 0.
pub fn unsynced_commits(sandbox: &Sandbox) -> Option<usize> {
    super::remote::unsynced_commits(sandbox)
}

/// The guest reported a commit (a connection to host vsock port
/// [`crate::image::NOTIFY_PORT`]). Called in the supervisor (its stderr is
/// `state/supervisor.log`) for sync modes `auto-commit` and `auto-idle`,
/// one call at a time, from the notify listener's thread: `auto-commit`
/// pulls now; `auto-idle` leaves it to the idle timer.
pub fn on_guest_commit(sandbox: &Sandbox) {
    let when = super::state::format_time(super::state::now());
    eprintln!(
        "{when} supervisor: guest commit in sandbox {} (sync mode {})",
        sandbox.name,
        sandbox.sync_mode.as_str()
    );
    if sandbox.sync_mode != super::state::SyncMode::AutoCommit {
        return;
    }
    if !sandbox.image.as_ref().is_some_and(|i| i.ssh) {
        eprintln!("{when} supervisor: the image has no SSH: nothing to sync");
        return;
    }
    // A guest may ping in a loop: at most one sync every few seconds, and
    // pings that arrive meanwhile are covered by the next one.
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    const MIN_GAP: std::time::Duration = std::time::Duration::from_secs(3);
    if let Ok(mut last) = LAST.lock() {
        if let Some(t) = *last {
            if t.elapsed() < MIN_GAP {
                std::thread::sleep(MIN_GAP - t.elapsed());
            }
        }
        *last = Some(std::time::Instant::now());
    }
    match super::remote::run_sync(sandbox, false, false) {
        Ok(r) => eprintln!(
            "{when} supervisor: auto-commit sync of {} (exit {}):\n{}",
            sandbox.name, r.code, r.text
        ),
        Err(e) => eprintln!(
            "{when} supervisor: auto-commit sync of {} failed: {e}",
            sandbox.name
        ),
    }
}
