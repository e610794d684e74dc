//! Stale UDP conntrack entries, as upstream's kube-proxy clears them. UDP has no connection to
//! end: once a flow is DNATed to an endpoint, conntrack keeps sending it there for as long as
//! packets keep coming, even after the endpoint is gone. So when a UDP Service port loses an
//! endpoint, the entries from its frontends to that endpoint are deleted; and when a UDP port
//! gets its first endpoint, the entries to its frontends are (they could only lead nowhere).
//! This module decides (no IO); [`crate::nfnl`] dumps and deletes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::model::ServicePort;
use crate::nfnl;

/// Whether a port's flows outlive their endpoint: UDP only (TCP connections end on their own;
/// upstream leaves them too).
pub fn concerns(sp: &ServicePort) -> bool {
    sp.protocol == "udp"
}

/// Where traffic to a Service port arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Frontend {
    /// A ClusterIP or external IP, and the port.
    Ip(Ipv4Addr, u16),
    /// A node port, on any of the node's addresses.
    NodePort(u16),
}

impl Frontend {
    fn matches(&self, dst: Addr) -> bool {
        match *self {
            Frontend::Ip(ip, port) => dst == (ip, port),
            Frontend::NodePort(port) => dst.1 == port,
        }
    }
}

fn frontends(sp: &ServicePort) -> Vec<Frontend> {
    let mut out = vec![Frontend::Ip(sp.cluster_ip, sp.port)];
    out.extend(sp.external_ips.iter().map(|ip| Frontend::Ip(*ip, sp.port)));
    out.extend(sp.node_port.map(Frontend::NodePort));
    out
}

/// What one update made stale.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stale {
    /// A frontend and an endpoint (address, port) it no longer leads to.
    pub lost: BTreeSet<(Frontend, Ipv4Addr, u16)>,
    /// Frontends that had no endpoint and now have one.
    pub revived: BTreeSet<Frontend>,
}

impl Stale {
    pub fn is_empty(&self) -> bool {
        self.lost.is_empty() && self.revived.is_empty()
    }

    /// Add what turning `old` into `new` (None: the port is gone) makes stale.
    pub fn add(&mut self, old: Option<&ServicePort>, new: Option<&ServicePort>) {
        let udp = |sp: &&ServicePort| concerns(sp);
        if let Some(old) = old.filter(udp) {
            let kept: BTreeSet<(Ipv4Addr, u16)> = new
                .map(|n| n.endpoints.iter().map(|e| (e.ip, e.port)).collect())
                .unwrap_or_default();
            for e in &old.endpoints {
                if !kept.contains(&(e.ip, e.port)) {
                    for f in frontends(old) {
                        self.lost.insert((f, e.ip, e.port));
                    }
                }
            }
        }
        if let Some(new) = new.filter(udp) {
            let had = old.is_some_and(|o| !o.endpoints.is_empty());
            if !had && !new.endpoints.is_empty() {
                self.revived.extend(frontends(new));
            }
        }
    }

    /// Whether the entry must go.
    pub fn matches(&self, e: &Entry) -> bool {
        e.proto == 17
            && (self
                .lost
                .iter()
                .any(|(f, ip, port)| f.matches(e.orig_dst) && e.reply_src == (*ip, *port))
                || self.revived.iter().any(|f| f.matches(e.orig_dst)))
    }
}

/// An address and port.
pub type Addr = (Ipv4Addr, u16);

/// One conntrack entry, as much of it as matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub proto: u8,
    /// Where the flow was sent (before DNAT).
    pub orig_dst: Addr,
    /// Who answers it (after DNAT: the endpoint).
    pub reply_src: Addr,
    /// The original tuple as the kernel gave it (what deleting the entry names).
    pub orig: Vec<u8>,
}

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// (protocol, source, destination) of a tuple attribute.
fn tuple(buf: &[u8]) -> Option<(u8, Addr, Addr)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for (ty, v) in nfnl::parse_attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v) in nfnl::parse_attrs(v) {
                    let ip = <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
                    match ty {
                        CTA_IP_V4_SRC => src = ip,
                        CTA_IP_V4_DST => dst = ip,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v) in nfnl::parse_attrs(v) {
                    let port = <[u8; 2]>::try_from(v).map(u16::from_be_bytes).ok();
                    match ty {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port.unwrap_or(0),
                        CTA_PROTO_DST_PORT => dport = port.unwrap_or(0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, (src?, sport), (dst?, dport)))
}

/// An entry from a conntrack dump message's attributes (IPv4 only).
pub fn parse(attrs: &[u8]) -> Option<Entry> {
    let mut orig = None;
    let mut reply = None;
    for (ty, v) in nfnl::parse_attrs(attrs) {
        match ty {
            CTA_TUPLE_ORIG => orig = Some(v),
            CTA_TUPLE_REPLY => reply = Some(v),
            _ => {}
        }
    }
    let raw = orig?;
    let (proto, _, orig_dst) = tuple(raw)?;
    let (_, reply_src, _) = tuple(reply?)?;
    Some(Entry {
        proto,
        orig_dst,
        reply_src,
        orig: raw.to_vec(),
    })
}

/// The body of a delete request for `e`: its original tuple.
pub fn delete_request(e: &Entry) -> Vec<u8> {
    let mut buf = Vec::new();
    nfnl::Attrs::new(&mut buf).nest(CTA_TUPLE_ORIG, |a| {
        a.raw(&e.orig);
    });
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn udp(eps: &[&str]) -> ServicePort {
        let mut sp = ServicePort::new(
            "kube-system/dns/udp/53".into(),
            "10.43.0.10".parse().unwrap(),
            "udp",
            53,
            eps.iter()
                .map(|ip| Endpoint {
                    ip: ip.parse().unwrap(),
                    port: 5353,
                    local: false,
                })
                .collect(),
        );
        sp.node_port = Some(30053);
        sp
    }

    fn entry(dst: &str, dport: u16, reply: &str) -> Entry {
        Entry {
            proto: 17,
            orig_dst: (dst.parse().unwrap(), dport),
            reply_src: (reply.parse().unwrap(), 5353),
            orig: Vec::new(),
        }
    }

    #[test]
    fn a_lost_endpoint_takes_its_flows_along() {
        let mut s = Stale::default();
        s.add(
            Some(&udp(&["10.42.0.2", "10.42.0.3"])),
            Some(&udp(&["10.42.0.3"])),
        );
        assert!(s.matches(&entry("10.43.0.10", 53, "10.42.0.2")));
        assert!(
            s.matches(&entry("192.0.2.2", 30053, "10.42.0.2")),
            "node port"
        );
        assert!(!s.matches(&entry("10.43.0.10", 53, "10.42.0.3")), "kept");
        assert!(
            !s.matches(&entry("10.43.0.11", 53, "10.42.0.2")),
            "other Service"
        );
        let mut tcp = entry("10.43.0.10", 53, "10.42.0.2");
        tcp.proto = 6;
        assert!(!s.matches(&tcp));
        // A Service gone: every endpoint is lost.
        let mut s = Stale::default();
        s.add(Some(&udp(&["10.42.0.2"])), None);
        assert!(s.matches(&entry("10.43.0.10", 53, "10.42.0.2")));
    }

    #[test]
    fn a_first_endpoint_clears_the_frontends_and_tcp_is_left_alone() {
        let mut s = Stale::default();
        s.add(Some(&udp(&[])), Some(&udp(&["10.42.0.2"])));
        assert!(s.matches(&entry("10.43.0.10", 53, "10.43.0.10")));
        let mut s = Stale::default();
        s.add(None, Some(&udp(&["10.42.0.2"])));
        assert!(!s.revived.is_empty(), "a new Service: its frontends too");
        // Unchanged endpoints: nothing.
        let mut s = Stale::default();
        s.add(Some(&udp(&["10.42.0.2"])), Some(&udp(&["10.42.0.2"])));
        assert!(s.is_empty());
        // TCP: nothing (connections end on their own; upstream leaves them too).
        let mut t = udp(&["10.42.0.2"]);
        t.protocol = "tcp";
        let mut s = Stale::default();
        s.add(Some(&t), None);
        assert!(s.is_empty());
    }

    #[test]
    fn entries_parse_from_dump_attributes() {
        // orig 10.42.0.9:40000 -> 10.43.0.10:53, reply 10.42.0.2:5353 -> 10.42.0.9:40000
        let tuple = |src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16| {
            let mut b = Vec::new();
            nfnl::Attrs::new(&mut b)
                .nest(CTA_TUPLE_IP, |a| {
                    a.bytes(CTA_IP_V4_SRC, &src).bytes(CTA_IP_V4_DST, &dst);
                })
                .nest(CTA_TUPLE_PROTO, |a| {
                    a.u8(CTA_PROTO_NUM, 17)
                        .bytes(CTA_PROTO_SRC_PORT, &sport.to_be_bytes())
                        .bytes(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
                });
            b
        };
        let orig = tuple([10, 42, 0, 9], 40000, [10, 43, 0, 10], 53);
        let reply = tuple([10, 42, 0, 2], 5353, [10, 42, 0, 9], 40000);
        let mut msg = Vec::new();
        nfnl::Attrs::new(&mut msg)
            .nest(CTA_TUPLE_ORIG, |a| {
                a.raw(&orig);
            })
            .nest(CTA_TUPLE_REPLY, |a| {
                a.raw(&reply);
            })
            .be32(3, 0x188);
        let e = parse(&msg).unwrap();
        assert_eq!(e.proto, 17);
        assert_eq!(e.orig_dst, ("10.43.0.10".parse().unwrap(), 53));
        assert_eq!(e.reply_src, ("10.42.0.2".parse().unwrap(), 5353));
        assert_eq!(e.orig, orig);
        assert_eq!(
            nfnl::parse_attrs(&delete_request(&e)),
            [(CTA_TUPLE_ORIG, orig.as_slice())]
        );
    }
}
