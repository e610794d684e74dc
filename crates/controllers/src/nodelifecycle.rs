//! Node lifecycle, after upstream's node lifecycle controller, taint eviction manager and pod
//! garbage collector:
//!
//! - a node is heard from when its Lease in kube-node-lease is renewed or its Ready condition's
//!   heartbeat moves; a node not heard from for `--node-monitor-grace-period` gets its
//!   conditions set to Unknown and its pods marked not ready;
//! - NoExecute taints follow Ready (`unreachable` for Unknown, `not-ready` for False), added
//!   through a per-zone rate limiter (`--node-eviction-rate`, slower in a partially disrupted
//!   large zone, stopped in a fully disrupted zone or when every zone is) and removed as soon
//!   as the node is Ready again; NoSchedule taints follow conditions and `spec.unschedulable`;
//! - a pod on a node with NoExecute taints is deleted at once if it does not tolerate them,
//!   or after the shortest matching `tolerationSeconds`;
//! - pods bound to nodes that no longer exist are deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::claim::ok_or_gone;
use crate::events::Recorder;
use crate::runtime::{self, Informer, Queue};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The node lifecycle controller's settings (upstream's flags and defaults).
#[derive(Debug, Clone)]
pub struct Settings {
    pub grace_period: Duration,
    pub monitor_period: Duration,
    pub eviction_rate: f64,
    pub secondary_eviction_rate: f64,
    pub unhealthy_zone_threshold: f64,
    pub large_cluster_threshold: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            grace_period: Duration::from_secs(50),
            monitor_period: Duration::from_secs(5),
            eviction_rate: 0.1,
            secondary_eviction_rate: 0.01,
            unhealthy_zone_threshold: 0.55,
            large_cluster_threshold: 50,
        }
    }
}

impl Settings {
    /// Nodes per second a zone may have tainted for eviction (upstream's
    /// ReducedQPSFunc / HealthyQPSFunc): full rate when healthy, the secondary rate in a large
    /// partially disrupted zone, none in a small one or a fully disrupted one.
    pub fn zone_rate(&self, state: ZoneState, size: usize) -> f64 {
        match state {
            ZoneState::Normal => self.eviction_rate,
            ZoneState::PartialDisruption if size > self.large_cluster_threshold => {
                self.secondary_eviction_rate
            }
            _ => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneState {
    Normal,
    PartialDisruption,
    FullDisruption,
}

/// A zone's state from how many of its nodes are not Ready (upstream's ComputeZoneState).
pub fn zone_state(ready: usize, not_ready: usize, threshold: f64) -> ZoneState {
    if ready == 0 && not_ready > 0 {
        ZoneState::FullDisruption
    } else if not_ready > 2 && (not_ready as f64) / ((ready + not_ready) as f64) >= threshold {
        ZoneState::PartialDisruption
    } else {
        ZoneState::Normal
    }
}

struct Health {
    probe: Instant,
    renew: Option<String>,
    heartbeat: Option<String>,
}

/// A token bucket: `rate` per second, burst one.
struct Limiter {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + rate * now.duration_since(self.at).as_secs_f64()).min(1.0);
        self.at = now;
        if rate > 0.0 && self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct NodeLifecycle {
    client: Client,
    settings: Settings,
    nodes: Arc<Informer<Node>>,
    leases: Arc<Informer<Lease>>,
    pods: Arc<Informer<Pod>>,
    health: Mutex<HashMap<String, Health>>,
    limiters: Mutex<HashMap<String, Limiter>>,
    eviction_queue: Arc<Queue>,
    recorder: Recorder,
}

fn ready_status(n: &Node) -> Option<String> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

fn taints(n: &Node) -> Vec<Taint> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

fn zone(n: &Node) -> String {
    n.labels().get(ZONE_LABEL).cloned().unwrap_or_default()
}

impl NodeLifecycle {
    pub fn new(
        client: Client,
        settings: Settings,
        nodes: Arc<Informer<Node>>,
        leases: Arc<Informer<Lease>>,
        pods: Arc<Informer<Pod>>,
        recorder: Recorder,
    ) -> Arc<Self> {
        let nl = Arc::new(NodeLifecycle {
            client,
            settings,
            nodes: nodes.clone(),
            leases,
            pods: pods.clone(),
            health: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            eviction_queue: Queue::new(),
            recorder,
        });
        // Taint eviction: pods come back when they or their node change.
        let q = nl.eviction_queue.clone();
        pods.on(move |_old, new| {
            if let Some(p) = new {
                if p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_some_and(|n| !n.is_empty())
                {
                    q.add(runtime::key_of(p));
                }
            }
        });
        let weak = Arc::downgrade(&nl);
        nodes.on(move |old, new| {
            let Some(nl) = weak.upgrade() else { return };
            let changed = match (old, new) {
                (Some(o), Some(n)) => taints(o) != taints(n),
                _ => true,
            };
            if !changed {
                return;
            }
            let name = new.or(old).map(|n| n.name_any()).unwrap_or_default();
            for p in nl.pods.list() {
                if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str()) {
                    nl.eviction_queue.add(runtime::key_of(&*p));
                }
            }
        });
        nl
    }

    pub async fn run(self: Arc<Self>) {
        self.nodes.wait_synced().await;
        self.leases.wait_synced().await;
        self.pods.wait_synced().await;
        let me = self.clone();
        let evictions = self
            .eviction_queue
            .clone()
            .run(5, "taint-eviction", move |key| {
                let me = me.clone();
                async move { me.evict(&key).await }
            });
        let me = self.clone();
        let monitor = async move {
            loop {
                if let Err(e) = me.monitor().await {
                    tracing::debug!(error = %e, "node health pass");
                }
                if let Err(e) = me.collect_orphans().await {
                    tracing::debug!(error = %e, "orphaned pod pass");
                }
                tokio::time::sleep(me.settings.monitor_period).await;
            }
        };
        tokio::select! {
            _ = evictions => {}
            _ = monitor => {}
        }
    }

    fn nodes_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// One pass over every node: health, conditions, taints.
    async fn monitor(&self) -> anyhow::Result<()> {
        let nodes = self.nodes.list();
        let now = Instant::now();
        let mut stale = Vec::new();
        {
            let mut health = self.health.lock().unwrap();
            let names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
            health.retain(|n, _| names.contains(n));
            for n in &nodes {
                let name = n.name_any();
                let renew = self
                    .leases
                    .get(&format!("kube-node-lease/{name}"))
                    .and_then(|l| {
                        l.spec
                            .as_ref()?
                            .renew_time
                            .as_ref()
                            .map(|t| t.0.to_string())
                    });
                let heartbeat = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0.to_string()));
                let h = health.entry(name.clone()).or_insert(Health {
                    probe: now,
                    renew: renew.clone(),
                    heartbeat: heartbeat.clone(),
                });
                if h.renew != renew || h.heartbeat != heartbeat {
                    h.probe = now;
                    h.renew = renew;
                    h.heartbeat = heartbeat;
                }
                if now.duration_since(h.probe) > self.settings.grace_period {
                    stale.push(n.clone());
                }
            }
        }
        // Silent nodes: conditions to Unknown, pods not ready.
        let mut ready_view: HashMap<String, Option<String>> = nodes
            .iter()
            .map(|n| (n.name_any(), ready_status(n)))
            .collect();
        for n in stale {
            if ready_status(&n).as_deref() == Some("Unknown") {
                continue;
            }
            self.mark_unknown(&n).await?;
            ready_view.insert(n.name_any(), Some("Unknown".into()));
        }
        // Zones.
        let mut zones: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for n in &nodes {
            let e = zones.entry(zone(n)).or_default();
            if ready_view[&n.name_any()].as_deref() == Some("True") {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        let states: BTreeMap<String, (ZoneState, usize)> = zones
            .iter()
            .map(|(z, (r, nr))| {
                (
                    z.clone(),
                    (
                        zone_state(*r, *nr, self.settings.unhealthy_zone_threshold),
                        r + nr,
                    ),
                )
            })
            .collect();
        let all_disrupted = !states.is_empty()
            && states
                .values()
                .all(|(s, _)| *s == ZoneState::FullDisruption);
        for n in &nodes {
            let name = n.name_any();
            let ready = ready_view[&name].clone();
            let (state, size) = states[&zone(n)];
            // No Ready condition yet: nothing to say until the grace period makes it Unknown.
            let want: Option<&str> = match ready.as_deref() {
                Some("False") => Some(NOT_READY),
                Some("Unknown") => Some(UNREACHABLE),
                _ => None,
            };
            let want = if all_disrupted { None } else { want };
            let current: Vec<Taint> = taints(n);
            let mut next: Vec<Taint> = current
                .iter()
                .filter(|t| {
                    !(t.effect == "NoExecute"
                        && (t.key == UNREACHABLE || t.key == NOT_READY)
                        && Some(t.key.as_str()) != want)
                })
                .cloned()
                .collect();
            let mut adding = false;
            if let Some(key) = want {
                if !next.iter().any(|t| t.key == key && t.effect == "NoExecute") {
                    let rate = self.settings.zone_rate(state, size);
                    let allowed = self
                        .limiters
                        .lock()
                        .unwrap()
                        .entry(zone(n))
                        .or_insert(Limiter {
                            tokens: 1.0,
                            at: Instant::now(),
                        })
                        .take(rate);
                    if allowed {
                        next.push(Taint {
                            key: key.into(),
                            effect: "NoExecute".into(),
                            time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                Timestamp::now(),
                            )),
                            value: None,
                        });
                        adding = true;
                    }
                }
            }
            // NoSchedule taints by condition.
            let unschedulable = n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let mut no_schedule: Vec<&str> = Vec::new();
            match ready.as_deref() {
                Some("False") => no_schedule.push(NOT_READY),
                Some("Unknown") => no_schedule.push(UNREACHABLE),
                _ => {}
            }
            if unschedulable {
                no_schedule.push(UNSCHEDULABLE);
            }
            next.retain(|t| {
                !(t.effect == "NoSchedule"
                    && [NOT_READY, UNREACHABLE, UNSCHEDULABLE].contains(&t.key.as_str())
                    && !no_schedule.contains(&t.key.as_str()))
            });
            for key in no_schedule {
                if !next
                    .iter()
                    .any(|t| t.key == key && t.effect == "NoSchedule")
                {
                    next.push(Taint {
                        key: key.into(),
                        effect: "NoSchedule".into(),
                        time_added: None,
                        value: None,
                    });
                }
            }
            if next != current {
                let patch = json!({"spec": {"taints": if next.is_empty() { Value::Null } else { json!(next) }},
                                   "metadata": {"resourceVersion": n.metadata.resource_version}});
                match self
                    .nodes_api()
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Ok(_) => {
                        if adding {
                            self.recorder.record(
                                &**n,
                                "Normal",
                                "NodeNotReady",
                                format!("Node {name} status is now: NodeNotReady"),
                            );
                        }
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// A node not heard from: every condition Unknown; its pods not ready.
    async fn mark_unknown(&self, n: &Node) -> anyhow::Result<()> {
        let name = n.name_any();
        let now = Timestamp::now().to_string();
        let mut conditions = as_json(n.status.as_ref().and_then(|s| s.conditions.as_ref()));
        let mut has_ready = false;
        for c in conditions.iter_mut() {
            if c["type"] == "Ready" {
                has_ready = true;
            }
            if c["status"] != "Unknown" {
                c["status"] = json!("Unknown");
                c["reason"] = json!("NodeStatusUnknown");
                c["message"] = json!("Kubelet stopped posting node status.");
                c["lastTransitionTime"] = json!(now);
            }
        }
        if !has_ready {
            conditions.push(json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                "message": "Kubelet never posted node status.", "lastHeartbeatTime": now, "lastTransitionTime": now}));
        }
        let patch = json!({"status": {"conditions": conditions}});
        match self
            .nodes_api()
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(node = %name, "node stopped posting status: Ready is Unknown");
        self.recorder.record(
            n,
            "Normal",
            "NodeNotReady",
            format!("Node {name} status is now: NodeNotReady"),
        );
        // Its pods are not ready any more.
        for p in self.pods.list() {
            if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str()) {
                continue;
            }
            if !crate::pods::is_ready(&p) {
                continue;
            }
            let mut conds = as_json(p.status.as_ref().and_then(|s| s.conditions.as_ref()));
            for c in conds.iter_mut() {
                if c["type"] == "Ready" || c["type"] == "ContainersReady" {
                    c["status"] = json!("False");
                    c["lastTransitionTime"] = json!(now);
                }
            }
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
            let patch = json!({"status": {"conditions": conds}});
            ok_or_gone(
                api.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            )?
        }
        Ok(())
    }

    /// Taint eviction for one pod.
    async fn evict(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let Some(pod) = self.pods.get(key) else {
            return Ok(None);
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .and_then(|n| self.nodes.get(&n))
        else {
            return Ok(None);
        };
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        let mut deadline: Option<Timestamp> = None;
        let mut now_evict = false;
        for t in taints(&node).iter().filter(|t| t.effect == "NoExecute") {
            let matching: Vec<_> = tolerations
                .iter()
                .filter(|tol| scheduler::plugins::selectors::tolerates(tol, t))
                .collect();
            if matching.is_empty() {
                now_evict = true;
                break;
            }
            // The shortest tolerationSeconds among matching tolerations; none means forever.
            let secs = matching
                .iter()
                .filter_map(|tol| tol.toleration_seconds)
                .min();
            if matching.iter().any(|tol| tol.toleration_seconds.is_none()) {
                continue;
            }
            let Some(secs) = secs else { continue };
            let added = t
                .time_added
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now);
            let at = added + SignedDuration::from_secs(secs.max(0));
            deadline = Some(deadline.map_or(at, |d: Timestamp| d.min(at)));
        }
        if !now_evict {
            match deadline {
                None => return Ok(None),
                Some(at) if at > Timestamp::now() => {
                    let left = at.duration_since(Timestamp::now());
                    return Ok(Some(Duration::from_millis(
                        left.as_millis().max(0) as u64 + 50,
                    )));
                }
                Some(_) => {}
            }
        }
        let (ns, name) = runtime::split_key(key);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns.unwrap_or_default());
        match api
            .delete(name, &crate::pods::delete_params(&pod, None))
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %key, node = %node.name_any(), "evicted by a NoExecute taint");
                self.recorder.record(
                    &*pod,
                    "Normal",
                    "TaintManagerEviction",
                    format!("Marking for deletion Pod {key}"),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(None)
    }

    /// Pods bound to nodes that no longer exist are deleted at once (upstream's pod GC).
    async fn collect_orphans(&self) -> anyhow::Result<()> {
        let nodes: HashSet<String> = self.nodes.list().iter().map(|n| n.name_any()).collect();
        let mut checked: HashMap<String, bool> = HashMap::new();
        for p in self.pods.list() {
            let Some(node) = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            if nodes.contains(&node) {
                continue;
            }
            // The cache may lag: ask the API before deleting.
            let gone = match checked.get(&node) {
                Some(g) => *g,
                None => {
                    let g = self.nodes_api().get_opt(&node).await?.is_none();
                    checked.insert(node.clone(), g);
                    g
                }
            };
            if !gone {
                continue;
            }
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
            match api
                .delete(&p.name_any(), &crate::pods::delete_params(&p, Some(0)))
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %runtime::key_of(&*p), %node, "deleted a pod of a deleted node")
                }
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Conditions as JSON, to be changed and written back with a merge patch.
fn as_json<T: serde::Serialize>(items: Option<&Vec<T>>) -> Vec<Value> {
    items
        .into_iter()
        .flatten()
        .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_states_follow_upstream_thresholds() {
        assert_eq!(zone_state(10, 0, 0.55), ZoneState::Normal);
        assert_eq!(zone_state(0, 3, 0.55), ZoneState::FullDisruption);
        // Two unhealthy nodes are never a disruption.
        assert_eq!(zone_state(0, 0, 0.55), ZoneState::Normal);
        assert_eq!(zone_state(1, 2, 0.55), ZoneState::Normal);
        assert_eq!(zone_state(2, 3, 0.55), ZoneState::PartialDisruption);
        assert_eq!(zone_state(5, 3, 0.55), ZoneState::Normal);
    }

    #[test]
    fn eviction_slows_in_large_disrupted_zones_and_stops_in_small_or_dead_ones() {
        let s = Settings::default();
        assert_eq!(s.zone_rate(ZoneState::Normal, 3), 0.1);
        assert_eq!(s.zone_rate(ZoneState::PartialDisruption, 100), 0.01);
        assert_eq!(s.zone_rate(ZoneState::PartialDisruption, 10), 0.0);
        assert_eq!(s.zone_rate(ZoneState::FullDisruption, 100), 0.0);
    }

    #[test]
    fn limiter_allows_a_burst_of_one_then_the_rate() {
        let mut l = Limiter {
            tokens: 1.0,
            at: Instant::now(),
        };
        assert!(l.take(0.1));
        assert!(!l.take(0.1));
        let mut stopped = Limiter {
            tokens: 1.0,
            at: Instant::now(),
        };
        assert!(!stopped.take(0.0));
    }
}
