//! A sandbox's egress policy (`--network policy`): which hosts and ports
//! the guest may reach through the host's egress proxy ([`super::egress`]),
//! and the address rules no policy can open.
//!
//! A pattern is `NAME[:PORT]`: `NAME` an exact host name or `*.SUFFIX`
//! (every name below SUFFIX, not SUFFIX itself); `PORT` a number or `*`;
//! without one, ports 443 and 80. Deny patterns win over allow patterns.
//! Targets are names: an IP address as the target is refused (a policy
//! names hosts, and an address would let a guest skip the name check).
//! After the host resolves an allowed name, loopback, private,
//! link-local (cloud metadata included), shared, multicast and reserved
//! addresses are dropped ([`blocked_address`]), so a name that resolves to
//! one (DNS rebinding) reaches nothing on the host's side.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{write_atomic, StateError};

/// Hosts a new sandbox may reach, unless `<agent root>/default-policy.json`
/// says otherwise: the coding agents' model APIs, git hosts and package
/// registries.
pub const DEFAULT_ALLOW: &[&str] = &[
    // Model APIs (Claude Code, Codex, Gemini CLI).
    "api.anthropic.com",
    "statsig.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    // Git hosts.
    "github.com",
    "*.github.com",
    "*.githubusercontent.com",
    "gitlab.com",
    "*.gitlab.com",
    "bitbucket.org",
    "codeberg.org",
    // Package registries.
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "static.rust-lang.org",
    "proxy.golang.org",
    "sum.golang.org",
    "rubygems.org",
    "repo.maven.apache.org",
    "repo1.maven.org",
    "deb.debian.org",
    "security.debian.org",
];

/// Errors of the policy file and patterns.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A pattern that is not `NAME[:PORT]`.
    #[error("{0:?} is not a host pattern (NAME, *.SUFFIX, with :PORT or :* optional)")]
    BadPattern(String),
    /// The policy file does not parse.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or writing it.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A sandbox's policy (`sandboxes/<name>/policy.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Patterns the guest may reach.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Patterns it may not, whatever `allow` says.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A parsed pattern.
#[derive(Debug, PartialEq, Eq)]
struct Pattern {
    /// Lower case, no trailing dot; for `*.x`, `x`.
    name: String,
    /// `*.` given.
    wildcard: bool,
    /// `None`: any port.
    ports: Option<Vec<u16>>,
}

/// Normalises a host name: lower case, one trailing dot dropped. `None`
/// when it is not a DNS name (labels of letters, digits, `-` and `_`, at
/// most 63 each, 253 in all).
pub fn normal_host(host: &str) -> Option<String> {
    let h = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(h)
}

fn parse(p: &str) -> Result<Pattern, PolicyError> {
    let bad = || PolicyError::BadPattern(p.to_string());
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) => (h, Some(port)),
        None => (p, None),
    };
    let ports = match port {
        None => Some(vec![443, 80]),
        Some("*") => None,
        Some(n) => match n.parse::<u16>() {
            Ok(n) if n > 0 => Some(vec![n]),
            _ => return Err(bad()),
        },
    };
    let (wildcard, host) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    let name = normal_host(host).ok_or_else(bad)?;
    if host.parse::<IpAddr>().is_ok() || name.parse::<Ipv4Addr>().is_ok() {
        return Err(bad());
    }
    Ok(Pattern {
        name,
        wildcard,
        ports,
    })
}

/// Checks a pattern; returns it as it will be stored (lower case).
pub fn check_pattern(p: &str) -> Result<String, PolicyError> {
    parse(p)?;
    Ok(p.to_ascii_lowercase())
}

impl Pattern {
    fn matches(&self, host: &str, port: u16) -> bool {
        let name = if self.wildcard {
            host.strip_suffix(self.name.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
        } else {
            host == self.name
        };
        name && self.ports.as_ref().is_none_or(|ps| ps.contains(&port))
    }
}

/// A decision on one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this pattern.
    Allow(String),
    /// Refused, and why.
    Deny(String),
}

impl Policy {
    /// The decision for `host:port` (`host` as the guest named it).
    pub fn decide(&self, host: &str, port: u16) -> Decision {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return Decision::Deny("an address, not a host name".into());
        }
        let Some(h) = normal_host(host) else {
            return Decision::Deny("not a host name".into());
        };
        let hit = |list: &[String]| {
            list.iter()
                .find(|p| parse(p).is_ok_and(|pat| pat.matches(&h, port)))
                .cloned()
        };
        if let Some(p) = hit(&self.deny) {
            return Decision::Deny(format!("denied by {p}"));
        }
        match hit(&self.allow) {
            Some(p) => Decision::Allow(p),
            None => Decision::Deny("no allow pattern matches".into()),
        }
    }

    /// Adds `patterns` to the allow list (taking them off the deny list).
    pub fn allow(&mut self, patterns: &[String]) {
        for p in patterns {
            self.deny.retain(|d| d != p);
            if !self.allow.contains(p) {
                self.allow.push(p.clone());
            }
        }
    }

    /// Adds `patterns` to the deny list (taking them off the allow list).
    pub fn deny(&mut self, patterns: &[String]) {
        for p in patterns {
            self.allow.retain(|a| a != p);
            if !self.deny.contains(p) {
                self.deny.push(p.clone());
            }
        }
    }

    /// The built-in default ([`DEFAULT_ALLOW`]).
    pub fn builtin() -> Policy {
        Policy {
            allow: DEFAULT_ALLOW.iter().map(|s| s.to_string()).collect(),
            deny: Vec::new(),
        }
    }

    /// Reads the policy at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PolicyError::State(StateError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        let p: Policy = serde_json::from_slice(&bytes).map_err(|e| PolicyError::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        for pat in p.allow.iter().chain(&p.deny) {
            parse(pat).map_err(|e| PolicyError::BadFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        Ok(p)
    }

    /// Writes it to `path` (write, then rename).
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| PolicyError::BadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        json.push(b'\n');
        Ok(write_atomic(path, &json)?)
    }
}

/// The sandbox policy at `path`, made first from `default` (the agent
/// root's `default-policy.json`) or, without one, [`Policy::builtin`].
pub fn load_or_create(path: &Path, default: &Path) -> Result<Policy, PolicyError> {
    if path.exists() {
        return Policy::load(path);
    }
    let p = if default.exists() {
        Policy::load(default)?
    } else {
        Policy::builtin()
    };
    p.save(path)?;
    Ok(p)
}

/// Whether the egress proxy refuses to connect to `ip` whatever the
/// policy: addresses of this host, of private networks, link-local (cloud
/// metadata 169.254.169.254, fd00:ec2::254), shared (100.64/10),
/// multicast, broadcast and reserved; IPv4 inside IPv6 by its IPv4 rule.
pub fn blocked_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return blocked_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return blocked_v4(Ipv4Addr::new(a, b, c, d));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || s[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible
        }
    }
}

fn blocked_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || (a == 100 && (b & 0xc0) == 64) // shared, 100.64/10
        || a >= 240 // reserved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn names_suffixes_and_ports_match_as_documented() {
        let p = policy(
            &["github.com", "*.npmjs.org", "test.local:8080", "any.dev:*"],
            &[],
        );
        let allowed = |h: &str, port: u16| matches!(p.decide(h, port), Decision::Allow(_));
        assert!(allowed("github.com", 443) && allowed("GitHub.com.", 80));
        assert!(!allowed("github.com", 22), "no port given: 443 and 80 only");
        assert!(!allowed("api.github.com", 443), "exact name only");
        assert!(!allowed("evilgithub.com", 443));
        assert!(allowed("registry.npmjs.org", 443) && allowed("a.b.npmjs.org", 443));
        assert!(!allowed("npmjs.org", 443), "*.x is below x, not x");
        assert!(!allowed("evilnpmjs.org", 443) && !allowed("npmjs.org.evil.com", 443));
        assert!(allowed("test.local", 8080) && !allowed("test.local", 443));
        assert!(allowed("any.dev", 1) && allowed("any.dev", 65535));
    }

    #[test]
    fn deny_wins_and_addresses_are_never_targets() {
        let p = policy(&["*.example.com"], &["secret.example.com"]);
        assert_eq!(
            p.decide("secret.example.com", 443),
            Decision::Deny("denied by secret.example.com".into())
        );
        assert!(matches!(
            p.decide("www.example.com", 443),
            Decision::Allow(_)
        ));
        for target in [
            "93.184.216.34",
            "[2606:2800:220:1::]",
            "::1",
            "not a name",
            "",
        ] {
            assert!(
                matches!(p.decide(target, 443), Decision::Deny(_)),
                "{target}"
            );
        }
    }

    #[test]
    fn patterns_are_checked() {
        for good in ["a.b", "*.b.c", "x:1", "x:*", "UPPER.case"] {
            assert!(check_pattern(good).is_ok(), "{good}");
        }
        for bad in [
            "", "*", "*.", "a..b", "a:0", "a:70000", "1.2.3.4", "-a.b", "a b", "**.a", "a.*",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(check_pattern("GitHub.COM").unwrap(), "github.com");
    }

    #[test]
    fn allow_and_deny_move_patterns_between_lists() {
        let mut p = policy(&["a.com"], &["b.com"]);
        p.allow(&["b.com".into()]);
        assert_eq!(p, policy(&["a.com", "b.com"], &[]));
        p.deny(&["a.com".into(), "a.com".into()]);
        assert_eq!(p, policy(&["b.com"], &["a.com"]));
    }

    #[test]
    fn host_private_and_metadata_addresses_are_blocked() {
        for blocked in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(blocked_address(blocked.parse().unwrap()), "{blocked}");
        }
        for open in [
            "93.184.216.34",
            "192.0.2.8",
            "2606:2800:220:1::1",
            "64:ff9b::5db8:d822",
        ] {
            assert!(!blocked_address(open.parse().unwrap()), "{open}");
        }
    }

    #[test]
    fn a_new_sandbox_policy_comes_from_the_default_file_or_the_builtin() {
        let dir = std::env::temp_dir().join(format!("ks-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (own, default) = (dir.join("policy.json"), dir.join("default-policy.json"));
        assert_eq!(load_or_create(&own, &default).unwrap(), Policy::builtin());
        std::fs::remove_file(&own).unwrap();
        policy(&["only.this"], &[]).save(&default).unwrap();
        assert_eq!(
            load_or_create(&own, &default).unwrap(),
            policy(&["only.this"], &[])
        );
        // A broken file is an error, not an open policy.
        std::fs::write(&own, "{\"allow\": [\"1.2.3.4\"]}").unwrap();
        assert!(matches!(
            Policy::load(&own),
            Err(PolicyError::BadFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
