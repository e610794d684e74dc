//! Cluster DNS: answers for the cluster domain (`cluster.local`) from Services and
//! EndpointSlices, forwards every other name to the host's resolvers. Served over UDP and TCP
//! by `rkube server`, behind the `kube-system/kube-dns` Service.
//!
//! Records, as upstream's DNS specification for Kubernetes lays them out:
//! - `<svc>.<ns>.svc.<domain>`: A of the ClusterIP; a headless Service's ready endpoints; an
//!   ExternalName Service's CNAME.
//! - `<hostname>.<svc>.<ns>.svc.<domain>`: A of a headless Service's endpoint by its hostname
//!   (a pod's `hostname` + `subdomain`) or its dashed IP.
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV per named port.
//! - `<a-b-c-d>.<ns>.pod.<domain>`: A a.b.c.d.
//!
//! A name under the domain that does not exist is NXDOMAIN; one that exists without records of
//! the asked type is an empty NOERROR; both carry the zone's SOA for negative caching. The
//! cluster is IPv4: AAAA questions get empty answers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use servicecache::ServiceCache;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Seconds answers may be cached (upstream CoreDNS's kubernetes plugin default).
const TTL: u32 = 5;

/// What the zone is answered from: Services and their slices by `namespace/name`.
pub trait Source: Send + Sync {
    fn service(&self, key: &str) -> Option<Arc<Service>>;
    fn slices(&self, key: &str) -> Vec<Arc<EndpointSlice>>;
}

impl Source for ServiceCache {
    fn service(&self, key: &str) -> Option<Arc<Service>> {
        ServiceCache::service(self, key)
    }
    fn slices(&self, key: &str) -> Vec<Arc<EndpointSlice>> {
        ServiceCache::slices(self, key)
    }
}

/// The answer for a name under the domain.
enum Lookup {
    Records(Vec<Record>, Vec<Record>),
    NoData,
    NxDomain,
}

/// A ready endpoint: its address, the name it answers to under its Service, and the ports.
struct Ep {
    ip: Ipv4Addr,
    host: String,
    ports: Vec<(String, String, u16)>,
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

fn ready_endpoints(slices: &[Arc<EndpointSlice>]) -> Vec<Ep> {
    let mut out: Vec<Ep> = Vec::new();
    for s in slices.iter().filter(|s| s.address_type == "IPv4") {
        let ports: Vec<(String, String, u16)> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    p.protocol
                        .clone()
                        .unwrap_or_else(|| "TCP".into())
                        .to_lowercase(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &e.addresses {
                let Ok(ip) = a.parse::<Ipv4Addr>() else {
                    continue;
                };
                if out.iter().any(|o| o.ip == ip) {
                    continue;
                }
                out.push(Ep {
                    ip,
                    host: e.hostname.clone().unwrap_or_else(|| dashed(ip)),
                    ports: ports.clone(),
                });
            }
        }
    }
    out.sort_by_key(|e| e.ip);
    out
}

/// Answers questions about one cluster domain.
pub struct Zone {
    domain: Name,
}

impl Zone {
    pub fn new(domain: &str) -> anyhow::Result<Zone> {
        let mut domain = Name::from_ascii(domain)?.to_lowercase();
        domain.set_fqdn(true);
        Ok(Zone { domain })
    }

    fn name(&self, labels: &[&str]) -> Name {
        let mut n = Name::from_labels(labels.iter().map(|l| l.as_bytes()))
            .unwrap_or_default()
            .append_domain(&self.domain)
            .unwrap_or_else(|_| self.domain.clone());
        n.set_fqdn(true);
        n
    }

    fn soa(&self) -> Record {
        let ns = self.name(&["ns", "dns"]);
        let mbox = self.name(&["hostmaster"]);
        Record::from_rdata(
            self.domain.clone(),
            TTL,
            RData::SOA(SOA::new(ns, mbox, 1, 7200, 1800, 86400, TTL)),
        )
    }

    /// The response to `req` if its question is in this zone; None: forward it.
    pub fn respond(&self, req: &Message, src: &dyn Source) -> Option<Message> {
        let q = req.queries().first()?;
        let name = q.name().to_lowercase();
        let mut fqdn = name.clone();
        fqdn.set_fqdn(true);
        if !self.domain.zone_of(&fqdn) {
            return None;
        }
        let labels: Vec<String> = fqdn
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_string())
            .collect();
        let rel = &labels[..labels.len() - self.domain.num_labels() as usize];
        let rel: Vec<&str> = rel.iter().map(String::as_str).collect();
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query)
            .set_authoritative(true)
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(true)
            .add_query(q.clone());
        match self.lookup(&fqdn, &rel, q.query_type(), src) {
            Lookup::Records(answers, extra) => {
                resp.add_answers(answers).add_additionals(extra);
            }
            Lookup::NoData => {
                resp.add_name_server(self.soa());
            }
            Lookup::NxDomain => {
                resp.set_response_code(ResponseCode::NXDomain)
                    .add_name_server(self.soa());
            }
        }
        Some(resp)
    }

    fn lookup(&self, fqdn: &Name, rel: &[&str], qtype: RecordType, src: &dyn Source) -> Lookup {
        let a = |ips: &[Ipv4Addr], name: &Name| -> Vec<Record> {
            ips.iter()
                .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(*ip))))
                .collect()
        };
        let wants_a = matches!(qtype, RecordType::A | RecordType::ANY);
        match rel {
            [] => match qtype {
                RecordType::SOA => Lookup::Records(vec![self.soa()], vec![]),
                _ => Lookup::NoData,
            },
            ["svc"] | [_, "svc"] | ["pod"] | [_, "pod"] => Lookup::NoData,
            [ip, _ns, "pod"] => {
                let Ok(ip) = ip.replace('-', ".").parse::<Ipv4Addr>() else {
                    return Lookup::NxDomain;
                };
                if wants_a {
                    Lookup::Records(a(&[ip], fqdn), vec![])
                } else {
                    Lookup::NoData
                }
            }
            [svc, ns, "svc"] => {
                let key = format!("{ns}/{svc}");
                let Some(s) = src.service(&key) else {
                    return Lookup::NxDomain;
                };
                let spec = s.spec.clone().unwrap_or_default();
                if spec.type_.as_deref() == Some("ExternalName") {
                    let Some(target) = spec
                        .external_name
                        .as_deref()
                        .and_then(|n| Name::from_ascii(n).ok())
                    else {
                        return Lookup::NoData;
                    };
                    let mut target = target;
                    target.set_fqdn(true);
                    return Lookup::Records(
                        vec![Record::from_rdata(
                            fqdn.clone(),
                            TTL,
                            RData::CNAME(CNAME(target)),
                        )],
                        vec![],
                    );
                }
                if !wants_a {
                    return Lookup::NoData;
                }
                let ips: Vec<Ipv4Addr> = match spec.cluster_ip.as_deref() {
                    Some("None") => ready_endpoints(&src.slices(&key))
                        .iter()
                        .map(|e| e.ip)
                        .collect(),
                    Some(ip) => ip.parse().ok().into_iter().collect(),
                    None => Vec::new(),
                };
                if ips.is_empty() {
                    Lookup::NoData
                } else {
                    Lookup::Records(a(&ips, fqdn), vec![])
                }
            }
            [host, svc, ns, "svc"] => {
                let key = format!("{ns}/{svc}");
                let headless = src
                    .service(&key)
                    .and_then(|s| s.spec.clone())
                    .is_some_and(|s| s.cluster_ip.as_deref() == Some("None"));
                if !headless {
                    return Lookup::NxDomain;
                }
                let ips: Vec<Ipv4Addr> = ready_endpoints(&src.slices(&key))
                    .iter()
                    .filter(|e| e.host == *host || dashed(e.ip) == *host)
                    .map(|e| e.ip)
                    .collect();
                match (ips.is_empty(), wants_a) {
                    (true, _) => Lookup::NxDomain,
                    (false, true) => Lookup::Records(a(&ips, fqdn), vec![]),
                    (false, false) => Lookup::NoData,
                }
            }
            [port, proto, svc, ns, "svc"] => {
                let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
                else {
                    return Lookup::NxDomain;
                };
                let key = format!("{ns}/{svc}");
                let Some(s) = src.service(&key) else {
                    return Lookup::NxDomain;
                };
                let spec = s.spec.clone().unwrap_or_default();
                let Some(sp) = spec.ports.iter().flatten().find(|p| {
                    p.name.as_deref() == Some(port)
                        && p.protocol
                            .as_deref()
                            .unwrap_or("TCP")
                            .eq_ignore_ascii_case(proto)
                }) else {
                    return Lookup::NxDomain;
                };
                if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    return Lookup::NoData;
                }
                let svc_name = self.name(&[svc, ns, "svc"]);
                let srv = |target: Name, port: u16| {
                    Record::from_rdata(
                        fqdn.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 100, port, target)),
                    )
                };
                if spec.cluster_ip.as_deref() == Some("None") {
                    let eps = ready_endpoints(&src.slices(&key));
                    let mut answers = Vec::new();
                    let mut extra = Vec::new();
                    for e in &eps {
                        let Some((_, _, p)) =
                            e.ports.iter().find(|(n, pr, _)| n == port && pr == proto)
                        else {
                            continue;
                        };
                        let target = self.name(&[&e.host, svc, ns, "svc"]);
                        answers.push(srv(target.clone(), *p));
                        extra.extend(a(&[e.ip], &target));
                    }
                    if answers.is_empty() {
                        return Lookup::NoData;
                    }
                    return Lookup::Records(answers, extra);
                }
                let Ok(port) = u16::try_from(sp.port) else {
                    return Lookup::NoData;
                };
                let extra = spec
                    .cluster_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                    .map(|ip| a(&[ip], &svc_name))
                    .unwrap_or_default();
                Lookup::Records(vec![srv(svc_name.clone(), port)], extra)
            }
            _ => Lookup::NxDomain,
        }
    }
}

/// The nameservers of a resolv.conf (the host's, to forward other names to).
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Forward a query to the first upstream that answers.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
        {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

fn servfail(req: &Message) -> Message {
    let mut m = Message::error_msg(req.id(), req.op_code(), ResponseCode::ServFail);
    m.add_queries(req.queries().to_vec());
    m
}

/// One query in, one response out (bytes). None: not a DNS message.
async fn handle(
    bytes: &[u8],
    zone: &Zone,
    src: &dyn Source,
    upstreams: &[SocketAddr],
    udp: bool,
) -> Option<Vec<u8>> {
    let req = Message::from_vec(bytes).ok()?;
    if req.message_type() != MessageType::Query {
        return None;
    }
    let resp = match zone.respond(&req, src) {
        Some(r) => r,
        None => match forward(bytes, upstreams).await {
            Some(b) => return Some(b),
            None => servfail(&req),
        },
    };
    let out = resp.to_vec().ok()?;
    let limit = req
        .extensions()
        .as_ref()
        .map_or(512, |e| e.max_payload().max(512)) as usize;
    if udp && out.len() > limit {
        return resp.truncate().to_vec().ok();
    }
    Some(out)
}

/// A bound DNS server (UDP and TCP on one port).
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Bind UDP and TCP on `addr` (port 0: a free port both can have).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<DnsServer> {
        let mut last = None;
        for _ in 0..20 {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => {
                    return Ok(DnsServer {
                        udp,
                        tcp,
                        addr: bound,
                    })
                }
                Err(e) if addr.port() == 0 => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no port for DNS")))
    }

    /// Serve until `shutdown`.
    pub async fn run(
        self,
        client: kube::Client,
        domain: &str,
        upstreams: Vec<SocketAddr>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let zone = Arc::new(Zone::new(domain)?);
        let cache = ServiceCache::start(client, false);
        let upstreams = Arc::new(upstreams);
        let udp = Arc::new(self.udp);
        let serve_udp = {
            let (zone, cache, upstreams, udp) =
                (zone.clone(), cache.clone(), upstreams.clone(), udp.clone());
            async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let bytes = buf[..n].to_vec();
                    let (zone, cache, upstreams, udp) =
                        (zone.clone(), cache.clone(), upstreams.clone(), udp.clone());
                    tokio::spawn(async move {
                        let src: &ServiceCache = &cache;
                        if let Some(out) = handle(&bytes, &zone, src, &upstreams, true).await {
                            let _ = udp.send_to(&out, peer).await;
                        }
                    });
                }
            }
        };
        let serve_tcp = {
            let (zone, cache, upstreams) = (zone.clone(), cache.clone(), upstreams.clone());
            let tcp = self.tcp;
            async move {
                loop {
                    let Ok((mut conn, _)) = tcp.accept().await else {
                        continue;
                    };
                    let (zone, cache, upstreams) = (zone.clone(), cache.clone(), upstreams.clone());
                    tokio::spawn(async move {
                        loop {
                            let read = async {
                                let len = conn.read_u16().await? as usize;
                                let mut msg = vec![0u8; len];
                                conn.read_exact(&mut msg).await?;
                                Ok::<_, std::io::Error>(msg)
                            };
                            let Ok(Ok(msg)) =
                                tokio::time::timeout(Duration::from_secs(10), read).await
                            else {
                                return;
                            };
                            let src: &ServiceCache = &cache;
                            let Some(out) = handle(&msg, &zone, src, &upstreams, false).await
                            else {
                                return;
                            };
                            let Ok(len) = u16::try_from(out.len()) else {
                                return;
                            };
                            if conn.write_u16(len).await.is_err()
                                || conn.write_all(&out).await.is_err()
                            {
                                return;
                            }
                        }
                    });
                }
            }
        };
        tracing::info!(addr = %self.addr, "cluster DNS serving");
        tokio::select! {
            _ = shutdown => {}
            _ = serve_udp => {}
            _ = serve_tcp => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use serde_json::json;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        services: HashMap<String, Arc<Service>>,
        slices: HashMap<String, Vec<Arc<EndpointSlice>>>,
    }

    impl Source for Fake {
        fn service(&self, key: &str) -> Option<Arc<Service>> {
            self.services.get(key).cloned()
        }
        fn slices(&self, key: &str) -> Vec<Arc<EndpointSlice>> {
            self.slices.get(key).cloned().unwrap_or_default()
        }
    }

    fn fake() -> Fake {
        let mut f = Fake::default();
        let svc = |name: &str, spec: serde_json::Value| {
            (
                format!("ns/{name}"),
                Arc::new(
                    serde_json::from_value::<Service>(
                        json!({"metadata": {"name": name, "namespace": "ns"}, "spec": spec}),
                    )
                    .unwrap(),
                ),
            )
        };
        f.services.extend([
            svc("web", json!({"clusterIP": "10.43.0.9", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})),
            svc("db", json!({"clusterIP": "None", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]})),
            svc("ext", json!({"type": "ExternalName", "externalName": "example.com"})),
        ]);
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "db-1", "namespace": "ns"}, "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.42.0.7"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.42.0.8"], "conditions": {"ready": true}},
                {"addresses": ["10.42.0.9"], "conditions": {"ready": false}}],
            "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}))
        .unwrap();
        f.slices.insert("ns/db".into(), vec![Arc::new(slice)]);
        f
    }

    fn ask(name: &str, t: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        let z = Zone::new("cluster.local").unwrap();
        z.respond(&m, &fake()).expect("in the zone")
    }

    fn a_records(m: &Message) -> Vec<String> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn services_answer_with_their_cluster_ip() {
        let m = ask("web.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(m.id(), 7);
        assert!(m.authoritative());
        assert_eq!(a_records(&m), ["10.43.0.9"]);
        // Case does not matter; the name without the trailing dot is the same name.
        assert_eq!(
            a_records(&ask("WEB.ns.svc.Cluster.Local", RecordType::A)),
            ["10.43.0.9"]
        );
        // AAAA: the name exists, no IPv6: empty, with the SOA.
        let m = ask("web.ns.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
        assert_eq!(m.name_servers()[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn unknown_names_are_nxdomain() {
        for n in [
            "nope.ns.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "a.b.c.d.e.f.cluster.local.",
            "google.com.ns.svc.cluster.local.",
        ] {
            let m = ask(n, RecordType::A);
            assert_eq!(m.response_code(), ResponseCode::NXDomain, "{n}");
            assert_eq!(m.name_servers()[0].record_type(), RecordType::SOA);
        }
    }

    #[test]
    fn headless_services_return_every_ready_endpoint() {
        assert_eq!(
            a_records(&ask("db.ns.svc.cluster.local.", RecordType::A)),
            ["10.42.0.7", "10.42.0.8"]
        );
        assert_eq!(
            a_records(&ask("db-0.db.ns.svc.cluster.local.", RecordType::A)),
            ["10.42.0.7"]
        );
        assert_eq!(
            a_records(&ask("10-42-0-8.db.ns.svc.cluster.local.", RecordType::A)),
            ["10.42.0.8"]
        );
        let m = ask("10-42-0-9.db.ns.svc.cluster.local.", RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
    }

    #[test]
    fn srv_records_name_ports() {
        let m = ask("_http._tcp.web.ns.svc.cluster.local.", RecordType::SRV);
        let RData::SRV(srv) = m.answers()[0].data() else {
            panic!("{m:?}")
        };
        assert_eq!(srv.port(), 80);
        assert_eq!(srv.target().to_string(), "web.ns.svc.cluster.local.");
        assert_eq!(
            a_records(&Message::new().add_answers(m.additionals().to_vec()).clone()),
            ["10.43.0.9"]
        );
        let m = ask("_pg._tcp.db.ns.svc.cluster.local.", RecordType::SRV);
        let targets: Vec<String> = m
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::SRV(s) => Some(format!("{}:{}", s.target(), s.port())),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            [
                "db-0.db.ns.svc.cluster.local.:5432",
                "10-42-0-8.db.ns.svc.cluster.local.:5432"
            ]
        );
        assert_eq!(
            ask("_nope._tcp.web.ns.svc.cluster.local.", RecordType::SRV).response_code(),
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn external_names_and_pods() {
        let m = ask("ext.ns.svc.cluster.local.", RecordType::A);
        let RData::CNAME(c) = m.answers()[0].data() else {
            panic!("{m:?}")
        };
        assert_eq!(c.0.to_string(), "example.com.");
        assert_eq!(
            a_records(&ask("10-42-0-5.ns.pod.cluster.local.", RecordType::A)),
            ["10.42.0.5"]
        );
    }

    #[test]
    fn other_names_are_not_ours() {
        let mut m = Message::new();
        m.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        assert!(Zone::new("cluster.local")
            .unwrap()
            .respond(&m, &fake())
            .is_none());
    }

    #[test]
    fn resolv_conf_nameservers() {
        let ns = nameservers(
            "# c\nsearch example.com\nnameserver 10.0.0.2\nnameserver fd00::1\noptions ndots:1\n",
        );
        assert_eq!(
            ns,
            [
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[fd00::1]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn udp_and_tcp_serve_and_forward() {
        // An "upstream" resolver that answers every question with 192.0.2.99.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, peer)) = up.recv_from(&mut buf).await {
                let req = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::new();
                r.set_id(req.id()).set_message_type(MessageType::Response);
                r.add_query(req.queries()[0].clone());
                r.add_answer(Record::from_rdata(
                    req.queries()[0].name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, 99)),
                ));
                let _ = up.send_to(&r.to_vec().unwrap(), peer).await;
            }
        });
        let zone = Zone::new("cluster.local").unwrap();
        let src = fake();
        let mut q = Message::new();
        q.set_id(42).add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        let out = handle(&q.to_vec().unwrap(), &zone, &src, &[up_addr], true)
            .await
            .unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.id(), 42);
        assert_eq!(a_records(&m), ["192.0.2.99"]);
        // No upstream answers: SERVFAIL, not silence.
        let dead = UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let out = handle(&q.to_vec().unwrap(), &zone, &src, &[dead], true)
            .await
            .unwrap();
        assert_eq!(
            Message::from_vec(&out).unwrap().response_code(),
            ResponseCode::ServFail
        );
        // Garbage is ignored.
        assert!(handle(b"\x00\x01garbage", &zone, &src, &[], true)
            .await
            .is_none());
    }
}
