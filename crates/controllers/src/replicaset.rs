//! The ReplicaSet and ReplicationController controller (one implementation for both kinds):
//! exact replica counts with expectations (no over-creation while the pod watch lags), adoption
//! and release of pods by selector and controller reference, the right victims first on
//! scale-down, and full status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use apimachinery::slim::Slim;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use kube::core::{Selector, SelectorExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::claim::{self, ok_or_gone, Claim};
use crate::events::Recorder;
use crate::pods;
use crate::runtime::{self, Expectations, Informer, Queue};

/// The most pods one sync creates or deletes (upstream's burstReplicas).
const BURST: usize = 500;

/// What the controller needs of a replicated kind.
pub struct View {
    pub uid: String,
    pub generation: i64,
    pub replicas: i32,
    pub selector: Selector,
    /// An empty selector matches nothing here (upstream refuses to act on one).
    pub selector_empty: bool,
    pub template: PodTemplateSpec,
    pub min_ready_seconds: i32,
    pub deleting: bool,
    pub status: Value,
}

pub trait Replicated:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn view(&self) -> View;
}

fn meta_common<K: Resource>(k: &K) -> (String, i64, bool) {
    let m = k.meta();
    (
        m.uid.clone().unwrap_or_default(),
        m.generation.unwrap_or(0),
        m.deletion_timestamp.is_some(),
    )
}

impl Replicated for ReplicaSet {
    fn view(&self) -> View {
        let (uid, generation, deleting) = meta_common(self);
        let spec = self.spec.clone().unwrap_or_default();
        let selector_empty = spec
            .selector
            .match_labels
            .as_ref()
            .is_none_or(|m| m.is_empty())
            && spec
                .selector
                .match_expressions
                .as_ref()
                .is_none_or(|m| m.is_empty());
        View {
            uid,
            generation,
            replicas: spec.replicas.unwrap_or(1),
            selector: Selector::try_from(spec.selector).unwrap_or_default(),
            selector_empty,
            template: spec.template.unwrap_or_default(),
            min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
            deleting,
            status: serde_json::to_value(&self.status).unwrap_or(Value::Null),
        }
    }
}

impl Replicated for ReplicationController {
    fn view(&self) -> View {
        let (uid, generation, deleting) = meta_common(self);
        let spec = self.spec.clone().unwrap_or_default();
        let map: BTreeMap<String, String> = spec.selector.unwrap_or_default();
        View {
            uid,
            generation,
            replicas: spec.replicas.unwrap_or(1),
            selector_empty: map.is_empty(),
            selector: map.into_iter().collect(),
            template: spec.template.unwrap_or_default(),
            min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
            deleting,
            status: serde_json::to_value(&self.status).unwrap_or(Value::Null),
        }
    }
}

pub struct ReplicaController<K: Replicated> {
    client: Client,
    owners: Arc<Informer<K>>,
    pods: Arc<Informer<Pod>>,
    queue: Arc<Queue>,
    expectations: Expectations,
    recorder: Recorder,
}

impl<K: Replicated> ReplicaController<K> {
    pub fn new(
        client: Client,
        owners: Arc<Informer<K>>,
        pods: Arc<Informer<Pod>>,
        recorder: Recorder,
    ) -> Arc<Self> {
        let rc = Arc::new(ReplicaController {
            client,
            owners: owners.clone(),
            pods: pods.clone(),
            queue: Queue::new(),
            expectations: Expectations::default(),
            recorder,
        });
        let q = rc.queue.clone();
        owners.on(move |_old, new| {
            if let Some(o) = new {
                q.add(runtime::key_of(o));
            }
        });
        let weak = Arc::downgrade(&rc);
        pods.on(move |old, new| {
            if let Some(rc) = weak.upgrade() {
                rc.pod_changed(old, new);
            }
        });
        rc
    }

    fn kind() -> String {
        K::kind(&()).into_owned()
    }

    /// The key of the owner of this kind controlling `pod`, if any.
    fn owner_key(pod: &Pod) -> Option<String> {
        let r = runtime::controller_ref(pod)?;
        (r.kind == Self::kind())
            .then(|| format!("{}/{}", pod.namespace().unwrap_or_default(), r.name))
    }

    /// Owners in the pod's namespace whose selector matches it (for orphans).
    fn matching_owners(&self, pod: &Pod) -> Vec<String> {
        let labels = pod.labels();
        self.owners
            .list_namespace(&pod.namespace().unwrap_or_default())
            .iter()
            .filter(|o| {
                let v = o.view();
                !v.selector_empty && v.selector.matches(labels)
            })
            .map(|o| runtime::key_of(&**o))
            .collect()
    }

    fn pod_changed(&self, old: Option<&Pod>, new: Option<&Pod>) {
        match (old, new) {
            (None, Some(p)) => {
                if let Some(k) = Self::owner_key(p) {
                    self.expectations.observe_creation(&k);
                    self.queue.add_soon(k);
                } else {
                    for k in self.matching_owners(p) {
                        self.queue.add(k);
                    }
                }
            }
            (Some(o), Some(p)) => {
                let (ok, nk) = (Self::owner_key(o), Self::owner_key(p));
                if p.metadata.deletion_timestamp.is_some() {
                    // A pod being deleted counts as deleted (upstream does the same).
                    if let Some(k) = &nk {
                        self.expectations.observe_deletion(k, &pods::uid_of(p));
                    }
                }
                if ok != nk {
                    if let Some(k) = &ok {
                        self.queue.add(k.clone());
                    }
                }
                // Only status moved (a pod bound, started, ready): one sync for a burst.
                let status_only =
                    ok == nk && p.metadata.deletion_timestamp.is_none() && o.labels() == p.labels();
                match nk {
                    Some(k) if status_only => self.queue.add_soon(k),
                    Some(k) => self.queue.add(k),
                    None => {
                        if o.labels() != p.labels() || ok.is_some() {
                            for k in self.matching_owners(p) {
                                self.queue.add(k);
                            }
                        }
                    }
                }
            }
            (Some(o), None) => {
                if let Some(k) = Self::owner_key(o) {
                    self.expectations.observe_deletion(&k, &pods::uid_of(o));
                    self.queue.add(k);
                }
            }
            (None, None) => {}
        }
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        self.owners.wait_synced().await;
        self.pods.wait_synced().await;
        for o in self.owners.list() {
            self.queue.add(runtime::key_of(&*o));
        }
        let me = self.clone();
        self.queue
            .clone()
            .run(workers, "replicaset", move |key| {
                let me = me.clone();
                async move { me.sync(&key).await }
            })
            .await;
    }

    fn api_pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn sync(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let Some(owner) = self.owners.get(key) else {
            self.expectations.delete(key);
            return Ok(None);
        };
        let (ns, name) = runtime::split_key(key);
        let ns = ns.unwrap_or_default();
        let v = owner.view();
        let needs_sync = self.expectations.satisfied(key) && !v.deleting;

        // Claim: keep ours that match, release ours that don't, adopt matching orphans.
        let mut mine = Vec::new();
        let api = self.api_pods(ns);
        for p in self.pods.list_claimable(ns, &v.uid) {
            if !pods::is_active(&p) {
                continue;
            }
            let matches = !v.selector_empty && v.selector.matches(p.labels());
            match claim::classify(&*p, &v.uid, matches, v.deleting) {
                Claim::Keep => mine.push(p),
                Claim::Release => {
                    claim::release(&api, &*p, &v.uid).await?;
                }
                Claim::Adopt => {
                    if claim::adopt(&api, &*p, owner_ref(&*owner, &v.uid)).await? {
                        mine.push(p);
                    }
                }
                Claim::Ignore => {}
            }
        }

        let mut create_error = None;
        if needs_sync {
            let diff = mine.len() as i64 - v.replicas.max(0) as i64;
            if diff < 0 {
                let want = ((-diff) as usize).min(BURST);
                create_error = self.create_pods(key, &owner, &v, want).await.err();
            } else if diff > 0 {
                let n = (diff as usize).min(BURST);
                let victims = pods::rank_for_deletion(&mine, n);
                self.expectations
                    .expect(key, 0, victims.iter().map(|p| pods::uid_of(p)));
                let api = self.api_pods(ns);
                let results = pods::delete_all(&api, &victims).await;
                for (p, r) in results {
                    match r {
                        Ok(_) => self.recorder.record(
                            &*owner,
                            "Normal",
                            "SuccessfulDelete",
                            format!("Deleted pod: {}", p.name_any()),
                        ),
                        Err(e) => {
                            self.expectations.observe_deletion(key, &pods::uid_of(&p));
                            if !matches!(&e, kube::Error::Api(s) if s.code == 404) {
                                create_error = Some(e.into());
                            }
                        }
                    }
                }
            }
        }

        // Status.
        let now = k8s_openapi::jiff::Timestamp::now();
        let template_labels = v
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let fully_labeled = mine
            .iter()
            .filter(|p| {
                let l = p.labels();
                template_labels.iter().all(|(k, val)| l.get(k) == Some(val))
            })
            .count();
        let ready = mine.iter().filter(|p| pods::is_ready(p)).count();
        let available = mine
            .iter()
            .filter(|p| pods::is_available(p, v.min_ready_seconds, now))
            .count();
        let mut conditions: Vec<Value> = Vec::new();
        if let Some(e) = &create_error {
            let reason = if diff_sign(&mine, v.replicas) < 0 {
                "FailedCreate"
            } else {
                "FailedDelete"
            };
            conditions.push(
                json!({"type": "ReplicaFailure", "status": "True", "reason": reason,
                "message": e.to_string(), "lastTransitionTime": now.to_string()}),
            );
        }
        let status = json!({
            "replicas": mine.len(),
            "fullyLabeledReplicas": fully_labeled,
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": v.generation,
            "conditions": conditions,
        });
        if status_changed(&v.status, &status) {
            ok_or_gone(
                crate::claim::patch_status_unread::<K>(
                    &self.client,
                    Some(ns),
                    name,
                    &json!({"status": status}),
                )
                .await,
            )?
        }
        if let Some(e) = create_error {
            return Err(e);
        }
        if v.min_ready_seconds > 0 && ready != available {
            return Ok(Some(Duration::from_secs(v.min_ready_seconds as u64)));
        }
        Ok(None)
    }

    /// Create `want` pods in slow-start batches (1, 2, 4, ...): a failing create stops early.
    async fn create_pods(&self, key: &str, owner: &K, v: &View, want: usize) -> anyhow::Result<()> {
        self.expectations.expect(key, want as i64, []);
        let ns = owner.namespace().unwrap_or_default();
        let api = Slim::api(&self.api_pods(&ns));
        let pod = Slim(pods::from_template(
            &v.template,
            &owner.name_any(),
            owner_ref(owner, &v.uid),
        ));
        let pp = PostParams::default();
        let mut done = 0;
        let mut batch = 1;
        while done < want {
            let n = batch.min(want - done);
            let results = futures::future::join_all((0..n).map(|_| api.create(&pp, &pod))).await;
            let mut failed = None;
            for r in results {
                match r {
                    Ok(p) => self.recorder.record(
                        owner,
                        "Normal",
                        "SuccessfulCreate",
                        format!("Created pod: {}", p.name_any()),
                    ),
                    Err(e) => {
                        self.expectations.creations_failed(key, 1);
                        failed = Some(e);
                    }
                }
            }
            done += n;
            if let Some(e) = failed {
                // The rest of this sync's creations will not happen: no longer expected.
                self.expectations
                    .creations_failed(key, (want - done) as i64);
                self.recorder.record(
                    owner,
                    "Warning",
                    "FailedCreate",
                    format!("Error creating: {e}"),
                );
                return Err(e.into());
            }
            batch *= 2;
        }
        Ok(())
    }
}

fn diff_sign(mine: &[Arc<Pod>], replicas: i32) -> i64 {
    (mine.len() as i64 - replicas as i64).signum()
}

/// The controller reference a controller puts on what it creates.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Whether a status differs in a field this controller writes (conditions compared without
/// their timestamps).
fn status_changed(cur: &Value, new: &Value) -> bool {
    let num = |v: &Value, k: &str| v[k].as_i64().unwrap_or(0);
    for k in [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ] {
        if num(cur, k) != num(new, k) {
            return true;
        }
    }
    let conds = |v: &Value| -> Vec<(Value, Value, Value)> {
        v["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["type"].clone(), c["status"].clone(), c["reason"].clone()))
            .collect()
    };
    conds(cur) != conds(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_ignore_timestamps_and_missing_zeroes() {
        let cur = json!({"replicas": 3, "readyReplicas": 3, "availableReplicas": 3, "fullyLabeledReplicas": 3, "observedGeneration": 2});
        let same = json!({"replicas": 3, "readyReplicas": 3, "availableReplicas": 3, "fullyLabeledReplicas": 3, "observedGeneration": 2, "conditions": []});
        assert!(!status_changed(&cur, &same));
        let zero = json!({"replicas": 0, "readyReplicas": 0, "availableReplicas": 0, "fullyLabeledReplicas": 0, "observedGeneration": 0, "conditions": []});
        assert!(!status_changed(&Value::Null, &zero));
        let fewer = json!({"replicas": 2, "readyReplicas": 2, "availableReplicas": 2, "fullyLabeledReplicas": 2, "observedGeneration": 2, "conditions": []});
        assert!(status_changed(&cur, &fewer));
    }

    #[test]
    fn rc_selectors_are_maps_and_empty_ones_match_nothing() {
        let rc: ReplicationController = serde_json::from_value(json!({
            "metadata": {"name": "r", "uid": "u", "generation": 1},
            "spec": {"replicas": 2, "selector": {"app": "x"}, "template": {"metadata": {"labels": {"app": "x"}}}},
        }))
        .unwrap();
        let v = rc.view();
        assert!(!v.selector_empty);
        assert!(v
            .selector
            .matches(&[("app".to_string(), "x".to_string())].into()));
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "r"}, "spec": {"selector": {}}}))
        .unwrap();
        assert!(rs.view().selector_empty);
        assert_eq!(rs.view().replicas, 1);
    }
}
