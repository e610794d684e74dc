//! The nftables data plane: Services rendered as one `ip` table of rkube's own, applied with
//! `nft -f` as single atomic transactions: a whole sync rebuilds the table, a change rewrites
//! only the chains, sets and map elements of the Service ports that changed.
//!
//! Layout (after upstream kube-proxy's nftables mode):
//! - `services` (jumped to from prerouting and output NAT): `ip daddr . l4proto . dport` in the
//!   `service-ips` verdict map goes to the port's `svc-<ns>/<name>/<proto>/<port>` chain, and
//!   node-local `l4proto . dport` in `service-nodeports` to its `ext-...` chain.
//! - A `svc-` chain marks traffic from outside the node's pod range for masquerading (inline,
//!   no jumps, so that rewriting it does not make the kernel re-validate the table), then
//!   picks an endpoint with equal probability, statistic-style (`numgen random mod k` over the
//!   k endpoints left) and DNATs to it. No anonymous sets: the kernel allocates their names in
//!   time linear in the table's sets, so 10,000 of them cost seconds.
//! - sessionAffinity ClientIP: one timeout set per endpoint (`aff-...`) remembers the clients
//!   it served; a client found in one goes back to that endpoint.
//! - No endpoints: `no-endpoint-services`/`no-endpoint-nodeports` send new connections to a
//!   `reject` (internalTrafficPolicy Local without a local endpoint: `drop`, as upstream).
//! - `masquerading` (postrouting) masquerades marked packets and hairpin traffic (a pod that
//!   reached itself through its Service: `ip saddr . ip daddr` in `hairpin`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::model::{Endpoint, ServicePort};

/// The packet mark bit that asks `masquerading` to masquerade (upstream's 0x4000).
const MASQ_MARK: &str = "0x4000";

/// Setting that bit, inline: a `jump` in a Service chain would make the kernel re-validate
/// every chain reachable from the base chains at each commit (O(table) per endpoint change).
const MARK: &str = "meta mark set mark or 0x4000";

/// Where the data plane is and what counts as local traffic.
#[derive(Debug, Clone)]
pub struct Context {
    /// The `ip` family table rkube owns (and nothing outside it).
    pub table: String,
    /// The node's (or cluster's) pod range: traffic from elsewhere to a ClusterIP is
    /// masqueraded so that replies come back through this node. None: masquerade all of it.
    pub local_cidr: Option<String>,
}

/// What one Service port installs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Chain name → its rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Set name → its declaration.
    sets: BTreeMap<String, String>,
    /// (map, key) → value.
    elements: BTreeMap<(&'static str, String), String>,
    /// This node's endpoint IPs (for hairpin masquerading).
    hairpin: BTreeSet<Ipv4Addr>,
}

fn affinity_set(sp: &ServicePort, e: &Endpoint) -> String {
    format!("aff-{}/{}/{}", sp.id, e.ip, e.port)
}

/// The rules that pick one of `eps` and DNAT to it.
fn endpoint_rules(sp: &ServicePort, eps: &[&Endpoint], out: &mut Vec<String>) {
    let proto = sp.protocol;
    if sp.affinity_seconds.is_some() {
        for e in eps {
            out.push(format!(
                "ip saddr @{} meta l4proto {proto} dnat to {}:{}",
                affinity_set(sp, e),
                e.ip,
                e.port
            ));
        }
    }
    let n = eps.len();
    for (i, e) in eps.iter().enumerate() {
        let left = n - i;
        let pick = if left > 1 {
            format!("numgen random mod {left} 0 ")
        } else {
            String::new()
        };
        let remember = if sp.affinity_seconds.is_some() {
            format!("update @{} {{ ip saddr }} ", affinity_set(sp, e))
        } else {
            String::new()
        };
        out.push(format!(
            "{pick}{remember}meta l4proto {proto} dnat to {}:{}",
            e.ip, e.port
        ));
    }
}

/// Render one Service port.
pub fn render(ctx: &Context, sp: &ServicePort) -> Rendered {
    let mut r = Rendered::default();
    let proto = sp.protocol;
    let ip_key = format!("{} . {proto} . {}", sp.cluster_ip, sp.port);
    let np_key = sp.node_port.map(|n| format!("{proto} . {n}"));
    if sp.endpoints.is_empty() {
        r.elements
            .insert(("no-endpoint-services", ip_key), "goto reject-chain".into());
        if let Some(k) = np_key {
            r.elements
                .insert(("no-endpoint-nodeports", k), "goto reject-chain".into());
        }
        return r;
    }
    if let Some(secs) = sp.affinity_seconds {
        for e in &sp.endpoints {
            r.sets.insert(
                affinity_set(sp, e),
                format!("{{ type ipv4_addr; flags dynamic,timeout; timeout {secs}s; }}"),
            );
        }
    }
    r.hairpin = sp
        .endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| e.ip)
        .collect();
    let mark = match &ctx.local_cidr {
        Some(cidr) => format!("ip saddr != {cidr} {MARK}"),
        None => MARK.into(),
    };
    let internal = sp.internal();
    let svc_chain = format!("svc-{}", sp.id);
    if internal.is_empty() {
        // internalTrafficPolicy Local and no endpoint here.
        r.elements
            .insert(("no-endpoint-services", ip_key), "drop".into());
    } else {
        let mut rules = vec![mark];
        endpoint_rules(sp, &internal, &mut rules);
        r.chains.insert(svc_chain.clone(), rules);
        r.elements
            .insert(("service-ips", ip_key), format!("goto {svc_chain}"));
    }
    if let Some(k) = np_key {
        let ext_chain = format!("ext-{}", sp.id);
        let external = sp.external();
        let mut rules = Vec::new();
        if sp.external_local {
            // The client's address is kept: only this node's endpoints, no masquerading.
            if external.is_empty() {
                rules.push("drop".into());
            } else {
                endpoint_rules(sp, &external, &mut rules);
            }
        } else {
            rules.push(MARK.into());
            if external.len() == internal.len() {
                rules.push(format!("goto {svc_chain}"));
            } else {
                endpoint_rules(sp, &external, &mut rules);
            }
        }
        r.chains.insert(ext_chain.clone(), rules);
        r.elements
            .insert(("service-nodeports", k), format!("goto {ext_chain}"));
    }
    r
}

/// The fixed part of the table: maps, base chains and helpers.
fn skeleton(t: &str, out: &mut String) {
    let lines = [
        "add map ip {t} service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }",
        "add map ip {t} service-nodeports { type inet_proto . inet_service : verdict; }",
        "add map ip {t} no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict; }",
        "add map ip {t} no-endpoint-nodeports { type inet_proto . inet_service : verdict; }",
        "add set ip {t} hairpin { type ipv4_addr . ipv4_addr; }",
        "add chain ip {t} masquerading",
        "add rule ip {t} masquerading ct status dnat ip saddr . ip daddr @hairpin masquerade",
        "add rule ip {t} masquerading meta mark and {mark} == 0 return",
        "add rule ip {t} masquerading meta mark set mark xor {mark}",
        "add rule ip {t} masquerading masquerade fully-random",
        "add chain ip {t} reject-chain",
        "add rule ip {t} reject-chain reject",
        "add chain ip {t} services",
        "add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip {t} services fib daddr type local meta l4proto . th dport vmap @service-nodeports",
        "add chain ip {t} service-endpoints-check",
        "add rule ip {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add chain ip {t} nodeport-endpoints-check",
        "add rule ip {t} nodeport-endpoints-check fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add chain ip {t} nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }",
        "add rule ip {t} nat-prerouting jump services",
        "add chain ip {t} nat-output { type nat hook output priority -100; policy accept; }",
        "add rule ip {t} nat-output jump services",
        "add chain ip {t} nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }",
        "add rule ip {t} nat-postrouting jump masquerading",
        "add chain ip {t} filter-input { type filter hook input priority -110; policy accept; }",
        "add rule ip {t} filter-input ct state new jump nodeport-endpoints-check",
        "add rule ip {t} filter-input ct state new jump service-endpoints-check",
        "add chain ip {t} filter-forward { type filter hook forward priority -110; policy accept; }",
        "add rule ip {t} filter-forward ct state new jump service-endpoints-check",
        "add chain ip {t} filter-output { type filter hook output priority -110; policy accept; }",
        "add rule ip {t} filter-output ct state new jump service-endpoints-check",
    ];
    for l in lines {
        out.push_str(&l.replace("{t}", t).replace("{mark}", MASQ_MARK));
        out.push('\n');
    }
}

/// A transaction that builds the whole table from nothing (replacing what is there).
pub fn full(ctx: &Context, rendered: &[&Rendered]) -> String {
    let t = &ctx.table;
    let mut out = format!("add table ip {t}\ndelete table ip {t}\nadd table ip {t}\n");
    skeleton(t, &mut out);
    let mut txn = Txn::new(t);
    let empty = Rendered::default();
    for r in rendered {
        txn.change(&empty, r);
    }
    let hairpin: BTreeSet<Ipv4Addr> = rendered.iter().flat_map(|r| r.hairpin.clone()).collect();
    txn.hairpin(&BTreeSet::new(), &hairpin);
    out.push_str(&txn.finish());
    out
}

/// A transaction built in phases, so that nothing is referenced before it exists or deleted
/// while still referenced.
pub struct Txn<'a> {
    t: &'a str,
    add_objects: String,
    fill: String,
    del_elements: String,
    add_elements: String,
    flush_dead: String,
    del_dead: String,
}

impl<'a> Txn<'a> {
    pub fn new(t: &'a str) -> Self {
        Txn {
            t,
            add_objects: String::new(),
            fill: String::new(),
            del_elements: String::new(),
            add_elements: String::new(),
            flush_dead: String::new(),
            del_dead: String::new(),
        }
    }

    /// What turns `old` into `new`.
    pub fn change(&mut self, old: &Rendered, new: &Rendered) {
        use std::fmt::Write;
        let t = self.t;
        for (name, decl) in &new.sets {
            if !old.sets.contains_key(name) {
                let _ = writeln!(self.add_objects, "add set ip {t} {name} {decl}");
            }
        }
        for (name, rules) in &new.chains {
            match old.chains.get(name) {
                Some(old_rules) if old_rules == rules => continue,
                Some(_) => {
                    let _ = writeln!(self.fill, "flush chain ip {t} {name}");
                }
                None => {
                    let _ = writeln!(self.add_objects, "add chain ip {t} {name}");
                }
            }
            for rule in rules {
                let _ = writeln!(self.fill, "add rule ip {t} {name} {rule}");
            }
        }
        for ((map, key), value) in &old.elements {
            if new.elements.get(&(*map, key.clone())) != Some(value) {
                let _ = writeln!(self.del_elements, "delete element ip {t} {map} {{ {key} }}");
            }
        }
        for ((map, key), value) in &new.elements {
            if old.elements.get(&(*map, key.clone())) != Some(value) {
                let _ = writeln!(
                    self.add_elements,
                    "add element ip {t} {map} {{ {key} : {value} }}"
                );
            }
        }
        for name in old.chains.keys() {
            if !new.chains.contains_key(name) {
                let _ = writeln!(self.flush_dead, "flush chain ip {t} {name}");
                let _ = writeln!(self.del_dead, "delete chain ip {t} {name}");
            }
        }
        for name in old.sets.keys() {
            if !new.sets.contains_key(name) {
                let _ = writeln!(self.del_dead, "delete set ip {t} {name}");
            }
        }
    }

    /// Hairpin elements: from the IPs in `old` to those in `new`.
    pub fn hairpin(&mut self, old: &BTreeSet<Ipv4Addr>, new: &BTreeSet<Ipv4Addr>) {
        use std::fmt::Write;
        let t = self.t;
        for ip in old.difference(new) {
            let _ = writeln!(
                self.del_elements,
                "delete element ip {t} hairpin {{ {ip} . {ip} }}"
            );
        }
        let added: Vec<String> = new
            .difference(old)
            .map(|ip| format!("{ip} . {ip}"))
            .collect();
        if !added.is_empty() {
            let _ = writeln!(
                self.add_elements,
                "add element ip {t} hairpin {{ {} }}",
                added.join(", ")
            );
        }
    }

    pub fn finish(self) -> String {
        [
            self.add_objects,
            self.fill,
            self.del_elements,
            self.add_elements,
            self.flush_dead,
            self.del_dead,
        ]
        .concat()
    }
}

/// The hairpin IPs across everything rendered.
pub fn hairpin_of<'a>(rendered: impl Iterator<Item = &'a Rendered>) -> BTreeSet<Ipv4Addr> {
    rendered.flat_map(|r| r.hairpin.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            table: "t".into(),
            local_cidr: Some("10.42.0.0/24".into()),
        }
    }

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            local,
        }
    }

    fn sp(eps: Vec<Endpoint>) -> ServicePort {
        ServicePort::new(
            "ns/web/tcp/80".into(),
            "10.43.0.9".parse().unwrap(),
            "tcp",
            80,
            eps,
        )
    }

    fn lines(s: &str) -> Vec<&str> {
        s.lines().collect()
    }

    #[test]
    fn equal_probability_over_the_endpoints() {
        let r = render(
            &ctx(),
            &sp(vec![
                ep("10.42.0.2", true),
                ep("10.42.1.3", false),
                ep("10.42.2.4", false),
            ]),
        );
        assert_eq!(
            r.chains["svc-ns/web/tcp/80"],
            vec![
                "ip saddr != 10.42.0.0/24 meta mark set mark or 0x4000",
                "numgen random mod 3 0 meta l4proto tcp dnat to 10.42.0.2:8080",
                "numgen random mod 2 0 meta l4proto tcp dnat to 10.42.1.3:8080",
                "meta l4proto tcp dnat to 10.42.2.4:8080",
            ]
        );
        assert_eq!(
            r.elements[&("service-ips", "10.43.0.9 . tcp . 80".to_string())],
            "goto svc-ns/web/tcp/80"
        );
        assert_eq!(
            r.hairpin.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["10.42.0.2"]
        );
    }

    #[test]
    fn no_endpoints_reject_and_local_policies_drop() {
        let mut s = sp(vec![]);
        s.node_port = Some(30080);
        let r = render(&ctx(), &s);
        assert!(r.chains.is_empty());
        assert_eq!(
            r.elements[&("no-endpoint-services", "10.43.0.9 . tcp . 80".into())],
            "goto reject-chain"
        );
        assert_eq!(
            r.elements[&("no-endpoint-nodeports", "tcp . 30080".into())],
            "goto reject-chain"
        );
        let mut s = sp(vec![ep("10.42.1.3", false)]);
        s.internal_local = true;
        s.external_local = true;
        s.node_port = Some(30080);
        let r = render(&ctx(), &s);
        assert_eq!(
            r.elements[&("no-endpoint-services", "10.43.0.9 . tcp . 80".into())],
            "drop"
        );
        assert_eq!(r.chains["ext-ns/web/tcp/80"], vec!["drop"]);
    }

    #[test]
    fn node_ports_masquerade_unless_local() {
        let mut s = sp(vec![ep("10.42.0.2", true), ep("10.42.1.3", false)]);
        s.node_port = Some(30080);
        let r = render(&ctx(), &s);
        assert_eq!(
            r.chains["ext-ns/web/tcp/80"],
            vec!["meta mark set mark or 0x4000", "goto svc-ns/web/tcp/80"]
        );
        assert_eq!(
            r.elements[&("service-nodeports", "tcp . 30080".into())],
            "goto ext-ns/web/tcp/80"
        );
        s.external_local = true;
        let r = render(&ctx(), &s);
        assert_eq!(
            r.chains["ext-ns/web/tcp/80"],
            vec!["meta l4proto tcp dnat to 10.42.0.2:8080"]
        );
    }

    #[test]
    fn affinity_remembers_clients_per_endpoint() {
        let mut s = sp(vec![ep("10.42.0.2", true), ep("10.42.1.3", false)]);
        s.affinity_seconds = Some(60);
        let r = render(&ctx(), &s);
        let set = "aff-ns/web/tcp/80/10.42.0.2/8080";
        assert_eq!(
            r.sets[set],
            "{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }"
        );
        let rules = &r.chains["svc-ns/web/tcp/80"];
        assert_eq!(
            rules[1],
            format!("ip saddr @{set} meta l4proto tcp dnat to 10.42.0.2:8080")
        );
        assert_eq!(rules[3], format!("numgen random mod 2 0 update @{set} {{ ip saddr }} meta l4proto tcp dnat to 10.42.0.2:8080"));
    }

    #[test]
    fn a_change_touches_only_what_changed_in_a_safe_order() {
        let c = ctx();
        let mut s = sp(vec![ep("10.42.0.2", true)]);
        s.affinity_seconds = Some(60);
        let old = render(&c, &s);
        // Unchanged: nothing to do.
        let mut t = Txn::new("t");
        t.change(&old, &old.clone());
        assert_eq!(t.finish(), "");
        // An endpoint more: the chain is rewritten, a set added, no element touched.
        s.endpoints.push(ep("10.42.1.3", false));
        let new = render(&c, &s);
        let mut t = Txn::new("t");
        t.change(&old, &new);
        let out = t.finish();
        let l = lines(&out);
        assert_eq!(l[0], "add set ip t aff-ns/web/tcp/80/10.42.1.3/8080 { type ipv4_addr; flags dynamic,timeout; timeout 60s; }");
        assert_eq!(l[1], "flush chain ip t svc-ns/web/tcp/80");
        assert!(!out.contains("element"), "{out}");
        // Gone: elements out first, then the chain emptied and deleted, then its sets.
        let mut t = Txn::new("t");
        t.change(&new, &Rendered::default());
        let out = t.finish();
        let l = lines(&out);
        assert_eq!(
            l[0],
            "delete element ip t service-ips { 10.43.0.9 . tcp . 80 }"
        );
        assert_eq!(l[1], "flush chain ip t svc-ns/web/tcp/80");
        assert_eq!(l[2], "delete chain ip t svc-ns/web/tcp/80");
        assert!(l[3].starts_with("delete set ip t aff-"));
        // Losing every endpoint: the map entry moves to the reject map.
        let mut t = Txn::new("t");
        t.change(&new, &render(&c, &sp(vec![])));
        let out = t.finish();
        assert!(out.contains("add element ip t no-endpoint-services { 10.43.0.9 . tcp . 80 : goto reject-chain }"), "{out}");
    }

    #[test]
    fn a_full_sync_replaces_the_table_atomically() {
        let c = ctx();
        let r = render(&c, &sp(vec![ep("10.42.0.2", true)]));
        let out = full(&c, &[&r]);
        let l = lines(&out);
        assert_eq!(
            &l[..3],
            ["add table ip t", "delete table ip t", "add table ip t"]
        );
        assert!(out.contains("add element ip t hairpin { 10.42.0.2 . 10.42.0.2 }"));
        assert!(out.contains("add chain ip t svc-ns/web/tcp/80\n"));
    }
}
