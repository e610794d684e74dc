//! Service ClusterIP and NodePort allocation, as upstream's API server does it: a ClusterIP from
//! `--service-cluster-ip-range` and a NodePort from `--service-node-port-range` for every Service
//! that needs one, requested values honoured or refused with a 422 that says why, never two
//! Services with one IP or port, released when the Service goes.
//!
//! The allocations live in memory, rebuilt from the stored Services when the API server starts,
//! so they always agree with the store (nothing to leak on a crash between reserving and
//! writing). One API server owns a store at a time, as everywhere else in rkube.
//!
//! Dynamic allocation prefers the upper part of each range and leaves the lower band (1/16 of
//! the IPs, 16 to 256; 1/32 of the ports, 16 to 128) to Services that ask for a fixed value,
//! as upstream does, so that well-known addresses like the DNS Service's stay free.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use apimachinery::Cause;
use serde_json::{json, Value};

/// The ranges Services are given addresses and ports from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNetwork {
    base: u32,
    prefix: u8,
    pub node_ports: (u16, u16),
}

pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

impl Default for ServiceNetwork {
    fn default() -> Self {
        ServiceNetwork::parse(DEFAULT_SERVICE_CIDR, DEFAULT_NODE_PORT_RANGE)
            .expect("the default ranges parse")
    }
}

impl ServiceNetwork {
    /// `cidr`: an IPv4 range of at least 8 addresses; `ports`: `LOW-HIGH`.
    pub fn parse(cidr: &str, ports: &str) -> Result<Self, String> {
        let (ip, len) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?}: expected ADDRESS/PREFIX"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{cidr:?}: only IPv4 service ranges are supported"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| (8..=29).contains(p))
            .ok_or_else(|| format!("{cidr:?}: the prefix must be /8 to /29"))?;
        let mask = u32::MAX << (32 - prefix);
        let (lo, hi) = ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a >= 1 && a <= b)
            .ok_or_else(|| format!("{ports:?}: expected a port range LOW-HIGH"))?;
        Ok(ServiceNetwork {
            base: u32::from(ip) & mask,
            prefix,
            node_ports: (lo, hi),
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }

    /// Usable addresses: the range without its network and broadcast addresses.
    fn size(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    /// The `n`th address of the range (1: the `kubernetes` Service, 10: cluster DNS).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + n)
    }

    /// The offset (1-based) of `ip` in the usable range.
    fn offset(&self, ip: Ipv4Addr) -> Option<u32> {
        let o = u32::from(ip).wrapping_sub(self.base);
        (1..=self.size()).contains(&o).then_some(o)
    }

    fn port_range(&self) -> String {
        format!("{}-{}", self.node_ports.0, self.node_ports.1)
    }
}

/// Size of the band at the bottom of a range kept for requested values.
fn static_band(size: u32, divisor: u32, min: u32, max: u32) -> u32 {
    (size / divisor).clamp(min, max).min(size)
}

#[derive(Default)]
struct Used {
    ips: HashSet<u32>,
    ports: HashSet<u16>,
}

/// What one Service holds: its ClusterIP offset and its node ports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holding {
    ip: Option<u32>,
    ports: Vec<u16>,
}

impl Holding {
    pub fn is_empty(&self) -> bool {
        self.ip.is_none() && self.ports.is_empty()
    }
}

pub struct Allocator {
    pub net: ServiceNetwork,
    used: Mutex<Used>,
}

/// Whether a Service of this spec gets a ClusterIP.
fn wants_cluster_ip(spec: &Value) -> bool {
    spec["type"].as_str() != Some("ExternalName") && spec["clusterIP"].as_str() != Some("None")
}

fn wants_node_ports(spec: &Value) -> bool {
    matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer"))
}

impl Allocator {
    pub fn new(net: ServiceNetwork) -> Self {
        Allocator {
            net,
            used: Mutex::new(Used::default()),
        }
    }

    fn used(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark what a stored Service holds (at start-up). Values outside the ranges (the ranges
    /// changed since) are left alone: they cannot collide with anything allocated now.
    pub fn restore(&self, svc: &Value) {
        let h = self.holding(svc);
        let mut used = self.used();
        used.ips.extend(h.ip);
        used.ports.extend(h.ports);
    }

    /// What a stored Service holds in this allocator's ranges.
    pub fn holding(&self, svc: &Value) -> Holding {
        let spec = &svc["spec"];
        let ip = spec["clusterIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .and_then(|ip| self.net.offset(ip));
        let (lo, hi) = self.net.node_ports;
        let ports = spec["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["nodePort"].as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .filter(|p| (lo..=hi).contains(p))
            .collect();
        Holding { ip, ports }
    }

    pub fn release(&self, h: &Holding) {
        let mut used = self.used();
        if let Some(ip) = h.ip {
            used.ips.remove(&ip);
        }
        for p in &h.ports {
            used.ports.remove(p);
        }
    }

    /// Give a new Service (already defaulted and validated) what it needs: its ClusterIP (the
    /// requested one or a free one) and node ports. On success the caller owns the returned
    /// holding and must release it if the Service is not stored.
    pub fn allocate(&self, svc: &mut Value) -> Result<Holding, Vec<Cause>> {
        self.allocate_changes(None, svc)
    }

    /// An update: what `new` needs beyond what `old` holds. The returned holding is what was
    /// newly reserved (release it if the write fails); [`Allocator::freed`] says what `old`
    /// held that `new` no longer does (release it once the write succeeds).
    pub fn allocate_changes(
        &self,
        old: Option<&Value>,
        svc: &mut Value,
    ) -> Result<Holding, Vec<Cause>> {
        let held = old.map(|o| self.holding(o)).unwrap_or_default();
        let mut used = self.used();
        let mut got = Holding::default();
        let mut causes = Vec::new();
        let spec = svc["spec"].clone();
        if wants_cluster_ip(&spec) {
            let requested = spec["clusterIP"].as_str().filter(|s| !s.is_empty());
            match requested {
                Some(s) => match s.parse::<Ipv4Addr>() {
                    Err(_) => causes.push(Cause::invalid(
                        "spec.clusterIPs",
                        format!("[{s}]"),
                        "must be a valid IPv4 address",
                    )),
                    Ok(ip) => match self.net.offset(ip) {
                        None => causes.push(Cause::invalid(
                            "spec.clusterIPs",
                            format!("[{s}]"),
                            &format!(
                                "failed to allocate IP {s}: the provided IP ({s}) is not in the valid range. The range of valid IPs is {}",
                                self.net.cidr()
                            ),
                        )),
                        Some(o) if held.ip == Some(o) => {}
                        Some(o) if used.ips.contains(&o) => causes.push(Cause::invalid(
                            "spec.clusterIPs",
                            format!("[{s}]"),
                            &format!("failed to allocate IP {s}: provided IP is already allocated"),
                        )),
                        Some(o) => {
                            used.ips.insert(o);
                            got.ip = Some(o);
                        }
                    },
                },
                None => match pick(
                    &used.ips,
                    self.net.size(),
                    static_band(self.net.size(), 16, 16, 256),
                ) {
                    Some(o) => {
                        used.ips.insert(o);
                        got.ip = Some(o);
                        let ip = self.net.nth(o).to_string();
                        svc["spec"]["clusterIP"] = json!(ip);
                    }
                    None => causes.push(Cause::invalid(
                        "spec.clusterIPs",
                        "[]",
                        &format!(
                            "failed to allocate a serviceIP: range {} is full",
                            self.net.cidr()
                        ),
                    )),
                },
            }
            if let Some(ip) = svc["spec"]["clusterIP"].as_str() {
                let ip = ip.to_string();
                svc["spec"]["clusterIPs"] = json!([ip]);
                default_families(&mut svc["spec"]);
            }
        } else if spec["clusterIP"].as_str() == Some("None") {
            svc["spec"]["clusterIPs"] = json!(["None"]);
            default_families(&mut svc["spec"]);
        }
        if wants_node_ports(&spec) {
            let (lo, hi) = self.net.node_ports;
            let count = u32::from(hi - lo) + 1;
            let band = static_band(count, 32, 16, 128);
            let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
            let mut mine: HashSet<u16> = HashSet::new();
            // Requested ports first, so that a dynamic pick cannot take one of them.
            let mut order: Vec<(usize, &Value)> = ports.iter().enumerate().collect();
            order.sort_by_key(|(_, p)| p["nodePort"].as_u64().unwrap_or(0) == 0);
            for (i, p) in order {
                let field = format!("spec.ports[{i}].nodePort");
                match p["nodePort"].as_u64().filter(|n| *n != 0) {
                    Some(n) => {
                        let Some(n) = u16::try_from(n).ok().filter(|n| (lo..=hi).contains(n))
                        else {
                            causes.push(Cause::invalid(
                                &field,
                                n,
                                &format!(
                                    "provided port is not in the valid range. The range of valid ports is {}",
                                    self.net.port_range()
                                ),
                            ));
                            continue;
                        };
                        if held.ports.contains(&n) || mine.contains(&n) {
                            mine.insert(n);
                            continue;
                        }
                        if used.ports.contains(&n) {
                            causes.push(Cause::invalid(
                                &field,
                                n,
                                "provided port is already allocated",
                            ));
                            continue;
                        }
                        used.ports.insert(n);
                        got.ports.push(n);
                        mine.insert(n);
                    }
                    None => {
                        let taken: HashSet<u32> =
                            used.ports.iter().map(|p| u32::from(p - lo) + 1).collect();
                        match pick(&taken, count, band) {
                            Some(o) => {
                                let n = lo + (o - 1) as u16;
                                used.ports.insert(n);
                                got.ports.push(n);
                                mine.insert(n);
                                svc["spec"]["ports"][i]["nodePort"] = json!(n);
                            }
                            None => causes.push(Cause::invalid(
                                &field,
                                0,
                                &format!(
                                    "failed to allocate a nodePort: range {} is full",
                                    self.net.port_range()
                                ),
                            )),
                        }
                    }
                }
            }
        } else if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
            // Only NodePort and LoadBalancer Services have node ports.
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                if p.get("nodePort").and_then(Value::as_u64).unwrap_or(0) != 0 {
                    causes.push(Cause::new(
                        "FieldValueForbidden",
                        "spec.ports.nodePort",
                        "Forbidden: may not be used when `type` is 'ClusterIP'",
                    ));
                    break;
                }
            }
        }
        if !causes.is_empty() {
            if let Some(ip) = got.ip {
                used.ips.remove(&ip);
            }
            for p in &got.ports {
                used.ports.remove(p);
            }
            return Err(causes);
        }
        Ok(got)
    }

    /// What `old` held that `new` does not.
    pub fn freed(&self, old: &Value, new: &Value) -> Holding {
        let before = self.holding(old);
        let after = self.holding(new);
        Holding {
            ip: before.ip.filter(|ip| after.ip != Some(*ip)),
            ports: before
                .ports
                .into_iter()
                .filter(|p| !after.ports.contains(p))
                .collect(),
        }
    }
}

fn default_families(spec: &mut Value) {
    if spec.get("ipFamilies").is_none_or(Value::is_null) {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    if spec.get("ipFamilyPolicy").is_none_or(Value::is_null) {
        spec["ipFamilyPolicy"] = json!("SingleStack");
    }
}

/// A free offset in 1..=size: random in the dynamic band above `band` first, then the static
/// band, scanning forward from the random start.
fn pick(taken: &HashSet<u32>, size: u32, band: u32) -> Option<u32> {
    let scan = |from: u32, to: u32| -> Option<u32> {
        if from > to {
            return None;
        }
        let span = to - from + 1;
        let start = rand::random::<u32>() % span;
        (0..span)
            .map(|i| from + (start + i) % span)
            .find(|o| !taken.contains(o))
    };
    scan(band + 1, size).or_else(|| scan(1, band.min(size)))
}

/// Before an update is validated: values the server allocated and the client left out are
/// carried over from the stored Service, as upstream does (so `kubectl replace` of a manifest
/// without clusterIP or nodePort keeps them).
pub fn carry_allocated(old: &Value, new: &mut Value) {
    let (os, ns) = (&old["spec"], &mut new["spec"]);
    if !ns.is_object() {
        return;
    }
    let same_kind = wants_cluster_ip(os) && ns["type"].as_str() != Some("ExternalName");
    if same_kind && ns["clusterIP"].as_str().is_none_or(str::is_empty) {
        ns["clusterIP"] = os["clusterIP"].clone();
        if ns["clusterIPs"].as_array().is_none_or(Vec::is_empty) {
            ns["clusterIPs"] = os["clusterIPs"].clone();
        }
    }
    if wants_node_ports(os) && wants_node_ports(ns) {
        let old_ports = os["ports"].as_array().cloned().unwrap_or_default();
        if let Some(ports) = ns["ports"].as_array_mut() {
            for p in ports.iter_mut() {
                if p["nodePort"].as_u64().unwrap_or(0) != 0 {
                    continue;
                }
                let matching = old_ports.iter().find(|o| {
                    o["port"] == p["port"]
                        && o["protocol"].as_str().unwrap_or("TCP")
                            == p["protocol"].as_str().unwrap_or("TCP")
                });
                if let Some(n) = matching.and_then(|o| o["nodePort"].as_u64()) {
                    p["nodePort"] = json!(n);
                }
            }
        }
    }
}

/// Update rules: a ClusterIP, once set, stays (unless the Service becomes ExternalName).
pub fn validate_update(old: &Value, new: &Value) -> Vec<Cause> {
    let (os, ns) = (&old["spec"], &new["spec"]);
    let becomes_external = ns["type"].as_str() == Some("ExternalName");
    let old_ip = os["clusterIP"].as_str().unwrap_or_default();
    let new_ip = ns["clusterIP"].as_str().unwrap_or_default();
    if !old_ip.is_empty() && !becomes_external && old_ip != new_ip {
        return vec![Cause::invalid(
            "spec.clusterIPs[0]",
            new_ip,
            "may not change once set",
        )];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(spec: Value) -> Value {
        json!({"metadata": {"name": "s"}, "spec": spec})
    }

    fn small() -> Allocator {
        Allocator::new(ServiceNetwork::parse("10.0.0.0/29", "30000-30003").unwrap())
    }

    #[test]
    fn parses_ranges() {
        let n = ServiceNetwork::parse("10.43.7.9/16", "30000-32767").unwrap();
        assert_eq!(n.cidr(), "10.43.0.0/16");
        assert_eq!(n.nth(10).to_string(), "10.43.0.10");
        assert!(ServiceNetwork::parse("10.43.0.0", "30000-32767").is_err());
        assert!(ServiceNetwork::parse("fd00::/64", "30000-32767").is_err());
        assert!(ServiceNetwork::parse("10.43.0.0/31", "30000-32767").is_err());
        assert!(ServiceNetwork::parse("10.43.0.0/16", "32767-30000").is_err());
    }

    #[test]
    fn dynamic_ips_avoid_the_static_band_and_never_repeat() {
        let a = Allocator::new(ServiceNetwork::default());
        let mut seen = HashSet::new();
        for _ in 0..500 {
            let mut s = svc(json!({"type": "ClusterIP", "ports": [{"port": 80}]}));
            a.allocate(&mut s).unwrap();
            let ip: Ipv4Addr = s["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
            assert!(u32::from(ip) - u32::from(Ipv4Addr::new(10, 43, 0, 0)) > 256);
            assert!(seen.insert(ip), "{ip} given twice");
            assert_eq!(s["spec"]["clusterIPs"], json!([ip.to_string()]));
            assert_eq!(s["spec"]["ipFamilies"], json!(["IPv4"]));
        }
    }

    #[test]
    fn a_full_range_is_refused_and_release_frees() {
        let a = small();
        let mut held = Vec::new();
        for _ in 0..6 {
            let mut s = svc(json!({"type": "ClusterIP"}));
            held.push(a.allocate(&mut s).unwrap());
        }
        let mut s = svc(json!({"type": "ClusterIP"}));
        let err = a.allocate(&mut s).unwrap_err();
        assert!(err[0].message.contains("is full"), "{err:?}");
        a.release(&held[2]);
        let mut s = svc(json!({"type": "ClusterIP"}));
        assert_eq!(a.allocate(&mut s).unwrap(), held[2]);
    }

    #[test]
    fn requested_ips_are_honoured_or_refused() {
        let a = Allocator::new(ServiceNetwork::default());
        let mut s = svc(json!({"clusterIP": "10.43.0.10"}));
        a.allocate(&mut s).unwrap();
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.43.0.10"]));
        let mut again = svc(json!({"clusterIP": "10.43.0.10"}));
        let err = a.allocate(&mut again).unwrap_err();
        assert_eq!(err[0].field, "spec.clusterIPs");
        assert!(err[0].message.contains("already allocated"), "{err:?}");
        let mut outside = svc(json!({"clusterIP": "10.99.0.1"}));
        let err = a.allocate(&mut outside).unwrap_err();
        assert!(err[0].message.contains("not in the valid range"), "{err:?}");
        let mut bad = svc(json!({"clusterIP": "ten"}));
        assert!(a.allocate(&mut bad).is_err());
    }

    #[test]
    fn headless_and_external_name_get_no_ip() {
        let a = small();
        let mut h = svc(json!({"clusterIP": "None"}));
        assert!(a.allocate(&mut h).unwrap().is_empty());
        assert_eq!(h["spec"]["clusterIPs"], json!(["None"]));
        let mut e = svc(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert!(a.allocate(&mut e).unwrap().is_empty());
        assert!(e["spec"].get("clusterIP").is_none());
    }

    #[test]
    fn node_ports_allocated_requested_and_refused() {
        let a = small();
        let mut s = svc(
            json!({"type": "NodePort", "ports": [{"port": 80}, {"port": 81, "nodePort": 30002}]}),
        );
        let h = a.allocate(&mut s).unwrap();
        assert_eq!(h.ports.len(), 2);
        assert_eq!(s["spec"]["ports"][1]["nodePort"], 30002);
        let first = s["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        assert!((30000..=30003).contains(&first) && first != 30002);
        let mut clash =
            svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30002}]}));
        let err = a.allocate(&mut clash).unwrap_err();
        assert_eq!(err[0].field, "spec.ports[0].nodePort");
        assert!(err[0].message.contains("already allocated"));
        // The refused Service's ClusterIP went back.
        let mut outside = svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}));
        let err = a.allocate(&mut outside).unwrap_err();
        assert!(err[0].message.contains("30000-30003"), "{err:?}");
        let mut cip = svc(json!({"type": "ClusterIP", "ports": [{"port": 80, "nodePort": 30001}]}));
        assert!(a.allocate(&mut cip).is_err());
        // Two IPs were given (one per successful or failed attempt released): 5 left.
        let mut n = 0;
        while a.allocate(&mut svc(json!({}))).is_ok() {
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn updates_keep_what_was_given_and_free_what_is_dropped() {
        let a = Allocator::new(ServiceNetwork::default());
        let mut old = svc(json!({"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}));
        a.allocate(&mut old).unwrap();
        let mut new = svc(json!({"type": "NodePort", "ports": [{"port": 80, "protocol": "TCP"}]}));
        carry_allocated(&old, &mut new);
        assert_eq!(new["spec"]["clusterIP"], old["spec"]["clusterIP"]);
        assert_eq!(
            new["spec"]["ports"][0]["nodePort"],
            old["spec"]["ports"][0]["nodePort"]
        );
        assert!(validate_update(&old, &new).is_empty());
        assert!(a.allocate_changes(Some(&old), &mut new).unwrap().is_empty());
        // NodePort -> ClusterIP frees the port (the client drops nodePort, as kubectl does).
        let mut cip = svc(json!({"type": "ClusterIP", "ports": [{"port": 80}]}));
        carry_allocated(&old, &mut cip);
        a.allocate_changes(Some(&old), &mut cip).unwrap();
        let freed = a.freed(&old, &cip);
        assert!(freed.ip.is_none());
        assert_eq!(freed.ports.len(), 1);
        let mut changed = new.clone();
        changed["spec"]["clusterIP"] = json!("10.43.0.99");
        assert_eq!(
            validate_update(&old, &changed)[0].field,
            "spec.clusterIPs[0]"
        );
    }

    #[test]
    fn restore_marks_stored_services() {
        let a = small();
        a.restore(&svc(json!({"clusterIP": "10.0.0.3", "type": "NodePort", "ports": [{"port": 1, "nodePort": 30001}]})));
        let mut s = svc(json!({"clusterIP": "10.0.0.3"}));
        assert!(a.allocate(&mut s).is_err());
        let mut p = svc(json!({"type": "NodePort", "ports": [{"port": 1, "nodePort": 30001}]}));
        assert!(a.allocate(&mut p).is_err());
    }
}
