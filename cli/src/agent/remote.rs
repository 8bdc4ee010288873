//! The verbs that reach into a running sandbox: `attach`/`ssh`, `exec`,
//! `sync`, `proxy`, `ssh-config`, over the guest session ([`super::session`]).

use std::path::Path;
use std::process::ExitStatus;

use super::session::{self, key_for, key_for_root, target, SyncOptions, SyncReport};
use super::ssh::{self, SshError};
use super::state::{AgentPaths, Sandbox, Status};
use super::AgentError;

fn ssh_err(e: SshError) -> AgentError {
    AgentError::Internal(e.to_string())
}

/// The sandbox `name` (or the current project's), which must be running.
pub fn running(paths: &AgentPaths, name: Option<&str>) -> Result<Sandbox, AgentError> {
    let s = paths.registry().find(name)?.observed();
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
    ssh::exec(&target(&s), &|| key_for(&s), cmd).map_err(ssh_err)
}

/// `proxy`: bridge stdin/stdout to guest vsock `port` of the sandbox `name`,
/// or of the VMM socket `socket`; cut after `max_bytes` from the guest.
pub fn proxy(
    paths: &AgentPaths,
    name: Option<&str>,
    socket: Option<&Path>,
    port: u32,
    max_bytes: Option<u64>,
) -> Result<(), AgentError> {
    let uds = match socket {
        Some(p) => p.to_path_buf(),
        None => running(paths, name)?.vsock_uds,
    };
    ssh::proxy(&uds, port, max_bytes).map_err(ssh_err)
}

/// `ssh-config`: a `Host keystone-<name>` stanza per sandbox (or for one).
pub fn ssh_config(paths: &AgentPaths, name: Option<&str>) -> Result<String, AgentError> {
    let list = match name {
        Some(_) => vec![paths.registry().find(name)?],
        None => paths.registry().observed()?,
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

/// `sync [--dry-run] [--artifacts] [--allow-executable-changes]`.
pub fn sync(
    paths: &AgentPaths,
    name: Option<&str>,
    opts: SyncOptions,
) -> Result<SyncReport, AgentError> {
    let s = running(paths, name)?;
    session::run_sync(&s, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_pass_through() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
    }
}
