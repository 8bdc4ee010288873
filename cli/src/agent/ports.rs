//! `keystone agent port`: ports both ways, on demand, over the sandbox's
//! SSH master (so over vsock; no forwarded TCP port, whatever the network
//! mode).
//!
//! - `publish GUEST[:HOST]`: the host listens on 127.0.0.1:HOST only, and
//!   each connection reaches the guest's 127.0.0.1:GUEST (`ssh -L`).
//! - `reach HOST`: the guest may reach exactly the host's 127.0.0.1:HOST,
//!   at its own 127.0.0.1:HOST (`ssh -R`; OpenSSH's client connects a
//!   channel the guest opens only to the destination it asked for).
//!
//! The forwards live in the registry ([`PortForward`]): a running sandbox
//! gets a change at once, and every new master (each start) opens them all
//! again ([`ssh::master`]). `status --json` lists them.

use super::session::{key_for, target};
use super::ssh;
use super::state::{AgentPaths, PortDirection, PortForward, Status};
use super::AgentError;

/// What `port` changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortChange {
    /// `publish GUEST[:HOST]`.
    Publish {
        /// The guest port.
        guest: u16,
        /// The host port.
        host: u16,
    },
    /// `unpublish GUEST`.
    Unpublish {
        /// The guest port.
        guest: u16,
    },
    /// `reach HOST`.
    Reach {
        /// The host port.
        host: u16,
    },
    /// `unreach HOST`.
    Unreach {
        /// The host port.
        host: u16,
    },
}

/// What a change did.
#[derive(Debug, PartialEq, Eq)]
pub struct Changed {
    /// The sandbox.
    pub sandbox: String,
    /// The forward added or removed.
    pub forward: PortForward,
    /// Whether the forward was added (else removed).
    pub added: bool,
    /// Whether the running sandbox has it now (else: on its next start).
    pub live: bool,
}

/// Parses `GUEST[:HOST]` (HOST defaults to GUEST); ports 1-65535.
pub fn parse_publish(spec: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{p:?} is not a port (1-65535)")),
    };
    match spec.split_once(':') {
        Some((g, h)) => Ok((port(g)?, port(h)?)),
        None => port(spec).map(|g| (g, g)),
    }
}

/// The forward `change` adds, or the one it removes from `ports`.
fn forward_of(change: PortChange, ports: &[PortForward]) -> Option<PortForward> {
    let find = |dir: PortDirection, f: &dyn Fn(&PortForward) -> bool| {
        ports.iter().copied().find(|p| p.direction == dir && f(p))
    };
    match change {
        PortChange::Publish { guest, host } => Some(PortForward {
            direction: PortDirection::Publish,
            guest_port: guest,
            host_port: host,
        }),
        PortChange::Reach { host } => Some(PortForward {
            direction: PortDirection::Reach,
            guest_port: host,
            host_port: host,
        }),
        PortChange::Unpublish { guest } => find(PortDirection::Publish, &|p| p.guest_port == guest),
        PortChange::Unreach { host } => find(PortDirection::Reach, &|p| p.host_port == host),
    }
}

/// Why `new` cannot join `ports` (each host port once: one listener or
/// one destination; each published guest port once, so `unpublish` names
/// one forward).
fn conflict(new: &PortForward, ports: &[PortForward], own: bool) -> Option<String> {
    ports.iter().find_map(|p| {
        if p.host_port == new.host_port {
            Some(format!("host port {} is in use by `{p}`", new.host_port))
        } else if own
            && p.direction == new.direction
            && p.direction == PortDirection::Publish
            && p.guest_port == new.guest_port
        {
            Some(format!(
                "guest port {} is already published (`{p}`)",
                p.guest_port
            ))
        } else {
            None
        }
    })
}

/// Applies `change` to the sandbox `name`: recorded in the registry, and
/// opened or closed on its master at once when it runs. An add that the
/// master refuses (the host port is taken, say) is not recorded.
pub fn change(paths: &AgentPaths, name: &str, change: PortChange) -> Result<Changed, AgentError> {
    let reg = paths.registry();
    let s = reg.find(Some(name))?.observed();
    let added = matches!(
        change,
        PortChange::Publish { .. } | PortChange::Reach { .. }
    );
    let Some(forward) = forward_of(change, &s.ports) else {
        return Err(AgentError::Refused(format!(
            "sandbox {} has no such forward (see `keystone agent port {} list`)",
            s.name, s.name
        )));
    };
    let check = |list: &[super::state::Sandbox]| -> Result<(), AgentError> {
        for other in list {
            let own = other.name == s.name;
            if let Some(why) = conflict(&forward, &other.ports, own) {
                let whose = if own {
                    String::new()
                } else {
                    format!(" of sandbox {}", other.name)
                };
                return Err(AgentError::Usage(format!("cannot {forward}: {why}{whose}")));
            }
        }
        Ok(())
    };
    if added {
        check(&reg.load()?)?;
    }
    let running = s.status == Status::Running;
    let mut live = false;
    if running {
        let t = target(&s);
        let sock = if added {
            let key = key_for(&s).map_err(|e| AgentError::Internal(e.to_string()))?;
            ssh::master(&t, &key)
        } else {
            ssh::live_master(&t)
        };
        match (sock, added) {
            (Some(sock), true) => {
                ssh::master_forward(&t, &sock, &forward, true).map_err(AgentError::Forward)?;
                live = true;
            }
            (Some(sock), false) => {
                // A forward the master lost already is gone all the same.
                if let Err(e) = ssh::master_forward(&t, &sock, &forward, false) {
                    eprintln!("keystone: warning: sandbox {}: {e}", s.name);
                }
                live = true;
            }
            (None, true) => {
                return Err(AgentError::Refused(format!(
                    "sandbox {} has no SSH master to carry the port ({})",
                    s.name,
                    s.state_dir.join("mux.log").display()
                )))
            }
            (None, false) => {}
        }
    }
    let saved = reg.update(|list| {
        if added {
            check(list)?;
        }
        let Some(sb) = list.iter_mut().find(|x| x.name == s.name) else {
            return Err(AgentError::NotFound(s.name.clone()));
        };
        if added {
            sb.ports.push(forward);
        } else {
            sb.ports.retain(|p| *p != forward);
        }
        Ok(())
    });
    if let Err(e) = saved {
        if live && added {
            if let Some(sock) = ssh::live_master(&target(&s)) {
                let _ = ssh::master_forward(&target(&s), &sock, &forward, false);
            }
        }
        return Err(e);
    }
    Ok(Changed {
        sandbox: s.name,
        forward,
        added,
        live,
    })
}

/// The forwards of sandbox `name`.
pub fn list(paths: &AgentPaths, name: &str) -> Result<Vec<PortForward>, AgentError> {
    Ok(paths.registry().find(Some(name))?.ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(guest: u16, host: u16) -> PortForward {
        PortForward {
            direction: PortDirection::Publish,
            guest_port: guest,
            host_port: host,
        }
    }

    #[test]
    fn publish_specs_parse() {
        assert_eq!(parse_publish("8000"), Ok((8000, 8000)));
        assert_eq!(parse_publish("8000:18080"), Ok((8000, 18080)));
        for bad in ["0", "65536", "80:", ":80", "x", "1:2:3", "-1", ""] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_arguments_name_loopback_on_both_sides() {
        assert_eq!(
            publish(8000, 18080).ssh_args(),
            ["-L", "127.0.0.1:18080:127.0.0.1:8000"]
        );
        let reach = forward_of(PortChange::Reach { host: 5432 }, &[]).unwrap();
        assert_eq!(reach.ssh_args(), ["-R", "127.0.0.1:5432:127.0.0.1:5432"]);
    }

    #[test]
    fn removals_find_their_forward() {
        let reach = forward_of(PortChange::Reach { host: 9000 }, &[]).unwrap();
        let ports = [publish(8000, 18080), reach];
        assert_eq!(
            forward_of(PortChange::Unpublish { guest: 8000 }, &ports),
            Some(ports[0])
        );
        assert_eq!(
            forward_of(PortChange::Unreach { host: 9000 }, &ports),
            Some(reach)
        );
        assert_eq!(
            forward_of(PortChange::Unpublish { guest: 9000 }, &ports),
            None
        );
        assert_eq!(
            forward_of(PortChange::Unreach { host: 18080 }, &ports),
            None
        );
    }

    #[test]
    fn host_ports_and_published_guest_ports_are_taken_once() {
        let ports = [publish(8000, 18080)];
        // The same host port, either way, in any sandbox.
        assert!(conflict(&publish(9000, 18080), &ports, false).is_some());
        let reach = forward_of(PortChange::Reach { host: 18080 }, &[]).unwrap();
        assert!(conflict(&reach, &ports, true).is_some());
        // A guest port published twice in one sandbox; in another it is
        // that sandbox's own guest.
        assert!(conflict(&publish(8000, 18081), &ports, true).is_some());
        assert!(conflict(&publish(8000, 18081), &ports, false).is_none());
        assert!(conflict(&publish(8001, 18081), &ports, true).is_none());
    }
}
