//! Each pod's resolv.conf, by its dnsPolicy (upstream's kubelet rules): `ClusterFirst` asks
//! cluster DNS with the namespace's search path and `ndots:5`; `Default` (and `ClusterFirst`
//! on the host network) inherits the node's; `None` takes only the pod's `dnsConfig`, which
//! the other policies merge in too.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::PodSpec;

use crate::cri;

/// Upstream's limits on what a pod's resolv.conf may hold.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;

/// A resolv.conf, as far as pods inherit it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> ResolvConf {
        let mut r = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => r.nameservers.extend(words.next().map(String::from)),
                Some("search") | Some("domain") => {
                    r.searches = words.map(String::from).collect();
                }
                Some("options") => r.options.extend(words.map(String::from)),
                _ => {}
            }
        }
        r
    }

    /// The node's (`/etc/resolv.conf`; empty if unreadable).
    pub fn host() -> ResolvConf {
        ResolvConf::parse(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
    }
}

fn push_unique(list: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !list.contains(&i) {
            list.push(i);
        }
    }
}

/// The DNS configuration of a pod in namespace `ns`; `cluster_dns`: the cluster DNS Service's
/// address, if there is one (without it `ClusterFirst` falls back to the node's, as upstream's
/// kubelet does).
pub fn pod_dns(
    spec: &PodSpec,
    ns: &str,
    cluster_dns: Option<IpAddr>,
    domain: &str,
    host: &ResolvConf,
) -> cri::DnsConfig {
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let host_network = spec.host_network.unwrap_or(false);
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    let mut r = match (policy, cluster, cluster_dns) {
        ("None", _, _) => ResolvConf::default(),
        (_, true, Some(ip)) => {
            let mut searches = vec![
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ];
            push_unique(&mut searches, host.searches.iter().cloned());
            ResolvConf {
                nameservers: vec![ip.to_string()],
                searches,
                options: vec!["ndots:5".into()],
            }
        }
        _ => host.clone(),
    };
    if let Some(cfg) = &spec.dns_config {
        push_unique(
            &mut r.nameservers,
            cfg.nameservers.iter().flatten().cloned(),
        );
        push_unique(&mut r.searches, cfg.searches.iter().flatten().cloned());
        for o in cfg.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            let rendered = match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            };
            r.options
                .retain(|x| x.split(':').next() != Some(name.as_str()));
            r.options.push(rendered);
        }
    }
    r.nameservers.truncate(MAX_NAMESERVERS);
    r.searches.truncate(MAX_SEARCHES);
    cri::DnsConfig {
        servers: r.nameservers,
        searches: r.searches,
        options: r.options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        let mut v = v;
        v["containers"] = json!([]);
        serde_json::from_value(v).unwrap()
    }

    fn host() -> ResolvConf {
        ResolvConf::parse("nameserver 10.0.0.2\nsearch corp.example\noptions edns0\n")
    }

    fn check(s: serde_json::Value, dns: Option<&str>, want: (&[&str], &[&str], &[&str])) {
        let got = pod_dns(
            &spec(s),
            "web",
            dns.map(|d| d.parse().unwrap()),
            "cluster.local",
            &host(),
        );
        assert_eq!(
            (got.servers, got.searches, got.options),
            (
                want.0.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                want.1.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                want.2.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            )
        );
    }

    #[test]
    fn policies() {
        let cluster: (&[&str], &[&str], &[&str]) = (
            &["10.43.0.10"],
            &[
                "web.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
            ],
            &["ndots:5"],
        );
        let node: (&[&str], &[&str], &[&str]) = (&["10.0.0.2"], &["corp.example"], &["edns0"]);
        check(json!({}), Some("10.43.0.10"), cluster);
        check(
            json!({"dnsPolicy": "ClusterFirst"}),
            Some("10.43.0.10"),
            cluster,
        );
        check(json!({"dnsPolicy": "Default"}), Some("10.43.0.10"), node);
        // No cluster DNS known: the node's.
        check(json!({}), None, node);
        // The host network: ClusterFirst means the node's; ClusterFirstWithHostNet does not.
        check(json!({"hostNetwork": true}), Some("10.43.0.10"), node);
        check(
            json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}),
            Some("10.43.0.10"),
            cluster,
        );
    }

    #[test]
    fn dns_config_merges_and_none_takes_only_it() {
        let cfg = json!({"nameservers": ["1.1.1.1"], "searches": ["x.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]});
        check(
            json!({"dnsPolicy": "None", "dnsConfig": cfg}),
            Some("10.43.0.10"),
            (&["1.1.1.1"], &["x.example"], &["ndots:2", "rotate"]),
        );
        check(
            json!({"dnsConfig": cfg}),
            Some("10.43.0.10"),
            (
                &["10.43.0.10", "1.1.1.1"],
                &[
                    "web.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local",
                    "corp.example",
                    "x.example",
                ],
                &["ndots:2", "rotate"],
            ),
        );
    }
}
