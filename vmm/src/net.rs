//! Network configuration for virtio-net: `--net user` (passt, user-mode
//! networking, no root), `--net tap=NAME` (a tap device, CAP_NET_ADMIN) or
//! `--net macvtap=NAME` (an existing macvtap link, through `/dev/tapN`),
//! stable locally administered MAC addresses, and the passt process the VMM
//! starts and connects over a socketpair.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// How the guest's NIC reaches the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// User-mode networking through passt: DHCP, DNS and outbound TCP/UDP,
    /// nothing listening on the host's interfaces.
    User,
    /// An existing or new tap device of this name.
    Tap(String),
    /// An existing macvtap link of this name (the guest gets its MAC).
    Macvtap(String),
}

/// A validated `--net` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Backend.
    pub mode: NetMode,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// Errors in `--net` or in starting its backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The `--net` value is malformed.
    #[error("--net {spec}: {reason}")]
    Spec {
        /// The value given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// passt is not installed.
    #[error("--net user needs passt, which is not installed: install it with `apt-get install passt` (Debian, Ubuntu) or `dnf install passt` (Fedora)")]
    PasstMissing,
    /// passt could not be started.
    #[error("cannot start passt: {0}")]
    PasstSpawn(std::io::Error),
}

/// A stable, locally administered, unicast MAC address derived from `name`
/// (FNV-1a), so a sandbox keeps its MAC across restarts and sandboxes with
/// different names do not clash.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // Bit 1 of the first octet: locally administered; bit 0 clear: unicast.
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// Parse `aa:bb:cc:dd:ee:ff` (a unicast address).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
}

/// Format a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `user[,mac=MAC|,name=NAME]`, `tap=IFNAME[,mac=MAC|,name=NAME]` or
/// `macvtap=IFNAME` (its MAC is the link's, so it takes no option).
/// Without `mac=` or `name=`, the MAC is derived from `default_name`.
pub fn parse_net(spec: &str, default_name: &str) -> Result<NetConfig, NetError> {
    let err = |reason: &str| NetError::Spec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let mut parts = spec.split(',');
    let ifname = |name: &str| {
        !name.is_empty()
            && name.len() <= 15
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
    };
    let mode = match parts.next().unwrap_or("") {
        "user" => NetMode::User,
        t => match (t.strip_prefix("tap="), t.strip_prefix("macvtap=")) {
            (Some(name), _) if ifname(name) => NetMode::Tap(name.to_string()),
            (_, Some(name)) if ifname(name) => NetMode::Macvtap(name.to_string()),
            (Some(_), _) | (_, Some(_)) => {
                return Err(err(
                    "an interface name is 1 to 15 characters of [A-Za-z0-9._-]",
                ))
            }
            _ => return Err(err("use user, tap=NAME or macvtap=NAME")),
        },
    };
    let mut mac = None;
    for opt in parts {
        if matches!(mode, NetMode::Macvtap(_)) {
            return Err(err(
                "macvtap=NAME takes no options: the guest gets the link's own MAC",
            ));
        }
        match opt.split_once('=') {
            Some(("mac", v)) => {
                mac = Some(
                    parse_mac(v).ok_or_else(|| err("mac= needs a unicast aa:bb:cc:dd:ee:ff"))?,
                )
            }
            Some(("name", v)) if !v.is_empty() => mac = Some(mac_from_name(v)),
            _ => {
                return Err(err(&format!(
                    "unknown option {opt:?} (use mac=MAC or name=NAME)"
                )))
            }
        }
    }
    Ok(NetConfig {
        mode,
        mac: mac.unwrap_or_else(|| mac_from_name(default_name)),
    })
}

/// Find an executable on PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
}

/// The fd number passt gets its end of the socketpair on.
const PASST_FD: i32 = 3;

/// How passt keeps the host's loopback out of the guest's reach, and what
/// the VMM's virtio-net enforces on top ([`devices::virtio::net::Egress`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasstPlan {
    /// passt's options beyond the socket.
    pub args: Vec<String>,
    /// Addresses passt maps to the host's loopback, which the guest may
    /// reach on port 53 (UDP or TCP) alone.
    pub dns_only: Vec<IpAddr>,
    /// The host's resolver is on loopback but no default route was found:
    /// the guest gets no DNS (said once in the VMM's log).
    pub no_dns: bool,
}

/// The plan for this host: `resolv_conf` is its `/etc/resolv.conf`,
/// `route` and `ipv6_route` its `/proc/net/route` and `/proc/net/ipv6_route`.
///
/// When the first nameserver is not on loopback (the usual case on servers):
/// `--no-map-gw`, so the gateway address is the network's, not the host,
/// and DNS goes where the host's does.
///
/// When it is (systemd-resolved, a local dnsmasq), passt (2023.03, Debian
/// 12) reaches it only through its gateway mapping: the gateway address is
/// the host's loopback, offered to the guest as its DNS server. `--no-map-gw`
/// with `--dns-forward` does not work there (measured: the answers come
/// back from the gateway, not from the forwarding address, and the guest's
/// resolver drops them). So passt keeps the mapping, the gateway is pinned
/// to the host's default gateway (`-g`, so passt and the VMM agree on it),
/// and the VMM lets only DNS through to it; IPv6 likewise, or `-4` when the
/// host has no IPv6 default route to pin.
pub fn passt_plan(resolv_conf: &str, route: &str, ipv6_route: &str) -> PasstPlan {
    let first = resolv_conf.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some("nameserver"), Some(addr)) => addr.parse::<IpAddr>().ok(),
            _ => None,
        }
    });
    let isolated = PasstPlan {
        args: vec!["--no-map-gw".into()],
        dns_only: Vec::new(),
        no_dns: false,
    };
    if !first.is_some_and(|a| a.is_loopback()) {
        return isolated;
    }
    let Some(gw4) = default_gateway_v4(route) else {
        return PasstPlan {
            no_dns: true,
            ..isolated
        };
    };
    let mut plan = PasstPlan {
        args: vec!["-g".into(), gw4.to_string()],
        dns_only: vec![IpAddr::V4(gw4)],
        no_dns: false,
    };
    match default_gateway_v6(ipv6_route) {
        Some(gw6) => {
            plan.args.extend(["-g".into(), gw6.to_string()]);
            plan.dns_only.push(IpAddr::V6(gw6));
        }
        None => plan.args.push("-4".into()),
    }
    plan
}

/// [`passt_plan`] for this host, from its files (one missing reads as
/// empty: no loopback resolver, or no default route).
pub fn host_passt_plan() -> PasstPlan {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    passt_plan(
        &read("/etc/resolv.conf"),
        &read("/proc/net/route"),
        &read("/proc/net/ipv6_route"),
    )
}

/// `RTF_GATEWAY` in the routing tables' flags.
const RTF_GATEWAY: u32 = 0x2;

/// The gateway of the first IPv4 default route in `/proc/net/route`
/// (addresses there are in network order, printed as native integers).
fn default_gateway_v4(route: &str) -> Option<Ipv4Addr> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok());
        let (dest, gw, flags, mask) = (hex(1)?, hex(2)?, hex(3)?, hex(7)?);
        (dest == 0 && mask == 0 && flags & RTF_GATEWAY != 0 && gw != 0)
            .then(|| Ipv4Addr::from(gw.to_ne_bytes()))
    })
}

/// The next hop of the first IPv6 default route in `/proc/net/ipv6_route`.
fn default_gateway_v6(ipv6_route: &str) -> Option<Ipv6Addr> {
    ipv6_route.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dest, plen, hop, flags) = (f.first()?, f.get(1)?, f.get(4)?, f.get(8)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        let hop = u128::from_str_radix(hop, 16).ok().map(Ipv6Addr::from)?;
        (dest.bytes().all(|b| b == b'0')
            && *plen == "00"
            && flags & RTF_GATEWAY != 0
            && !hop.is_unspecified())
        .then_some(hop)
    })
}

/// Start passt for one VM: it talks QEMU's length-prefixed frame protocol on
/// its end of a socketpair, forwards no host ports (`-t none -u none`),
/// keeps the host's loopback out of the guest's reach (`plan`, see
/// [`passt_plan`]), serves one client and quits when the VMM's end closes
/// (`-1`), and is killed if the VMM dies (parent-death signal). Returns the
/// child and the VMM's end of the socket.
pub fn spawn_passt(plan: &PasstPlan) -> Result<(Child, UnixStream), NetError> {
    let passt = which("passt").ok_or(NetError::PasstMissing)?;
    let (ours, theirs) = UnixStream::pair().map_err(NetError::PasstSpawn)?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(passt);
    // MTU 1500: the device offers no mergeable RX buffers, so the guest
    // posts ~1.5 KiB receive buffers; passt's default (65520) would hand it
    // frames it cannot take.
    cmd.args([
        "-f",
        "-q",
        "-1",
        "-t",
        "none",
        "-u",
        "none",
        "-l",
        "/dev/null",
        "--mtu",
        "1500",
    ])
    .args(&plan.args)
    .arg("-F")
    .arg(PASST_FD.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2 and prctl, which are async-signal-safe; `fd` is open in the
    // parent (held by `theirs` until after spawn) and so in the child.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the new descriptor.
            if libc::dup2(fd, PASST_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(NetError::PasstSpawn)?;
    drop(theirs);
    Ok((child, ours))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/net/route` with a default route via 10.0.2.2 on eth0 (after
    /// a non-default one).
    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        eth0\t00000000\t0202000A\t0003\t0\t0\t1024\t00000000\t0\t0\t0\n";
    /// `/proc/net/ipv6_route` with lo's reject route and a default via fe80::1.
    const ROUTE6: &str = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
        20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
        00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";

    #[test]
    fn passt_never_maps_the_host_loopback_beyond_a_loopback_resolver_on_port_53() {
        let gw4: IpAddr = "10.0.2.2".parse().unwrap();
        let gw6: IpAddr = "fe80::1".parse().unwrap();
        // A resolver off loopback: no mapping at all, nothing for the VMM.
        let plain = passt_plan("# x\nsearch lan\nnameserver 192.168.1.1\n", ROUTE, ROUTE6);
        assert_eq!(plain.args, vec!["--no-map-gw"]);
        assert!(plain.dns_only.is_empty() && !plain.no_dns);
        // The first nameserver decides (it is the one passt uses).
        for other in ["nameserver 10.0.0.2\nnameserver 127.0.0.1\n", ""] {
            assert_eq!(passt_plan(other, ROUTE, ROUTE6), plain, "{other:?}");
        }
        // On loopback: the gateway pinned and DNS-only in the VMM.
        for lo in ["nameserver 127.0.0.53\n", "options edns0\nnameserver ::1\n"] {
            let p = passt_plan(lo, ROUTE, ROUTE6);
            assert_eq!(p.args, vec!["-g", "10.0.2.2", "-g", "fe80::1"], "{lo}");
            assert_eq!(p.dns_only, vec![gw4, gw6], "{lo}");
            // No IPv6 default route: IPv6 off rather than an unpinned gateway.
            let p = passt_plan(
                lo,
                ROUTE,
                &ROUTE6.lines().take(2).collect::<Vec<_>>().join("\n"),
            );
            assert_eq!(p.args, vec!["-g", "10.0.2.2", "-4"], "{lo}");
            assert_eq!(p.dns_only, vec![gw4], "{lo}");
            // No IPv4 default route either: isolated, and no DNS.
            let p = passt_plan(lo, "", "");
            assert_eq!(p.args, vec!["--no-map-gw"]);
            assert!(p.dns_only.is_empty() && p.no_dns);
        }
    }

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let a = mac_from_name("my-project");
        assert_eq!(a, mac_from_name("my-project"));
        assert_ne!(a, mac_from_name("my-project-2"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&a)), Some(a));
        assert_eq!(parse_mac("02:00:00:00:00:01"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_mac("03:00:00:00:00:01"), None, "multicast");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "002:00:00:00:00:01",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn net_specs_parse() {
        let u = parse_net("user", "vm1").unwrap();
        assert_eq!((u.mode, u.mac), (NetMode::User, mac_from_name("vm1")));
        let m = parse_net("macvtap=ksmvt0", "vm1").unwrap();
        assert_eq!(m.mode, NetMode::Macvtap("ksmvt0".into()));
        let t = parse_net("tap=ks0,mac=02:11:22:33:44:55", "vm1").unwrap();
        assert_eq!(t.mode, NetMode::Tap("ks0".into()));
        assert_eq!(t.mac, [2, 0x11, 0x22, 0x33, 0x44, 0x55]);
        assert_eq!(
            parse_net("user,name=box", "x").unwrap().mac,
            mac_from_name("box")
        );
        for bad in [
            "",
            "bridge",
            "tap=",
            "tap=waytoolonginterfacename",
            "tap=a/b",
            "macvtap=",
            "macvtap=a/b",
            "macvtap=mv0,mac=02:11:22:33:44:55",
            "user,mac=zz",
            "user,speed=10",
        ] {
            assert!(parse_net(bad, "x").is_err(), "{bad}");
        }
    }

    #[test]
    fn passt_answers_dhcp_over_the_socketpair() {
        if which("passt").is_none() {
            panic!("passt is not installed (apt-get install passt): .ci/run installs it");
        }
        let (mut child, mut sock) = spawn_passt(&host_passt_plan()).unwrap();
        use std::io::{Read, Write};
        // A DHCP DISCOVER, as the guest would send it.
        let mac = [2u8, 0, 0, 0, 0, 1];
        let mut bootp = vec![0u8; 240];
        bootp[0] = 1;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        bootp[10] = 0x80;
        bootp[28..34].copy_from_slice(&mac);
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
        bootp.extend_from_slice(&[53, 1, 1, 255]);
        let mut udp = Vec::new();
        udp.extend_from_slice(&68u16.to_be_bytes());
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&bootp);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&udp);
        sock.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
        sock.write_all(&frame).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).unwrap();
        let n = u32::from_be_bytes(len) as usize;
        let mut reply = vec![0u8; n];
        sock.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[12..14], &[0x08, 0x00], "IPv4");
        assert_eq!(
            &reply[34..36],
            &67u16.to_be_bytes(),
            "from the DHCP server port"
        );
        assert_eq!(
            &reply[46..50],
            &[0x12, 0x34, 0x56, 0x78],
            "our transaction id"
        );
        drop(sock);
        // -1: passt quits once its only client is gone.
        let st = child.wait().unwrap();
        assert!(st.success() || st.code().is_some(), "{st}");
    }
}
