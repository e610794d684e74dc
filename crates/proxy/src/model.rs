//! What the data plane must do, as plain values: every port of every Service, with the
//! endpoints it balances over. Built from Services and EndpointSlices; no IO.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// One port of one Service: the unit the data plane programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `namespace/name/protocol/port`: names its chains.
    pub id: String,
    pub cluster_ip: Ipv4Addr,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip` (IPv4): traffic to them on
    /// `port` is treated as traffic from outside, like node-port traffic.
    pub external_ips: Vec<Ipv4Addr>,
    /// sessionAffinity ClientIP: how long a client sticks to its endpoint.
    pub affinity_seconds: Option<u32>,
    /// externalTrafficPolicy Local: node-port traffic from outside goes to this node's
    /// endpoints only, keeping the client's address.
    pub external_local: bool,
    /// internalTrafficPolicy Local: cluster-IP traffic goes to this node's endpoints only.
    pub internal_local: bool,
    /// The endpoints traffic may go to (ready ones, or serving terminating ones when none is
    /// ready), sorted.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this proxy's node.
    pub local: bool,
}

impl ServicePort {
    /// A plain ClusterIP port: no node port, no affinity, cluster-wide traffic policies.
    pub fn new(
        id: String,
        cluster_ip: Ipv4Addr,
        protocol: &'static str,
        port: u16,
        endpoints: Vec<Endpoint>,
    ) -> ServicePort {
        ServicePort {
            id,
            cluster_ip,
            protocol,
            port,
            node_port: None,
            external_ips: Vec::new(),
            affinity_seconds: None,
            external_local: false,
            internal_local: false,
            endpoints,
        }
    }

    /// The endpoints cluster-IP traffic goes to.
    pub fn internal(&self) -> Vec<&Endpoint> {
        self.endpoints
            .iter()
            .filter(|e| !self.internal_local || e.local)
            .collect()
    }

    /// The endpoints node-port traffic from outside goes to.
    pub fn external(&self) -> Vec<&Endpoint> {
        self.endpoints
            .iter()
            .filter(|e| !self.external_local || e.local)
            .collect()
    }
}

fn protocol(p: Option<&str>) -> Option<&'static str> {
    match p.unwrap_or("TCP") {
        "TCP" => Some("tcp"),
        "UDP" => Some("udp"),
        "SCTP" => Some("sctp"),
        _ => None,
    }
}

/// The ports of `svc` the data plane serves (none for headless and ExternalName Services, or
/// without an IPv4 ClusterIP), with endpoints from the Service's `slices`.
pub fn service_ports(svc: &Service, slices: &[&EndpointSlice], node: &str) -> Vec<ServicePort> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    let Some(cluster_ip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Vec::new();
    };
    if ty == "ExternalName" {
        return Vec::new();
    }
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let affinity_seconds = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(10800)
    });
    let node_ports = matches!(ty, "NodePort" | "LoadBalancer");
    let mut external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if ty == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        external_ips.extend(
            ingress
                .iter()
                .copied()
                .flatten()
                .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
        );
    }
    external_ips.sort();
    external_ips.dedup();
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(proto) = protocol(p.protocol.as_deref()) else {
            continue;
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let name_of_port = p.name.as_deref().unwrap_or_default();
        // Ready endpoints; with none, serving ones that are terminating (upstream's fallback,
        // so that a rollout's last connections still land).
        let mut ready = BTreeMap::new();
        let mut terminating = BTreeMap::new();
        for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
            let Some(target) = slice.ports.iter().flatten().find(|sp| {
                sp.name.as_deref().unwrap_or_default() == name_of_port
                    && protocol(sp.protocol.as_deref()) == Some(proto)
            }) else {
                continue;
            };
            let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for ep in &slice.endpoints {
                let c = ep.conditions.as_ref();
                let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
                let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let local = ep.node_name.as_deref() == Some(node);
                for a in &ep.addresses {
                    let Ok(ip) = a.parse::<Ipv4Addr>() else {
                        continue;
                    };
                    let e = Endpoint {
                        ip,
                        port: target_port,
                        local,
                    };
                    if is_ready && !is_terminating {
                        ready.insert((ip, target_port), e);
                    } else if serving && is_terminating {
                        terminating.insert((ip, target_port), e);
                    }
                }
            }
        }
        let endpoints = if ready.is_empty() { terminating } else { ready };
        out.push(ServicePort {
            id: format!("{ns}/{name}/{proto}/{port}"),
            cluster_ip,
            protocol: proto,
            port,
            node_port: p
                .node_port
                .filter(|_| node_ports)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0),
            external_ips: external_ips.clone(),
            affinity_seconds,
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            endpoints: endpoints.into_values().collect(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": spec}),
        )
        .unwrap()
    }

    fn slice(endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"name": "web-1", "namespace": "ns"},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}))
        .unwrap()
    }

    #[test]
    fn ports_match_slices_by_name_and_protocol() {
        let s = svc(json!({"clusterIP": "10.43.0.9", "type": "NodePort",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                      {"name": "dns", "port": 53, "protocol": "UDP"}]}));
        let sl = slice(
            json!([{"addresses": ["10.1.0.2"], "conditions": {"ready": true}, "nodeName": "a"},
                   {"addresses": ["10.1.0.3"], "conditions": {"ready": false}, "nodeName": "b"}]),
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        );
        let sps = service_ports(&s, &[&sl], "a");
        assert_eq!(sps.len(), 2);
        assert_eq!(sps[0].id, "ns/web/tcp/80");
        assert_eq!(sps[0].node_port, Some(30080));
        assert_eq!(
            sps[0].endpoints,
            vec![Endpoint {
                ip: "10.1.0.2".parse().unwrap(),
                port: 8080,
                local: true
            }]
        );
        assert_eq!(sps[1].id, "ns/web/udp/53");
        assert_eq!(sps[1].endpoints[0].port, 5353);
        assert_eq!(sps[1].node_port, None);
    }

    #[test]
    fn terminating_endpoints_only_when_none_is_ready() {
        let s = svc(json!({"clusterIP": "10.43.0.9", "ports": [{"port": 80}]}));
        let term = json!({"addresses": ["10.1.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}});
        let ready = json!({"addresses": ["10.1.0.5"], "conditions": {"ready": true}});
        let ports = json!([{"port": 80, "protocol": "TCP"}]);
        let both = slice(json!([term, ready]), ports.clone());
        let sps = service_ports(&s, &[&both], "n");
        assert_eq!(sps[0].endpoints.len(), 1);
        assert_eq!(sps[0].endpoints[0].ip.to_string(), "10.1.0.5");
        let only = slice(json!([term]), ports);
        assert_eq!(
            service_ports(&s, &[&only], "n")[0].endpoints[0]
                .ip
                .to_string(),
            "10.1.0.4"
        );
    }

    #[test]
    fn headless_external_name_and_affinity() {
        assert!(service_ports(
            &svc(json!({"clusterIP": "None", "ports": [{"port": 80}]})),
            &[],
            "n"
        )
        .is_empty());
        assert!(service_ports(
            &svc(json!({"type": "ExternalName", "externalName": "x.example"})),
            &[],
            "n"
        )
        .is_empty());
        let s = svc(
            json!({"clusterIP": "10.43.0.9", "ports": [{"port": 80}], "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}, "internalTrafficPolicy": "Local"}),
        );
        let sp = &service_ports(&s, &[], "n")[0];
        assert_eq!(sp.affinity_seconds, Some(60));
        assert!(sp.internal_local);
        assert!(sp.endpoints.is_empty());
    }

    #[test]
    fn external_ips_and_load_balancer_ingress() {
        let mut s = svc(json!({"type": "LoadBalancer", "clusterIP": "10.43.0.9",
            "externalIPs": ["198.51.100.7", "2001:db8::1"], "ports": [{"port": 80, "nodePort": 30080}]}));
        s.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.5"}, {"hostname": "lb.example"}, {"ip": "198.51.100.7"}]}}))
        .unwrap();
        let sp = &service_ports(&s, &[], "n")[0];
        let ips: Vec<String> = sp.external_ips.iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["198.51.100.7", "203.0.113.5"]);
        // Load-balancer IPs count only for type LoadBalancer.
        let mut s = svc(json!({"clusterIP": "10.43.0.9", "ports": [{"port": 80}]}));
        s.status =
            serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}))
                .unwrap();
        assert!(service_ports(&s, &[], "n")[0].external_ips.is_empty());
    }
}
