//! The DaemonSet controller: one pod per eligible node (the template's nodeSelector and node
//! affinity, taints against its tolerations plus the ones upstream adds), following nodes as
//! they come, go and change; pods are placed by the scheduler through a `metadata.name` node
//! affinity, as upstream does. RollingUpdate (maxUnavailable, maxSurge) and OnDelete;
//! ControllerRevisions hold the template history.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodTemplateSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::{Client, ResourceExt};
use scheduler::plugins::selectors;
use serde_json::{json, Value};

use crate::claim::ok_or_gone;
use crate::deployment::{resolve, template_hash};
use crate::events::Recorder;
use crate::pods;
use crate::replicaset::owner_ref;
use crate::runtime::{self, Expectations, Informer, Queue};

pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";
const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";

pub struct DaemonSetController {
    client: Client,
    daemonsets: Arc<Informer<DaemonSet>>,
    nodes: Arc<Informer<Node>>,
    pods: Arc<Informer<Pod>>,
    revisions: Arc<Informer<ControllerRevision>>,
    queue: Arc<Queue>,
    expectations: Expectations,
    recorder: Recorder,
}

/// The tolerations every daemon pod gets (upstream's AddOrUpdateDaemonPodTolerations).
pub fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    let mut out = vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        out.push(t("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    out
}

/// The template's tolerations plus the daemon ones (no duplicates).
fn all_tolerations(template: &PodTemplateSpec) -> Vec<Toleration> {
    let spec = template.spec.clone().unwrap_or_default();
    let mut tol = spec.tolerations.unwrap_or_default();
    for t in daemon_tolerations(spec.host_network.unwrap_or(false)) {
        if !tol
            .iter()
            .any(|x| x.key == t.key && x.effect == t.effect && x.operator == t.operator)
        {
            tol.push(t);
        }
    }
    tol
}

/// Whether a node should run the daemon pod, and whether an existing pod may keep running
/// there (a NoSchedule taint added later does not evict; an untolerated NoExecute one does).
pub fn should_run(template: &PodTemplateSpec, node: &Node) -> (bool, bool) {
    let spec = template.spec.clone().unwrap_or_default();
    let name = node.name_any();
    if let Some(n) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        if n != name {
            return (false, false);
        }
    }
    let labels = node.labels();
    if let Some(sel) = &spec.node_selector {
        if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return (false, false);
        }
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(req) = required {
        if !req
            .node_selector_terms
            .iter()
            .any(|t| selectors::term_matches(t, labels, &name))
        {
            return (false, false);
        }
    }
    let tolerations = all_tolerations(template);
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let mut run = true;
    let mut keep = true;
    for taint in &taints {
        if taint.effect == "PreferNoSchedule" || selectors::tolerated(&tolerations, taint) {
            continue;
        }
        run = false;
        if taint.effect == "NoExecute" {
            keep = false;
        }
    }
    (run, keep)
}

/// A daemon pod for `node`: the template, the revision labels, the daemon tolerations, and a
/// required node affinity for exactly that node.
fn pod_for(ds: &DaemonSet, template: &PodTemplateSpec, hash: &str, node: &str) -> Pod {
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let mut pod = pods::from_template(template, &ds.name_any(), owner_ref(ds, &uid));
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(REVISION_HASH_LABEL.into(), hash.into());
    labels.insert(
        TEMPLATE_GENERATION_LABEL.into(),
        ds.metadata.generation.unwrap_or(0).to_string(),
    );
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.tolerations = Some(all_tolerations(template));
    let term = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![term],
    });
    pod
}

impl DaemonSetController {
    pub fn new(
        client: Client,
        daemonsets: Arc<Informer<DaemonSet>>,
        nodes: Arc<Informer<Node>>,
        pods: Arc<Informer<Pod>>,
        revisions: Arc<Informer<ControllerRevision>>,
        recorder: Recorder,
    ) -> Arc<Self> {
        let dc = Arc::new(DaemonSetController {
            client,
            daemonsets: daemonsets.clone(),
            nodes: nodes.clone(),
            pods: pods.clone(),
            revisions,
            queue: Queue::new(),
            expectations: Expectations::default(),
            recorder,
        });
        let q = dc.queue.clone();
        daemonsets.on(move |_old, new| {
            if let Some(d) = new {
                q.add(runtime::key_of(d));
            }
        });
        // Any node change may change where daemons run.
        let weak = Arc::downgrade(&dc);
        nodes.on(move |old, new| {
            let Some(dc) = weak.upgrade() else { return };
            let relevant = match (old, new) {
                (Some(o), Some(n)) => {
                    o.labels() != n.labels()
                        || o.spec.as_ref().and_then(|s| s.taints.clone())
                            != n.spec.as_ref().and_then(|s| s.taints.clone())
                        || o.spec.as_ref().and_then(|s| s.unschedulable)
                            != n.spec.as_ref().and_then(|s| s.unschedulable)
                }
                _ => true,
            };
            if relevant {
                for d in dc.daemonsets.list() {
                    dc.queue.add(runtime::key_of(&*d));
                }
            }
        });
        let weak = Arc::downgrade(&dc);
        pods.on(move |old, new| {
            let Some(dc) = weak.upgrade() else { return };
            let p = new.or(old).expect("a change has an object");
            let Some(r) = runtime::controller_ref(p).filter(|r| r.kind == "DaemonSet") else {
                return;
            };
            let key = format!("{}/{}", p.namespace().unwrap_or_default(), r.name);
            match (old, new) {
                (None, Some(_)) => dc.expectations.observe_creation(&key),
                (Some(_), None) => dc.expectations.observe_deletion(&key, &pods::uid_of(p)),
                (Some(_), Some(n)) if n.metadata.deletion_timestamp.is_some() => {
                    dc.expectations.observe_deletion(&key, &pods::uid_of(p))
                }
                _ => {}
            }
            dc.queue.add(key);
        });
        dc
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        self.daemonsets.wait_synced().await;
        self.nodes.wait_synced().await;
        self.pods.wait_synced().await;
        self.revisions.wait_synced().await;
        for d in self.daemonsets.list() {
            self.queue.add(runtime::key_of(&*d));
        }
        let me = self.clone();
        self.queue
            .clone()
            .run(workers, "daemonset", move |key| {
                let me = me.clone();
                async move { me.sync(&key).await }
            })
            .await;
    }

    /// The current revision's hash, making (or renumbering) its ControllerRevision, and
    /// trimming history beyond revisionHistoryLimit.
    async fn revision(&self, ds: &DaemonSet, template: &PodTemplateSpec) -> anyhow::Result<String> {
        let ns = ds.namespace().unwrap_or_default();
        let uid = ds.metadata.uid.clone().unwrap_or_default();
        let hash = template_hash(template, ds.status.as_ref().and_then(|s| s.collision_count));
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), &ns);
        let mut mine: Vec<Arc<ControllerRevision>> = self.revisions.list_controlled_by(&uid);
        mine.sort_by_key(|r| r.revision);
        let max = mine.iter().map(|r| r.revision).max().unwrap_or(0);
        let name = format!("{}-{hash}", ds.name_any());
        match mine.iter().find(|r| r.name_any() == name) {
            Some(r) if r.revision == max => {}
            Some(r) => {
                let patch = json!({"revision": max + 1});
                api.patch(&r.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
            }
            None => {
                let data = json!({"spec": {"template": {"$patch": "replace"}}});
                let mut data = data;
                data["spec"]["template"] = serde_json::to_value(template)?;
                data["spec"]["template"]["$patch"] = json!("replace");
                let labels: BTreeMap<String, String> = ds
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.match_labels.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .chain([(REVISION_HASH_LABEL.to_string(), hash.clone())])
                    .collect();
                let cr = ControllerRevision {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        labels: Some(labels),
                        owner_references: Some(vec![owner_ref(ds, &uid)]),
                        ..Default::default()
                    },
                    data: Some(RawExtension(data)),
                    revision: max + 1,
                };
                match api.create(&PostParams::default(), &cr).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // History: old revisions no pod uses, beyond the limit.
        let limit = ds
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let in_use: std::collections::HashSet<String> = self
            .pods
            .list_controlled_by(&uid)
            .iter()
            .filter_map(|p| p.labels().get(REVISION_HASH_LABEL).cloned())
            .collect();
        let old: Vec<&Arc<ControllerRevision>> = mine
            .iter()
            .filter(|r| r.name_any() != name)
            .filter(|r| {
                !r.labels()
                    .get(REVISION_HASH_LABEL)
                    .is_some_and(|h| in_use.contains(h))
            })
            .collect();
        if old.len() > limit {
            for r in old.iter().take(old.len() - limit) {
                ok_or_gone(api.delete(&r.name_any(), &DeleteParams::default()).await)?
            }
        }
        Ok(hash)
    }

    async fn sync(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let Some(ds) = self.daemonsets.get(key) else {
            self.expectations.delete(key);
            return Ok(None);
        };
        let ns = ds.namespace().unwrap_or_default();
        let spec = ds.spec.clone().unwrap_or_default();
        let uid = ds.metadata.uid.clone().unwrap_or_default();
        let Ok(selector) = Selector::try_from(spec.selector.clone()) else {
            return Ok(None);
        };
        if ds.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let template = spec.template.clone();
        let hash = self.revision(&ds, &template).await?;
        // Pods per node (ours, matching).
        let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        for p in self.pods.list_controlled_by(&uid) {
            if p.metadata.deletion_timestamp.is_some() || !selector.matches(p.labels()) {
                continue;
            }
            let node = pod_node(&p);
            by_node.entry(node).or_default().push(p);
        }
        let nodes = self.nodes.list();
        let now = Timestamp::now();
        let min_ready = spec.min_ready_seconds.unwrap_or(0);
        let (mut create_on, mut delete) = (Vec::new(), Vec::new());
        let mut status = Counts::default();
        let mut rolling_candidates: Vec<(String, Arc<Pod>)> = Vec::new();
        let mut surge_nodes: Vec<String> = Vec::new();
        let mut surging = 0;
        let rolling = spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            .unwrap_or("RollingUpdate")
            == "RollingUpdate";
        for node in nodes.iter() {
            let name = node.name_any();
            let (run, keep) = should_run(&template, node);
            let mut here = by_node.remove(&name).unwrap_or_default();
            // Failed pods are replaced.
            let (failed, live): (Vec<_>, Vec<_>) = here.drain(..).partition(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
            });
            delete.extend(failed);
            let mut live = live;
            if run {
                status.desired += 1;
            }
            if !live.is_empty() {
                if run || keep {
                    if run {
                        status.current += 1;
                    } else {
                        status.misscheduled += 1;
                    }
                } else {
                    status.misscheduled += 1;
                }
            }
            if !(run || keep) {
                delete.extend(live);
                continue;
            }
            if !run && live.is_empty() {
                continue;
            }
            if live.is_empty() {
                create_on.push(name);
                status.unavailable += 1;
                continue;
            }
            // More than one: keep the oldest (a new-revision one if any is available).
            live.sort_by_key(|p| {
                (
                    p.labels().get(REVISION_HASH_LABEL) != Some(&hash),
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                )
            });
            let new_pods: Vec<&Arc<Pod>> = live
                .iter()
                .filter(|p| p.labels().get(REVISION_HASH_LABEL) == Some(&hash))
                .collect();
            let old_pods: Vec<&Arc<Pod>> = live
                .iter()
                .filter(|p| p.labels().get(REVISION_HASH_LABEL) != Some(&hash))
                .collect();
            if !new_pods.is_empty() {
                status.updated += 1;
            }
            if !new_pods.is_empty() && !old_pods.is_empty() {
                surging += 1;
            }
            let new_available = new_pods
                .iter()
                .any(|p| pods::is_available(p, min_ready, now));
            if live.len() > 1 && (new_available || new_pods.is_empty()) {
                // Surge finished (or plain duplicates): keep one, delete the rest.
                let keeper = if new_available {
                    new_pods
                        .iter()
                        .find(|p| pods::is_available(p, min_ready, now))
                        .map(|p| (*p).clone())
                } else {
                    Some(live[0].clone())
                };
                for p in &live {
                    if keeper
                        .as_ref()
                        .is_some_and(|k| k.metadata.uid == p.metadata.uid)
                    {
                        continue;
                    }
                    delete.push(p.clone());
                }
            }
            let any_ready = live.iter().any(|p| pods::is_ready(p));
            let any_available = live.iter().any(|p| pods::is_available(p, min_ready, now));
            if any_ready {
                status.ready += 1;
            }
            if any_available {
                status.available += 1;
            } else {
                status.unavailable += 1;
            }
            if rolling && run && new_pods.is_empty() && old_pods.len() == live.len() {
                rolling_candidates.push((node.name_any(), live[0].clone()));
                if old_pods
                    .iter()
                    .all(|p| pods::is_available(p, min_ready, now))
                {
                    surge_nodes.push(node.name_any());
                }
            }
        }
        // Pods on nodes that are gone.
        for (_, pods) in by_node {
            delete.extend(pods);
        }
        // Rolling update.
        if rolling && self.expectations.satisfied(key) {
            let ru = spec
                .update_strategy
                .as_ref()
                .and_then(|s| s.rolling_update.clone())
                .unwrap_or_default();
            let desired = status.desired;
            let max_surge = resolve(ru.max_surge.as_ref(), 0, desired, true);
            let mut max_unavailable = resolve(ru.max_unavailable.as_ref(), 0, desired, true);
            if ru.max_unavailable.is_none() && max_surge == 0 {
                max_unavailable = 1;
            }
            if max_surge == 0 && max_unavailable == 0 {
                max_unavailable = 1;
            }
            let mut unavailable = status.unavailable;
            if max_surge > 0 {
                // Surge: start a new pod beside an available old one; the old goes once the
                // new one is available.
                let mut budget = max_surge - surging;
                for node in surge_nodes {
                    if budget <= 0 {
                        break;
                    }
                    create_on.push(node);
                    budget -= 1;
                }
            } else {
                // Unavailable old pods go first; available ones while the budget allows.
                rolling_candidates.sort_by_key(|(_, p)| pods::is_available(p, min_ready, now));
                for (_, p) in rolling_candidates {
                    if !pods::is_available(&p, min_ready, now) {
                        delete.push(p);
                    } else if unavailable < max_unavailable {
                        delete.push(p);
                        unavailable += 1;
                    }
                }
            }
        }
        if self.expectations.satisfied(key) {
            delete.sort_by_key(|p| p.metadata.uid.clone());
            delete.dedup_by_key(|p| p.metadata.uid.clone());
            self.expectations.expect(
                key,
                create_on.len() as i64,
                delete.iter().map(|p| pods::uid_of(p)),
            );
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let pp = PostParams::default();
            let creates = futures::future::join_all(create_on.iter().map(|node| {
                let pod = pod_for(&ds, &template, &hash, node);
                let api = api.clone();
                let pp = &pp;
                async move { (node, api.create(pp, &pod).await) }
            }))
            .await;
            for (node, r) in creates {
                match r {
                    Ok(p) => self.recorder.record(
                        &*ds,
                        "Normal",
                        "SuccessfulCreate",
                        format!("Created pod: {}", p.name_any()),
                    ),
                    Err(e) => {
                        self.expectations.creations_failed(key, 1);
                        self.recorder.record(
                            &*ds,
                            "Warning",
                            "FailedCreate",
                            format!("Error creating: {e} (node {node})"),
                        );
                    }
                }
            }
            let deletes = pods::delete_all(&api, &delete).await;
            for (p, r) in deletes {
                match r {
                    Ok(_) => self.recorder.record(
                        &*ds,
                        "Normal",
                        "SuccessfulDelete",
                        format!("Deleted pod: {}", p.name_any()),
                    ),
                    Err(_) => self.expectations.observe_deletion(key, &pods::uid_of(&p)),
                }
            }
        }
        let st = json!({
            "desiredNumberScheduled": status.desired,
            "currentNumberScheduled": status.current,
            "numberMisscheduled": status.misscheduled,
            "numberReady": status.ready,
            "numberAvailable": status.available,
            "numberUnavailable": status.unavailable,
            "updatedNumberScheduled": status.updated,
            "observedGeneration": ds.metadata.generation.unwrap_or(0),
        });
        let cur = serde_json::to_value(&ds.status).unwrap_or(Value::Null);
        let changed = [
            "desiredNumberScheduled",
            "currentNumberScheduled",
            "numberMisscheduled",
            "numberReady",
            "numberAvailable",
            "numberUnavailable",
            "updatedNumberScheduled",
            "observedGeneration",
        ]
        .iter()
        .any(|k| cur[k].as_i64().unwrap_or(0) != st[k].as_i64().unwrap_or(0));
        if changed {
            let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &ns);
            ok_or_gone(
                api.patch_status(
                    &ds.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": st})),
                )
                .await,
            )?
        }
        if min_ready > 0 && status.ready != status.available {
            return Ok(Some(Duration::from_secs(min_ready as u64)));
        }
        Ok(None)
    }
}

#[derive(Default)]
struct Counts {
    desired: i32,
    current: i32,
    misscheduled: i32,
    ready: i32,
    available: i32,
    unavailable: i32,
    updated: i32,
}

/// The node a daemon pod is for: where it is bound, or the node its affinity names.
fn pod_node(p: &Pod) -> String {
    if let Some(n) = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
    {
        return n;
    }
    p.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .and_then(|r| r.node_selector_terms.first())
        .and_then(|t| t.match_fields.as_ref())
        .and_then(|f| f.iter().find(|r| r.key == "metadata.name"))
        .and_then(|r| r.values.as_ref())
        .and_then(|v| v.first().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: Value, taints: Value) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}),
        )
        .unwrap()
    }

    fn template(spec: Value) -> PodTemplateSpec {
        serde_json::from_value(json!({"metadata": {"labels": {"app": "d"}}, "spec": spec})).unwrap()
    }

    #[test]
    fn eligibility_follows_selectors_affinity_and_taints() {
        let t = template(json!({"containers": [], "nodeSelector": {"disk": "ssd"}}));
        assert_eq!(
            should_run(&t, &node("a", json!({"disk": "ssd"}), json!([]))),
            (true, true)
        );
        assert_eq!(
            should_run(&t, &node("b", json!({}), json!([]))),
            (false, false)
        );
        let t = template(json!({"containers": []}));
        let tainted = node(
            "c",
            json!({}),
            json!([{"key": "k", "effect": "NoSchedule"}]),
        );
        // Not started on a NoSchedule node, but a running pod may stay.
        assert_eq!(should_run(&t, &tainted), (false, true));
        let evicting = node("c", json!({}), json!([{"key": "k", "effect": "NoExecute"}]));
        assert_eq!(should_run(&t, &evicting), (false, false));
        // The daemon tolerations: unschedulable and not-ready nodes still run daemons.
        let cordoned = node(
            "d",
            json!({}),
            json!([{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                                                  {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]),
        );
        assert_eq!(should_run(&t, &cordoned), (true, true));
        let t = template(
            json!({"containers": [], "tolerations": [{"key": "k", "operator": "Exists"}]}),
        );
        assert_eq!(should_run(&t, &evicting), (true, true));
    }

    #[test]
    fn daemon_pods_pin_their_node_by_affinity() {
        let ds: DaemonSet = serde_json::from_value(json!({"metadata": {"name": "ds", "uid": "u", "generation": 3},
            "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": []}}}})).unwrap();
        let t = ds.spec.clone().unwrap().template;
        let p = pod_for(&ds, &t, "h1", "n7");
        assert_eq!(pod_node(&p), "n7");
        assert_eq!(p.labels()[REVISION_HASH_LABEL], "h1");
        assert_eq!(p.labels()[TEMPLATE_GENERATION_LABEL], "3");
        assert!(p.spec.unwrap().tolerations.unwrap().len() >= 6);
    }
}
