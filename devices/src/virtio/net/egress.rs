//! What the guest may not send out of its NIC.
//!
//! Always: frames addressed to a loopback (or "this host") destination.
//! passt answers such frames from the host's own sockets, so a guest with a
//! raw socket could otherwise reach services bound to the host's 127.0.0.1
//! or ::1 (passt 2023.03, Debian 12, does: `--no-map-gw` alone does not stop
//! it). A tap backend's kernel drops them as martians anyway.
//!
//! And where the VMM asks for it ([`Egress::dns_only`]): anything but DNS
//! (UDP or TCP port 53) to the addresses passt maps to the host's loopback,
//! its gateway when the host's resolver is on loopback (that passt can only
//! reach such a resolver through the gateway mapping). The checks cost a
//! few compares per frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// EtherTypes this looks through or at.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Ethernet header without tags.
const ETH_HLEN: usize = 14;
/// VLAN tags looked through (QinQ at most).
const MAX_TAGS: usize = 2;
/// IP protocol numbers a DNS query travels in.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// The one port open on a [`Egress::dns_only`] address.
const DNS_PORT: u16 = 53;

/// Why a frame does not go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// To 127.0.0.0/8, 0.0.0.0/8, ::1, :: or their IPv4-mapped forms, or an
    /// IP header cut before its destination, or more VLAN tags than looked
    /// through.
    HostItself,
    /// To a DNS-only address, but not a whole UDP or TCP segment to port 53.
    NotDns,
}

/// The egress policy of one NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    dns_only: Vec<IpAddr>,
}

impl Egress {
    /// Loopback destinations refused, and `addrs` reachable on UDP or TCP
    /// port 53 alone.
    pub fn dns_only(addrs: Vec<IpAddr>) -> Egress {
        Egress { dns_only: addrs }
    }

    /// Whether `frame` (an Ethernet frame, no virtio header) may go out.
    /// Anything not IP (ARP, say) may.
    pub fn check(&self, frame: &[u8]) -> Result<(), Refusal> {
        let Some((ethertype, ip)) = ip_header(frame)? else {
            return Ok(());
        };
        let (dst, l4) = match ethertype {
            ETH_P_IP => {
                let d = ip.get(16..20).ok_or(Refusal::HostItself)?;
                let dst = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
                if local_v4(dst) {
                    return Err(Refusal::HostItself);
                }
                (IpAddr::V4(dst), v4_transport(ip))
            }
            _ => {
                let d: [u8; 16] = ip
                    .get(24..40)
                    .and_then(|d| d.try_into().ok())
                    .ok_or(Refusal::HostItself)?;
                let dst = Ipv6Addr::from(d);
                if local_v6(dst) {
                    return Err(Refusal::HostItself);
                }
                (IpAddr::V6(dst), v6_transport(ip))
            }
        };
        if !self.dns_only.contains(&dst) {
            return Ok(());
        }
        match l4 {
            Some((IPPROTO_UDP | IPPROTO_TCP, seg)) if dst_port(seg) == Some(DNS_PORT) => Ok(()),
            _ => Err(Refusal::NotDns),
        }
    }
}

/// The EtherType (IPv4 or IPv6) and the bytes from the IP header on, VLAN
/// tags looked through; `None` for anything not IP.
fn ip_header(frame: &[u8]) -> Result<Option<(u16, &[u8])>, Refusal> {
    let mut off = ETH_HLEN - 2;
    let mut tags = 0;
    loop {
        let Some(t) = frame.get(off..off + 2) else {
            return Ok(None);
        };
        match u16::from_be_bytes([t[0], t[1]]) {
            ETH_P_8021Q | ETH_P_8021AD if tags < MAX_TAGS => {
                tags += 1;
                off += 4;
            }
            e @ (ETH_P_IP | ETH_P_IPV6) => return Ok(frame.get(off + 2..).map(|ip| (e, ip))),
            // More tags than looked through: nothing a guest needs.
            ETH_P_8021Q | ETH_P_8021AD => return Err(Refusal::HostItself),
            _ => return Ok(None),
        }
    }
}

/// An IPv4 packet's protocol and transport bytes; `None` for a fragment
/// (the first one included: a DNS query is never fragmented) or a header
/// length that does not fit.
fn v4_transport(ip: &[u8]) -> Option<(u8, &[u8])> {
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
    if ihl < 20 || frag & 0x3fff != 0 {
        return None;
    }
    Some((*ip.get(9)?, ip.get(ihl..)?))
}

/// An IPv6 packet's next header and what follows the fixed header
/// (extension headers are not looked through: DNS needs none).
fn v6_transport(ip: &[u8]) -> Option<(u8, &[u8])> {
    Some((*ip.get(6)?, ip.get(40..)?))
}

/// The destination port of a UDP or TCP header.
fn dst_port(seg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*seg.get(2)?, *seg.get(3)?]))
}

fn local_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 || o[0] == 0
}

fn local_v6(ip: Ipv6Addr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    ip.to_ipv4_mapped().is_some_and(local_v4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 frame to `dst` behind `tags` VLAN tags: protocol `proto`, a
    /// transport header with destination port `port`, fragment field `frag`.
    fn v4_to(dst: [u8; 4], tags: usize, proto: u8, port: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        for _ in 0..tags {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x01]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[9] = proto;
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x9c, 0x40]);
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0u8; 16]);
        f
    }

    fn v4(dst: [u8; 4], tags: usize) -> Vec<u8> {
        v4_to(dst, tags, IPPROTO_TCP, 80, 0)
    }

    fn v6_to(dst: &str, next: u8, port: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x86, 0xdd]);
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[6] = next;
        ip[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x9c, 0x40]);
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&[0u8; 4]);
        f
    }

    fn v6(dst: &str) -> Vec<u8> {
        v6_to(dst, IPPROTO_TCP, 80)
    }

    #[test]
    fn loopback_and_this_host_destinations_are_caught() {
        let e = Egress::default();
        let refused = Err(Refusal::HostItself);
        for d in [[127, 0, 0, 1], [127, 8, 9, 10], [0, 0, 0, 0], [0, 1, 2, 3]] {
            assert_eq!(e.check(&v4(d, 0)), refused, "{d:?}");
            assert_eq!(e.check(&v4(d, 1)), refused, "{d:?} behind a VLAN tag");
            assert_eq!(e.check(&v4(d, 2)), refused, "{d:?} behind QinQ");
        }
        for d in [
            [10, 0, 0, 1],
            [192, 0, 2, 1],
            [255, 255, 255, 255],
            [8, 8, 8, 8],
        ] {
            assert_eq!(e.check(&v4(d, 0)), Ok(()), "{d:?}");
        }
        for d in ["::1", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"] {
            assert_eq!(e.check(&v6(d)), refused, "{d}");
        }
        for d in ["fe80::1", "2001:db8::1", "::ffff:10.0.0.1", "ff02::1"] {
            assert_eq!(e.check(&v6(d)), Ok(()), "{d}");
        }
        // Three tags deep, or an IP header cut before its destination.
        assert_eq!(e.check(&v4([10, 0, 0, 1], 3)), refused);
        assert_eq!(e.check(&v4([10, 0, 0, 1], 0)[..30]), refused);
        assert_eq!(e.check(&v6("fe80::1")[..50]), refused);
        // ARP and anything else: not IP, not looked at.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(e.check(&arp), Ok(()));
        assert_eq!(e.check(&[0u8; 10]), Ok(()));
    }

    #[test]
    fn a_dns_only_address_takes_port_53_alone() {
        let gw4 = [192, 0, 2, 1];
        let gw6 = "fe80::1";
        let e = Egress::dns_only(vec![IpAddr::from(gw4), IpAddr::V6(gw6.parse().unwrap())]);
        let not_dns = Err(Refusal::NotDns);
        // DNS over UDP or TCP, tagged or not.
        assert_eq!(e.check(&v4_to(gw4, 0, IPPROTO_UDP, 53, 0)), Ok(()));
        assert_eq!(e.check(&v4_to(gw4, 1, IPPROTO_TCP, 53, 0)), Ok(()));
        assert_eq!(e.check(&v6_to(gw6, IPPROTO_UDP, 53)), Ok(()));
        // Every other port, protocol, fragment or header shape.
        assert_eq!(e.check(&v4_to(gw4, 0, IPPROTO_TCP, 22, 0)), not_dns);
        assert_eq!(e.check(&v4_to(gw4, 0, IPPROTO_UDP, 5353, 0)), not_dns);
        assert_eq!(e.check(&v4_to(gw4, 0, 1, 53, 0)), not_dns, "ICMP");
        for frag in [0x2000, 0x0001, 0x2001] {
            assert_eq!(
                e.check(&v4_to(gw4, 0, IPPROTO_UDP, 53, frag)),
                not_dns,
                "fragment {frag:#x}"
            );
        }
        let mut opts = v4_to(gw4, 0, IPPROTO_UDP, 53, 0);
        opts[14] = 0x4f; // a 60-byte header: the "port" read is payload
        assert_eq!(e.check(&opts), not_dns);
        opts[14] = 0x44; // shorter than 20 bytes
        assert_eq!(e.check(&opts), not_dns);
        assert_eq!(
            e.check(&v4_to(gw4, 0, IPPROTO_UDP, 53, 0)[..36]),
            not_dns,
            "cut before the port"
        );
        assert_eq!(e.check(&v6_to(gw6, 0, 53)), not_dns, "hop-by-hop first");
        assert_eq!(e.check(&v6_to(gw6, IPPROTO_TCP, 8080)), not_dns);
        // Other destinations are not limited.
        assert_eq!(
            e.check(&v4_to([192, 0, 2, 9], 0, IPPROTO_TCP, 22, 0)),
            Ok(())
        );
        assert_eq!(e.check(&v6_to("fe80::2", IPPROTO_TCP, 22)), Ok(()));
        // And the loopback rule still holds first.
        assert_eq!(
            e.check(&v4_to([127, 0, 0, 1], 0, IPPROTO_UDP, 53, 0)),
            Err(Refusal::HostItself)
        );
    }
}
