//! `keystone agent net NAME show|allow|deny|log`: a sandbox's egress
//! policy ([`super::policy`]) and the proxy's audit log
//! ([`super::egress`]). Policy changes are written (then renamed) into
//! `sandboxes/<name>/policy.json`, which the proxy reads for every request:
//! a running sandbox gets them without a restart.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use super::egress::{human_line, parse_log, LogEntry};
use super::logs::RotatingLog;
use super::policy::{check_pattern, load_or_create, Policy};
use super::state::{AgentPaths, Network, Sandbox};
use super::AgentError;

fn sandbox(paths: &AgentPaths, name: &str) -> Result<Sandbox, AgentError> {
    Ok(paths.registry().find(Some(name))?)
}

fn policy_err(e: super::policy::PolicyError) -> AgentError {
    match e {
        super::policy::PolicyError::BadPattern(_) => AgentError::Usage(e.to_string()),
        other => AgentError::Internal(other.to_string()),
    }
}

/// The sandbox's policy (made from the default when it has none yet), and
/// a note when its network mode does not use it.
pub fn show(paths: &AgentPaths, name: &str) -> Result<(Policy, Option<String>), AgentError> {
    let s = sandbox(paths, name)?;
    let p = load_or_create(&s.policy_file(), &paths.default_policy()).map_err(policy_err)?;
    let note = (s.network != Network::Policy).then(|| {
        format!(
            "sandbox {} uses --network {}: this policy applies once it starts with --network policy",
            s.name, s.network
        )
    });
    Ok((p, note))
}

/// Adds `patterns` to the allow list (`allow`) or the deny list; returns
/// the new policy.
pub fn change(
    paths: &AgentPaths,
    name: &str,
    patterns: &[String],
    allow: bool,
) -> Result<Policy, AgentError> {
    let s = sandbox(paths, name)?;
    let checked = patterns
        .iter()
        .map(|p| check_pattern(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(policy_err)?;
    let mut p = load_or_create(&s.policy_file(), &paths.default_policy()).map_err(policy_err)?;
    if allow {
        p.allow(&checked);
    } else {
        p.deny(&checked);
    }
    p.save(&s.policy_file()).map_err(policy_err)?;
    Ok(p)
}

/// Prints the sandbox's log entries (the rotated generation first) to
/// `out`, as JSON lines or for people; with `follow`, then waits for more
/// until the process is stopped.
pub fn log(
    paths: &AgentPaths,
    name: &str,
    json: bool,
    follow: bool,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let s = sandbox(paths, name)?;
    let path = s.net_log();
    let print = |entries: Vec<LogEntry>, out: &mut dyn Write| -> std::io::Result<()> {
        for e in entries {
            if json {
                // Re-serialised: the file's lines are the proxy's, but a
                // reader gets exactly the documented fields.
                writeln!(out, "{}", serde_json::to_string(&e).unwrap_or_default())?;
            } else {
                writeln!(out, "{}", human_line(&e))?;
            }
        }
        out.flush()
    };
    let io = |e: std::io::Error| AgentError::Internal(format!("{}: {e}", path.display()));
    let old = std::fs::read_to_string(RotatingLog::old_path(&path)).unwrap_or_default();
    print(parse_log(&old), out).map_err(io)?;
    let mut pos = 0u64;
    let mut rest = String::new();
    loop {
        pos = read_new(&path, pos, &mut rest, &mut |text| {
            print(parse_log(text), out)
        })
        .map_err(io)?;
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Reads `path` from `pos` (from 0 when it shrank: rotated), hands every
/// complete line to `f` (an incomplete last line waits in `rest`) and
/// returns the new position.
fn read_new(
    path: &Path,
    pos: u64,
    rest: &mut String,
    f: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Ok(pos);
    };
    let len = file.metadata()?.len();
    let mut pos = pos;
    if len < pos {
        pos = 0;
        rest.clear();
    }
    file.seek(SeekFrom::Start(pos))?;
    let mut chunk = String::new();
    let n = file.read_to_string(&mut chunk)?;
    rest.push_str(&chunk);
    if let Some(end) = rest.rfind('\n') {
        let complete: String = rest.drain(..=end).collect();
        f(&complete)?;
    }
    Ok(pos + n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_lines_are_read_once_and_a_rotation_starts_over() {
        let dir = std::env::temp_dir().join(format!("ks-netlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.log");
        let mut seen = Vec::new();
        let mut rest = String::new();
        let mut collect = |t: &str| {
            seen.extend(t.lines().map(String::from));
            Ok(())
        };
        std::fs::write(&path, "a\nb\npart").unwrap();
        let pos = read_new(&path, 0, &mut rest, &mut collect).unwrap();
        std::fs::write(&path, "a\nb\npartial\nc\n").unwrap();
        let pos = read_new(&path, pos, &mut rest, &mut collect).unwrap();
        // Rotated: a shorter file is read from its start.
        std::fs::write(&path, "d\n").unwrap();
        read_new(&path, pos, &mut rest, &mut collect).unwrap();
        assert_eq!(seen, ["a", "b", "partial", "c", "d"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
