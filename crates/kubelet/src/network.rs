//! The pod network across nodes, host-gateway style: for every other node with a podCIDR, a
//! route to that range through the node's InternalIP (which must be on a link this node
//! shares), and an exemption from this node's pod masquerading, so that pods on different
//! nodes see each other's own addresses.
//!
//! What it installed is remembered in memory: on a clean stop that also stops the pods, it is
//! removed; routes it did not add are never touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;

/// Remote pod range -> the node address it is routed through.
pub type Routes = BTreeMap<String, String>;

/// Where another node's pods are, if it has a range and an address.
fn remote(n: &Node) -> Option<(String, String)> {
    let cidr = n.spec.as_ref()?.pod_cidr.clone()?;
    let ip = n
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .clone();
    Some((cidr, ip))
}

/// Node name → its pod range and address, where it has both: all routes need of a Node.
type Remotes = BTreeMap<String, Option<(String, String)>>;

/// The routes this node wants: every other node's range through its address.
pub fn desired(nodes: &Remotes, me: &str) -> Routes {
    let mine = nodes.get(me).cloned().flatten();
    nodes
        .iter()
        .filter(|(name, _)| name.as_str() != me)
        .filter_map(|(_, r)| r.clone())
        .filter(|(cidr, ip)| {
            mine.as_ref()
                .is_none_or(|(my_cidr, my_ip)| cidr != my_cidr && ip != my_ip)
        })
        .collect()
}

async fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether `ip` is on a link of this host (a next hop a route may use directly).
async fn on_link(ip: &str) -> bool {
    let out = tokio::process::Command::new("ip")
        .args(["route", "get", ip])
        .output()
        .await;
    out.is_ok_and(|o| {
        let text = String::from_utf8_lossy(&o.stdout);
        o.status.success() && !text.contains(" via ") && !text.starts_with("local ")
    })
}

/// Keeps the routes (and masquerade exemptions in `masq_chain`) in line with the Nodes.
pub async fn keep_routes(
    client: kube::Client,
    me: String,
    masq_chain: String,
    installed: Arc<Mutex<Routes>>,
) {
    let api: Api<Node> = Api::all(client);
    let mut stream = watcher(
        apimachinery::slim::Slim::api(&api),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|ev| ev.map(apimachinery::slim::Slim::event))
    .boxed();
    let mut nodes = Remotes::new();
    let mut fresh: Option<Remotes> = None;
    // Next hops found not to be on a link, not tried again until the node changes.
    let mut unreachable: BTreeSet<(String, String)> = BTreeSet::new();
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { return };
                match ev {
                    Ok(Event::Init) => fresh = Some(BTreeMap::new()),
                    Ok(Event::InitApply(n)) => {
                        if let Some(f) = fresh.as_mut() {
                            f.insert(n.metadata.name.clone().unwrap_or_default(), remote(&n));
                        }
                    }
                    Ok(Event::InitDone) => nodes = fresh.take().unwrap_or_default(),
                    Ok(Event::Apply(n)) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        // Heartbeats change nothing a route depends on: no pass over every
                        // node for them (with thousands of nodes, they come by hundreds a
                        // second).
                        let now = remote(&n);
                        let same = nodes.get(&name) == Some(&now);
                        nodes.insert(name, now);
                        if same && fresh.is_none() {
                            continue;
                        }
                    }
                    Ok(Event::Delete(n)) => {
                        nodes.remove(n.metadata.name.as_deref().unwrap_or_default());
                    }
                    Err(_) => continue,
                }
                if fresh.is_some() {
                    continue;
                }
            }
            _ = resync.tick() => {}
        }
        let want = desired(&nodes, &me);
        unreachable.retain(|(c, ip)| want.get(c) == Some(ip));
        let have = installed.lock().map(|i| i.clone()).unwrap_or_default();
        for (cidr, ip) in &have {
            if want.get(cidr) != Some(ip) {
                remove_one(cidr, ip, &masq_chain).await;
                if let Ok(mut i) = installed.lock() {
                    i.remove(cidr);
                }
            }
        }
        for (cidr, ip) in &want {
            let key = (cidr.clone(), ip.clone());
            if unreachable.contains(&key) {
                continue;
            }
            if have.get(cidr) != Some(ip) {
                if !on_link(ip).await {
                    tracing::debug!(%cidr, %ip, "node address not on a shared link: no route");
                    unreachable.insert(key);
                    continue;
                }
                match run("ip", &["route", "replace", cidr, "via", ip]).await {
                    Ok(()) => {
                        tracing::info!(%cidr, via = %ip, "route to a node's pods");
                        if let Ok(mut i) = installed.lock() {
                            i.insert(cidr.clone(), ip.clone());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%cidr, via = %ip, error = %e, "adding a route");
                        continue;
                    }
                }
            }
            // Pod-to-pod traffic keeps its source address (the chain may be new since).
            let rule = ["-t", "nat", "-C", &masq_chain, "-d", cidr, "-j", "RETURN"];
            if run("iptables", &rule).await.is_err() {
                let _ = run(
                    "iptables",
                    &[
                        "-t",
                        "nat",
                        "-I",
                        &masq_chain,
                        "1",
                        "-d",
                        cidr,
                        "-j",
                        "RETURN",
                    ],
                )
                .await;
            }
        }
    }
}

async fn remove_one(cidr: &str, ip: &str, masq_chain: &str) {
    let _ = run("ip", &["route", "del", cidr, "via", ip]).await;
    let _ = run(
        "iptables",
        &["-t", "nat", "-D", masq_chain, "-d", cidr, "-j", "RETURN"],
    )
    .await;
}

/// Remove every route (and exemption) installed.
pub async fn remove_routes(installed: &Mutex<Routes>, masq_chain: &str) {
    let routes = installed
        .lock()
        .map(|mut i| std::mem::take(&mut *i))
        .unwrap_or_default();
    for (cidr, ip) in routes {
        remove_one(&cidr, &ip, masq_chain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>, ip: &str) -> (String, Node) {
        let mut n = json!({"metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}});
        if let Some(c) = cidr {
            n["spec"] = json!({"podCIDR": c});
        }
        (name.into(), serde_json::from_value(n).unwrap())
    }

    #[test]
    fn every_other_node_with_a_range_and_an_address() {
        let nodes: Remotes = [
            node("a", Some("10.42.0.0/24"), "10.0.0.1"),
            node("b", Some("10.42.1.0/24"), "10.0.0.2"),
            node("c", None, "10.0.0.3"),
            // Same address as this node (a second node on this host): not routed.
            node("d", Some("10.42.3.0/24"), "10.0.0.1"),
        ]
        .into_iter()
        .map(|(name, n)| (name, remote(&n)))
        .collect();
        let want = desired(&nodes, "a");
        assert_eq!(want.len(), 1);
        assert_eq!(want["10.42.1.0/24"], "10.0.0.2");
    }
}
