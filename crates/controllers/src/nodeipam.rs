//! Node IPAM: every node gets `spec.podCIDR` (and `podCIDRs`) from the cluster CIDR, one /24
//! each by default, never the same block twice; a deleted node's block is free again.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::namespace::Error;

/// An IPv4 range cut into equal blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCidr {
    base: u32,
    prefix: u8,
    block: u8,
}

impl ClusterCidr {
    /// `10.42.0.0/16` with blocks of `/block_prefix`.
    pub fn parse(cidr: &str, block_prefix: u8) -> Result<ClusterCidr, String> {
        let (ip, len) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{cidr:?}: bad address"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| format!("{cidr:?}: bad prefix length"))?;
        if prefix > 30 || block_prefix < prefix || block_prefix > 30 {
            return Err(format!(
                "{cidr:?}: cannot cut /{block_prefix} blocks out of a /{prefix}"
            ));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(ClusterCidr {
            base: u32::from(ip) & mask,
            prefix,
            block: block_prefix,
        })
    }

    pub fn blocks(&self) -> u32 {
        1u32 << (self.block - self.prefix)
    }

    pub fn block(&self, i: u32) -> String {
        let ip = Ipv4Addr::from(self.base + (i << (32 - self.block)));
        format!("{ip}/{}", self.block)
    }

    /// The index of a block this range hands out, if `cidr` is one.
    pub fn index_of(&self, cidr: &str) -> Option<u32> {
        (0..self.blocks()).find(|i| self.block(*i) == cidr)
    }
}

struct Ctx {
    client: Client,
    range: ClusterCidr,
    used: Mutex<BTreeSet<u32>>,
}

fn node_cidr(n: &Node) -> Option<String> {
    n.spec.as_ref().and_then(|s| s.pod_cidr.clone())
}

pub async fn run(client: Client, range: ClusterCidr) {
    let api: Api<Node> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        client,
        range,
        used: Mutex::default(),
    });
    // Know every block in use before handing out any.
    loop {
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let mut used = ctx.used.lock().unwrap();
                for n in &list.items {
                    if let Some(i) = node_cidr(n).and_then(|c| range.index_of(&c)) {
                        used.insert(i);
                    }
                }
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "node ipam: listing nodes");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "node ipam reconcile");
            }
        })
        .await;
}

fn error_policy(_n: Arc<Node>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "node ipam: will retry");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = node.name_any();
    if node.metadata.deletion_timestamp.is_some() {
        if let Some(i) = node_cidr(&node).and_then(|c| ctx.range.index_of(&c)) {
            ctx.used.lock().unwrap().remove(&i);
        }
        return Ok(Action::await_change());
    }
    if let Some(cidr) = node_cidr(&node) {
        if let Some(i) = ctx.range.index_of(&cidr) {
            ctx.used.lock().unwrap().insert(i);
        }
        return Ok(Action::await_change());
    }
    let picked = {
        let mut used = ctx.used.lock().unwrap();
        let free = (0..ctx.range.blocks()).find(|i| !used.contains(i));
        if let Some(i) = free {
            used.insert(i);
        }
        free
    };
    let Some(i) = picked else {
        tracing::error!(node = %name, "node ipam: the cluster CIDR is exhausted");
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let cidr = ctx.range.block(i);
    let api: Api<Node> = Api::all(ctx.client.clone());
    // Only onto the version this decision was made on: the cache may lag a patch of ours, and a
    // second block merged over the first would move the node's range under its kubelet.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": node.resource_version()},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(node = %name, %cidr, "allocated pod CIDR");
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.used.lock().unwrap().remove(&i);
            match e {
                kube::Error::Api(s) if s.code == 404 => Ok(Action::await_change()),
                // Changed since (maybe by our own earlier patch): decide again on the news.
                kube::Error::Api(s) if s.code == 409 => {
                    Ok(Action::requeue(Duration::from_millis(200)))
                }
                e => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_the_cluster_cidr() {
        let r = ClusterCidr::parse("10.42.0.0/16", 24).unwrap();
        assert_eq!(r.blocks(), 256);
        assert_eq!(r.block(0), "10.42.0.0/24");
        assert_eq!(r.block(255), "10.42.255.0/24");
        assert_eq!(r.index_of("10.42.7.0/24"), Some(7));
        assert_eq!(r.index_of("10.43.7.0/24"), None);
        assert_eq!(
            ClusterCidr::parse("10.42.3.4/16", 24).unwrap().block(1),
            "10.42.1.0/24"
        );
        assert!(ClusterCidr::parse("10.42.0.0", 24).is_err());
        assert!(ClusterCidr::parse("10.42.0.0/25", 24).is_err());
        assert!(ClusterCidr::parse("nope/16", 24).is_err());
    }
}
